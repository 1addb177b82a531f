"""The Accelerator for train/evaluate/predict: placement, precision and process group.

Without a GPU, the process group must be told to use the CPU explicitly: under torchrun,
`Accelerator()` on a GPU-less machine would otherwise become N independent single-process runs,
each doing the whole job. With `cpu=True` the N processes become real gloo ranks.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from trainer_pkg.errors import UserError


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        if requested in ("bf16", "fp16") and not torch.cuda.is_available() and requested == "fp16":
            raise UserError("--mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1, timeout_s: int = 1800) -> Accelerator:
    if torch.cuda.is_available():
        # TF32 matmuls: free speed on Ampere+ for the fp32 parts of the model.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_precision(mixed_precision),
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
    )
