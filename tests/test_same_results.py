"""The comparison of results across batch layouts (tests/same_results.py): it passes rounding in
the probabilities and fails on anything counted."""

from __future__ import annotations

import copy

import pytest
from same_results import PROBABILITY_TOLERANCE, assert_same_results

pytestmark = pytest.mark.fast  # make test-fast

REPORT = {
    "accuracy": 0.75, "f1": 0.8, "confusion_matrix": [[3, 1], [1, 4]], "num_samples": 9, "loss": 0.5123456789,
    "per_class": [{"label": "neg", "precision": 0.75, "support": 4}],
    "calibration": {"ece": 0.07266697818200316, "bins": [{"count": 9, "mean_confidence": 0.81, "accuracy": 7 / 9},
                                                         {"count": 0, "mean_confidence": None, "accuracy": None}]},
    "most_confidently_wrong": [{"id": "c", "probability": 0.95, "probability_of_label": 0.05}],
    "predictions": [{"id": "r1", "label": "pos", "score": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}],
}


def changed(path: list, value):
    report = copy.deepcopy(REPORT)
    place = report
    for key in path[:-1]:
        place = place[key]
    place[path[-1]] = value
    return report


@pytest.mark.parametrize("path, value", [
    (["calibration", "ece"], 0.07266697819773257),  # what a sharded evaluation differed by on one host
    (["loss"], 0.5123456789 + 3e-7),
    (["calibration", "bins", 0, "mean_confidence"], 0.81 + 1e-11),
    (["most_confidently_wrong", 0, "probability"], 0.95 - 1e-7),
    (["predictions", 0, "probabilities", "neg"], 0.1 + 1e-8),
])
def test_rounding_in_the_probabilities_passes(path, value):
    assert_same_results(changed(path, value), REPORT)


@pytest.mark.parametrize("path, value", [
    (["accuracy"], 0.75 + 1e-12),  # a function of counts: exact
    (["confusion_matrix", 0, 1], 2),
    (["num_samples"], 10),
    (["per_class", 0, "support"], 5),
    (["calibration", "bins", 0, "count"], 8),
    (["most_confidently_wrong", 0, "id"], "d"),
    (["predictions", 0, "label"], "neg"),
    (["loss"], 0.5123456789 + 10 * PROBABILITY_TOLERANCE),
    (["calibration", "ece"], float("nan")),
    (["calibration", "bins", 1, "mean_confidence"], 0.5),  # an empty bin filled
])
def test_a_count_or_a_real_difference_fails(path, value):
    with pytest.raises(AssertionError, match=str(path[-1])):
        assert_same_results(changed(path, value), REPORT)


def test_a_missing_key_or_row_fails():
    without_loss = {key: value for key, value in REPORT.items() if key != "loss"}
    with pytest.raises(AssertionError, match="keys"):
        assert_same_results(without_loss, REPORT)
    with pytest.raises(AssertionError, match="predictions"):
        assert_same_results({**REPORT, "predictions": REPORT["predictions"] * 2}, REPORT)
