"""What every dataset builder returns, and the split helpers they share."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ssl_pipeline.data.bad_images import bad_image, source_of
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.registry import Registry

# name -> builder(cfg: DataConfig) -> DataBundle
datasets: Registry = Registry("dataset")

UNLABELED = -1


@dataclass
class DataBundle:
    """The splits of one dataset and the facts the rest of the pipeline needs about them.

    Each split is a torch Dataset whose items are `(PIL.Image, int label)` (multispectral
    data: a float32 tensor `(C, H, W)` of reflectance); the label is `UNLABELED` (-1) for
    unlabeled data. Transforms are applied later (`TransformedDataset`).
    """

    name: str
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None
    num_classes: int | None  # None when unlabeled
    class_names: list[str] | None
    channels: int  # channels of the images the splits yield (after any conversion)
    image_size: int  # side length the pipeline resizes to by default
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where the data was read from, for the run record
    split_hashes: dict[str, str] = field(default_factory=dict)
    # data.on_bad_image=skip: {"count": n, "files": [{"path", "reason"}, ...]} of the left-out files
    skipped_images: dict | None = None
    # multispectral data: the band names, in the order the channels hold them
    bands: list[str] | None = None
    # multi-label data: each label is a 0/1 vector over the `num_classes` labels (an array
    # `(num_classes,)` per item; `Split.labels` is `(N, num_classes)`)
    multi_label: bool = False
    # image_size is the images' own (image_folder, csv, webdataset), not one the dataset
    # fixes: a backbone that starts from pretrained weights is given 224 px instead
    image_size_from_files: bool = False

    @property
    def labeled(self) -> bool:
        return self.num_classes is not None


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory uint8 images `(N, H, W)` or `(N, H, W, C)` with integer labels, as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, channels: int | None = None):
        if images.dtype != np.uint8:
            raise TypeError(f"ArrayDataset wants uint8 images, got {images.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        native = 1 if images.ndim == 3 else images.shape[3]
        self.channels = channels or native
        self._native = native

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(self.images[i], mode="L" if self._native == 1 else "RGB")
        return convert_channels(image, self.channels), item_label(self.labels, i)


def item_label(labels: np.ndarray, i: int):
    """Item i's label: an int, or for multi-label `labels (N, L)` a uint8 vector `(L,)`."""
    return int(labels[i]) if labels.ndim == 1 else labels[i].astype(np.uint8)


def convert_channels(image: Image.Image, channels: int) -> Image.Image:
    """8-bit PIL image to 1 (L) or 3 (RGB) channels; gray to RGB repeats the plane."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise SSLPipelineError(
            f"data.channels={channels} is not supported for 8-bit images; use 1 or 3"
        )
    return image if image.mode == mode else image.convert(mode)


class KeptRNG:
    """The `random`, numpy and torch (CPU) generator states are put back after the block, in
    the main process. In a DataLoader worker nothing else draws from them: nothing is saved
    (the numpy state alone costs ~50 us to save and restore)."""

    def __enter__(self) -> None:
        in_worker = torch.utils.data.get_worker_info() is not None
        self._states = None if in_worker else (
            random.getstate(), np.random.get_state(), torch.random.get_rng_state())

    def __exit__(self, *exc: object) -> None:
        if self._states is None:
            return
        python, numpy, torch_state = self._states
        random.setstate(python)
        np.random.set_state(numpy)
        torch.random.set_rng_state(torch_state)


def seed_all(seed: int) -> None:
    """`random`, numpy and torch (CPU) all draw from `seed` from here on."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The CPU generator only: torch.manual_seed also seeds every GPU's, 50x slower per image.
    torch.default_generator.manual_seed(seed)


class SeededRNG(KeptRNG):
    """Within the block, `random`, numpy and torch (CPU) draw from `seed`; after it, each
    continues where it was (in the main process), so the process's own streams are untouched."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        super().__enter__()
        seed_all(self.seed)


class TransformedDataset(torch.utils.data.Dataset):
    """Applies `transform` to the image of each `(image, label)` item of `base`.

    Indexed with an `(index, seed)` pair (from `ResumableSampler`), the transform's random
    draws come from `seed`: the same views whichever worker makes them, after any resume.
    """

    def __init__(self, base: torch.utils.data.Dataset, transform):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        return self._item(key, restore=True)

    def __getitems__(self, keys: list) -> list:
        """A batch's items (the DataLoader asks for them together): the same as one by one,
        with the generators' states saved and put back once per batch, not once per image,
        when every item carries its seed (unseeded items draw from the process's streams)."""
        if not all(isinstance(key, tuple) for key in keys):
            return [self._item(key, restore=True) for key in keys]
        with KeptRNG():
            return [self._item(key, restore=False) for key in keys]

    def _item(self, key, restore: bool):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.base[index]
        try:
            if seed is None:
                return self.transform(image), label
            if not restore:  # the caller keeps the process's streams (`__getitems__`)
                seed_all(seed)
                return self.transform(image), label
            with SeededRNG(seed):
                return self.transform(image), label
        except (OSError, SyntaxError, EOFError) as error:
            # Pillow decodes a lazily opened file on first pixel access, inside the transform
            source = source_of(image)
            if source is None:
                raise
            raise bad_image(source, error) from error


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(keep, held_out)` with `fraction` of each class held out, seeded.

    >>> keep, held = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), 0.5, seed=0)
    >>> sorted(np.bincount(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])[held]).tolist())
    [2, 3]
    """
    labels = np.asarray(labels)
    indices = np.arange(len(labels))
    if not 0.0 < fraction < 1.0:
        raise SSLPipelineError(f"a split fraction must be between 0 and 1, got {fraction}")
    labeled = labels >= 0
    # multi-label (N, L): label sets are too many to stratify by; a plain seeded split
    stratify = labels if labels.ndim == 1 and labeled.all() and len(np.unique(labels)) > 1 else None
    # imported here, not with the module: sklearn takes ~1.4 s to import
    from sklearn.model_selection import train_test_split

    keep, held = train_test_split(
        indices, test_size=fraction, random_state=seed, stratify=stratify
    )
    return np.sort(keep), np.sort(held)


def split_hash(indices: np.ndarray) -> str:
    """A short, stable fingerprint of a split's sample indices (recorded with each run).

    >>> split_hash(np.array([0, 1, 2]))
    'ab25350e3e65efeb'
    """
    data = np.ascontiguousarray(np.asarray(indices, dtype=np.int64)).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class Split(torch.utils.data.Dataset):
    """The samples `indices` of `source` (all when None), optionally converted to `channels`.

    Builders return their splits as `Split`s so that the pipeline knows, without loading an
    image, which source samples each split holds (for the split hash and for subsampling) and
    their labels (for stratified subsets).

    >>> source = ArrayDataset(np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 0, 1]))
    >>> part = Split(source, [1, 3], channels=3)
    >>> len(part), part.labels.tolist(), part[0][0].mode
    (2, [1, 1], 'RGB')
    """

    def __init__(
        self, source: torch.utils.data.Dataset, indices=None, channels: int | None = None
    ):
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.source[int(self.indices[i])]
        if self.channels is not None:
            image = convert_channels(image, self.channels)
        return image, label

    @property
    def labels(self) -> np.ndarray:
        source_labels = getattr(self.source, "labels", None)
        if source_labels is None:  # a plain (image, label) dataset: read the labels item by item
            return np.array([self.source[int(i)][1] for i in self.indices], dtype=np.int64)
        return np.asarray(source_labels)[self.indices]

    def subset(self, positions: np.ndarray) -> "Split":
        """The samples at `positions` of this split, still indexed into the same source."""
        return Split(self.source, self.indices[positions], self.channels)

    def stratified(self, size: int | None, seed: int) -> Split:
        """This split, or a seeded draw of `size` of its samples keeping the class proportions
        (`stratified_subsample`) when it has more."""
        if size is None or size >= len(self):
            return self
        return self.subset(stratified_subsample(self.labels, size, seed))


def carve_splits(
    labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float | None = None
) -> dict[str, np.ndarray]:
    """Indices of "train", "val" and (when `test_fraction` is given) "test" carved from one source.

    Stratified by class and seeded. The test set is carved first, so it does not change with
    `val_fraction`; val is then a fraction of the rest. A fraction of 0 leaves that split out.

    >>> parts = carve_splits(np.repeat([0, 1], 10), seed=0, val_fraction=0.2, test_fraction=0.5)
    >>> {name: len(indices) for name, indices in parts.items()}
    {'train': 8, 'test': 10, 'val': 2}
    """
    parts = {"train": np.arange(len(labels))}
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if not fraction:
            continue
        rest = parts["train"]
        try:
            keep, held = stratified_split(np.asarray(labels)[rest], fraction, seed)
        except ValueError as error:  # scikit-learn: a class too small to split, or too few samples
            raise SSLPipelineError(
                f"cannot carve a {name} split of {fraction:g} from {len(rest)} samples, "
                f"stratified by class: {error}. Add samples to the small classes or change "
                f"data.{name}_fraction"
            ) from error
        parts["train"], parts[name] = rest[keep], rest[held]
    return parts


def stratified_subsample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of `size` samples keeping the class proportions (seeded).

    >>> labels = np.repeat([0, 1], [30, 10])
    >>> np.bincount(labels[stratified_subsample(labels, 20, seed=0)]).tolist()
    [15, 5]
    """
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    stratify = labels if labels.ndim == 1 and (labels >= 0).all() else None
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(
            np.arange(len(labels)), train_size=size, random_state=seed, stratify=stratify
        )
        return np.sort(keep)
    except ValueError:
        # fewer samples than classes (or singleton classes): a stratified draw is impossible,
        # a plain seeded draw is the closest thing
        return np.sort(np.random.default_rng(seed).choice(len(labels), size, replace=False))


def pixel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1] units, of uint8 images `(N, H, W[, C])`.

    Counts the 256 gray levels instead of converting to floats: exact, and no float copy of
    a 50,000-image array.

    >>> pixel_stats(np.array([[[0, 255]]], np.uint8))
    ((0.5,), (0.5,))
    """
    planes = [images] if images.ndim == 3 else [images[..., c] for c in range(images.shape[3])]
    levels = np.arange(256) / 255.0
    means, stds = [], []
    for plane in planes:
        counts = np.bincount(plane.ravel(), minlength=256) / plane.size
        mean = float(counts @ levels)
        means.append(round(mean, 4))
        stds.append(round(float(np.sqrt(counts @ (levels - mean) ** 2)), 4))
    return tuple(means), tuple(stds)


def splits_of(source: torch.utils.data.Dataset, parts: dict[str, np.ndarray]) -> dict:
    """`{"train", "val", "test"}` -> a `Split` of `source` for each carved part, else None."""
    return {name: Split(source, parts[name]) if name in parts else None for name in SPLITS}


SPLITS = ("train", "val", "test")
