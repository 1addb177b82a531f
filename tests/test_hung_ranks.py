"""A rank that dies or hangs in a 2-process CPU (gloo) run: the other one exits within
--dist_timeout with a one-line message saying why, instead of waiting forever.

Real processes, real signals: SIGKILL for a rank that dies (out of memory, a node lost), SIGSTOP
for one that hangs (a deadlock, a stuck filesystem). Launched by torchrun, whose agent tears the
job down too, and without it (plain processes with the rendezvous variables set, as a
scheduler's own launcher would), where only --dist_timeout bounds the wait.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_train_args

pytestmark = pytest.mark.slow
TIMEOUT_S = 10
LOST = "error: lost contact with another process of this 2-process job"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def training_args(tiny_model, tiny_nsmc, output_dir: Path) -> list[str]:
    return [str(a) for a in tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--epochs", "50", "--log_every", "1",
                                            "--per_device_batch_size", "4", "--dist_timeout", str(TIMEOUT_S))]


def wait_for_training(output_dir: Path, processes: list[subprocess.Popen]) -> None:
    log = output_dir / "log.jsonl"
    deadline = time.time() + 180
    while not (log.is_file() and log.read_text().count('"kind": "train"') >= 3):
        assert all(p.poll() is None for p in processes), "a process ended before training started"
        assert time.time() < deadline, "training did not start"
        time.sleep(0.05)


def workers_of(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes below a launcher."""
    found, pending = {}, [launcher_pid]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        pending += [int(child) for child in children]
        if pid != launcher_pid:
            rank = next((item[5:] for item in environ if item.startswith(b"RANK=")), None)
            if rank is not None:
                found[int(rank)] = pid
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids, within: float) -> float:
    start = time.time()
    while any(alive(pid) for pid in pids):
        assert time.time() - start < within, f"still running after {within:.0f} s"
        time.sleep(0.05)
    return time.time() - start


def plain_ranks(args: list[str], env: dict, tmp_path: Path) -> list[subprocess.Popen]:
    port = free_port()
    processes = []
    for rank in range(2):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with (tmp_path / f"rank{rank}.log").open("w") as output:
            processes.append(subprocess.Popen([sys.executable, "-m", "trainer_pkg.train", *args], env=rank_env,
                                              cwd=REPO, stdout=output, stderr=subprocess.STDOUT))
    return processes


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"], ids=["died", "hung"])
def test_without_a_launcher_agent_the_survivor_exits_within_the_timeout(how, tiny_model, tiny_nsmc, cache_env,
                                                                         tmp_path):
    output_dir = tmp_path / "run"
    rank0, rank1 = plain_ranks(training_args(tiny_model, tiny_nsmc, output_dir), cache_env, tmp_path)
    try:
        wait_for_training(output_dir, [rank0, rank1])
        rank1.send_signal(getattr(signal, how))
        took = wait_gone([rank0.pid], within=TIMEOUT_S + 15)
        rank0.wait()
    finally:
        for process in (rank0, rank1):
            process.kill()
            process.wait()
    output = (tmp_path / "rank0.log").read_text()
    assert rank0.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    message = output.strip().splitlines()[-1]
    assert message.startswith(LOST), message
    if how == "SIGSTOP":
        assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in message and took >= TIMEOUT_S - 1
    else:
        assert took < TIMEOUT_S, "a dead peer is noticed at once, not at the timeout"


def test_under_torchrun_a_dead_rank_takes_the_job_down_with_a_reason(tiny_model, tiny_nsmc, cache_env, tmp_path):
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "trainer_pkg.train",
               *training_args(tiny_model, tiny_nsmc, output_dir)]
    with (tmp_path / "torchrun.log").open("w") as output:
        launcher = subprocess.Popen(command, env=cache_env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        wait_for_training(output_dir, [launcher])
        workers = workers_of(launcher.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        wait_gone([launcher.pid, *workers.values()], within=TIMEOUT_S + 15)
        launcher.wait()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = (tmp_path / "torchrun.log").read_text()
    assert launcher.returncode != 0
    # The agent names the killed rank; rank 0, if the agent did not stop it first, says it lost its peer.
    assert f"Signal 9 (SIGKILL) received by PID {workers[1]}" in output, output[-3000:]
    if f"exitcode  : 2 (pid: {workers[0]})" in output:
        assert LOST in output
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert not any(record["kind"] == "test" for record in records)
