"""Experiment tracking: a real run's TensorBoard events read back, and clear errors for trackers
that are asked for but not installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from conftest import run_module, tiny_train_args

from trainer_pkg.config import TrainConfig, load_config
from trainer_pkg.errors import UserError
from trainer_pkg.tracking import resolve_trackers, tracking_line


def log_records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_tensorboard_holds_the_logged_scalars_and_the_config(tiny_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dirs = [p for p in (tiny_run / "tensorboard").iterdir() if p.is_dir()]
    assert [p.name for p in run_dirs] == ["trainer_pkg"]
    events = EventAccumulator(str(run_dirs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "validation/accuracy", "validation/f1",
                "validation/loss", "test/accuracy", "test/f1", "test/loss"):
        assert tag in tags, (tag, sorted(tags))
    assert not any(tag.endswith(("/step", "/epoch", "/time")) for tag in tags)

    train = log_records(tiny_run, "train")
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in train]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    validation = log_records(tiny_run, "validation")
    assert [e.step for e in events.Scalars("validation/accuracy")] == [r["step"] for r in validation]
    test = json.loads((tiny_run / "metrics.json").read_text())["test"]
    (final,) = events.Scalars("test/accuracy")
    assert final.step == 45 and final.value == pytest.approx(test["accuracy"], rel=1e-6)

    # The resolved configuration, as hyperparameters (Accelerate also keeps them as YAML).
    (hparams,) = (tiny_run / "tensorboard" / "trainer_pkg").glob("*/hparams.yml")
    stored = yaml.safe_load(hparams.read_text())
    assert stored["lr"] == 3e-3 and stored["max_steps"] == 45 and stored["labels"] == "negative,positive"


def test_report_to_resolves_and_rejects_unknown_names():
    assert resolve_trackers(["none"]) == []
    assert resolve_trackers(["auto", "none"]) == []
    expected = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    assert resolve_trackers(["auto"]) == expected
    assert load_config(["--report_to", "none"]).report_to == ["none"]
    with pytest.raises(UserError, match="report_to must list some of auto, none, tensorboard, wandb, mlflow"):
        load_config(["--report_to", "tensorboard,wandbb"])


def test_the_run_says_where_its_numbers_go(tmp_path):
    tensorboard_dir = tmp_path / "run" / "tensorboard"
    auto = TrainConfig(report_to=["auto"], output_dir=str(tmp_path / "run"))
    assert tracking_line([], auto, tensorboard_dir) == (
        "tracking: --report_to auto found no TensorBoard (pip install tensorboard); the numbers are in "
        f"{tmp_path / 'run' / 'log.jsonl'}")
    assert "--report_to none" in tracking_line([], TrainConfig(report_to=["none"]), tensorboard_dir)
    assert f"TensorBoard in {tensorboard_dir} (tensorboard --logdir {tensorboard_dir})" in tracking_line(
        ["tensorboard"], auto, tensorboard_dir)


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_named_in_one_line(tracker):
    if importlib.util.find_spec(tracker):
        pytest.skip(f"{tracker} is installed")
    with pytest.raises(UserError) as error:
        resolve_trackers(["tensorboard", tracker])
    assert str(error.value) == (f"--report_to {tracker}: the {tracker} package is not installed; "
                                f"pip install {tracker}, or pass --report_to none")


def test_training_with_a_missing_tracker_stops_before_any_work(tiny_model, tiny_nsmc, cache_env, tmp_path):
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed")
    output_dir = tmp_path / "out"
    result = run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--report_to", "wandb"),
                        env=cache_env, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --report_to wandb: the wandb package is not installed; pip install wandb, "
                     "or pass --report_to none"]
    assert not output_dir.exists()
