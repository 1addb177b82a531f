"""Classification metrics of gathered predictions: accuracy, precision, recall, F1, the confusion matrix.

Plain numpy on the arrays every rank already holds after gathering. The `evaluate` library's
natural use, loading a metric by name (`evaluate.load("accuracy")`), fetches code from the hub,
which compute nodes and CI cannot reach; wrapping these lines in an `evaluate.Metric` would add
an Arrow round trip and nothing else.
"""

from __future__ import annotations

import numpy as np


def classification_metrics(predictions, references, num_labels: int) -> dict:
    """All metrics for one set of predictions (call on every rank with the gathered arrays).

    For two classes, precision/recall/f1 are those of class 1 (binary); otherwise macro averages."""
    predictions = np.asarray(predictions, dtype=np.int64)
    references = np.asarray(references, dtype=np.int64)
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (references, predictions), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    # sklearn's convention for an empty denominator: the score is 0, not NaN.
    precision = np.divide(true_positive, predicted, out=np.zeros(num_labels), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros(num_labels), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(num_labels), where=both > 0)
    total = int(confusion.sum())
    result = {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "f1_macro": float(f1.mean()),
        "precision_per_class": precision.tolist(),
        "recall_per_class": recall.tolist(),
        "f1_per_class": f1.tolist(),
        "confusion_matrix": confusion.tolist(),
        "num_samples": total,
    }
    if num_labels == 2:
        result.update(precision=float(precision[1]), recall=float(recall[1]), f1=float(f1[1]))
    else:
        result.update(precision=float(precision.mean()), recall=float(recall.mean()), f1=float(f1.mean()))
    return result
