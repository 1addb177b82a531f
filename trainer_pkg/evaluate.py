"""Score a checkpoint or an exported model on a labelled test set.

    python -m trainer_pkg.evaluate CHECKPOINT_OR_EXPORT [--data DIR | --test_file FILE] [--output FILE.json]
    accelerate launch -m trainer_pkg.evaluate ...     # sharded over processes, gathered exactly

Without --data/--test_file the test data of the run that produced the model is used (its validation
data when it had no test split). The JSON
holds the metrics and the report (per-class scores, accuracy by length, calibration, the most
confidently wrong examples); the figures are written beside it, named after it (eval.json ->
eval_confusion_matrix.png, eval_reliability.png, eval_training_curves.png).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset

from trainer_pkg.config import ArgParser, TrainConfig, config_from_file
from trainer_pkg.console import RunConsole, print_json, write_output
from trainer_pkg.data import column_values, eval_dataloader, load_tokenized, missing_split_error, source_files
from trainer_pkg.distributed import end_processes, make_accelerator
from trainer_pkg.errors import UserError, cli
from trainer_pkg.inference import eval_batch_size, metrics_from_outputs, predict_logits
from trainer_pkg.model import label_names, load_classifier
from trainer_pkg.report import build_report, show_report, write_figures
from trainer_pkg.run_dir import CONFIG_FILE, EXPORT_CONFIG_FILE, LOG_FILE

SAVED_CONFIGS = (CONFIG_FILE, EXPORT_CONFIG_FILE)


def saved_run_config(model_dir: Path) -> TrainConfig:
    """The training config stored with a checkpoint/export (defaults if there is none)."""
    for name in SAVED_CONFIGS:
        if (model_dir / name).is_file():
            return config_from_file(model_dir / name)
    return TrainConfig()


def run_log(model_dir: Path) -> Path | None:
    """The log.jsonl of the run that wrote this export (<run>/model) or checkpoint (<run>/checkpoints/step-N)."""
    for run_dir in (model_dir, model_dir.parent, model_dir.parent.parent):
        if (run_dir / LOG_FILE).is_file() and (run_dir / CONFIG_FILE).is_file():
            return run_dir / LOG_FILE
    return None


def scored_split(config: TrainConfig) -> str:
    """The split a finished run is scored on: its test split, or its validation split when it has none."""
    return "test" if "test" in source_files(config) else "validation"


@dataclass
class ReportOptions:
    """Where evaluate_and_report writes and what it adds."""

    report_file: Path
    title: str  # of the console's metrics table
    log_path: Path | None = None  # the run's log.jsonl, for the training curves
    details: dict | None = None  # extra keys for the report (data counts)
    top_wrong: int = 10
    progress: str = "evaluate"  # the progress bar's name


def evaluate_and_report(accelerator: Accelerator, model, loader, dataset: Dataset, config: TrainConfig,
                        console: RunConsole, options: ReportOptions) -> tuple[dict, dict | None]:
    """Score a prepared loader over `dataset` (tokenized rows with their texts) and write the report.

    Returns the metrics (every rank) and, on the main process, the full report that was written:
    metrics, details, report sections. Collective on every rank (the prediction); files on the main one.
    """
    outputs = predict_logits(accelerator, model, loader, console, options.progress)
    metrics = metrics_from_outputs(outputs, len(config.labels))
    if not accelerator.is_main_process:
        return metrics, None
    probabilities = torch.softmax(torch.from_numpy(outputs["logits"]).double(), dim=-1).numpy()
    ids = column_values(dataset, "id") if "id" in dataset.column_names else None
    sections = build_report(probabilities, outputs["labels"], config.labels, np.asarray(column_values(dataset, "length")),
                            texts=column_values(dataset, "text"), ids=ids, top_k=options.top_wrong)
    report = {**metrics, **(options.details or {}), **sections}
    console.metrics_table(options.title, metrics)
    show_report(console, sections)
    write_output(options.report_file, json.dumps(report, indent=2, ensure_ascii=False))
    figures = write_figures(report, config.labels, options.report_file, options.log_path, console)
    console.print(f"wrote {options.report_file}" + (f" and {', '.join(f.name for f in figures)}" if figures else ""))
    return metrics, report


def build_parser() -> ArgParser:
    parser = ArgParser(prog="trainer_pkg.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="CHECKPOINT_OR_EXPORT", help="<output_dir>/model or a checkpoint directory")
    parser.add_argument("--data", help="directory holding ratings_test.txt (or 'nsmc', or a hub dataset id)")
    parser.add_argument("--test_file", help="a labelled TSV/CSV/JSONL file")
    parser.add_argument("--text_column", help="text column name (default: the training run's)")
    parser.add_argument("--label_column", help="label column name (default: the training run's)")
    parser.add_argument("--output", help="metrics JSON to write (default: CHECKPOINT_OR_EXPORT/eval_metrics.json)")
    parser.add_argument("--batch_size", type=int,
                        help="examples per process per forward pass (default 32 on the CPU, 256 on a GPU)")
    parser.add_argument("--max_eval_samples", type=int, help="score only the first N rows")
    parser.add_argument("--top_wrong", type=int, default=10, help="how many of the most confidently wrong examples to list")
    parser.add_argument("--mixed_precision", default="auto", help="auto, no, bf16 or fp16")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1 (got {args.batch_size})")
    if args.top_wrong < 0:
        raise UserError(f"--top_wrong must be >= 0 (got {args.top_wrong})")
    model_dir = Path(args.model_dir)
    model, tokenizer = load_classifier(args.model_dir)
    labels = label_names(model)
    run_config = saved_run_config(model_dir)
    overrides = {k: getattr(args, k) for k in ("data", "test_file", "text_column", "label_column") if getattr(args, k)}
    if args.data:
        # Another data directory: none of the run's own files.
        overrides.update(train_file=None, validation_file=None, test_file=args.test_file)
    config = dataclasses.replace(run_config, **overrides, labels=labels, max_eval_samples=args.max_eval_samples)
    sources = source_files(config)
    split = scored_split(config)
    if split not in sources and "train" not in sources:
        raise missing_split_error(config, "test")
    source = sources.get(split, f"{sources.get('train')} (validation rows carved from it)")

    accelerator = make_accelerator(args.mixed_precision)
    console = RunConsole(enabled=accelerator.is_main_process)
    with accelerator.main_process_first():
        # The labels are the model's: a file with others needs another model, not other flags.
        label_hint = f"the model in {model_dir} knows only these labels: evaluate it on data with the same label set"
        splits, report = load_tokenized(config, tokenizer, (split,), label_hint)
    dataset = splits[split]
    for line in report.lines():
        console.print(line)
    loader = eval_dataloader(dataset, tokenizer, eval_batch_size(args.batch_size, accelerator.device.type))
    # Forward passes only: no DDP wrapper, whose gloo teardown at exit can deadlock against a
    # rank that finished first (the main process still writes the report then).
    model = accelerator.prepare_model(model, evaluation_mode=True)
    loader = accelerator.prepare(loader)
    details = dict(labels=labels, model=str(model_dir), data=source, split=split,
                   empty_texts=report.empty_texts.get(split, 0), truncated_texts=report.truncated_texts.get(split, 0))
    # Input problems handled rather than refused (README "Bad input"): counted in the JSON too.
    details.update(duplicate_ids=report.duplicate_ids.get(split, 0), blank_lines=report.blank_lines.get(split, 0),
                   ignored_columns=report.ignored_columns.get(split, []),
                   missing_classes=report.missing_classes.get(split, []))
    output = Path(args.output) if args.output else model_dir / "eval_metrics.json"
    _, written = evaluate_and_report(accelerator, model, loader, dataset, config, console, ReportOptions(
        output, f"{model_dir} on {source}", run_log(model_dir), details, args.top_wrong))
    if accelerator.is_main_process:
        print_json(written)
    end_processes(accelerator)
    return 0


def cli_main() -> None:
    cli(main)


if __name__ == "__main__":
    cli_main()
