#!/usr/bin/env bash
# A throw-away Slurm cluster on 127.0.0.1 for trying `bigbatch submit` and for the integration tests.
#
#   scripts/slurm-local.sh start [--nodes N]   # N virtual nodes n1..nN (default: one node, localhost)
#   eval "$(scripts/slurm-local.sh env)"       # or copy the `export SLURM_CONF=...` line start prints
#   scripts/slurm-local.sh status              # sinfo and squeue
#   scripts/slurm-local.sh stop                # cancels its jobs, stops only the daemons it started
#
# Everything (config, munge key and socket, spool, state, logs, pids) lives under one directory:
# $BIGBATCH_SLURM_DIR, default /tmp/bigbatch-slurm. Debian's packages are installed when missing
# (root only). There is no systemd here, so the daemons run in the foreground (-D/-F) in the
# background of this script, and their pids are kept in $DIR/pids. Every wait has a deadline:
# Slurm's client commands block for a long time when the controller is down.
#
# Ports: slurmctld $BIGBATCH_SLURM_PORT (default 16817) and the slurmds the N ports after it, away
# from a real Slurm's 6817/6818. Two clusters can run side by side with different DIRs and ports.
set -euo pipefail

DIR=${BIGBATCH_SLURM_DIR:-/tmp/bigbatch-slurm}
CTLD_PORT=${BIGBATCH_SLURM_PORT:-16817}
CPUS=${BIGBATCH_SLURM_CPUS:-2}          # per node; config_overrides makes Slurm believe it
CONF=$DIR/etc/slurm.conf
PIDS=$DIR/pids
PACKAGES=(slurmctld slurmd slurm-client munge)
export PATH=$PATH:/usr/sbin:/sbin
export SLURM_CONF=$CONF

die() { echo "slurm-local: $*" >&2; exit 1; }
say() { echo "slurm-local: $*" >&2; }

# ------------------------------------------------------------------ helpers

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}'"
  say "installing ${missing[*]}"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; }
  } >"$DIR/apt.log" 2>&1 || die "apt-get install ${missing[*]} failed; see $DIR/apt.log"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND (itself time-limited) until it succeeds.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
  say "$what"
}

# Our pid files hold "PID NAME"; a pid counts as ours only while its command line still names $DIR.
ours() {
  local pid=$1
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/"
}

spawn() {  # spawn NAME COMMAND...: start a daemon in the background, remember its pid
  local name=$1; shift
  "$@" >>"$DIR/log/$name.stdout" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

alive() { [ -f "$PIDS/$1.pid" ] && ours "$(cat "$PIDS/$1.pid")"; }

node_names() {
  local n=$1 i
  if [ "$n" -eq 1 ]; then echo localhost; return; fi
  for ((i = 1; i <= n; i++)); do echo "n$i"; done
}

write_config() {
  local n=$1 nodes
  if [ "$n" -eq 1 ]; then
    nodes="NodeName=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1)) CPUs=$CPUS State=UNKNOWN"
  else
    # Virtual nodes share this host; their names do not resolve, so jobs must use NodeAddr.
    nodes="NodeName=n[1-$n] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((CTLD_PORT + 1))-$((CTLD_PORT + n))] CPUs=$CPUS State=UNKNOWN"
  fi
  cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: a development cluster on 127.0.0.1 ($n node(s)).
ClusterName=bigbatch
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged; cred_expire=10 lets a requeued job start again after ~11 s instead of 121 s.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  mkdir -p "$DIR/munge"
  chmod 700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  spawn munged munged -F --force --key-file="$DIR/munge/munge.key" \
    --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_for 20 "munged up" timeout 5 munge -n -S "$DIR/munge/munge.socket" \
    || die "munged did not start; see $DIR/log/munged.log"
}

start() {
  local n=1
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) n=${2:?--nodes needs a number}; shift 2 ;;
      --nodes=*) n=${1#--nodes=}; shift ;;
      *) die "unknown option $1 (start [--nodes N])" ;;
    esac
  done
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$n'"
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd and munged here run as root)"
  if alive slurmctld; then die "already running under $DIR; run '$0 stop' first"; fi
  mkdir -p "$DIR"/{etc,state,run,log,spool} "$PIDS"
  install_packages
  rm -rf "$DIR/state" "$DIR/spool" && mkdir -p "$DIR/state"
  local node
  for node in $(node_names "$n"); do mkdir -p "$DIR/spool/$node"; done
  write_config "$n"
  start_munge
  spawn slurmctld slurmctld -D -c -f "$CONF"
  wait_for 30 "slurmctld up" timeout 5 scontrol ping \
    || { stop_daemons; die "slurmctld did not start; see $DIR/log/slurmctld.log"; }
  for node in $(node_names "$n"); do
    if [ "$n" -eq 1 ]; then spawn "slurmd-$node" slurmd -D -f "$CONF"
    else spawn "slurmd-$node" slurmd -D -f "$CONF" -N "$node"; fi
  done
  for node in $(node_names "$n"); do
    wait_for 60 "node $node idle" node_idle "$node" \
      || { stop_daemons; die "node $node did not register; see $DIR/log/slurmd-$node.log"; }
  done
  echo "export SLURM_CONF=$CONF"
}

node_idle() { timeout 5 sinfo -h -N -n "$1" -o %t | grep -qx idle; }

stop_daemons() {
  local f name pid deadline
  for name in $(ls "$PIDS" 2>/dev/null | sed -n 's/\.pid$//p' | sort -r); do  # slurmd*, slurmctld, munged
    f=$PIDS/$name.pid
    pid=$(cat "$f")
    if ours "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 15))
      while ours "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
      if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
      say "stopped $name ($pid)"
    fi
    rm -f "$f"
  done
}

stop() {
  if alive slurmctld; then
    # Jobs were started by our slurmd; cancel them so no slurmstepd outlives the cluster.
    timeout 10 scancel --full --quiet --state=RUNNING,PENDING,SUSPENDED --user="$(id -un)" 2>/dev/null || true
    wait_for 30 "jobs gone" no_jobs || say "jobs still listed after 30 s; stopping anyway"
  fi
  stop_daemons
}

no_jobs() { [ -z "$(timeout 5 squeue -h -o %i)" ]; }

status() {
  alive slurmctld || { echo "slurm-local: not running under $DIR"; return 3; }
  timeout 10 sinfo -N -o '%N %T %c %P %o' || true
  timeout 10 squeue || true
  echo "export SLURM_CONF=$CONF"
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start [--nodes N] | stop | status | env   (state in \$BIGBATCH_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac
