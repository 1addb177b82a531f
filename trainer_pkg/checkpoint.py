"""Checkpoints: save and load the full training state, rotate, and export a HF model directory.

A checkpoint (checkpoints/step-00000100/ of the output directory, trainer_pkg.run_dir) holds the
Accelerate state (model, optimizer, RNG), trainer_state.json, the model config, the tokenizer and
run_config.yaml, so evaluate/predict can load a checkpoint directly; checkpoints/latest names the
newest complete one; model/ is the exported best model (safetensors, tokenizer, labelled config).

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
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from trainer_pkg.config import TrainConfig
from trainer_pkg.errors import UserError
from trainer_pkg.model import quiet_transformers
from trainer_pkg.run_dir import (
    CONFIG_FILE,
    EXPORT_CONFIG_FILE,
    LATEST,
    METRICS_FILE,
    STATE_FILE,
    TRASH_PREFIX,
    TrainingState,
    checkpoint_name,
    checkpoints_dir,
    is_complete,
    latest_checkpoint,
)

TEMPORARY_PREFIX = ".tmp-"


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
    name = checkpoint_name(state.optimizer_steps)
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


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    """Accelerate's load_state: torch.load with weights_only=True, so a pickle that would run code is refused."""
    try:
        accelerator.load_state(str(checkpoint))
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"{checkpoint}: cannot load the checkpoint ({type(error).__name__}: {reason}); "
                        "resume from another checkpoint") from error


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
        with quiet_transformers():
            accelerator.unwrap_model(model).save_pretrained(temporary, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        config.save(temporary / EXPORT_CONFIG_FILE)
        (temporary / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        apply_umask(temporary)
        if export_dir.exists():
            shutil.rmtree(export_dir)
        os.replace(temporary, export_dir)
    accelerator.wait_for_everyone()
