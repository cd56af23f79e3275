#!/usr/bin/env bash
# Install (Debian packages, only those missing) and start a real SLURM cluster on this machine, without
# systemd: munged, MariaDB + slurmdbd (accounting, so `sacct` and submitit see job states), slurmctld and
# one slurmd per node. For tests and CI (tests/unit/test_slurm.py, .ci/run); must run as root.
#
#   bash tools/slurm/start.sh              one node, named after this host (the default)
#   bash tools/slurm/start.sh --nodes 2    two nodes on this host: 127.0.0.2 and 127.0.0.3, one slurmd each
#                                          (Debian's slurm has MULTIPLE_SLURMD). Nodes are named after their own
#                                          loopback addresses so that node names resolve (a job's MASTER_ADDR is
#                                          its first node); each shares this host's CPUs (oversubscribed).
#
# Idempotent: starts only the daemons that are not already running (each checked through its PID file
# and process name), restarts slurmctld/slurmd when the generated slurm.conf changed, then waits until the
# node is idle. tools/slurm/stop.sh stops exactly the daemons this script started.
#
# Environment:
#   BIGTRAIN_SLURM_BASE        state, logs, PID files and the generated config (default /tmp/bigtrain-slurm)
#   BIGTRAIN_SLURM_ACCOUNTING  1 (default): slurmdbd + MariaDB; 0: accounting_storage/none (no sacct)
#   BIGTRAIN_SLURM_DB_PORT     MariaDB's TCP port on 127.0.0.1 (default 3306)
#
# Settings that matter for tests (measured; see the comments in slurm.conf below): cred_expire=10,
# sched_interval=2 / bf_interval=2, KillWait=5.
set -euo pipefail

NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:-}; shift 2 ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    *) echo "usage: $0 [--nodes N]  (unknown argument '$1')" >&2; exit 2 ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "start.sh: --nodes expects 1..99, got '$NODES'" >&2; exit 2; }

T0=$(date +%s.%N)
BASE=${BIGTRAIN_SLURM_BASE:-/tmp/bigtrain-slurm}
ACCT=${BIGTRAIN_SLURM_ACCOUNTING:-1}
DB_PORT=${BIGTRAIN_SLURM_DB_PORT:-3306}
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state
DB=$BASE/mysql DBRUN=$BASE/mysqlrun     # MariaDB files (owned by user mysql)
CONF=$ETC/slurm.conf
NODE=$(hostname -s)
PKGS=(slurmctld slurmd slurm-client munge)
[ "$ACCT" = 1 ] && PKGS+=(slurmdbd mariadb-server)

log() { echo "[slurm-start $(date +%T)] $*"; }
die() { echo "[slurm-start] error: $*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
[ "$(id -u)" = 0 ] || die "must run as root"
case "$BASE" in /*) ;; *) die "BIGTRAIN_SLURM_BASE must be an absolute path, got '$BASE'" ;; esac

# pid_alive PIDFILE NAME: true if PIDFILE holds the pid of a live process whose name is NAME
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}
wait_for() {  # TRIES CMD...: retry CMD every 0.5 s
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  return 1
}

# 1. packages -----------------------------------------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  # keep the packages' maintainer scripts from starting daemons themselves
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  log "installed: $(dpkg-query -W -f='${Package}=${Version} ' "${PKGS[@]}") ($(elapsed) s)"
fi

# 2. config -------------------------------------------------------------------------------------------
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/d"
# the node line from the hardware slurmd sees; RealMemory at 90% so the node never drains
hw=$(/usr/sbin/slurmd -C | head -n1)
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
topo=$(grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw")
[ -n "$mem" ] && [ -n "$topo" ] || die "cannot read the node's hardware from 'slurmd -C': $hw"
if [ "$ACCT" = 1 ]; then
  acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
  acct_lines="AccountingStorageType=accounting_storage/none"
fi
if [ "$NODES" = 1 ]; then
  NODENAMES=("$NODE")
  node_lines="NodeName=$NODE NodeAddr=127.0.0.1 $topo RealMemory=$((mem * 9 / 10)) State=UNKNOWN"
else
  # each slurmd binds 0.0.0.0:Port, so each node has its own port
  NODENAMES=(); for i in $(seq 2 $((NODES + 1))); do NODENAMES+=("127.0.0.$i"); done
  node_lines="NodeName=127.0.0.[2-$((NODES + 1))] Port=17001-$((17000 + NODES)) $topo RealMemory=$((mem * 9 / 10 / NODES)) State=UNKNOWN"
fi
cat > "$CONF.new" <<EOF
# generated by bigtrain tools/slurm/start.sh: a $NODES-node test cluster
ClusterName=bigtrain
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
# a requeued job waits cred_expire+1 s before it may start again (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct_lines
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# without sched_interval a requeued job sits in PENDING (BeginTime) for up to 60 s
SchedulerParameters=bf_interval=2,sched_interval=2
# SIGTERM -> SIGKILL grace (default 30 s)
KillWait=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.new" "$CONF"
# $RUN/slurm.conf.running: the config the running daemons were started with
conf_changed=0
cmp -s "$CONF" "$RUN/slurm.conf.running" || conf_changed=1
if [ "$ACCT" = 1 ]; then
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; it must be mode 0600
  umask_old=$(umask); umask 077
  cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  umask "$umask_old"
  chmod 600 "$ETC/slurmdbd.conf"
fi
# let sinfo/sbatch/srun/sacct/submitit find the config without SLURM_CONF
mkdir -p /etc/slurm
if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
  ln -sfn "$CONF" /etc/slurm/slurm.conf
else
  log "WARNING: /etc/slurm/slurm.conf exists and is not ours: export SLURM_CONF=$CONF to use this cluster"
fi
export SLURM_CONF=$CONF

# 3. munged -------------------------------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || { log "creating munge key"; mungekey --create --force; }
chown munge:munge /etc/munge/munge.key; chmod 0600 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 0755 /run/munge
if pid_alive "$RUN/munged.pid" munged; then
  log "munged already running (pid $(cat "$RUN/munged.pid"))"
elif pid_alive /run/munge/munged.pid munged; then
  log "munged already running, not started by this script (pid $(cat /run/munge/munged.pid)): using it"
else
  runuser -u munge -- /usr/sbin/munged
  wait_for 20 pid_alive /run/munge/munged.pid munged || die "munged did not start"
  cp /run/munge/munged.pid "$RUN/munged.pid"   # marks it as ours for stop.sh
  log "started munged (pid $(cat "$RUN/munged.pid"))"
fi
munge -n | unmunge >/dev/null || die "munge self-test failed"

# 4. MariaDB + slurmdbd (accounting) ------------------------------------------------------------------
if [ "$ACCT" = 1 ]; then
  mkdir -p "$DB" "$DBRUN"; chown mysql:mysql "$DB" "$DBRUN"
  if [ ! -d "$DB/mysql" ]; then
    log "initialising MariaDB datadir $DB"
    mariadb-install-db --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
      --skip-test-db > "$LOG/mariadb-install-db.log" 2>&1 || die "mariadb-install-db failed; see $LOG/mariadb-install-db.log"
  fi
  if pid_alive "$DBRUN/mysqld.pid" mariadbd; then
    log "mariadbd already running (pid $(cat "$DBRUN/mysqld.pid"))"
  else
    setsid /usr/sbin/mariadbd --user=mysql --datadir="$DB" --socket="$DBRUN/mysqld.sock" \
      --pid-file="$DBRUN/mysqld.pid" --log-error="$DBRUN/mariadb.log" \
      --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
    wait_for 120 mariadb-admin --socket="$DBRUN/mysqld.sock" ping || die "mariadbd did not start; see $DBRUN/mariadb.log"
    wait_for 20 pid_alive "$DBRUN/mysqld.pid" mariadbd || die "no mariadbd PID file in $DBRUN"
    log "started mariadbd (pid $(cat "$DBRUN/mysqld.pid"))"
  fi
  mariadb --socket="$DBRUN/mysqld.sock" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  if pid_alive "$RUN/slurmdbd.pid" slurmdbd; then
    log "slurmdbd already running (pid $(cat "$RUN/slurmdbd.pid"))"
  else
    /usr/sbin/slurmdbd
    wait_for 60 sacctmgr -n list cluster || die "slurmdbd not answering; see $LOG/slurmdbd.log"
    log "started slurmdbd (pid $(cat "$RUN/slurmdbd.pid"))"
  fi
fi

# 5. slurmctld, slurmd ----------------------------------------------------------------------------------
if [ "$conf_changed" = 1 ]; then
  # some settings (SelectType*, AuthInfo, the node list, ...) need a restart, not `scontrol reconfigure`
  for f in "$RUN"/slurmd*.pid "$RUN/slurmctld.pid"; do
    d=slurmd; [ "$f" = "$RUN/slurmctld.pid" ] && d=slurmctld
    if pid_alive "$f" "$d"; then
      pid=$(cat "$f"); log "slurm.conf changed: restarting $d (pid $pid)"
      kill -TERM "$pid"
      for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
fi
if pid_alive "$RUN/slurmctld.pid" slurmctld; then
  log "slurmctld already running (pid $(cat "$RUN/slurmctld.pid"))"
else
  /usr/sbin/slurmctld -f "$CONF"
  wait_for 60 sh -c 'scontrol ping | grep -q "is UP"' || die "slurmctld not answering; see $LOG/slurmctld.log"
  log "started slurmctld (pid $(cat "$RUN/slurmctld.pid"))"
fi
cp "$CONF" "$RUN/slurm.conf.running"
for n in "${NODENAMES[@]}"; do
  pidfile=$RUN/slurmd.$n.pid
  if pid_alive "$pidfile" slurmd; then
    log "slurmd of node $n already running (pid $(cat "$pidfile"))"
  else
    mkdir -p "$STATE/d/$n"
    /usr/sbin/slurmd -f "$CONF" -N "$n"
    wait_for 20 pid_alive "$pidfile" slurmd || die "slurmd of node $n did not start; see $LOG/slurmd.$n.log"
    log "started slurmd of node $n (pid $(cat "$pidfile"))"
  fi
done

# 6. wait for every node to be idle (or busy with jobs left from before) ---------------------------------
for n in "${NODENAMES[@]}"; do
  st=
  for _ in $(seq 120); do
    st=$(sinfo -h -n "$n" -o %T 2>/dev/null || true)
    case "$st" in
      idle|mixed|allocated) break ;;
      down*|drain*|fail*) scontrol update NodeName="$n" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  case "$st" in
    idle|mixed|allocated) ;;
    *) sinfo -R >&2 || true; die "node $n not idle (state '$st'); see $LOG" ;;
  esac
done
sinfo
echo "slurm ready in $(elapsed) s (base $BASE, SLURM_CONF=$CONF)"
