#!/usr/bin/env bash
# A real Slurm cluster on this one machine: munged, MariaDB + slurmdbd (accounting, so sacct and submitit's job
# states work), slurmctld, and two emulated nodes (`slurmd -N n1`, `slurmd -N n2`) sharing the host.
#
#   cluster/local/slurm_cluster.sh start    # installs what is missing (apt-get), starts what is not running
#   cluster/local/slurm_cluster.sh status   # exit 0 when every daemon runs and both nodes answer
#   cluster/local/slurm_cluster.sh stop     # cancels jobs, stops every daemon it started; no process left behind
#
# Idempotent: `start` on a running cluster and `stop` on a stopped one do nothing. Needs root (daemons, /etc).
# LOCAL_SLURM_ACCOUNTING=0 skips MariaDB/slurmdbd (then sacct fails and submitit reports states as UNKNOWN).
set -euo pipefail

ACCOUNTING=${LOCAL_SLURM_ACCOUNTING:-1}
HOST=$(hostname -s)
NODES=(n1 n2)
CLUSTER=local
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
LOG=/var/log/slurm
MYSQL_SOCK=/run/mysqld/mysqld.sock
MYSQL_PID=/run/mysqld/mysqld.pid
MUNGE_PID=/run/munge/munged.pid
DBD_PID=/run/slurmdbd.pid
CTLD_PID=/run/slurmctld.pid
node_pid() { echo "/run/slurmd-$1.pid"; }

say() { echo "slurm_cluster: $*" >&2; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for ((i = 0; i < t * 5; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  say "timed out waiting for $what"; return 1
}

install_packages() {
  local want=(slurm-wlm munge procps) missing=()
  [[ $ACCOUNTING == 1 ]] && want+=(slurmdbd mariadb-server mariadb-client)
  for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d may refuse to start services on install; this script starts them itself.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_if_changed() {  # write_if_changed PATH MODE  (content on stdin)
  local tmp; tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else install -m "$2" "$tmp" "$1"; rm -f "$tmp"; fi
}

configure() {
  # Emulated node names resolve to this host.
  for n in "${NODES[@]}"; do grep -qE "^127\.0\.0\.1[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >>/etc/hosts; done
  mkdir -p /etc/slurm "$LOG" /var/spool/slurmctld /run/munge /run/mysqld
  for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
  chown munge:munge /run/munge; chown mysql:mysql /run/mysqld
  if [[ ! -s /etc/munge/munge.key ]]; then mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key

  local acct="AccountingStorageType=accounting_storage/none"
  [[ $ACCOUNTING == 1 ]] && acct=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost'
  # linuxproc/none plugins: no cgroups needed. config_overrides: trust the declared CPUs/memory of the
  # emulated nodes. KillWait=5: a requeued/cancelled job's leftovers are killed after 5 s, not 30.
  write_if_changed "$CONF" 644 <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
$acct
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmdTimeout=120
NodeName=n[1-2] NodeHostname=$HOST Port=17001-17002 CPUs=2 RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ $ACCOUNTING == 1 ]]; then
    # A throwaway local database: the password only guards a socket-bound MariaDB on this machine.
    write_if_changed "$DBD_CONF" 600 <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DBD_PID
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm-local
StorageLoc=slurm_acct_db
EOF
  fi
}

start_munge() {
  alive "$MUNGE_PID" && return 0
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munged munge -n
}

start_mariadb() {
  if ! alive "$MYSQL_PID"; then
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$MYSQL_SOCK" --pid-file="$MYSQL_PID" \
      --bind-address=127.0.0.1 --log-error="$LOG/mariadb.log" </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb mariadb-admin --socket="$MYSQL_SOCK" ping
  fi
  mariadb --socket="$MYSQL_SOCK" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-local';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
}

start_slurmdbd() {
  alive "$DBD_PID" || slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

start_slurm() {
  alive "$CTLD_PID" || slurmctld
  wait_for 30 slurmctld scontrol ping
  for n in "${NODES[@]}"; do alive "$(node_pid "$n")" || slurmd -N "$n"; done
  # Nodes left DOWN/DRAIN by an earlier unclean stop come back into service.
  if ! wait_for 30 "idle nodes" all_nodes_up; then
    scontrol update NodeName="n[1-2]" State=RESUME 2>/dev/null || true
    wait_for 30 "idle nodes" all_nodes_up
  fi
}

all_nodes_up() {  # every node responds and is schedulable
  local states; states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [[ $(grep -cE ' (idle|alloc|mix|comp)$' <<<"$states") -eq ${#NODES[@]} ]]
}

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM, wait, then SIGKILL
  local f=$1 pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { say "killing $2 ($pid)"; kill -9 "$pid" 2>/dev/null || true; }
  fi
  rm -f "$f"
}

stop() {
  if alive "$CTLD_PID"; then
    # Cancel every job so no slurmstepd or job process outlives the cluster.
    scancel --full --user=root 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do [[ -z $(squeue -h -t R,CG 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  for n in "${NODES[@]}"; do stop_pid "$(node_pid "$n")" "slurmd $n"; done
  # Job steps still running after slurmd stopped (children of our slurmd): end them by id.
  for pid in $(pgrep -x slurmstepd || true); do kill -9 "$pid" 2>/dev/null || true; done
  stop_pid "$CTLD_PID" slurmctld
  stop_pid "$DBD_PID" slurmdbd
  stop_pid "$MYSQL_PID" mariadb
  stop_pid "$MUNGE_PID" munged
}

status() {
  local ok=0 n
  check() { if alive "$1"; then echo "$2: running ($(cat "$1"))"; else echo "$2: stopped"; ok=1; fi; }
  check "$MUNGE_PID" munged
  if [[ $ACCOUNTING == 1 ]]; then check "$MYSQL_PID" mariadb; check "$DBD_PID" slurmdbd; fi
  check "$CTLD_PID" slurmctld
  for n in "${NODES[@]}"; do check "$(node_pid "$n")" "slurmd $n"; done
  if ((ok == 0)); then sinfo -N; all_nodes_up || ok=1; fi
  return $ok
}

case "${1:-}" in
  start)
    [[ $(id -u) == 0 ]] || { say "must run as root"; exit 1; }
    if status >/dev/null 2>&1; then say "already running"; exit 0; fi
    install_packages
    configure
    start_munge
    if [[ $ACCOUNTING == 1 ]]; then start_mariadb; start_slurmdbd; fi
    start_slurm
    say "up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')"
    ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
