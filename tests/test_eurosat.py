"""EuroSAT: the RGB JPEG release and the 13-band GeoTIFF release, from fixtures laid out like
the real archives (class folders, 64 x 64 tiles, 16-bit digital numbers, B8A stored last)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from ssl_pipeline.backbones import create_backbone, fit_input_channels
from ssl_pipeline.data import build_dataset, eurosat
from ssl_pipeline.data.bad_images import BadImage
from ssl_pipeline.data.eurosat import STORED_BANDS, WAVELENGTH_BANDS
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.recipe import DataConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_CLASSES = ("Forest", "Highway", "SeaLake")


def tile(class_index: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """`(13, size, size)` uint16 digital numbers in the file's band order: band b holds
    100 * (b + 1) plus a class-dependent bump in band `class_index` and noise."""
    levels = 100.0 * (np.arange(13) + 1)
    levels[class_index] += 3000
    noise = rng.normal(0, 30, (13, size, size))
    return np.clip(levels[:, None, None] + noise, 0, 65535).astype(np.uint16)


def write_eurosat_ms(folder: Path, per_class: int = 8, bands_last: bool = True,
                     classes=FIXTURE_CLASSES, seed: int = 0) -> Path:
    """Class folders of 13-band GeoTIFF-like tiles, as EuroSAT_MS/ holds them."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            array = tile(c, rng)
            if bands_last:  # (H, W, 13), pixel-interleaved: how EuroSAT's files read
                tifffile.imwrite(folder / name / f"{name}_{n}.tif", np.moveaxis(array, 0, 2))
            else:
                tifffile.imwrite(folder / name / f"{name}_{n}.tif", array, planarconfig="separate")
    return folder


def write_eurosat_rgb(folder: Path, per_class: int = 8, classes=FIXTURE_CLASSES,
                      seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            pixels = np.clip(rng.normal(60 + 60 * c, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{name}_{n}.jpg", quality=95)
    return folder


def cfg(root: Path, **settings) -> DataConfig:
    return DataConfig(name="eurosat", root=str(root), val_fraction=0.25, test_fraction=0.25,
                      eurosat=settings)


@pytest.fixture(autouse=True)
def stats_cache(tmp_path, monkeypatch) -> Path:
    """Each test's normalization statistics cache in its own directory."""
    monkeypatch.setattr(eurosat, "STATS_CACHE", tmp_path / "stats_cache")
    return tmp_path / "stats_cache"


def test_normalization_statistics_are_measured_once_then_read_from_the_cache(
        tmp_path, stats_cache, monkeypatch):
    folder = write_eurosat_ms(tmp_path / "EuroSAT_MS")
    first = build_dataset(cfg(folder, bands="ms"))
    assert len(list(stats_cache.glob("*.json"))) == 1
    reads = []
    read = eurosat.BandFiles.__getitem__
    monkeypatch.setattr(eurosat.BandFiles, "__getitem__",
                        lambda self, i: reads.append(i) or read(self, i))
    again = build_dataset(cfg(folder, bands="ms"))
    assert reads == [] and (again.mean, again.std) == (first.mean, first.std)
    four = build_dataset(cfg(folder, bands=["B04", "B03", "B02", "B08"]))  # other bands: measured
    assert reads and len(four.mean) == 4 and four.mean[0] == first.mean[3]
    # a sampled tile rewritten (brighter, newer) is measured again
    reads.clear()
    path = first.train.source.paths[int(first.train.indices[0])]
    tifffile.imwrite(path, np.full((64, 64, 13), 9000, np.uint16))
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    changed = build_dataset(cfg(folder, bands="ms"))
    assert reads and changed.mean[0] > first.mean[0]


def test_rgb_release_loads_as_64px_photos_with_its_own_statistics(tmp_path):
    write_eurosat_rgb(tmp_path / "EuroSAT_RGB")
    bundle = build_dataset(cfg(tmp_path))  # the release folder is found under data.root
    assert (bundle.channels, bundle.image_size, bundle.num_classes) == (3, 64, 3)
    from ssl_pipeline.data import files_size_for_backbone
    from ssl_pipeline.recipe import BackboneConfig

    # the dataset's own fixed 64 px, kept for a backbone starting from pretrained weights too
    assert files_size_for_backbone(bundle, BackboneConfig(pretrained=True)).image_size == 64
    assert bundle.class_names == sorted(FIXTURE_CLASSES)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 24
    assert np.bincount(bundle.test.labels).tolist() == [2, 2, 2]  # stratified
    image, label = bundle.train[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "RGB"
    # the classes' brightness is 60, 120, 180 of 255 in equal shares: the mean is near 120/255
    assert all(abs(m - 120 / 255) < 0.05 for m in bundle.mean)
    assert bundle.bands == ["B04", "B03", "B02"]


@pytest.mark.parametrize("bands_last", [True, False])
def test_ms_tiles_read_either_layout_as_unclipped_reflectance_with_b8a_placed(tmp_path, bands_last):
    folder = write_eurosat_ms(tmp_path / "EuroSAT_MS", bands_last=bands_last)
    raw = tifffile.imread(folder / "Forest" / "Forest_1.tif")
    raw = np.moveaxis(raw, 2, 0) if bands_last else raw
    stored = build_dataset(cfg(folder, bands="ms", band_order="stored"))
    wavelength = build_dataset(cfg(folder, bands="ms"))  # default: wavelength order
    assert stored.channels == wavelength.channels == 13
    assert stored.bands == list(STORED_BANDS) and stored.bands[-1] == "B8A"
    assert wavelength.bands == list(WAVELENGTH_BANDS) and wavelength.bands[8] == "B8A"
    source = stored.train.source
    first = source.paths.index(folder / "Forest" / "Forest_1.tif")
    x_stored, label = source[first]
    x_wave, _ = wavelength.train.source[first]
    assert x_stored.dtype == torch.float32 and x_stored.shape == (13, 64, 64)
    assert torch.equal(x_stored, torch.from_numpy(raw.astype(np.float32) / 10000))
    # B8A is the file's last band; in wavelength order it comes right after B08
    assert torch.equal(x_wave[8], x_stored[12]) and torch.equal(x_wave[9:], x_stored[8:12])
    assert stored.class_names[label] == "Forest"
    # per-band statistics in reflectance units: band b holds about (b + 1) / 100
    assert len(stored.mean) == 13
    assert abs(stored.mean[5] - 0.06) < 0.002 and stored.std[5] < 0.01
    assert abs(stored.mean[1] - (0.02 + 0.3 / 3)) < 0.01  # Highway's bump, a third of tiles


def test_bright_pixels_are_not_clipped(tmp_path):
    folder = tmp_path / "EuroSAT_MS"
    write_eurosat_ms(folder, per_class=4)
    bright = np.full((64, 64, 13), 23000, np.uint16)  # reflectance 2.3: a cloud, specular glint
    tifffile.imwrite(folder / "Forest" / "Forest_1.tif", bright)
    bundle = build_dataset(cfg(folder, bands="ms"))
    source = bundle.train.source
    x, _ = source[source.paths.index(folder / "Forest" / "Forest_1.tif")]
    assert float(x.max()) == pytest.approx(2.3)


def test_a_band_list_keeps_those_bands_in_that_order(tmp_path):
    folder = write_eurosat_ms(tmp_path / "EuroSAT_MS", per_class=4)
    bundle = build_dataset(cfg(folder, bands=["B04", "B03", "B02", "B8A"]))
    assert bundle.channels == 4 and bundle.bands == ["B04", "B03", "B02", "B8A"]
    x, _ = bundle.train[0]
    assert x.shape == (4, 64, 64) and len(bundle.mean) == 4
    with pytest.raises(SSLPipelineError, match="B13"):
        build_dataset(cfg(folder, bands=["B04", "B13"]))
    with pytest.raises(SSLPipelineError, match="only gray and RGB"):
        build_dataset(DataConfig(name="eurosat", root=str(folder), channels=3, val_fraction=0.25,
                                 test_fraction=0.25, eurosat={"bands": "ms"}))


def test_torchgeo_split_lists_are_used_when_present(tmp_path):
    folder = write_eurosat_ms(tmp_path / "EuroSAT_MS", per_class=4)
    lists = {"train": [f"{c}_{n}.tif" for c in FIXTURE_CLASSES for n in (1, 2)],
             "val": [f"{c}_3.tif" for c in FIXTURE_CLASSES],
             "test": [f"{c}_4.tif" for c in FIXTURE_CLASSES]}
    for split, names in lists.items():
        (tmp_path / f"eurosat-{split}.txt").write_text("\n".join(names) + "\n")
    bundle = build_dataset(cfg(folder, bands="ms"))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 3, 3)
    assert sorted(p.name for p in np.array(bundle.test.source.paths)[bundle.test.indices]) \
        == sorted(lists["test"])
    assert "torchgeo" in bundle.source


def test_missing_and_malformed_data_are_clear_errors(tmp_path):
    with pytest.raises(SSLPipelineError, match="EuroSAT_MS.*zenodo|zenodo"):
        build_dataset(cfg(tmp_path, bands="ms"))
    with pytest.raises(SSLPipelineError, match="data.download=true"):
        build_dataset(cfg(tmp_path))  # RGB can be fetched; it says how
    folder = write_eurosat_ms(tmp_path / "EuroSAT_MS", per_class=6)
    five = folder / "Highway" / "Highway_2.tif"
    tifffile.imwrite(five, np.zeros((64, 64, 5), np.uint16))
    with pytest.raises(BadImage, match="Highway_2.tif.*13 bands"):  # read for the band statistics
        build_dataset(cfg(folder, bands="ms"))
    skipped = build_dataset(DataConfig(name="eurosat", root=str(folder), val_fraction=0.25,
                                       test_fraction=0.25, on_bad_image="skip",
                                       eurosat={"bands": "ms"}))
    assert skipped.skipped_images["count"] == 1
    assert skipped.skipped_images["files"][0]["path"].endswith("Highway_2.tif")
    assert len(skipped.train) + len(skipped.val) + len(skipped.test) == 17


def test_multispectral_views_and_eval_transform_take_13_bands(tmp_path):
    from ssl_pipeline.data.transforms import eval_transform, fit_views, ssl_views_transform

    folder = write_eurosat_ms(tmp_path / "EuroSAT_MS", per_class=4)
    bundle = build_dataset(cfg(folder, bands="ms"))
    views = fit_views(64, 13, {"augment_on": "device"})
    assert views.augment_on == "workers"  # the device path makes views of 1 or 3 channels
    assert views.color_jitter_prob == views.grayscale_prob == 0.0 and views.blur_prob > 0
    x, _ = bundle.train[0]
    one, two = ssl_views_transform(views, 32, bundle.mean, bundle.std)(x)
    assert one.shape == two.shape == (13, 32, 32) and not torch.equal(one, two)
    evaluated = eval_transform(64, bundle.mean, bundle.std)(x)
    expected = (x - torch.tensor(bundle.mean)[:, None, None]) / torch.tensor(bundle.std)[:, None, None]
    assert torch.allclose(evaluated, expected, atol=1e-5)
    with pytest.raises(SSLPipelineError, match="color_jitter_prob=0.5.*13 bands"):
        fit_views(64, 13, {"color_jitter_prob": 0.5})


def test_first_conv_adaptation_rules_keep_the_response_they_promise():
    torch.manual_seed(0)
    rgb = create_backbone("timm:resnet18", in_chans=3, input_size=32, stem="default").eval()
    conv = rgb.model.conv1
    gray_image = torch.rand(2, 1, 32, 32)
    before = conv(gray_image.repeat(1, 3, 1, 1))
    rule = fit_input_channels(rgb, 1)
    assert "3->1" in rule and rgb.preprocessing.in_chans == 1 and len(rgb.preprocessing.mean) == 1
    assert torch.allclose(rgb.model.conv1(gray_image), before, atol=1e-5)
    assert "at evaluation 3->1" in rgb.input_conv_rule

    gray = create_backbone("timm:resnet18", in_chans=1, input_size=32, stem="default").eval()
    before = gray.model.conv1(gray_image)
    fit_input_channels(gray, 3)
    assert torch.allclose(gray.model.conv1(gray_image.repeat(1, 3, 1, 1)), before, atol=1e-5)

    bands = create_backbone("timm:resnet18", in_chans=3, input_size=32, stem="default").eval()
    weight = bands.model.conv1.weight.detach().clone()
    mean, std = tuple(0.1 * (i + 1) for i in range(13)), (0.05,) * 13
    rule = fit_input_channels(bands, 13, mean, std)
    adapted = bands.model.conv1.weight.detach()
    assert adapted.shape[1] == 13 and torch.allclose(adapted[:, 3], weight[:, 0] * 3 / 13)
    assert bands.preprocessing.mean == mean and "data's per-channel" in rule
    assert bands(torch.randn(2, 13, 32, 32)).shape == (2, bands.feature_dim)

    with pytest.raises(SSLPipelineError, match="no rule"):
        fit_input_channels(bands, 3)


@pytest.mark.slow
def test_pretrain_on_13_bands_then_transfer_rgb_weights_to_13_bands(tmp_path, tiny_overrides):
    """SimCLR on the multispectral fixture (in_chans 13, bands recorded), then the transfer
    recipe evaluating a 3-channel backbone on the 13 bands (first conv adapted, recorded)."""
    from ssl_pipeline.cli import main

    sets = lambda overrides: [a for o in overrides for a in ("--set", o)]  # noqa: E731
    folder = write_eurosat_ms(tmp_path / "EuroSAT_MS", per_class=12)
    common = [f"data.root={folder}", "data.eurosat.bands=ms", "data.val_fraction=0.25",
              "data.test_fraction=0.25", "tracking.wandb.mode=disabled",
              f"eval.cache_dir={tmp_path / 'cache'}"]
    ms_run = tmp_path / "ms"
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--quiet", "--out", str(ms_run),
                 *sets([*tiny_overrides, "data.name=eurosat", *common, "stages=[pretrain,knn]",
                        "data.image_size=32", "eval.baselines=[random_init]",
                        # the quickstart's brightness/contrast jitter is for its gray digits;
                        # 13 bands have no colour steps (asking for them is an error)
                        "views.color_jitter_prob=0"])]) == 0
    record = json.loads((ms_run / "backbone.json").read_text())
    assert record["in_chans"] == 13 and record["data"]["bands"][8] == "B8A"
    results = json.loads((ms_run / "results.json").read_text())
    assert results["knn"]["top1"] > 0.6  # each class lifts its own band: easy

    rgb_run = tmp_path / "rgb"
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--quiet", "--out", str(rgb_run),
                 *sets([*tiny_overrides, "stages=[pretrain]", "data.channels=3"])]) == 0
    out = tmp_path / "transfer"
    assert main(["evaluate", str(ROOT / "recipes" / "transfer_eurosat.yaml"), "--backbone",
                 str(rgb_run), "--quiet", "--out", str(out),
                 *sets([*common, "eval.seeds=1", "eval.linear_probe.epochs=10",
                        "eval.finetune.epochs=1", "eval.finetune.label_fractions=[1.0]",
                        "eval.few_shot.shots=[1]", "eval.few_shot.seeds=2",
                        "eval.few_shot.vtab_1k=false",
                        "trainer.accelerator=cpu", "trainer.precision=32"])]) == 0
    results = json.loads((out / "results.json").read_text())
    adapted = results["knn"]["preprocessing"]["input_channels"]
    assert (adapted["backbone"], adapted["data"]) == (3, 13) and "3->13" in adapted["rule"]
    for stage in ("knn", "linear_probe", "finetune", "few_shot"):
        assert stage in results and stage in results["baselines"]["random_init"]
