"""Class-balanced subsets and few-shot evaluation on synthetic features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals.few_shot import few_shot
from ssl_pipeline.evals.subsets import balanced_subset

UNEVEN = np.repeat([0, 1, 2], [100, 37, 3])  # class sizes 100, 37, 3


def test_per_class_subset_is_exact_balanced_and_valid():
    labels = np.random.default_rng(0).permutation(UNEVEN)
    idx = balanced_subset(labels, per_class=3, seed=0)
    assert len(idx) == 9 and len(np.unique(idx)) == 9
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3]
    assert np.all(np.diff(idx) > 0)  # sorted indices into labels


@pytest.mark.parametrize("fraction, counts", [(0.1, [10, 4, 1]), (0.01, [1, 1, 1]), (1.0, [100, 37, 3])])
def test_fraction_keeps_class_proportions_with_at_least_one_per_class(fraction, counts):
    idx = balanced_subset(UNEVEN, fraction=fraction, seed=0)
    assert np.bincount(UNEVEN[idx], minlength=3).tolist() == counts


def test_subsets_are_seeded():
    a, b = balanced_subset(UNEVEN, per_class=2, seed=1), balanced_subset(UNEVEN, per_class=2, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, balanced_subset(UNEVEN, per_class=2, seed=2))
    assert not np.array_equal(balanced_subset(UNEVEN, fraction=0.1, seed=1),
                              balanced_subset(UNEVEN, fraction=0.1, seed=2))


@pytest.mark.parametrize("kwargs", [{}, {"per_class": 2, "fraction": 0.1}, {"per_class": 4}, {"fraction": 0}])
def test_impossible_subsets_are_a_user_error(kwargs):
    with pytest.raises(SSLPipelineError):
        balanced_subset(UNEVEN, **kwargs)


def clusters(num_classes=5, per_class=60, dim=32, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centers[labels] + spread * rng.normal(size=(len(labels), dim))
    return features.astype(np.float32), labels


def test_separable_data_is_classified_from_few_shots():
    train_x, train_y = clusters(seed=0)
    test_x, test_y = clusters(seed=0)  # same centers
    test_x = test_x + 0.3 * np.random.default_rng(1).normal(size=test_x.shape).astype(np.float32)
    result = few_shot(train_x, train_y, test_x, test_y, 5, shots=(1, 5), seeds=3)
    assert json.loads(json.dumps(result)) == result
    assert set(result["by_shots"]) == {"1", "5"}
    for entry in result["by_shots"].values():
        assert entry["top1"] == entry["logistic"]["top1"] > 0.95
        assert entry["knn"]["top1"] > 0.95
        for summary in (entry["logistic"], entry["knn"]):
            assert summary["n"] == 3 == len(summary["by_seed"])
            assert summary["ci95"][0] <= summary["top1"] <= summary["ci95"][1]


def test_one_shot_knn_is_nearest_neighbour_of_the_drawn_examples():
    train_x, train_y = clusters(spread=1.5, seed=2)  # overlapping: mistakes happen
    test_x, test_y = clusters(spread=1.5, seed=2)
    test_x = test_x[::-1].copy()
    result = few_shot(train_x, train_y, test_x, test_y[::-1], 5, shots=(1,), seeds=2, classifiers=("knn",))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    for seed, top1 in enumerate(result["by_shots"]["1"]["knn"]["by_seed"]):
        idx = balanced_subset(train_y, per_class=1, seed=seed)
        nearest = train_y[idx][(unit(test_x) @ unit(train_x[idx]).T).argmax(1)]
        assert top1 == pytest.approx((nearest == test_y[::-1]).mean())
    assert result["by_shots"]["1"]["top1"] == result["by_shots"]["1"]["knn"]["top1"] < 0.99


def test_few_shot_is_deterministic_and_seeds_differ():
    train_x, train_y = clusters(spread=1.5, seed=3)
    test_x, test_y = clusters(spread=1.5, seed=4)
    run = lambda: few_shot(train_x, train_y, test_x, test_y, 5, shots=(2,), seeds=4)  # noqa: E731
    first = run()
    assert first == run()
    assert len(set(first["by_shots"]["2"]["logistic"]["by_seed"])) > 1


@pytest.mark.parametrize("kwargs", [{"classifiers": ("svm",)}, {"seeds": 0}, {"shots": (61,)}])
def test_impossible_settings_are_a_user_error(kwargs):
    x, y = clusters()  # 60 examples per class
    with pytest.raises(SSLPipelineError):
        few_shot(x, y, x, y, 5, **kwargs)
