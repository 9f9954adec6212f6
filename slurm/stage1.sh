#!/bin/bash
# Stage 1 (projector alignment). Submit from the repo root:
#   sbatch slurm/stage1.sh [CONFIG.yaml] [key.sub=value ...]     (--help for details)
#
# Edit for your cluster: account, partition, nodes and GPUs per node
# (tasks per node must equal GPUs per node: one training process per GPU).
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_PARTITION
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#
#SBATCH --job-name=tokenflex-stage1
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
# USR1 five minutes before the time limit, to every srun task (no "B:"): training
# saves a checkpoint and exits 3, and this script requeues the job.
#SBATCH --signal=USR1@300

# sbatch runs a copy of this script, so find the repo through the submit directory.
cd "${SLURM_SUBMIT_DIR:-.}"
[[ -f slurm/common.sh ]] || { echo "error: slurm/common.sh not found in $PWD; submit from the repo root" >&2; exit 2; }
source slurm/common.sh
run_stage stage1.sh configs/stage1_align.yaml "$@"
