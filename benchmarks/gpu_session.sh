#!/usr/bin/env bash
# Every GPU measurement of the performance issue in one run (one H100, ~8 minutes):
#   0. the GPU tests: no host sync per step or evaluation batch (CUDA's sync-debug mode counts
#      blocking copies too), fp16 loss scaling, the bf16 weight copies under CUDA autocast;
#      pytest comes from the carried wheels;
#   1. step_sweep.py: steady-state step time of the training loop at batch 512 and 1024,
#      each also with autocast's per-forward weight casts and with the host syncs
#      the loop used to have (side by side), with the GPU's busy fraction and kernels per step,
#      and the time to score the 50k test split;
#   2. a full NSMC epoch (145k train rows after the 5k validation split, 50k test rows) with the
#      GPU defaults, then benchmark.py --model_size base: the origin recipe vs trainer_pkg defaults
#      on the same BENCH_SAMPLES rows (mBERT-base architecture, random init), side by side;
#   3. a full epoch at batch 1024;
#   4. a table of the full epochs (samples/s, steady samples/s, tokens/s, padding efficiency, peak
#      memory, MFU, test scoring time, accuracy);
#   5. with COMPILE_TIMEOUT=SECONDS, step_sweep.py --compile last (the whole model had not compiled
#      its first step within ~100 s on the host we measured).
# Usage (repo root): bash benchmarks/gpu_session.sh SHARED_DIR OUT_DIR
# SHARED_DIR holds data/nsmc/ratings_{train,test}.txt (or .txt.xz) and models/bert-base-multilingual-uncased.
set -uo pipefail
shared=${1:?SHARED_DIR}
out=${2:?OUT_DIR}
mkdir -p "$out/logs" runs
for f in "$shared"/data/nsmc/*.xz; do [[ -e $f ]] && xz -dkf "$f"; done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
nproc

model="$shared/models/bert-base-multilingual-uncased"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true HF_DATASETS_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
cache=runs/gpu_cache

step() {  # name, timeout, command...: the whole output to $out/logs/name.log (kept if it times out)
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*"
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/logs/$name.log" 2>&1
    echo "exit $? after $((SECONDS - started)) s"
    grep -v "━" "$out/logs/$name.log" | grep -v "^\s*$" | tail -n "${SHOW_LINES:-14}"
}
full_epoch() {  # name, timeout, extra flags...
    local name=$1 limit=$2; shift 2
    step "full_$name" "$limit" python3 -m trainer_pkg.train --data "$shared/data/nsmc" --model "$model" --from_scratch \
        --epochs 1 --cache_dir "$cache" --output_dir "runs/full_$name" --overwrite_output_dir --log_every 20 \
        --report_to none "$@"
    cp "runs/full_$name/log.jsonl" "$out/logs/full_$name.jsonl" 2>/dev/null
}

step gpu_tests 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_host_syncs.py \
    tests/test_numerics.py::test_fp16_overflow_steps_are_counted_and_reported "tests/test_weight_copies.py::test_the_same_numbers_as_autocast_bit_for_bit[cuda-bert]" 
SHOW_LINES=20 step sweep 180 python3 benchmarks/step_sweep.py --shared "$shared" --cache_dir "$cache" --profile \
    --with_casts --with_syncs --shapes b512 b1024 --eval_batches 256 1024
full_epoch defaults 100
step bench 140 python3 benchmarks/benchmark.py --shared "$shared" --model_size base --samples "${BENCH_SAMPLES:-10000}" \
    --test_samples 2000 --skip_tuned --quiet --out runs/bench_base
full_epoch batch1024 80 --per_device_batch_size 1024 --lr 2e-3

echo "=== summary"
python3 - "$model" <<'EOF' | tee "$out/summary.txt"
import glob, json, statistics, sys
from transformers import AutoConfig, AutoModelForSequenceClassification
config = AutoConfig.from_pretrained(sys.argv[1], num_labels=2)
model = AutoModelForSequenceClassification.from_config(config)
params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
print(f"non-embedding parameters {params/1e6:.1f}M; MFU = real tokens/s x 6 x params / 989e12 (H100 SXM dense bf16)")
print(f"{'run':16} {'train s':>8} {'samples/s':>10} {'steady/s':>9} {'tokens/s':>10} {'pad eff':>8} {'peak GiB':>9} {'MFU':>6} {'test s':>7} {'test acc':>9}")
for path in sorted(glob.glob("runs/full_*/log.jsonl")):
    records = [json.loads(line) for line in open(path)]
    summary = next((r for r in records if r["kind"] == "train_summary"), None)
    test = next((r for r in records if r["kind"] == "test"), None)
    windows = [r["samples_per_s"] for r in records if r["kind"] == "train"][1:-1]
    if not summary or not test:
        print(path, "incomplete"); continue
    steady = statistics.median(windows) if windows else float("nan")
    mfu = summary["tokens_per_s"] * 6 * params / 989e12
    print(f"{path.split('/')[1]:16} {summary['seconds']:8.1f} {summary['samples_per_s']:10,.0f} {steady:9,.0f} {summary['tokens_per_s']:10,.0f} "
          f"{summary['padding_efficiency']:8.2f} {summary['peak_memory_gb']:9.1f} {mfu:6.1%} {test['seconds']:7.2f} {test['accuracy']:9.4f}")
EOF
cp runs/bench_base/benchmark.json "$out/logs/" 2>/dev/null
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
# Last, and only when asked: what it prints comes back even if the command's time runs out here.
mkdir -p "$out/logs"
if [[ ${COMPILE_TIMEOUT:-0} -gt 0 ]]; then
    step sweep_compile "$COMPILE_TIMEOUT" python3 benchmarks/step_sweep.py --shared "$shared" --cache_dir "$cache" \
        --compile --shapes b256 b512 --eval_batches 1024
fi
