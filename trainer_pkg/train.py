"""Fine-tune a text classifier: the recipe, top to bottom.

    accelerate launch [--config_file accelerate_configs/X.yaml] -m trainer_pkg.train [options]
    python -m trainer_pkg.train [options]            # one GPU, or the CPU

setup: config -> accelerator and output directory -> tokenizer, model, data -> the plan (global
batch, lr, epochs) -> optimizer, schedule, placement -> (resume).
fit: the step over every batch, a log record per interval, validation and checkpoints as due.
finish: the best checkpoint, scored once on the test split (the validation split when there is
none), exported as a transformers model directory.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    # The options are config.py's: answer --help without importing torch, transformers and
    # datasets, which take seconds.
    from trainer_pkg.config import given_settings

    given_settings(sys.argv[1:])

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from datasets import Dataset

from trainer_pkg.checkpoint import export_model, load_checkpoint, save_checkpoint
from trainer_pkg.config import TrainConfig, config_from_settings, given_settings
from trainer_pkg.console import JsonlLog, RunConsole
from trainer_pkg.data import DataReport, eval_dataloader, load_tokenized, resolve_columns_and_labels, train_dataloader
from trainer_pkg.distributed import end_processes, fill_deepspeed_config, make_accelerator
from trainer_pkg.errors import UserError, cli
from trainer_pkg.evaluate import ReportOptions, evaluate_and_report
from trainer_pkg.inference import eval_batch_size, evaluate_dataloader
from trainer_pkg.loop import TrainMeter, TrainStep
from trainer_pkg.model import (
    accepts_prepared_mask,
    build_model,
    build_optimizer,
    build_scheduler,
    encoder_width,
    load_tokenizer,
    require_weights,
)
from trainer_pkg.plan import (
    TrainingPlan,
    batch_is_default,
    dry_run,
    make_plan,
    resolve_batch,
    resolve_schedule,
    show_plan,
    this_hardware,
)
from trainer_pkg.preemption import PREEMPTED_EXIT_CODE, CheckpointClock, StopRequest
from trainer_pkg.run_dir import (
    LOG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    TENSORBOARD_DIR,
    TrainingState,
    checkpoint_name,
    checkpoints_dir,
    continue_saved_settings,
    prepare_output_dir,
    save_run_config,
)
from trainer_pkg.tracking import TrackerLog, resolve_trackers, start_tracking, tracking_line
from trainer_pkg.weight_copies import low_precision_weights


@dataclass
class Run:
    """What setup builds and fit and finish use."""

    config: TrainConfig
    accelerator: object
    console: RunConsole
    log: JsonlLog
    stop: StopRequest
    clock: CheckpointClock
    tokenizer: object
    model: torch.nn.Module
    step: TrainStep
    train_loader: object
    valid_loader: object | None
    scored_loader: object
    scored_split: str  # "test", or "validation" when there is no test split
    scored_rows: Dataset
    report: DataReport
    plan: TrainingPlan
    state: TrainingState

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def start(config: TrainConfig, settings: dict | None,
          changes: dict) -> tuple[TrainConfig, object, RunConsole, StopRequest, Path | None]:
    """The accelerator, the console and the output directory; the checkpoint to resume from."""
    device, processes = this_hardware()
    config = resolve_batch(config, device, processes)
    trackers, tensorboard_dir = resolve_trackers(config.report_to), Path(config.output_dir) / TENSORBOARD_DIR
    accelerator = make_accelerator(config.mixed_precision, config.grad_accum, config.dist_timeout, trackers,
                                   str(tensorboard_dir))
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
    resume_from = prepare_output_dir(config, accelerator, settings)
    console.rule(f"trainer_pkg: {config.model} -> {config.output_dir}")
    console.print(f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
                  f"precision {accelerator.mixed_precision}")
    console.print(tracking_line(trackers, config, tensorboard_dir))
    if changes:
        console.warn("--resume continues the saved run with " + ", ".join(
            f"{key} {before!r} -> {now!r}" for key, (before, now) in changes.items()))
    return config, accelerator, console, stop, resume_from


def setup(config: TrainConfig, settings: dict | None = None, changes: dict | None = None) -> Run:
    """`settings`: as given (saved for --resume); `changes`: what --resume changed of the saved run."""
    default_batch = batch_is_default(config)
    config, accelerator, console, stop, resume_from = start(config, settings, changes or {})
    log = JsonlLog(Path(config.output_dir) / LOG_FILE if accelerator.is_main_process else None,
                   also=TrackerLog(accelerator))
    # The model before the data: a bad model path should not wait for tokenizing.
    tokenizer = load_tokenizer(config.tokenizer_name)
    model = build_model(config, config.labels, console.print).to(accelerator.device)
    prepared_mask = accepts_prepared_mask(model)
    if config.compile:
        # In place (Module.compile): parameter names, checkpoints and the export stay those of the
        # plain model. Batch lengths vary: dynamic shapes compile once, not per length.
        model.compile(dynamic=True)
    with accelerator.main_process_first():
        splits, report = load_tokenized(config, tokenizer)
    for line in report.lines():
        console.print(line)
    log.write("data", **report.counts())

    train_loader = train_dataloader(splits["train"], tokenizer, config)
    config = resolve_schedule(config, len(train_loader), accelerator.num_processes, encoder_width(config))
    plan = make_plan(config, accelerator.device.type, accelerator.num_processes, len(splits["train"]),
                     len(train_loader), default_batch)
    show_plan(console, plan)
    # The saved config and the trackers' hyperparameters are the resolved ones: the lr waits for the corpus.
    save_run_config(config, accelerator)
    start_tracking(accelerator, config)
    log.write("plan", **plan.to_dict())
    eval_batch = eval_batch_size(config.eval_batch_size, accelerator.device.type)
    valid_loader = eval_dataloader(splits["validation"], tokenizer, eval_batch, config.num_workers) \
        if "validation" in splits else None
    # Without a test split the best model is scored on the validation split, which chose it.
    scored = "test" if "test" in splits else "validation"
    scored_loader = eval_dataloader(splits[scored], tokenizer, eval_batch, config.num_workers)
    optimizer = build_optimizer(model, config)
    model, optimizer, train_loader, valid_loader, scored_loader = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, scored_loader)
    # Counted in optimizer steps and stepped by TrainStep: a prepared scheduler would step once per
    # process on every optimizer step.
    scheduler = build_scheduler(optimizer, plan.total_steps, plan.warmup_steps)
    low_precision = low_precision_weights(model, optimizer, accelerator, config.cast_weights_once and not config.compile)
    if low_precision is not None:
        console.print(f"Linear weights cast to bf16 once per optimizer step ({len(low_precision.copies)} tensors), "
                      "not in every forward")
    step = TrainStep(accelerator, model, optimizer, scheduler, config, len(train_loader), prepared_mask, low_precision)
    run = Run(config, accelerator, console, log, stop, CheckpointClock(config.save_every_minutes), tokenizer, model,
              step, train_loader, valid_loader, scored_loader, scored, splits[scored], report, plan,
              TrainingState(num_processes=accelerator.num_processes))
    if resume_from is not None:
        restore(run, resume_from)
    return run


def restore(run: Run, checkpoint: Path) -> None:
    """Continue from a checkpoint: weights, optimizer, RNG, schedule and the position in the epoch."""
    state = run.state = TrainingState.read(checkpoint)
    if checkpoint.resolve().parent != checkpoints_dir(run.output_dir).resolve():
        # The best checkpoint of another directory is not ours to export: track a new best.
        state.best_metric, state.best_checkpoint, state.best_validation = None, None, {}
    load_checkpoint(run.accelerator, checkpoint)
    run.step.scheduler.load_state_dict(state.scheduler)
    processes = run.accelerator.num_processes
    if state.num_processes != processes:
        # Rank r reads global batches r, r+n, ...: the first k*n global batches are done.
        done = state.batches_in_epoch * state.num_processes
        state.batches_in_epoch = done // processes
        run.console.warn(f"resuming a {state.num_processes}-process run on {processes} processes: global "
                          f"batch is now {run.plan.global_batch_size}; {done - state.batches_in_epoch * processes} "
                          "batches are seen again")
        state.num_processes = processes
    run.console.print(f"resumed from {checkpoint} (step {state.optimizer_steps}, epoch {state.epoch})")


def validate(run: Run) -> None:
    """Score the validation split; keep the best score and count validations for early stopping."""
    state, config = run.state, run.config
    metrics = evaluate_dataloader(run.accelerator, run.model, run.valid_loader, len(config.labels))
    metrics["step"] = state.optimizer_steps
    score = metrics[config.metric_for_best]
    is_best = state.best_metric is None or score > state.best_metric
    if is_best:
        state.best_metric, state.best_validation = score, metrics
        state.best_checkpoint = checkpoint_name(state.optimizer_steps)
        state.validations_since_best = 0
    else:
        state.validations_since_best += 1
    state.last_validated_step = state.optimizer_steps
    patience = config.early_stopping_patience
    state.stopped_early = bool(patience) and state.validations_since_best >= patience
    run.console.metrics_table(f"validation @ step {state.optimizer_steps}" + (" (best)" if is_best else ""), metrics)
    run.log.write("validation", **metrics, best=is_best)
    if state.stopped_early:
        run.console.print(f"early stopping at step {state.optimizer_steps}: {patience} validations without a better "
                          f"{config.metric_for_best} than {state.best_metric:.4f} ({state.best_checkpoint})")


def save(run: Run, validate_first: bool) -> None:
    """A checkpoint, after a validation when asked (once per step, and only with a validation split).

    Every checkpoint and validation goes through here; never from weights that are not finite."""
    run.step.require_finite()
    state = run.state
    if validate_first and run.valid_loader is not None and state.last_validated_step != state.optimizer_steps:
        validate(run)
    save_checkpoint(run.accelerator, state, run.step.scheduler, run.config, run.model, run.tokenizer)
    run.clock.restart()


def save_if_due(run: Run, minutes_passed: bool) -> None:
    """Validate and checkpoint at --eval_every, checkpoint at --save_every or when the clock says so."""
    config, step = run.config, run.state.optimizer_steps
    if run.valid_loader is not None and config.eval_every and step % config.eval_every == 0:
        save(run, validate_first=True)
    elif (config.save_every and step % config.save_every == 0) or minutes_passed:
        save(run, validate_first=False)


def log_training(run: Run, meter: TrainMeter, epoch: int) -> None:
    """One log record and progress line per interval: the loop's only host sync (with --nan_policy stop)."""
    run.step.require_finite(weights=False)
    state = run.state
    record = meter.flush()
    state.samples_seen += record.pop("samples")
    skipped = {"skipped_non_finite": state.skipped_non_finite, "skipped_overflow": state.skipped_overflow}
    run.log.write("train", step=state.optimizer_steps, epoch=epoch, lr=run.step.scheduler.get_last_lr()[0],
                  samples_seen=state.samples_seen, **record, **skipped)
    notes = "".join(f"  {count} steps skipped ({why})" for why, count in
                    (("non-finite", state.skipped_non_finite), ("fp16 overflow", state.skipped_overflow)) if count)
    loss = f"{record['loss']:.4f}" if record["loss"] is not None else "n/a"
    run.console.advance(0, status=f"loss {loss}  {record['samples_per_s']:,.0f} samples/s{notes}")


def stop_for_resume(run: Run) -> None:
    run.console.stop_progress()
    save(run, validate_first=False)
    name = signal.Signals(run.stop.received).name if run.stop.received else "a signal on another process"
    run.console.warn(f"{name}: checkpoint at step {run.state.optimizer_steps} saved; exiting with "
                      f"{PREEMPTED_EXIT_CODE}; --resume continues the run")
    run.log.write("preempted", step=run.state.optimizer_steps)


def fit(run: Run) -> bool:
    """Train to the planned steps, or until early stopping or a stop signal; True if a signal stopped it."""
    state, config, total = run.state, run.config, run.plan.total_steps
    meter = TrainMeter(run.accelerator)
    run.model.train()
    run.console.start_progress("train", total=total, completed=state.optimizer_steps)
    resume_at = state.batches_in_epoch
    run.clock.restart()
    for epoch in range(state.epoch, config.epochs):
        if state.optimizer_steps >= total or state.stopped_early:
            break
        run.train_loader.set_epoch(epoch)
        batches = run.accelerator.skip_first_batches(run.train_loader, resume_at) if resume_at else run.train_loader
        state.epoch, state.batches_in_epoch, resume_at = epoch, resume_at, 0
        for batch in batches:
            result = run.step(batch, state)
            meter.add(result, batch)
            if not result.stepped:
                continue
            run.console.advance()
            if state.optimizer_steps % config.log_every == 0 or state.optimizer_steps == total:
                log_training(run, meter, epoch)
            if state.optimizer_steps >= total:
                break
            stop, minutes_passed = run.stop.agreed(checkpoint_due=run.clock.due())
            if stop:
                stop_for_resume(run)
                return True
            save_if_due(run, minutes_passed)
            if state.stopped_early:
                break
        else:
            # A full pass: the saved position is the start of the next epoch.
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            if epoch + 1 < config.epochs and state.optimizer_steps < total:
                save(run, validate_first=True)
    run.console.stop_progress()
    run.log.write("train_summary", **meter.summary())
    return False


def finish(run: Run) -> dict:
    """The last checkpoint, the best model scored once and exported; metrics.json."""
    state, console, accelerator = run.state, run.console, run.accelerator
    if state.optimizer_steps >= run.plan.total_steps and state.batches_in_epoch == len(run.train_loader):
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    # A run that stopped early was validated and saved at this very step.
    if not state.stopped_early:
        save(run, validate_first=True)
    if state.skipped_non_finite or state.skipped_overflow:
        console.warn(f"skipped optimizer steps: {state.skipped_non_finite} with a non-finite gradient "
                      f"(--nan_policy skip), {state.skipped_overflow} fp16 overflows (the loss scaler lowered its scale)")
    best = state.best_checkpoint or checkpoint_name(state.optimizer_steps)
    if best != checkpoint_name(state.optimizer_steps):
        console.print(f"loading the best checkpoint ({best}) for export")
        load_checkpoint(accelerator, checkpoints_dir(run.output_dir) / best)
    scored = run.scored_split
    if scored != "test":
        console.warn("no test split: the report is on the validation split, which also chose the checkpoint "
                      "(give --test_file for an unbiased score)")
    started = time.time()
    metrics, _ = evaluate_and_report(accelerator, run.model, run.scored_loader, run.scored_rows, run.config, console,
                                     ReportOptions(run.output_dir / f"{scored}_report.json", f"{scored} (best model)",
                                                   run.output_dir / LOG_FILE, progress=scored))
    seconds = time.time() - started
    summary = {
        "best_checkpoint": best,
        "validation": state.best_validation,
        "test": metrics if scored == "test" else None,
        "optimizer_steps": state.optimizer_steps,
        "stopped_early": state.stopped_early,
        "skipped_steps": {"non_finite": state.skipped_non_finite, "fp16_overflow": state.skipped_overflow},
        "data": run.report.counts(),
        "plan": run.plan.to_dict(),
    }
    export_model(accelerator, run.model, run.tokenizer, run.config, run.output_dir / MODEL_DIR, summary)
    if scored == "test":
        # The step of the weights scored: the best checkpoint's, not the last step's.
        run.log.write("test", step=state.best_validation.get("step", state.optimizer_steps), **metrics, seconds=seconds)
    if accelerator.is_main_process:
        (run.output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        console.print(f"exported {run.output_dir / MODEL_DIR}")
    return summary


def run(config: TrainConfig, settings: dict | None = None, changes: dict | None = None) -> dict:
    # Before anything is planned or written: a plan for weights that are not there would be wrong.
    require_weights(config)
    if config.dry_run:
        return dry_run(config)
    training = setup(config, settings, changes)
    if fit(training):
        end_processes(training.accelerator)
        return {"preempted": True, "step": training.state.optimizer_steps}
    # Past the last step, finishing (evaluation, export) beats being requeued.
    training.stop.uninstall()
    summary = finish(training)
    end_processes(training.accelerator)
    return summary


def main(argv: list[str]) -> int:
    settings, changes = continue_saved_settings(given_settings(argv))
    summary = run(config_from_settings(settings), settings, changes)
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


def cli_main() -> None:
    cli(main)


if __name__ == "__main__":
    cli_main()
