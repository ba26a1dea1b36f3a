#!/usr/bin/env bash
# A real Slurm cluster on localhost (Debian/Ubuntu, as root, no systemd needed): munge + slurmctld +
# three slurmd daemons, and slurmdbd on MariaDB for accounting.
#
#   scripts/slurm_local.sh start    # installs missing packages, writes the config, starts daemons
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh stop
#
# Nodes and partitions (all on this one machine):
# - node `node0` (all CPUs, 90% of the memory), partition `debug` (the default): every stage;
# - nodes `node1`, `node2` (two more slurmd daemons, `slurmd -N nodeK`, NodeHostname=localhost,
#   NodeAddr=127.0.0.1, their own ports; the Debian build has MULTIPLE_SLURMD), partition `multi`:
#   a 2-node job (multi-node training over gloo) runs here for real, with one srun task per node;
# - partition `service` on node1/node2: the pipeline's driver job (`launch.py --detach`). It needs
#   a CPU of its own: on the 2-CPU `debug` node a 1-CPU driver plus a 2-task training job would not
#   fit and the training would wait for the driver forever. node1/node2 declare this machine's CPUs
#   again (an oversubscription Slurm does not see); the driver mostly sleeps, so it costs nothing.
#   The node names are added to /etc/hosts (127.0.0.1) when they do not resolve: a job's
#   rendezvous address is its first node's name.
#
# Why each unusual setting is there (each was found the hard way):
# - accounting (slurmdbd): without it sacct fails, submitit sees state UNKNOWN and waits forever
#   on a cancelled or OOM-killed job; the pipeline reads job end states from sacct too;
# - DependencyParameters=kill_invalid_depend: a job depending on a failed one would stay PENDING;
# - AuthInfo=cred_expire=10 + fast scheduler intervals: a requeued job restarts in seconds, not ~3 min;
# - DefMemPerCPU: a job without --mem does not claim the whole node;
# - NodeName=node0 + NodeHostname=localhost (slurmd -N node0) works whatever `hostname` says; a node
#   *named* localhost beside node1/node2 (NodeHostname=localhost) stops slurmctld with "Duplicated
#   NodeHostName" (22.05), so no node is named after the host;
# - per-node spool dirs, pid and log files (%n): three slurmd daemons share the machine; cgroups
#   are per node name (/slurm_<node>), so they do not collide either.
# Env: SLURM_CGROUP=0 uses proctrack/linuxproc + task/none where cgroups are unusable (no --mem
# enforcement then). SLURM_LOCAL_DIR (default /tmp/slurm_local) holds pid files and logs.
#
# A private instance beside the machine's cluster (to try a changed configuration on a machine
# whose cluster others are using): SLURM_LOCAL_INSTANCE=NAME [SLURM_LOCAL_PORT=7817] gives a
# second cluster named NAME with its own config ($SLURM_LOCAL_DIR/etc/slurm.conf, default dir
# /tmp/slurm_local_NAME), ports, state, nodes NAME0 (partition debug), NAME1 and NAME2 (multi,
# service), sharing munge and slurmdbd with the machine's cluster. Point the Slurm commands at it
# with `export SLURM_CONF=$SLURM_LOCAL_DIR/etc/slurm.conf` (start prints the line).
set -euo pipefail
INSTANCE=${SLURM_LOCAL_INSTANCE:-}
BASE=/tmp/slurm_local               # munge, MariaDB and slurmdbd: one set per machine
if [ -n "$INSTANCE" ]; then
  D=${SLURM_LOCAL_DIR:-/tmp/slurm_local_$INSTANCE}
  CONF_DIR=$D/etc; LOGS=$D/log; STATE=$D/state; SPOOL=$D/spool
  PORT=${SLURM_LOCAL_PORT:-7817}
  CLUSTER=$INSTANCE; N0=${INSTANCE}0; N1=${INSTANCE}1; N2=${INSTANCE}2
  CG=${SLURM_CGROUP:-0}              # the machine's cluster owns the cgroup setup
else
  D=${SLURM_LOCAL_DIR:-$BASE}; BASE=$D
  CONF_DIR=/etc/slurm; LOGS=/var/log/slurm; STATE=/var/spool/slurmctld; SPOOL=/var/spool
  PORT=6817
  CLUSTER=localci; N0=node0; N1=node1; N2=node2
  CG=${SLURM_CGROUP:-1}
fi
RUN=$D/run; BASE_RUN=$BASE/run
export SLURM_CONF=$CONF_DIR/slurm.conf
NODES="$N0 $N1 $N2"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
need_root() { [ "$(id -u)" = 0 ] || { echo "slurm_local.sh: run as root (it installs packages and writes $CONF_DIR)" >&2; exit 1; }; }

install_packages() {
  local pkgs="munge slurmctld slurmd slurm-client slurmdbd mariadb-server" missing=""
  for p in $pkgs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  echo "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends $missing >"$D/apt.log" 2>&1 || {
    apt-get update >>"$D/apt.log" 2>&1
    apt-get install -y --no-install-recommends $missing >>"$D/apt.log" 2>&1
  }
}

write_config() {
  mkdir -p "$CONF_DIR" "$LOGS" "$STATE"
  for n in $NODES; do mkdir -p "$SPOOL/slurmd-$n"; done
  local pt tp
  if [ "$CG" = 1 ]; then pt=proctrack/cgroup tp=task/cgroup; else pt=proctrack/linuxproc tp=task/none; fi
  printf 'CgroupPlugin=autodetect\nConstrainCores=yes\nConstrainRAMSpace=yes\n' > "$CONF_DIR/cgroup.conf"
  local cpus mem small
  cpus=$(nproc); mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  small=$(( mem < 8192 ? mem : 8192 ))
  # the machine's own node keeps Slurm's default slurmd port; node1/node2 get the next ones
  local main_port="NodeHostname=localhost NodeAddr=127.0.0.1"
  [ -n "$INSTANCE" ] && main_port="$main_port Port=$((PORT + 1))"
  cat > "$CONF_DIR/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=$pt
TaskPlugin=$tp
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MaxArraySize=1001
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
NodeName=$N0 $main_port CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=$N1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 4)) CPUs=$cpus RealMemory=$small State=UNKNOWN
NodeName=$N2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 5)) CPUs=$cpus RealMemory=$small State=UNKNOWN
PartitionName=debug Nodes=$N0 Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=$N1,$N2 MaxTime=INFINITE State=UP
PartitionName=service Nodes=$N1,$N2 MaxTime=INFINITE State=UP
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
EOF
  [ -n "$INSTANCE" ] && return 0
  cat > "$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
LogFile=$LOGS/slurmdbd.log
PidFile=$BASE_RUN/slurmdbd.pid
EOF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
}

resolve_nodes() {
  for n in $N0 $N1 $N2; do
    getent hosts "$n" >/dev/null 2>&1 || echo "127.0.0.1 $n" >> /etc/hosts \
      || echo "warning: cannot add $n to /etc/hosts: multi-node jobs cannot meet at their first node's name" >&2
  done
}

start_base() {
  # munge, MariaDB, slurmdbd: shared by the machine's cluster and any private instance
  mkdir -p "$BASE_RUN"
  mkdir -p /run/munge; chown munge:munge /run/munge
  [ -s /etc/munge/munge.key ] || { mungekey -c -f 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  alive "$BASE_RUN/munged.pid" || munge -n >/dev/null 2>&1 || { runuser -u munge -- /usr/sbin/munged; cp /run/munge/munged.pid "$BASE_RUN/munged.pid"; }
  if ! alive "$BASE_RUN/mariadb.pid" && ! mysqladmin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
    nohup /usr/sbin/mariadbd --user=mysql --skip-networking >"$BASE/mariadb.log" 2>&1 & echo $! > "$BASE_RUN/mariadb.pid"
    for _ in $(seq 150); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  if ! (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null; then
    [ -n "$INSTANCE" ] && { echo "start the machine's cluster first (scripts/slurm_local.sh start): it runs slurmdbd" >&2; exit 1; }
    /usr/sbin/slurmdbd
  fi
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.2; done
}

start() {
  need_root
  mkdir -p "$RUN" "$BASE_RUN"
  local t0=$SECONDS
  install_packages
  write_config
  resolve_nodes
  start_base
  # a cluster is registered in the accounting database once (slurmctld does not add itself)
  sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
  alive "$RUN/slurmctld.pid" || /usr/sbin/slurmctld
  for n in $NODES; do alive "$RUN/slurmd-$n.pid" || /usr/sbin/slurmd -N "$n"; done
  for _ in $(seq 150); do
    if [ "$(sinfo -h -n "$N0" -o %t 2>/dev/null)" = idle ] && timeout 20 srun -t 1 true 2>/dev/null \
       && [ "$(sinfo -h -p multi -o %D -t idle,mix 2>/dev/null)" = 2 ]; then
      echo "slurm up on localhost after $((SECONDS - t0)) s (partitions debug, multi, service)"
      [ -n "$INSTANCE" ] && echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    # a node left DOWN/DRAIN by an earlier unclean stop is put back into service
    for n in $NODES; do
      case "$(sinfo -h -n "$n" -o %t 2>/dev/null)" in down*|drain*) scontrol update nodename="$n" state=resume 2>/dev/null || true;; esac
    done
    sleep 0.2
  done
  echo "slurm did not come up: $(sinfo 2>&1)" >&2
  tail -n 5 "$LOGS/slurmctld.log" "$LOGS"/slurmd-*.log >&2 || true
  return 1
}

stop() {
  if alive "$RUN/slurmctld.pid"; then
    scancel --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  local daemons="slurmd-$N0 slurmd-$N1 slurmd-$N2 slurmd-localhost slurmd slurmctld"
  # a private instance leaves the shared daemons to the machine's cluster
  [ -z "$INSTANCE" ] && daemons="$daemons slurmdbd mariadb munged"
  for d in $daemons; do
    local f=$RUN/$d.pid p
    [ -s "$f" ] || continue; p=$(cat "$f")
    if kill -0 "$p" 2>/dev/null; then
      kill "$p"; for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$p" 2>/dev/null && kill -9 "$p"
    fi
    rm -f "$f"; echo "stopped $d"
  done
}

status() {
  local daemons="slurmctld slurmd-$N0 slurmd-$N1 slurmd-$N2"
  [ -z "$INSTANCE" ] && daemons="munged mariadb slurmdbd $daemons"
  for d in $daemons; do
    if alive "$RUN/$d.pid"; then echo "$d: running (pid $(cat "$RUN/$d.pid"))"; else echo "$d: stopped"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
