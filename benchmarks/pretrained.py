"""The pretrained path, side by side: HF Trainer recipes vs trainer_pkg's defaults, same SST-2 rows.

    python benchmarks/pretrained.py                        # CPU: 16,000 SST-2 rows, all-MiniLM-L6-v2
    python benchmarks/pretrained.py --train_rows 67349     # the full training set

Every run fine-tunes ../shared/models/all-MiniLM-L6-v2 (pretrained) on the same seeded sample of
SST-2 training rows and is scored on the whole dev set (872 rows):

  origin       HF Trainer, batch 8, lr 5e-5, 1 epoch (the textbook recipe)
  run_glue     HF Trainer, batch 32, lr 2e-5, 1 epoch (transformers' run_glue.py recipe)
  trainer_pkg  `python -m trainer_pkg.train` with its defaults, validating on dev every --eval_every steps

Both HF runs use DataCollatorWithPadding(padding="longest"), fp32, on the CPU. Every wall time is
the whole process, launch to last score, seen from here. Printed: samples/s of training, final dev
accuracy, wall time, and for trainer_pkg the wall time at which its validation first reached each HF
run's final dev accuracy, with the ratio (time to accuracy). Numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import peak_memory_gb, write_sample  # noqa: E402

HF_RECIPES = {"origin": (8, 5e-5), "run_glue": (32, 2e-5)}


def run_hf_trainer(args: argparse.Namespace) -> dict:
    """One HF Trainer recipe (child process): fine-tune, then score dev."""
    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from trainer_pkg.metrics import classification_metrics

    batch_size, lr = HF_RECIPES[args.only]
    out = Path(args.out)
    data = load_dataset("csv", data_files={"train": str(out / "train.tsv"), "dev": args.dev}, delimiter="\t",
                        quoting=3, keep_default_na=False, cache_dir=str(out / "hf_cache"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = data.map(lambda rows: tokenizer(rows["sentence"], truncation=True), batched=True)
    data = data.rename_column("label", "labels").remove_columns(["id", "sentence"])
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    training = TrainingArguments(
        output_dir=str(out / args.only), per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        learning_rate=lr, num_train_epochs=args.hf_epochs, report_to="none", save_strategy="no", logging_steps=500,
        seed=42, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training, train_dataset=data["train"],
                      data_collator=DataCollatorWithPadding(tokenizer, padding="longest"))
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    prediction = trainer.predict(data["dev"])
    metrics = classification_metrics(np.argmax(prediction.predictions, -1), prediction.label_ids, 2)
    return {"train_seconds": seconds, "samples": len(data["train"]) * args.hf_epochs, "accuracy": metrics["accuracy"],
            "peak_memory_gb": peak_memory_gb()}


def run_hf(args: argparse.Namespace, name: str) -> dict:
    command = [sys.executable, __file__, "--only", name, *args.forwarded]
    print("$", shlex.join(command), flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_seconds": time.time() - started}


def run_trainer_pkg(args: argparse.Namespace) -> dict:
    """trainer_pkg's defaults; each validation's wall time is when its line reaches the log."""
    out = Path(args.out)
    run_dir = out / "trainer_pkg"
    log = run_dir / "log.jsonl"
    command = [sys.executable, "-m", "trainer_pkg.train", "--model", args.model, "--train_file", str(out / "train.tsv"),
               "--validation_file", args.dev, "--eval_every", str(args.eval_every), "--output_dir", str(run_dir),
               "--overwrite_output_dir", "--report_to", "none", "--cache_dir", str(out / "hf_cache"),
               *shlex.split(args.trainer_pkg_args)]
    print("$", shlex.join(command), flush=True)
    log.unlink(missing_ok=True)
    started = time.time()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL if args.quiet else None)
    validations, seen = [], 0
    while True:
        finished = child.poll() is not None
        lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
        for line in lines[seen:]:
            record = json.loads(line)
            if record["kind"] == "validation":
                validations.append({"step": record["step"], "accuracy": record["accuracy"],
                                    "wall_seconds": time.time() - started})
        seen = len(lines)
        if finished:
            break
        time.sleep(0.5)
    if child.returncode != 0:
        sys.exit(f"trainer_pkg exited {child.returncode}")
    wall = time.time() - started
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    summary = next(r for r in records if r["kind"] == "train_summary")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"train_seconds": summary["seconds"], "samples": summary["samples"], "wall_seconds": wall,
            "accuracy": metrics["validation"]["accuracy"], "validations": validations,
            "peak_memory_gb": summary["peak_memory_gb"], "plan": metrics["plan"]}


def first_reaching(validations: list[dict], accuracy: float) -> dict | None:
    return next((v for v in validations if v["accuracy"] >= accuracy), None)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    ours = results["trainer_pkg"]
    plan = ours["plan"]
    table = Table(title=f"all-MiniLM-L6-v2 on {args.train_rows:,} SST-2 rows, scored on dev (872 rows), CPU")
    for column in ("run", "recipe", "samples/s", "dev acc", "wall s", "trainer_pkg reaches it at", "time to accuracy"):
        table.add_column(column, justify="left" if column in ("run", "recipe") else "right")
    for name, r in results.items():
        if name == "trainer_pkg":
            recipe = (f"batch {plan['global_batch_size']}, lr {plan['lr']:.3g}, {plan['epochs']} epoch(s), "
                      f"validation every {args.eval_every} steps")
            reached = ratio = "-"
        else:
            batch, lr = HF_RECIPES[name]
            recipe = f"batch {batch}, lr {lr:g}, {args.hf_epochs} epoch(s)"
            hit = first_reaching(ours["validations"], r["accuracy"])
            reached = f"{hit['wall_seconds']:.0f} s (step {hit['step']})" if hit else "never"
            ratio = f"{r['wall_seconds'] / hit['wall_seconds']:.2f}x" if hit else "-"
        table.add_row(name, recipe, f"{r['samples'] / r['train_seconds']:.1f}", f"{r['accuracy']:.4f}",
                      f"{r['wall_seconds']:.0f}", reached, ratio)
    console = Console(width=170)
    console.print(table)
    best_hf = max(r["accuracy"] for name, r in results.items() if name != "trainer_pkg")
    console.print(f"trainer_pkg final dev accuracy {ours['accuracy']:.4f} vs the better HF run's {best_hf:.4f} "
                  f"({ours['accuracy'] - best_hf:+.4f}); time to accuracy = the HF run's wall time / trainer_pkg's wall "
                  "time at its first validation at or above that run's final dev accuracy.")
    (Path(args.out) / "pretrained_benchmark.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="holds data/sst2 and models/")
    parser.add_argument("--train_rows", type=int, default=16_000, help="seeded sample of SST-2's 67,349 training rows")
    parser.add_argument("--eval_every", type=int, default=20, help="trainer_pkg validates on dev every N steps")
    parser.add_argument("--hf_epochs", type=int, default=1, help="epochs of both HF Trainer recipes")
    parser.add_argument("--trainer_pkg_args", default="", help="extra flags for trainer_pkg.train")
    parser.add_argument("--skip", nargs="*", default=[], choices=tuple(HF_RECIPES), help="HF runs to leave out")
    parser.add_argument("--out", default=str(REPO / "runs" / "pretrained_benchmark"))
    parser.add_argument("--quiet", action="store_true", help="hide trainer_pkg's console output")
    parser.add_argument("--only", choices=tuple(HF_RECIPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shared = Path(args.shared)
    args.model = str(shared / "models" / "all-MiniLM-L6-v2")
    args.dev = str(shared / "data" / "sst2" / "dev.tsv")
    args.forwarded = [a for a in sys.argv[1:] if a != "--quiet"]
    if args.only:
        print(json.dumps(run_hf_trainer(args)))
        return
    if not (shared / "data" / "sst2" / "train.tsv").is_file() or not (Path(args.model) / "model.safetensors").is_file():
        sys.exit(f"error: no data/sst2/train.tsv or models/all-MiniLM-L6-v2 under {shared}; pass --shared DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_sample(shared / "data" / "sst2" / "train.tsv", out / "train.tsv", args.train_rows, seed=0)
    results = {name: run_hf(args, name) for name in HF_RECIPES if name not in args.skip}
    results["trainer_pkg"] = run_trainer_pkg(args)
    report(results, args)


if __name__ == "__main__":
    main()
