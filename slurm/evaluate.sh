#!/usr/bin/env bash
# Sharded evaluation of a checkpoint or export on N nodes x G GPUs; writes
# CHECKPOINT/eval_metrics.json (or --output FILE).
#
#   sbatch slurm/evaluate.sh runs/nsmc/model [--test_file FILE | --data DIR] [--output FILE]
#
# Arguments go to `python -m trainer_pkg.evaluate` unchanged. The #SBATCH lines are site defaults;
# on CPU nodes pass --gpus-per-node=0. Knobs as in slurm/train.sh: ACCELERATE_CONFIG,
# GPUS_PER_NODE, CPU_THREADS_PER_PROCESS, NUM_MACHINES, MAIN_PORT, TRAINER_PKG_PYTHON.
#
#SBATCH --job-name=trainer_pkg_eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out

set -uo pipefail
# sbatch runs a copy of this script from its spool directory: find the rest via the submit dir.
# shellcheck source=common.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" || exit 1
if (( $# == 0 )); then
    echo "usage: sbatch slurm/evaluate.sh CHECKPOINT_OR_EXPORT [evaluate options]" >&2
    exit 2
fi
srun_accelerate trainer_pkg.evaluate "$@"
