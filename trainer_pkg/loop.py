"""The training step and the meter that keeps its numbers between log records.

TrainStep is the recipe's step for one micro-batch: forward, backward, and at the end of an
accumulation window clipping, the non-finite policy, the optimizer and the scheduler. TrainMeter
sums losses, tokens and samples on the device and reads them once per log interval: the loop's
only host sync (tests/test_host_syncs.py). benchmarks/ time this same step.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer_pkg.config import TrainConfig
from trainer_pkg.errors import UserError
from trainer_pkg.model import model_inputs
from trainer_pkg.numerics import NonFiniteWatch, gradient_norm, weights_are_finite
from trainer_pkg.run_dir import TrainingState, latest_checkpoint
from trainer_pkg.weight_copies import LowPrecisionWeights


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def short_window_scale(batch_index: int, batches_per_epoch: int, grad_accum: int) -> float:
    """grad_accum / (micro-batches in the accumulation window holding this batch).

    Accelerate divides every loss by grad_accum; an epoch's last window may hold fewer batches, and
    its gradient must still be a mean, not a fraction of one."""
    window_start = batch_index - batch_index % grad_accum
    return grad_accum / min(grad_accum, batches_per_epoch - window_start)


def rdrop_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """R-Drop's loss for the logits of a batch run twice (`torch.cat([batch, batch])`): the two halves'
    mean cross-entropy plus `alpha` x their symmetric KL divergence, averaged over the rows."""
    first, second = logits.float().chunk(2)
    cross_entropy = (F.cross_entropy(first, labels) + F.cross_entropy(second, labels)) / 2
    log_p, log_q = F.log_softmax(first, dim=-1), F.log_softmax(second, dim=-1)
    symmetric_kl = (F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
                    + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")) / 2
    return cross_entropy + alpha * symmetric_kl


def diverged_error(config: TrainConfig, step: int | None) -> UserError:
    latest = latest_checkpoint(config.output_dir)
    kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint was written"
    where = f"at step {step}" if step is not None else "(the weights are no longer finite)"
    return UserError(
        f"training diverged: a non-finite (NaN/inf) loss or gradient {where}; {kept}; lower --lr "
        f"(now {config.effective_lr:g}), or pass --nan_policy skip to drop such steps"
    )


@dataclass
class StepResult:
    loss: torch.Tensor  # this micro-batch's, on the device
    stepped: bool  # the batch closed an accumulation window: an optimizer step was taken or skipped
    applied: bool = False  # that step changed the weights (not dropped as non-finite, nor an fp16 overflow)


class TrainStep:
    """One micro-batch of training; counts batches, steps and skipped steps in the TrainingState."""

    def __init__(self, accelerator, model, optimizer, scheduler, config: TrainConfig, batches_per_epoch: int,
                 prepared_mask: bool, low_precision: LowPrecisionWeights | None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.config, self.batches_per_epoch = config, batches_per_epoch
        self.prepared_mask, self.low_precision = prepared_mask, low_precision
        self.watch = NonFiniteWatch(accelerator.device)

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = model_inputs(batch, self.prepared_mask)
        alpha = self.config.rdrop_alpha
        if alpha:
            # One forward over the batch twice: the two copies get independent dropout masks, and
            # DDP and DeepSpeed see the single forward they expect.
            labels = inputs["labels"]
            inputs = {key: torch.cat([value, value]) for key, value in inputs.items() if key != "labels"}
        outputs = self.low_precision.forward(self.model, inputs) if self.low_precision is not None \
            else self.model(**inputs)
        return rdrop_loss(outputs.logits, labels, alpha) if alpha else outputs.loss

    def __call__(self, batch: dict, state: TrainingState) -> StepResult:
        accelerator, config = self.accelerator, self.config
        drop_non_finite = False
        with accelerator.accumulate(self.model):
            loss = self.forward(batch)
            self.watch.observe(loss)
            accelerator.backward(loss * short_window_scale(state.batches_in_epoch, self.batches_per_epoch,
                                                           config.grad_accum))
            if self.low_precision is not None:
                self.low_precision.move_gradients()
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm) \
                    if config.max_grad_norm else None
                self.watch.observe(norm)
                if config.nan_policy == "skip" and accelerator.scaler is None:
                    # The one host sync per step this policy costs (see trainer_pkg.numerics).
                    norm = norm if norm is not None else gradient_norm(self.model)
                    drop_non_finite = not torch.isfinite(torch.as_tensor(norm)).item()
            if not drop_non_finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        state.batches_in_epoch += 1
        if not accelerator.sync_gradients:
            return StepResult(loss.detach(), stepped=False)
        # fp16: the loss scaler skips steps whose scaled gradients overflowed, and lowers the scale.
        overflow = not drop_non_finite and accelerator.optimizer_step_was_skipped
        self.watch.close_window(state.optimizer_steps + 1, excused=drop_non_finite or overflow)
        state.skipped_non_finite += drop_non_finite
        state.skipped_overflow += overflow
        applied = not (drop_non_finite or overflow)
        if applied:
            self.scheduler.step()
        state.optimizer_steps += 1
        return StepResult(loss.detach(), stepped=True, applied=applied)

    def require_finite(self, weights: bool = True) -> None:
        """Stop with one line if a non-finite value was applied (or, with `weights`, a weight is not
        finite). A collective: call on all ranks."""
        first_bad = self.watch.first_bad(self.accelerator)
        if first_bad is not None or (weights and not weights_are_finite(self.accelerator, self.model)):
            raise diverged_error(self.config, first_bad)


class TrainMeter:
    """Loss, tokens and samples since the last log record, on the device until `flush`."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        device = accelerator.device
        self.started = self.window_started = time.time()
        # A window's losses join the logged mean only if its optimizer step is applied.
        self.window_loss = torch.zeros((), device=device)
        self.window_batches = 0
        self.loss_sum = torch.zeros((), device=device)
        self.loss_batches = 0
        self.real_tokens = torch.zeros((), device=device, dtype=torch.float64)
        self.padded_tokens = 0
        self.samples = 0
        self.total = {"samples": 0, "tokens": 0.0, "padded_tokens": 0.0}

    def add(self, result: StepResult, batch: dict) -> None:
        self.window_loss += result.loss
        self.window_batches += 1
        self.real_tokens += batch["attention_mask"].sum()
        self.padded_tokens += batch["input_ids"].numel()
        self.samples += batch["labels"].shape[0] * self.accelerator.num_processes
        if result.stepped:
            if result.applied:
                self.loss_sum += self.window_loss
                self.loss_batches += self.window_batches
            self.window_loss.zero_()
            self.window_batches = 0

    def flush(self) -> dict:
        """The record since the last flush, summed over all processes (a collective), and a new window."""
        mean = self.loss_sum / self.loss_batches if self.loss_batches else torch.full_like(self.loss_sum, float("nan"))
        sums = torch.stack([mean.double(), self.real_tokens,
                            torch.tensor(float(self.padded_tokens), device=self.accelerator.device, dtype=torch.float64)])
        loss_sum, tokens, padded = self.accelerator.reduce(sums, "sum").tolist()
        seconds = max(time.time() - self.window_started, 1e-9)
        # A window whose every step was skipped has no loss to report: null, not NaN.
        record = {"loss": loss_sum / self.accelerator.num_processes if self.loss_batches else None,
                  "samples": self.samples, "samples_per_s": self.samples / seconds, "tokens_per_s": tokens / seconds,
                  "padding_efficiency": tokens / max(padded, 1), "peak_memory_gb": peak_memory_gb()}
        self.total["samples"] += self.samples
        self.total["tokens"] += tokens
        self.total["padded_tokens"] += padded
        self.loss_sum.zero_()
        self.real_tokens.zero_()
        self.loss_batches, self.padded_tokens, self.samples, self.window_started = 0, 0, 0, time.time()
        return record

    def summary(self) -> dict:
        """Throughput of the whole run (all processes), for the log and benchmarks/."""
        seconds = time.time() - self.started
        total = self.total
        return {"seconds": seconds, "samples": total["samples"], "tokens": int(total["tokens"]),
                "padded_tokens": int(total["padded_tokens"]), "samples_per_s": total["samples"] / seconds,
                "tokens_per_s": total["tokens"] / seconds,
                "padding_efficiency": total["tokens"] / max(total["padded_tokens"], 1),
                "peak_memory_gb": peak_memory_gb()}
