"""The evaluation report: numbers against independent computations (sklearn, plain loops), the
figures as real PNG files, and `trainer_pkg.evaluate` writing all of it for a trained export."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_module
from same_results import assert_same_results
from sklearn.metrics import precision_recall_fscore_support

from trainer_pkg.console import RunConsole
from trainer_pkg.report import build_report, figure_paths, show_report, write_figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORIGINAL_KEYS = ("accuracy", "f1", "precision", "recall", "confusion_matrix", "num_samples")


def random_predictions(n: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, size=n)
    logits = rng.normal(size=(n, classes)) + 2.0 * np.eye(classes)[truth] * rng.random((n, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, truth


def ece_by_loop(confidences, correct, bins=15):
    """The textbook definition, one example at a time: bins (b/15, (b+1)/15], 0 in the first."""
    counts, confidence_sums, correct_sums = [0] * bins, [0.0] * bins, [0] * bins
    for confidence, hit in zip(confidences, correct):
        for b in range(bins):
            if b / bins < confidence <= (b + 1) / bins or (b == 0 and confidence == 0):
                counts[b] += 1
                confidence_sums[b] += confidence
                correct_sums[b] += hit
                break
    n = len(confidences)
    ece = sum(counts[b] / n * abs(correct_sums[b] / counts[b] - confidence_sums[b] / counts[b])
              for b in range(bins) if counts[b])
    return ece, counts


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_scores_match_sklearn(classes):
    probabilities, truth = random_predictions(700, classes, seed=classes)
    names = [f"class{i}" for i in range(classes)]
    report = build_report(probabilities, truth, names, lengths=np.full(700, 10))
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=list(range(classes)), zero_division=0)
    assert [c["label"] for c in report["per_class"]] == names
    assert [c["precision"] for c in report["per_class"]] == pytest.approx(precision.tolist(), rel=1e-12)
    assert [c["recall"] for c in report["per_class"]] == pytest.approx(recall.tolist(), rel=1e-12)
    assert [c["f1"] for c in report["per_class"]] == pytest.approx(f1.tolist(), rel=1e-12)
    assert [c["support"] for c in report["per_class"]] == support.tolist()
    for average in ("macro", "micro"):
        expected = precision_recall_fscore_support(truth, predicted, labels=list(range(classes)),
                                                   average=average, zero_division=0)
        assert [report[average][k] for k in ("precision", "recall", "f1")] == pytest.approx(expected[:3], rel=1e-12)
    assert report["micro"]["f1"] == pytest.approx(float((predicted == truth).mean()), rel=1e-12)


def test_a_class_never_predicted_scores_zero_not_nan():
    probabilities = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.6, 0.4, 0.0]])
    report = build_report(probabilities, np.array([0, 2, 1, 2]), ["a", "b", "c"], lengths=[3, 3, 3, 3])
    assert report["per_class"][2] == {"label": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    json.dumps(report, allow_nan=False)


def test_ece_and_reliability_table_match_a_plain_loop():
    probabilities, truth = random_predictions(1000, 3, seed=11)
    # Confidences exactly on bin edges (2/3, 7/15, 1.0) must fall in the bin they close.
    probabilities[:3] = [[2 / 3, 1 / 3, 0.0], [7 / 15, 4 / 15, 4 / 15], [1.0, 0.0, 0.0]]
    report = build_report(probabilities, truth, ["a", "b", "c"], lengths=np.full(1000, 8))
    confidences = probabilities.max(axis=1).tolist()
    correct = (probabilities.argmax(axis=1) == truth).tolist()
    ece, counts = ece_by_loop(confidences, correct)
    calibration = report["calibration"]
    assert calibration["ece"] == pytest.approx(ece, rel=1e-9)
    assert [b["count"] for b in calibration["bins"]] == counts
    assert len(calibration["bins"]) == 15 and calibration["bins"][-1]["high"] == 1.0
    for b in calibration["bins"]:
        inside = [i for i, c in enumerate(confidences) if b["low"] < c <= b["high"] or (b["low"] == 0 and c == 0)]
        if inside:
            assert b["mean_confidence"] == pytest.approx(np.mean([confidences[i] for i in inside]), rel=1e-12)
            assert b["accuracy"] == pytest.approx(np.mean([correct[i] for i in inside]), rel=1e-12)
        else:
            assert b["mean_confidence"] is None and b["accuracy"] is None


def test_length_buckets_and_most_confidently_wrong():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.95, 0.05], [0.4, 0.6], [0.3, 0.7], [0.9, 0.1]])
    truth = np.array([1, 1, 1, 0, 0, 1])
    lengths = [5, 16, 17, 40, 300, 64]
    texts = ["t0", "t1", "t2", "t3", "t4", "t5"]
    report = build_report(probabilities, truth, ["neg", "pos"], lengths, texts=texts, ids=["a", "b", "c", "d", "e", "f"],
                          top_k=3)
    assert report["accuracy_by_length"] == [
        {"tokens": "1-16", "count": 2, "accuracy": 0.5},
        {"tokens": "17-32", "count": 1, "accuracy": 0.0},
        {"tokens": "33-64", "count": 2, "accuracy": 0.0},
        {"tokens": "257+", "count": 1, "accuracy": 0.0},
    ]
    wrong = report["most_confidently_wrong"]
    # Wrong: rows 0 (0.9), 2 (0.95), 3 (0.6), 4 (0.7), 5 (0.9); the top 3, ties in input order.
    assert [w["id"] for w in wrong] == ["c", "a", "f"]
    assert wrong[0] == {"id": "c", "text": "t2", "label": "pos", "predicted": "neg", "probability": 0.95,
                        "probability_of_label": 0.05}
    without_ids = build_report(probabilities, truth, ["neg", "pos"], lengths, top_k=1)["most_confidently_wrong"]
    assert without_ids == [{"row": 2, "label": "pos", "predicted": "neg", "probability": 0.95,
                            "probability_of_label": 0.05}]


def test_user_text_is_printed_as_it_is_not_as_markup(capsys):
    # Rich markup would drop "[run]" as a style and raise on the unmatched "[/b]".
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    report = build_report(probabilities, np.array([1, 0]), ["[neg]", "pos"], [3, 4],
                          texts=["[/b] worst film", "[run] great"], ids=["a", "b"], top_k=2)
    console = RunConsole()
    show_report(console, report)
    console.print("train: /data/[run]/train.tsv")
    console.warn("note on /data/[/x]")
    console.table("plan", {"output_dir": "/out/[/y]"})
    printed = capsys.readouterr().err
    for text in ("[/b] worst", "[run] great", "[neg]", "/data/[run]/train.tsv", "/data/[/x]", "/out/[/y]"):
        assert text in printed, text


def assert_real_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 10, (path, len(colours))


def test_figures_render(tmp_path):
    probabilities, truth = random_predictions(500, 3, seed=3)
    names = ["negative", "neutral", "positive"]
    report = build_report(probabilities, truth, names, lengths=np.arange(500) % 200 + 2)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (truth, predicted), 1)
    log = tmp_path / "log.jsonl"
    records = [{"kind": "data", "rows": {"train": 10}}]
    records += [{"kind": "train", "step": s, "loss": 1 / s} for s in range(5, 101, 5)]
    records += [{"kind": "validation", "step": s, "loss": 2 / s, "accuracy": 1 - 1 / s, "f1": 1 - 2 / s}
                for s in (25, 50, 75, 100)]
    log.write_text("\n".join(map(json.dumps, records)) + '\n{"kind": "train", "st', encoding="utf-8")
    written = write_figures({**report, "confusion_matrix": confusion.tolist()}, names, tmp_path / "figures" / "r.json",
                            log, RunConsole(enabled=False))
    assert [path.name for path in written] == ["r_confusion_matrix.png", "r_reliability.png", "r_training_curves.png"]
    for path in written:
        assert_real_png(path)


def test_without_matplotlib_figures_are_skipped_with_one_line(tmp_path):
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from pathlib import Path\n"
        "from trainer_pkg.console import RunConsole\n"
        "from trainer_pkg.report import write_figures\n"
        "print(write_figures({}, ['a', 'b'], Path(sys.argv[1]) / 'r.json', None, RunConsole()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert result.stderr.strip() == "figures skipped: matplotlib is not installed (pip install matplotlib)"
    assert not list(tmp_path.iterdir())


def read_rows(path):
    with open(path, encoding="utf-8") as file:
        return {row[0]: row for row in list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]}


def test_evaluate_writes_the_report_json_tables_and_figures(tiny_run, tiny_nsmc, cache_env, tmp_path):
    test_file = tiny_nsmc / "ratings_test.txt"
    output = tmp_path / "report" / "eval.json"
    result = run_module("trainer_pkg.evaluate", tiny_run / "model", "--test_file", test_file, "--output", output,
                        env=cache_env)
    report = json.loads(output.read_text())
    assert json.loads(result.stdout) == report
    for key in ORIGINAL_KEYS:
        assert key in report, key
    n = report["num_samples"]
    assert n == 301
    assert [c["f1"] for c in report["per_class"]] == report["f1_per_class"]
    assert report["micro"]["f1"] == pytest.approx(report["accuracy"], rel=1e-12)
    assert sum(b["count"] for b in report["accuracy_by_length"]) == n
    assert sum(b["count"] for b in report["calibration"]["bins"]) == n
    errors = n - int(np.trace(np.array(report["confusion_matrix"])))
    wrong = report["most_confidently_wrong"]
    assert len(wrong) == min(10, errors)
    rows = read_rows(test_file)
    labels = report["labels"]
    for entry in wrong:
        row = rows[entry["id"]]
        assert entry["text"] == row[1] and entry["label"] == labels[int(row[2])] and entry["predicted"] != entry["label"]
    assert [w["probability"] for w in wrong] == sorted((w["probability"] for w in wrong), reverse=True)
    for title in ("per class", "accuracy by length", "calibration: ECE", "wrote"):
        assert title in result.stderr, title
    for path in figure_paths(output):
        assert_real_png(path)
    # A second report in the same folder keeps its own figures.
    run_module("trainer_pkg.evaluate", tiny_run / "model", "--test_file", test_file, "--output",
               output.with_name("other.json"), env=cache_env)
    assert all(path.is_file() for path in figure_paths(output) + figure_paths(output.with_name("other.json")))

    # Training ended with the same report on the same test set, and its figures in the run directory.
    in_run = json.loads((tiny_run / "test_report.json").read_text())
    assert_same_results({key: report[key] for key in in_run}, in_run)
    for path in figure_paths(tiny_run / "test_report.json"):
        assert_real_png(path)
