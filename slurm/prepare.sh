#!/usr/bin/env bash
# Prepare an offline cluster: run on a login node (with internet) before submitting jobs.
# Downloads the model, tokenizer and NSMC into local directories and pre-tokenizes the data into
# the datasets cache, so that jobs on compute nodes run with HF_HUB_OFFLINE=1.
#
#   bash slurm/prepare.sh [MODEL] [TARGET_DIR]
#     MODEL       hub id (default google-bert/bert-base-multilingual-uncased)
#     TARGET_DIR  where model/ and nsmc/ go (default: ./offline)
# Knobs: HF_HOME / HF_DATASETS_CACHE (shared filesystem paths the compute nodes also see),
#        TRAINER_PKG_PYTHON (default .venv/bin/python, else python3).
# Then: sbatch slurm/train.sh --model TARGET_DIR/model --data TARGET_DIR/nsmc ...
# (with HF_HUB_OFFLINE=1 exported). Metrics are computed locally: no metric code to fetch.

set -euo pipefail
MODEL=${1:-google-bert/bert-base-multilingual-uncased}
TARGET=${2:-offline}
if [[ -z "${TRAINER_PKG_PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then TRAINER_PKG_PYTHON=.venv/bin/python; else TRAINER_PKG_PYTHON=python3; fi
fi
mkdir -p "$TARGET/nsmc"

echo "model and tokenizer -> $TARGET/model"
"$TRAINER_PKG_PYTHON" - "$MODEL" "$TARGET/model" <<'PY'
import sys
from huggingface_hub import snapshot_download
snapshot_download(sys.argv[1], local_dir=sys.argv[2],
                  allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"])
PY

echo "NSMC -> $TARGET/nsmc"
for split in train test; do
    "$TRAINER_PKG_PYTHON" - "$split" "$TARGET/nsmc/ratings_$split.txt" <<'PY'
import sys, urllib.request
from trainer_pkg.data import NSMC_URLS
urllib.request.urlretrieve(NSMC_URLS[sys.argv[1]], sys.argv[2])
PY
done

echo "pre-tokenizing into the datasets cache"
"$TRAINER_PKG_PYTHON" - "$TARGET/model" "$TARGET/nsmc" <<'PY'
import sys
from trainer_pkg.config import TrainConfig
from trainer_pkg.data import load_tokenized
from trainer_pkg.model import load_tokenizer
config = TrainConfig(model=sys.argv[1], data=sys.argv[2])
_, report = load_tokenized(config, load_tokenizer(config.model))
print("\n".join(report.lines()))
PY
echo "done: export HF_HUB_OFFLINE=1 and pass --model $TARGET/model --data $TARGET/nsmc"
