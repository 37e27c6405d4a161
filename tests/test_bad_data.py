"""Bad data in an image folder: unusual files are converted faithfully; unreadable ones stop
the run naming the file (data.on_bad_image=error, exit status 2, checkpoints kept) or are
left out and listed in the report (skip)."""

from __future__ import annotations

import io
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ssl_pipeline.cli import main
from ssl_pipeline.data import bad_images, build_dataset
from ssl_pipeline.data.bad_images import BadImage, check_file
from ssl_pipeline.data.base import TransformedDataset
from ssl_pipeline.data.device_views import ToUint8Tensor
from ssl_pipeline.data.image_folder import ImageFiles, to_rgb
from ssl_pipeline.data.transforms import eval_transform
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.methods.simclr import SimCLR

QUICKSTART = str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def scan_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(bad_images, "SCAN_CACHE", tmp_path / "scan_cache")


def png_bytes(seed: int, size: int = 16, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def tiff_with_channels(channels: int, size: int = 4) -> bytes:
    """A baseline little-endian TIFF of uint8 pixels with `channels` samples per pixel (Pillow
    cannot write five), e.g. a multispectral tile dropped among photos."""
    data = bytes(size * size * channels)
    entries = [(256, 3, 1, size), (257, 3, 1, size), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 2), (273, 4, 1, 0), (277, 3, 1, channels), (278, 3, 1, size),
               (279, 4, 1, len(data)), (284, 3, 1, 1)]
    header_size = 8 + 2 + 12 * len(entries) + 4
    entries = [(tag, kind, count, header_size if tag == 273 else value)
               for tag, kind, count, value in entries]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def write_folder(root: Path, per_class: int = 12) -> list[Path]:
    paths = []
    for c, name in enumerate(["ants", "bees"]):
        for i in range(per_class):
            path = root / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(100 * c + i))
            paths.append(path)
    return paths


def folder_cfg(root: Path, **overrides):
    from ssl_pipeline.recipe import DataConfig

    return DataConfig(name="image_folder", root=str(root), **overrides)


BAD_FILES = {
    "zero.png": b"",
    "text.jpg": b"this is not an image",
    "truncated.png": png_bytes(7)[:200],
    "truncated.jpg": png_bytes(8, size=64, fmt="JPEG")[:400],
    "five_bands.tif": tiff_with_channels(5),
}


# ---------------------------------------------------------------- readable but unusual files


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "1"])
def test_unusual_modes_become_8_bit_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    if mode == "P":
        image.info["transparency"] = 0  # palette transparency: through RGBA, without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
        out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (6, 6)
    if mode in ("RGBA", "LA"):  # the alpha channel is dropped, the colors kept
        assert np.array_equal(np.asarray(out), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_is_scaled_never_clipped(fmt):
    levels = np.array([[0, 257, 32896, 65535]], np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, fmt)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        out = np.asarray(to_rgb(image))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255] and (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("array, message", [
    (np.array([[0.0, 0.5]], np.float32), "floating-point"),
    (np.array([[0, 70000]], np.int32), "16-bit range"),
])
def test_pixels_without_a_fixed_range_are_refused_not_clipped(array, message):
    with pytest.raises(ValueError, match=message):
        to_rgb(Image.fromarray(array))


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_check_file_finds_each_kind_of_unreadable_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    assert check_file(path) is not None
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(0))
    assert check_file(good) is None


# ---------------------------------------------------------------- on_bad_image=error


def test_an_empty_file_stops_the_build_naming_it(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "ants" / "zero.png").write_bytes(b"")
    with pytest.raises(BadImage, match=r"ants/zero\.png.*on_bad_image=skip"):
        build_dataset(folder_cfg(tmp_path))


@pytest.mark.parametrize("name", sorted(set(BAD_FILES) - {"zero.png"}))
@pytest.mark.parametrize("decode", ["pil", "torchvision"])
@pytest.mark.parametrize("consumer", ["pil_transform", "uint8_tensor"])
def test_reading_an_unreadable_file_names_it(tmp_path, name, decode, consumer):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    transform = eval_transform(16, [0.5] * 3, [0.25] * 3) if consumer == "pil_transform" \
        else ToUint8Tensor(16)
    dataset = TransformedDataset(ImageFiles([path], np.array([0]), decode), transform)
    with pytest.raises(BadImage, match=rf"{path}: cannot read this image"):
        dataset[0]


def test_a_dataloader_worker_raises_the_same_error(tmp_path):
    path = tmp_path / "truncated.jpg"
    path.write_bytes(BAD_FILES["truncated.jpg"])
    dataset = TransformedDataset(ImageFiles([path], np.array([0]), "torchvision"), ToUint8Tensor(16))
    batches = iter(torch.utils.data.DataLoader(dataset, num_workers=1))
    with pytest.raises(BadImage, match=rf"{path}: cannot read"):
        next(batches)
    batches._shutdown_workers()


@pytest.mark.slow
def test_a_file_that_breaks_during_training_stops_it_with_status_2_keeping_checkpoints(
        tmp_path, tiny_overrides, monkeypatch, capsys):
    """Every image becomes unreadable after step 1: the run stops with status 2 naming a
    file, the step checkpoints stay, and once the files are back --resume finishes it."""
    paths = write_folder(tmp_path / "images", per_class=30)
    originals = {path: path.read_bytes() for path in paths}
    real = SimCLR.training_loss

    def break_files_after_step_1(self, batch):
        if self.trainer.global_step == 1:
            for path in paths:
                path.write_bytes(b"broken")
        return real(self, batch)

    monkeypatch.setattr(SimCLR, "training_loss", break_files_after_step_1)
    out = tmp_path / "run"
    overrides = [*tiny_overrides, "data.name=image_folder", f"data.root={tmp_path / 'images'}",
                 "pretrain.checkpoint_every_n_steps=1", "pretrain.epochs=3"]
    status = main(["run", QUICKSTART, "--quiet", "--out", str(out),
                   *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "cannot read this image" in err and str(tmp_path / "images") in err
    assert "then continue with ssl-pipeline run --resume RUN_DIR" in err  # how to go on
    assert "Traceback" not in err  # the worker's traceback is not the message
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] >= 1

    monkeypatch.setattr(SimCLR, "training_loss", real)
    for path, data in originals.items():
        path.write_bytes(data)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pretrain"]["resumed_from_step"] >= 1 and "knn" in results


# ---------------------------------------------------------------- on_bad_image=skip


def test_skip_leaves_unreadable_files_out_of_every_split_and_lists_them(tmp_path, monkeypatch):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "test", per_class=4)
    bad = {tmp_path / "train" / "ants" / name: data for name, data in BAD_FILES.items()}
    bad[tmp_path / "test" / "bees" / "x.jpg"] = b"nope"
    for path, data in bad.items():
        path.write_bytes(data)
    bundle = build_dataset(folder_cfg(tmp_path, on_bad_image="skip", val_fraction=0.25))
    used = [str(p) for split in (bundle.train, bundle.val, bundle.test)
            for p in np.asarray(split.source.paths, dtype=object)[split.indices]]
    assert len(used) == 24 + 8 and not set(used) & {str(p) for p in bad}
    record = bundle.skipped_images
    assert record["count"] == len(bad)
    assert {item["path"] for item in record["files"]} == {str(p) for p in bad}
    assert all(item["reason"] for item in record["files"])
    for image, _ in bundle.train:  # what is left reads
        assert image.mode == "RGB"

    def no_decoding(path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(bad_images, "check_file", no_decoding)  # the verdicts are cached
    assert build_dataset(folder_cfg(tmp_path, on_bad_image="skip")).skipped_images == record


def test_skip_with_nothing_readable_is_an_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "1.png").write_bytes(b"x")
    with pytest.raises(SSLPipelineError, match="none of the 2 images"):
        build_dataset(folder_cfg(tmp_path, on_bad_image="skip"))


def test_skip_is_refused_for_webdataset_shards(tmp_path):
    from ssl_pipeline.recipe import DataConfig

    with pytest.raises(SSLPipelineError, match="on_bad_image=skip works on image folders"):
        build_dataset(DataConfig(name="webdataset", root=str(tmp_path), on_bad_image="skip"))


@pytest.mark.slow
def test_a_run_with_skip_finishes_and_its_report_lists_the_files(tmp_path, tiny_overrides):
    write_folder(tmp_path / "images", per_class=30)
    broken = tmp_path / "images" / "bees" / "broken.jpg"
    broken.write_bytes(BAD_FILES["truncated.jpg"])
    (tmp_path / "images" / "ants" / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    overrides = [*tiny_overrides, "data.name=image_folder", f"data.root={tmp_path / 'images'}",
                 "data.on_bad_image=skip", "pretrain.epochs=1"]
    assert main(["run", QUICKSTART, "--quiet", "--out", str(out),
                 *[a for o in overrides for a in ("--set", o)]]) == 0
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())["resolved"]["data"]
    assert recorded["skipped_images"]["count"] == 2
    assert sum(recorded["sizes"].values()) == 60
    report = (out / "report.md").read_text()
    assert "2 unreadable image file(s) skipped" in report
    assert str(broken) in report and "empty file (0 bytes)" in report


def test_the_cli_prints_a_worker_error_without_the_worker_traceback(tmp_path, capsys, monkeypatch):
    path = tmp_path / "truncated.jpg"
    path.write_bytes(BAD_FILES["truncated.jpg"])
    dataset = TransformedDataset(ImageFiles([path], np.array([0]), "pil"), ToUint8Tensor(16))
    batches = iter(torch.utils.data.DataLoader(dataset, num_workers=1))
    try:
        next(batches)
    except BadImage as error:
        raised = error
    finally:
        batches._shutdown_workers()
    assert "Original Traceback" in str(raised)

    def fail(args):
        raise raised

    from ssl_pipeline import cli

    monkeypatch.setitem(cli.COMMANDS, "list", fail)
    assert main(["list", "datasets"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: cannot read this image") and "Traceback" not in err


def test_the_scan_in_worker_processes_finds_the_same_files(tmp_path):
    write_folder(tmp_path / "many", per_class=150)  # above the size scanned in-process
    (tmp_path / "many" / "ants" / "bad.png").write_bytes(b"garbage")
    (tmp_path / "many" / "bees" / "cut.png").write_bytes(png_bytes(3)[:100])
    bundle = build_dataset(folder_cfg(tmp_path / "many", on_bad_image="skip", num_workers=2))
    assert bundle.skipped_images["count"] == 2
    assert sum(len(s) for s in (bundle.train, bundle.val, bundle.test)) == 300
