"""The output directory of a run: its layout, its lock, and what may start or continue in it.

    run_settings.yaml        the settings as given (config file and flags): what --resume continues
    run_config.yaml          the resolved configuration of the run
    log.jsonl                every logged step and evaluation
    metrics.json             the summary of a finished run
    checkpoints/step-00000100/ a complete training state (trainer_pkg.checkpoint); complete once
                             its trainer_state.json, written last, is there
    checkpoints/latest       the name of the newest complete checkpoint
    model/                   the exported best model, its training_config.yaml and metrics.json
    tensorboard/             tracker files, when TensorBoard logs

Everything is checked before anything is written: a refused run leaves the directory as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import broadcast_object_list

from trainer_pkg.config import FIELD_NAMES, NOT_SAVED, TrainConfig, coerce, config_from_file, load_yaml
from trainer_pkg.errors import UserError

SETTINGS_FILE = "run_settings.yaml"
CONFIG_FILE = "run_config.yaml"
EXPORT_CONFIG_FILE = "training_config.yaml"  # the run config, inside an exported model directory
STATE_FILE = "trainer_state.json"
LATEST = "latest"
TRASH_PREFIX = ".trash-"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".trainer_pkg.lock"

# Keys that must match to continue a run in the same output directory.
RUN_IDENTITY = ("model", "from_scratch", "model_overrides", "labels", "text_column", "label_column")
# What --resume refuses to change: the run's identity and its data.
RUN_DEFINING = (*RUN_IDENTITY, "tokenizer", "scratch_init", "max_length", "data", "train_file", "validation_file",
                "test_file", "id_column", "validation_size", "max_train_samples", "max_eval_samples", "seed",
                "group_by_length")
# Every other setting may change on --resume, and the run says which did: how it reports and
# checkpoints, and also what it learns from here on (lr, epochs, batch), which is a user's call.

# Open for the life of the process: the kernel drops the lock when the process ends, even by SIGKILL.
_held_locks = []


@dataclass
class TrainingState:
    """Where training stands; saved in every checkpoint and restored on resume."""

    epoch: int = 0
    batches_in_epoch: int = 0  # per process
    num_processes: int = 1
    optimizer_steps: int = 0
    samples_seen: int = 0
    skipped_non_finite: int = 0  # optimizer steps dropped by --nan_policy skip
    skipped_overflow: int = 0  # fp16 steps the loss scaler skipped
    best_metric: float | None = None
    best_checkpoint: str | None = None
    best_validation: dict = field(default_factory=dict)
    validations_since_best: int = 0  # for --early_stopping_patience
    last_validated_step: int | None = None  # an epoch that ends where a validation was due is not validated twice
    stopped_early: bool = False
    scheduler: dict = field(default_factory=dict)

    @classmethod
    def read(cls, checkpoint: Path) -> TrainingState:
        path = checkpoint / STATE_FILE
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UserError(f"{checkpoint}: not a trainer_pkg checkpoint (no {STATE_FILE})") from None
        except (json.JSONDecodeError, TypeError) as error:
            raise UserError(f"{path}: unreadable training state ({error}); resume from an earlier checkpoint") from None


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / STATE_FILE).is_file()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if candidate.name.startswith("step-") and is_complete(candidate):
            return candidate
    # No pointer, or one naming nothing: a crash after a checkpoint was published but before the
    # pointer moved, or while a checkpoint of the same step was being replaced. Any complete
    # checkpoint resumes exactly; the newest loses the least work.
    complete = [p for p in root.glob("step-*") if is_complete(p)]
    complete += [p for p in root.glob(f"{TRASH_PREFIX}step-*") if is_complete(p)]
    if not complete:
        return None
    return max(complete, key=lambda p: (p.name.removeprefix(TRASH_PREFIX), not p.name.startswith(TRASH_PREFIX)))


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start."""
    if config.resume is None:
        return None
    if config.resume == "auto":
        return latest_checkpoint(config.output_dir)
    if config.resume == "latest":
        found = latest_checkpoint(config.output_dir)
        if found is None:
            raise UserError(
                f"--resume: no complete checkpoint in {checkpoints_dir(config.output_dir)}; "
                "run without --resume to start fresh"
            )
        return found
    path = Path(config.resume)
    if not is_complete(path):
        raise UserError(f"--resume {config.resume}: not a complete trainer_pkg checkpoint (no {STATE_FILE})")
    return path


def continue_saved_settings(given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple]]:
    """With --resume: the saved run's settings, updated by those given now. A change to a
    RUN_DEFINING key is refused, naming it; returns the settings and {key: (before, now)} for the
    other changes."""
    output_dir = Path(given.get("output_dir", TrainConfig.output_dir))
    saved_file = output_dir / SETTINGS_FILE
    if given.get("resume") is None or not saved_file.is_file():
        return given, {}
    saved = settings_from_file(saved_file)
    default = TrainConfig()
    before = {key: saved.get(key, getattr(default, key)) for key in given}
    changed = [key for key, value in given.items() if value != before[key]]
    for key in changed:
        if key in RUN_DEFINING:
            raise UserError(f"--resume: --{key} {given[key]!r} differs from the run in {output_dir} ({before[key]!r}, "
                            f"{saved_file}): it would train another run or on other data; drop --{key} to continue "
                            "the run, or start a new one in another --output_dir")
    return {**saved, **given}, {key: (before[key], given[key]) for key in changed if key != "resume"}


def settings_from_file(path: Path) -> dict[str, Any]:
    content = load_yaml(str(path))
    return {key: coerce(key, value, str(path)) for key, value in content.items() if key in FIELD_NAMES}


def save_settings(given: dict[str, Any], output_dir: Path) -> None:
    temporary = output_dir / f".{SETTINGS_FILE}.tmp"
    kept = {key: value for key, value in given.items() if key not in NOT_SAVED and key != "resume"}
    temporary.write_text(yaml.safe_dump(kept, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(temporary, output_dir / SETTINGS_FILE)


def identity_changes(saved: TrainConfig, config: TrainConfig) -> list[str]:
    """The RUN_IDENTITY keys in which `config` is another run than `saved`."""
    return [key for key in RUN_IDENTITY if getattr(saved, key) != getattr(config, key)]


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
    """Why a checkpoint (its config `saved`, its TrainingState `state`) cannot continue under `config`, or None."""
    if saved is not None:
        changed = identity_changes(saved, config)
        if changed:
            key = changed[0]
            return (f"saved by a run with another {', '.join(changed)} ({key} was {getattr(saved, key)!r}, now "
                    f"{getattr(config, key)!r}); resume with the same settings, or export it and start a new run "
                    "with --model EXPORT")
    if saved is not None and saved.attention_lr_scale != config.attention_lr_scale:
        return (f"saved with --attention_lr_scale {saved.attention_lr_scale:g}, now "
                f"{config.attention_lr_scale:g}: the optimizer's parameter groups differ; resume with "
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


def prepare_output_dir(config: TrainConfig, accelerator, settings: dict[str, Any] | None = None) -> Path | None:
    """Lock the directory, refuse to mix two runs in it or to resume what cannot continue, clear it
    for --overwrite_output_dir, and write the settings as given (the resolved config follows once the
    plan is made: save_run_config). Returns the checkpoint to resume from."""
    output_dir = Path(config.output_dir)
    lock_output_dir(output_dir, accelerator)
    resume_from = resolve_resume(config)
    if resume_from is not None:
        check_resumable(config, resume_from, accelerator)
    saved = output_dir / CONFIG_FILE
    # A run that stopped before its first checkpoint left nothing worth protecting.
    holds_work = any(checkpoints_dir(output_dir).glob("step-*")) or (output_dir / MODEL_DIR).exists()
    if holds_work and config.resume is None and not config.overwrite_output_dir:
        raise UserError(
            f"{output_dir} already holds a run ({saved}); pass --resume to continue it, "
            "--overwrite_output_dir to replace it, or another --output_dir"
        )
    # Every rank has read the old files before the main process replaces them.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config.overwrite_output_dir and config.resume is None:
            for stale in (checkpoints_dir(output_dir), output_dir / MODEL_DIR, output_dir / TENSORBOARD_DIR):
                shutil.rmtree(stale, ignore_errors=True)
            (output_dir / LOG_FILE).unlink(missing_ok=True)
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            if settings is not None:
                save_settings(settings, output_dir)
        except OSError as error:
            raise UserError(f"--output_dir {output_dir}: cannot write there ({error.strerror})") from None
    accelerator.wait_for_everyone()
    return resume_from


def save_run_config(config: TrainConfig, accelerator) -> None:
    """The resolved config of the run, beside its checkpoints (main process only)."""
    if not accelerator.is_main_process:
        return
    try:
        config.save(Path(config.output_dir) / CONFIG_FILE)
    except OSError as error:
        raise UserError(f"--output_dir {config.output_dir}: cannot write there ({error.strerror})") from None
