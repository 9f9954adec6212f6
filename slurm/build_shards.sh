#!/bin/bash
# Build shards as a Slurm array: each task builds its share of the slices (every n-th) with one
# process per CPU; the last task to finish writes manifest.json. Submit from the repo root:
#   sbatch --array=0-7 slurm/build_shards.sh --input DATA --out SHARDS [tools.build_shards options]
# Submitted again with the same arguments, it builds only the slices not yet finished.
#
# Edit for your cluster: account, partition, CPUs per task (one build process each), time.
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_PARTITION
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=4:00:00
#
#SBATCH --job-name=tokenflex-build-shards
#SBATCH --output=slurm/logs/%x-%A_%a.out
#SBATCH --error=slurm/logs/%x-%A_%a.out

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    cat <<USAGE
Usage: sbatch --array=0-(K-1) [SBATCH OPTIONS] slurm/build_shards.sh --input DATA --out SHARDS [OPTIONS]

Run from the repo root. Each of the K array tasks runs python -m tools.build_shards with the
given options plus --workers \$SLURM_CPUS_PER_TASK (a --workers of yours wins),
--task-index and --task-count, building every K-th slice; the last task to finish writes
SHARDS/manifest.json. The shards are byte-identical to a one-process build's. A failed or
cancelled task loses only its unfinished slices: submit the same command again.
Options: python -m tools.build_shards --help
USAGE
    exit 0
fi
# sbatch runs a copy of this script, so find the repo through the submit directory.
cd "${SLURM_SUBMIT_DIR:-.}"
[[ -f tools/build_shards.py ]] || { echo "error: tools/build_shards.py not found in $PWD; submit from the repo root" >&2; exit 2; }
[[ -n ${SLURM_JOB_ID:-} ]] || { echo "error: not in a Slurm job; submit with: sbatch --array=0-7 slurm/build_shards.sh ..." >&2; exit 2; }
task_index=$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))
task_count=${SLURM_ARRAY_TASK_COUNT:-1}
# Task ids must be consecutive (--array=0-7, not 0-14:2): every slice belongs to one task number.
if (( ${SLURM_ARRAY_TASK_MAX:-0} - ${SLURM_ARRAY_TASK_MIN:-0} + 1 != task_count )); then
    echo "error: array task ids must be consecutive, e.g. --array=0-$((task_count - 1))" >&2
    exit 2
fi
echo "[$(date '+%F %T')] job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID} task $task_index of $task_count on $(hostname)"
export PYTHONUNBUFFERED=1
exec python -m tools.build_shards --workers "${SLURM_CPUS_PER_TASK:-1}" "$@" \
    --task-index "$task_index" --task-count "$task_count"
