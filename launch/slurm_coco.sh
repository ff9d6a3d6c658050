#!/usr/bin/env bash
# Train AFA on MS COCO under SLURM: one task per GPU, any number of nodes, requeued until done.
#
#   cd /path/to/afa && sbatch launch/slurm_coco.sh [key=value ...]  # e.g. train.max_iters=1000
#   sbatch --nodes=2 launch/slurm_coco.sh                 # command-line options beat #SBATCH
#   CONFIG=configs/my_coco.yaml sbatch launch/slurm_coco.sh  # default configs/coco.yaml
#
# launch/slurm_voc.sh with another job name, config, GPU count and time limit; its header explains
# where the job runs (AFA_ROOT, the log path), the requeue at the time limit (SIGUSR1 ->
# checkpoint -> status 138 -> scontrol requeue; any other status ends the job) and several nodes.
#SBATCH --job-name=afa-coco
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
set -euo pipefail

# The body shared with slurm_voc.sh is in the repository: find the repository first.
if [[ -z ${AFA_ROOT:-} ]]; then
    AFA_ROOT=$PWD
    [[ -f $AFA_ROOT/tools/train.py ]] || AFA_ROOT=${SLURM_SUBMIT_DIR:-$PWD}
fi
if [[ ! -f $AFA_ROOT/tools/train.py || ! -f $AFA_ROOT/launch/_slurm_train.sh ]]; then
    echo "error: AFA_ROOT=$AFA_ROOT is not the afa repository (it lacks tools/train.py or" \
         "launch/_slurm_train.sh): submit from the repository root, or set" \
         "AFA_ROOT=/path/to/afa (sbatch passes the environment on)" >&2
    exit 2
fi
export AFA_ROOT
exec bash "$AFA_ROOT/launch/_slurm_train.sh" configs/coco.yaml "$@"
