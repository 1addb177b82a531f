"""Run `trainer_pkg.train` and count the places where it reads a tensor's value on the host.

    python tests/host_sync_probe.py COUNTS.json TRAIN_ARGS...

On a GPU such a read (`bool(t)`, `.item()`, `.tolist()`, `.cpu()`, ...) waits for every queued
kernel, so the CPU cannot prepare the next step while the GPU computes. The same reads happen on
the CPU, where they can be counted: every tensor-to-Python conversion is recorded by its call site
(the innermost frame outside torch), from the first backward pass to the end of the run. On CUDA,
`torch.cuda.set_sync_debug_mode("warn")` adds the syncs that are not conversions (blocking copies).

COUNTS.json maps "method file:line" to the number of calls. A site whose count grows with the
number of steps or evaluation batches syncs once per step or batch (tests/test_host_syncs.py).
"""

from __future__ import annotations

import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator

CONVERSIONS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu")

counts: collections.Counter[str] = collections.Counter()
counting = False


def call_site(kind: str) -> str:
    frames = traceback.extract_stack()[:-2]
    site = next((frame for frame in reversed(frames) if "/torch/" not in frame.filename
                 and frame.filename != __file__), frames[-1])
    return f"{kind} {Path(site.filename).parent.name}/{Path(site.filename).name}:{site.lineno}"


def count_calls(name: str) -> None:
    original = getattr(torch.Tensor, name)

    def counted(self, *args, **kwargs):
        if counting:
            counts[call_site(name)] += 1
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, counted)


def start_counting_at_first_backward() -> None:
    original = Accelerator.backward

    def backward(self, loss, **kwargs):
        global counting
        counting = True
        return original(self, loss, **kwargs)

    Accelerator.backward = backward


def count_cuda_sync_warnings() -> None:
    torch.cuda.set_sync_debug_mode("warn")
    warnings.simplefilter("always")
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if counting and "synchronizing" in str(message):
            counts[call_site("cuda-sync")] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = record


def main() -> None:
    output, train_args = Path(sys.argv[1]), sys.argv[2:]
    for name in CONVERSIONS:
        count_calls(name)
    start_counting_at_first_backward()
    if torch.cuda.is_available():
        count_cuda_sync_warnings()
    from trainer_pkg.train import main as train_main

    status = train_main(train_args)
    output.write_text(json.dumps(dict(counts), indent=1, sort_keys=True), encoding="utf-8")
    sys.exit(status)


if __name__ == "__main__":
    main()
