"""Non-finite losses and gradients: noticed without a host sync per step, then stop or skip.

A NaN or inf loss means the model diverged (learning rate too high, bad initialisation, fp16
range). The loop records it in a device-side flag; the flag is read only where training must
not go on blindly: at each log interval and before every evaluation and checkpoint. So no
checkpoint is ever written from a diverged model, and the error names the first bad step.

With --nan_policy skip, a step whose gradient norm is not finite is dropped (gradients zeroed,
optimizer and schedule untouched) and counted; deciding that needs the norm on the host, one
sync per optimizer step, which is the price of that policy. Under DDP the norm is computed on
the all-reduced gradients, so every rank takes the same decision.
"""

from __future__ import annotations

import math

import torch


class NonFiniteWatch:
    def __init__(self, device: torch.device):
        self.window_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, value: torch.Tensor | float | None) -> None:
        """A loss or gradient norm of the current accumulation window (no host sync)."""
        if value is None:
            return
        if not isinstance(value, torch.Tensor):
            # DeepSpeed hands back its gradient norm as a Python float: already on the host.
            if not math.isfinite(value):
                self.window_bad.fill_(True)
            return
        self.window_bad |= ~torch.isfinite(value.detach()).all()

    def close_window(self, step: int, excused: bool) -> None:
        """End of an optimizer step; `excused`: the step was skipped, its non-finite values never applied."""
        if not excused:
            self.first_bad_step.masked_fill_(self.window_bad & (self.first_bad_step < 0), step)
        self.window_bad.zero_()

    def first_bad(self, accelerator) -> int | None:
        """The first optimizer step with a non-finite value applied, on any rank. Call on all ranks."""
        steps = accelerator.gather(self.first_bad_step.reshape(1)).tolist()
        bad = [step for step in steps if step >= 0]
        return min(bad) if bad else None


def gradient_norm(model) -> torch.Tensor:
    """The global L2 norm of the gradients, as clipping would compute it (for runs without clipping)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def weights_are_finite(accelerator, model) -> bool:
    """Every parameter finite on every rank (ZeRO-3 placeholders are empty and pass). Call on all ranks."""
    local = torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all()
    return bool(accelerator.gather(local.reshape(1).to(torch.int32)).min().item())
