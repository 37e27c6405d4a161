"""scikit-learn's built-in 8x8 handwritten digits: 1,797 images, 10 classes, nothing to download.

The zero-setup default dataset: it ships inside scikit-learn, so a fresh install can run a
whole recipe offline in seconds.
"""

from __future__ import annotations

import numpy as np

from ssl_pipeline.data.base import (
    ArrayDataset,
    DataBundle,
    carve_splits,
    datasets,
    pixel_stats,
    splits_of,
)
from ssl_pipeline.names import DATASET_DESCRIPTIONS


@datasets.register("digits", DATASET_DESCRIPTIONS["digits"])
def build_digits(cfg) -> DataBundle:
    from sklearn.datasets import load_digits  # here: importing sklearn takes ~1.4 s

    digits = load_digits()
    # the source stores 0..16 ink levels as floats; x16 spreads them over 0..256, clipped to 255
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target
    # no official test split: carve one out (stratified, seeded), then val from the rest
    parts = carve_splits(labels, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    source = ArrayDataset(images, labels)
    mean, std = pixel_stats(images[parts["train"]])  # no published statistics for this set
    return DataBundle(
        name="digits",
        **splits_of(source, parts),
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        channels=1,
        image_size=8,
        mean=mean,
        std=std,
        source="sklearn.datasets.load_digits",
    )
