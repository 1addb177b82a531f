"""Padding to multiples of 8 vs to the longest row, side by side, on this machine's device.

    python benchmarks/padding.py [--steps 30] [--batch 32]

Multiples of 8 suit GPU tensor cores; on a CPU every padded position is arithmetic for nothing.
This times forward + backward + optimizer steps of all-MiniLM-L6-v2 on the same length-grouped
SST-2 batches (trainer_pkg's own sampler and collator), interleaving the two paddings step by step
so that both see the same machine load, and prints tokens computed, seconds and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer_pkg.data import LengthGroupedSampler, PackedTokens

    shared = Path(args.shared)
    model_dir = shared / "models" / "all-MiniLM-L6-v2"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    table = load_dataset("csv", data_files={"train": str(shared / "data" / "sst2" / "train.tsv")}, delimiter="\t",
                         quoting=3, keep_default_na=False, split="train")
    table = table.select(range(20_000)).map(lambda rows: tokenizer(rows["sentence"], truncation=True), batched=True)
    packed = {multiple: PackedTokens(table.rename_column("label", "labels"), tokenizer.pad_token_id,
                                     pad_to_multiple_of=multiple) for multiple in (8, 1)}
    sampler = list(LengthGroupedSampler(packed[8].lengths.tolist(), args.batch, seed=0))
    batches = [sampler[i:i + args.batch] for i in range(0, args.steps * args.batch, args.batch)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    seconds, tokens = {8: 0.0, 1: 0.0}, {8: 0, 1: 0}
    for step, rows in enumerate(batches):
        for multiple in (8, 1) if step % 2 else (1, 8):
            batch = {k: v.to(device) for k, v in packed[multiple].collate(rows).items()}
            started = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step:  # the first step of each warms up
                seconds[multiple] += time.perf_counter() - started
                tokens[multiple] += batch["input_ids"].numel()
    for multiple in (8, 1):
        print(f"pad to multiple of {multiple}: {tokens[multiple]:,} padded tokens, {seconds[multiple]:.1f} s")
    print(f"{device}: padding to the longest row takes {seconds[1] / seconds[8]:.2f}x the time of multiples of 8 "
          f"({args.steps - 1} steps of {args.batch} rows each, interleaved)")


if __name__ == "__main__":
    main()
