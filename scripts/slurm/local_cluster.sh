#!/usr/bin/env bash
# A real single-node SLURM on 127.0.0.1 for avkv's SLURM test tier (tests/slurm/, `make test-slurm`).
#
#   scripts/slurm/local_cluster.sh start    # root: install the Debian packages if missing, write the config under
#                                           # $AVKV_SLURM_STATE, start munged (+ mariadb + slurmdbd) + slurmctld + slurmd
#   scripts/slurm/local_cluster.sh stop [NAME...]  # stop only daemons this script started (pid records in $STATE/run)
#   scripts/slurm/local_cluster.sh status   # which daemons it started are alive; sinfo
#   scripts/slurm/local_cluster.sh env      # prints `export SLURM_CONF=...` for the client commands
#   scripts/slurm/local_cluster.sh check    # exit 0 when this machine can run it (root, apt or the packages), else
#                                           # print why and exit 3
#
# The config is NOT written to /etc/slurm: it lives in $STATE/etc/slurm.conf and every client command (sbatch,
# squeue, sacct, submitit, `avkv missing`) finds it through SLURM_CONF. Partition "debug", node "localhost"
# (NodeAddr 127.0.0.1) with the CPUs and memory `slurmd -C` reports. No systemd and no cgroups:
# ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, daemons started directly.
#
# Environment:
#   AVKV_SLURM_STATE        state, logs, config, pid records (default /var/lib/avkv-slurm)
#   AVKV_SLURM_ACCOUNTING   1 (default): MariaDB on 127.0.0.1:$AVKV_SLURM_DB_PORT + slurmdbd, so sacct works (without
#                           it submitit's watcher waits forever for a task that died without a result file)
#   AVKV_SLURM_DB_PORT      MariaDB port (default 3307)
#   AVKV_SLURM_KILLWAIT     seconds between SIGTERM and SIGKILL on scancel/requeue (default 30, SLURM's default)
#   AVKV_SLURM_CRED_EXPIRE  AuthInfo cred_expire: also how long a requeued job waits before it may start again
#                           (default 120, SLURM's default; the test tier shortens it)
# Packages (Debian bookworm, SLURM 22.05): slurmctld slurmd slurm-client munge [+ slurmdbd mariadb-server].
set -euo pipefail

STATE=${AVKV_SLURM_STATE:-/var/lib/avkv-slurm}
ACCT=${AVKV_SLURM_ACCOUNTING:-1}
DB_PORT=${AVKV_SLURM_DB_PORT:-3307}
KILLWAIT=${AVKV_SLURM_KILLWAIT:-30}
CRED_EXPIRE=${AVKV_SLURM_CRED_EXPIRE:-120}
ETC=$STATE/etc
RUN=$STATE/run            # pid records of the daemons this script started, and the daemons' own pid files
LOG=$STATE/log
export SLURM_CONF=$ETC/slurm.conf
NODE=localhost

log() { echo "local_cluster: $*"; }
fail() { echo "local_cluster: ERROR: $*" >&2; exit 1; }

packages() { echo slurmctld slurmd slurm-client munge; [ "$ACCT" = 1 ] && echo slurmdbd mariadb-server; true; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing_packages() { local p; for p in $(packages); do installed "$p" || echo "$p"; done; }

# Can this machine run the tier? Prints the reason when not (exit 3).
can_run() {
  [ "$(uname -s)" = Linux ] || { echo "not Linux"; return 3; }
  [ "$(id -u)" = 0 ] || { echo "not root (the daemons run as root/slurm/munge and bind ports 6817-6819)"; return 3; }
  local need
  need=$(missing_packages | tr '\n' ' ')
  if [ -n "${need// /}" ]; then
    command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 \
      || { echo "packages missing ($need) and no apt-get to install them"; return 3; }
  fi
  return 0
}

install_packages() {
  local need
  need=$(missing_packages | tr '\n' ' ')
  [ -z "${need// /}" ] && return 0
  log "installing $need(apt-get --no-install-recommends)"
  apt-get update -qq >"$LOG/apt.log" 2>&1 || fail "apt-get update failed (see $LOG/apt.log)"
  # the packages' postinst scripts try to start their services; without systemd that is refused, harmlessly:
  # this script starts the daemons itself
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >>"$LOG/apt.log" 2>&1 \
    || fail "apt-get install $need failed (see $LOG/apt.log)"
}

pid_in() { [ -s "$1" ] && tr -cd '0-9' <"$1" || true; }
# a live process (not a zombie) whose command line contains $2
is_ours() {
  local pid=$1 name=$2
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"
}
# until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s, fail after SECONDS
until_ok() {
  local secs=$1 what=$2 i; shift 2
  for ((i = 0; i < secs * 2; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  fail "$what not ready after ${secs}s (logs in $LOG)"
}

write_config() {
  install -d -m 0755 "$ETC" "$RUN" "$LOG"
  chown slurm:slurm "$LOG"
  install -d -o slurm -g slurm -m 0755 "$STATE/ctld"
  install -d -m 0755 "$STATE/slurmd"
  local hw
  hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *$//')
  [ -n "$hw" ] || fail "slurmd -C printed no hardware line"
  local acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  [ "$ACCT" = 1 ] && acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
  cat >"$ETC/slurm.conf.new" <<EOF
# avkv scripts/slurm/local_cluster.sh: a single-node SLURM on 127.0.0.1 (test tier only)
ClusterName=avkv
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pidfile
SlurmdPidFile=$RUN/slurmd.pidfile
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobRequeue=1
ReturnToService=2
KillWait=$KILLWAIT
SlurmctldTimeout=30
SlurmdTimeout=60
MinJobAge=600
JobCompType=jobcomp/none
MailProg=/bin/true
$acct
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$ETC/slurm.conf" ] && cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf"; then
    rm -f "$ETC/slurm.conf.new"
  else
    mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
    CHANGED=1
  fi
  chmod 0644 "$ETC/slurm.conf"
  if [ "$ACCT" = 1 ]; then
    [ -s "$ETC/db.pass" ] || { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ETC/db.pass"; chmod 0600 "$ETC/db.pass"; }
    cat >"$ETC/slurmdbd.conf" <<EOF
# avkv scripts/slurm/local_cluster.sh: accounting for the single-node SLURM (a local test database)
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pidfile
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=avkv_slurm_acct
EOF
    chown slurm:slurm "$ETC/slurmdbd.conf"
    chmod 0600 "$ETC/slurmdbd.conf"
  fi
}

# start_one NAME PIDFILE MATCH COMMAND...: start a daemon that writes PIDFILE, unless one recorded by us still runs
start_one() {
  local name=$1 pidfile=$2 match=$3 pid; shift 3
  pid=$(pid_in "$RUN/$name.pid")
  if is_ours "$pid" "$match"; then log "$name already running (pid $pid)"; return 0; fi
  rm -f "$pidfile"
  "$@"
  local i
  for ((i = 0; i < 60; i++)); do pid=$(pid_in "$pidfile"); is_ours "$pid" "$match" && break; sleep 0.5; done
  is_ours "$pid" "$match" || fail "$name did not start (logs in $LOG)"
  echo "$pid" >"$RUN/$name.pid"
  log "started $name (pid $pid)"
}

start_munge() {
  # a munged already serving the default socket (the machine's own) is used as it is, and never stopped
  if [ ! -s "$RUN/munged.pid" ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running (not started here: left alone)"; return 0
  fi
  [ -s /etc/munge/munge.key ] || { mungekey --create >/dev/null; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
  install -d -o munge -g munge -m 0755 /run/munge
  start_one munged /run/munge/munged.pid munged runuser -u munge -- munged
  until_ok 15 munged sh -c 'munge -n | unmunge'
}

db() { mariadb --no-defaults --socket="$RUN/mariadb/mariadb.sock" "$@"; }

start_mariadb() {
  local data=$STATE/mariadb
  if [ ! -d "$data/mysql" ]; then
    install -d -o mysql -g mysql -m 0750 "$data"
    mariadb-install-db --no-defaults --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed ($LOG/mariadb-install.log)"
  fi
  install -d -o mysql -g mysql -m 0755 "$RUN/mariadb"
  local pid
  pid=$(pid_in "$RUN/mariadb.pid")
  if ! is_ours "$pid" mariadbd; then
    setsid mariadbd --no-defaults --user=mysql --datadir="$data" --socket="$RUN/mariadb/mariadb.sock" \
      --pid-file="$RUN/mariadb/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=32M --skip-name-resolve </dev/null >/dev/null 2>&1 &
    until_ok 90 mariadb db -e 'select 1'
    pid=$(pid_in "$RUN/mariadb/mariadbd.pid")
    echo "$pid" >"$RUN/mariadb.pid"
    log "started mariadb (pid $pid, 127.0.0.1:$DB_PORT)"
  else
    log "mariadb already running (pid $pid)"
  fi
  local pass
  pass=$(cat "$ETC/db.pass")
  db <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON avkv_slurm_acct.* TO 'slurm'@'127.0.0.1';
EOF
}

node_up() { sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'; }

start() {
  local why
  why=$(can_run) || fail "this machine cannot run the local SLURM: $why"
  install -d -m 0755 "$STATE" "$LOG"
  install_packages
  CHANGED=0
  write_config
  if [ $CHANGED = 1 ] && { is_ours "$(pid_in "$RUN/slurmctld.pid")" slurmctld || is_ours "$(pid_in "$RUN/slurmd.pid")" slurmd; }; then
    log "slurm.conf changed (KillWait, cred_expire, ...): restarting the slurmctld/slurmd this script started"
    stop slurmd slurmctld
  fi
  start_munge
  if [ "$ACCT" = 1 ]; then
    start_mariadb
    start_one slurmdbd "$RUN/slurmdbd.pidfile" slurmdbd slurmdbd
    until_ok 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -n -P list cluster format=cluster | grep -qx avkv || sacctmgr -i add cluster avkv >/dev/null
  fi
  start_one slurmctld "$RUN/slurmctld.pidfile" slurmctld slurmctld -f "$SLURM_CONF"
  until_ok 60 slurmctld sh -c 'scontrol ping | grep -q UP'
  start_one slurmd "$RUN/slurmd.pidfile" slurmd slurmd -f "$SLURM_CONF" -N "$NODE"
  local i
  for ((i = 0; i < 60; i++)); do node_up && break; sleep 0.5; done
  if ! node_up; then   # left DOWN/DRAIN by an earlier run that was killed: it registered now, resume it
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    until_ok 30 "node $NODE" node_up
  fi
  sinfo
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_one() {
  local name=$1 match=$2 pid i
  pid=$(pid_in "$RUN/$name.pid")
  if is_ours "$pid" "$match"; then
    kill -TERM "$pid"
    for ((i = 0; i < 60; i++)); do is_ours "$pid" "$match" || break; sleep 0.5; done
    if is_ours "$pid" "$match"; then log "$name (pid $pid) still alive after 30 s: SIGKILL"; kill -KILL "$pid"; fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$RUN/$name.pid"
}

stop() { # stop [NAME...]: the named daemons (default all) that this script started, clients before servers
  [ -d "$RUN" ] || { log "nothing recorded in $RUN: nothing to stop"; return 0; }
  local want=" ${*:-munged mariadb slurmdbd slurmctld slurmd} " name
  for name in slurmd:slurmd slurmctld:slurmctld slurmdbd:slurmdbd mariadb:mariadbd munged:munged; do
    case "$want" in *" ${name%%:*} "*) stop_one "${name%%:*}" "${name#*:}" ;; esac
  done
}

status() {
  local name match pid
  for name in munged:munged mariadb:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld slurmd:slurmd; do
    match=${name#*:}; name=${name%%:*}
    pid=$(pid_in "$RUN/$name.pid")
    if is_ours "$pid" "$match"; then log "$name running (pid $pid)"; else log "$name not running (not started here)"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) shift; stop "$@" ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  check) why=$(can_run) && echo "ok" || { echo "$why"; exit 3; } ;;
  *) echo "usage: $0 start|stop|status|env|check (see the top of this file)" >&2; exit 2 ;;
esac
