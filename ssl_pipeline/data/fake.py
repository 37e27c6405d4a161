"""Synthetic images for tests and smoke runs: any size, channels and number of classes.

Each class has a smooth random pattern (a few random values per channel, upsampled), and a
sample is its class pattern plus pixel noise. The classes are therefore learnable, and
everything is drawn from data.split_seed, so the same seed gives the same images.
"""

from __future__ import annotations

import numpy as np
import torch

from ssl_pipeline.data.base import (
    SPLITS,
    ArrayDataset,
    DataBundle,
    datasets,
    pixel_stats,
    splits_of,
)
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.names import DATASET_DESCRIPTIONS

DEFAULT_NUM_CLASSES = 4
NOISE_STD = 40.0  # gray levels; the patterns span about 0-255, so classes overlap only a little
PATTERN_CELLS = 4  # random values per side before upsampling: smooth, but not flat


def class_patterns(rng: np.random.Generator, classes: int, channels: int, size: int) -> np.ndarray:
    """`(classes, size, size, channels)` float patterns in about 0..255."""
    cells = (classes, channels, PATTERN_CELLS, PATTERN_CELLS)
    coarse = torch.from_numpy(rng.uniform(0, 255, cells))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return smooth.permute(0, 2, 3, 1).numpy()


def draw_samples(rng: np.random.Generator, patterns: np.ndarray, count: int):
    """`count` noisy copies of the patterns `(count, H, W, C)` uint8, classes balanced, shuffled."""
    labels = rng.permutation(np.arange(count) % len(patterns))
    images = patterns[labels] + rng.normal(0, NOISE_STD, (count, *patterns.shape[1:]))
    return np.clip(images, 0, 255).round().astype(np.uint8), labels


@datasets.register("fake", DATASET_DESCRIPTIONS["fake"])
def build_fake(cfg) -> DataBundle:
    size = cfg.image_size or cfg.fake.image_size
    channels = cfg.channels or cfg.fake.channels
    if channels not in (1, 3):
        raise SSLPipelineError(f"data.fake.channels={channels} is not supported; use 1 or 3")
    classes = cfg.num_classes or DEFAULT_NUM_CLASSES
    rng = np.random.default_rng(cfg.split_seed)
    patterns = class_patterns(rng, classes, channels, size)
    counts = [cfg.fake.train_samples, cfg.fake.val_samples, cfg.fake.test_samples]
    # one source, splits in consecutive index ranges: the split hashes then tell them apart
    drawn = [draw_samples(rng, patterns, n) for n in counts]
    images = np.concatenate([d[0] for d in drawn])
    labels = np.concatenate([d[1] for d in drawn])
    source = ArrayDataset(images[..., 0] if channels == 1 else images, labels)
    ends = np.cumsum(counts)
    parts = {name: np.arange(end - n, end) for name, n, end in zip(SPLITS, counts, ends) if n}
    mean, std = pixel_stats(source.images[parts["train"]])
    return DataBundle(
        name="fake",
        **splits_of(source, parts),
        num_classes=classes,
        class_names=[f"class_{i}" for i in range(classes)],
        channels=channels,
        image_size=size,
        mean=mean,
        std=std,
        source=f"synthetic (seed {cfg.split_seed})",
    )
