#!/usr/bin/env bash
# A throwaway one-node Slurm cluster on this machine (Debian's slurm-wlm + munge), to try the
# Slurm sweep without a real cluster (tests/sweep.rs runs the sweep on it when
# ATTRACTOR_TEST_SLURM=1). Needs root. CPU only: submit with SLURM_GPUS=0 and small
# SLURM_CPUS / SLURM_MEM (this node offers every core and half the memory).
#
#   scripts/slurm/local-cluster.sh install      apt-get install slurm-wlm munge (once)
#   scripts/slurm/local-cluster.sh start DIR    write DIR/slurm.conf, start munged, slurmctld,
#                                               slurmd; then: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm/local-cluster.sh stop DIR     stop the daemons started by `start DIR`
set -euo pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

cmd="${1:-}"
case "$cmd" in
    install)
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends slurm-wlm munge
        ;;
    start)
        dir="${2:?usage: local-cluster.sh start DIR}"
        for b in munged slurmctld slurmd sinfo; do
            command -v "$b" >/dev/null || { echo "error: $b not found: run $0 install" >&2; exit 2; }
        done
        mkdir -p "$dir"/{state,spool,log}
        dir=$(cd "$dir" && pwd -P)
        host=$(hostname -s)
        cpus=$(nproc)
        mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 2048))
        # Ports out of the default range, so a real slurmd on this machine is not disturbed.
        cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
        export SLURM_CONF="$dir/slurm.conf"
        if ! pgrep -x munged >/dev/null; then
            mkdir -p /run/munge
            chown munge:munge /run/munge 2>/dev/null || true
            [[ -f /etc/munge/munge.key ]] || { echo "error: /etc/munge/munge.key missing (reinstall munge)" >&2; exit 2; }
            munged --force
        fi
        slurmctld -c -i
        slurmd
        for _ in $(seq 1 30); do
            if sinfo -h -o '%t' 2>/dev/null | grep -qx idle; then
                echo "cluster up: export SLURM_CONF=$SLURM_CONF"
                exit 0
            fi
            sleep 1
        done
        echo "error: the node did not come up; see $dir/log/" >&2
        exit 1
        ;;
    stop)
        dir="${2:?usage: local-cluster.sh stop DIR}"
        for p in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
            if [[ -f "$p" ]]; then kill "$(cat "$p")" 2>/dev/null || true; fi
        done
        ;;
    -h | --help | "")
        usage
        [[ -n "$cmd" ]]
        ;;
    *)
        echo "error: unknown command '$cmd'" >&2
        usage >&2
        exit 2
        ;;
esac
