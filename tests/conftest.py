"""Shared fixtures: a tiny tokenizer/model directory and NSMC-format data built from scratch,
a subprocess runner for the command-line entry points, and the ../shared material when present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_tiny import write_nsmc_dir, write_tiny_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRAINER_PKG_SHARED", REPO.parent / "shared"))


# The longest files (fresh-clone CI, two workers), first: under `make test` each worker takes a
# file at a time, so the short files fill the end instead of one long file running alone.
LONGEST_FILES = ("test_launch_matrix.py", "test_distributed.py", "test_pretrained.py", "test_bad_data.py",
                 "test_resume.py", "test_shared.py", "test_slurm.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses: offline, private datasets cache, no GPU noise."""
    cache = tmp_path_factory.mktemp("hf_cache")
    env = dict(os.environ)
    env.update(HF_DATASETS_CACHE=str(cache / "datasets"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_nsmc(tmp_path_factory) -> Path:
    return write_nsmc_dir(tmp_path_factory.mktemp("tiny_nsmc"), n_train=1200, n_test=301, seed=0)


def run_module(module: str, *args: str, env: dict[str, str], timeout: float = 600, check: bool = True,
               cwd: Path | None = None, cold_start: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m module args...`; on an unexpected exit code show its output.

    A trainer_pkg command is forked from a process that imported trainer_pkg once for this env
    (tests/cli_batch.py --serve): the command itself, from the import on, without a cold start
    each time. `cold_start=True`, or TRAINER_PKG_TEST_COLD_START=1 for the whole suite, starts a
    fresh interpreter instead, for what happens at import."""
    command = [module, *map(str, args)]
    if cold_start or not module.startswith("trainer_pkg.") or os.environ.get("TRAINER_PKG_TEST_COLD_START"):
        result = subprocess.run([sys.executable, "-m", *command], env=env, cwd=cwd or REPO,
                                capture_output=True, text=True, timeout=timeout)
    else:
        result = fork_server(env).run(command, cwd or REPO, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
                             f"\n--- stderr\n{result.stderr[-5000:]}")
    return result


class ForkServer:
    """tests/cli_batch.py --serve, started with one environment: what a module reads from it at
    import (threads, caches, offline mode) is the same in every command it forks."""

    def __init__(self, env: dict[str, str]):
        self.scratch = Path(tempfile.mkdtemp(prefix="fork_server_"))
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_batch.py"), "--serve",
                                         str(self.scratch)], env=env, cwd=REPO, text=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=(self.scratch / "server.log").open("w"))
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the fork server did not start: {(self.scratch / 'server.log').read_text()[-3000:]}")

    def run(self, command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        module, *args = command
        self.process.stdin.write(json.dumps({"module": module, "args": args, "cwd": str(cwd), "timeout": timeout}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died: {(self.scratch / 'server.log').read_text()[-3000:]}")
        reply = json.loads(line)
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(command, timeout, reply["stdout"], reply["stderr"])
        return subprocess.CompletedProcess(command, reply["returncode"], reply["stdout"], reply["stderr"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        shutil.rmtree(self.scratch, ignore_errors=True)


FORK_SERVERS: dict[tuple, ForkServer] = {}


def fork_server(env: dict[str, str]) -> ForkServer:
    key = tuple(sorted(env.items()))
    if key not in FORK_SERVERS:
        FORK_SERVERS[key] = ForkServer(env)
    return FORK_SERVERS[key]


def pytest_sessionfinish(session):
    while FORK_SERVERS:
        FORK_SERVERS.popitem()[1].close()


def run_commands(commands: dict[str, list], env: dict[str, str], scratch: Path,
                 timeout: float = 900) -> dict[str, subprocess.CompletedProcess]:
    """{name: [module, *args]} run as separate processes by tests/cli_batch.py, importing once.

    For many short commands (errors found while loading): each is `python -m module args` from
    the import on, with its own exit code and output, for a fraction of a cold start.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    jobs = [{"name": name, "module": module, "args": [str(a) for a in args], "cwd": str(REPO)}
            for name, (module, *args) in commands.items()]
    (scratch / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py"), scratch / "jobs.json",
                    scratch / "results.json"], env=env, cwd=REPO, check=True, timeout=timeout)
    results = json.loads((scratch / "results.json").read_text(encoding="utf-8"))
    return {name: subprocess.CompletedProcess(commands[name], r["returncode"], r["stdout"], r["stderr"])
            for name, r in results.items()}


# The offline proxy's from-scratch settings (configs/nsmc_proxy_offline.yaml): with them the tiny model
# learns its task within 45 steps at lr 3e-3 (0.98 test accuracy); with the plain defaults, or with
# any one of them alone, it still predicts one class there.
TINY_FROM_SCRATCH = ["--scratch_init", "local", "--attention_lr_scale", "0.03",
                     "--model_overrides", "hidden_dropout_prob=0,attention_probs_dropout_prob=0"]


def tiny_train_args(model: Path, data: Path, output_dir: Path, *extra: str, from_scratch: bool = True) -> list[str]:
    return ["--data", str(data), "--model", str(model), "--output_dir", str(output_dir),
            "--validation_size", "200", "--per_device_batch_size", "16", "--lr", "3e-3", "--seed", "7",
            "--log_every", "5", *(["--from_scratch", *TINY_FROM_SCRATCH] if from_scratch else []), *extra]


@pytest.fixture
def shared_dir() -> Path:
    if not (SHARED / "data" / "nsmc" / "ratings_train.txt").is_file():
        pytest.skip(f"no NSMC data under {SHARED} (a fresh clone without ../shared)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model, tiny_nsmc, cache_env) -> Path:
    """A short training run (45 steps: good, not perfect, so its report has errors to show),
    tracked with the default --report_to auto. Its export is <run>/model."""
    output_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    run_module("trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--max_steps", "45",
                                                     "--eval_every", "15"), env=cache_env)
    return output_dir
