"""The one typed configuration of a training run.

Every knob lives in `TrainConfig`: YAML files (`--config`) and command-line flags set the same
fields by the same names, the command line wins, and `validate()` reports every problem at once.
The resolved config is written into every run directory and checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from trainer_pkg.errors import UserError

DEFAULT_MODEL = "google-bert/bert-base-multilingual-uncased"
# The recipes' defaults, each measured on its own path (docs/pretrained.md, README "Defaults"):
# fine-tuning pretrained weights on full SST-2 with all-MiniLM-L6-v2, and training from scratch on
# the offline NSMC proxy. The global batch is the recipe's, whatever the number of processes
# (trainer_pkg/plan.py); the lr is scaled by sqrt(global batch / the recipe's) for other batches.
DEFAULT_GLOBAL_BATCH_PRETRAINED = 32
DEFAULT_LR_PRETRAINED = 5e-5
# ... at BERT-base's width; other widths scale it (plan.pretrained_lr).
PRETRAINED_LR_WIDTH = 768
# Pretrained runs take at least two epochs, and more (up to 3) where two are fewer optimizer steps
# than this: a small corpus's epoch is too few steps for the new classifier head, and on full SST-2
# two epochs at a smaller lr beat one (docs/pretrained.md "Epochs", "Two epochs at a lower lr").
DEFAULT_MIN_STEPS_PRETRAINED = 1000
DEFAULT_MIN_EPOCHS_PRETRAINED = 2
DEFAULT_MAX_EPOCHS_PRETRAINED = 3
# A long schedule wants a smaller step: a pretrained run that sees this many training rows in all
# takes at most this lr at the default global batch. On full SST-2 (2 x 67,349 rows) 3e-5 beat 5e-5
# and 1e-4; on 2 x 16,000 rows 1e-4 is what reaches the HF recipes' accuracy soonest.
DEFAULT_LONG_RUN_ROWS_PRETRAINED = 100_000
DEFAULT_LONG_RUN_LR_PRETRAINED = 3e-5
# ... and trains with R-Drop at this weight: on full SST-2 it lifted the two-epoch run's mean over
# six seeds (docs/pretrained.md "R-Drop on full SST-2"). It costs 1.5x the time per step, and short
# and from-scratch runs were not measured with it: they keep it off.
DEFAULT_LONG_RUN_RDROP_ALPHA_PRETRAINED = 1.0
# A from-scratch encoder has to learn its embeddings too: it wants a larger step than fine-tuning,
# yet 1e-3, the 2-layer proxy's best, left MiniLM's 6 layers at chance on SST-2 where 3e-4 learned
# (docs/pretrained.md "From-scratch defaults"). The proxy's config keeps its own 1e-3 and tricks.
DEFAULT_GLOBAL_BATCH_FROM_SCRATCH = 64
DEFAULT_LR_FROM_SCRATCH = 3e-4
DEFAULT_EPOCHS_FROM_SCRATCH = 1
# How this invocation runs, not what the run is: left out of the saved config.
NOT_SAVED = ("debug", "dry_run", "assume_processes", "assume_device")
REPORT_TO_CHOICES = ("auto", "none", "tensorboard", "wandb", "mlflow")


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    model: str = DEFAULT_MODEL
    """Hub id or local directory of the model (its config, tokenizer and, unless --from_scratch, weights)."""
    tokenizer: str | None = None
    """Hub id or local directory of the tokenizer; default: the same as --model."""
    from_scratch: bool = False
    """Initialise the weights randomly from the model's config instead of loading pretrained weights."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields to override, KEY=VALUE,... (e.g. num_hidden_layers=2,hidden_size=128)."""
    scratch_init: str = "random"
    """With --from_scratch: 'random' keeps the model's own initialisation; 'local' starts the first
    layer's attention heads on the previous and the next token (trainer_pkg/scratch.py; the offline
    proxy's config sets it)."""
    max_length: int | None = None
    """Truncate texts to this many tokens; default: the tokenizer's model_max_length (512 for BERT)."""

    # --- data --------------------------------------------------------------------------------
    data: str | None = None
    """'nsmc' (the original NSMC files from GitHub; the default without --train_file), a local directory
    holding train / validation (or dev) / test files as .tsv, .csv, .jsonl or .json (NSMC's
    ratings_train.txt and ratings_test.txt too), or a hub dataset id with train/test splits."""
    train_file: str | None = None
    """A TSV/CSV/JSONL training file (overrides --data for training)."""
    validation_file: str | None = None
    """A TSV/CSV/JSONL validation file for evaluation during training and model selection (e.g. a
    dataset's official dev split); without one, --validation_size rows are carved from train."""
    test_file: str | None = None
    """A TSV/CSV/JSONL test file, scored once by the best model (overrides --data for testing); without
    a test split the final report is on the validation split."""
    text_column: str | None = None
    """Name of the text column; default: the one column besides the label and id columns, or the one
    named text, sentence, document, review, content or comment."""
    label_column: str = "label"
    """Name of the label column in the data files."""
    id_column: str = "id"
    """Name of the row-id column, carried into predictions when present."""
    labels: list[str] | None = None
    """Class names in label-id order; a label in the data may be the id (0, 1, ...) or the name.
    Default: read from the training labels (ids 0..K-1 are named "0".."K-1", names are sorted);
    negative,positive for NSMC."""
    validation_size: int = 5000
    """Rows carved from the training data (seeded) for evaluation during training and model
    selection, when there is no validation file; the test set is never used to choose anything."""
    max_train_samples: int | None = None
    """Use only this many training rows (after the validation split)."""
    max_eval_samples: int | None = None
    """Use only this many validation and test rows."""
    cache_dir: str | None = None
    """Where datasets caches downloads and tokenized data; default: the datasets cache."""

    # --- optimisation ------------------------------------------------------------------------
    epochs: int | None = None
    """Passes over the training data; default 1 with --from_scratch, and for pretrained weights the
    fewest epochs from 2 to 3 that take 1,000 optimizer steps: 2 for a large corpus, 3 for a small
    one (docs/pretrained.md has the measurements)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides --epochs when smaller)."""
    early_stopping_patience: int = 0
    """Stop training after this many validations in a row without a better --metric_for_best (0: off);
    the best checkpoint is exported either way."""
    lr: float | None = None
    """Peak learning rate; default for pretrained weights 5e-5 x 768 / the encoder's hidden size (within
    2.5e-5..1e-4: 5e-5 for BERT-base, 1e-4 for MiniLM's 384) at their default global batch of 32, at
    most 3e-5 for a run that sees 100,000 training rows or more (epochs x rows); 3e-4 with
    --from_scratch at 64; scaled by sqrt(global batch / default) for other global batches."""
    attention_lr_scale: float = 1.0
    """Learning-rate multiplier for the position embeddings and attention query/key weights (the
    offline proxy's config sets 0.03, with --scratch_init local: trainer_pkg/scratch.py)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    warmup_ratio: float = 0.06
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    global_batch_size: int | None = None
    """Rows per optimizer step over all processes; default 32 for pretrained weights, 64 with
    --from_scratch, the same on 1 process or 64. The hardware only decides how it is split."""
    per_device_batch_size: int | None = None
    """Rows per process per forward pass; default: the global batch split over the processes, at most
    64 on the CPU and 512 on a GPU per pass (more is accumulated). Given without --global_batch_size,
    global = this x processes x --grad_accum."""
    grad_accum: int | None = None
    """Forward passes accumulated per optimizer step; default: as few as the per-device limit allows."""
    eval_batch_size: int | None = None
    """Examples per process per evaluation forward pass; default 32 on the CPU (where small batches
    are the fastest), 256 on a GPU."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    rdrop_alpha: float | None = None
    """R-Drop (Liang et al., 2021): each batch runs through the model twice (two dropout masks) and the
    loss adds this weight x the symmetric KL divergence between the two predictions; 0 turns it off.
    Default: 1 for a pretrained run that sees 100,000 training rows or more (full SST-2, NSMC), else 0.
    About 1.5x the time per step on the CPU (docs/pretrained.md). Each forward holds twice
    --per_device_batch_size rows: lower it if memory is short."""
    mixed_precision: str = "auto"
    """'auto' (bf16 on GPUs that support it, else fp32), 'no', 'bf16' or 'fp16'."""
    seed: int = 42
    """Seed for the validation split, initialisation, shuffling and dropout."""
    group_by_length: bool = True
    """Batch texts of similar length together (random order kept across batches) to cut padding."""
    num_workers: int = 0
    """Data-loader worker processes (0 loads batches in the training process)."""
    compile: bool = False
    """torch.compile the model (dynamic shapes: compiled once, not once per batch length)."""
    cast_weights_once: bool = False
    """With bf16 on one process: cast the Linear weights to bf16 once per optimizer step instead of in
    every forward and backward (the same numbers, ~300 fewer kernel launches per BERT-base step).
    Off by default: it targets GPUs, where its effect on time has not been measured yet."""
    nan_policy: str = "stop"
    """What a non-finite (NaN/inf) loss or gradient does: 'stop' (a one-line error naming the step; no
    checkpoint is written from such weights) or 'skip' (drop that optimizer step, count and report it)."""

    # --- evaluation, checkpoints, output ----------------------------------------------------
    output_dir: str = "runs/nsmc"
    """Directory for checkpoints, logs and the exported model (<output_dir>/model)."""
    eval_every: int = 0
    """Evaluate on the validation split every N optimizer steps (0: only at the end of each epoch)."""
    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0: only after evaluations)."""
    save_every_minutes: float = 30.0
    """Also save a checkpoint when this many minutes have passed since the last one, so a crash or
    an out-of-memory kill loses at most that much training (0: off)."""
    log_every: int = 50
    """Log the training loss every N optimizer steps."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (the best one is always kept as well)."""
    metric_for_best: str = "accuracy"
    """Validation metric that picks the best checkpoint (higher is better)."""
    resume: str | None = None
    """Resume from the latest checkpoint in --output_dir ('latest', what a bare --resume means), from a
    checkpoint directory, or 'auto': resume if a checkpoint exists, else start fresh (for requeued jobs)."""
    overwrite_output_dir: bool = False
    """Allow starting a new run in an output directory that already holds a run."""
    dist_timeout: int = 1800
    """Seconds a process waits in a collective (or for a peer) before failing instead of hanging."""
    debug: bool = False
    """Show full tracebacks instead of one-line errors."""
    report_to: list[str] = field(default_factory=lambda: ["auto"])
    """Experiment trackers, comma-separated: tensorboard, wandb, mlflow; 'auto' (TensorBoard when installed,
    written to <output_dir>/tensorboard) or 'none'."""

    # --- planning --------------------------------------------------------------------------
    dry_run: bool = False
    """Resolve the data, batch, accumulation, lr, warmup and steps, print the plan (its last stdout line
    one JSON object) and exit without training."""
    assume_processes: int | None = None
    """With --dry_run: plan for this many processes instead of the launch at hand."""
    assume_device: str | None = None
    """With --dry_run: plan for this device type (cuda or cpu) instead of this machine's."""

    # ------------------------------------------------------------------------------------------
    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_FROM_SCRATCH if self.from_scratch else DEFAULT_LR_PRETRAINED

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.model

    def validate(self) -> None:
        """Raise one UserError listing every problem found."""
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        check(self.log_every >= 1, f"log_every must be >= 1 (got {self.log_every})")
        for name in ("eval_batch_size", "epochs", "grad_accum", "global_batch_size", "per_device_batch_size", "max_steps",
                     "max_train_samples", "max_eval_samples", "max_length", "assume_processes"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name} must be >= 1 or unset (got {value})")
        for name in ("eval_every", "save_every", "save_every_minutes", "validation_size", "num_workers",
                     "early_stopping_patience"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        check(self.dist_timeout >= 1, f"dist_timeout must be >= 1 second (got {self.dist_timeout})")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1 (got {self.keep_checkpoints})")
        check(self.lr is None or self.lr > 0, f"lr must be > 0 (got {self.lr})")
        check(self.attention_lr_scale > 0,
              f"attention_lr_scale must be > 0 (got {self.attention_lr_scale})")
        check(self.scratch_init in ("local", "random"), f"scratch_init must be local or random (got {self.scratch_init!r})")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {self.max_grad_norm})")
        check(self.rdrop_alpha is None or self.rdrop_alpha >= 0, f"rdrop_alpha must be >= 0 (got {self.rdrop_alpha})")
        check(self.nan_policy in ("stop", "skip"), f"nan_policy must be stop or skip (got {self.nan_policy!r})")
        check(
            self.mixed_precision in ("auto", "no", "bf16", "fp16"),
            f"mixed_precision must be one of auto, no, bf16, fp16 (got {self.mixed_precision!r})",
        )
        if self.labels is not None:
            check(len(self.labels) >= 2, f"labels needs at least two class names (got {self.labels})")
            check(len(set(self.labels)) == len(self.labels), f"labels has duplicates: {self.labels}")
        check(self.assume_device in (None, "cpu", "cuda"), f"assume_device must be cpu or cuda (got {self.assume_device!r})")
        check(self.dry_run or (self.assume_processes is None and self.assume_device is None),
              "assume_processes and assume_device plan a launch: they need dry_run")
        check(
            self.metric_for_best in ("accuracy", "f1", "f1_macro", "precision", "recall"),
            f"metric_for_best must be accuracy, f1, f1_macro, precision or recall (got {self.metric_for_best!r})",
        )
        check(
            self.validation_size >= 1 or self.validation_file is not None or self.eval_every == 0,
            "eval_every needs a validation split: set validation_size >= 1 or give validation_file",
        )
        check(
            self.validation_size >= 1 or self.validation_file is not None or self.early_stopping_patience == 0,
            "early_stopping_patience needs a validation split: set validation_size >= 1 or give validation_file",
        )
        check(bool(self.output_dir), "output_dir must not be empty")
        check(all(name in REPORT_TO_CHOICES for name in self.report_to),
              f"report_to must list some of {', '.join(REPORT_TO_CHOICES)} (got {','.join(self.report_to)!r})")
        for name, value in self.model_overrides.items():
            check(isinstance(name, str) and name.isidentifier(), f"model_overrides key {name!r} is not a field name")
        if problems:
            raise UserError("invalid configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        """Write the resolved configuration (effective lr filled in) as YAML."""
        resolved = self.to_dict()
        resolved["lr"] = self.effective_lr
        for name in NOT_SAVED:
            resolved.pop(name)
        # Written beside, then renamed: a reader never sees half a file.
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8")
        os.replace(temporary, path)


FIELD_NAMES = [f.name for f in fields(TrainConfig)]
_TYPES = get_type_hints(TrainConfig)


def field_docs() -> dict[str, str]:
    """The docstring under each field, for --help (read from the source so it is written once)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


# Names users bring from the HF Trainer and other tools.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length", "fp16": "mixed_precision", "bf16": "mixed_precision",
    "batch_size": "per_device_batch_size", "train_batch_size": "per_device_batch_size",
    "per_device_train_batch_size": "per_device_batch_size", "per_device_eval_batch_size": "eval_batch_size",
    "model_name_or_path": "model", "resume_from_checkpoint": "resume", "eval_steps": "eval_every",
    "save_steps": "save_every", "logging_steps": "log_every", "save_total_limit": "keep_checkpoints",
    "warmup": "warmup_ratio", "num_epochs": "epochs", "validation_split_file": "validation_file",
    "dev_file": "validation_file", "eval_file": "validation_file", "early_stopping": "early_stopping_patience",
}


def closest_key(key: str) -> str | None:
    normalised = key.lower().replace("-", "_")
    if normalised in ALIASES:
        return ALIASES[normalised]
    close = [ALIASES[a] for a in difflib.get_close_matches(normalised, list(ALIASES), n=1, cutoff=0.8)]
    close = close or difflib.get_close_matches(key, FIELD_NAMES, n=1, cutoff=0.5)
    return close[0] if close else None


def unknown_key_error(keys: list[str], where: str) -> UserError:
    """One error for every unknown key, each with the closest valid one."""
    hints = [(key, closest_key(key)) for key in keys]
    if len(hints) == 1:
        key, close = hints[0]
        hint = f"; did you mean {close!r}?" if close else f"; valid keys: {', '.join(FIELD_NAMES)}"
        return UserError(f"{where}: unknown config key {key!r}{hint}")
    listed = ", ".join(f"{key!r}" + (f" (did you mean {close!r}?)" if close else "") for key, close in hints)
    return UserError(f"{where}: unknown config keys {listed}" +
                     ("" if all(close for _, close in hints) else f"; valid keys: {', '.join(FIELD_NAMES)}"))


def _base_type(name: str) -> type:
    """The field's plain type: `int | None` -> int, `dict[str, Any]` -> dict."""
    annotation = _TYPES[name]
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return get_origin(annotation) or annotation


def parse_overrides(text: str) -> dict[str, Any]:
    """'a=1,b=0.1,c=gelu' -> {'a': 1, 'b': 0.1, 'c': 'gelu'} (values parsed as YAML scalars)."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--model_overrides: expected KEY=VALUE, got {item!r}")
        try:
            result[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            raise UserError(f"--model_overrides: cannot parse the value of {key.strip()!r}: {value.strip()!r}") from None
    return result


def coerce(name: str, value: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with a clear error."""
    kind = _base_type(name)
    if value is None:
        if type(None) in get_args(_TYPES[name]):
            return None
        raise UserError(f"{where}: {name} needs a value (it cannot be empty or null)")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is dict:
            return parse_overrides(value) if isinstance(value, str) else dict(value)
        if kind is list:
            return [str(v) for v in value] if isinstance(value, list) else [s.strip() for s in str(value).split(",")]
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {name} expects {kind.__name__}, got {value!r}") from None


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(content).__name__}")
    return content


class ArgParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one-line UserErrors, with the closest valid flag."""

    def error(self, message: str) -> None:
        if "unrecognized arguments" in message:
            words = message.split(":", 1)[1].split()
            flags = [word for word in words if word.startswith("-") and word.lstrip("-")[:1].isalpha()]
            raise unknown_key_error([flag.lstrip("-").split("=")[0] for flag in flags or ["?"]], "command line")
        raise UserError(f"command line: {message}")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = ArgParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of config keys; flags given here override it")
    docs = field_docs()
    for f in fields(TrainConfig):
        kind = _base_type(f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = docs.get(f.name, "") + ("" if default in (None, "", [], {}) else f" [default: {default}]")
        help_text = help_text.replace("%", "%%")
        if f.name == "resume":
            parser.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS, help=help_text)
        elif kind is bool:
            parser.add_argument(
                f"--{f.name}", nargs="?", const="true", default=argparse.SUPPRESS, metavar="BOOL", help=help_text
            )
        else:
            parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
    return parser


def given_settings(argv: list[str] | None = None, prog: str = "trainer_pkg.train") -> dict[str, Any]:
    """The settings a user gave: the --config file's keys, overridden by the flags (typed, unvalidated)."""
    parser = build_parser(prog, "Fine-tune a BERT text classifier (defaults: mBERT on full NSMC).")
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        content = load_yaml(config_file)
        unknown = [key for key in content if key not in FIELD_NAMES]
        if unknown:
            raise unknown_key_error(unknown, config_file)
        values.update({key: coerce(key, value, config_file) for key, value in content.items()})
    for key, value in args.items():
        values[key] = coerce(key, value, f"--{key}")
    return values


def config_from_settings(values: dict[str, Any]) -> TrainConfig:
    config = TrainConfig(**values)
    config.validate()
    return config


def load_config(argv: list[str] | None = None, prog: str = "trainer_pkg.train") -> TrainConfig:
    return config_from_settings(given_settings(argv, prog))


def config_from_file(path: Path) -> TrainConfig:
    """Read a resolved config saved by a run (used by evaluate/predict/resume checks)."""
    content = load_yaml(str(path))
    known = {k: coerce(k, v, str(path)) for k, v in content.items() if k in FIELD_NAMES}
    return TrainConfig(**known)


