"""Datasets: the registered builders, and `build_dataset`, which applies the recipe's options."""

from __future__ import annotations

import dataclasses

# imported for their side effect: each module registers its builders in `datasets`
from ssl_pipeline.data import (  # noqa: F401  (registers the datasets)
    cifar, csv_images, digits, eurosat, fake, fashion_mnist, image_folder, imagenet, medmnist,
    webdataset,
)
from ssl_pipeline.data.image_folder import DEFAULT_IMAGE_SIZE
from ssl_pipeline.data.base import (
    SPLITS,
    UNLABELED,
    DataBundle,
    Split,
    TransformedDataset,
    datasets,
    split_hash,
)
from ssl_pipeline.errors import SSLPipelineError

__all__ = ["DataBundle", "Split", "TransformedDataset", "UNLABELED", "build_dataset", "datasets"]

# ITU-R 601-2 luma weights: what Pillow's convert("L") computes from R, G, B
LUMA = (0.299, 0.587, 0.114)


def build_dataset(cfg) -> DataBundle:
    """The dataset `cfg.name`, shaped as the recipe asks.

    After the registered builder: checks `num_classes`, caps the train split at
    `max_train_samples` (stratified, seeded by `split_seed`), converts to `channels` (with the
    normalization statistics to match), applies `mean`/`std` overrides and `image_size`, and
    records a hash of each split's sample indices.
    """
    bundle = datasets.get(cfg.name).obj(cfg)
    if cfg.channels not in (None, bundle.channels) and (
            cfg.channels not in (1, 3) or bundle.channels not in (1, 3)):
        raise SSLPipelineError(
            f"data.channels={cfg.channels}, but {cfg.name} has {bundle.channels}-channel images "
            "and only gray and RGB convert into each other; use 1 or 3 for those, or leave "
            "data.channels unset" + (" (choose bands with data.eurosat.bands)"
                                     if bundle.bands else "")
        )
    if cfg.num_classes is not None and cfg.num_classes != bundle.num_classes:
        raise SSLPipelineError(
            f"data.num_classes={cfg.num_classes} but {cfg.name} has {bundle.num_classes} "
            "classes; remove data.num_classes or correct it"
        )
    channels = cfg.channels or bundle.channels
    splits = {name: as_split(getattr(bundle, name)) for name in SPLITS}
    if cfg.max_train_samples:
        splits["train"] = splits["train"].stratified(cfg.max_train_samples, cfg.split_seed)
    if channels != bundle.channels:
        splits = {
            name: None if s is None else Split(s.source, s.indices, channels)
            for name, s in splits.items()
        }
    mean, std = convert_stats(bundle.mean, bundle.std, bundle.channels, channels)
    return dataclasses.replace(
        bundle,
        **splits,
        channels=channels,
        image_size=cfg.image_size or bundle.image_size,
        mean=checked_stats("mean", cfg.mean, channels) or mean,
        std=checked_stats("std", cfg.std, channels) or std,
        split_hashes={n: split_hash(s.indices) for n, s in splits.items() if s is not None},
    )


def files_size_for_backbone(bundle: DataBundle, backbone) -> DataBundle:
    """A backbone starting from pretrained weights (`backbone.pretrained` or `.weights`) gets
    224 px, the size ImageNet weights were trained at, instead of the smaller size of a
    folder's files: its first layers expect that scale (k-NN on EuroSAT with ImageNet ResNet-50
    features: 91.9% at 224 px, 82.9% at 64 px; Corley et al. 2023), and at 64 px or less the
    small stem would replace its first convolution with an untrained one."""
    starts_trained = backbone.pretrained or backbone.weights is not None
    if bundle.image_size_from_files and starts_trained and bundle.image_size < DEFAULT_IMAGE_SIZE:
        return dataclasses.replace(bundle, image_size=DEFAULT_IMAGE_SIZE, image_size_from_files=False)
    return bundle


def as_split(dataset) -> Split | None:
    """A builder's split as a `Split` (a plain dataset becomes all of itself)."""
    return dataset if dataset is None or isinstance(dataset, Split) else Split(dataset)


def convert_stats(mean, std, native: int, channels: int) -> tuple[tuple, tuple]:
    """Normalization statistics after converting `native` channels to `channels`.

    Gray to RGB repeats the plane, so the statistics repeat. RGB to gray is the luma-weighted
    sum: exact for the mean; for the std an upper bound, tight when the channels are as
    correlated as in photos.

    >>> convert_stats((0.5,), (0.2,), 1, 3)
    ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    >>> convert_stats((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), 3, 1)
    ((0.5,), (0.2,))
    """
    if native == channels:
        return tuple(mean), tuple(std)
    if native == 1:
        return tuple(mean) * channels, tuple(std) * channels
    return tuple((round(sum(w * v for w, v in zip(LUMA, stat)), 4),) for stat in (mean, std))


def checked_stats(name: str, values, channels: int) -> tuple[float, ...] | None:
    """A recipe's mean or std override, checked against the channel count (None: no override)."""
    if values is None:
        return None
    if len(values) != channels:
        raise SSLPipelineError(
            f"data.{name} has {len(values)} values but the images have {channels} channels; "
            f"give {channels} values"
        )
    if name == "std" and min(values) <= 0:
        raise SSLPipelineError(f"data.std must be positive, got {list(values)}")
    return tuple(float(v) for v in values)
