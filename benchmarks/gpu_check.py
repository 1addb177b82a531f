"""GPU check for the distributed paths (one command, a few minutes on one H100):

    python benchmarks/gpu_check.py [--shared ../shared] [--steps 300] [--out runs/gpu_check]

Trains the mBERT-base architecture (random init from ../shared's config; the real tokenizer) for
--steps optimizer steps on NSMC with (a) one GPU (plain DDP path), (b) DeepSpeed ZeRO-2 and
(c) ZeRO-3, each at world size 1, exports, evaluates the export on 5,000 test rows, and prints
one table: final loss (the three should agree closely), samples/s, peak GPU memory, accuracy.
Numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "single GPU": [],
    "ZeRO-2": ["accelerate_configs/deepspeed_zero2.yaml"],
    "ZeRO-3": ["accelerate_configs/deepspeed_zero3.yaml"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="runs/gpu_check")
    args = parser.parse_args()
    shared = Path(args.shared)
    rows = []
    for name, config in SETTINGS.items():
        output_dir = Path(args.out) / name.replace(" ", "_").replace("-", "")
        launcher = [sys.executable, "-m", "trainer_pkg.train"]
        if config:
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                        "--num_processes", "1", "-m", "trainer_pkg.train"]
        train = [*launcher, "--data", str(shared / "data/nsmc"),
                 "--model", str(shared / "models/bert-base-multilingual-uncased"), "--from_scratch",
                 "--lr", "1e-4", "--max_steps", str(args.steps), "--per_device_batch_size", str(args.batch),
                 "--max_eval_samples", "5000", "--log_every", "25", "--output_dir", str(output_dir),
                 "--overwrite_output_dir"]
        started = time.time()
        result = subprocess.run(train, cwd=REPO)
        seconds = time.time() - started
        if result.returncode != 0:
            rows.append((name, "failed", "", "", "", f"{seconds:.0f}"))
            continue
        log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
        steps = [r for r in log if r["kind"] == "train"]
        subprocess.run([sys.executable, "-m", "trainer_pkg.evaluate", str(output_dir / "model"), "--data",
                        str(shared / "data/nsmc"), "--max_eval_samples", "5000", "--output",
                        str(output_dir / "eval.json")], cwd=REPO, check=False, capture_output=True)
        evaluated = output_dir / "eval.json"
        accuracy = json.loads(evaluated.read_text())["accuracy"] if evaluated.is_file() else float("nan")
        rate = sum(r["samples_per_s"] for r in steps[1:]) / max(1, len(steps) - 1)
        rows.append((name, f"{steps[-1]['loss']:.4f}", f"{rate:,.0f}", f"{steps[-1].get('peak_memory_gb', 0):.1f}",
                     f"{accuracy:.4f}", f"{seconds:.0f}"))
    header = ("setting", "final loss", "samples/s", "peak GiB", "export acc", "wall s")
    print("\n" + " | ".join(header))
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
