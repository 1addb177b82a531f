"""Wrong use: two runs on one output directory, resuming under an incompatible configuration.
Each is refused with one line, before anything in the directory is written."""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_commands, run_module, tiny_train_args

from trainer_pkg.config import TrainConfig
from trainer_pkg.run_dir import LOCK_FILE, TrainingState, resume_problem


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    return message


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, tiny_nsmc, cache_env):
    output_dir = tmp_path_factory.mktemp("wrong_use") / "run"
    run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--max_steps", "4",
                                                     "--save_every", "2"), env=cache_env)
    return output_dir


def test_a_second_run_on_a_busy_output_dir_is_refused(tiny_model, tiny_nsmc, cache_env, tmp_path):
    output_dir = tmp_path / "run"
    args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--epochs", "50")
    first = subprocess.Popen([sys.executable, "-m", "trainer_pkg.train", *map(str, args)], env=cache_env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        saved_config = output_dir / "run_config.yaml"
        deadline = time.time() + 120
        while not saved_config.is_file():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.05)
        before = saved_config.read_bytes()
        attempts = {str(i): ["trainer_pkg.train", *args, *extra, "--lr", "1e-4"]
                    for i, extra in enumerate((["--overwrite_output_dir"], ["--resume", "auto"], []))}
        for result in run_commands(attempts, cache_env, tmp_path / "attempts").values():
            message = one_line_error(result)
            assert message.startswith(f"error: {output_dir} is in use by another run (pid {first.pid} on "), message
            assert message.endswith("; wait for it to end, or choose another --output_dir"), message
        assert saved_config.read_bytes() == before
        assert first.poll() is None, "the refused runs disturbed the first one"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the lock with the killed process: the directory can be resumed.
    with (output_dir / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


# The change, what resuming another directory from this run's checkpoint says, and what resuming
# the same directory says (its saved settings name the flag first, where it defines the run).
CHANGES = {
    "other_model": (["--model_overrides", "num_hidden_layers=1"], "saved by a run with another model_overrides",
                    "--model_overrides {'num_hidden_layers': 1} differs from the run in"),
    "other_labels": (["--labels", "bad,good"],
                     "saved by a run with another labels (labels was ['negative', 'positive'], now ['bad', 'good'])",
                     "--labels ['bad', 'good'] differs from the run in"),
    "other_batch_mid_epoch": (["--per_device_batch_size", "32"], "saved mid-epoch with --per_device_batch_size 16",
                              "saved mid-epoch with --per_device_batch_size 16"),
}


def test_resuming_under_an_incompatible_configuration_is_refused(finished_run, tiny_model, tiny_nsmc, cache_env,
                                                                 tmp_path):
    before = snapshot(finished_run)
    checkpoint = finished_run / "checkpoints" / "step-00000002"
    attempts = {}
    for name, (change, *_) in CHANGES.items():
        # The same directory (--resume), and another one resuming from this run's checkpoint.
        attempts[f"{name}_same_dir"] = ["trainer_pkg.train", *tiny_train_args(
            tiny_model, tiny_nsmc, finished_run, "--max_steps", "8", *change), "--resume"]
        attempts[f"{name}_elsewhere"] = ["trainer_pkg.train", *tiny_train_args(
            tiny_model, tiny_nsmc, tmp_path / name, "--max_steps", "8", *change), "--resume", checkpoint]
    results = run_commands(attempts, cache_env, tmp_path / "attempts")
    for name, (_, elsewhere, same_dir) in CHANGES.items():
        for where, expected in (("same_dir", same_dir), ("elsewhere", elsewhere)):
            message = one_line_error(results[f"{name}_{where}"])
            assert message.startswith("error: --resume") and expected in message, message
        assert not (tmp_path / name / "run_config.yaml").exists()
    assert snapshot(finished_run) == before


def test_zero_checkpoints_refuse_another_global_batch():
    saved = TrainConfig(per_device_batch_size=16, grad_accum=2)
    state = TrainingState(num_processes=2, batches_in_epoch=10)
    assert resume_problem(saved, state, TrainConfig(per_device_batch_size=16, grad_accum=2), 2, deepspeed=True) is None
    problem = resume_problem(saved, state, TrainConfig(per_device_batch_size=32, grad_accum=1), 2, deepspeed=True)
    assert problem.startswith("saved mid-epoch with --per_device_batch_size 16")  # same global batch, other split
    problem = resume_problem(saved, state, TrainConfig(per_device_batch_size=16, grad_accum=4), 2, deepspeed=True)
    assert problem.startswith("a ZeRO checkpoint of global batch 64 (per-device 16 x 2 processes x accumulation 2), "
                              "now 128")
    assert "saved by 2 DeepSpeed processes, now 4" in resume_problem(saved, state, saved, 4, deepspeed=True)
    # DDP re-splits an epoch over another number of processes.
    assert resume_problem(saved, state, saved, 4, deepspeed=False) is None


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
def test_a_model_directory_without_weights_is_refused_unless_from_scratch(tiny_model, tiny_nsmc, cache_env,
                                                                          tmp_path, dry_run):
    # tiny_model holds a config and a tokenizer only, like ../shared's mBERT: fine-tuning it would
    # train a random model under a pretrained run's plan.
    output_dir = tmp_path / "run"
    args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, *(["--dry_run"] if dry_run else []), from_scratch=False)
    message = one_line_error(run_module("trainer_pkg.train", *args, env=cache_env, check=False))
    assert message == (f"error: --model {tiny_model}: no weights there (model.safetensors or pytorch_model.bin); "
                       "pass --from_scratch to train from a random initialisation of its config"), message
    assert not output_dir.exists()
