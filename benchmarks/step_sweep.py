"""Steady-state step time of trainer_pkg's training loop across batch shapes, and evaluation time.

    python benchmarks/step_sweep.py --shared ../shared --shapes b64 b256 b512 --eval_batches 256 1024
    python benchmarks/step_sweep.py --shared ../shared --model_size proxy      # the CPU proxy
    python benchmarks/step_sweep.py --shared ../shared --profile --with_casts --with_syncs --shapes b512 b1024
    python benchmarks/step_sweep.py --shared ../shared --model_size narrow --mixed_precision bf16 --with_casts

A tuning aid for choosing batch defaults per device, not a test: for each batch shape (`bN`: N rows
per step) it trains the same model with the product's own step
(`trainer_pkg.loop.TrainStep`: forward, backward, clipping, the non-finite watch, fused AdamW and
the schedule, no host sync) and meter on the real NSMC training rows, skips `--warmup` steps,
then times `--steps` steps and prints ms/step, samples/s,
real tokens/s, padding efficiency and, on a GPU, how busy the GPU was (`--profile`: kernel time /
wall time over 10 steps of the first shape; well under 100% means the host CPU, launching
kernels, bounds the step). Variants of the loop, each shape side by side in one run:
`--with_casts` adds the loop with bf16 autocast casting every Linear weight in every forward (no
`trainer_pkg.weight_copies`), `--with_syncs` the loop as it ran before its host syncs were removed
(a blocking batch copy, the model's own padding-mask check, and those casts). Then it times scoring
the whole test split at each `--eval_batches`.

`--model_size narrow` is mBERT-base's 12 layers at width 64, for running the variants on the CPU:
its layers cost little arithmetic, so more of a step is per-op overhead (the word embeddings'
optimizer update remains), though not the kernel launches that a GPU's host pays for.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a plain checkout (the GPU image) too

import torch  # noqa: E402

from benchmarks.benchmark import PROXY  # noqa: E402
from trainer_pkg.config import TrainConfig  # noqa: E402
from trainer_pkg.data import eval_dataloader, load_tokenized, resolve_columns_and_labels, train_dataloader  # noqa: E402
from trainer_pkg.distributed import make_accelerator  # noqa: E402
from trainer_pkg.inference import evaluate_dataloader  # noqa: E402
from trainer_pkg.loop import TrainMeter, TrainStep  # noqa: E402
from trainer_pkg.model import accepts_prepared_mask, build_model, build_optimizer, load_tokenizer  # noqa: E402
from trainer_pkg.run_dir import TrainingState  # noqa: E402
from trainer_pkg.weight_copies import low_precision_weights  # noqa: E402

NARROW = {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256}
# The loop as it is, and the variants it is compared with (see the module doc).
VARIANTS = {"now": (False, False), "casts": (False, True), "sync": (True, True)}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def shape_config(config: TrainConfig, shape: str) -> TrainConfig:
    kind, size = shape[0], int(shape[1:])
    if kind == "b":
        return dataclasses.replace(config, per_device_batch_size=size, grad_accum=1)
    raise SystemExit(f"error: shape {shape!r}: use bN (N rows per step)")


def time_shape(accelerator, model, optimizer, train, tokenizer, config, warmup: int, steps: int,
               profile: bool, with_syncs: bool = False, bf16_weights=None) -> dict:
    loader = accelerator.prepare(train_dataloader(train, tokenizer, config))
    # with_syncs: the loop before the sync-free step, for a side-by-side measurement: a blocking
    # copy of each batch, and the model's own check of the padding mask (a sync in every forward).
    prepared_mask = not with_syncs and accepts_prepared_mask(accelerator.unwrap_model(model))
    if with_syncs:
        loader._non_blocking = False
    batches = iter(loader)
    # A constant schedule: the sweep times steps, it does not train to a result.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    train_step = TrainStep(accelerator, model, optimizer, scheduler, config, batches_per_epoch=len(loader),
                           prepared_mask=prepared_mask, low_precision=bf16_weights)
    state = TrainingState()
    meter = TrainMeter(accelerator)

    def step(batch) -> None:
        meter.add(train_step(batch, state), batch)

    for _ in range(warmup):
        step(next(batches))
    busy = None
    if profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        synchronize()
        started = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            for _ in range(10):
                step(next(batches))
            synchronize()
        wall = time.perf_counter() - started
        kernels = [e for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = {"kernel_ms_per_step": sum(e.device_time for e in kernels) / 1e3 / 10,
                "wall_ms_per_step": wall * 1e3 / 10, "kernels_per_step": len(kernels) / 10}
    meter.flush()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    synchronize()
    seconds = time.perf_counter() - started
    window = meter.flush()
    return {"ms_per_step": seconds * 1e3 / steps, "samples_per_s": window["samples"] / seconds,
            "tokens_per_s": window["tokens_per_s"], "padding_efficiency": window["padding_efficiency"],
            "rows_per_step": window["samples"] / steps, "busy": busy, "loss": window["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="holds data/nsmc and models/")
    parser.add_argument("--model_size", choices=("proxy", "base", "narrow"), default="base")
    parser.add_argument("--mixed_precision", default="auto", help="as trainer_pkg.train's (auto: bf16 on a GPU)")
    parser.add_argument("--shapes", nargs="+", default=["b64", "b256", "b512"])
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps per shape (cuBLAS/allocator warm-up)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per shape")
    parser.add_argument("--eval_batches", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--profile", action="store_true", help="GPU busy fraction over 10 steps of each shape")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (as --compile does)")
    parser.add_argument("--with_syncs", action="store_true",
                        help="also time each shape with a host sync per step (blocking batch copies, the model's "
                             "own padding-mask check) and per-forward weight casts, as the loop ran before")
    parser.add_argument("--with_casts", action="store_true",
                        help="also time each shape with bf16 autocast's per-forward casts of the Linear weights")
    parser.add_argument("--cache_dir", default=str(REPO / "runs" / "sweep_cache"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    shared = Path(args.shared)
    config = TrainConfig(data=str(shared / "data" / "nsmc"), model=str(shared / "models" / "bert-base-multilingual-uncased"),
                         from_scratch=True, model_overrides={"proxy": PROXY, "narrow": NARROW}.get(args.model_size, {}),
                         cache_dir=args.cache_dir, compile=args.compile, mixed_precision=args.mixed_precision)
    accelerator = make_accelerator(config.mixed_precision)
    tokenizer = load_tokenizer(config.tokenizer_name)
    started = time.perf_counter()
    config = resolve_columns_and_labels(config)
    splits, _ = load_tokenized(config, tokenizer)
    print(f"data: {len(splits['train']):,} train / {len(splits['test']):,} test rows, {time.perf_counter() - started:.1f} s",
          flush=True)
    model = build_model(config, config.labels).to(accelerator.device)
    if args.compile:
        model.compile(dynamic=True)
    optimizer = build_optimizer(model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    bf16_weights = low_precision_weights(model, optimizer, accelerator, enabled=not args.compile)
    model.train()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model_size} model on {device}, precision {accelerator.mixed_precision}, compile {args.compile}, "
          f"Linear weights cast once per step: {bf16_weights is not None}", flush=True)
    header = f"{'shape':>11} {'rows/step':>9} {'ms/step':>8} {'samples/s':>10} {'tokens/s':>10} {'pad eff':>7} {'GPU busy':>9}"
    print(header, flush=True)
    variants = ["now"] + ["casts"] * (args.with_casts and bf16_weights is not None) + ["sync"] * args.with_syncs
    for shape in args.shapes:
        for variant in variants:
            with_syncs, with_casts = VARIANTS[variant]
            started = time.perf_counter()
            result = time_shape(accelerator, model, optimizer, splits["train"], tokenizer, shape_config(config, shape),
                                args.warmup, args.steps, args.profile, with_syncs, None if with_casts else bf16_weights)
            busy = result["busy"]
            busy_text = (f"{busy['kernel_ms_per_step'] / busy['wall_ms_per_step']:.0%} ({busy['kernels_per_step']:.0f} kernels)"
                         if busy else "-")
            label = shape if variant == "now" else f"{shape} {variant}"
            print(f"{label:>11} {result['rows_per_step']:9.0f} {result['ms_per_step']:8.1f} {result['samples_per_s']:10,.0f} "
                  f"{result['tokens_per_s']:10,.0f} {result['padding_efficiency']:7.2f} {busy_text:>9}   "
                  f"({time.perf_counter() - started:.0f} s with warm-up, loss {result['loss']:.3f})", flush=True)
    for batch_size in args.eval_batches:
        loader = accelerator.prepare(eval_dataloader(splits["test"], tokenizer, batch_size, config.num_workers))
        for attempt in ("warm-up", "timed"):
            synchronize()
            started = time.perf_counter()
            metrics = evaluate_dataloader(accelerator, model, loader, len(config.labels))
            seconds = time.perf_counter() - started
        print(f"test split ({len(splits['test']):,} rows) at eval batch {batch_size}: {seconds:.2f} s "
              f"({len(splits['test']) / seconds:,.0f} rows/s, accuracy {metrics['accuracy']:.4f})", flush=True)


if __name__ == "__main__":
    main()
