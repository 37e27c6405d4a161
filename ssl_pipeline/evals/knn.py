"""Weighted k-NN classification on L2-normalized features through faiss.

Cosine similarity (inner product of L2-normalized vectors); each of the k neighbours votes
for its class with weight exp(similarity / T), exactly as lightly's `knn_predict` and DINO's
`knn_classifier` (Wu et al. 2018, InstDisc). Protocols: DINO k=20, T=0.07; InstDisc and
lightly's benchmarks k=200, T=0.1. One search with the largest k serves every k. Queries go in
chunks and faiss tiles the bank itself, so a full (queries x bank) similarity matrix never
exists: the cause of the out-of-memory errors in DINO's and solo-learn's k-NN at ImageNet scale.

The search is exact: faiss's (on its GPU index when faiss sees a GPU), or on CPUs with bf16
matrix units (Intel AMX) our bf16 first pass on the AMX tiles with exact float32 re-scoring
(`bf16_search.py`), which finds the same neighbours in about a quarter of faiss's time there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import get_args

import numpy as np

from ssl_pipeline.blas import import_faiss
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.progress import progress_bar
from ssl_pipeline.recipe import KNNConfig

faiss = import_faiss()  # on its AVX-512 kernels where OpenBLAS would not pick them (blas.py)

PROTOCOLS = {20: 0.07, 200: 0.1}  # k -> T: DINO; InstDisc and lightly's benchmarks
SEARCHES = get_args(KNNConfig.model_fields["search"].annotation)  # eval.knn.search's values
BF16_MIN_BANK = 8192  # below this faiss is as quick; `auto` keeps it


def l2_normalized(features: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous copy of `features (N, D)` with unit-length rows."""
    features = np.array(features, dtype=np.float32, order="C", copy=True)  # one copy, not two
    faiss.normalize_L2(features)
    return features


class BankSearch:
    """Exact cosine-similarity search: inner products of the L2-normalized rows of a bank and
    of the queries (both normalized here).

    On the GPUs through a faiss GPU index when faiss has any. On CPU with `faiss.knn` over one
    normalized copy of the bank: no index, whose own copy (grown by reallocation as rows are
    added) would double the memory; a 1M x 2048 bank is 8 GB. `search="auto"` uses the bf16
    search instead on CPUs with bf16 matrix units (AMX) for banks of at least `BF16_MIN_BANK`
    finite rows whose bf16 copy (half the bank) fits in the free memory, when its kernel
    compiles; it normalizes as it goes (no normalized copy). "bf16" asks for it anywhere
    (tests, comparisons), "faiss" never uses it.
    """

    def __init__(self, bank: np.ndarray, search: str = "auto"):
        self.bank = self.index = self.bf16 = None
        # finiteness is checked by Bf16Search's own pass over the bank, not a second one
        self.kind = choose_search(bank, search, check_finite=False)
        if self.kind == "bf16":  # an error that says what to do where the kernel cannot be built
            from ssl_pipeline.evals.bf16_search import Bf16Search

            # normalizes as it goes: no normalized copy of the bank (nor its memory)
            self.bf16 = Bf16Search(bank, normalize=True)
            if self.bf16.finite or search == "bf16":
                return
            self.bf16, self.kind = None, "faiss"  # auto: inf or nan in the bank
        self.bank = l2_normalized(bank)
        if self.kind == "faiss-gpu":
            # Older faiss GPU builds cap k at 2048; the protocols here use k <= 200.
            self.index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.bank.shape[1]))
            self.index.add(self.bank)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(cosine similarities, bank indices)` of `queries (Q, D)` (any length), each (Q, k),
        most similar first."""
        if self.bf16 is not None:
            return self.bf16.search(queries, k)
        queries = l2_normalized(queries)
        if self.index is not None:
            return self.index.search(queries, k)
        return faiss.knn(queries, self.bank, k, metric=faiss.METRIC_INNER_PRODUCT)


def choose_search(bank: np.ndarray, search: str = "auto", check_finite: bool = True) -> str:
    """What `BankSearch(bank, search)` runs: "bf16", "faiss-gpu" or "faiss" (see BankSearch).
    `check_finite=False` leaves out the scan for inf and nan (BankSearch's own pass finds them)."""
    if search not in SEARCHES:
        raise SSLPipelineError(
            f"k-NN: search must be one of {', '.join(SEARCHES)}, got {search!r}")
    gpus = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if search == "bf16" or (search == "auto" and not gpus and _bf16_pays(bank, check_finite)):
        return "bf16"
    return "faiss-gpu" if gpus else "faiss"


def _bf16_pays(bank: np.ndarray, check_finite: bool = True) -> bool:
    from ssl_pipeline.evals import bf16_search as bf16

    return (len(bank) >= BF16_MIN_BANK and bf16.has_bf16_matrix_units()
            and bf16.fits_in_memory(bank) and (not check_finite or bf16.all_finite(bank))
            and bf16.compiled_kernel() is not None)


def knn_classify(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float | Mapping[int, float] = 0.07,
    chunk_size: int = 4096,
    progress: str | None = None,
    search: str = "auto",
) -> dict[int, np.ndarray]:
    """Class scores `(num_queries, num_classes)` float64 for each k in `ks`, from one search.

    Multi-label `bank_labels (N, L)` of 0/1 (L = num_classes): each label's score is the
    similarity-weighted vote of the neighbours' label vectors, sum_j w_j y_j / sum_j w_j, a
    probability-like share in [0, 1] (0.5 is a weighted majority).

    `temperature` is one T for every k, or one per k: `ks=tuple(PROTOCOLS),
    temperature=PROTOCOLS` gives DINO's and InstDisc's protocols from one search. A k above the
    bank size uses the whole bank. Top-1 is `scores.argmax(1)`; the ranking that lightly's
    `knn_predict` returns is `np.argsort(-scores, 1)`. `search` picks how the exact search
    runs (`BankSearch`): "auto", "faiss" or "bf16".
    """
    temperatures = _temperatures(ks, temperature)
    bank, queries = np.asarray(bank), np.asarray(queries)
    bank_labels = _checked_labels(bank, bank_labels, queries, num_classes)
    index = BankSearch(bank, search)
    k_max = min(max(ks), len(bank))
    scores = {k: np.zeros((len(queries), num_classes)) for k in ks}
    starts = range(0, len(queries), chunk_size)
    for start in progress_bar(starts, progress):  # one bar step per chunk of queries
        sims, idx = index.search(queries[start : start + chunk_size], k_max)  # (q, k_max) each
        labels = bank_labels[idx]
        for k, t in temperatures.items():
            kk = min(k, k_max)
            # float64 so exp(sim / T) cannot overflow for small T (float32 does below T = 0.0113)
            votes = np.exp(sims[:, :kk].astype(np.float64) / t)
            if bank_labels.ndim == 2:  # multi-label: each label's similarity-weighted vote share
                shares = np.einsum("qk,qkl->ql", votes, labels[:, :kk]) / votes.sum(1, keepdims=True)
                scores[k][start : start + len(idx)] = shares
                continue
            scores[k][start : start + len(idx)] = _class_sums(labels[:, :kk], votes, num_classes)
    return scores


def knn_top1(
    bank, bank_labels, queries, query_labels, num_classes, k=20, temperature=0.07, search="auto"
) -> float:
    """Top-1 accuracy of weighted k-NN, as a fraction in [0, 1]."""
    scores = knn_classify(bank, bank_labels, queries, num_classes, (k,), temperature,
                          search=search)[k]
    return float((scores.argmax(1) == np.asarray(query_labels)).mean())


def _class_sums(labels: np.ndarray, votes: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-row sums of `votes (q, k)` by class `labels (q, k)` -> `(q, num_classes)`."""
    q = len(labels)
    flat = (np.arange(q)[:, None] * num_classes + labels).ravel()  # one bincount, no Python loop
    return np.bincount(flat, votes.ravel(), minlength=q * num_classes).reshape(q, num_classes)


def _temperatures(ks: Sequence[int], temperature: float | Mapping[int, float]) -> dict[int, float]:
    if not ks or min(ks) < 1:
        raise SSLPipelineError(f"k-NN: ks must be positive integers, got {tuple(ks)}")
    if not isinstance(temperature, Mapping):
        return {k: float(temperature) for k in ks}
    missing = [k for k in ks if k not in temperature]
    if missing:
        raise SSLPipelineError(
            f"k-NN: no temperature for k={missing}; give one for each of {tuple(ks)}"
        )
    return {k: float(temperature[k]) for k in ks}


def _checked_labels(bank, bank_labels, queries, num_classes) -> np.ndarray:
    bank_labels = np.asarray(bank_labels)
    if bank.shape[1] != queries.shape[1] or len(bank_labels) != len(bank):
        raise SSLPipelineError(
            f"k-NN: bank {bank.shape} with {len(bank_labels)} labels and queries {queries.shape} "
            "must have one label per bank row and the same feature dimension"
        )
    if len(bank_labels) == 0:
        raise SSLPipelineError("k-NN: the bank is empty; it needs at least one labelled feature")
    if bank_labels.ndim == 2:
        if bank_labels.shape[1] != num_classes or not np.isin(bank_labels, (0, 1)).all():
            raise SSLPipelineError(
                f"k-NN: multi-label bank labels must be (N, {num_classes}) of 0/1; got "
                f"{bank_labels.shape}")
        return bank_labels.astype(np.float64)
    bank_labels = bank_labels.astype(np.int64)
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise SSLPipelineError(f"k-NN: bank labels must lie in [0, {num_classes}) (num_classes)")
    return bank_labels
