"""Evaluation batch sizes side by side, on this machine's device.

    python benchmarks/eval_batch.py [--sizes 32 64 128 256] [--repeats 4] [--nsmc_rows 500]

A validation is a forward pass over the whole split, length-sorted (trainer_pkg's eval_dataloader
and predict_logits). This times one at each batch size, the sizes interleaved in every repeat so
that all see the same machine load, for three shapes of encoder: pretrained all-MiniLM-L6-v2 on
SST-2 dev, the NSMC proxy (2 layers, hidden 128) and mBERT-base (random weights: the timing does
not depend on them) on the first --nsmc_rows NSMC test reviews. It prints the median seconds and
each size's time as a multiple of the fastest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROXY = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}


def encoders(shared: Path, nsmc_rows: int):
    """(name, model, tokenizer, texts) for each shape of encoder timed."""
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    def texts(path: str, column: str, rows: int) -> list[str]:
        table = load_dataset("csv", data_files=path, delimiter="\t", quoting=3, keep_default_na=False, split="train")
        return table[column][:rows]

    minilm = shared / "models" / "all-MiniLM-L6-v2"
    sst2_dev = texts(str(shared / "data" / "sst2" / "dev.tsv"), "sentence", 872)
    yield ("all-MiniLM-L6-v2 (pretrained), SST-2 dev", AutoModelForSequenceClassification.from_pretrained(
        minilm, num_labels=2), AutoTokenizer.from_pretrained(minilm), sst2_dev)
    mbert = shared / "models" / "bert-base-multilingual-uncased"
    nsmc = texts(str(shared / "data" / "nsmc" / "ratings_test.txt"), "document", nsmc_rows)
    tokenizer = AutoTokenizer.from_pretrained(mbert)
    for name, overrides in (("NSMC proxy (2 layers, hidden 128)", PROXY), ("mBERT-base (random weights)", {})):
        config = AutoConfig.from_pretrained(mbert, num_labels=2, **overrides)
        yield f"{name}, NSMC test", AutoModelForSequenceClassification.from_config(config), tokenizer, nsmc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--nsmc_rows", type=int, default=500, help="NSMC test rows for the proxy and mBERT-base")
    args = parser.parse_args()
    from accelerate import Accelerator
    from datasets import Dataset

    from trainer_pkg.data import eval_dataloader
    from trainer_pkg.inference import predict_logits

    accelerator = Accelerator()
    for name, model, tokenizer, texts in encoders(Path(args.shared), args.nsmc_rows):
        encoded = tokenizer(texts, truncation=True, max_length=128)
        dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
        model = accelerator.prepare(model.eval())
        loaders = {size: accelerator.prepare(eval_dataloader(dataset, tokenizer, size)) for size in args.sizes}
        predict_logits(accelerator, model, loaders[args.sizes[0]])  # warm-up
        seconds: dict[int, list[float]] = {size: [] for size in args.sizes}
        for _ in range(args.repeats):
            for size, loader in loaders.items():
                started = time.perf_counter()
                predict_logits(accelerator, model, loader)  # ends with a copy to the host: synchronised
                seconds[size].append(time.perf_counter() - started)
        medians = {size: statistics.median(times) for size, times in seconds.items()}
        fastest = min(medians.values())
        print(f"{accelerator.device.type}: {name}, {len(texts)} rows, median of {args.repeats}", flush=True)
        for size, median in medians.items():
            print(f"  batch {size:>4}: {median:6.2f} s  {median / fastest:.2f}x the fastest", flush=True)


if __name__ == "__main__":
    main()
