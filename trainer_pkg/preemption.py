"""Stop cleanly on Ctrl-C (SIGINT), SLURM's warning signal (SIGUSR1) or SIGTERM: checkpoint, then
exit to be resumed; and checkpoint every few minutes, so a crash loses at most that much.

A signal reaches the ranks at slightly different moments, and their clocks differ, so each rank
only records what it saw; at every optimizer step all ranks agree (a two-element all-reduce on a
CPU-side gloo group, so it never waits on the GPU) and stop or checkpoint at the same step.
A second Ctrl-C aborts at once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later": a checkpoint was saved and the run can be resumed.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


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
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            sys.stderr.write("\nCtrl-C: saving a checkpoint at the next step, then exiting (Ctrl-C again aborts "
                             "without one)\n")
        self.received = signum

    def agreed(self, checkpoint_due: bool = False) -> tuple[bool, bool]:
        """(stop, checkpoint): whether any rank received a signal, and whether any rank found a
        checkpoint due. Call on all ranks."""
        stop = self.received is not None
        if self.group is None:
            return stop, checkpoint_due
        flags = torch.tensor([int(stop), int(checkpoint_due)], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flags[0].item()), bool(flags[1].item())

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


class CheckpointClock:
    """Whether `minutes` have passed since the last checkpoint (0: never)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def due(self) -> bool:
        return bool(self.seconds) and time.monotonic() - self.last >= self.seconds

    def restart(self) -> None:
        """At the start of training and after every checkpoint."""
        self.last = time.monotonic()
