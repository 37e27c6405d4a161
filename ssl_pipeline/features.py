"""Embeddings of a dataset split, extracted once and cached on disk (DINO's dump-and-load idea).

The backbone runs in eval mode (BatchNorm on its running statistics), with no augmentation and
no gradients. The cache key hashes everything the features depend on: the backbone weights,
the eval transform, the split's sample indices and the package version; a change to any of
them is a new key, a re-run with the same ones reads the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ssl_pipeline
from ssl_pipeline.atomic import write_atomic
from ssl_pipeline.progress import progress_bar


def weights_hash(module: nn.Module) -> str:
    """sha256 over the module's state dict (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_key(weights_sha: str, transform: object, split_hash: str) -> str:
    text = f"{weights_sha}|{transform!r}|{split_hash}|{ssl_pipeline.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`(features (N, D) float32, labels (N,))` in loader order; restores the training mode.

    Batches stream through the backbone; `progress` names a progress bar shown on terminals.
    """
    was_training = backbone.training
    backbone.eval()  # BatchNorm uses its running statistics: features do not depend on the batch
    features, labels = [], []
    batches = progress_bar(loader, progress)
    try:
        for images, targets in batches:
            features.append(backbone(images.to(device)).float().cpu())
            labels.append(torch.as_tensor(targets))
    finally:
        backbone.train(was_training)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def cached_features(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    cache_dir: Path,
    key: str,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Features from `cache_dir/<key>.npz` when present, else extracted and saved there.

    Returns `(features, labels, from_cache)`. The file is written to a temporary name and
    renamed, so an interrupted run never leaves a half-written cache entry.
    """
    path = Path(cache_dir) / f"{key}.npz"
    if path.exists():
        with np.load(path) as saved:
            return saved["features"], saved["labels"], True
    features, labels = extract_features(backbone, loader, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as file:  # a file object: np.savez would append .npz to a name
            np.savez(file, features=features, labels=labels)

    write_atomic(path, save)
    return features, labels, False
