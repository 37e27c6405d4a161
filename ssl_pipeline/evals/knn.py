"""Weighted k-NN classification on L2-normalized features through faiss.

Cosine similarity (inner product of L2-normalized vectors); each of the k neighbours votes
for its class with weight exp(similarity / T) (Wu et al. 2018, InstDisc; DINO). One search
with the largest k serves every k. Queries go in chunks, so memory is bounded by
chunk x bank-size scores inside faiss rather than a full similarity matrix.
"""

from __future__ import annotations

import faiss
import numpy as np


def l2_normalized(features: np.ndarray) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32).copy()
    faiss.normalize_L2(features)
    return features


def build_index(bank: np.ndarray) -> faiss.Index:
    """An exact inner-product index over the (normalized) bank; on the GPUs when faiss has any."""
    index = faiss.IndexFlatIP(bank.shape[1])
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(bank)
    return index


def knn_scores(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    ks: tuple[int, ...] = (20,),
    temperature: float = 0.07,
    chunk_size: int = 4096,
) -> dict[int, np.ndarray]:
    """Class scores `(num_queries, num_classes)` for each k in `ks`."""
    bank, queries = l2_normalized(bank), l2_normalized(queries)
    index = build_index(bank)
    k_max = min(max(ks), len(bank))
    bank_labels = np.asarray(bank_labels, dtype=np.int64)
    scores = {k: np.zeros((len(queries), num_classes), dtype=np.float32) for k in ks}
    for start in range(0, len(queries), chunk_size):
        sims, idx = index.search(queries[start : start + chunk_size], k_max)  # (q, k_max) each
        weights = np.exp(sims / temperature)
        labels = bank_labels[idx]
        rows = np.arange(len(idx))[:, None]
        for k in ks:
            kk = min(k, k_max)
            np.add.at(scores[k][start : start + len(idx)], (rows, labels[:, :kk]), weights[:, :kk])
    return scores


def knn_top1(bank, bank_labels, queries, query_labels, num_classes, k=20, temperature=0.07) -> float:
    """Top-1 accuracy of weighted k-NN, as a fraction in [0, 1]."""
    scores = knn_scores(bank, bank_labels, queries, num_classes, (k,), temperature)[k]
    return float((scores.argmax(1) == np.asarray(query_labels)).mean())
