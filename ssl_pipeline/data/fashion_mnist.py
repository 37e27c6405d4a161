"""Fashion-MNIST: 70,000 28x28 grayscale photos of clothing, 10 classes, read from IDX files.

The files come from the Debian package `dataset-fashion-mnist`, from a folder holding the four
IDX files, or from torchvision's download layout (`<root>/FashionMNIST/raw/`).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ssl_pipeline.data.base import ArrayDataset, DataBundle, Split, carve_splits, datasets
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

# where `apt-get install dataset-fashion-mnist` puts the files; a constant so tests can move it
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# the statistics everyone quotes (full 60,000-image train set), so inputs match the peers'
MEAN, STD = (0.2860,), (0.3530,)

# IDX type codes (third magic byte) -> big-endian numpy dtypes
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped when the name ends in .gz) as a numpy array in native byte order.

    Layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
    dimension, then the values big-endian.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise SSLPipelineError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(np.frombuffer(raw, ">u4", count=ndim, offset=4).tolist())
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    values = np.frombuffer(raw, dtype, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise SSLPipelineError(f"{path} holds {values.size} values, its header says {shape}")
    return values.reshape(shape).astype(dtype.newbyteorder("="))


def find_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` (plain or .gz), or None when any is missing."""
    found = {}
    for key, name in FILES.items():
        candidates = [folder / name, folder / f"{name}.gz"]
        found[key] = next((c for c in candidates if c.is_file()), None)
    return None if None in found.values() else found


def candidate_dirs(root: str | None) -> list[Path]:
    """Where to look: data.root and its torchvision layout when given (an explicit root that
    lacks the files is an error, not a silent switch to other data), else the Debian package."""
    if root:
        return [Path(root), Path(root) / "FashionMNIST" / "raw"]
    return [DEBIAN_DIR]


@datasets.register("fashion_mnist", DATASET_DESCRIPTIONS["fashion_mnist"])
def build_fashion_mnist(cfg) -> DataBundle:
    tried = candidate_dirs(cfg.root)
    folder, files = next(((d, f) for d in tried if (f := find_files(d))), (None, None))
    if files is None:
        raise SSLPipelineError(
            "Fashion-MNIST not found; looked for the four IDX files "
            f"({', '.join(FILES.values())}, optionally .gz) in: {', '.join(map(str, tried))}. "
            "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; then leave "
            f"data.root unset to read {DEBIAN_DIR}), or set data.root to a folder holding the "
            "four files or torchvision's layout (<root>/FashionMNIST/raw/)"
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    for key in ("train_images", "test_images"):
        if arrays[key].dtype != np.uint8 or arrays[key].ndim != 3:
            raise SSLPipelineError(
                f"{files[key]} holds {arrays[key].dtype} {arrays[key].shape}; "
                "Fashion-MNIST images are uint8 (N, 28, 28)"
            )
    train = ArrayDataset(arrays["train_images"], arrays["train_labels"])
    test = ArrayDataset(arrays["test_images"], arrays["test_labels"])
    # no official val split: carve it from train (stratified, seeded); test stays the official one
    parts = carve_splits(train.labels, cfg.split_seed, cfg.val_fraction)
    return DataBundle(
        name="fashion_mnist",
        train=Split(train, parts["train"]),
        val=Split(train, parts["val"]) if "val" in parts else None,
        test=Split(test),
        num_classes=10,
        class_names=list(CLASS_NAMES),
        channels=1,
        image_size=28,
        mean=MEAN,
        std=STD,
        source=str(folder),
    )
