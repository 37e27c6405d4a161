"""Classification metrics from class scores, as plain Python numbers ready for JSON.

Accuracies are fractions in [0, 1]. Any score that ranks classes works (logits, probabilities,
k-NN votes): only the order within a row is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, top_k_accuracy_score

from ssl_pipeline.errors import SSLPipelineError


def classification_metrics(
    scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
    multi_label_scores: str = "logits",
) -> dict:
    """Metrics of `scores (N, C)` against integer `labels (N,)` in [0, C).

    Multi-label `labels (N, L)` of 0/1 go to `multi_label_metrics` (`multi_label_scores` says
    whether the scores are logits or probabilities).

    Returns `top1`, `top5` (only when C >= 10; with fewer it says little), `balanced_accuracy`
    (mean recall over the classes present in `labels`), `macro_f1` (over classes present in
    `labels` or predictions), `per_class_accuracy` (recall per class, None for a class
    without examples), `confusion_matrix` (rows: true class, columns: predicted), `auc`
    (MedMNIST's definition, see `auc`), `num_samples` and, when given, `class_names`.

    >>> scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> m = classification_metrics(scores, np.array([0, 1, 1]))
    >>> m["top1"], m["per_class_accuracy"], m["confusion_matrix"]
    (0.6666666666666666, [1.0, 0.5], [[1, 0], [1, 1]])
    """
    if is_multi_label(labels):
        return multi_label_metrics(scores, labels, class_names, multi_label_scores)
    scores, labels = _checked(scores, labels, class_names)
    num_classes = scores.shape[1]
    predictions = scores.argmax(1)
    matrix = confusion_matrix(labels, predictions, labels=np.arange(num_classes))
    per_class = [float(matrix[c, c] / n) if n else None for c, n in enumerate(matrix.sum(1))]
    metrics = {
        "num_samples": len(labels),
        "top1": float((predictions == labels).mean()),
        # sklearn's definition, without its warning when a class is predicted but absent
        "balanced_accuracy": float(np.mean([a for a in per_class if a is not None])),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
        "auc": auc(scores, labels),
    }
    if num_classes >= 10:
        top5 = top_k_accuracy_score(labels, scores, k=5, labels=np.arange(num_classes))
        metrics["top5"] = float(top5)
    if class_names is not None:
        metrics["class_names"] = [str(name) for name in class_names]
    return metrics


def is_multi_label(labels) -> bool:
    """Labels `(N, L)` of 0/1 per label (multi-label), not class indices `(N,)`."""
    return np.ndim(labels) == 2


def multi_label_metrics(
    scores: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None = None,
    kind: str = "logits",
) -> dict:
    """Metrics of `scores (N, L)` against 0/1 `labels (N, L)`, as MedMNIST's evaluator defines
    them for multi-label data: `acc` = mean over labels of the accuracy of the prediction
    probability > 0.5, `auc` = mean over labels of the ROC AUC (labels with one class in
    `labels` left out). `top1` repeats `acc` so that tables keyed on top-1 show MedMNIST's ACC;
    also `exact_match` (all labels right), `macro_f1`, and per label `per_label_auc`,
    `per_label_accuracy`, `positives`. `kind`: "logits" (through a sigmoid) or
    "probabilities" (e.g. k-NN vote fractions).

    >>> m = multi_label_metrics(np.array([[2.0, -1.0], [-3.0, 1.0], [1.0, 1.0]]),
    ...                         np.array([[1, 0], [0, 1], [0, 1]]))
    >>> round(m["acc"], 4), m["auc"], round(m["exact_match"], 4)
    (0.8333, 1.0, 0.6667)
    """
    from sklearn.metrics import roc_auc_score

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if scores.ndim != 2 or labels.shape != scores.shape or len(labels) == 0:
        raise SSLPipelineError(
            f"metrics: multi-label scores and labels must both be (N, L) with N > 0; got "
            f"{scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise SSLPipelineError("metrics: multi-label labels must be 0 or 1")
    if kind not in ("logits", "probabilities"):
        raise ValueError(f"kind must be 'logits' or 'probabilities', got {kind!r}")
    p = 1.0 / (1.0 + np.exp(-scores)) if kind == "logits" else scores
    predicted = (p > 0.5).astype(np.int64)
    per_label_accuracy = (predicted == labels).mean(0)
    per_label_auc = [float(roc_auc_score(labels[:, j], p[:, j]))
                     if 0 < labels[:, j].sum() < len(labels) else None
                     for j in range(labels.shape[1])]
    present = [a for a in per_label_auc if a is not None]
    metrics = {
        "num_samples": len(labels),
        "multi_label": True,
        "top1": float(per_label_accuracy.mean()),
        "acc": float(per_label_accuracy.mean()),
        "auc": float(np.mean(present)) if present else None,
        "exact_match": float((predicted == labels).all(1).mean()),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "per_label_accuracy": [float(a) for a in per_label_accuracy],
        "per_label_auc": per_label_auc,
        "positives": [int(n) for n in labels.sum(0)],
    }
    if label_names is not None:
        metrics["class_names"] = [str(name) for name in label_names]
    return metrics


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores as class probabilities: logits (any negative value) through a softmax,
    non-negative scores such as k-NN votes divided by their row sum."""
    scores = np.asarray(scores, dtype=np.float64)
    if (scores < 0).any():
        shifted = np.exp(scores - scores.max(1, keepdims=True))
        return shifted / shifted.sum(1, keepdims=True)
    sums = scores.sum(1, keepdims=True)
    return np.where(sums > 0, scores / np.where(sums > 0, sums, 1), 1.0 / scores.shape[1])


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve as MedMNIST's evaluator computes it: two classes, the AUC of
    the second class's probability; more, the mean one-vs-rest AUC over the classes (those
    present in `labels`, and absent from none). None with fewer than two classes present.

    >>> auc(np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]]), np.array([0, 1, 0]))
    0.5
    """
    from sklearn.metrics import roc_auc_score

    p, labels = probabilities(scores), np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    if p.shape[1] == 2:
        return float(roc_auc_score(labels == 1, p[:, 1]))
    per_class = [roc_auc_score(labels == c, p[:, c]) for c in range(p.shape[1])
                 if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(per_class))


def _checked(scores, labels, class_names) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores), np.asarray(labels).astype(np.int64)
    if scores.ndim != 2 or labels.shape != (len(scores),) or len(labels) == 0:
        raise SSLPipelineError(
            f"metrics: scores must be (N, C) and labels (N,) with N > 0; "
            f"got {scores.shape} and {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise SSLPipelineError(f"metrics: labels must lie in [0, {scores.shape[1]}) (score columns)")
    if class_names is not None and len(class_names) != scores.shape[1]:
        raise SSLPipelineError(
            f"metrics: {len(class_names)} class names for {scores.shape[1]} score columns"
        )
    return scores, labels
