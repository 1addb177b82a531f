"""classification_metrics against scikit-learn, the reference implementation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as sk

from trainer_pkg.metrics import classification_metrics

pytestmark = pytest.mark.fast  # make test-fast

REL = 1e-12


def sklearn_reference(predictions, references, num_labels: int) -> dict:
    labels = list(range(num_labels))
    average = "binary" if num_labels == 2 else "macro"
    common = dict(y_true=references, y_pred=predictions, zero_division=0)
    per_class = dict(labels=labels, average=None, **common)
    if num_labels == 2:
        scored = dict(pos_label=1, average="binary", **common)
    else:
        scored = dict(labels=labels, average=average, **common)
    return {
        "accuracy": sk.accuracy_score(references, predictions),
        "precision": sk.precision_score(**scored),
        "recall": sk.recall_score(**scored),
        "f1": sk.f1_score(**scored),
        "f1_macro": sk.f1_score(labels=labels, average="macro", **common),
        "precision_per_class": sk.precision_score(**per_class).tolist(),
        "recall_per_class": sk.recall_score(**per_class).tolist(),
        "f1_per_class": sk.f1_score(**per_class).tolist(),
        "confusion_matrix": sk.confusion_matrix(references, predictions, labels=labels).tolist(),
        "num_samples": len(references),
    }


def assert_matches_sklearn(result: dict, predictions, references, num_labels: int) -> None:
    expected = sklearn_reference(predictions, references, num_labels)
    assert set(expected) <= set(result)
    for key in ("accuracy", "precision", "recall", "f1", "f1_macro"):
        assert isinstance(result[key], float), key
        assert not math.isnan(result[key]), key
        assert result[key] == pytest.approx(expected[key], rel=REL, abs=0), key
    for key in ("precision_per_class", "recall_per_class", "f1_per_class"):
        assert len(result[key]) == num_labels
        assert result[key] == pytest.approx(expected[key], rel=REL, abs=0), key
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert result["num_samples"] == expected["num_samples"]
    assert type(result["num_samples"]) is int


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, 2, size=501)
    # Better than chance, so precision/recall/f1 are not all near 0.5.
    predictions = np.where(rng.random(501) < 0.7, references, rng.integers(0, 2, size=501))
    result = classification_metrics(predictions, references, num_labels=2)
    assert_matches_sklearn(result, predictions, references, 2)
    # Binary precision/recall/f1 are those of class 1, not macro averages.
    assert result["precision"] == result["precision_per_class"][1]
    assert result["f1"] != pytest.approx(result["f1_macro"], rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_three_classes_macro_matches_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    references = rng.integers(0, 3, size=400)
    predictions = np.where(rng.random(400) < 0.5, references, rng.integers(0, 3, size=400))
    result = classification_metrics(predictions, references, num_labels=3)
    assert_matches_sklearn(result, predictions, references, 3)
    assert result["f1"] == pytest.approx(result["f1_macro"], rel=REL)
    assert result["precision"] == pytest.approx(float(np.mean(result["precision_per_class"])), rel=REL)


def test_accepts_lists_and_arrays_alike():
    references = [0, 1, 1, 0, 1, 1, 0, 0, 1]
    predictions = [0, 1, 0, 0, 1, 1, 1, 0, 1]
    from_lists = classification_metrics(predictions, references, num_labels=2)
    from_arrays = classification_metrics(np.array(predictions), np.array(references, dtype=np.int32), num_labels=2)
    assert from_lists == from_arrays
    assert from_lists["accuracy"] == 7 / 9
    assert from_lists["confusion_matrix"] == [[3, 1], [1, 4]]
    assert from_lists["precision"] == 4 / 5 and from_lists["recall"] == 4 / 5
    json.dumps(from_lists)  # plain Python values: written to metrics.json and logs


def test_class_never_predicted_gives_zero_precision_not_nan():
    references = [0, 1, 1, 0, 1, 0, 1, 1]
    predictions = [0] * len(references)  # class 1 never predicted
    result = classification_metrics(predictions, references, num_labels=2)
    assert result["precision"] == 0.0 and result["recall"] == 0.0 and result["f1"] == 0.0
    assert result["precision_per_class"] == [pytest.approx(3 / 8, rel=REL), 0.0]
    assert not any(math.isnan(v) for key in ("precision_per_class", "recall_per_class", "f1_per_class")
                   for v in result[key])
    assert result["accuracy"] == 3 / 8
    assert_matches_sklearn(result, predictions, references, 2)


def test_class_absent_from_references_and_predictions():
    # Class 2 never occurs: per-class scores 0, macro averages over all num_labels classes
    # (sklearn with labels=range(num_labels)), never NaN.
    references = [0, 1, 1, 0, 1, 0]
    predictions = [0, 1, 0, 0, 1, 1]
    result = classification_metrics(predictions, references, num_labels=3)
    assert result["precision_per_class"][2] == 0.0 and result["recall_per_class"][2] == 0.0
    assert result["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert_matches_sklearn(result, predictions, references, 3)


def test_perfect_and_all_wrong():
    references = [0, 1, 2, 2, 1, 0, 2]
    perfect = classification_metrics(references, references, num_labels=3)
    assert perfect["accuracy"] == 1.0 and perfect["f1"] == 1.0 and perfect["f1_macro"] == 1.0
    wrong = classification_metrics([(r + 1) % 3 for r in references], references, num_labels=3)
    assert wrong["accuracy"] == 0.0 and wrong["f1"] == 0.0
    assert np.trace(np.array(wrong["confusion_matrix"])) == 0


@pytest.mark.parametrize("n", [1, 37, 1000])
def test_num_samples(n):
    rng = np.random.default_rng(n)
    references = rng.integers(0, 2, size=n)
    predictions = rng.integers(0, 2, size=n)
    result = classification_metrics(predictions, references, num_labels=2)
    assert result["num_samples"] == n
    assert sum(map(sum, result["confusion_matrix"])) == n


def test_empty_input_is_zero_not_nan():
    result = classification_metrics([], [], num_labels=2)
    assert result["num_samples"] == 0
    assert result["accuracy"] == 0.0 and result["f1"] == 0.0
    assert result["confusion_matrix"] == [[0, 0], [0, 0]]
