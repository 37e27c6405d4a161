"""classification_metrics against small examples computed by hand."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals.metrics import classification_metrics


def one_hot_scores(predictions, num_classes) -> np.ndarray:
    return np.eye(num_classes)[predictions]


def test_three_classes_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(one_hot_scores(predictions, 3), labels, ["cat", "dog", "eel"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1 per class: 2PR/(P+R) with (P, R) = (1, 2/3), (1/2, 1/2), (1/2, 1)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["class_names"] == ["cat", "dog", "eel"] and m["num_samples"] == 6
    assert "top5" not in m  # fewer than ten classes


def test_top5_with_ten_classes():
    scores = np.tile(np.arange(10.0)[::-1], (3, 1))  # every row ranks 0, 1, ..., 9
    m = classification_metrics(scores, np.array([0, 4, 5]))
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx(2 / 3)  # class 4 is ranked fifth, class 5 sixth


def test_a_class_without_examples_has_no_accuracy_and_does_not_count_in_balanced():
    labels = np.array([0, 0, 1, 1])
    m = classification_metrics(one_hot_scores([0, 2, 1, 1], 3), labels)
    assert m["per_class_accuracy"] == [0.5, 1.0, None]
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that class 2 is predicted but absent
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, [0, 2, 1, 1]))


def test_result_is_plain_json():
    rng = np.random.default_rng(0)
    m = classification_metrics(rng.normal(size=(50, 12)).astype(np.float32), rng.integers(0, 12, 50))
    assert json.loads(json.dumps(m)) == m
    assert all(type(m[key]) is float for key in ("top1", "top5", "balanced_accuracy", "macro_f1"))
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)


@pytest.mark.parametrize(
    "scores, labels, names",
    [(np.zeros((3, 2)), np.array([0, 1]), None), (np.zeros((2, 2)), np.array([0, 2]), None),
     (np.zeros((2, 2)), np.array([0, 1]), ["only one"])],
)
def test_mismatched_inputs_are_a_user_error(scores, labels, names):
    with pytest.raises(SSLPipelineError):
        classification_metrics(scores, labels, names)
