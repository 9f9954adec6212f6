#!/usr/bin/env bash
# A real single-node Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) for tests.
# Everything lives in one run folder; daemons are started by hand (no systemd needed).
set -euo pipefail

usage() {
    cat <<EOF
Usage: slurm/local_cluster.sh install|start|stop|status|env

  install  apt-get install Slurm, munge and MariaDB (Debian/Ubuntu, as root)
  start    start the cluster (does nothing if it is already running)
  stop     cancel all jobs, then stop the daemons
  status   exit 0 if the cluster answers, 1 if not
  env      print 'export SLURM_CONF=...' (use: eval "\$(slurm/local_cluster.sh env)")

Environment:
  TOKENFLEX_SLURM_DIR   run folder (default /tmp/tokenflex-slurm)
  TOKENFLEX_SLURM_PORT  first of four TCP ports used on 127.0.0.1 (default 16817):
                        slurmctld, slurmd, slurmdbd, MariaDB
EOF
}

RUN_DIR=${TOKENFLEX_SLURM_DIR:-/tmp/tokenflex-slurm}
PORT=${TOKENFLEX_SLURM_PORT:-16817}
CTLD_PORT=$PORT
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))
MUNGE_SOCKET=$RUN_DIR/munge/munge.socket
DB_SOCKET=$RUN_DIR/db/mysqld.sock
export SLURM_CONF=$RUN_DIR/etc/slurm.conf

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not come up within ${seconds}s; see logs in $RUN_DIR/log"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

cmd_install() {
    [[ $(id -u) == 0 ]] || die "install needs root"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurmctld slurmd slurm-client slurmdbd munge mariadb-server
}

write_configs() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave headroom below what slurmd measures, or the node registers as invalid.
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 9 / 10))
    mkdir -p "$RUN_DIR/etc"
    cat >"$SLURM_CONF" <<EOF
ClusterName=tokenflex
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may start again after 6 s instead of the default ~2 min.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$RUN_DIR/state
SlurmdSpoolDir=$RUN_DIR/spool/%n
SlurmctldPidFile=$RUN_DIR/pid/slurmctld.pid
SlurmdPidFile=$RUN_DIR/pid/slurmd.pid
SlurmctldLogFile=$RUN_DIR/log/slurmctld.log
SlurmdLogFile=$RUN_DIR/log/slurmd.log
# No cgroups here: track processes through /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
KillWait=5
SchedulerParameters=sched_interval=1,bf_interval=1
# submitit reads job states with sacct, so run real accounting.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# slurmctld authenticates to slurmdbd through this munge socket.
AccountingStoragePass=$MUNGE_SOCKET
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd reads slurmdbd.conf next to SLURM_CONF and refuses it unless mode 600.
    cat >"$RUN_DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN_DIR/pid/slurmdbd.pid
LogFile=$RUN_DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$RUN_DIR/etc/slurmdbd.conf"
}

start_munge() {
    pid_alive "$RUN_DIR/pid/munged.pid" && return 0
    mkdir -p "$RUN_DIR/munge"
    chmod 755 "$RUN_DIR/munge"   # clients must reach the socket
    [[ -f $RUN_DIR/munge/munge.key ]] || mungekey --create --keyfile="$RUN_DIR/munge/munge.key"
    chmod 600 "$RUN_DIR/munge/munge.key"
    munged --socket="$MUNGE_SOCKET" --key-file="$RUN_DIR/munge/munge.key" \
        --pid-file="$RUN_DIR/pid/munged.pid" --log-file="$RUN_DIR/log/munged.log" \
        --seed-file="$RUN_DIR/munge/munged.seed"
    wait_for 10 munged munge --socket="$MUNGE_SOCKET" --no-input
}

start_mariadb() {
    pid_alive "$RUN_DIR/pid/mariadb.pid" && return 0
    if [[ ! -d $RUN_DIR/db/mysql ]]; then
        mariadb-install-db --no-defaults --user=root --datadir="$RUN_DIR/db" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$RUN_DIR/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed; see $RUN_DIR/log/mariadb-install.log"
    fi
    mariadbd --no-defaults --user=root --datadir="$RUN_DIR/db" --socket="$DB_SOCKET" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$RUN_DIR/pid/mariadb.pid" --log-error="$RUN_DIR/log/mariadb.log" \
        </dev/null >/dev/null 2>&1 &   # detached, so callers that capture our output don't hang
    wait_for 30 MariaDB mariadb-admin --no-defaults --socket="$DB_SOCKET" ping
    # slurmdbd connects over TCP; give it a password-less local user.
    mariadb --no-defaults --socket="$DB_SOCKET" -e \
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'; GRANT ALL ON *.* TO 'slurm'@'127.0.0.1';"
}

start_slurm() {
    pid_alive "$RUN_DIR/pid/slurmdbd.pid" || slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    pid_alive "$RUN_DIR/pid/slurmctld.pid" || slurmctld
    pid_alive "$RUN_DIR/pid/slurmd.pid" || slurmd
    wait_for 30 "slurmctld and slurmd" sinfo_idle
}

sinfo_idle() { sinfo -h -o %t | grep -qx -e idle -e mix -e alloc -e comp; }

cmd_status() { pid_alive "$RUN_DIR/pid/slurmctld.pid" && sinfo_idle; }

cmd_start() {
    [[ $(id -u) == 0 ]] || die "start needs root (the daemons run as root)"
    command -v slurmctld >/dev/null || die "Slurm is not installed; run: slurm/local_cluster.sh install"
    if cmd_status; then
        log "already running ($SLURM_CONF)"
        return 0
    fi
    mkdir -p "$RUN_DIR"/{pid,log,state,spool,db}
    chmod 700 "$RUN_DIR/db"
    write_configs
    start_munge
    start_mariadb
    start_slurm
    log "running; use: export SLURM_CONF=$SLURM_CONF"
}

# stop_daemons NAME...: SIGTERM them all at once (each takes seconds to exit), then wait.
stop_daemons() {
    local name pids=()
    for name in "$@"; do
        pid_alive "$RUN_DIR/pid/$name.pid" && pids+=("$(cat "$RUN_DIR/pid/$name.pid")")
    done
    [[ ${#pids[@]} == 0 ]] && return 0
    kill "${pids[@]}" 2>/dev/null || true
    local pid deadline=$((SECONDS + 15))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                log "pid $pid ignored SIGTERM for 15s; sending SIGKILL"
                kill -9 "$pid" 2>/dev/null || true
            fi
            sleep 0.1
        done
    done
}

cmd_stop() {
    # Job processes outlive slurmd, so cancel the jobs first and wait for them to end.
    if cmd_status; then
        squeue -h -o %i | xargs -r scancel
        for _ in $(seq 300); do
            [[ -z $(squeue -h -o %i) ]] && break
            sleep 0.1
        done
    fi
    stop_daemons slurmd slurmctld slurmdbd mariadb munged
    log "stopped"
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
