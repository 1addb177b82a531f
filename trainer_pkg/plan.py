"""The training plan: global batch, per-device micro-batch, accumulation, learning rate, epochs, steps.

The global batch a run learns with is the recipe's (pretrained or from scratch), never a product
of how many processes happen to be launched: one CPU, two, or 64 GPUs take the same optimizer
steps at the same learning rate. The hardware only decides how the global batch is split: rows
per device per forward pass, and gradient accumulation where a device cannot take its share in one
pass. Explicit flags always win. The measurements behind each default are in docs/pretrained.md
and README "Defaults".

`--dry_run` prints this plan (for the launch at hand, or one given by --assume_processes and
--assume_device) and exits without training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch

from trainer_pkg.config import (
    DEFAULT_EPOCHS_FROM_SCRATCH,
    DEFAULT_GLOBAL_BATCH_FROM_SCRATCH,
    DEFAULT_GLOBAL_BATCH_PRETRAINED,
    DEFAULT_LONG_RUN_LR_PRETRAINED,
    DEFAULT_LONG_RUN_RDROP_ALPHA_PRETRAINED,
    DEFAULT_LONG_RUN_ROWS_PRETRAINED,
    DEFAULT_LR_FROM_SCRATCH,
    DEFAULT_LR_PRETRAINED,
    DEFAULT_MAX_EPOCHS_PRETRAINED,
    DEFAULT_MIN_EPOCHS_PRETRAINED,
    DEFAULT_MIN_STEPS_PRETRAINED,
    PRETRAINED_LR_WIDTH,
    TrainConfig,
)
from trainer_pkg.console import RunConsole
from trainer_pkg.data import load_tokenized, resolve_columns_and_labels, train_dataloader
from trainer_pkg.distributed import launched_processes
from trainer_pkg.errors import UserError
from trainer_pkg.model import encoder_width, load_tokenizer

# The most rows one forward pass takes on each device before accumulation splits the batch. On the
# CPU the arithmetic of a batch dominates and memory is the only limit; on the H100 a BERT-base
# step costs about the same at 64 rows as at 512 (host-bound; docs/performance.md).
MICRO_BATCH_LIMIT = {"cpu": 64, "cuda": 512}
# Fewer rows than this per GPU per forward pass leave the GPU waiting on the host.
GPU_STARVED_ROWS = 64
# Fewer optimizer steps per epoch than this at the default batch earn a note.
FEW_STEPS_PER_EPOCH = 100


@dataclass
class TrainingPlan:
    """Everything a run will do, resolved before the first step (and printed by --dry_run)."""

    num_processes: int
    device: str
    num_train_rows: int
    global_batch_size: int
    per_device_batch_size: int
    grad_accum: int
    lr: float
    epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    early_stopping_patience: int
    rdrop_alpha: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_global_batch(config: TrainConfig) -> int:
    return DEFAULT_GLOBAL_BATCH_FROM_SCRATCH if config.from_scratch else DEFAULT_GLOBAL_BATCH_PRETRAINED


def pretrained_lr(width: int | None) -> float:
    """The default lr for fine-tuning an encoder of this hidden size at the default global batch.

    BERT-base's 5e-5 at width 768 (the reference job), scaled by 768 / width: a narrower encoder
    takes a larger step. Measured on all-MiniLM-L6-v2 (width 384) on full SST-2, where 1e-4 beat
    5e-5 by a point at every validation of the second half of the epoch (docs/pretrained.md).
    Bounded to 0.5x..2x: the rule rests on two points, 768 (BERT's published value) and 384 (the
    measurement), so far outside them it is not extrapolated.
    """
    scale = PRETRAINED_LR_WIDTH / width if width else 1.0
    return DEFAULT_LR_PRETRAINED * min(2.0, max(0.5, scale))


def resolve_batch(config: TrainConfig, device: str, num_processes: int) -> TrainConfig:
    """The config with the per-device batch and accumulation filled in (the epochs and the lr wait for
    the corpus: resolve_schedule).

    - Nothing given: the recipe's global batch, split over the processes, accumulated where one
      pass per device would exceed MICRO_BATCH_LIMIT.
    - --global_batch_size: the same split of that batch.
    - --per_device_batch_size (and/or --grad_accum): global = per-device x processes x accumulation,
      the classic meaning; with --global_batch_size too, they must multiply to it.
    """
    limit = MICRO_BATCH_LIMIT.get(device, MICRO_BATCH_LIMIT["cpu"])
    per_device, accum, wanted = config.per_device_batch_size, config.grad_accum, config.global_batch_size
    if per_device is not None and accum is not None:
        if wanted is not None and per_device * num_processes * accum != wanted:
            raise UserError(f"--global_batch_size {wanted} is not --per_device_batch_size {per_device} x {num_processes} "
                            f"processes x --grad_accum {accum} (= {per_device * num_processes * accum}); give two of them")
    elif per_device is not None:
        accum = 1 if wanted is None else max(1, round(wanted / (per_device * num_processes)))
        if wanted is not None and per_device * num_processes * accum != wanted:
            raise UserError(f"--global_batch_size {wanted} cannot be split into --per_device_batch_size {per_device} x "
                            f"{num_processes} processes x a whole accumulation; choose sizes that divide")
    else:
        wanted = wanted if wanted is not None else default_global_batch(config)
        if accum is None:
            accum = max(1, math.ceil(wanted / (num_processes * limit)))
        per_device = max(1, math.ceil(wanted / (num_processes * accum)))
    return dataclasses.replace(config, per_device_batch_size=per_device, grad_accum=accum)


def resolve_schedule(config: TrainConfig, num_batches: int, num_processes: int, width: int | None = None) -> TrainConfig:
    """The config of resolve_batch with its epochs and lr filled in, once the corpus is loaded:
    `num_batches` batches per epoch over all processes.

    Epochs, for pretrained weights: the fewest from DEFAULT_MIN_EPOCHS_PRETRAINED to
    DEFAULT_MAX_EPOCHS_PRETRAINED that take DEFAULT_MIN_STEPS_PRETRAINED optimizer steps. The lr: the
    recipe's at its default global batch (for pretrained weights, by the encoder's `width`:
    pretrained_lr, and at most DEFAULT_LONG_RUN_LR_PRETRAINED for a run that sees
    DEFAULT_LONG_RUN_ROWS_PRETRAINED rows), scaled by sqrt(global / default) for other global
    batches (the square-root rule for Adam). R-Drop: DEFAULT_LONG_RUN_RDROP_ALPHA_PRETRAINED for that
    long pretrained run, else off. Rows seen and steps are counted in global batches, so
    the plan is the same on any number of processes. Explicit --epochs and --lr are used as given.
    """
    per_epoch = steps_per_epoch(batches_per_process(num_batches, num_processes), config.grad_accum)
    epochs = config.epochs
    if epochs is None and config.from_scratch:
        epochs = DEFAULT_EPOCHS_FROM_SCRATCH
    elif epochs is None:
        epochs = min(DEFAULT_MAX_EPOCHS_PRETRAINED,
                     max(DEFAULT_MIN_EPOCHS_PRETRAINED, math.ceil(DEFAULT_MIN_STEPS_PRETRAINED / per_epoch)))
    global_batch = config.per_device_batch_size * num_processes * config.grad_accum
    long_pretrained_run = not config.from_scratch and \
        planned_steps(per_epoch, epochs, config.max_steps) * global_batch >= DEFAULT_LONG_RUN_ROWS_PRETRAINED
    lr = config.lr
    if lr is None and config.from_scratch:
        lr = DEFAULT_LR_FROM_SCRATCH * math.sqrt(global_batch / default_global_batch(config))
    elif lr is None:
        recipe_lr = pretrained_lr(width)
        if long_pretrained_run:
            recipe_lr = min(recipe_lr, DEFAULT_LONG_RUN_LR_PRETRAINED)
        lr = recipe_lr * math.sqrt(global_batch / default_global_batch(config))
    rdrop_alpha = config.rdrop_alpha
    if rdrop_alpha is None:
        rdrop_alpha = DEFAULT_LONG_RUN_RDROP_ALPHA_PRETRAINED if long_pretrained_run else 0.0
    return dataclasses.replace(config, epochs=epochs, lr=lr, rdrop_alpha=rdrop_alpha)


def planned_steps(per_epoch: int, epochs: int, max_steps: int | None) -> int:
    return min(per_epoch * epochs, max_steps) if max_steps else per_epoch * epochs


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)


def batches_per_process(num_batches: int, num_processes: int) -> int:
    """Accelerate shards a loader's batches round-robin and completes the last round (even_batches)."""
    return math.ceil(num_batches / num_processes)


def batch_is_default(config: TrainConfig) -> bool:
    """Whether the global batch is the recipe's (no batch flag given); call before resolve_batch."""
    return config.global_batch_size is None and config.per_device_batch_size is None and config.grad_accum is None


def make_plan(config: TrainConfig, device: str, num_processes: int, num_train_rows: int, num_batches: int,
              default_batch: bool = True) -> TrainingPlan:
    """The plan of a config resolved by resolve_batch and resolve_schedule over `num_batches` batches per
    epoch (all processes).

    `default_batch` (batch_is_default of the config as given) adds the note a small corpus earns."""
    per_epoch = steps_per_epoch(batches_per_process(num_batches, num_processes), config.grad_accum)
    total = planned_steps(per_epoch, config.epochs, config.max_steps)
    global_batch = config.per_device_batch_size * num_processes * config.grad_accum
    notes = []
    if config.per_device_batch_size == 1 and global_batch > default_global_batch(config):
        notes.append(f"more processes ({num_processes}) than rows in the recipe's global batch "
                     f"({default_global_batch(config)}): one row each makes it {global_batch}, and the lr is scaled to it")
    if device == "cuda" and config.per_device_batch_size < GPU_STARVED_ROWS:
        rows = config.per_device_batch_size
        notes.append(f"{rows} row{'s' if rows != 1 else ''} per GPU per forward pass leaves the GPUs waiting on the host "
                     f"(a step costs about the same up to 512 rows): fewer GPUs finish as fast, or a larger "
                     "--global_batch_size trades some accuracy per epoch for speed")
    if per_epoch < FEW_STEPS_PER_EPOCH and default_batch:
        notes.append(f"only {per_epoch} optimizer steps per epoch at the default global batch ({global_batch}): a corpus "
                     "this small learns more per epoch with a smaller --global_batch_size")
    return TrainingPlan(
        num_processes=num_processes, device=device, num_train_rows=num_train_rows, global_batch_size=global_batch,
        per_device_batch_size=config.per_device_batch_size, grad_accum=config.grad_accum, lr=config.effective_lr,
        epochs=config.epochs, steps_per_epoch=per_epoch, total_steps=total,
        warmup_steps=warmup_steps(total, config.warmup_ratio), early_stopping_patience=config.early_stopping_patience,
        rdrop_alpha=config.rdrop_alpha, notes=notes,
    )


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return round(total_steps * warmup_ratio)


def this_hardware() -> tuple[str, int]:
    """The device type and process count of this launch, known before the process group exists."""
    return ("cuda" if torch.cuda.is_available() else "cpu"), launched_processes()


def show_plan(console: RunConsole, plan: TrainingPlan) -> None:
    console.print(
        f"plan: {plan.num_train_rows:,} training rows, global batch {plan.global_batch_size} = "
        f"{plan.per_device_batch_size} rows per pass x {plan.num_processes} x {plan.grad_accum} accumulated "
        f"({plan.device}); lr {plan.lr:.3g}, {plan.warmup_steps:,} warmup steps; {plan.epochs} epoch(s) "
        f"of {plan.steps_per_epoch:,} steps, {plan.total_steps:,} in all"
        + (f"; R-Drop alpha {plan.rdrop_alpha:g} (each batch runs twice)" if plan.rdrop_alpha else "")
        + (f"; early stopping after {plan.early_stopping_patience} validations without a better score"
           if plan.early_stopping_patience else "")
    )
    for note in plan.notes:
        console.warn(note)


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
    config = resolve_schedule(config, len(loader), processes, encoder_width(config))
    plan = make_plan(config, device, processes, len(splits["train"]), len(loader), default_batch)
    console.table("plan (dry run: nothing trained)", {k: v for k, v in plan.to_dict().items() if k != "notes"})
    for note in plan.notes:
        console.warn(note)
    print(json.dumps(plan.to_dict()), flush=True)
    return {"dry_run": plan.to_dict()}
