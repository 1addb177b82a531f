# shellcheck shell=bash
# Shared by slurm/train.sh and slurm/evaluate.sh: the Python to use, the head node, the port, and
# the per-node launch. Sourced, not run.

# Run from where the job was submitted (the repository root, normally).
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
if [[ -z "${TRAINER_PKG_PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then TRAINER_PKG_PYTHON=.venv/bin/python; else TRAINER_PKG_PYTHON=python3; fi
fi
NUM_MACHINES=${NUM_MACHINES:-$SLURM_NNODES}
node_gpus=${SLURM_GPUS_ON_NODE:-0}
if [[ "$node_gpus" =~ ^[1-9][0-9]*$ ]]; then
    ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_gpu.yaml}
    GPUS_PER_NODE=${GPUS_PER_NODE:-$node_gpus}
else
    # A CPU node (--gpus-per-node=0): fp32, and one process per CPU_THREADS_PER_PROCESS of the
    # task's CPUs, each with that many threads (a process per core would spend its time in the
    # all-reduce; one for all cores leaves a large node's threads idle in small operations).
    ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/cpu_multi_process.yaml}
    node_cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    CPU_THREADS_PER_PROCESS=${CPU_THREADS_PER_PROCESS:-16}
    GPUS_PER_NODE=${GPUS_PER_NODE:-$(( node_cpus / CPU_THREADS_PER_PROCESS ))}
    (( GPUS_PER_NODE >= 1 )) || GPUS_PER_NODE=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( node_cpus / GPUS_PER_NODE > 0 ? node_cpus / GPUS_PER_NODE : 1 ))}
fi
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || GPUS_PER_NODE=1
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# One port per job, so that two jobs sharing a head node do not collide.
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export TRAINER_PKG_PYTHON ACCELERATE_CONFIG NUM_MACHINES GPUS_PER_NODE HEAD_NODE MAIN_PORT

# srun_accelerate MODULE ARGS...: one task per machine, each running `accelerate launch`.
# The single quotes matter: $SLURM_PROCID is expanded by each task on its own node, so every
# machine gets its own rank (expanded here, every node would claim rank 0).
# `trap '' USR1` keeps the launcher alive through SLURM's warning signal; the training processes
# install their own handler and checkpoint.
# shellcheck disable=SC2016  # expanded on each node, not here
srun_accelerate() {
    local overcommit=()
    (( NUM_MACHINES > SLURM_NNODES )) && overcommit=(--overcommit)
    srun --ntasks="$NUM_MACHINES" --ntasks-per-node="$(( (NUM_MACHINES + SLURM_NNODES - 1) / SLURM_NNODES ))" \
        "${overcommit[@]}" --kill-on-bad-exit=1 bash -c '
        trap "" USR1
        echo "launcher on $(hostname): machine rank $SLURM_PROCID of $NUM_MACHINES"
        # The head launcher checks that the rendezvous port is free, then claims it: the others
        # start a moment later (needed where two "machines" share a host).
        if (( SLURM_PROCID > 0 )); then sleep "${WORKER_LAUNCH_DELAY:-5}"; fi
        exec "$TRAINER_PKG_PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
            --num_machines "$NUM_MACHINES" --machine_rank "$SLURM_PROCID" \
            --num_processes "$((NUM_MACHINES * GPUS_PER_NODE))" \
            --main_process_ip "$HEAD_NODE" --main_process_port "$MAIN_PORT" --rdzv_backend c10d \
            -m "$@"' srun_accelerate "$@"
}
