"""Dataset builders, splits, build_dataset's options, and the view / eval transforms."""

from __future__ import annotations

import gzip
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.transforms.simclr_transform import SimCLRViewTransform
from PIL import Image

from ssl_pipeline.data import UNLABELED, build_dataset, datasets
from ssl_pipeline.data import cifar, fashion_mnist
from ssl_pipeline.data.base import split_hash
from ssl_pipeline.data.transforms import (
    ViewSettings,
    eval_transform,
    fit_views,
    ssl_views_transform,
    supervised_train_transform,
    view_transform,
)
from ssl_pipeline.errors import SSLPipelineError


def data_cfg(**overrides):
    """A stand-in for the recipe's data section, with its defaults."""
    fake = types.SimpleNamespace(
        train_samples=64, val_samples=32, test_samples=32, image_size=12, channels=3
    )
    values = dict(
        name="digits", root=None, split_seed=0, val_fraction=0.1, test_fraction=0.2,
        image_size=None, channels=None, num_classes=None, mean=None, std=None, download=False,
        max_train_samples=None, fake=fake,
    )  # fmt: skip
    values.update(overrides)
    return types.SimpleNamespace(**values)


def replaced(cfg, **changes):
    return types.SimpleNamespace(**{**vars(cfg), **changes})


def indices(split) -> set[int]:
    return set(split.indices.tolist())


def test_every_builder_is_registered():
    assert {"digits", "fashion_mnist", "cifar10", "cifar100", "image_folder", "fake"} <= set(
        datasets.names()
    )


# ---------------------------------------------------------------- digits and the split rules


def test_digits_is_8px_gray_ten_classes_scaled_to_uint8():
    bundle = build_dataset(data_cfg())
    image, label = bundle.train[0]
    assert (image.mode, image.size, bundle.channels, bundle.image_size) == ("L", (8, 8), 1, 8)
    assert bundle.num_classes == 10 and bundle.class_names[3] == "3"
    assert 0 <= label < 10
    assert bundle.train.source.images.max() == 255  # 16 ink levels x16, clipped
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    assert len(bundle.test) == 360  # test_fraction 0.2, rounded up by scikit-learn


def test_digits_splits_are_disjoint_covering_stratified_and_seeded():
    bundle = build_dataset(data_cfg())
    parts = [indices(bundle.train), indices(bundle.val), indices(bundle.test)]
    assert sum(map(len, parts)) == len(set.union(*parts)) == 1797
    everything = np.bincount(bundle.train.source.labels) / 1797
    for split in (bundle.val, bundle.test):
        share = np.bincount(split.labels, minlength=10) / len(split)
        assert np.abs(share - everything).max() < 0.02
    again = build_dataset(data_cfg())
    assert indices(again.test) == parts[2] and indices(again.val) == parts[1]
    other = build_dataset(data_cfg(split_seed=1))
    assert indices(other.test) != parts[2]


def test_test_split_does_not_move_with_val_fraction():
    assert indices(build_dataset(data_cfg(val_fraction=0.1)).test) == indices(
        build_dataset(data_cfg(val_fraction=0.3)).test
    )


def test_split_hashes_are_recorded_and_follow_the_seed():
    bundle = build_dataset(data_cfg())
    assert bundle.split_hashes == {
        name: split_hash(getattr(bundle, name).indices) for name in ("train", "val", "test")
    }
    assert build_dataset(data_cfg(split_seed=1)).split_hashes["test"] != bundle.split_hashes["test"]


def test_max_train_samples_caps_train_only_stratified_and_seeded():
    full = build_dataset(data_cfg())
    capped = build_dataset(data_cfg(max_train_samples=200))
    assert len(capped.train) == 200 and indices(capped.train) <= indices(full.train)
    assert np.bincount(capped.train.labels, minlength=10).min() >= 18  # about 20 per class
    assert indices(capped.val) == indices(full.val) and indices(capped.test) == indices(full.test)
    assert capped.split_hashes["train"] != full.split_hashes["train"]
    assert indices(build_dataset(data_cfg(max_train_samples=200)).train) == indices(capped.train)
    assert len(build_dataset(data_cfg(max_train_samples=5)).train) == 5  # fewer than classes


def test_gray_to_rgb_repeats_the_plane_and_the_statistics():
    gray, rgb = build_dataset(data_cfg()), build_dataset(data_cfg(channels=3))
    image = rgb.train[0][0]
    assert image.mode == "RGB" and rgb.channels == 3
    assert np.array_equal(np.asarray(image)[..., 1], np.asarray(gray.train[0][0]))
    assert rgb.mean == gray.mean * 3 and rgb.std == gray.std * 3


def test_rgb_to_gray_converts_images_and_weighs_the_mean_like_pillow(tmp_path):
    write_image_folder(tmp_path, {"a": 10, "b": 10})
    rgb = build_dataset(data_cfg(name="image_folder", root=str(tmp_path)))
    gray = build_dataset(data_cfg(name="image_folder", root=str(tmp_path), channels=1))
    assert gray.train[0][0].mode == "L" and gray.channels == 1
    assert np.array_equal(np.asarray(gray.train[0][0]), np.asarray(rgb.train[0][0].convert("L")))
    assert gray.mean == (round(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406, 4),)
    assert gray.split_hashes == rgb.split_hashes


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(channels=2), "data.channels=2"),
        (dict(num_classes=5), "data.num_classes=5"),
        (dict(mean=[0.5, 0.5, 0.5]), "data.mean has 3 values"),
        (dict(std=[0.0]), "data.std must be positive"),
    ],
)
def test_bad_options_raise_our_error(overrides, message):
    with pytest.raises(SSLPipelineError, match=message):
        build_dataset(data_cfg(**overrides))


def test_mean_std_override_wins():
    bundle = build_dataset(data_cfg(mean=[0.1], std=[0.2], image_size=16, num_classes=10))
    assert (bundle.mean, bundle.std, bundle.image_size) == ((0.1,), (0.2,), 16)


def test_splits_survive_pickling_for_dataloader_workers():
    bundle = build_dataset(data_cfg(channels=3))
    copy = pickle.loads(pickle.dumps(bundle.train))
    assert np.array_equal(np.asarray(copy[5][0]), np.asarray(bundle.train[5][0]))


# ---------------------------------------------------------------- fake


def test_fake_is_deterministic_for_a_seed_and_follows_the_options():
    cfg = data_cfg(name="fake", image_size=10, channels=1, num_classes=3)
    first, second = build_dataset(cfg), build_dataset(cfg)
    assert np.array_equal(first.train.source.images, second.train.source.images)
    other = build_dataset(replaced(cfg, split_seed=1))
    assert not np.array_equal(first.train.source.images, other.train.source.images)
    assert len(set(first.split_hashes.values())) == 3
    image, _ = first.train[0]
    assert (image.mode, image.size, first.num_classes) == ("L", (10, 10), 3)
    assert (len(first.train), len(first.val), len(first.test)) == (64, 32, 32)


def test_fake_refuses_channels_images_cannot_have():
    cfg = data_cfg(name="fake")
    cfg.fake.channels = 4
    with pytest.raises(SSLPipelineError, match="data.fake.channels=4"):
        build_dataset(cfg)


def test_fake_classes_are_learnable_by_nearest_class_mean():
    bundle = build_dataset(data_cfg(name="fake"))
    images = bundle.train.source.images.reshape(len(bundle.train.source), -1).astype(float)
    train_x, test_x = images[bundle.train.indices], images[bundle.test.indices]
    means = np.stack([train_x[bundle.train.labels == c].mean(0) for c in range(4)])
    distances = ((test_x[:, None] - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == bundle.test.labels).mean() > 0.9


# ---------------------------------------------------------------- fashion_mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_fashion(folder: Path, gz: bool, train: int = 40, test: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28))
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(count) % 10)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_plain_and_gzipped(tmp_path, suffix):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / f"x-idx3-ubyte{suffix}", array)
    assert np.array_equal(fashion_mnist.read_idx(tmp_path / f"x-idx3-ubyte{suffix}"), array)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x89PNG....")
    with pytest.raises(SSLPipelineError, match="not an IDX file"):
        fashion_mnist.read_idx(tmp_path / "junk")


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_root_flat_or_torchvision_layout(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    write_fashion(folder, gz=layout == "flat")
    bundle = build_dataset(data_cfg(name="fashion_mnist", root=str(tmp_path), val_fraction=0.25))
    assert bundle.source == str(folder)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 20)
    assert bundle.class_names[0] == "T-shirt/top" and bundle.class_names[9] == "Ankle boot"
    assert bundle.train[0][0].size == (28, 28)


def test_missing_fashion_mnist_names_the_paths_and_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(SSLPipelineError) as error:
        build_dataset(data_cfg(name="fashion_mnist", root=str(tmp_path / "mine")))
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "nowhere") in message and str(tmp_path / "mine") in message
    assert "FashionMNIST/raw" in message and "data.root" in message


def test_fashion_mnist_from_the_debian_package(fashion_mnist_root):
    bundle = build_dataset(data_cfg(name="fashion_mnist"))
    assert bundle.source == str(fashion_mnist_root)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (54000, 6000, 10000)
    image, label = bundle.test[0]
    assert (image.mode, image.size, bundle.class_names[label]) == ("L", (28, 28), "Ankle boot")
    assert np.bincount(bundle.val.labels).tolist() == [600] * 10


# ---------------------------------------------------------------- cifar


def write_cifar_pickle(path: Path, entry: dict) -> None:
    # like the original Python 2 files: protocol 2 and numpy arrays pickled by numpy.core
    data = pickle.dumps(entry, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(data)


def write_cifar(root: Path, name: str) -> dict[str, np.ndarray]:
    spec = cifar.torchvision_spec(name)
    folder = root / spec.base_folder
    folder.mkdir(parents=True)
    classes, label_key = (10, "labels") if name == "cifar10" else (100, "fine_labels")
    rng = np.random.default_rng(0)
    written = {}
    for file, _ in spec.train_list + spec.test_list:
        count = 20 if name == "cifar10" else 200
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = (np.arange(count) % classes).tolist()
        write_cifar_pickle(folder / file, {"batch_label": file, label_key: labels, "data": data})
        written[file] = data
    names = [f"c{i}" for i in range(classes)]
    write_cifar_pickle(folder / spec.meta["filename"], {spec.meta["key"]: names})
    return written


def test_cifar10_reads_the_python_batches(tmp_path):
    written = write_cifar(tmp_path, "cifar10")
    bundle = build_dataset(data_cfg(name="cifar10", root=str(tmp_path), val_fraction=0.2))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (80, 20, 20)
    assert bundle.num_classes == 10 and bundle.class_names[2] == "c2"
    assert bundle.mean == (0.4914, 0.4822, 0.4465)
    image, label = bundle.test[3]
    expected = written["test_batch"][3].reshape(3, 32, 32).transpose(1, 2, 0)  # planes -> HWC
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected) and label == 3


def test_cifar100_reads_fine_labels(tmp_path):
    write_cifar(tmp_path, "cifar100")
    bundle = build_dataset(data_cfg(name="cifar100", root=str(tmp_path), val_fraction=0.5))
    assert bundle.num_classes == 100 and len(bundle.test) == 200 and len(bundle.val) == 100
    assert sorted(bundle.val.labels.tolist()) == list(range(100))


def test_missing_cifar_says_where_and_how(tmp_path):
    with pytest.raises(SSLPipelineError) as error:
        build_dataset(data_cfg(name="cifar10", root=str(tmp_path)))
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)
    assert "--set data.download=true" in str(error.value)


def test_cifar_download_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append(url)
        write_cifar(Path(root), "cifar10")

    from torchvision.datasets import utils  # cifar imports it when it downloads

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    with pytest.raises(SSLPipelineError):
        build_dataset(data_cfg(name="cifar10", root=str(tmp_path)))
    assert calls == []
    bundle = build_dataset(data_cfg(name="cifar10", root=str(tmp_path), download=True))
    assert calls == [cifar.torchvision_spec("cifar10").url] and len(bundle.test) == 20


def test_cifar_pickles_cannot_run_code(tmp_path):
    write_cifar(tmp_path, "cifar10")

    class Exploit:
        def __reduce__(self):
            return (print, ("this must not run",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(SSLPipelineError, match="refusing to load builtins.print"):
        build_dataset(data_cfg(name="cifar10", root=str(tmp_path)))


# ---------------------------------------------------------------- image_folder


def write_png(path: Path, value: int = 0, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size + 2), (value, value // 2, 255 - value)).save(path)


def write_image_folder(folder: Path, counts: dict[str, int], ext: str = ".png") -> None:
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_png(folder / name / f"{i}{ext}", value=40 * c)


def folder_cfg(root: Path, **overrides):
    return data_cfg(name="image_folder", root=str(root), **overrides)


def test_image_folder_labeled_by_class_folders(tmp_path):
    write_image_folder(tmp_path, {"cat": 10, "dog": 10, "eel": 10}, ext=".JPG")
    (tmp_path / ".hidden").mkdir()
    write_png(tmp_path / ".hidden" / "x.png")  # hidden folders are not classes
    bundle = build_dataset(folder_cfg(tmp_path, val_fraction=0.25, test_fraction=0.2))
    assert bundle.class_names == ["cat", "dog", "eel"] and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (18, 6, 6)
    assert np.bincount(bundle.test.labels).tolist() == [2, 2, 2]
    image, label = bundle.test[0]
    assert image.mode == "RGB" and image.size == (12, 14) and bundle.image_size == 12  # its own
    assert bundle.mean == (0.485, 0.456, 0.406)
    assert abs(int(np.asarray(image)[0, 0, 0]) - 40 * label) <= 3  # label = folder (JPEG: ~)


@pytest.mark.parametrize("sizes, expected", [
    ({64: 30}, 64),                     # satellite chips: trained at their own 64 px
    ({32: 20, 48: 11}, 32),             # the median shorter side of the training files
    ({300: 30}, 224),                   # photos: ImageNet's 224, never above
])
def test_image_folder_trains_at_the_files_own_size_up_to_224(tmp_path, sizes, expected):
    n = 0
    for size, count in sizes.items():
        for _ in range(count):
            write_png(tmp_path / ("a" if n % 2 else "b") / f"{n}.png", size=size)
            n += 1
    assert build_dataset(folder_cfg(tmp_path)).image_size == expected
    assert build_dataset(folder_cfg(tmp_path, image_size=96)).image_size == 96  # the recipe's wins


def test_a_backbone_starting_from_weights_gets_224_not_the_files_smaller_size(tmp_path):
    from ssl_pipeline.data import files_size_for_backbone
    from ssl_pipeline.recipe import BackboneConfig

    for i in range(20):
        write_png(tmp_path / ("a" if i % 2 else "b") / f"{i}.png", size=32)
    folder = build_dataset(folder_cfg(tmp_path))
    scratch, imagenet = BackboneConfig(), BackboneConfig(pretrained=True)
    assert files_size_for_backbone(folder, scratch).image_size == 32
    assert files_size_for_backbone(folder, imagenet).image_size == 224
    assert files_size_for_backbone(folder, BackboneConfig(weights="w.pth")).image_size == 224
    given = build_dataset(folder_cfg(tmp_path, image_size=48))  # the recipe's size is kept
    assert files_size_for_backbone(given, imagenet).image_size == 48
    digits = build_dataset(data_cfg(name="digits"))  # a dataset's own fixed size is kept
    assert files_size_for_backbone(digits, imagenet).image_size == 8
    # what a run uses: the run context's data
    from ssl_pipeline.recipe import load_recipe
    from ssl_pipeline.stages import RunContext

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "quickstart.yaml",
                         ["data.name=image_folder", f"data.root={tmp_path}", "backbone.pretrained=true"])
    assert RunContext(recipe, tmp_path / "run", None).data.image_size == 224


def test_the_size_sample_is_seeded_and_skips_unreadable_files(tmp_path):
    from ssl_pipeline.data.image_folder import ImageFiles, native_image_size

    paths = []
    for i in range(100):
        write_png(tmp_path / f"{i}.png", size=8 + i)  # shorter sides 8 ... 107
        paths.append(tmp_path / f"{i}.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    files = ImageFiles([*paths, tmp_path / "junk.png"], np.zeros(101))
    sampled = native_image_size(files, range(100), seed=0)
    assert sampled == native_image_size(files, range(100), seed=0) and 30 < sampled < 90
    assert native_image_size(files, [100, 0], seed=0) == 8  # the unreadable file has no say
    assert native_image_size(files, [100], seed=0) is None
    assert native_image_size(files, range(100), seed=0, sample=200) == 57  # the median of 8..107
    assert native_image_size(files, [], seed=0) is None


def test_image_folder_uses_split_folders_and_carves_only_what_is_missing(tmp_path):
    write_image_folder(tmp_path / "train", {"a": 10, "b": 10})
    write_image_folder(tmp_path / "val", {"a": 2, "b": 3})
    bundle = build_dataset(folder_cfg(tmp_path, test_fraction=0.5))
    assert len(bundle.val) == 5 and bundle.val.source.paths[0].parent.parent.name == "val"
    assert (len(bundle.train), len(bundle.test)) == (10, 10)  # test carved from train
    write_image_folder(tmp_path / "test", {"b": 4})
    bundle = build_dataset(folder_cfg(tmp_path))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (20, 5, 4)
    assert bundle.test.labels.tolist() == [1] * 4  # "b" is class 1 of train's classes


def test_image_folder_split_with_an_unknown_class_is_an_error(tmp_path):
    write_image_folder(tmp_path / "train", {"a": 4, "b": 4})
    write_image_folder(tmp_path / "test", {"zebra": 2})
    with pytest.raises(SSLPipelineError, match="zebra"):
        build_dataset(folder_cfg(tmp_path))


@pytest.mark.parametrize(
    "files",
    [
        ["1.png", "2.png", "3.png", "4.png", "5.png"],  # flat
        ["2020/a/1.png", "2020/b/2.png", "2021/a/3.png", "2021/4.png", "x/y/5.png"],  # nested
        ["1.png", "2.png", "a/3.png", "b/4.png", "b/5.png"],  # images beside folders
    ],
)
def test_image_folder_without_class_structure_is_unlabeled(tmp_path, files):
    for copy in range(4):
        for name in files:
            write_png(tmp_path / Path(name).with_name(f"{copy}_{Path(name).name}"))
    bundle = build_dataset(folder_cfg(tmp_path, val_fraction=0.25))
    assert bundle.num_classes is None and bundle.class_names is None and not bundle.labeled
    assert (len(bundle.train), len(bundle.val), bundle.test) == (15, 5, None)
    assert set(bundle.train.labels.tolist()) == {UNLABELED}


@pytest.mark.parametrize("layout", ["empty", "no_images", "one_class"])
def test_image_folder_unusable_layouts_are_errors_naming_the_folder(tmp_path, layout):
    if layout == "no_images":
        (tmp_path / "notes.txt").write_text("not an image")
    if layout == "one_class":
        write_image_folder(tmp_path, {"only": 5})
    with pytest.raises(SSLPipelineError, match=str(tmp_path)):
        build_dataset(folder_cfg(tmp_path))


@pytest.mark.parametrize("root", [None, "does/not/exist"])
def test_image_folder_needs_an_existing_root(root):
    with pytest.raises(SSLPipelineError, match="data.root"):
        build_dataset(data_cfg(name="image_folder", root=root))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    for i, level in enumerate([0, 32896, 65535] * 4):
        Image.fromarray(np.full((4, 4), level, np.uint16)).save(tmp_path / f"{i}.png")
    bundle = build_dataset(folder_cfg(tmp_path, val_fraction=0.25))
    levels = {int(np.asarray(image)[0, 0, 0]) for image, _ in bundle.train}
    assert levels == {0, 128, 255}


# ---------------------------------------------------------------- transforms

MEAN1, STD1, MEAN3, STD3 = [0.5], [0.25], [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]


def test_fit_views_follows_the_data():
    gray_small, rgb_cifar, rgb_large = (fit_views(s, c, {}) for s, c in [(8, 1), (32, 3), (224, 3)])
    assert (gray_small.color_jitter_prob, gray_small.grayscale_prob) == (0.8, 0.0)
    assert (rgb_cifar.color_jitter_prob, rgb_cifar.grayscale_prob) == (0.8, 0.2)
    assert [v.crop_min_scale for v in (gray_small, rgb_cifar, rgb_large)] == [0.3, 0.2, 0.08]
    assert [v.blur_prob for v in (gray_small, rgb_cifar, rgb_large)] == [0.0, 0.0, 0.5]
    assert [v.color_jitter_strength for v in (rgb_cifar, rgb_large)] == [0.5, 1.0]
    assert rgb_large.hflip_prob == 0.5 and rgb_large.solarize_prob == 0.0


def test_fit_views_overrides_win_and_none_is_ignored():
    views = fit_views(28, 1, {"blur_prob": 0.3, "hflip_prob": None, "crop_min_scale": 0.5})
    assert (views.blur_prob, views.hflip_prob, views.crop_min_scale) == (0.3, 0.5, 0.5)
    with pytest.raises(SSLPipelineError, match="did you mean 'blur_prob'"):
        fit_views(28, 1, {"blur_porb": 0.3})


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 224])
def test_ssl_views_are_two_different_tensors_of_the_asked_size(channels, size):
    mean, std = (MEAN1, STD1) if channels == 1 else (MEAN3, STD3)
    views = fit_views(size, channels, {"solarize_prob": 0.5, "color_jitter_prob": 0.8})
    transform = ssl_views_transform(views, size, mean, std)
    shape = (20, 30) if channels == 1 else (20, 30, 3)  # not square, not the asked size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, np.uint8))
    torch.manual_seed(0)
    first, second = transform(image)
    assert first.shape == second.shape == (channels, size, size)
    assert not torch.equal(first, second)
    assert supervised_train_transform(views, size, mean, std)(image).shape == (channels, size, size)


def test_views_match_lightlys_simclr_view_transform_draw_for_draw():
    views = fit_views(32, 3, {"blur_prob": 0.5, "vflip_prob": 0.2, "rotation_prob": 0.3})
    ours = view_transform(views, 32, MEAN3, STD3)
    theirs = SimCLRViewTransform(
        input_size=32, cj_prob=0.8, cj_strength=0.5, min_scale=0.2, random_gray_scale=0.2,
        gaussian_blur=0.5, sigmas=(0.1, 2.0), vf_prob=0.2, hf_prob=0.5, rr_prob=0.3,
        normalize={"mean": MEAN3, "std": STD3},
    )  # fmt: skip
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), np.uint8))
    for seed in range(6):
        outputs = []
        for transform in (ours, theirs):
            torch.manual_seed(seed)
            np.random.seed(seed)
            outputs.append(transform(image))
        assert torch.equal(*outputs)


def test_eval_transform_is_deterministic_and_center_crops():
    transform = eval_transform(28, MEAN1, STD1, crop_pct=0.875)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60), np.uint8))
    first, second = transform(image), transform(image)
    assert first.shape == (1, 28, 28) and torch.equal(first, second)
    plain = Image.new("L", (8, 8), 255)
    assert torch.allclose(eval_transform(8, MEAN1, STD1)(plain), torch.full((1, 8, 8), 2.0))


def test_view_settings_are_a_plain_record():
    views = fit_views(16, 3, {})
    assert isinstance(views, ViewSettings) and views.crop_max_scale == 1.0


def test_an_explicit_fashion_mnist_root_never_falls_back_to_other_data(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_fashion(debian, gz=True)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    assert build_dataset(data_cfg(name="fashion_mnist", val_fraction=0.5)).source == str(debian)
    with pytest.raises(SSLPipelineError, match="does/not/exist"):
        build_dataset(data_cfg(name="fashion_mnist", root="does/not/exist"))
