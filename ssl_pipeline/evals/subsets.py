"""Seeded, class-balanced subsets of a labelled split: few-shot draws and label fractions.

Multi-label labels `(N, L)` cannot be balanced by class: a fraction is drawn at random, and
`per_class=k` takes k examples having each label (`_multi_label_subset`).

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
    if labels.ndim == 2:
        return _multi_label_subset(labels, per_class, fraction, rng)
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


def _multi_label_subset(labels: np.ndarray, per_class: int | None, fraction: float | None,
                        rng: np.random.Generator) -> np.ndarray:
    """Multi-label `(N, L)`: `fraction` of the examples at random (label sets cannot be
    balanced); `per_class=k`: k examples having each label (fewer when a label has fewer), one
    label after another, an example drawn for one label counting for all its labels."""
    n = len(labels)
    if fraction is not None:
        return np.sort(rng.choice(n, max(1, math.floor(fraction * n + 0.5)), replace=False))
    chosen: set[int] = set()
    for j in range(labels.shape[1]):
        have = sum(1 for i in chosen if labels[i, j])
        members = np.setdiff1d(np.flatnonzero(labels[:, j]), list(chosen))
        take = min(max(0, per_class - have), len(members))
        chosen.update(int(i) for i in rng.choice(members, take, replace=False))
    if not chosen:
        raise SSLPipelineError("balanced_subset: no example has any label")
    return np.array(sorted(chosen), dtype=np.int64)


def listed_subset(split, list_file: str) -> tuple[np.ndarray, str]:
    """Positions in `split` (a `Split` of image files) of the images named in `list_file`: one
    file name per line, as SimCLR's ImageNet `1percent.txt` / `10percent.txt`
    (`n01440764_10026.JPEG`); a path is matched by its last part. Listed images our validation
    split took from train are left out, and counted in the returned note."""
    from pathlib import Path

    path = Path(list_file)
    if not path.is_file():
        raise SSLPipelineError(f"eval.finetune.subset_files: {list_file} does not exist")
    names = {Path(line.strip()).name for line in path.read_text().splitlines() if line.strip()}
    paths = getattr(split.source, "paths", None)
    if paths is None:
        raise SSLPipelineError(
            "eval.finetune.subset_files names image files; this dataset has none (use label "
            "fractions without a file)")
    positions = np.array([i for i, index in enumerate(split.indices) if paths[index].name in names],
                         dtype=np.int64)
    if not len(positions):
        raise SSLPipelineError(
            f"none of the {len(names)} images listed in {path} is in the train split; does the "
            "list belong to this dataset?")
    note = f"listed in {path.name}: {len(positions)} of {len(names)} images"
    if len(positions) < len(names):
        note += " (the rest are in the validation split carved from train, or absent)"
    return positions, note
