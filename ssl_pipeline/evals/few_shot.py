"""Few-shot classification on cached features: a few labelled examples per class, many draws.

For every `shots` value and seed, `balanced_subset` draws `shots` training examples of each
class; each classifier is fitted on them and scored on the whole test split. Features are
L2-normalized (the k-NN protocol's cosine geometry; it also puts logistic regression's fixed
C on a common scale across backbones). Classifiers:

- "logistic": scikit-learn's multinomial LogisticRegression with its default C=1. A 1-shot
  draw leaves no examples to tune C on, so it stays fixed.
- "knn": `knn_classify` with DINO's k=20, T=0.07; k is capped at the support size, so with one
  shot every class casts a single vote and this is 1-nearest-neighbour.

VTAB-1k (`vtab_1k`): 1000 labelled examples, 800 drawn from train and 200 from val (not
class-balanced: VTAB draws them at random); logistic regression's C is chosen on the 200 from
`VTAB_C_GRID`, then refitted on all 1000 and scored on the whole test split, over the seeds.
With fewer than 800 train or 200 val examples, all there are are used and the result says so.

Multi-label labels `(N, L)`: each draw takes `shots` examples having each label
(`balanced_subset`); logistic regression is one binary classifier per label and k-NN scores each
label by its neighbours' similarity-weighted votes; top-1 is then MedMNIST's ACC (p > 0.5 per
label) and the mean AUC is reported beside it (VTAB-1k then chooses C on the val AUC).

Each classifier reports the mean top-1 over seeds, the sample std, and a 95% Student-t
interval, mean +- t(0.975, n-1) x std / sqrt(n), clipped to [0, 1]; with n = 5 seeds the
normal 1.96 would be too narrow (t = 2.78). The interval is None for a single seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression

from ssl_pipeline.budget import Deadline
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals.knn import knn_classify, l2_normalized
from ssl_pipeline.evals.metrics import is_multi_label, multi_label_metrics
from ssl_pipeline.evals.subsets import balanced_subset
from ssl_pipeline.progress import progress_bar


def fit_predict_logistic(x, y, queries, num_classes) -> np.ndarray:
    return _logistic(1.0, x, y).predict(queries)


def fit_predict_knn(x, y, queries, num_classes) -> np.ndarray:
    return knn_classify(x, y, queries, num_classes, (20,), 0.07)[20].argmax(1)


CLASSIFIERS = {"logistic": fit_predict_logistic, "knn": fit_predict_knn}


def label_probabilities_logistic(x, y, queries, num_labels, c: float = 1.0) -> np.ndarray:
    """Multi-label: one binary logistic regression per label -> `(len(queries), L)` P(label);
    a label constant in `y` gets that constant."""
    out = np.empty((len(queries), y.shape[1]))
    for j in range(y.shape[1]):
        column = y[:, j]
        if column.min() == column.max():
            out[:, j] = float(column[0])
        else:
            out[:, j] = LogisticRegression(C=c, max_iter=1000).fit(x, column).predict_proba(queries)[:, 1]
    return out


def label_probabilities_knn(x, y, queries, num_labels) -> np.ndarray:
    return knn_classify(x, y, queries, num_labels, (20,), 0.07)[20]


MULTI_LABEL_CLASSIFIERS = {"logistic": label_probabilities_logistic, "knn": label_probabilities_knn}


def few_shot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    shots: Sequence[int] = (1, 5, 10),
    seeds: int = 5,
    classifiers: Sequence[str] = ("logistic", "knn"),
    progress: str | None = None,
    max_minutes: float | None = None,
) -> dict:
    """Top-1 per shots value and classifier, over `seeds` draws of the training examples.

    Returns `{"by_shots": {"5": {"top1", "ci95", "n", "logistic": summary, "knn": summary}},
    "classifiers": [...], "seeds": n}`; a summary is `{"top1", "ci95", "std", "n", "by_seed"}`.
    The `top1`, `top1_std`, `ci95`, `n` directly under a shots value are the first classifier's.
    `max_minutes` is a time budget: no draw starts after it, shots values with no draw are left
    out, and `"stopped_by_budget"` says so.
    """
    unknown = sorted(set(classifiers) - set(CLASSIFIERS))
    if unknown or not classifiers:
        raise SSLPipelineError(
            f"few_shot: unknown classifiers {unknown}; choose from {sorted(CLASSIFIERS)}"
        )
    if seeds < 1:
        raise SSLPipelineError(f"few_shot: seeds must be at least 1, got {seeds}")
    train_x, test_x = l2_normalized(train_x), l2_normalized(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    multi = is_multi_label(train_y)  # multi-label: ACC as top-1, and the AUC beside it
    by_shots = {}
    deadline = Deadline(max_minutes)
    out_of_time = False
    for n in shots:
        top1 = {name: [] for name in classifiers}
        aucs = {name: [] for name in classifiers}
        for seed in progress_bar(range(seeds), progress and f"{progress} {n}-shot"):
            out_of_time = deadline.passed
            if out_of_time:
                break
            idx = balanced_subset(train_y, per_class=n, seed=seed)
            for name in classifiers:
                if multi:
                    p = MULTI_LABEL_CLASSIFIERS[name](train_x[idx], train_y[idx], test_x,
                                                      num_classes)
                    metrics = multi_label_metrics(p, test_y, kind="probabilities")
                    top1[name].append(metrics["acc"])
                    aucs[name].append(metrics["auc"])
                    continue
                predictions = CLASSIFIERS[name](train_x[idx], train_y[idx], test_x, num_classes)
                top1[name].append(float((predictions == test_y).mean()))
        if not top1[classifiers[0]]:
            break
        summaries = {name: summarize(values) for name, values in top1.items()}
        if multi:
            for name, values in aucs.items():
                known = [v for v in values if v is not None]
                summaries[name]["auc"] = float(np.mean(known)) if known else None
        first = summaries[classifiers[0]]
        headline = {key: first[key] for key in ("top1", "ci95", "n", "auc") if key in first} \
            | {"top1_std": first["std"]}
        by_shots[str(n)] = {**headline, **summaries}
    return {"by_shots": by_shots, "classifiers": list(classifiers), "seeds": seeds,
            "stopped_by_budget": out_of_time}


VTAB_TRAIN, VTAB_VAL = 800, 200
VTAB_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def vtab_1k(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seeds: int = 5,
    progress: str | None = None,
) -> dict:
    """VTAB-1k on cached features: `{"top1", "ci95", "std", "n", "by_seed", "chosen_C",
    "train", "val"}` (the last two: examples drawn from each split)."""
    train_x, val_x, test_x = l2_normalized(train_x), l2_normalized(val_x), l2_normalized(test_x)
    train_y, val_y, test_y = np.asarray(train_y), np.asarray(val_y), np.asarray(test_y)
    n_train, n_val = min(VTAB_TRAIN, len(train_y)), min(VTAB_VAL, len(val_y))
    top1, chosen = [], []
    for seed in progress_bar(range(seeds), progress and f"{progress} VTAB-1k"):
        rng = np.random.default_rng(seed)
        t = rng.choice(len(train_y), n_train, replace=False)
        v = rng.choice(len(val_y), n_val, replace=False)
        scores = [_vtab_score(c, train_x[t], train_y[t], val_x[v], val_y[v])[0]
                  for c in VTAB_C_GRID]
        c = VTAB_C_GRID[int(np.argmax(scores))]  # ties: the smallest C (strongest regularization)
        x, y = np.concatenate([train_x[t], val_x[v]]), np.concatenate([train_y[t], val_y[v]])
        top1.append(_vtab_score(c, x, y, test_x, test_y)[1])
        chosen.append(c)
    return {**summarize(top1), "chosen_C": chosen, "train": int(n_train), "val": int(n_val)}


def _vtab_score(c: float, x, y, queries, truth) -> tuple[float, float]:
    """(selection score, top-1): accuracy twice; multi-label: (AUC, MedMNIST's ACC)."""
    if is_multi_label(y):
        p = label_probabilities_logistic(x, y, queries, y.shape[1], c)
        metrics = multi_label_metrics(p, truth, kind="probabilities")
        return metrics["auc"] or 0.0, metrics["acc"]
    accuracy = float((_logistic(c, x, y).predict(queries) == truth).mean())
    return accuracy, accuracy


class _Constant:
    def __init__(self, label):
        self.label = label

    def predict(self, queries):
        return np.full(len(queries), self.label)


def _logistic(c: float, x: np.ndarray, y: np.ndarray):
    if len(np.unique(y)) == 1:  # sklearn refuses a single class; the answer is that class
        return _Constant(y[0])
    return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample std and 95% t-interval of per-seed accuracies.

    >>> summarize([0.5, 0.7])["ci95"]
    [0.0, 1.0]
    >>> summarize([0.6, 0.6, 0.6])["ci95"]
    [0.6, 0.6]
    """
    n, mean = len(values), float(np.mean(values))
    std = float(np.std(values, ddof=1)) if n > 1 else 0.0
    ci95 = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * std / np.sqrt(n)
        ci95 = [float(max(0.0, mean - half)), float(min(1.0, mean + half))]
    return {"top1": mean, "ci95": ci95, "std": std, "n": n, "by_seed": [float(v) for v in values]}
