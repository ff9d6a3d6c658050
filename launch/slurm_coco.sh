#!/usr/bin/env bash
# SLURM, one task per GPU, any number of nodes:   sbatch launch/slurm_coco.sh [key=value ...]
# Pre-emption: SLURM sends SIGUSR1 two minutes before the time limit (--signal) and SIGTERM on pre-emption; the trainer saves a
# checkpoint and exits; --requeue restarts the job, which resumes from it (--resume auto).
#SBATCH --job-name=afa-coco
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --output=logs/slurm-%x-%j.out
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
srun --kill-on-bad-exit=1 python tools/train.py --config ${CONFIG:-configs/coco.yaml} --resume auto "$@"
