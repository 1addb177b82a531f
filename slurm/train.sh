#!/usr/bin/env bash
# Train on SLURM: N nodes x G GPUs (or CPU nodes), preemption-safe (checkpoint on warning, requeue, resume).
#
#   sbatch slurm/train.sh --config configs/nsmc_mbert.yaml --output_dir runs/nsmc
#   sbatch --nodes=4 slurm/train.sh ...                # sbatch flags override the #SBATCH lines
#   sbatch --gpus-per-node=0 --cpus-per-task=32 --partition=cpu slurm/train.sh ...   # CPU nodes
#   ACCELERATE_CONFIG=accelerate_configs/deepspeed_zero2.yaml sbatch slurm/train.sh ...
#
# The #SBATCH lines below are site defaults (8 GPUs, 64 CPUs, 4 hours per node): override them on
# the sbatch command line for your cluster. On a partition without GPUs pass --gpus-per-node=0.
#
# Arguments go to `python -m trainer_pkg.train` unchanged. Knobs (environment, exported by sbatch):
#   ACCELERATE_CONFIG   accelerate config file (default: accelerate_configs/multi_gpu.yaml on GPU
#                       nodes, accelerate_configs/cpu_multi_process.yaml, fp32, on CPU nodes)
#   GPUS_PER_NODE       training processes per node (default: the node's GPUs; on CPU nodes one
#                       per CPU_THREADS_PER_PROCESS CPUs of the task, default 16, at least one)
#   NUM_MACHINES        launcher tasks = machines (default: the allocation's node count)
#   MAIN_PORT           rendezvous port on the head node (default: derived from the job id)
#   TRAINER_PKG_PYTHON  Python with trainer_pkg installed (default: .venv/bin/python, else python3)
# Logs: logs/<job name>-<job id>.out, appended across requeues (create logs/ before submitting).
#
# Preemption and time limits: SLURM sends SIGUSR1 to this script 5 minutes before the limit
# (--signal) or when an operator runs `scancel --signal=USR1 --batch JOB`. It is passed on to
# every training process; they finish the current step, save a checkpoint together and exit;
# then this script requeues the job, which resumes from that checkpoint (--resume auto). A job
# that finishes is not requeued.
#
#SBATCH --job-name=trainer_pkg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail
# sbatch runs a copy of this script from its spool directory: find the rest via the submit dir.
# shellcheck source=common.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" || exit 1

restarts=${SLURM_RESTART_COUNT:-0}
resume=()
(( restarts > 0 )) && resume=(--resume auto)
echo "trainer_pkg job $SLURM_JOB_ID (restart $restarts): $NUM_MACHINES machine(s) x $GPUS_PER_NODE process(es), head $HEAD_NODE:$MAIN_PORT"

signalled=0
# shellcheck disable=SC2317  # called from the traps
forward() {
    signalled=1
    echo "received $1: asking the training processes to checkpoint and stop"
    kill "-$1" "$step_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun_accelerate trainer_pkg.train "$@" "${resume[@]}" &
step_pid=$!
# `wait` returns early when a trapped signal arrives: keep waiting while the step runs.
while true; do
    wait "$step_pid"
    rc=$?
    if (( rc > 128 )) && kill -0 "$step_pid" 2>/dev/null; then continue; fi
    break
done

if (( signalled )) && (( rc != 0 )); then
    echo "checkpoint saved (exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
