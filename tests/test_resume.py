"""Exact resume: a run killed (SIGKILL) mid-epoch and resumed with --resume ends with the same
weights and metrics as the same run left alone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import REPO, run_module, tiny_train_args
from safetensors.torch import load_file


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, tiny_model, tiny_nsmc, cache_env):
    extra = ["--epochs", "2", "--eval_every", "40", "--save_every", "7", "--per_device_batch_size", "8",
             "--grad_accum", "2"]
    reference = tmp_path / "reference"
    run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, reference, *extra), env=cache_env)

    interrupted = tmp_path / "interrupted"
    args = tiny_train_args(tiny_model, tiny_nsmc, interrupted, *extra)
    process = subprocess.Popen([sys.executable, "-m", "trainer_pkg.train", *args], env=cache_env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = interrupted / "checkpoints" / "latest"
    deadline = time.time() + 300
    # Kill once a mid-epoch checkpoint (past the first one) is published.
    while time.time() < deadline and process.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-00000014":
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model").exists(), "the run finished before it could be killed"
    resumed_from = json.loads((interrupted / "checkpoints" / latest.read_text().strip() / "trainer_state.json").read_text())
    assert 0 < resumed_from["batches_in_epoch"] < 125, resumed_from

    run_module("trainer_pkg.train", *args, "--resume", env=cache_env)

    expected = load_file(reference / "model" / "model.safetensors")
    actual = load_file(interrupted / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert (expected[name] == actual[name]).all(), name
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    resumed_metrics = json.loads((interrupted / "metrics.json").read_text())
    assert resumed_metrics["test"] == reference_metrics["test"]
    assert resumed_metrics["validation"] == reference_metrics["validation"]
