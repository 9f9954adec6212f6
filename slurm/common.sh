# Shared body of slurm/stage1.sh and slurm/stage2.sh; sourced inside the batch job, not run.
# Usage from a stage script: run_stage SCRIPT_NAME DEFAULT_CONFIG "$@"

# Exit code of pipeline.train after it saved a checkpoint on SIGUSR1/SIGTERM
# (pipeline.train.checkpoint.PREEMPTED_EXIT_CODE).
PREEMPTED_EXIT_CODE=3

log() { echo "[$(date '+%F %T')] $*"; }

stage_usage() {
    cat <<USAGE
Usage: sbatch [SBATCH OPTIONS] slurm/$1 [CONFIG.yaml] [key.sub=value ...]

Run from the repo root. CONFIG defaults to $2; dotted overrides go to pipeline.train.
Starts one training process per GPU with srun. On SIGUSR1/SIGTERM (time limit or preemption)
training saves a checkpoint and exits $PREEMPTED_EXIT_CODE; this script then requeues the job,
which resumes from the latest checkpoint in train.output_dir.

Example: sbatch --nodes 4 slurm/$1 $2 train.max_steps=100
USAGE
}

run_stage() {
    local script=$1 default_config=$2
    shift 2
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        stage_usage "$script" "$default_config"
        exit 0
    fi
    [[ -n ${SLURM_JOB_ID:-} ]] || { log "error: not in a Slurm job; submit with: sbatch slurm/$script"; exit 2; }
    local config=$default_config
    # The first argument is the config unless it is an override (key=value).
    if [[ $# -gt 0 && $1 != *=* ]]; then
        config=$1
        shift
    fi
    [[ -f $config ]] || { log "error: config '$config' not found (relative paths are from $PWD)"; exit 2; }

    # All ranks meet at the first node; the port is derived from the job id so that
    # two jobs sharing a node don't collide, and stays the same across requeues.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
    export MASTER_ADDR MASTER_PORT PYTHONUNBUFFERED=1
    # Since Slurm 22.05 srun no longer inherits the job's --cpus-per-task; pass it on explicitly.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi

    # The network interfaces of the process group's TCP traffic: gloo (the pipeline's CPU-side
    # collectives) and NCCL (its bootstrap, and its data without InfiniBand). Unset, gloo binds to
    # the address the node's host name resolves to: on some clusters a management network the
    # other nodes can't reach, and a multi-node start hangs. Set them when submitting, e.g.
    # GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0 sbatch slurm/stage1.sh, or with
    # sbatch --export=ALL,GLOO_SOCKET_IFNAME=ib0,NCCL_SOCKET_IFNAME=ib0 where sbatch passes no
    # environment by default; the job's environment reaches every task through srun.
    log "job $SLURM_JOB_ID start (restart count ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
    log "network interfaces: GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-unset} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-unset}"
    # The module each task runs: pipeline.train, or a wrapper of it (the tests inject faults so).
    local module=${TOKENFLEX_TRAIN_MODULE:-pipeline.train}
    log "command: python -m $module $config $*"
    local code=0
    # --kill-on-bad-exit: a task that fails (exit code not 0) ends the whole step at once, instead of
    # leaving the other ranks blocked in a collective until it times out. After a stop for
    # preemption all ranks exit 3 together, right after a final barrier; the SIGTERM a slower one
    # may still get is only logged by its stop handler, so the code stays 3.
    srun --kill-on-bad-exit=1 python -m "$module" "$config" "$@" || code=$?

    if [[ $code == "$PREEMPTED_EXIT_CODE" ]]; then
        log "training saved a checkpoint and stopped; requeueing job $SLURM_JOB_ID (next restart count $((${SLURM_RESTART_COUNT:-0} + 1)))"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    log "training finished with exit code $code"
    exit "$code"
}
