"""Checkpoints: save and resume the full training state, rotate, and export a HF model directory.

Layout of an output directory:

    run_config.yaml          the resolved configuration of the run
    log.jsonl                every logged step and evaluation
    checkpoints/step-000100/ Accelerate state (model, optimizer, RNG) + trainer_state.json,
                             the model config, tokenizer and run_config.yaml (so evaluate/predict
                             can load a checkpoint directly)
    checkpoints/latest       name of the newest complete checkpoint
    model/                   the exported best model (safetensors, tokenizer, config with labels)

Checkpoints are written to a temporary directory and renamed into place only when complete;
the `latest` pointer changes last. Where training stands lives in trainer_state.json, never in
folder names. Every rank calls every collective; only file writes run on the main process.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

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


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    candidate = root / pointer.read_text(encoding="utf-8").strip()
    return candidate if (candidate / STATE_FILE).is_file() else None


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


def save_checkpoint(accelerator: Accelerator, state: TrainingState, scheduler, config: TrainConfig,
                    model, tokenizer) -> Path:
    """Save on all ranks into a temporary directory, then publish it atomically."""
    root = checkpoints_dir(config.output_dir)
    name = f"step-{state.optimizer_steps:08d}"
    final = root / name
    temporary = root / f".tmp-{name}"
    state.scheduler = scheduler.state_dict()
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        # Created before the barrier: under DeepSpeed every rank writes its own shard into it.
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    # Every rank has written its part (RNG state, ZeRO shards) before the directory is published.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
        config.save(temporary / CONFIG_FILE)
        accelerator.unwrap_model(model).config.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _write_atomic(root / LATEST, name + "\n")
        rotate(root, config.keep_checkpoints, keep={name, state.best_checkpoint})
    accelerator.wait_for_everyone()
    return final


def rotate(root: Path, keep_last: int, keep: set) -> None:
    """Delete all but the newest `keep_last` checkpoints and those named in `keep` (the best)."""
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    for old in complete[:-keep_last]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


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
        if export_dir.exists():
            shutil.rmtree(export_dir)
        os.replace(temporary, export_dir)
    accelerator.wait_for_everyone()
