"""Multi-label evaluation (ChestMNIST, multi-label CSVs): MedMNIST's metrics, k-NN label votes,
one binary probe per label, label-wise few-shot and subsets."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ssl_pipeline.evals.few_shot import few_shot, vtab_1k
from ssl_pipeline.evals.knn import knn_classify
from ssl_pipeline.evals.linear_probe import linear_probe
from ssl_pipeline.evals.metrics import classification_metrics, multi_label_metrics
from ssl_pipeline.evals.subsets import balanced_subset


def features(n: int, labels: int = 5, dim: int = 16, seed: int = 0):
    """Features whose first `labels` dimensions light up with the labels: separable per label."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.4).astype(np.int64)
    y[:, 0] = np.arange(n) % 2
    x = rng.normal(0, 0.3, (n, dim))
    x[:, :labels] += 2.0 * y
    return x.astype(np.float32), y


def medmnist_acc(y_true, y_score, threshold=0.5):
    """MedMNIST's evaluator (medmnist/evaluator.py getACC, multi-label branch), restated."""
    y_pre = y_score > threshold
    return float(np.mean([np.mean(y_true[:, i] == y_pre[:, i]) for i in range(y_true.shape[1])]))


def test_metrics_are_medmnists_multi_label_definitions():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 6)) < 0.3).astype(np.int64)
    logits = rng.normal(size=(200, 6)) + 2 * y - 1
    m = multi_label_metrics(logits, y)
    p = 1 / (1 + np.exp(-logits))
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(6)]))
    assert m["acc"] == m["top1"] == pytest.approx(medmnist_acc(y, p))
    assert m["positives"] == y.sum(0).tolist() and len(m["per_label_auc"]) == 6
    shares = multi_label_metrics(p, y, kind="probabilities")  # the same, given probabilities
    assert shares["auc"] == pytest.approx(m["auc"]) and shares["acc"] == pytest.approx(m["acc"])
    assert classification_metrics(logits, y)["auc"] == pytest.approx(m["auc"])
    y[:, 2] = 0  # a label absent from the test set has no AUC and is left out of the mean
    m = multi_label_metrics(logits, y)
    assert m["per_label_auc"][2] is None
    expected = np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(6) if j != 2])
    assert m["auc"] == pytest.approx(expected)


def test_knn_scores_each_label_by_the_neighbours_weighted_votes():
    bank, bank_y = features(300)
    queries, query_y = features(100, seed=1)
    k, t = 20, 0.07
    scores = knn_classify(bank, bank_y, queries, 5, (k,), t)[k]
    # brute force: cosine similarity, top k, exp(sim / T) weights, weighted share of each label
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ b.T
    top = np.argsort(-sims, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sims, top, 1) / t)
    expected = np.einsum("qk,qkl->ql", w, bank_y[top]) / w.sum(1, keepdims=True)
    assert np.allclose(scores, expected, atol=1e-4)
    m = multi_label_metrics(scores, query_y, kind="probabilities")
    assert m["auc"] > 0.95 and m["acc"] > 0.9


def test_linear_probe_trains_one_binary_classifier_per_label_chosen_on_val_auc():
    (tx, ty), (vx, vy), (sx, sy) = features(400), features(100, seed=1), features(200, seed=2)
    result = linear_probe(tx, ty, vx, vy, sx, sy, 5, seeds=2, epochs=100,
                          grid={"lr": (1e-3, 1e-1), "weight_decay": (0.0,)})
    assert "val AUC" in result["selected_by"]
    assert result["test_metrics"]["multi_label"] and result["test_metrics"]["auc"] > 0.95
    assert result["top1"] > 0.9 and result["seeds"] == 2
    # each grid score is a val AUC, and the chosen one is the best of them
    best = max(result["grid"], key=lambda g: g["val_top1"])
    assert result["chosen"] == {"lr": best["lr"], "weight_decay": best["weight_decay"]}


def test_the_probes_own_multi_label_acc_is_medmnists():
    """The probe scores each setting with a cheap ACC (no AUCs); it must be the metric's."""
    import torch

    from ssl_pipeline.evals.linear_probe import scores, top1

    rng = np.random.default_rng(3)
    x, y = features(120, labels=7, dim=16, seed=3)
    head = (torch.from_numpy(rng.normal(size=(7, 16)).astype(np.float32)),
            torch.from_numpy(rng.normal(size=7).astype(np.float32)))
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y).float()
    expected = multi_label_metrics(scores(head, x_t), y)["acc"]
    assert 0.2 < expected < 0.9  # a random head: neither all right nor all wrong
    assert top1(head, x_t, y_t) == pytest.approx(expected, abs=1e-12)


def test_few_shot_and_vtab_on_multi_label_features():
    (tx, ty), (sx, sy) = features(400), features(200, seed=2)
    result = few_shot(tx, ty, sx, sy, 5, shots=(1, 5), seeds=3)
    five = result["by_shots"]["5"]
    assert 0.5 < five["top1"] <= 1 and five["auc"] > 0.8 and five["logistic"]["n"] == 3
    vx, vy = features(100, seed=1)
    vtab = vtab_1k(tx, ty, vx, vy, sx, sy, seeds=2)
    assert (vtab["train"], vtab["val"]) == (400, 100) and vtab["top1"] > 0.9


def test_label_wise_subsets():
    _, y = features(300)
    idx = balanced_subset(y, per_class=3, seed=0)
    assert (y[idx].sum(0) >= 3).all() and len(idx) <= 15
    assert np.array_equal(idx, balanced_subset(y, per_class=3, seed=0))
    assert len(balanced_subset(y, fraction=0.1, seed=0)) == 30
