"""Label texts with a checkpoint or an exported model.

    python -m trainer_pkg.predict CHECKPOINT_OR_EXPORT "text" ["text" ...]
    python -m trainer_pkg.predict CHECKPOINT_OR_EXPORT --input FILE|- [--output FILE.jsonl]

Output: one JSON object per input row, in input order, with `label` (name), `label_id`, `score`
(the predicted class's probability), `probabilities`, and the row's `id` when the input has one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

from trainer_pkg.config import ArgParser
from trainer_pkg.console import RunConsole, write_output
from trainer_pkg.data import DataReport, eval_dataloader, texts_dataset, tokenize
from trainer_pkg.distributed import make_accelerator
from trainer_pkg.errors import UserError, cli
from trainer_pkg.evaluate import saved_run_config
from trainer_pkg.inference import predict_logits
from trainer_pkg.model import label_names, load_classifier


def build_parser() -> ArgParser:
    parser = ArgParser(prog="trainer_pkg.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="CHECKPOINT_OR_EXPORT")
    parser.add_argument("texts", nargs="*", help="texts to label")
    parser.add_argument("--input", help="TSV/CSV/JSONL file with a text column, or - for one text per line on stdin")
    parser.add_argument("--output", help="JSONL file to write (default: stdout)")
    parser.add_argument("--text_column", help="text column name (default: the training run's)")
    parser.add_argument("--id_column", help="id column carried into the output (default: the training run's)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--mixed_precision", default="auto")
    parser.add_argument("--debug", action="store_true")
    return parser


def predictions(logits: torch.Tensor, labels: list[str]) -> list[dict]:
    probabilities = torch.softmax(logits.float(), dim=-1)
    scores, ids = probabilities.max(dim=-1)
    return [
        {"label": labels[i], "label_id": i, "score": s, "probabilities": dict(zip(labels, p))}
        for i, s, p in zip(ids.tolist(), scores.tolist(), probabilities.tolist())
    ]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.texts) == bool(args.input):
        raise UserError("give texts as arguments or --input FILE (one of the two)")
    model, tokenizer = load_classifier(args.model_dir)
    labels = label_names(model)
    run_config = saved_run_config(Path(args.model_dir))
    text_column = args.text_column or run_config.text_column
    id_column = args.id_column or run_config.id_column
    accelerator = make_accelerator(args.mixed_precision)
    console = RunConsole(enabled=accelerator.is_main_process and args.output is not None)
    with accelerator.main_process_first():
        table = (texts_dataset(args.input, text_column, id_column) if args.input
                 else Dataset.from_dict({"text": args.texts}))
        max_length = run_config.max_length or min(tokenizer.model_max_length, 512)
        dataset = tokenize(table, tokenizer, max_length, "predict", DataReport())
    loader = eval_dataloader(dataset, tokenizer, args.batch_size)
    model, loader = accelerator.prepare(model, loader)
    outputs = predict_logits(accelerator, model, loader, console, "predict")
    rows = predictions(torch.from_numpy(outputs["logits"]), labels)
    if accelerator.is_main_process:
        ids = dataset["id"] if "id" in dataset.column_names else None
        lines = []
        for position, row in enumerate(rows):
            record = {"id": ids[position]} if ids is not None else {}
            if not args.input:
                record["text"] = args.texts[position]
            lines.append(json.dumps({**record, **row}, ensure_ascii=False))
        text = "\n".join(lines) + "\n"
        if args.output:
            write_output(Path(args.output), text)
            console.print(f"wrote {len(rows):,} predictions to {args.output}")
        else:
            sys.stdout.write(text)
    accelerator.end_training()
    return 0


def cli_main() -> None:
    cli(main)


if __name__ == "__main__":
    cli_main()
