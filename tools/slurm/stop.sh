#!/usr/bin/env bash
# Stop the daemons tools/slurm/start.sh started (on one node or several), and only those: each is found through its PID file
# under $BIGTRAIN_SLURM_BASE and checked by process name before it is signalled (never by name alone).
# Jobs still in this cluster are cancelled first, through SLURM, so no slurmstepd is left behind.
# A munged that start.sh found already running (not started by it) is left alone.
#   BIGTRAIN_SLURM_BASE   as for start.sh (default /tmp/bigtrain-slurm)
set -uo pipefail

T0=$(date +%s.%N)
BASE=${BIGTRAIN_SLURM_BASE:-/tmp/bigtrain-slurm}
RUN=$BASE/run DBRUN=$BASE/mysqlrun
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF

log() { echo "[slurm-stop $(date +%T)] $*"; }

pid_alive() {  # PIDFILE NAME
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

stop_one() {  # NAME PIDFILE
  local name=$1 pidfile=$2 pid
  if ! pid_alive "$pidfile" "$name"; then
    log "$name: not running (no live $name pid in $pidfile)"; rm -f "$pidfile"; return 0
  fi
  pid=$(cat "$pidfile")
  kill -TERM "$pid"
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    log "$name (pid $pid) still alive 30 s after SIGTERM: sending SIGKILL"; kill -KILL "$pid"
  fi
  rm -f "$pidfile"  # daemons remove their own PID files; this removes ours (munged's copy) and stale ones
  log "stopped $name (pid $pid)"
}

if pid_alive "$RUN/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086  # job ids: one word each
    scancel $jobs || true
    for _ in $(seq 120); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5
    done
  fi
fi

for f in "$RUN"/slurmd*.pid; do  # one per node (slurmd.<node>.pid)
  [ -e "$f" ] && stop_one slurmd "$f"
done
stop_one slurmctld "$RUN/slurmctld.pid"
stop_one slurmdbd "$RUN/slurmdbd.pid"
stop_one mariadbd "$DBRUN/mysqld.pid"
# $RUN/munged.pid exists only if start.sh started munged itself
stop_one munged "$RUN/munged.pid"
rm -f "$RUN/slurm.conf.running"
# the /etc/slurm/slurm.conf link start.sh made (only if it points at this cluster's config)
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
  rm -f /etc/slurm/slurm.conf
fi
log "done in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
