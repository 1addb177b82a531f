"""The whole job on a tiny model, through the real command-line entry points:
train (checkpoints, best-model export) -> evaluate -> predict -> transformers.pipeline."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import run_commands, run_module, tiny_train_args
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tiny_nsmc, cache_env):
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = run_module("trainer_pkg.train", *tiny_train_args(
        tiny_model, tiny_nsmc, output_dir, "--epochs", "2", "--eval_every", "25", "--save_every", "10",
        "--keep_checkpoints", "2"), env=cache_env, cold_start=True)
    return output_dir, result


def read_labels(path):
    with open(path, encoding="utf-8") as file:
        rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:]


@pytest.mark.fast
def test_train_writes_checkpoints_log_and_export(trained):
    output_dir, result = trained
    checkpoints = output_dir / "checkpoints"
    latest = (checkpoints / "latest").read_text().strip()
    state = json.loads((checkpoints / latest / "trainer_state.json").read_text())
    # 1000 training rows / batch 16 = 63 steps per epoch, 2 epochs.
    assert state["optimizer_steps"] == 126
    assert state["epoch"] == 2 and state["batches_in_epoch"] == 0
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    assert latest in kept and state["best_checkpoint"] in kept
    assert len(kept) <= 3, kept  # last 2 + the best
    assert not list(checkpoints.glob(".tmp-*"))

    log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    kinds = [record["kind"] for record in log]
    # Every 25 steps, at the end of epoch 1 (step 63), and at the end.
    assert [r["step"] for r in log if r["kind"] == "validation"] == [25, 50, 63, 75, 100, 125, 126]
    assert kinds[-1] == "test"
    best_steps = [r["step"] for r in log if r["kind"] == "validation" and r["best"]]
    assert log[-1]["step"] == best_steps[-1]  # the test score is the best checkpoint's
    train_losses = [r["loss"] for r in log if r["kind"] == "train"]
    # The last window is one step (126 = 125 + 1), its batch the epoch's 8-row remainder: too noisy
    # to stand alone, so the last three windows are compared with the first.
    assert sum(train_losses[-3:]) / 3 < train_losses[0] / 2

    export = output_dir / "model"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    model_config = json.loads((export / "config.json").read_text())
    assert model_config["id2label"] == {"0": "negative", "1": "positive"}
    assert yaml.safe_load((export / "training_config.yaml").read_text())["lr"] == 3e-3
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["best_checkpoint"] == state["best_checkpoint"]
    assert metrics["test"]["num_samples"] == 301
    assert metrics["test"]["accuracy"] >= 0.9, metrics["test"]
    # The export holds the best checkpoint's weights, not the last step's.
    best = load_file(checkpoints / state["best_checkpoint"] / "model.safetensors")
    exported = load_file(export / "model.safetensors")
    assert all((best[name] == exported[name]).all() for name in exported)
    assert "error" not in result.stderr.lower()


def test_evaluate_matches_recomputation_from_predict(trained, tiny_nsmc, cache_env, tmp_path):
    output_dir, _ = trained
    test_file = tiny_nsmc / "ratings_test.txt"
    run_module("trainer_pkg.evaluate", output_dir / "model", "--test_file", test_file,
               "--output", tmp_path / "eval.json", env=cache_env)
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    run_module("trainer_pkg.predict", output_dir / "model", "--input", test_file,
               "--output", tmp_path / "pred.jsonl", env=cache_env)
    predictions = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    rows = read_labels(test_file)
    assert [p["id"] for p in predictions] == [row[0] for row in rows]
    truth = [int(row[2]) for row in rows]
    predicted = [p["label_id"] for p in predictions]
    assert evaluated["num_samples"] == len(rows)
    assert evaluated["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=0)
    assert evaluated["f1"] == pytest.approx(f1_score(truth, predicted), rel=1e-12)
    assert evaluated["precision"] == pytest.approx(precision_score(truth, predicted), rel=1e-12)
    assert evaluated["recall"] == pytest.approx(recall_score(truth, predicted), rel=1e-12)
    assert evaluated["confusion_matrix"] == confusion_matrix(truth, predicted).tolist()
    # ...and the numbers the training run reported for the same test set.
    in_run = json.loads((output_dir / "metrics.json").read_text())["test"]
    assert evaluated["accuracy"] == in_run["accuracy"]
    assert evaluated["confusion_matrix"] == in_run["confusion_matrix"]


def test_evaluate_a_checkpoint_uses_the_runs_test_data(trained, cache_env, tmp_path):
    output_dir, _ = trained
    checkpoints = output_dir / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    result = run_module("trainer_pkg.evaluate", latest, "--output", tmp_path / "m.json", env=cache_env)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_samples"] == 301
    assert json.loads(result.stdout)["accuracy"] == metrics["accuracy"]


def test_pipeline_loads_the_export_and_agrees_with_predict(trained, cache_env, tmp_path):
    from transformers import pipeline

    output_dir, _ = trained
    texts = ["좋아 최고 great", "별로 최악 boring", "그냥 그래요", ""]
    result = run_module("trainer_pkg.predict", output_dir / "model", *texts, env=cache_env)
    predicted = [json.loads(line) for line in result.stdout.splitlines()]
    classifier = pipeline("text-classification", model=str(output_dir / "model"), device="cpu")
    piped = classifier(texts)
    assert [p["label"] for p in predicted] == [p["label"] for p in piped]
    assert [p["score"] for p in predicted] == pytest.approx([p["score"] for p in piped], abs=1e-5)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_output_dir_holding_another_run_is_refused(trained, tiny_model, tiny_nsmc, cache_env):
    output_dir, _ = trained
    before = (output_dir / "checkpoints" / "latest").read_text()
    result = run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir),
                        env=cache_env, check=False)
    message = one_line_error(result)
    assert str(output_dir) in message and "--resume" in message and "--overwrite_output_dir" in message
    assert (output_dir / "checkpoints" / "latest").read_text() == before


@pytest.mark.parametrize("case", ["missing_data_dir", "no_weights", "unknown_label", "missing_test_file"])
def test_bad_inputs_give_one_line_errors(case, tiny_model, tiny_nsmc, cache_env, tmp_path):
    args = tiny_train_args(tiny_model, tiny_nsmc, tmp_path / "out", from_scratch=case != "no_weights")
    expected = {}
    if case == "missing_data_dir":
        args[args.index("--data") + 1] = str(tmp_path / "nowhere")
        expected = {"nowhere", "no such directory"}
    elif case == "no_weights":
        expected = {"--from_scratch", str(tiny_model)}
    elif case == "unknown_label":
        bad = tmp_path / "bad.tsv"
        # The classes come from the training file (NSMC's two); the test file has a third.
        bad.write_text("id\tdocument\tlabel\n1\tgood\t1\n2\tbad\t0\n3\tstrange\t2\n", encoding="utf-8")
        args += ["--test_file", str(bad)]
        expected = {str(bad), "line 4", "'2'"}
    elif case == "missing_test_file":
        args += ["--test_file", str(tmp_path / "missing.tsv")]
        expected = {"missing.tsv", "not found"}
    message = one_line_error(run_module("trainer_pkg.train", *args, env=cache_env, check=False))
    for fragment in expected:
        assert fragment in message, message


def test_evaluate_rejects_a_directory_that_is_not_a_model(tmp_path, cache_env):
    message = one_line_error(run_module("trainer_pkg.evaluate", tmp_path, env=cache_env, check=False))
    assert "config.json" in message


def test_a_default_batch_that_leaves_few_steps_per_epoch_says_so(tiny_model, tiny_nsmc, cache_env, tmp_path):
    args = tiny_train_args(tiny_model, tiny_nsmc, tmp_path / "default", "--max_steps", "2")
    at = args.index("--per_device_batch_size")
    default_batch = args[:at] + args[at + 2:]
    runs = run_commands({"default": ["trainer_pkg.train", *default_batch],
                         "chosen": ["trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, tmp_path / "chosen",
                                                                           "--max_steps", "2")]},
                        cache_env, tmp_path / "runs")
    assert all(result.returncode == 0 for result in runs.values()), {n: r.stderr[-2000:] for n, r in runs.items()}
    shown = {name: " ".join(result.stderr.split()) for name, result in runs.items()}
    # 1,000 training rows at the from-scratch default of 64: 16 steps per epoch.
    assert "only 16 optimizer steps per epoch at the default global batch (64)" in shown["default"], shown["default"]
    assert "optimizer steps per epoch at the default" not in shown["chosen"]


def test_early_stopping_ends_training_after_patience_validations_without_a_better_score(tiny_model, tiny_nsmc,
                                                                                        cache_env, tmp_path):
    # A learning rate too small to change a prediction: the first validation stays the best.
    output_dir = tmp_path / "patient"
    result = run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--lr", "1e-12",
                                                              "--eval_every", "2", "--early_stopping_patience", "2",
                                                              "--report_to", "none"), env=cache_env)
    metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["stopped_early"] is True
    assert metrics["optimizer_steps"] == 6  # validations at 2 (best), 4 and 6 (no better: two in a row)
    assert metrics["best_checkpoint"] == "step-00000002"
    assert "early stopping at step 6: 2 validations without a better accuracy" in " ".join(result.stderr.split())
    assert (output_dir / "model" / "model.safetensors").is_file()
