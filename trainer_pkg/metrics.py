"""Classification metrics from gathered predictions, with the `evaluate` library, offline.

`evaluate.load("accuracy")` fetches metric code from the hub, which compute nodes and CI cannot
reach. The metric is defined here as an `evaluate.Metric` subclass instead: the same API and
arrow-backed accumulation, no download.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy, precision, recall, F1 and the confusion matrix of a single-label classifier."
_INPUTS = """
predictions: predicted label ids; references: true label ids; num_labels: number of classes.
For two classes, precision/recall/f1 are those of class 1 (binary); otherwise macro averages.
"""


class ClassificationMetrics(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels: int) -> dict:
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


def classification_metrics(predictions, references, num_labels: int) -> dict:
    """All metrics for one set of predictions (call on every rank with the gathered arrays)."""
    metric = ClassificationMetrics(keep_in_memory=True)
    return metric.compute(predictions=predictions, references=references, num_labels=num_labels)
