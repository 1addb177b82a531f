"""The evaluation report: what went right and wrong, beyond one accuracy number.

Turns gathered predictions (class probabilities, true labels, token lengths, texts) into a JSON
dict, rich console tables and PNG figures: per-class and averaged precision/recall/F1, accuracy
by text length, the most confidently wrong examples, calibration (ECE and a reliability table),
the confusion matrix and the training curves of the run's log.jsonl.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

from trainer_pkg.console import RunConsole

CALIBRATION_BINS = 15
# Upper bounds (in tokens, special tokens included) of the length buckets; the last is open.
LENGTH_BUCKET_EDGES = (16, 32, 64, 128, 256)
FIGURES = ("confusion_matrix.png", "reliability.png", "training_curves.png")
INSTALL_HINT = "pip install matplotlib"


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # sklearn's convention for an empty denominator (zero_division=0): 0, never NaN.
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def class_scores(predicted: np.ndarray, truth: np.ndarray, names: list[str]) -> dict:
    """Precision/recall/F1/support per class, their macro average, and the micro average."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    hits = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    precision = _divide(hits, confusion.sum(axis=0).astype(np.float64))
    recall = _divide(hits, support.astype(np.float64))
    f1 = _divide(2 * precision * recall, precision + recall)
    total = int(confusion.sum())
    # Single-label: every miss is one false positive and one false negative, so micro
    # precision = micro recall = micro F1 = accuracy. Reported anyway, as users look for it.
    micro = float(hits.sum() / total) if total else 0.0
    return {
        "per_class": [
            {"label": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        ],
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "micro": {"precision": micro, "recall": micro, "f1": micro},
    }


def length_buckets(correct: np.ndarray, lengths: np.ndarray) -> list[dict]:
    """Accuracy per token-length bucket (only buckets that hold examples)."""
    rows = []
    lower = 0
    for upper in (*LENGTH_BUCKET_EDGES, None):
        inside = lengths > lower if upper is None else (lengths > lower) & (lengths <= upper)
        count = int(inside.sum())
        if count:
            name = f"{lower + 1}+" if upper is None else f"{lower + 1}-{upper}"
            rows.append({"tokens": name, "count": count, "accuracy": float(correct[inside].mean())})
        lower = upper or lower
    return rows


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error over equal-width confidence bins, and the reliability table.

    Bin b holds confidences in (b/bins, (b+1)/bins] (the first bin also holds 0);
    ECE = sum over bins of (count / n) * |accuracy - mean confidence|.
    """
    # Compared with the edges the table reports (b / bins), so that "low < confidence <= high"
    # holds for every row of the table, edge values included, without arithmetic on the confidence.
    upper_edges = np.arange(1, bins + 1) / bins
    index = np.minimum(np.searchsorted(upper_edges, confidence, side="left"), bins - 1)
    table, ece, n = [], 0.0, len(confidence)
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        row = {"low": b / bins, "high": (b + 1) / bins, "count": count, "mean_confidence": None, "accuracy": None}
        if count:
            row["mean_confidence"] = float(confidence[inside].mean())
            row["accuracy"] = float(correct[inside].mean())
            ece += count / n * abs(row["accuracy"] - row["mean_confidence"])
        table.append(row)
    return {"ece": float(ece), "bins": table}


def confidently_wrong(probabilities: np.ndarray, truth: np.ndarray, names: list[str], top_k: int,
                      texts: Sequence[str] | None, ids: Sequence | None) -> list[dict]:
    """The top_k errors the model was surest of: usually label noise or a blind spot."""
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != truth)
    # Stable sort on the negated confidence: ties keep input order, so the list is reproducible.
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:top_k]
    rows = []
    for row in worst.tolist():
        entry = {"row": row} if ids is None else {"id": ids[row]}
        if texts is not None:
            entry["text"] = texts[row]
        entry.update(label=names[truth[row]], predicted=names[predicted[row]], probability=float(confidence[row]),
                     probability_of_label=float(probabilities[row, truth[row]]))
        rows.append(entry)
    return rows


def build_report(probabilities: np.ndarray, truth: np.ndarray, names: list[str], lengths: Sequence[int],
                 texts: Sequence[str] | None = None, ids: Sequence | None = None, top_k: int = 10) -> dict:
    """The report's sections, plain JSON-ready values; rows of every array are the same examples."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    correct = predicted == truth
    return {
        **class_scores(predicted, truth, names),
        "accuracy_by_length": length_buckets(correct, np.asarray(lengths)),
        "calibration": calibration(probabilities.max(axis=1), correct),
        "most_confidently_wrong": confidently_wrong(probabilities, truth, names, top_k, texts, ids),
    }


# --- console ------------------------------------------------------------------------------------

def _table(title: str, columns: list[str], rows: list[list[str]], words: int = 1) -> Table:
    """A table whose first `words` columns hold words (left-aligned) and the rest numbers."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < words else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def show_report(console: RunConsole, report: dict) -> None:
    """The report as rich tables (main process only, like every RunConsole output)."""
    if not console.enabled:
        return
    scores = [[c["label"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", f"{c['support']:,}"]
              for c in report["per_class"]]
    total = sum(c["support"] for c in report["per_class"])
    for average in ("macro", "micro"):
        values = report[average]
        scores.append([f"{average} avg", f"{values['precision']:.4f}", f"{values['recall']:.4f}",
                       f"{values['f1']:.4f}", f"{total:,}"])
    console.console.print(_table("per class", ["class", "precision", "recall", "f1", "support"], scores))
    console.console.print(_table("accuracy by length (tokens)", ["tokens", "count", "accuracy"], [
        [b["tokens"], f"{b['count']:,}", f"{b['accuracy']:.4f}"] for b in report["accuracy_by_length"]]))
    calibrated = report["calibration"]
    console.console.print(_table(
        f"calibration: ECE {calibrated['ece']:.4f} ({CALIBRATION_BINS} bins, empty ones hidden)",
        ["confidence", "count", "mean confidence", "accuracy"],
        [[f"{b['low']:.3f}-{b['high']:.3f}", f"{b['count']:,}", f"{b['mean_confidence']:.4f}", f"{b['accuracy']:.4f}"]
         for b in calibrated["bins"] if b["count"]]))
    wrong = report["most_confidently_wrong"]
    if wrong:
        console.console.print(_table("most confidently wrong", ["id", "label", "predicted", "text", "probability"], [
            [str(w.get("id", w.get("row"))), w["label"], w["predicted"], _shorten(w.get("text", ""), 80),
             f"{w['probability']:.4f}"] for w in wrong], words=4))


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


# --- figures ------------------------------------------------------------------------------------

def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    # Agg: compute nodes have no display, and an interactive backend would try to open one.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_confusion_matrix(pyplot, confusion: list[list[int]], names: list[str], path: Path) -> None:
    matrix = np.asarray(confusion, dtype=np.int64)
    totals = matrix.sum(axis=1, keepdims=True)
    # Colour by the share of each true class, so a rare class's errors are as visible as a common one's.
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    size = 2.5 + 0.6 * len(names)
    figure, axes = pyplot.subplots(figsize=(size + 1, size))
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(j, i, f"{count:,}\n{share[i, j]:.1%}", ha="center", va="center",
                  color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"confusion matrix ({int(matrix.sum()):,} examples)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def plot_reliability(pyplot, calibrated: dict, num_classes: int, path: Path) -> None:
    bins = calibrated["bins"]
    width = bins[0]["high"] - bins[0]["low"]
    filled = [b for b in bins if b["count"]]
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                            gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
            color="tab:blue", edgecolor="black", alpha=0.8, label="accuracy")
    top.bar([b["low"] for b in filled], [b["mean_confidence"] - b["accuracy"] for b in filled], width=width,
            bottom=[b["accuracy"] for b in filled], align="edge", facecolor=(0.84, 0.15, 0.16, 0.15), hatch="//",
            edgecolor="tab:red", label="gap to mean confidence")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability diagram (ECE {calibrated['ece']:.4f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar([b["low"] for b in filled], [b["count"] for b in filled], width=width, align="edge",
               color="tab:grey", edgecolor="black")
    bottom.set_yscale("log")
    # Nothing can fall below 1/k, the confidence of a uniform guess: for two classes show 0.5-1 only.
    bottom.set_xlim(np.floor(1 / num_classes / width) * width, 1)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("examples")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def read_log(path: Path) -> list[dict]:
    """The records of a run's log.jsonl; a line cut short by a killed run is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_training_curves(pyplot, records: list[dict], path: Path) -> bool:
    """Loss and validation metrics over optimizer steps; False when the log has no training steps."""
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    validation = [r for r in records if r.get("kind") == "validation" and "step" in r]
    if not train:
        return False
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
    if validation:
        left.plot([r["step"] for r in validation], [r["loss"] for r in validation], marker="o",
                  label="validation loss", color="tab:orange")
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss")
    left.set_title("loss")
    left.legend()
    for key, colour in (("accuracy", "tab:green"), ("f1", "tab:purple"), ("f1_macro", "tab:brown")):
        points = [(r["step"], r[key]) for r in validation if key in r]
        if points:
            right.plot(*zip(*points), marker="o", label=f"validation {key}", color=colour)
    right.set_xlabel("optimizer step")
    right.set_title("validation" if validation else "validation (none logged)")
    if validation:
        right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return True


def figure_paths(report_file: Path) -> list[Path]:
    """The figures beside a report, named after it (two reports in one folder keep their own):
    eval.json -> eval_confusion_matrix.png, eval_reliability.png, eval_training_curves.png."""
    return [report_file.with_name(f"{report_file.stem}_{name}") for name in FIGURES]


def write_figures(metrics: dict, names: list[str], report_file: Path, log_path: Path | None,
                  console: RunConsole) -> list[Path]:
    """The confusion matrix, the reliability diagram and (with a training log) the training curves,
    at figure_paths(report_file)."""
    pyplot = _pyplot()
    if pyplot is None:
        console.print(f"figures skipped: matplotlib is not installed ({INSTALL_HINT})")
        return []
    report_file.parent.mkdir(parents=True, exist_ok=True)
    confusion, reliability, curves = figure_paths(report_file)
    plot_confusion_matrix(pyplot, metrics["confusion_matrix"], names, confusion)
    plot_reliability(pyplot, metrics["calibration"], len(names), reliability)
    written = [confusion, reliability]
    if log_path is not None and log_path.is_file() and plot_training_curves(pyplot, read_log(log_path), curves):
        written.append(curves)
    return written
