"""Label texts with a checkpoint or an exported model.

    python -m trainer_pkg.predict CHECKPOINT_OR_EXPORT "text" ["text" ...]
    python -m trainer_pkg.predict CHECKPOINT_OR_EXPORT --input FILE [--output FILE.jsonl]
    torchrun --nproc_per_node N -m trainer_pkg.predict ... --input FILE    # sharded, same output
    producer | python -m trainer_pkg.predict CHECKPOINT_OR_EXPORT --input - [--chunk_size N]

Output: one JSON object per input row, in input order, with `label` (name), `label_id`, `score`
(the predicted class's probability), `probabilities`, and the row's `id` when the input has one
(`line`, counted from 1, for stdin). Stdin is streamed: every --chunk_size lines are predicted and
written (and flushed) before more are read, so the command can sit at the end of a pipe.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset

from trainer_pkg.config import ArgParser
from trainer_pkg.console import RunConsole, write_output
from trainer_pkg.data import DataReport, column_values, eval_dataloader, texts_dataset, tokenize, truncation_length
from trainer_pkg.distributed import end_processes, make_accelerator
from trainer_pkg.errors import UserError, cli
from trainer_pkg.evaluate import saved_run_config
from trainer_pkg.inference import eval_batch_size, predict_logits
from trainer_pkg.model import label_names, load_classifier


def build_parser() -> ArgParser:
    parser = ArgParser(prog="trainer_pkg.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="CHECKPOINT_OR_EXPORT")
    parser.add_argument("texts", nargs="*", help="texts to label")
    parser.add_argument("--input", help="TSV/CSV/JSONL file with a text column, or - for one text per line on stdin")
    parser.add_argument("--output", help="JSONL file to write (default: stdout)")
    parser.add_argument("--text_column", help="text column name (default: the training run's)")
    parser.add_argument("--id_column", help="id column carried into the output (default: the training run's)")
    parser.add_argument("--batch_size", type=int, help="texts per forward pass (default 32 on the CPU, 256 on a GPU)")
    parser.add_argument("--chunk_size", type=int, default=256,
                        help="stdin: predict and write every N lines (1 answers each line as it arrives)")
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


def predict_dataset(accelerator: Accelerator, model, tokenizer, dataset: Dataset, batch_size: int,
                    labels: list[str], console: RunConsole | None, sharded: bool = True) -> list[dict]:
    """Predictions for every row of a tokenized dataset, in row order, on every rank."""
    loader = eval_dataloader(dataset, tokenizer, batch_size)
    if sharded:
        loader = accelerator.prepare(loader)
    else:
        # Not registered with the accelerator: a stream prepares one loader per chunk, and
        # registered ones would be kept alive for the whole stream.
        loader = prepare_data_loader(loader, device=accelerator.device, num_processes=1, process_index=0)
    outputs = predict_logits(accelerator, model, loader, console, "predict")
    return predictions(torch.from_numpy(outputs["logits"]), labels)


def stdin_chunks(size: int) -> Iterator[list[str]]:
    """Lines of stdin, `size` at a time; a chunk is handed on as soon as it is full."""
    # UTF-8 whatever the locale: reviews are Korean, and a C locale would fail to decode them.
    stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline=None)
    chunk = []
    for line in stream:
        chunk.append(line.rstrip("\r\n"))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def open_output(path: str | None):
    if path is None:
        return sys.stdout
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")
    except OSError as error:
        raise UserError(f"--output {path}: cannot write ({error.strerror})") from None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.texts) == bool(args.input):
        raise UserError("give texts as arguments or --input FILE (one of the two)")
    for flag in ("batch_size", "chunk_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    model, tokenizer = load_classifier(args.model_dir)
    labels = label_names(model)
    run_config = saved_run_config(Path(args.model_dir))
    text_column = args.text_column or run_config.text_column
    id_column = args.id_column or run_config.id_column
    max_length = truncation_length(run_config, tokenizer)
    accelerator = make_accelerator(args.mixed_precision)
    batch_size = eval_batch_size(args.batch_size, accelerator.device.type)
    # Forward passes only: no DDP wrapper, whose gloo teardown at exit can deadlock against a
    # rank that finished first.
    if args.input == "-":
        if accelerator.num_processes > 1:
            raise UserError("--input - (stdin) is read by one process; run it without a launcher, "
                            "or give a file to shard it over processes")
        model = accelerator.prepare_model(model, evaluation_mode=True)
        output = open_output(args.output)
        line = 0
        for chunk in stdin_chunks(args.chunk_size):
            dataset = tokenize(Dataset.from_dict({"text": chunk}), tokenizer, max_length, "predict", DataReport())
            rows = predict_dataset(accelerator, model, tokenizer, dataset, batch_size, labels, None, sharded=False)
            for row in rows:
                line += 1
                output.write(json.dumps({"line": line, **row}, ensure_ascii=False) + "\n")
            output.flush()
        if output is not sys.stdout:
            output.close()
        end_processes(accelerator)
        return 0

    console = RunConsole(enabled=accelerator.is_main_process and args.output is not None)
    with accelerator.main_process_first():
        table = (texts_dataset(args.input, text_column, id_column) if args.input
                 else Dataset.from_dict({"text": args.texts}))
        dataset = tokenize(table, tokenizer, max_length, "predict", DataReport())
    model = accelerator.prepare_model(model, evaluation_mode=True)
    rows = predict_dataset(accelerator, model, tokenizer, dataset, batch_size, labels, console)
    if accelerator.is_main_process:
        ids = column_values(table, "id") if "id" in table.column_names else None
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
    end_processes(accelerator)
    return 0


def cli_main() -> None:
    cli(main)


if __name__ == "__main__":
    cli_main()
