"""One comparison for two results of the same model on the same rows, computed in another layout.

Sharded, differently batched or differently threaded runs pad their batches to other lengths,
so the kernels sum in another order and the probabilities differ in the last bits. What is
counted (predictions, labels, confusion matrices, numbers of rows, which rows are the most
confidently wrong) and every function of counts (accuracy, F1, precision, recall, per class,
macro and micro, by length) must agree exactly. Statistics of the probabilities themselves agree
within a tolerance. Runs of the same layout (a resume against its uninterrupted twin) compare
with `==`, not with this.
"""

from __future__ import annotations

import math

# Keys whose values (and everything under them) are computed from probabilities: the loss,
# calibration, and the probabilities a report or a prediction shows.
PROBABILITY_STATISTICS = frozenset({"loss", "ece", "mean_confidence", "probability", "probability_of_label",
                                    "score", "probabilities"})
# A few float32 steps of a probability near 1 (each 6e-8). Rounding in another summation order
# stays far below it; a row lost or counted twice in ~1000 moves the loss or the ECE by ~1e-3
# (and changes the counts, which are compared exactly).
PROBABILITY_TOLERANCE = 1e-6


def result_differences(actual, expected, where: str = "", tolerant: bool = False) -> list[str]:
    """Where `actual` differs from `expected`, one line each; empty when they agree."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or actual.keys() != expected.keys():
            got = sorted(actual) if isinstance(actual, dict) else actual
            return [f"{where or 'result'}: keys {got!r}, expected {sorted(expected)!r}"]
        return [line for key in expected for line in result_differences(
            actual[key], expected[key], f"{where}.{key}", tolerant or key in PROBABILITY_STATISTICS)]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: {actual!r}, expected {expected!r}"]
        return [line for index, (a, e) in enumerate(zip(actual, expected))
                for line in result_differences(a, e, f"{where}[{index}]", tolerant)]
    if tolerant and isinstance(expected, float) and isinstance(actual, float):
        if math.isclose(actual, expected, rel_tol=0, abs_tol=PROBABILITY_TOLERANCE) or \
                (math.isnan(actual) and math.isnan(expected)):
            return []
        return [f"{where}: {actual!r}, expected {expected!r} (beyond {PROBABILITY_TOLERANCE:g})"]
    if type(actual) is not type(expected) or actual != expected:
        return [f"{where}: {actual!r}, expected {expected!r} (exactly)"]
    return []


def assert_same_results(actual, expected) -> None:
    """Counts and functions of counts equal, statistics of probabilities within PROBABILITY_TOLERANCE."""
    differences = result_differences(actual, expected)
    assert not differences, "\n".join(differences[:20]) + (f"\n... {len(differences) - 20} more" if len(differences) > 20 else "")
