#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost (Debian/Ubuntu, as root, no systemd needed):
# munge + slurmctld + slurmd, and slurmdbd on MariaDB for accounting.
#
#   scripts/slurm_local.sh start    # installs missing packages, writes /etc/slurm, starts daemons
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh stop
#
# Why each unusual setting is there (each was found the hard way):
# - accounting (slurmdbd): without it sacct fails, submitit sees state UNKNOWN and waits forever
#   on a cancelled or OOM-killed job;
# - DependencyParameters=kill_invalid_depend: a job depending on a failed one would stay PENDING;
# - AuthInfo=cred_expire=10 + fast scheduler intervals: a requeued job restarts in seconds, not ~3 min;
# - DefMemPerCPU: a job without --mem does not claim the whole node;
# - NodeName=localhost (slurmd -N localhost) works whatever `hostname` says.
# Env: SLURM_CGROUP=0 uses proctrack/linuxproc + task/none where cgroups are unusable (no --mem
# enforcement then). SLURM_LOCAL_DIR (default /tmp/slurm_local) holds pid files and logs.
set -euo pipefail
D=${SLURM_LOCAL_DIR:-/tmp/slurm_local}; RUN=$D/run; CG=${SLURM_CGROUP:-1}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
need_root() { [ "$(id -u)" = 0 ] || { echo "slurm_local.sh: run as root (it installs packages and writes /etc/slurm)" >&2; exit 1; }; }

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
  mkdir -p /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd
  local pt tp
  if [ "$CG" = 1 ]; then pt=proctrack/cgroup tp=task/cgroup; else pt=proctrack/linuxproc tp=task/none; fi
  printf 'CgroupPlugin=autodetect\nConstrainCores=yes\nConstrainRAMSpace=yes\n' > /etc/slurm/cgroup.conf
  local cpus mem
  cpus=$(nproc); mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
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
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
EOF
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

start() {
  need_root
  mkdir -p "$RUN"
  local t0=$SECONDS
  install_packages
  write_config
  mkdir -p /run/munge; chown munge:munge /run/munge
  [ -s /etc/munge/munge.key ] || { mungekey -c -f 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  alive "$RUN/munged.pid" || { runuser -u munge -- /usr/sbin/munged; cp /run/munge/munged.pid "$RUN/munged.pid"; }
  if ! alive "$RUN/mariadb.pid"; then
    mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
    nohup /usr/sbin/mariadbd --user=mysql --skip-networking >"$D/mariadb.log" 2>&1 & echo $! > "$RUN/mariadb.pid"
    for _ in $(seq 150); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  alive "$RUN/slurmdbd.pid" || /usr/sbin/slurmdbd
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.2; done
  alive "$RUN/slurmctld.pid" || /usr/sbin/slurmctld
  alive "$RUN/slurmd.pid" || /usr/sbin/slurmd -N localhost
  for _ in $(seq 150); do
    if [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = idle ] && timeout 20 srun -t 1 true 2>/dev/null; then
      echo "slurm up on localhost after $((SECONDS - t0)) s"; return 0
    fi
    # a node left DOWN/DRAIN by an earlier unclean stop is put back into service
    case "$(sinfo -h -n localhost -o %t 2>/dev/null)" in down*|drain*) scontrol update nodename=localhost state=resume 2>/dev/null || true;; esac
    sleep 0.2
  done
  echo "slurm did not come up: $(sinfo 2>&1)" >&2
  tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  return 1
}

stop() {
  if alive "$RUN/slurmctld.pid"; then
    scancel --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for d in slurmd slurmctld slurmdbd mariadb munged; do
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
  for d in munged mariadb slurmdbd slurmctld slurmd; do
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
