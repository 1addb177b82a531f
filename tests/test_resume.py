"""Exact resume: a run killed (SIGKILL) and resumed with --resume ends with the same weights and
metrics as the same run left alone, wherever the kill lands: mid-epoch after a checkpoint,
between two steps, during an evaluation, or in the middle of writing a checkpoint.

The moments are found by watching the files the run writes (log.jsonl records, checkpoint
directories), never by sleeping."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_module, tiny_train_args
from safetensors.torch import load_file

# 1000 training rows, batch 8 x accumulation 2: 63 steps per epoch, 126 in all. Small evaluation
# batches make an evaluation last long enough (about 50 forward passes) to be caught in the act.
EXTRA = ["--epochs", "2", "--eval_every", "40", "--save_every", "7", "--per_device_batch_size", "8",
         "--grad_accum", "2", "--eval_batch_size", "4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, tiny_nsmc, cache_env) -> Path:
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, *EXTRA), env=cache_env)
    return output_dir


def assert_same_result(reference: Path, resumed: Path) -> None:
    expected = load_file(reference / "model" / "model.safetensors")
    actual = load_file(resumed / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert (expected[name] == actual[name]).all(), name
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    resumed_metrics = json.loads((resumed / "metrics.json").read_text())
    assert resumed_metrics["test"] == reference_metrics["test"]
    assert resumed_metrics["validation"] == reference_metrics["validation"]
    assert resumed_metrics["best_checkpoint"] == reference_metrics["best_checkpoint"]


def start(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "trainer_pkg.train", *map(str, args)], env=env, cwd=REPO,
                                stdout=log, stderr=log)


def wait_until(process: subprocess.Popen, condition, timeout: float = 300, interval: float = 0.005) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment to kill it came"
        assert time.time() < deadline, "timed out waiting for the moment to kill the run"
        time.sleep(interval)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def log_records(output_dir: Path, kind: str) -> list[dict]:
    path = output_dir / "log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written right now
            continue
        if record["kind"] == kind:
            records.append(record)
    return records


def latest(output_dir: Path) -> str:
    return (output_dir / "checkpoints" / "latest").read_text().strip()


def test_killed_and_resumed_run_matches_uninterrupted(reference, tmp_path, tiny_model, tiny_nsmc, cache_env):
    interrupted = tmp_path / "interrupted"
    args = tiny_train_args(tiny_model, tiny_nsmc, interrupted, *EXTRA)
    process = start(args, cache_env, tmp_path / "run.log")
    # Kill once a mid-epoch checkpoint (past the first one) is published.
    pointer = interrupted / "checkpoints" / "latest"
    wait_until(process, lambda: pointer.is_file() and pointer.read_text().strip() >= "step-00000014", interval=0.02)
    kill(process)
    assert not (interrupted / "model").exists(), "the run finished before it could be killed"
    resumed_from = json.loads((interrupted / "checkpoints" / latest(interrupted) / "trainer_state.json").read_text())
    assert 0 < resumed_from["batches_in_epoch"] < 125, resumed_from

    run_module("trainer_pkg.train", *args, "--resume", env=cache_env)
    assert_same_result(reference, interrupted)


def test_killed_between_steps_during_evaluation_and_while_saving(reference, tmp_path, tiny_model, tiny_nsmc,
                                                                  cache_env):
    output_dir = tmp_path / "run"
    checkpoints = output_dir / "checkpoints"
    args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, *EXTRA)
    run_log = tmp_path / "run.log"

    # 1. Between two steps: step 20 is logged, checkpoints come at 14 and 21.
    process = start(args, cache_env, run_log)
    wait_until(process, lambda: any(r["step"] >= 20 for r in log_records(output_dir, "train")))
    kill(process)
    assert latest(output_dir) == "step-00000014"

    # 2. During an evaluation: step 40 is logged, its evaluation runs, and its record comes after.
    process = start([*args, "--resume"], cache_env, run_log)
    wait_until(process, lambda: any(r["step"] == 40 for r in log_records(output_dir, "train")))
    kill(process)
    assert not [r for r in log_records(output_dir, "validation") if r["step"] == 40], "killed after the evaluation"
    assert not (checkpoints / ".tmp-step-00000040").exists() and latest(output_dir) == "step-00000035"

    # 3. While a checkpoint is being written: freeze the run the moment its temporary directory
    # appears; kill it if the directory is still incomplete, else let it go on to the next one.
    process = start([*args, "--resume"], cache_env, run_log)
    caught = None
    deadline = time.time() + 300
    while caught is None:
        assert process.poll() is None and time.time() < deadline, "no checkpoint write was caught"
        partial = list(checkpoints.glob(".tmp-step-*"))
        if not partial:
            time.sleep(0.001)
            continue
        process.send_signal(signal.SIGSTOP)
        if partial[0].is_dir() and not (partial[0] / "trainer_state.json").exists():
            caught = partial[0]
        else:
            process.send_signal(signal.SIGCONT)
            wait_until(process, lambda: not partial[0].exists())
    kill(process)
    assert caught.is_dir() and not (caught / "trainer_state.json").exists()
    assert latest(output_dir) < caught.name.removeprefix(".tmp-")  # never published

    # 4. To the end.
    run_module("trainer_pkg.train", *args, "--resume", env=cache_env)
    assert_same_result(reference, output_dir)
    assert not list(checkpoints.glob(".tmp-*")) and not list(checkpoints.glob(".trash-*"))
    assert os.listdir(checkpoints)


def test_ctrl_c_checkpoints_at_the_next_step_and_resume_matches(reference, tmp_path, tiny_model, tiny_nsmc, cache_env):
    output_dir = tmp_path / "run"
    args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, *EXTRA)
    # A random moment: after a random logged step (every step is logged here, between checkpoints too).
    moment = random.Random().randint(1, 120)
    process = start([*args, "--log_every", "1"], cache_env, tmp_path / "run.log")
    wait_until(process, lambda: any(r["step"] >= moment for r in log_records(output_dir, "train")))
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 75, (moment, (tmp_path / "run.log").read_text()[-2000:])
    log = (tmp_path / "run.log").read_text()
    assert "Ctrl-C: saving a checkpoint at the next step" in log and "SIGINT: checkpoint at step" in log
    stopped_at = json.loads((output_dir / "checkpoints" / latest(output_dir) / "trainer_state.json").read_text())
    assert stopped_at["optimizer_steps"] >= moment, moment

    # No flags but the directory: --resume continues the saved run as it was (every step logged).
    resumed = run_module("trainer_pkg.train", "--output_dir", str(output_dir), "--resume", env=cache_env)
    assert "--resume continues the saved run with" not in resumed.stderr
    assert_same_result(reference, output_dir)


def test_resume_refuses_other_data_naming_the_key_and_says_what_changes(tiny_run, tmp_path, tiny_nsmc, cache_env):
    for flag, value in (("--max_train_samples", "100"), ("--train_file", str(tiny_nsmc / "ratings_test.txt")),
                        ("--seed", "8")):
        refused = run_module("trainer_pkg.train", "--output_dir", str(tiny_run), "--resume", flag, value,
                             env=cache_env, check=False)
        assert refused.returncode == 2, refused.stderr[-2000:]
        message = refused.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: --resume: {flag} ") and f"drop {flag} to continue the run" in message
    # A finished run (a copy: others use it) resumed with another log interval: nothing is left to
    # train, and the change is said.
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    resumed = run_module("trainer_pkg.train", "--output_dir", str(copy), "--resume", "--log_every", "3", env=cache_env)
    assert "log_every 5 -> 3" in resumed.stderr and "--resume continues the saved run with" in resumed.stderr


def test_a_second_ctrl_c_aborts_at_once(tmp_path, tiny_model, tiny_nsmc, cache_env):
    output_dir, run_log = tmp_path / "run", tmp_path / "run.log"
    # A validation of 1,000 single rows after every step: the first Ctrl-C is mostly acted on at the
    # next step, seconds away. The second is sent once the first was seen, before the checkpoint
    # (or during its writing, when the first came just before a step's stop check).
    process = start(tiny_train_args(tiny_model, tiny_nsmc, output_dir, *EXTRA, "--eval_every", "1",
                                    "--eval_batch_size", "1", "--validation_size", "1000"), cache_env, run_log)
    wait_until(process, lambda: log_records(output_dir, "train"))
    process.send_signal(signal.SIGINT)
    wait_until(process, lambda: "Ctrl-C: saving a checkpoint" in run_log.read_text())
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    log = run_log.read_text()
    assert log.strip().splitlines()[-1] == "interrupted"
    assert "checkpoint at step" not in log, "the second Ctrl-C came after the checkpoint"


def test_checkpoints_by_the_clock_survive_a_kill_mid_epoch(reference, tmp_path, tiny_model, tiny_nsmc, cache_env):
    output_dir = tmp_path / "run"
    # Without --save_every, the first checkpoint is the clock's: an interval this short puts it well
    # before the validation at step 40 however fast the machine runs the tiny model.
    args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, *EXTRA, "--save_every", "0", "--save_every_minutes", "0.001")
    process = start(args, cache_env, tmp_path / "run.log")
    pointer = output_dir / "checkpoints" / "latest"
    wait_until(process, lambda: pointer.is_file(), interval=0.02)
    kill(process)
    state = json.loads((output_dir / "checkpoints" / latest(output_dir) / "trainer_state.json").read_text())
    assert state["epoch"] == 0 and state["optimizer_steps"] % 40 and 0 < state["batches_in_epoch"] < 125, state

    run_module("trainer_pkg.train", *args, "--resume", env=cache_env)
    assert_same_result(reference, output_dir)
