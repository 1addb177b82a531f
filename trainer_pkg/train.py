"""Fine-tune a text classifier: the recipe, top to bottom.

    accelerate launch [--config_file accelerate_configs/X.yaml] -m trainer_pkg.train [options]
    python -m trainer_pkg.train [options]            # one GPU, or the CPU

load config -> tokenizer and data -> model, optimizer, schedule -> (resume) -> train with
periodic evaluation on the validation split and checkpoints -> export the best model ->
score it once on the test set.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from trainer_pkg.checkpoint import (
    CONFIG_FILE,
    TrainingState,
    checkpoints_dir,
    export_model,
    resolve_resume,
    save_checkpoint,
)
from trainer_pkg.config import TrainConfig, config_from_file, load_config
from trainer_pkg.console import JsonlLog, RunConsole
from trainer_pkg.data import eval_dataloader, load_tokenized, steps_per_epoch, train_dataloader
from trainer_pkg.distributed import fill_deepspeed_config, make_accelerator
from trainer_pkg.errors import UserError, cli
from trainer_pkg.evaluate import TEST_REPORT_FILE, evaluate_and_report
from trainer_pkg.inference import evaluate_dataloader
from trainer_pkg.model import build_model, build_optimizer, build_scheduler, load_tokenizer
from trainer_pkg.preemption import PREEMPTED_EXIT_CODE, StopRequest
from trainer_pkg.tracking import TENSORBOARD_DIR, TrackerLog, resolve_trackers, start_tracking

# Keys that must match to continue a run in the same output directory.
RUN_IDENTITY = ("model", "from_scratch", "model_overrides", "labels", "text_column", "label_column")


def prepare_output_dir(config: TrainConfig, accelerator) -> Path:
    """Refuse to mix two runs in one directory; write the resolved config."""
    output_dir = Path(config.output_dir)
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
    return output_dir


def window_scale(batch_index: int, num_batches: int, grad_accum: int) -> float:
    """grad_accum / (micro-batches in the accumulation window holding this batch)."""
    window_start = batch_index - batch_index % grad_accum
    return grad_accum / min(grad_accum, num_batches - window_start)


def check_resumable(state: TrainingState, accelerator, checkpoint: Path) -> None:
    if state.num_processes != accelerator.num_processes and accelerator.state.deepspeed_plugin is not None:
        raise UserError(
            f"--resume {checkpoint}: saved by {state.num_processes} DeepSpeed processes, now {accelerator.num_processes}; "
            f"ZeRO shards cannot be re-split: resume with {state.num_processes} processes, or convert with "
            f"`python -m trainer_pkg.export {checkpoint} DIR` and start a new run with --model DIR"
        )


def run(config: TrainConfig) -> dict:
    accelerator = make_accelerator(config.mixed_precision, config.grad_accum, config.dist_timeout,
                                   resolve_trackers(config.report_to), str(Path(config.output_dir) / TENSORBOARD_DIR))
    fill_deepspeed_config(accelerator, config.max_grad_norm)
    console = RunConsole(enabled=accelerator.is_main_process)
    # From here on a preemption signal is remembered, even while the data is still loading, and
    # honoured at the first step boundary.
    stop = StopRequest().install(multi_process=accelerator.num_processes > 1)
    set_seed(config.seed)
    output_dir = prepare_output_dir(config, accelerator)
    resume_from = resolve_resume(config)
    start_tracking(accelerator, config)
    log = JsonlLog(output_dir / "log.jsonl" if accelerator.is_main_process else None, also=TrackerLog(accelerator))
    console.rule(f"trainer_pkg: {config.model} -> {output_dir}")
    console.print(
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"precision {accelerator.mixed_precision}, lr {config.effective_lr:g}"
    )

    # --- tokenizer and model (before the data: a bad model path should not wait for tokenizing)
    tokenizer = load_tokenizer(config.tokenizer_name)
    model = build_model(config, config.labels).to(accelerator.device)

    # --- data --------------------------------------------------------------------------------
    with accelerator.main_process_first():
        splits, report = load_tokenized(config, tokenizer, splits=("train", "test"))
    for line in report.lines():
        console.print(line)
    log.write("data", **{"rows": report.rows, "empty_texts": report.empty_texts,
                         "truncated_texts": report.truncated_texts})

    # --- optimizer, schedule, placement -------------------------------------------------------
    optimizer = build_optimizer(model, config)
    train_loader = train_dataloader(splits["train"], tokenizer, config)
    valid_loader = eval_dataloader(splits["validation"], tokenizer, config.eval_batch_size, config.num_workers) \
        if "validation" in splits else None
    test_loader = eval_dataloader(splits["test"], tokenizer, config.eval_batch_size, config.num_workers)
    model, optimizer, train_loader, valid_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, test_loader
    )
    # The scheduler is counted in optimizer steps of this process and stepped by hand: a
    # prepared scheduler would step once per process on every optimizer step.
    per_epoch = steps_per_epoch(len(train_loader), config.grad_accum)
    total_steps = per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = build_scheduler(optimizer, total_steps, config)
    global_batch = config.per_device_batch_size * accelerator.num_processes * config.grad_accum
    console.print(f"{total_steps:,} optimizer steps, global batch {global_batch}, {per_epoch:,} steps per epoch")

    state = TrainingState(num_processes=accelerator.num_processes)
    if resume_from is not None:
        state = TrainingState.read(resume_from)
        check_resumable(state, accelerator, resume_from)
        if resume_from.resolve().parent != checkpoints_dir(output_dir).resolve():
            # The best checkpoint of another directory is not ours to export: track a new best.
            state.best_metric, state.best_checkpoint, state.best_validation = None, None, {}
        accelerator.load_state(str(resume_from))
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

    def validate_and_checkpoint() -> None:
        metrics = evaluate_dataloader(accelerator, model, valid_loader, len(config.labels))
        metrics["step"] = state.optimizer_steps
        score = metrics[config.metric_for_best]
        is_best = state.best_metric is None or score > state.best_metric
        if is_best:
            state.best_metric, state.best_validation = score, metrics
            state.best_checkpoint = f"step-{state.optimizer_steps:08d}"
        console.metrics_table(f"validation @ step {state.optimizer_steps}" + (" (best)" if is_best else ""), metrics)
        log.write("validation", **metrics, best=is_best)
        save_checkpoint(accelerator, state, scheduler, config, model, tokenizer)

    # --- train -------------------------------------------------------------------------------
    model.train()
    running_loss = torch.zeros((), device=accelerator.device)
    running_batches = 0
    window_start, window_samples = time.time(), 0
    console.start_progress("train", total=total_steps, completed=state.optimizer_steps)
    skip = state.batches_in_epoch
    for epoch in range(state.epoch, config.epochs):
        if state.optimizer_steps >= total_steps:
            break
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        state.epoch, state.batches_in_epoch, skip = epoch, skip, 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                # Accelerate divides every loss by grad_accum; an epoch's last window may be
                # shorter, and its gradient must still be a mean, not a fraction of one.
                accelerator.backward(loss * window_scale(state.batches_in_epoch, len(train_loader), config.grad_accum))
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            running_loss += loss.detach()
            running_batches += 1
            window_samples += batch["labels"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.optimizer_steps += 1
            console.advance()

            if state.optimizer_steps % config.log_every == 0 or state.optimizer_steps == total_steps:
                # The only host sync of the step loop, once per log interval.
                mean_loss = accelerator.reduce(running_loss / running_batches, "mean").item()
                if not math.isfinite(mean_loss):
                    raise UserError(
                        f"training loss became {mean_loss} by step {state.optimizer_steps}; lower --lr "
                        f"(now {config.effective_lr:g}); the last checkpoint in {checkpoints_dir(output_dir)} is intact"
                    )
                elapsed = time.time() - window_start
                state.samples_seen += window_samples
                rate = window_samples / elapsed if elapsed > 0 else 0.0
                memory = {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}
                log.write("train", step=state.optimizer_steps, epoch=epoch, loss=mean_loss,
                          lr=scheduler.get_last_lr()[0], samples_per_s=rate, samples_seen=state.samples_seen, **memory)
                console.advance(0, status=f"loss {mean_loss:.4f}  {rate:,.0f} samples/s")
                running_loss.zero_()
                running_batches, window_start, window_samples = 0, time.time(), 0
            if state.optimizer_steps >= total_steps:
                break
            if stop.agreed():
                console.stop_progress()
                save_checkpoint(accelerator, state, scheduler, config, model, tokenizer)
                console.print(f"[yellow]signal {stop.received or 'on a peer'}: checkpoint at step "
                              f"{state.optimizer_steps} saved; exiting with {PREEMPTED_EXIT_CODE} to be resumed")
                log.write("preempted", step=state.optimizer_steps)
                accelerator.end_training()
                return {"preempted": True, "step": state.optimizer_steps}
            if valid_loader is not None and config.eval_every and state.optimizer_steps % config.eval_every == 0:
                validate_and_checkpoint()
            elif config.save_every and state.optimizer_steps % config.save_every == 0:
                save_checkpoint(accelerator, state, scheduler, config, model, tokenizer)
        else:
            # A full pass: the saved position is the start of the next epoch.
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            if epoch + 1 < config.epochs and state.optimizer_steps < total_steps:
                if valid_loader is not None:
                    validate_and_checkpoint()
                else:
                    save_checkpoint(accelerator, state, scheduler, config, model, tokenizer)
    console.stop_progress()
    # Past the last step, finishing (evaluation, export) beats being requeued.
    stop.uninstall()

    # --- final evaluation, export of the best model, test score ------------------------------
    if state.optimizer_steps >= total_steps and state.batches_in_epoch == len(train_loader):
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    if valid_loader is not None:
        validate_and_checkpoint()
    else:
        save_checkpoint(accelerator, state, scheduler, config, model, tokenizer)
    best = state.best_checkpoint or f"step-{state.optimizer_steps:08d}"
    if best != f"step-{state.optimizer_steps:08d}":
        console.print(f"loading the best checkpoint ({best}) for export")
        accelerator.load_state(str(checkpoints_dir(output_dir) / best))
    test_metrics, _ = evaluate_and_report(accelerator, model, test_loader, splits["test"], config, console,
                                          output_dir / TEST_REPORT_FILE, output_dir / "log.jsonl", "test (best model)",
                                          progress="test")
    summary = {
        "best_checkpoint": best,
        "validation": state.best_validation,
        "test": test_metrics,
        "optimizer_steps": state.optimizer_steps,
        "data": {"rows": report.rows, "empty_texts": report.empty_texts, "truncated_texts": report.truncated_texts},
    }
    export_model(accelerator, model, tokenizer, config, output_dir / "model", summary)
    log.write("test", step=state.optimizer_steps, **test_metrics)
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
