#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, so that launch/slurm_voc.sh and slurm_coco.sh can be
# tested against the real sbatch, srun, scontrol and scancel (tests/test_slurm_cluster.py,
# `make test-slurm`). Not a cluster to share: every daemon runs as root and jobs run as whoever
# submits them.
#
#   sudo bash launch/slurm_local_cluster.sh start [DIR]   # default DIR: /tmp/afa-slurm
#   export SLURM_CONF=DIR/etc/slurm.conf                 # what sbatch, sinfo ... read
#   sudo bash launch/slurm_local_cluster.sh status [DIR]
#   sudo bash launch/slurm_local_cluster.sh stop [DIR]    # cancels the jobs, stops the daemons
#
# start installs Debian's slurm-wlm and munge with apt-get when a command is missing, writes
# DIR/etc/slurm.conf for this host (`hostname -s`, the CPU count of `nproc`), starts munged,
# slurmctld -D and slurmd -D in the background and waits until sinfo shows the node idle. All
# state, spool, log and pid files stay under DIR; the system's /etc/slurm and /etc/munge are left
# alone (munged gets its own key and socket), so the cluster can be thrown away with DIR.
# AFA_SLURM_PORT=N moves slurmctld to port N and slurmd to N + 1 (default 6817, 6818, SLURM's own)
# where a system SLURM holds them. Exit status: 0 running, 1 it could not start (the reason and
# the daemons' log tails are printed), 2 usage.
#
# Settings that differ from SLURM's defaults, and why:
# - ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: no cgroups, which containers and CI
#   runners often lack; processes are tracked through their parent ids.
# - SelectType=select/cons_tres with CR_CPU: jobs share the node CPU by CPU, so a 2-CPU machine
#   runs a 2-task job (or two 1-task jobs) whatever its cores and threads.
# - AuthInfo=cred_expire=5 (SLURM's minimum; default 120): SLURM holds a requeued job until its
#   old credential has expired (its BeginTime becomes now + cred_expire + 1), so a job that
#   `scontrol requeue` put back waits 6 s instead of over two minutes.
# - sched_interval=2, bf_interval=2 (defaults 60 and 30): nothing wakes the scheduler when that
#   BeginTime passes, so the periodic passes decide how soon the job runs again.
# - ReturnToService=2: a node that was DOWN (daemons restarted) comes back by itself.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status [DIR]   (default DIR: /tmp/afa-slurm)" >&2
    exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage
action=$1
dir=${2:-/tmp/afa-slurm}
[[ $dir == /* ]] || dir=$PWD/$dir  # the daemons and jobs run elsewhere
conf=$dir/etc/slurm.conf
export SLURM_CONF=$conf
PATH=$PATH:/usr/sbin:/sbin  # the daemons, for a non-login root shell

die() {
    echo "slurm_local_cluster: error: $*" >&2
    exit 1
}

# Log tails for a failure message: the reason is usually in one of them (a daemon's console
# file has what it printed before its log file was open, e.g. a slurm.conf error).
show_logs() {
    local log
    for log in "$dir"/log/*; do
        [[ -f $log ]] || continue
        echo "--- last lines of $log:" >&2
        tail -n 15 "$log" >&2
    done
}

# A start that failed half-way: the reason, the logs, and no daemon left behind.
fail_start() {
    show_logs
    stop_daemons quiet
    die "$@"
}

pid_alive() {  # pid_alive NAME: the daemon NAME that this script started is running
    local pid
    [[ -f $dir/run/$1.pid ]] || return 1
    pid=$(<"$dir/run/$1.pid")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

node_state() {
    sinfo --noheader --Node --format=%T 2>/dev/null | head -n 1
}

install_packages() {
    local missing=() cmd
    for cmd in munged slurmctld slurmd sbatch; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null \
        || die "${missing[*]} missing and no apt-get here: install SLURM (slurmctld, slurmd," \
               "client commands) and munge by hand"
    echo "installing slurm-wlm and munge (missing: ${missing[*]})"
    # --no-install-recommends: the recommended mail and database servers are not needed.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        || die "apt-get update failed (are the Debian mirrors reachable?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
    local host cpus
    host=$(hostname -s)
    # The CPUs this shell may use (a container's CPU set, not the host's). No sockets, cores or
    # memory: a node declared bigger than slurmd finds is drained, and CR_CPU needs none of them.
    cpus=$(nproc)
    cat >"$conf" <<EOF
# Written by launch/slurm_local_cluster.sh for one node, $host; its header says why each
# setting differs from SLURM's default.
ClusterName=afa-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${AFA_SLURM_PORT:-6817}
SlurmdPort=$((${AFA_SLURM_PORT:-6817} + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/run/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
# The daemons' own pid files; run/NAME.pid are the start script's.
SlurmctldPidFile=$dir/run/slurmctld-own.pid
SlurmdPidFile=$dir/run/slurmd-own.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemon() {  # start_daemon NAME COMMAND...: in the background, its pid in run/NAME.pid
    local name=$1
    shift
    # setsid: the daemon outlives this script and the terminal or make that started it.
    setsid "$@" >>"$dir/log/$name.console" 2>&1 </dev/null &
    echo $! >"$dir/run/$name.pid"
}

start() {
    [[ $EUID -eq 0 ]] || die "run as root: the daemons run as root (SlurmUser=root) and" \
                             "missing packages are installed with apt-get"
    if pid_alive slurmctld && pid_alive slurmd && [[ -n $(node_state) ]]; then
        echo "already running (SLURM_CONF=$conf)"
        return 0
    fi
    stop_daemons quiet
    install_packages
    mkdir -p "$dir"/{etc,state,spool,log,run}
    rm -f "$dir"/log/*  # a failure shows the logs of this start only
    chmod 755 "$dir" "$dir/run"  # munged refuses a socket directory others may write to
    write_conf

    if [[ ! -s $dir/etc/munge.key ]]; then
        # 1024 random bytes: munged's minimum key size is 32 bytes.
        (umask 077 && head -c 1024 /dev/urandom >"$dir/etc/munge.key")
    fi
    chmod 600 "$dir/etc/munge.key"
    start_daemon munged munged --foreground --force --key-file="$dir/etc/munge.key" \
        --socket="$dir/run/munge.socket" --pid-file="$dir/run/munged-own.pid" \
        --seed-file="$dir/state/munged.seed"
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -S $dir/run/munge.socket ]] && break
        pid_alive munged || fail_start "munged exited"
        sleep 0.2
    done
    [[ -S $dir/run/munge.socket ]] || fail_start "munged made no socket in 10 s"

    # -i: a state directory left by an earlier cluster is not an error; -c: clear it, no job of
    # an earlier session comes back.
    start_daemon slurmctld slurmctld -D -c -i -f "$conf"
    start_daemon slurmd slurmd -D -f "$conf"
    local state=
    for ((i = 0; i < 120; i++)); do
        pid_alive slurmctld || fail_start "slurmctld exited"
        pid_alive slurmd || fail_start "slurmd exited"
        state=$(node_state) || true
        [[ $state == idle* ]] && break
        sleep 0.5
    done
    if [[ $state != idle* ]]; then
        sinfo --Node --long >&2 || true
        fail_start "the node is not idle 60 s after the start (state: '${state:-no answer}')"
    fi
    echo "one-node SLURM cluster running: $(sinfo --noheader --Node --format='%N %c CPUs %T')"
    echo "export SLURM_CONF=$conf"
}

stop_daemons() {  # stop_daemons [quiet]: the daemons that this script started, if running
    local name pid i
    for name in slurmd slurmctld munged; do
        pid_alive "$name" || { rm -f "$dir/run/$name.pid"; continue; }
        pid=$(<"$dir/run/$name.pid")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        rm -f "$dir/run/$name.pid"
        [[ ${1:-} == quiet ]] || echo "stopped $name ($pid)"
    done
}

stop() {
    if pid_alive slurmctld; then
        # Cancel first: slurmstepd and the job's processes outlive slurmd otherwise.
        scancel --partition=local 2>/dev/null || true
        local i
        for ((i = 0; i < 60; i++)); do
            [[ -z $(squeue --noheader --partition=local 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_daemons
}

status() {
    local name ok=0
    for name in munged slurmctld slurmd; do
        if pid_alive "$name"; then
            echo "$name: running ($(<"$dir/run/$name.pid"))"
        else
            echo "$name: not running"
            ok=1
        fi
    done
    ((ok == 0)) && sinfo --Node --long
    return "$ok"
}

case $action in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
