"""Origin recipe (HF Trainer) vs trainer_pkg defaults, side by side, on the same data and model.

    python benchmarks/benchmark.py                       # CPU: tiny proxy, 20k train rows (~6 min)
    python benchmarks/benchmark.py --model_size base     # GPU: mBERT-base architecture

Both runs train the same architecture from the same config (random init: no weights offline) on
the same seeded sample of NSMC training rows for one epoch, then score the same test rows:

  origin        HF Trainer, batch 8, lr 5e-5, fp32, DataCollatorWithPadding(padding="longest")
  hf_tuned      the same Trainer at batch 32, lr 1e-3 (the from-scratch reference; --skip_tuned drops it)
  trainer_pkg   `python -m trainer_pkg.train` with its defaults (+ --trainer_pkg_args); the proxy
                with its own config, as `make train` runs it (configs/nsmc_proxy_offline.yaml)

Printed per run: samples/s and real tokens/s of training, padding efficiency (real / padded
tokens actually fed to the model), peak memory (GPU: allocated; CPU: the process's peak RSS), MFU
on GPU (formula printed), test accuracy/F1 and evaluation time, and the ratios to `origin`.
Numbers are printed, not asserted. Each run is its own process, so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this folder is on sys.path, not the repo: make trainer_pkg importable without
# an install too (the GPU image runs from a plain checkout).
sys.path.insert(0, str(REPO))
PROXY = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
PROXY_CONFIG = REPO / "configs" / "nsmc_proxy_offline.yaml"
# Dense bf16 peak of an H100 SXM (the spec sheet's number without sparsity).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
HF_RECIPES = {"origin": (8, 5e-5), "hf_tuned": (32, 1e-3)}


def write_sample(source: Path, target: Path, rows: int, seed: int) -> None:
    """A seeded sample of an NSMC-format TSV (header kept), read with quoting off like the original."""
    lines = source.read_text(encoding="utf-8").splitlines()
    header, body = lines[0], lines[1:]
    if rows < len(body):
        body = random.Random(seed).sample(body, rows)
    target.write_text("\n".join([header, *body]) + "\n", encoding="utf-8")


def model_overrides(size: str) -> dict:
    return PROXY if size == "proxy" else {}


def trainer_pkg_recipe(size: str) -> list[str]:
    """The proxy's config holds its architecture (PROXY) and what was tuned on it; other sizes take
    the --from_scratch defaults."""
    return ["--config", str(PROXY_CONFIG)] if size == "proxy" else []


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_hf_trainer(args: argparse.Namespace) -> dict:
    """The origin recipe, as the textbook chapter wrote it (child process)."""
    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from trainer_pkg.metrics import classification_metrics

    batch_size, lr = HF_RECIPES[args.only]
    out = Path(args.out)
    files = {"train": str(out / "train.tsv"), "test": str(out / "test.tsv")}
    data = load_dataset("csv", data_files=files, delimiter="\t", quoting=3, keep_default_na=False,
                        cache_dir=str(out / "hf_cache"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = data.map(lambda rows: tokenizer(rows["document"], truncation=True), batched=True)
    data = data.rename_column("label", "labels").remove_columns(["id", "document"])
    config = AutoConfig.from_pretrained(args.model, num_labels=2, **model_overrides(args.model_size))
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_config(config)

    counts = {"tokens": 0, "padded": 0}
    pad = DataCollatorWithPadding(tokenizer, padding="longest")

    def counting_collator(features):
        batch = pad(features)
        counts["tokens"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["input_ids"].numel()
        return batch

    training = TrainingArguments(
        output_dir=str(out / args.only), per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        learning_rate=lr, num_train_epochs=1, report_to="none", save_strategy="no", logging_steps=500,
        seed=42, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training, train_dataset=data["train"], data_collator=counting_collator)
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    tokens, padded = counts["tokens"], counts["padded"]
    started = time.time()
    prediction = trainer.predict(data["test"])
    eval_seconds = time.time() - started
    metrics = classification_metrics(np.argmax(prediction.predictions, -1), prediction.label_ids, 2)
    return {"seconds": seconds, "samples": len(data["train"]), "tokens": tokens, "padded_tokens": padded,
            "peak_memory_gb": peak_memory_gb(), "accuracy": metrics["accuracy"], "f1": metrics["f1"],
            "eval_seconds": eval_seconds, "eval_samples": len(data["test"])}


def run_trainer_pkg(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    run_dir = out / "trainer_pkg"
    command = [sys.executable, "-m", "trainer_pkg.train", "--train_file", str(out / "train.tsv"),
               "--test_file", str(out / "test.tsv"), "--model", args.model, "--from_scratch",
               "--validation_size", "0", "--epochs", "1", "--output_dir", str(run_dir), "--overwrite_output_dir",
               "--cache_dir", str(out / "hf_cache"), *trainer_pkg_recipe(args.model_size),
               *shlex.split(args.trainer_pkg_args)]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r["kind"] == "train_summary")
    test = next(r for r in reversed(records) if r["kind"] == "test")
    return {"seconds": summary["seconds"], "samples": summary["samples"], "tokens": summary["tokens"],
            "padded_tokens": summary["padded_tokens"], "peak_memory_gb": summary["peak_memory_gb"],
            "accuracy": test["accuracy"], "f1": test["f1"], "eval_seconds": test["seconds"],
            "eval_samples": test["num_samples"]}


def run_child(args: argparse.Namespace, name: str) -> dict:
    """Each HF run in a fresh process: its own peak memory, no state shared with the others."""
    command = [sys.executable, __file__, "--only", name, *args.forwarded]
    print("$", shlex.join(command), flush=True)
    result = subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def non_embedding_parameters(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(args.model, num_labels=2, **model_overrides(args.model_size))
    model = AutoModelForSequenceClassification.from_config(config)
    embeddings = sum(p.numel() for p in model.get_input_embeddings().parameters())
    embeddings += sum(p.numel() for n, p in model.named_parameters() if "position_embeddings" in n or "token_type" in n)
    return sum(p.numel() for p in model.parameters()) - embeddings


def gpu_peak() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name()
    return name, next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    device, peak = gpu_peak()
    params = non_embedding_parameters(args)
    origin = results.get("origin")
    table = Table(title=f"{args.model_size} model, {args.samples:,} train / {args.test_samples:,} test rows, 1 epoch, {device}")
    for column in ("run", "train s", "samples/s", "tokens/s", "padding eff.", "peak GiB", "MFU", "test acc", "test F1",
                   "eval s", "speed vs origin"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, r in results.items():
        rate = r["samples"] / r["seconds"]
        tokens_per_s = r["tokens"] / r["seconds"]
        mfu = f"{tokens_per_s * 6 * params / peak:.1%}" if peak else "n/a"
        ratio = f"{rate / (origin['samples'] / origin['seconds']):.1f}x" if origin else "-"
        table.add_row(name, f"{r['seconds']:.1f}", f"{rate:,.0f}", f"{tokens_per_s:,.0f}",
                      f"{r['tokens'] / max(r['padded_tokens'], 1):.2f}", f"{r['peak_memory_gb']:.2f}", mfu,
                      f"{r['accuracy']:.4f}", f"{r['f1']:.4f}", f"{r['eval_seconds']:.1f}", ratio)
    console = Console(width=160)
    console.print(table)
    console.print(f"MFU = real tokens/s x 6 x {params / 1e6:.1f}M non-embedding parameters / "
                  f"{'%.0f' % (peak / 1e12) + ' TFLOP/s (dense bf16 peak)' if peak else 'peak (GPU only)'}; "
                  "padding eff. = real tokens / padded tokens in the training batches; eval s = test set scoring.")
    (Path(args.out) / "benchmark.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="holds data/nsmc and models/")
    parser.add_argument("--model_size", choices=("proxy", "base"), default="proxy",
                        help="proxy: 2 layers, hidden 128 (CPU); base: the full mBERT-base architecture (GPU)")
    parser.add_argument("--samples", type=int, default=20_000, help="training rows (seeded sample of the 150k)")
    parser.add_argument("--test_samples", type=int, default=5_000, help="test rows scored by every run")
    parser.add_argument("--trainer_pkg_args", default="", help="extra flags for trainer_pkg.train")
    parser.add_argument("--skip_tuned", action="store_true", help="leave out the HF Trainer batch-32 lr-1e-3 run")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmark"))
    parser.add_argument("--quiet", action="store_true", help="hide trainer_pkg's console output")
    parser.add_argument("--only", choices=tuple(HF_RECIPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = str(Path(args.shared) / "models" / "bert-base-multilingual-uncased")
    args.forwarded = [a for a in sys.argv[1:] if a != "--quiet"]
    if args.only:
        print(json.dumps(run_hf_trainer(args)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nsmc = Path(args.shared) / "data" / "nsmc"
    if not (nsmc / "ratings_train.txt").is_file():
        sys.exit(f"error: {nsmc}/ratings_train.txt not found; pass --shared DIR (holding data/nsmc and models/)")
    write_sample(nsmc / "ratings_train.txt", out / "train.tsv", args.samples, seed=0)
    write_sample(nsmc / "ratings_test.txt", out / "test.tsv", args.test_samples, seed=1)
    results = {"origin": run_child(args, "origin")}
    if not args.skip_tuned:
        results["hf_tuned"] = run_child(args, "hf_tuned")
    results["trainer_pkg"] = run_trainer_pkg(args)
    report(results, args)


if __name__ == "__main__":
    main()
