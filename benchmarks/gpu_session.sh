#!/usr/bin/env bash
# Every GPU measurement of the performance issue in one run (one H100, ~6 minutes):
#   1. full NSMC epochs (145k train rows after the 5k validation split, 50k test rows) with
#      trainer_pkg: batch 256 and the defaults (MORE_RUNS=true adds a token budget and torch.compile);
#   2. benchmarks/benchmark.py --model_size base: origin recipe vs trainer_pkg defaults on the same
#      BENCH_SAMPLES training rows / 2k test rows (mBERT-base architecture, random init), side by side;
#   3. a table of all of them (samples/s, tokens/s, padding efficiency, peak memory, MFU, test
#      scoring time, accuracy).
# Usage (repo root): bash benchmarks/gpu_session.sh SHARED_DIR OUT_DIR
# SHARED_DIR holds data/nsmc/ratings_{train,test}.txt (or .txt.xz) and models/bert-base-multilingual-uncased.
set -uo pipefail
shared=${1:?SHARED_DIR}
out=${2:?OUT_DIR}
mkdir -p "$out" runs
for f in "$shared"/data/nsmc/*.xz; do [[ -e $f ]] && xz -dkf "$f"; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate, datasets, evaluate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"

model="$shared/models/bert-base-multilingual-uncased"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
cache=runs/gpu_cache

step() {  # name, command...: full output to $out/name.log at once (survives a timeout)
    local name=$1; shift
    echo "=== $name: $*"
    timeout "${STEP_TIMEOUT:-200}" "$@" > "$out/$name.log" 2>&1
    echo "exit $?"
    grep -v "━" "$out/$name.log" | grep -v "^\s*$" | tail -n 14
}
full_epoch() {  # name, extra flags...
    local name=$1; shift
    step "full_$name" python3 -m trainer_pkg.train --data "$shared/data/nsmc" --model "$model" --from_scratch \
        --epochs 1 --cache_dir "$cache" --output_dir "runs/full_$name" --overwrite_output_dir --log_every 100 "$@"
}
full_epoch batch256 --per_device_batch_size 256
step bench python3 benchmarks/benchmark.py --shared "$shared" --model_size base --samples "${BENCH_SAMPLES:-5000}" \
    --test_samples 2000 --skip_tuned --quiet --out runs/bench_base
full_epoch defaults
${MORE_RUNS:-false} && full_epoch tokens16k --max_tokens_per_batch 16384
${MORE_RUNS:-false} && full_epoch batch256_compile --per_device_batch_size 256 --compile

echo "=== 3. summary"
python3 - "$model" <<'EOF' | tee "$out/summary.txt"
import glob, json, sys
from transformers import AutoConfig, AutoModelForSequenceClassification
config = AutoConfig.from_pretrained(sys.argv[1], num_labels=2)
model = AutoModelForSequenceClassification.from_config(config)
params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
print(f"non-embedding parameters {params/1e6:.1f}M; MFU = tokens/s x 6 x params / 989e12 (H100 SXM dense bf16)")
print(f"{'run':24} {'train s':>8} {'samples/s':>10} {'tokens/s':>10} {'pad eff':>8} {'peak GiB':>9} {'MFU':>6} {'test s':>7} {'test acc':>9}")
for path in sorted(glob.glob("runs/full_*/log.jsonl")):
    records = [json.loads(line) for line in open(path)]
    summary = next((r for r in records if r["kind"] == "train_summary"), None)
    test = next((r for r in records if r["kind"] == "test"), None)
    if not summary or not test:
        print(path, "incomplete"); continue
    mfu = summary["tokens_per_s"] * 6 * params / 989e12
    print(f"{path.split('/')[1]:24} {summary['seconds']:8.1f} {summary['samples_per_s']:10,.0f} {summary['tokens_per_s']:10,.0f} "
          f"{summary['padding_efficiency']:8.2f} {summary['peak_memory_gb']:9.1f} {mfu:6.1%} {test['seconds']:7.2f} {test['accuracy']:9.4f}")
EOF
