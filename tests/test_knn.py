"""Our faiss k-NN against a brute-force torch k-NN and against lightly's `knn_predict`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals.knn import knn_classify, knn_top1

SETTINGS = [(20, 0.07), (200, 0.1)]  # DINO; InstDisc and lightly
NUM_CLASSES = 10
MARGIN = 3e-5  # 20x float32 rounding of exp(sim / 0.07) (~1.5e-6), below most real gaps


def brute_force_scores(bank, bank_labels, queries, num_classes, k, temperature) -> np.ndarray:
    """The textbook definition in float64: full similarity matrix, top-k, exp(sim / T) votes."""
    bank = F.normalize(torch.from_numpy(bank).double(), dim=1)
    queries = F.normalize(torch.from_numpy(queries).double(), dim=1)
    sims, idx = (queries @ bank.T).topk(min(k, len(bank)), dim=1)  # (Q, k) each
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    scores.scatter_add_(1, torch.from_numpy(bank_labels)[idx], (sims / temperature).exp())
    return scores.numpy()


def lightly_ranking(bank, bank_labels, queries, num_classes, k, temperature) -> np.ndarray:
    """lightly's class ranking `(Q, C)`, best first; it expects normalized features."""
    bank = F.normalize(torch.from_numpy(bank), dim=1)
    queries = F.normalize(torch.from_numpy(queries), dim=1)
    labels = torch.from_numpy(bank_labels)
    return knn_predict(queries, bank.T, labels, num_classes, k, temperature).numpy()


def ranking(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def random_features(seed, bank_size, num_queries, dim=64):
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(bank_size, dim)).astype(np.float32)
    queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
    return bank, rng.integers(0, NUM_CLASSES, bank_size), queries


def has_clear_margins(bank, queries, bank_labels, k, temperature, depth) -> np.ndarray:
    """Queries whose k-th and (k+1)-th neighbours and top `depth` + 1 class scores are apart."""
    sims = np.sort(F.normalize(torch.from_numpy(queries).double(), dim=1).numpy()
                   @ F.normalize(torch.from_numpy(bank).double(), dim=1).numpy().T, axis=1)[:, ::-1]
    neighbours_apart = sims[:, k - 1] - sims[:, k] > MARGIN
    scores = -np.sort(-brute_force_scores(bank, bank_labels, queries, NUM_CLASSES, k, temperature))
    gaps = (scores[:, :depth] - scores[:, 1 : depth + 1]) / scores[:, :1]
    return neighbours_apart & (gaps > MARGIN).all(1)


@pytest.fixture(scope="module")
def clustered():
    """Ten overlapping clusters (so rankings are not trivial), queries without near-ties."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(NUM_CLASSES, 32))
    bank_labels = np.repeat(np.arange(NUM_CLASSES), 40)
    bank = (centers[bank_labels] + 1.5 * rng.normal(size=(400, 32))).astype(np.float32)
    query_labels = rng.integers(0, NUM_CLASSES, 600)
    queries = (centers[query_labels] + 1.5 * rng.normal(size=(600, 32))).astype(np.float32)
    # top-5 ranking needs five voted classes: k=200 of 400 always has them; k=20 checks top-1
    keep = has_clear_margins(bank, queries, bank_labels, 20, 0.07, depth=1)
    keep &= has_clear_margins(bank, queries, bank_labels, 200, 0.1, depth=5)
    assert keep.mean() > 0.9  # the fixture really tests (nearly) all of its queries
    return bank, bank_labels, queries[keep], query_labels[keep]


@pytest.mark.parametrize("k, temperature", SETTINGS)
def test_identical_to_brute_force_and_lightly_without_near_ties(clustered, k, temperature):
    bank, bank_labels, queries, query_labels = clustered
    depth = 5 if k == 200 else 1
    ours = ranking(knn_classify(bank, bank_labels, queries, NUM_CLASSES, (k,), temperature)[k])
    brute = ranking(brute_force_scores(bank, bank_labels, queries, NUM_CLASSES, k, temperature))
    lightly = lightly_ranking(bank, bank_labels, queries, NUM_CLASSES, k, temperature)
    np.testing.assert_array_equal(ours[:, :depth], brute[:, :depth])
    np.testing.assert_array_equal(ours[:, :depth], lightly[:, :depth])
    assert 0.5 < (ours[:, 0] == query_labels).mean() < 0.99  # overlapping, yet informative


def test_scores_equal_brute_force_scores(clustered):
    bank, bank_labels, queries, _ = clustered
    ours = knn_classify(bank, bank_labels, queries, NUM_CLASSES, (200,), 0.1)[200]
    brute = brute_force_scores(bank, bank_labels, queries, NUM_CLASSES, 200, 0.1)
    np.testing.assert_allclose(ours, brute, rtol=1e-4)  # float32 similarities inside faiss


@pytest.mark.parametrize("k, temperature", SETTINGS)
def test_agrees_on_random_features(k, temperature):
    bank, bank_labels, queries = random_features(1, 2000, 2000)
    ours = knn_classify(bank, bank_labels, queries, NUM_CLASSES, (k,), temperature)[k].argmax(1)
    brute = brute_force_scores(bank, bank_labels, queries, NUM_CLASSES, k, temperature).argmax(1)
    lightly = lightly_ranking(bank, bank_labels, queries, NUM_CLASSES, k, temperature)[:, 0]
    assert (ours == brute).mean() >= 0.999
    assert (ours == lightly).mean() >= 0.999


def test_chunking_does_not_change_the_result(clustered):
    bank, bank_labels, queries, _ = clustered
    whole = knn_classify(bank, bank_labels, queries, NUM_CLASSES, (20, 200), 0.1)
    chunked = knn_classify(bank, bank_labels, queries, NUM_CLASSES, (20, 200), 0.1, chunk_size=7)
    for k in (20, 200):
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5)
        np.testing.assert_array_equal(chunked[k].argmax(1), whole[k].argmax(1))


def test_k_above_bank_size_uses_the_whole_bank():
    bank, bank_labels, queries = random_features(2, 30, 50)
    scores = knn_classify(bank, bank_labels, queries, NUM_CLASSES, (50,), 0.1)[50]
    np.testing.assert_allclose(scores, brute_force_scores(bank, bank_labels, queries, NUM_CLASSES, 30, 0.1), rtol=1e-4)


def test_many_ks_from_one_search_equal_separate_searches(clustered):
    bank, bank_labels, queries, _ = clustered
    temperatures = {5: 0.1, 20: 0.07, 200: 0.1}
    together = knn_classify(bank, bank_labels, queries, NUM_CLASSES, (5, 20, 200), temperatures)
    for k, t in temperatures.items():
        alone = knn_classify(bank, bank_labels, queries, NUM_CLASSES, (k,), t)[k]
        np.testing.assert_allclose(together[k], alone, rtol=1e-6)


def test_a_temperature_per_k_must_cover_every_k(clustered):
    bank, bank_labels, queries, _ = clustered
    with pytest.raises(SSLPipelineError, match="k=\\[200\\]"):
        knn_classify(bank, bank_labels, queries, NUM_CLASSES, (20, 200), {20: 0.07})


def test_labels_outside_the_classes_are_a_user_error(clustered):
    bank, bank_labels, queries, _ = clustered
    with pytest.raises(SSLPipelineError, match="num_classes"):
        knn_classify(bank, bank_labels, queries, 5)


def test_knn_top1_is_the_accuracy_of_the_argmax(clustered):
    bank, bank_labels, queries, query_labels = clustered
    scores = knn_classify(bank, bank_labels, queries, NUM_CLASSES, (20,), 0.07)[20]
    expected = (scores.argmax(1) == query_labels).mean()
    assert knn_top1(bank, bank_labels, queries, query_labels, NUM_CLASSES) == pytest.approx(expected)
