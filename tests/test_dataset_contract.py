"""Every registered dataset honours the DataBundle contract, built from the recipe's own
DataConfig. A new dataset is picked up by itself and fails here until it has a fixture."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_pipeline.data import UNLABELED, build_dataset, datasets
from ssl_pipeline.recipe import DataConfig
from mini_imagenet import make_mini_imagenet
from test_csv_images import write_images as write_scans
from test_data import write_cifar, write_fashion, write_image_folder
from test_eurosat import write_eurosat_rgb
from test_medmnist import write_medmnist
from test_webdataset import write_images, write_shards


def fixture_root(name: str, tmp_path: Path) -> str | None:
    """Where the test data for dataset `name` lives (written into tmp_path when needed)."""
    if name in ("digits", "fake"):
        return None
    if name == "fashion_mnist":
        write_fashion(tmp_path, gz=True)
    elif name in ("cifar10", "cifar100"):
        write_cifar(tmp_path, name)
    elif name == "image_folder":
        write_image_folder(tmp_path, {"cat": 12, "dog": 12, "owl": 12})
    elif name == "webdataset":
        paths = write_images(tmp_path / "images", {"cat": 12, "dog": 12, "owl": 12})
        write_shards(paths, tmp_path / "shards", per_shard=12, classes=["cat", "dog", "owl"])
        return str(tmp_path / "shards")
    elif name == "imagenet":
        return str(make_mini_imagenet(tmp_path, "devkit"))
    elif name == "medmnist":
        write_medmnist(tmp_path, "pathmnist", counts=(36, 18, 18))
    elif name == "eurosat":
        write_eurosat_rgb(tmp_path / "EuroSAT_RGB", per_class=12)
    elif name == "csv":
        names = write_scans(tmp_path / "scans", 24)
        lines = ["path,label"] + [f"{n},{'abc'[i % 3]}" for i, n in enumerate(names)]
        (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
        return str(tmp_path / "labels.csv")
    else:
        pytest.fail(f"dataset {name!r} is registered but has no fixture in {__file__}; add one")
    return str(tmp_path)


@pytest.mark.parametrize("name", datasets.names())
def test_dataset_contract(name, tmp_path):
    # val_fraction 0.5: the fixtures are small, and every class needs a validation example
    bundle = build_dataset(DataConfig(name=name, root=fixture_root(name, tmp_path), val_fraction=0.5))
    assert len(bundle.train) > 0 and bundle.val is not None and len(bundle.val) > 0
    assert len(bundle.mean) == len(bundle.std) == bundle.channels
    assert bundle.image_size >= 4 and bundle.source
    assert set(bundle.split_hashes) >= {"train", "val"}
    for split in (bundle.train, bundle.val, bundle.test):
        if split is None:
            continue
        image, label = split[0]
        assert isinstance(image, Image.Image) and isinstance(label, int)
        assert len(image.getbands()) == bundle.channels
        if bundle.labeled:
            assert 0 <= label < bundle.num_classes
        else:
            assert label == UNLABELED
    if bundle.labeled:
        assert bundle.class_names is None or len(bundle.class_names) == bundle.num_classes
        labels = np.array([bundle.train[i][1] for i in range(min(len(bundle.train), 200))])
        assert labels.min() >= 0
