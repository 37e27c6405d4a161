"""A 2-D map of the test embeddings (UMAP where installed, else scikit-learn's t-SNE), saved
with the run so the report can draw it without the backbone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FILE = "embedding_map.npz"


def project_2d(features: np.ndarray, labels: np.ndarray, seed: int = 0,
               max_points: int = 2000) -> tuple[np.ndarray, np.ndarray, str]:
    """`(coords (n, 2), labels (n,), method)` for at most `max_points` test embeddings.

    Larger splits are subsampled (seeded) because t-SNE's cost grows faster than linearly and
    a scatter of more points shows nothing more. Features are L2-normalized first: the k-NN
    and the SSL losses compare them by cosine similarity.
    """
    features, labels = np.asarray(features, dtype=np.float32), np.asarray(labels)
    if len(features) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), max_points, replace=False))
        features, labels = features[keep], labels[keep]
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    try:
        import umap  # optional: umap-learn

        coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(features)
        return np.asarray(coords, dtype=np.float32), labels, "UMAP"
    except ImportError:
        pass
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    coords = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed,
                  n_jobs=min(2, os.cpu_count() or 1)).fit_transform(features)
    return coords.astype(np.float32), labels, "t-SNE"


def write_embedding_map(run_dir: Path, features: np.ndarray, labels: np.ndarray,
                        seed: int = 0) -> Path:
    coords, labels, method = project_2d(features, labels, seed)
    path = Path(run_dir) / FILE
    tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp.npz")  # np.savez keeps the .npz suffix
    np.savez(tmp, coords=coords, labels=labels, method=np.array(method))
    os.replace(tmp, path)
    return path


def read_embedding_map(run_dir: Path) -> tuple[np.ndarray, np.ndarray, str] | None:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return saved["coords"], saved["labels"], str(saved["method"])
