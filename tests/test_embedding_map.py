"""embedding_map.py: the 2-D map of test embeddings drawn in the report."""

import numpy as np

from ssl_pipeline.embedding_map import project_2d, read_embedding_map, write_embedding_map


def _clusters(n_per_class=40, classes=4, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = rng.normal(size=(classes, dim)) * 4
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def _nearest_neighbour_agreement(coords, labels):
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def test_map_keeps_separated_classes_apart():
    features, labels = _clusters()
    coords, kept, method = project_2d(features, labels, seed=0)
    assert coords.shape == (160, 2) and np.isfinite(coords).all()
    assert method in ("t-SNE", "UMAP")
    assert _nearest_neighbour_agreement(coords, kept) > 0.95
    shuffled = np.random.default_rng(1).permutation(kept)
    assert _nearest_neighbour_agreement(coords, shuffled) < 0.5  # the check can fail


def test_large_splits_are_subsampled_with_their_labels():
    features, labels = _clusters(n_per_class=100)
    coords, kept, _ = project_2d(features, labels, seed=3, max_points=120)
    assert coords.shape == (120, 2) and kept.shape == (120,)
    assert set(kept.tolist()) == {0, 1, 2, 3}
    again, _, _ = project_2d(features, labels, seed=3, max_points=120)
    np.testing.assert_allclose(coords, again)  # seeded: the same map twice


def test_written_map_reads_back(tmp_path):
    features, labels = _clusters(n_per_class=10)
    path = write_embedding_map(tmp_path, features, labels)
    coords, kept, method = read_embedding_map(tmp_path)
    assert path.name == "embedding_map.npz" and coords.shape == (40, 2)
    np.testing.assert_array_equal(kept, labels)
    assert not list(tmp_path.glob(".*tmp*"))
    assert read_embedding_map(tmp_path / "elsewhere") is None
