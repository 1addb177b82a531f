"""Checkpoints: save and resume the full training state, rotate, and export a HF model directory.

Layout of an output directory:

    run_config.yaml          the resolved configuration of the run
    log.jsonl                every logged step and evaluation
    checkpoints/step-000100/ Accelerate state (model, optimizer, RNG) + trainer_state.json,
                             the model config, tokenizer and run_config.yaml (so evaluate/predict
                             can load a checkpoint directly)
    checkpoints/latest       name of the newest complete checkpoint
    model/                   the exported best model (safetensors, tokenizer, config with labels)

Checkpoints are written to a temporary directory (.tmp-step-N, trainer_state.json last) and
renamed into place only when complete; the `latest` pointer changes last. A checkpoint that is
replaced or rotated away is first renamed to .trash-step-N, so a crash at any moment leaves a
complete checkpoint to resume from (resuming from any complete checkpoint is exact). A write that
fails (disk full, no permission) removes the temporary directory and stops every rank with one
line; the previous checkpoint stays as it was. Where training stands lives in trainer_state.json,
never in folder names. Every rank calls every collective; only file writes run on the main process.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from trainer_pkg.config import TrainConfig
from trainer_pkg.errors import UserError

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "run_config.yaml"
LATEST = "latest"


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
    return Path(output_dir) / "checkpoints"


TEMPORARY_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def is_complete(checkpoint: Path) -> bool:
    # trainer_state.json is the last file written into a checkpoint.
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
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {config.resume}: not a complete trainer_pkg checkpoint (no {STATE_FILE})")
    return path


def current_umask() -> int:
    # Reading the umask means setting it: put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Give everything under `directory` the mode the user's umask asks for.

    safetensors writes its files 0600 whatever the umask; a model in a group-shared directory
    would stay unreadable to the group (and 0600 is not what `umask 002` users asked for either).
    """
    mask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _failed_anywhere(accelerator: Accelerator, failed: bool) -> bool:
    """Whether any rank failed; a collective, so every rank stops together instead of waiting."""
    flags = accelerator.gather(torch.tensor([int(failed)], device=accelerator.device))
    return bool(flags.max().item())


def _describe(error: BaseException) -> str:
    # torch.save reports a full disk as a RuntimeError from its C++ writer, safetensors as its own
    # error type: keep the words, whatever the type.
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f" ({error.filename})" if error.filename else "")
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _write_failed(final: Path, error: BaseException | None, output_dir: str) -> UserError:
    previous = latest_checkpoint(output_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    try:
        free = f"{shutil.disk_usage(final.parent).free / 2**30:.1f} GiB free there"
    except OSError:
        free = "free space unknown"
    cause = _describe(error) if error is not None else "another process could not write its part"
    return UserError(f"cannot write checkpoint {final}: {cause}; {kept}; free disk space ({free}) or "
                     "fix the permissions, then --resume")


def save_checkpoint(accelerator: Accelerator, state: TrainingState, scheduler, config: TrainConfig,
                    model, tokenizer) -> Path:
    """Save on all ranks into a temporary directory, then publish it atomically."""
    root = checkpoints_dir(config.output_dir)
    name = f"step-{state.optimizer_steps:08d}"
    final = root / name
    temporary = root / f"{TEMPORARY_PREFIX}{name}"
    state.scheduler = scheduler.state_dict()
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            # Left by a run killed while writing: never complete, never resumed from.
            for stale in root.glob(f"{TEMPORARY_PREFIX}step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            # Created before the barrier: under DeepSpeed every rank writes its own shard into it.
            temporary.mkdir(parents=True)
        except OSError as caught:
            error = caught
    if not _failed_anywhere(accelerator, error is not None):
        try:
            accelerator.save_state(str(temporary))
        except (OSError, RuntimeError, SafetensorError) as caught:
            error = caught
    # Every rank has written its part (RNG state, ZeRO shards) before the directory is published.
    if not _failed_anywhere(accelerator, error is not None) and accelerator.is_main_process:
        try:
            config.save(temporary / CONFIG_FILE)
            accelerator.unwrap_model(model).config.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
            apply_umask(temporary)
            _publish(temporary, final)
            _write_atomic(root / LATEST, name + "\n")
        except OSError as caught:
            error = caught
    if _failed_anywhere(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise _write_failed(final, error, config.output_dir) from error
    if accelerator.is_main_process:
        rotate(root, config.keep_checkpoints, keep={name, state.best_checkpoint})
    accelerator.wait_for_everyone()
    return final


def _publish(temporary: Path, final: Path) -> None:
    """Rename the finished checkpoint into place; one of the same step moves aside first, not deleted."""
    trash = final.with_name(TRASH_PREFIX + final.name)
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(temporary, final)


def rotate(root: Path, keep_last: int, keep: set) -> None:
    """Delete all but the newest `keep_last` checkpoints and those named in `keep` (the best).

    Each goes by a rename to .trash-step-N first: a crash half-way through a deletion must not leave
    a directory that looks like a checkpoint but lacks files. Old trash goes too, the `latest`
    pointer naming a complete checkpoint by now.
    """
    complete = sorted(p for p in root.glob("step-*") if is_complete(p))
    for old in complete[:-keep_last]:
        if old.name not in keep:
            trash = old.with_name(TRASH_PREFIX + old.name)
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(old, trash)
    for trash in root.glob(f"{TRASH_PREFIX}step-*"):
        shutil.rmtree(trash, ignore_errors=True)


def export_model(accelerator: Accelerator, model, tokenizer, config: TrainConfig, export_dir: Path,
                 metrics: dict) -> None:
    """Write a standard HF model directory that transformers.pipeline loads as it is."""
    # get_state_dict is a collective under ZeRO-3: every rank must call it.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        temporary = export_dir.with_name(f".{export_dir.name}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(temporary, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        config.save(temporary / "training_config.yaml")
        (temporary / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        apply_umask(temporary)
        if export_dir.exists():
            shutil.rmtree(export_dir)
        os.replace(temporary, export_dir)
    accelerator.wait_for_everyone()
