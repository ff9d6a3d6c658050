#!/usr/bin/env bash
# The body shared by launch/slurm_voc.sh and launch/slurm_coco.sh, whose headers explain what it
# does. SLURM runs spool-directory copies of those batch scripts, so they find this file as
# $AFA_ROOT/launch/_slurm_train.sh and exec it: it runs as the job's batch shell.
#
#   AFA_ROOT=/path/to/afa bash launch/_slurm_train.sh DEFAULT_CONFIG [key=value ...]
#
# Exit status: srun's (the highest of the trainer tasks'), but 0 once 138 has requeued the job.
set -euo pipefail

default_config=$1
shift
if [[ -z ${SLURM_JOB_ID:-} || -z ${SLURM_JOB_NODELIST:-} ]]; then
    echo "error: not inside a SLURM job; submit with sbatch" \
         "(launch/run_voc.sh and run_coco.sh train without SLURM)" >&2
    exit 2
fi
cd "${AFA_ROOT:?set by launch/slurm_*.sh}"  # the config, work_dir and data paths are relative

# torch.distributed rendezvous: rank 0 runs on the first node of the allocation.
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${nodes%%$'\n'*}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
# SLURM >= 22.05 no longer passes the job's --cpus-per-task on to srun; this does.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

train=("${PYTHON:-python}" tools/train.py --config "${CONFIG:-$default_config}" --resume auto "$@")
echo "$(date '+%F %T') job $SLURM_JOB_ID, run $((${SLURM_RESTART_COUNT:-0} + 1)), nodes" \
     "$SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT: ${train[*]}"

# srun runs in the background so that this shell can act on a SIGUSR1 of its own (sent only by
# --signal=B:... or scancel --batch); bash runs a trap only after a foreground command returns.
# The trap forwards the signal to srun, which forwards it to the trainer tasks.
srun_pid=
trap 'if [[ -n $srun_pid ]]; then kill -s USR1 "$srun_pid" 2>/dev/null || true; fi' USR1
srun --kill-on-bad-exit=1 "${train[@]}" &
srun_pid=$!
# A trapped signal makes `wait` return early (status > 128) while srun still runs: wait until
# srun is gone, then once more for its exit status, which bash keeps.
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
done
status=0
wait "$srun_pid" || status=$?

# 138 = 128 + SIGUSR1: the trainer saved a checkpoint on the time-limit signal. Anything else
# (0 done, 2 config or data error, 1 crash, 143 SIGTERM) ends the job; see slurm_voc.sh for why.
# srun also returns 138 when SIGUSR1 killed a task outside the trainer's handler, i.e. while it
# was starting or after its last checkpoint (seen on a real cluster: a signal due at the start of
# a short job came after the final validation). Requeueing is right then too: the next run
# resumes from the latest checkpoint, or finds the run finished and exits 0.
if ((status != 138)); then
    echo "$(date '+%F %T') srun exited with status $status; the job is not requeued"
    exit "$status"
fi
echo "$(date '+%F %T') srun exited with status 138 (SIGUSR1, sent before the time limit; the" \
     "trainer saves a checkpoint on it): requeueing job $SLURM_JOB_ID, whose next run resumes" \
     "from the latest checkpoint"
if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "error: scontrol requeue $SLURM_JOB_ID failed; resubmit the job to resume" >&2
    exit 138
fi
# SLURM may end this shell before it gets here; either way the run counts as requeued, not FAILED.
exit 0
