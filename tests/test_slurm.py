"""slurm/*.sh against a real single-node SLURM (slurmctld + slurmd; .ci/slurm_up.sh starts it):
a run to completion, preemption with requeue and resume, sharded evaluation, and the multi-node
wiring (two launcher tasks acting as two machines)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_module, tiny_train_args
from same_results import assert_same_results

pytestmark = pytest.mark.slow


def slurm_ready() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (run .ci/slurm_up.sh)"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed: {error}"
    if info.returncode != 0 or not re.search(r"idle|mix|alloc", info.stdout):
        return f"no usable SLURM node: {info.stdout.strip() or info.stderr.strip()}"
    return None


reason = slurm_ready()
if reason:
    pytest.skip(reason, allow_module_level=True)


def sbatch(script: str, *args, logs: Path, env: dict, options: tuple[str, ...] = ()) -> str:
    command = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
               f"--output={logs}/%x-%j.out", "--export=ALL", *options, f"slurm/{script}", *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_for(job: str, timeout: float = 600, until=None) -> dict[str, str]:
    """Poll until the job ends (or `until(info)` holds); return its scontrol record."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if until is not None and until(info):
            return info
        if until is None and info.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING",
                                                          "REQUEUED", "REQUEUE_HOLD", "SUSPENDED", None):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout}s: {job_info(job)}")


def job_log(logs: Path, job: str) -> str:
    return "\n".join(path.read_text(errors="replace") for path in logs.glob(f"*-{job}.out"))


@pytest.fixture(scope="module")
def slurm_env(cache_env) -> dict[str, str]:
    return {**cache_env, "TRAINER_PKG_PYTHON": sys.executable,
            "ACCELERATE_CONFIG": "accelerate_configs/cpu_multi_process.yaml", "GPUS_PER_NODE": "1"}


def train_args(tiny_model, tiny_nsmc, output_dir) -> list[str]:
    return tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--epochs", "2", "--per_device_batch_size", "8",
                           "--save_every", "20", "--eval_every", "50")


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory, tiny_model, tiny_nsmc, slurm_env):
    root = tmp_path_factory.mktemp("slurm_run")
    job = sbatch("train.sh", *train_args(tiny_model, tiny_nsmc, root / "out"), logs=root, env=slurm_env)
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED", job_log(root, job)
    return root / "out", job_log(root, job)


def test_train_job_runs_to_completion_and_exports(completed_run):
    output_dir, log = completed_run
    assert (output_dir / "model" / "model.safetensors").is_file()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.8
    assert "restart 0" in log and "requeueing" not in log


def test_train_job_on_a_cpu_partition_takes_its_processes_from_the_cpus(tmp_path, tiny_model, tiny_nsmc, cache_env):
    # No ACCELERATE_CONFIG, no GPUS_PER_NODE, --gpus-per-node=0: the CPU config (fp32) and one
    # process per CPU_THREADS_PER_PROCESS of the task's CPUs: 2 CPUs / 1 = 2 processes.
    env = {**cache_env, "TRAINER_PKG_PYTHON": sys.executable, "CPU_THREADS_PER_PROCESS": "1"}
    output_dir = tmp_path / "out"
    job = sbatch("train.sh", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--max_steps", "2",
                                              "--max_train_samples", "64", "--max_eval_samples", "32"),
                 logs=tmp_path, env=env, options=("--cpus-per-task=2",))
    info = wait_for(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert "1 machine(s) x 2 process(es)" in log and "2 process(es) on cpu, precision no" in log, log
    assert (output_dir / "model" / "model.safetensors").is_file()


def test_preempted_job_requeues_resumes_and_matches(completed_run, tmp_path, tiny_model, tiny_nsmc, slurm_env):
    reference_dir, _ = completed_run
    output_dir = tmp_path / "out"
    job = sbatch("train.sh", *train_args(tiny_model, tiny_nsmc, output_dir), logs=tmp_path, env=slurm_env)
    latest = output_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step-00000020"):
        assert time.time() < deadline, job_log(tmp_path, job)
        assert job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_log(tmp_path, job)
        time.sleep(0.1)
    # First preemption: mid-training.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # Second preemption: while the requeued job is still starting up (loading data). The signal is
    # remembered and honoured at its first step.
    deadline = time.time() + 300
    while job_log(tmp_path, job).count("process(es) on cpu") < 2:
        assert time.time() < deadline, job_log(tmp_path, job)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_for(job, until=lambda i: i.get("Restarts") == "2" and i.get("JobState") in ("COMPLETED", "FAILED"))
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert log.count("requeueing") == 2 and "restart 2" in log and log.count("resumed from") == 2
    state_log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    preempted = [r["step"] for r in state_log if r["kind"] == "preempted"]
    assert len(preempted) == 2 and 20 <= preempted[0] < preempted[1] < 126, preempted
    reference = json.loads((reference_dir / "metrics.json").read_text())
    resumed = json.loads((output_dir / "metrics.json").read_text())
    assert resumed["test"] == reference["test"]
    assert resumed["validation"] == reference["validation"]


def test_evaluate_job_writes_metrics_next_to_the_export(completed_run, tmp_path, tiny_nsmc, slurm_env, cache_env):
    output_dir, _ = completed_run
    export = output_dir / "model"
    (export / "eval_metrics.json").unlink(missing_ok=True)
    job = sbatch("evaluate.sh", export, "--test_file", tiny_nsmc / "ratings_test.txt", logs=tmp_path, env=slurm_env)
    assert wait_for(job)["JobState"] == "COMPLETED", job_log(tmp_path, job)
    sharded = json.loads((export / "eval_metrics.json").read_text())
    run_module("trainer_pkg.evaluate", export, "--test_file", tiny_nsmc / "ratings_test.txt",
               "--output", tmp_path / "single.json", env=cache_env)
    assert_same_results(sharded, json.loads((tmp_path / "single.json").read_text()))


def test_two_launcher_tasks_act_as_two_machines(tmp_path, tiny_model, tiny_nsmc, slurm_env):
    env = {**slurm_env, "NUM_MACHINES": "2"}
    output_dir = tmp_path / "out"
    job = sbatch("train.sh", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--max_steps", "6"),
                 logs=tmp_path, env=env, options=("--ntasks=2", "--ntasks-per-node=2"))
    info = wait_for(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert "2 machine(s) x 1 process(es)" in log
    assert "2 process(es) on cpu" in log
    ranks = sorted(set(re.findall(r"machine rank (\d)", log)))
    assert ranks == ["0", "1"], log
