"""Score a checkpoint or an exported model on a labelled test set.

    python -m trainer_pkg.evaluate CHECKPOINT_OR_EXPORT [--data DIR | --test_file FILE] [--output FILE.json]
    accelerate launch -m trainer_pkg.evaluate ...     # sharded over processes, gathered exactly

Without --data/--test_file the test data of the run that produced the model is used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from trainer_pkg.config import ArgParser, TrainConfig, config_from_file
from trainer_pkg.console import RunConsole, print_json, write_output
from trainer_pkg.data import DataReport, check_and_clean, eval_dataloader, read_table, source_files, tokenize
from trainer_pkg.distributed import make_accelerator
from trainer_pkg.errors import UserError, cli
from trainer_pkg.inference import evaluate_dataloader
from trainer_pkg.model import label_names, load_classifier

SAVED_CONFIGS = ("run_config.yaml", "training_config.yaml")


def saved_run_config(model_dir: Path) -> TrainConfig:
    """The training config stored with a checkpoint/export (defaults if there is none)."""
    for name in SAVED_CONFIGS:
        if (model_dir / name).is_file():
            return config_from_file(model_dir / name)
    return TrainConfig()


def build_parser() -> ArgParser:
    parser = ArgParser(prog="trainer_pkg.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="CHECKPOINT_OR_EXPORT", help="<output_dir>/model or a checkpoint directory")
    parser.add_argument("--data", help="directory holding ratings_test.txt (or 'nsmc', or a hub dataset id)")
    parser.add_argument("--test_file", help="a labelled TSV/CSV/JSONL file")
    parser.add_argument("--text_column", help="text column name (default: the training run's)")
    parser.add_argument("--label_column", help="label column name (default: the training run's)")
    parser.add_argument("--output", help="metrics JSON to write (default: CHECKPOINT_OR_EXPORT/eval_metrics.json)")
    parser.add_argument("--batch_size", type=int, default=256, help="examples per process per forward pass")
    parser.add_argument("--max_eval_samples", type=int, help="score only the first N rows")
    parser.add_argument("--mixed_precision", default="auto", help="auto, no, bf16 or fp16")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1 (got {args.batch_size})")
    model_dir = Path(args.model_dir)
    model, tokenizer = load_classifier(args.model_dir)
    labels = label_names(model)
    run_config = saved_run_config(model_dir)
    overrides = {k: getattr(args, k) for k in ("data", "test_file", "text_column", "label_column") if getattr(args, k)}
    if args.data and not args.test_file:
        overrides["test_file"] = None
    config = dataclasses.replace(run_config, **overrides, labels=labels, max_eval_samples=args.max_eval_samples)
    source = source_files(config)["test"]

    accelerator = make_accelerator(args.mixed_precision)
    console = RunConsole(enabled=accelerator.is_main_process)
    report = DataReport()
    with accelerator.main_process_first():
        # The labels are the model's: a file with others needs another model, not other flags.
        label_hint = f"the model in {model_dir} knows only these labels: evaluate it on data with the same label set"
        table = check_and_clean(read_table(source, "test", config.cache_dir, report), source, config, "test", report,
                                label_hint=label_hint)
        if config.max_eval_samples:
            table = table.select(range(min(config.max_eval_samples, len(table))))
        max_length = run_config.max_length or min(tokenizer.model_max_length, 512)
        dataset = tokenize(table, tokenizer, max_length, "test", report)
    report.rows["test"] = len(dataset)
    for line in report.lines():
        console.print(line)
    loader = eval_dataloader(dataset, tokenizer, args.batch_size)
    model, loader = accelerator.prepare(model, loader)
    metrics = evaluate_dataloader(accelerator, model, loader, len(labels), console, "evaluate")
    metrics.update(labels=labels, model=str(model_dir), data=source,
                   empty_texts=report.empty_texts.get("test", 0), truncated_texts=report.truncated_texts.get("test", 0))
    # Input problems handled rather than refused (README "Bad input"): counted in the JSON too.
    metrics.update(duplicate_ids=report.duplicate_ids.get("test", 0), blank_lines=report.blank_lines.get("test", 0),
                   ignored_columns=report.ignored_columns.get("test", []),
                   missing_classes=report.missing_classes.get("test", []))
    console.metrics_table(f"{model_dir} on {source}", metrics)
    if accelerator.is_main_process:
        output = Path(args.output) if args.output else model_dir / "eval_metrics.json"
        write_output(output, json.dumps(metrics, indent=2, ensure_ascii=False))
        console.print(f"wrote {output}")
        print_json(metrics)
    accelerator.end_training()
    return 0


def cli_main() -> None:
    cli(main)


if __name__ == "__main__":
    cli_main()
