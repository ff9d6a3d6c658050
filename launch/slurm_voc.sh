#!/usr/bin/env bash
# Train AFA on PASCAL VOC under SLURM: one task per GPU, any number of nodes, requeued until done.
#
#   cd /path/to/afa && sbatch launch/slurm_voc.sh [key=value ...]   # e.g. train.max_iters=1000
#   sbatch --nodes=2 launch/slurm_voc.sh                  # command-line options beat #SBATCH
#   CONFIG=configs/my_voc.yaml sbatch launch/slurm_voc.sh    # default configs/voc.yaml
#
# Where it runs. SLURM runs a copy of this file from its spool directory, so "$0" says nothing
# about the repository. The repository is $AFA_ROOT if set, else the job's working directory (where
# sbatch was run, or sbatch --chdir=DIR), else $SLURM_SUBMIT_DIR; without tools/train.py there
# the job exits with status 2. (#SBATCH --chdir cannot expand variables, hence none here.) The log
# path logs/... is relative to the working directory too, and a job whose log directory is missing
# fails without a log: submit from the repository root (it has logs/), or add
# --chdir=/path/to/afa or --output=/some/dir/%x-%j.out. --open-mode=append keeps every run of a
# requeued job in one log.
#
# Time limit and requeue. --signal=USR1@120 makes SLURM send SIGUSR1 to the job steps, i.e. the
# trainer processes srun started, two minutes (or up to a minute more) before the time limit. The
# trainer saves a checkpoint at the end of its iteration (at once during validation) and exits
# with 128 + 10 = 138; srun returns that, and launch/_slurm_train.sh calls
# `scontrol requeue $SLURM_JOB_ID` (allowed by --requeue). The next run resumes (--resume auto).
# Plain --signal, not B:, because the trainer must get the signal and this shell needs none: it
# acts on srun's exit status. (Given one anyway, by B: or scancel --batch, it forwards it to srun.)
# Nothing else is requeued; the job ends with srun's status: 0 (done), 2 (config or data error),
# 1 (crash), and also 143: SIGTERM comes from scancel (which must stay a cancel), from SLURM at the
# time limit, on pre-emption (with PreemptMode=REQUEUE SLURM requeues the job itself), and
# from srun --kill-on-bad-exit after another task failed (requeueing that would loop). After a
# requeue the script exits 0, as the run ended as planned (non-zero would count it FAILED: FAIL
# mails, sacct); if `scontrol requeue` fails it exits 138, and resubmitting resumes.
# Stop and requeue now: scancel --signal=USR1 JOBID (not --full: a second SIGUSR1 makes the
# trainer exit at once, without a new checkpoint). Stop for good: scancel JOBID.
#
# Several nodes. MASTER_ADDR is the first host of the allocation, MASTER_PORT 20000 + job id % 10000
# (the same after a requeue; set MASTER_PORT to choose). The trainer reads its rank from
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and splits train.global_batch over the tasks.
# SRUN_CPUS_PER_TASK hands --cpus-per-task on to srun (SLURM >= 22.05 no longer does).
# PYTHON=/path/to/python picks the interpreter (default: python on the PATH sbatch exported).
#SBATCH --job-name=afa-voc
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
set -euo pipefail

# The body shared with slurm_coco.sh is in the repository: find the repository first.
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
exec bash "$AFA_ROOT/launch/_slurm_train.sh" configs/voc.yaml "$@"
