"""Stop cleanly on SLURM's warning signal (SIGUSR1) or SIGTERM: checkpoint, then exit to requeue.

A signal reaches the ranks at slightly different moments, so each rank only records it; at
every optimizer step all ranks agree (a one-element all-reduce on a CPU-side gloo group, so it
never waits on the GPU) and stop at the same step.
"""

from __future__ import annotations

import signal
from datetime import timedelta

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later". slurm/train.sh requeues the job on this exit code only.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.received: int | None = None
        self.group = None
        self.previous = {}

    def install(self, multi_process: bool, timeout_s: int = 1800) -> StopRequest:
        for signum in SIGNALS:
            self.previous[signum] = signal.signal(signum, self._record)
        if multi_process and dist.is_available() and dist.is_initialized():
            # A new group does not inherit the job's timeout (it would wait 30 minutes for a hung peer).
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return self

    def _record(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a signal. Call on all ranks."""
        if self.group is None:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()
