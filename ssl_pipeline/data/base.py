"""What every dataset builder returns, and the split helpers they share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.registry import Registry

# name -> builder(cfg: DataConfig) -> DataBundle
datasets: Registry = Registry("dataset")

UNLABELED = -1


@dataclass
class DataBundle:
    """The splits of one dataset and the facts the rest of the pipeline needs about them.

    Each split is a torch Dataset whose items are `(PIL.Image, int label)`; the label is
    `UNLABELED` (-1) for unlabeled data. Transforms are applied later (`TransformedDataset`).
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
        return convert_channels(image, self.channels), int(self.labels[i])


def convert_channels(image: Image.Image, channels: int) -> Image.Image:
    """8-bit PIL image to 1 (L) or 3 (RGB) channels; gray to RGB repeats the plane."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise SSLPipelineError(
            f"data.channels={channels} is not supported for 8-bit images; use 1 or 3"
        )
    return image if image.mode == mode else image.convert(mode)


class TransformedDataset(torch.utils.data.Dataset):
    """Applies `transform` to the image of each `(image, label)` item of `base`."""

    def __init__(self, base: torch.utils.data.Dataset, transform):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


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
    stratify = labels if labeled.all() and len(np.unique(labels)) > 1 else None
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
