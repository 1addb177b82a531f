"""A disk that fills up while a checkpoint is written, and output directories that cannot be written:
one-line errors naming the path, the previous checkpoint and `latest` untouched, no temporary
directory left behind.

The full disk is real file-size accounting: RLIMIT_FSIZE makes the kernel refuse writes past N
bytes (EFBIG; Python ignores SIGXFSZ), exactly where a full disk fails with ENOSPC, so the
checkpoint writers (safetensors for the weights, torch.save for the optimizer) fail half-way.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_module, tiny_train_args

BASE = ["--save_every", "2", "--log_every", "1"]


def limit_file_size(max_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, tiny_nsmc, cache_env):
    """A 4-step run with checkpoints at steps 2 and 4, to be continued by each test."""
    output_dir = tmp_path_factory.mktemp("storage") / "run"
    run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, *BASE, "--max_steps", "4"),
               env=cache_env)
    return output_dir


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("max_bytes, failing_writer", [(60_000, "SafetensorError"), (200_000, "RuntimeError")],
                         ids=["weights_file", "optimizer_file"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(max_bytes, failing_writer, finished_run, tiny_model,
                                                               tiny_nsmc, tmp_path, cache_env):
    output_dir = tmp_path / "run"
    shutil.copytree(finished_run, output_dir)
    checkpoints = output_dir / "checkpoints"
    before = snapshot(checkpoints)
    assert (checkpoints / "latest").read_text().strip() == "step-00000004"
    weights = (checkpoints / "step-00000004" / "model.safetensors").stat().st_size
    optimizer = (checkpoints / "step-00000004" / "optimizer.bin").stat().st_size
    assert max_bytes < weights if failing_writer == "SafetensorError" else weights < max_bytes < optimizer

    args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, *BASE, "--max_steps", "8", "--resume")
    result = subprocess.run([sys.executable, "-m", "trainer_pkg.train", *map(str, args)], env=cache_env, cwd=REPO,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(max_bytes))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: cannot write checkpoint {checkpoints / 'step-00000006'}: {failing_writer}")
    assert f"the previous checkpoint {checkpoints / 'step-00000004'} is intact" in message
    assert "free disk space" in message
    # Nothing the previous checkpoint or the pointer held has changed; no half-written directory.
    assert snapshot(checkpoints) == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002", "step-00000004"]


def test_output_dir_below_a_file_is_a_one_line_error(tiny_model, tiny_nsmc, tmp_path, cache_env):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    output_dir = blocker / "run"
    result = run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir), env=cache_env,
                        check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message == f"error: --output_dir {output_dir}: cannot write there (Not a directory)"
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: chmod cannot deny it")
def test_read_only_output_dir_is_a_one_line_error(tiny_model, tiny_nsmc, tmp_path, cache_env):
    output_dir = tmp_path / "read_only"
    output_dir.mkdir()
    output_dir.chmod(0o555)
    try:
        result = run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir), env=cache_env,
                            check=False)
    finally:
        output_dir.chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: --output_dir {output_dir}: cannot write there (Permission denied)"
