"""Seeded, class-balanced subsets of a labelled split: few-shot draws and label fractions.

`per_class=k` takes exactly k examples of every class (few-shot). `fraction=f` takes f x n_c
examples of each class c, rounded half up and at least one, so class proportions are kept: the
stand-in for SimCLR v2's fixed 1% / 10% ImageNet lists when those lists are absent (ANCHORS.md,
"Fine-tune with few labels").
"""

from __future__ import annotations

import math

import numpy as np

from ssl_pipeline.errors import SSLPipelineError


def balanced_subset(
    labels: np.ndarray, per_class: int | None = None, fraction: float | None = None, seed: int = 0
) -> np.ndarray:
    """Sorted indices into `labels` of a class-balanced subset; give `per_class` or `fraction`.

    The same seed gives the same subset; classes absent from `labels` are skipped.

    >>> labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    >>> len(balanced_subset(labels, per_class=2)), len(balanced_subset(labels, fraction=0.5))
    (4, 5)
    """
    if (per_class is None) == (fraction is None):
        raise SSLPipelineError("balanced_subset: give exactly one of per_class and fraction")
    if fraction is not None and not 0 < fraction <= 1:
        raise SSLPipelineError(f"balanced_subset: fraction must lie in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):  # sorted, so the draws do not depend on the order of the labels
        members = np.flatnonzero(labels == c)
        if per_class is not None:
            size = per_class
        else:
            size = max(1, math.floor(fraction * len(members) + 0.5))  # rounded half up
        if not 1 <= size <= len(members):
            raise SSLPipelineError(
                f"balanced_subset: class {c} has {len(members)} examples, cannot take {size}; "
                "lower per_class (at least 1)"
            )
        chosen.append(rng.choice(members, size, replace=False))
    return np.sort(np.concatenate(chosen))
