"""Non-finite losses: a real divergence (a learning rate of 1000 blows the tiny model up within a
few steps, deterministically on the CPU) stops the run with a one-line error naming the step and
no checkpoint written from the diverged weights, or, with --nan_policy skip, drops and counts
those steps. fp16 overflow counting needs a GPU."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_module, tiny_train_args
from safetensors.torch import load_file

from trainer_pkg.config import load_config
from trainer_pkg.errors import UserError

# Checkpoints every 2 steps, the loss looked at every 5: the divergence happens between two looks,
# and a checkpoint falls due before the next look.
DIVERGING = ["--lr", "1000", "--warmup_ratio", "0", "--max_steps", "16", "--save_every", "2", "--log_every", "5"]


def step_of(checkpoint_name: str) -> int:
    return int(checkpoint_name.removeprefix("step-"))


def test_non_finite_loss_stops_and_keeps_the_last_finite_checkpoint(tiny_model, tiny_nsmc, cache_env, tmp_path):
    output_dir = tmp_path / "run"
    result = run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, *DIVERGING),
                        env=cache_env, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: training diverged: a non-finite (NaN/inf) loss or gradient at step "), message
    bad_step = int(re.search(r"at step (\d+)", message).group(1))
    assert "--nan_policy skip" in message and "--lr" in message

    checkpoints = output_dir / "checkpoints"
    latest = (checkpoints / "latest").read_text().strip()
    assert f"the last checkpoint, {checkpoints / latest}, is intact" in message
    saved = sorted(p.name for p in checkpoints.glob("step-*"))
    assert saved and all(step_of(name) < bad_step for name in saved), (saved, bad_step)
    assert step_of(latest) >= bad_step - 2, (latest, bad_step)
    # The test means something only if a checkpoint fell due between the bad step and the next
    # look at the loss: the guard before saving stopped it, not the periodic look.
    next_look = -(-bad_step // 5) * 5
    assert any(step % 2 == 0 for step in range(bad_step, next_look)), (bad_step, "adjust DIVERGING")
    weights = load_file(checkpoints / latest / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not list(checkpoints.glob(".tmp-*")) and not (output_dir / "model").exists()

    # --nan_policy skip: the same divergence, its steps dropped, counted and reported; the model stays finite.
    skipped_dir = tmp_path / "skipped"
    result = run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, skipped_dir, *DIVERGING),
                        "--nan_policy", "skip", env=cache_env)
    summary = json.loads((skipped_dir / "metrics.json").read_text())
    skipped = summary["skipped_steps"]["non_finite"]
    assert skipped > 0 and summary["skipped_steps"]["fp16_overflow"] == 0
    train_log = [json.loads(line) for line in (skipped_dir / "log.jsonl").read_text().splitlines()]
    train_log = [record for record in train_log if record["kind"] == "train"]
    assert train_log[-1]["skipped_non_finite"] == skipped
    assert [r["skipped_non_finite"] for r in train_log if r["step"] < bad_step] == [0] * sum(
        r["step"] < bad_step for r in train_log)
    assert f"skipped optimizer steps: {skipped} with a non-finite gradient" in result.stderr
    exported = load_file(skipped_dir / "model" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in exported.values())
    assert all(isinstance(summary["test"][key], float) for key in ("accuracy", "f1", "loss"))


def test_nan_policy_is_validated():
    with pytest.raises(UserError, match="nan_policy must be stop or skip"):
        load_config(["--nan_policy", "ignore"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs a CUDA GPU")
def test_fp16_overflow_steps_are_counted_and_reported(tiny_model, tiny_nsmc, cache_env, tmp_path):
    # The scaler starts at 2**16: the first steps of a fresh model overflow in fp16 and are skipped.
    output_dir = tmp_path / "fp16"
    result = run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--max_steps", "20",
                                                              "--mixed_precision", "fp16", "--log_every", "1"),
                        env=cache_env)
    summary = json.loads((output_dir / "metrics.json").read_text())
    overflows = summary["skipped_steps"]["fp16_overflow"]
    train_log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert [r for r in train_log if r["kind"] == "train"][-1]["skipped_overflow"] == overflows
    if overflows:
        assert f"{overflows} fp16 overflows" in result.stderr
