"""Fine-tune a text classifier: the recipe, top to bottom.

    accelerate launch [--config_file accelerate_configs/X.yaml] -m trainer_pkg.train [options]
    python -m trainer_pkg.train [options]            # one GPU, or the CPU

load config -> tokenizer and data -> model, optimizer, schedule -> (resume) -> train with
periodic evaluation on the validation split and checkpoints -> export the best model ->
score it once on the test set.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import resource
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, set_seed

from trainer_pkg.checkpoint import (
    CONFIG_FILE,
    TrainingState,
    checkpoints_dir,
    export_model,
    latest_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from trainer_pkg.config import TrainConfig, config_from_file, load_config
from trainer_pkg.console import JsonlLog, RunConsole
from trainer_pkg.data import eval_dataloader, load_tokenized, resolve_columns_and_labels, train_dataloader
from trainer_pkg.distributed import fill_deepspeed_config, launched_processes, make_accelerator
from trainer_pkg.errors import UserError, cli
from trainer_pkg.evaluate import evaluate_and_report
from trainer_pkg.inference import evaluate_dataloader
from trainer_pkg.model import (
    accepts_prepared_mask,
    build_model,
    build_optimizer,
    build_scheduler,
    load_tokenizer,
    model_inputs,
)
from trainer_pkg.numerics import NonFiniteWatch, gradient_norm, weights_are_finite
from trainer_pkg.plan import TrainingPlan, batch_is_default, make_plan, resolve_batch
from trainer_pkg.preemption import PREEMPTED_EXIT_CODE, StopRequest
from trainer_pkg.tracking import TENSORBOARD_DIR, TrackerLog, resolve_trackers, start_tracking
from trainer_pkg.weight_copies import low_precision_weights

# Keys that must match to continue a run in the same output directory.
RUN_IDENTITY = ("model", "from_scratch", "model_overrides", "labels", "text_column", "label_column")

LOCK_FILE = ".trainer_pkg.lock"
# Open for the life of the process: the kernel drops the lock when the process ends, even by SIGKILL.
_held_locks = []


def lock_output_dir(output_dir: Path, accelerator) -> None:
    """One run at a time per output directory, or two runs would overwrite each other's checkpoints."""
    problem = None
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            handle = (output_dir / LOCK_FILE).open("a+", encoding="utf-8")
        except OSError as error:
            problem = f"--output_dir {output_dir}: cannot write there ({error.strerror})"
        else:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                problem = (f"{output_dir} is in use by another run ({holder}); wait for it to end, "
                           "or choose another --output_dir")
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                handle.flush()
                _held_locks.append(handle)
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise UserError(problem)


def resume_problem(saved: TrainConfig | None, state: TrainingState, config: TrainConfig, num_processes: int,
                   deepspeed: bool) -> str | None:
    """Why a checkpoint cannot continue under this configuration, or None."""
    if saved is not None:
        changed = [k for k in RUN_IDENTITY if getattr(saved, k) != getattr(config, k)]
        if changed:
            key = changed[0]
            return (f"saved by a run with another {', '.join(changed)} ({key} was {getattr(saved, key)!r}, now "
                    f"{getattr(config, key)!r}); resume with the same settings, or export it and start a new run "
                    "with --model EXPORT")
    if saved is not None and saved.attention_lr_scale not in (None, config.effective_attention_lr_scale):
        return (f"saved with --attention_lr_scale {saved.attention_lr_scale:g}, now "
                f"{config.effective_attention_lr_scale:g}: the optimizer's parameter groups differ; resume with "
                f"--attention_lr_scale {saved.attention_lr_scale:g}")
    if deepspeed and state.num_processes != num_processes:
        return (f"saved by {state.num_processes} DeepSpeed processes, now {num_processes}; ZeRO shards cannot be "
                f"re-split: resume with {state.num_processes} processes, or convert with "
                "`python -m trainer_pkg.export CHECKPOINT DIR` and start a new run with --model DIR")
    if saved is None:
        return None
    if deepspeed:
        before = saved.per_device_batch_size * state.num_processes * saved.grad_accum
        now = config.per_device_batch_size * num_processes * config.grad_accum
        if before != now:
            return (f"a ZeRO checkpoint of global batch {before} (per-device {saved.per_device_batch_size} x "
                    f"{state.num_processes} processes x accumulation {saved.grad_accum}), now {now}: DeepSpeed keeps "
                    "the batch in its state; resume with the same --per_device_batch_size and --grad_accum")
    if state.batches_in_epoch and saved.per_device_batch_size != config.per_device_batch_size:
        return (f"saved mid-epoch with --per_device_batch_size {saved.per_device_batch_size}, and the position in "
                f"the epoch counts those batches; resume with --per_device_batch_size {saved.per_device_batch_size}")
    return None


def check_resumable(config: TrainConfig, checkpoint: Path, accelerator) -> None:
    saved = config_from_file(checkpoint / CONFIG_FILE) if (checkpoint / CONFIG_FILE).is_file() else None
    problem = resume_problem(saved, TrainingState.read(checkpoint), config, accelerator.num_processes,
                             accelerator.state.deepspeed_plugin is not None)
    if problem:
        raise UserError(f"--resume {checkpoint}: {problem}")


def load_checkpoint_state(accelerator, checkpoint: Path) -> None:
    """Accelerate's load_state: torch.load with weights_only=True, so a pickle that would run code is refused."""
    try:
        accelerator.load_state(str(checkpoint))
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"{checkpoint}: cannot load the checkpoint ({type(error).__name__}: {reason}); "
                        "resume from another checkpoint") from error


def prepare_output_dir(config: TrainConfig, accelerator) -> tuple[Path, Path | None]:
    """Refuse to mix two runs in one directory or to resume what cannot continue; write the resolved config.

    Everything is checked before anything is written: a refused run leaves the directory as it was.
    """
    output_dir = Path(config.output_dir)
    lock_output_dir(output_dir, accelerator)
    resume_from = resolve_resume(config)
    if resume_from is not None:
        check_resumable(config, resume_from, accelerator)
    saved = output_dir / CONFIG_FILE
    # A run that stopped before its first checkpoint left nothing worth protecting.
    holds_work = any(checkpoints_dir(output_dir).glob("step-*")) or (output_dir / "model").exists()
    if holds_work and config.resume is None and not config.overwrite_output_dir:
        raise UserError(
            f"{output_dir} already holds a run ({saved}); pass --resume to continue it, "
            "--overwrite_output_dir to replace it, or another --output_dir"
        )
    if saved.is_file() and config.resume is not None:
        previous = config_from_file(saved)
        changed = [k for k in RUN_IDENTITY if getattr(previous, k) != getattr(config, k)]
        if changed:
            raise UserError(
                f"--resume: {saved} was written by a different run ({', '.join(changed)} differ); "
                "use the same settings or another --output_dir"
            )
    # Every rank has read the old config before the main process replaces it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config.overwrite_output_dir and config.resume is None:
            for stale in (checkpoints_dir(output_dir), output_dir / "model", output_dir / TENSORBOARD_DIR):
                shutil.rmtree(stale, ignore_errors=True)
            (output_dir / "log.jsonl").unlink(missing_ok=True)
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            config.save(saved)
        except OSError as error:
            raise UserError(f"--output_dir {output_dir}: cannot write there ({error.strerror})") from None
    accelerator.wait_for_everyone()
    return output_dir, resume_from


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass
class Throughput:
    """Training throughput of this run (all processes), for the log and benchmarks/."""

    started: float
    samples: int = 0
    tokens: float = 0.0
    padded_tokens: float = 0.0

    def add(self, samples: int, tokens: float, padded_tokens: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.padded_tokens += padded_tokens

    def summary(self) -> dict:
        seconds = time.time() - self.started
        return {"seconds": seconds, "samples": self.samples, "tokens": int(self.tokens),
                "padded_tokens": int(self.padded_tokens), "samples_per_s": self.samples / seconds,
                "tokens_per_s": self.tokens / seconds, "padding_efficiency": self.tokens / max(self.padded_tokens, 1),
                "peak_memory_gb": peak_memory_gb()}


def window_scale(batch_index: int, num_batches: int, grad_accum: int) -> float:
    """grad_accum / (micro-batches in the accumulation window holding this batch)."""
    window_start = batch_index - batch_index % grad_accum
    return grad_accum / min(grad_accum, num_batches - window_start)


def diverged_error(config: TrainConfig, step: int | None, output_dir: Path) -> UserError:
    latest = latest_checkpoint(output_dir)
    kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint was written"
    where = f"at step {step}" if step is not None else "(the weights are no longer finite)"
    return UserError(
        f"training diverged: a non-finite (NaN/inf) loss or gradient {where}; {kept}; lower --lr "
        f"(now {config.effective_lr:g}), or pass --nan_policy skip to drop such steps"
    )


def this_hardware() -> tuple[str, int]:
    """The device type and process count of this launch, known before the process group exists."""
    return ("cuda" if torch.cuda.is_available() else "cpu"), launched_processes()


def show_plan(console: RunConsole, plan: TrainingPlan) -> None:
    console.print(
        f"plan: {plan.num_train_rows:,} training rows, global batch {plan.global_batch_size} = "
        f"{plan.per_device_batch_size} rows per pass x {plan.num_processes} x {plan.grad_accum} accumulated "
        f"({plan.device}); lr {plan.lr:.3g}, {plan.warmup_steps:,} warmup steps; {plan.epochs} epoch(s) "
        f"of {plan.steps_per_epoch:,} steps, {plan.total_steps:,} in all"
        + (f"; early stopping after {plan.early_stopping_patience} validations without a better score"
           if plan.early_stopping_patience else "")
    )
    for note in plan.notes:
        console.print(f"[yellow]{note}")


def dry_run(config: TrainConfig) -> dict:
    """The plan of a run, printed (a table, then one JSON line), without training or a process group."""
    device, processes = this_hardware()
    device, processes = config.assume_device or device, config.assume_processes or processes
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    default_batch = batch_is_default(config)
    config = resolve_batch(resolve_columns_and_labels(config), device, processes)
    console = RunConsole(enabled=True)
    tokenizer = load_tokenizer(config.tokenizer_name)
    splits, report = load_tokenized(config, tokenizer)
    for line in report.lines():
        console.print(line)
    loader = train_dataloader(splits["train"], tokenizer, config)
    plan = make_plan(config, device, processes, len(splits["train"]), len(loader), default_batch)
    console.metrics_table("plan (dry run: nothing trained)", {k: v for k, v in plan.to_dict().items() if k != "notes"})
    for note in plan.notes:
        console.print(f"[yellow]{note}")
    print(json.dumps(plan.to_dict()), flush=True)
    return {"dry_run": plan.to_dict()}


def run(config: TrainConfig) -> dict:
    if config.dry_run:
        return dry_run(config)
    device, processes = this_hardware()
    default_batch = batch_is_default(config)
    config = resolve_batch(config, device, processes)
    accelerator = make_accelerator(config.mixed_precision, config.grad_accum, config.dist_timeout,
                                   resolve_trackers(config.report_to), str(Path(config.output_dir) / TENSORBOARD_DIR))
    fill_deepspeed_config(accelerator, config.max_grad_norm)
    # The text column and the class names come from the data when not given: the model's head and
    # the saved run config need them.
    with accelerator.main_process_first():
        config = resolve_columns_and_labels(config)
    if config.nan_policy == "skip" and accelerator.state.deepspeed_plugin is not None:
        raise UserError("--nan_policy skip: DeepSpeed steps its optimizer itself and cannot skip a step; "
                        "use --nan_policy stop")
    console = RunConsole(enabled=accelerator.is_main_process)
    # From here on a preemption signal is remembered, even while the data is still loading, and
    # honoured at the first step boundary.
    stop = StopRequest().install(multi_process=accelerator.num_processes > 1, timeout_s=config.dist_timeout)
    set_seed(config.seed)
    output_dir, resume_from = prepare_output_dir(config, accelerator)
    start_tracking(accelerator, config)
    log = JsonlLog(output_dir / "log.jsonl" if accelerator.is_main_process else None, also=TrackerLog(accelerator))
    console.rule(f"trainer_pkg: {config.model} -> {output_dir}")
    console.print(
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"precision {accelerator.mixed_precision}, lr {config.effective_lr:g}"
    )

    # --- tokenizer and model (before the data: a bad model path should not wait for tokenizing)
    tokenizer = load_tokenizer(config.tokenizer_name)
    model = build_model(config, config.labels, console.print).to(accelerator.device)
    prepared_mask = accepts_prepared_mask(model)
    if config.compile:
        # In place (Module.compile): parameter names, checkpoints and the export stay those of the
        # plain model. Batch lengths vary: dynamic shapes compile once, not per length.
        model.compile(dynamic=True)

    # --- data --------------------------------------------------------------------------------
    with accelerator.main_process_first():
        splits, report = load_tokenized(config, tokenizer)
    for line in report.lines():
        console.print(line)
    log.write("data", **report.counts())

    # --- optimizer, schedule, placement -------------------------------------------------------
    optimizer = build_optimizer(model, config)
    train_loader = train_dataloader(splits["train"], tokenizer, config)
    plan = make_plan(config, device, accelerator.num_processes, len(splits["train"]), len(train_loader), default_batch)
    show_plan(console, plan)
    log.write("plan", **plan.to_dict())
    valid_loader = eval_dataloader(splits["validation"], tokenizer, config.eval_batch_size, config.num_workers) \
        if "validation" in splits else None
    # Without a test split the best model is scored on the validation split, which chose it.
    scored = "test" if "test" in splits else "validation"
    test_loader = eval_dataloader(splits[scored], tokenizer, config.eval_batch_size, config.num_workers)
    model, optimizer, train_loader, valid_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, test_loader
    )
    # The scheduler is counted in optimizer steps of this process and stepped by hand: a
    # prepared scheduler would step once per process on every optimizer step.
    total_steps = plan.total_steps
    scheduler = build_scheduler(optimizer, total_steps, plan.warmup_steps)
    if config.max_tokens_per_batch:
        global_batch = f"up to {config.max_tokens_per_batch * accelerator.num_processes * config.grad_accum:,} tokens"
    else:
        global_batch = f"{plan.global_batch_size}"

    state = TrainingState(num_processes=accelerator.num_processes)
    if resume_from is not None:
        state = TrainingState.read(resume_from)
        if resume_from.resolve().parent != checkpoints_dir(output_dir).resolve():
            # The best checkpoint of another directory is not ours to export: track a new best.
            state.best_metric, state.best_checkpoint, state.best_validation = None, None, {}
        load_checkpoint_state(accelerator, resume_from)
        scheduler.load_state_dict(state.scheduler)
        if state.num_processes != accelerator.num_processes:
            # Rank r reads global batches r, r+n, ...: the first k*n global batches are done.
            done = state.batches_in_epoch * state.num_processes
            state.batches_in_epoch = done // accelerator.num_processes
            console.print(f"[yellow]resuming a {state.num_processes}-process run on {accelerator.num_processes} "
                          f"processes: global batch is now {global_batch}; "
                          f"{done - state.batches_in_epoch * accelerator.num_processes} batches are seen again")
            state.num_processes = accelerator.num_processes
        console.print(f"resumed from {resume_from} (step {state.optimizer_steps}, epoch {state.epoch})")

    watch = NonFiniteWatch(accelerator.device)
    # bf16 weights cast once per optimizer step, not in every forward (trainer_pkg/weight_copies.py).
    bf16_weights = low_precision_weights(model, optimizer, accelerator, config.cast_weights_once and not config.compile)
    if bf16_weights is not None:
        console.print(f"Linear weights cast to bf16 once per optimizer step ({len(bf16_weights.copies)} tensors), "
                      "not in every forward")

    def require_finite() -> None:
        """Before anything that trusts the weights (evaluation, a checkpoint). Call on all ranks."""
        first_bad = watch.first_bad(accelerator)
        if first_bad is not None or not weights_are_finite(accelerator, model):
            raise diverged_error(config, first_bad, output_dir)

    def checkpoint() -> None:
        require_finite()
        save_checkpoint(accelerator, state, scheduler, config, model, tokenizer)

    def validate_and_checkpoint() -> None:
        require_finite()
        metrics = evaluate_dataloader(accelerator, model, valid_loader, len(config.labels))
        metrics["step"] = state.optimizer_steps
        score = metrics[config.metric_for_best]
        is_best = state.best_metric is None or score > state.best_metric
        if is_best:
            state.best_metric, state.best_validation = score, metrics
            state.best_checkpoint = f"step-{state.optimizer_steps:08d}"
            state.validations_since_best = 0
        else:
            state.validations_since_best += 1
        patience = config.early_stopping_patience
        state.stopped_early = bool(patience) and state.validations_since_best >= patience
        console.metrics_table(f"validation @ step {state.optimizer_steps}" + (" (best)" if is_best else ""), metrics)
        log.write("validation", **metrics, best=is_best)
        save_checkpoint(accelerator, state, scheduler, config, model, tokenizer)
        if state.stopped_early:
            console.print(f"early stopping at step {state.optimizer_steps}: {patience} validations without a better "
                          f"{config.metric_for_best} than {state.best_metric:.4f} ({state.best_checkpoint})")

    # --- train -------------------------------------------------------------------------------
    model.train()
    running_loss = torch.zeros((), device=accelerator.device)
    running_batches = 0
    # The window's losses join the running mean only if its step is applied.
    window_loss = torch.zeros((), device=accelerator.device)
    window_batches = 0
    # Real (unpadded) tokens stay on the device until the log interval: no host sync per step.
    running_tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    padded_tokens = 0
    window_start, window_samples = time.time(), 0
    throughput = Throughput(started=time.time())
    console.start_progress("train", total=total_steps, completed=state.optimizer_steps)
    skip = state.batches_in_epoch
    for epoch in range(state.epoch, config.epochs):
        if state.optimizer_steps >= total_steps or state.stopped_early:
            break
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        state.epoch, state.batches_in_epoch, skip = epoch, skip, 0
        for batch in batches:
            skip_step = False
            with accelerator.accumulate(model):
                inputs = model_inputs(batch, prepared_mask)
                loss = (model(**inputs) if bf16_weights is None else bf16_weights.forward(model, inputs)).loss
                watch.observe(loss)
                # Accelerate divides every loss by grad_accum; an epoch's last window may be
                # shorter, and its gradient must still be a mean, not a fraction of one.
                accelerator.backward(loss * window_scale(state.batches_in_epoch, len(train_loader), config.grad_accum))
                if bf16_weights is not None:
                    bf16_weights.move_gradients()
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm) \
                        if config.max_grad_norm else None
                    watch.observe(norm)
                    if config.nan_policy == "skip" and accelerator.scaler is None:
                        # The one host sync per step this policy costs (see trainer_pkg.numerics).
                        skip_step = not torch.isfinite(torch.as_tensor(norm if norm is not None else gradient_norm(model))).item()
                if not skip_step:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            window_loss += loss.detach()
            window_batches += 1
            running_tokens += batch["attention_mask"].sum()
            padded_tokens += batch["input_ids"].numel()
            window_samples += batch["labels"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            # fp16: the loss scaler skips steps whose scaled gradients overflowed, and lowers the scale.
            overflow = not skip_step and accelerator.optimizer_step_was_skipped
            watch.close_window(state.optimizer_steps + 1, excused=skip_step or overflow)
            if skip_step or overflow:
                state.skipped_non_finite += skip_step
                state.skipped_overflow += overflow
            else:
                scheduler.step()
                running_loss += window_loss
                running_batches += window_batches
            window_loss.zero_()
            window_batches = 0
            state.optimizer_steps += 1
            console.advance()

            if state.optimizer_steps % config.log_every == 0 or state.optimizer_steps == total_steps:
                # The only host syncs of the step loop (with --nan_policy stop), once per log interval.
                first_bad = watch.first_bad(accelerator)
                if first_bad is not None:
                    raise diverged_error(config, first_bad, output_dir)
                mean = running_loss / running_batches if running_batches else torch.full_like(running_loss, float("nan"))
                window = torch.stack([mean.double(), running_tokens,
                                      torch.tensor(float(padded_tokens), device=accelerator.device, dtype=torch.float64)])
                loss_sum, tokens, padded = accelerator.reduce(window, "sum").tolist()
                mean_loss = loss_sum / accelerator.num_processes
                elapsed = time.time() - window_start
                state.samples_seen += window_samples
                rate = window_samples / elapsed if elapsed > 0 else 0.0
                throughput.add(window_samples, tokens, padded)
                skipped = {"skipped_non_finite": state.skipped_non_finite, "skipped_overflow": state.skipped_overflow}
                # A window whose every step was skipped has no loss to report: null, not NaN.
                log.write("train", step=state.optimizer_steps, epoch=epoch, loss=mean_loss if running_batches else None,
                          lr=scheduler.get_last_lr()[0], samples_per_s=rate, tokens_per_s=tokens / max(elapsed, 1e-9),
                          padding_efficiency=tokens / max(padded, 1), samples_seen=state.samples_seen,
                          peak_memory_gb=peak_memory_gb(), **skipped)
                notes = "".join(f"  {count} steps skipped ({why})" for why, count in
                                (("non-finite", state.skipped_non_finite), ("fp16 overflow", state.skipped_overflow)) if count)
                shown = f"{mean_loss:.4f}" if running_batches else "n/a"
                console.advance(0, status=f"loss {shown}  {rate:,.0f} samples/s{notes}")
                running_loss.zero_()
                running_tokens.zero_()
                running_batches, padded_tokens, window_start, window_samples = 0, 0, time.time(), 0
            if state.optimizer_steps >= total_steps:
                break
            if stop.agreed():
                console.stop_progress()
                checkpoint()
                console.print(f"[yellow]signal {stop.received or 'on a peer'}: checkpoint at step "
                              f"{state.optimizer_steps} saved; exiting with {PREEMPTED_EXIT_CODE} to be resumed")
                log.write("preempted", step=state.optimizer_steps)
                accelerator.end_training()
                return {"preempted": True, "step": state.optimizer_steps}
            if valid_loader is not None and config.eval_every and state.optimizer_steps % config.eval_every == 0:
                validate_and_checkpoint()
                if state.stopped_early:
                    break
            elif config.save_every and state.optimizer_steps % config.save_every == 0:
                checkpoint()
        else:
            # A full pass: the saved position is the start of the next epoch.
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            if epoch + 1 < config.epochs and state.optimizer_steps < total_steps:
                if valid_loader is not None:
                    validate_and_checkpoint()
                else:
                    checkpoint()
    console.stop_progress()
    log.write("train_summary", **throughput.summary())
    # Past the last step, finishing (evaluation, export) beats being requeued.
    stop.uninstall()

    # --- final evaluation, export of the best model, test score ------------------------------
    if state.optimizer_steps >= total_steps and state.batches_in_epoch == len(train_loader):
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    # A run that stopped early was validated and saved at this very step.
    if not state.stopped_early:
        if valid_loader is not None:
            validate_and_checkpoint()
        else:
            checkpoint()
    if state.skipped_non_finite or state.skipped_overflow:
        console.print(f"[yellow]skipped optimizer steps: {state.skipped_non_finite} with a non-finite gradient "
                      f"(--nan_policy skip), {state.skipped_overflow} fp16 overflows (the loss scaler lowered its scale)")
    best = state.best_checkpoint or f"step-{state.optimizer_steps:08d}"
    if best != f"step-{state.optimizer_steps:08d}":
        console.print(f"loading the best checkpoint ({best}) for export")
        load_checkpoint_state(accelerator, checkpoints_dir(output_dir) / best)
    if scored != "test":
        console.print("[yellow]no test split: the report is on the validation split, which also chose the checkpoint "
                      "(give --test_file for an unbiased score)")
    test_started = time.time()
    test_metrics, _ = evaluate_and_report(accelerator, model, test_loader, splits[scored], config, console,
                                          output_dir / f"{scored}_report.json", output_dir / "log.jsonl",
                                          f"{scored} (best model)", progress=scored)
    test_seconds = time.time() - test_started
    summary = {
        "best_checkpoint": best,
        "validation": state.best_validation,
        "test": test_metrics if scored == "test" else None,
        "optimizer_steps": state.optimizer_steps,
        "stopped_early": state.stopped_early,
        "skipped_steps": {"non_finite": state.skipped_non_finite, "fp16_overflow": state.skipped_overflow},
        "data": report.counts(),
        "plan": plan.to_dict(),
    }
    export_model(accelerator, model, tokenizer, config, output_dir / "model", summary)
    # The step of the weights scored: the best checkpoint's, not the last step's.
    if scored == "test":
        log.write("test", step=state.best_validation.get("step", state.optimizer_steps), **test_metrics,
                  seconds=test_seconds)
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        console.print(f"exported {output_dir / 'model'}")
    accelerator.end_training()
    return summary


def main(argv: list[str]) -> int:
    summary = run(load_config(argv))
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


def cli_main() -> None:
    cli(main)


if __name__ == "__main__":
    cli_main()
