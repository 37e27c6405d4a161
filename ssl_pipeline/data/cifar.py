"""CIFAR-10 and CIFAR-100: 60,000 32x32 color photos, 10 or 100 classes, in torchvision's layout.

The files are read here rather than through `torchvision.datasets.CIFAR10`, which insists on
the md5 of every file (so a partial or regenerated copy fails) and unpickles them without
restriction. File names and the download URL still come from torchvision.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ssl_pipeline.data.base import (
    ArrayDataset,
    DataBundle,
    Split,
    carve_splits,
    datasets,
)
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

DEFAULT_ROOT = "data/cache"  # when data.root is not set; relative to the working directory

# the commonly quoted per-channel statistics of each train set (50,000 images)
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# CIFAR batches are pickled dicts of a uint8 numpy array and lists; these are the only globals
# such a pickle needs (old numpy, numpy 2, and Python 3 protocol-2 bytes)
ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a pickle cannot run code through us."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise SSLPipelineError(f"refusing to load {module}.{name} from a CIFAR file")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict:
    try:
        # latin1: the original batches were pickled by Python 2; their keys become str
        return _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise SSLPipelineError(f"{path} is not a readable CIFAR batch file: {error}") from error


def read_batches(folder: Path, files: list[str]) -> ArrayDataset:
    """Concatenated batches as uint8 NHWC images and integer labels."""
    images, labels = [], []
    for name in files:
        entry = load_pickle(folder / name)
        images.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return ArrayDataset(np.concatenate(images).transpose(0, 2, 3, 1), np.array(labels))


def torchvision_spec(name: str):
    """torchvision's dataset class for `name`: its file names, URL and checksums. Imported
    here, not with the module: listing or checking datasets need not load torchvision."""
    import torchvision.datasets

    return {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]


def locate(name: str, root: Path, download: bool) -> Path:
    """The folder holding the batch files; downloads into `root` first when asked to."""
    spec = torchvision_spec(name)
    needed = [f for f, _ in spec.train_list + spec.test_list] + [spec.meta["filename"]]
    folder = root / spec.base_folder
    if download and not all((folder / f).is_file() for f in needed):
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(
                spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5
            )
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise SSLPipelineError(f"downloading {name} from {spec.url} failed: {error}") from error
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise SSLPipelineError(
            f"{name} not found: {folder} lacks {', '.join(missing)}. Put the extracted "
            f"{spec.filename} there (data.root={root} holds {spec.base_folder}/), or add "
            "`--set data.download=true` to download it (needs internet)"
        )
    return folder


def build_cifar(cfg, name: str, num_classes: int) -> DataBundle:
    spec = torchvision_spec(name)
    folder = locate(name, Path(cfg.root or DEFAULT_ROOT), cfg.download)
    train = read_batches(folder, [f for f, _ in spec.train_list])
    test = read_batches(folder, [f for f, _ in spec.test_list])
    class_names = list(load_pickle(folder / spec.meta["filename"])[spec.meta["key"]])
    if len(class_names) != num_classes:
        raise SSLPipelineError(
            f"{folder} lists {len(class_names)} classes, {name} has {num_classes}"
        )
    # no official val split: carve it from train (stratified, seeded); test stays the official one
    parts = carve_splits(train.labels, cfg.split_seed, cfg.val_fraction)
    mean, std = STATS[name]
    return DataBundle(
        name=name,
        train=Split(train, parts["train"]),
        val=Split(train, parts["val"]) if "val" in parts else None,
        test=Split(test),
        num_classes=num_classes,
        class_names=class_names,
        channels=3,
        image_size=32,
        mean=mean,
        std=std,
        source=str(folder),
    )


@datasets.register("cifar10", DATASET_DESCRIPTIONS["cifar10"])
def build_cifar10(cfg) -> DataBundle:
    return build_cifar(cfg, "cifar10", 10)


@datasets.register("cifar100", DATASET_DESCRIPTIONS["cifar100"])
def build_cifar100(cfg) -> DataBundle:
    return build_cifar(cfg, "cifar100", 100)
