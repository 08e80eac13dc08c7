#!/usr/bin/env bash
# Private test services: PostgreSQL, Redis and an S3 server (s3s-fs), each on its own free
# loopback port, and a Kubernetes API (etcd, kube-apiserver and kube-controller-manager,
# scripts/kube.sh) for the operator,
# all state under one directory.
#
#   scripts/services.sh start <state-dir>              install what is missing, start them all,
#                                                      write <state-dir>/env
#   scripts/services.sh stop <state-dir>               stop them all
#   scripts/services.sh start-one postgres|redis|s3 <state-dir>
#   scripts/services.sh stop-one  postgres|redis|s3 <state-dir>
#   scripts/services.sh status <state-dir>
#
# Ports and credentials are chosen once per state directory and kept, so a service stopped and
# started again (fault tests) comes back at the same address. Everything listens on 127.0.0.1.
# Safe to run twice: a running service is left alone. `source <state-dir>/env` exports the
# LATTICE_TEST_* variables the tests read.
#
# Environment: LATTICE_CACHE (default /var/cache/lattice) holds the s3s-fs build (and kube.sh's
# tools). LATTICE_SERVICES_KUBE=0 leaves the Kubernetes API out (benchmarks).
set -euo pipefail

LATTICE_CACHE=${LATTICE_CACHE:-/var/cache/lattice}
S3S_VERSION=0.14.1
S3S_ROOT="$LATTICE_CACHE/tools/s3s-fs-$S3S_VERSION"
S3S_BIN="$S3S_ROOT/bin/s3s-fs"
S3_BUCKET=lattice-test
S3_REGION=us-east-1
PG_DB=lattice_test
# Bounded waits (seconds) for a service to answer.
READY_TIMEOUT=${LATTICE_SERVICES_TIMEOUT:-60}

LOG_PREFIX=services
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----------------------------------------------------------------------------------------------
# helpers

# Polls "$@" until it succeeds, at most $READY_TIMEOUT seconds.
wait_for() {
    local what=$1
    shift
    local deadline=$((SECONDS + READY_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "$what did not answer within ${READY_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

# Waits until "$@" fails (a service has gone), at most $READY_TIMEOUT seconds.
wait_gone() {
    local what=$1
    shift
    local deadline=$((SECONDS + READY_TIMEOUT))
    while "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "$what still running after ${READY_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

# ----------------------------------------------------------------------------------------------
# PostgreSQL

pg_bindir() {
    local d
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then
            echo "$d"
            return
        fi
    done
    return 1
}

ensure_postgres() {
    pg_bindir >/dev/null || apt_install postgresql
    pg_bindir >/dev/null || die "PostgreSQL binaries not found after install"
    id postgres >/dev/null 2>&1 || die "no postgres user"
}

# As the postgres user (the server refuses to run as root).
as_postgres() {
    su postgres -s /bin/sh -c "$1"
}

# The cluster lives where the postgres user can reach it: in the state directory when every
# parent is traversable, else in /var/tmp under a name derived from the state directory.
pg_home() {
    local state=$1
    if [ -s "$state/postgres/home" ]; then
        cat "$state/postgres/home"
        return
    fi
    local home="$state/postgres/cluster"
    mkdir -p "$home"
    chown postgres: "$home"
    if ! as_postgres "test -w '$home'" 2>/dev/null; then
        rmdir "$home" 2>/dev/null || true
        home="/var/tmp/lattice-pg-$(printf '%s' "$state" | sha256sum | cut -c1-16)"
        mkdir -p "$home"
        chown postgres: "$home"
        chmod 700 "$home"
    fi
    echo "$home" >"$state/postgres/home"
    echo "$home"
}

pg_ready() {
    local bin=$1 port=$2
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres
}

start_postgres() {
    local state=$1
    ensure_postgres
    mkdir -p "$state/postgres"
    local bin port home data
    bin=$(pg_bindir)
    port=$(port_for "$state/postgres/port")
    home=$(pg_home "$state")
    data="$home/data"
    if pg_ready "$bin" "$port" 2>/dev/null; then
        log "postgres already running on 127.0.0.1:$port"
    else
        if [ ! -s "$data/PG_VERSION" ]; then
            log "initdb $data"
            as_postgres "'$bin/initdb' -D '$data' -U postgres -A trust -E UTF8 --locale=C.UTF-8 >'$home/initdb.log' 2>&1" ||
                { cat "$home/initdb.log" >&2; die "initdb failed"; }
        fi
        log "starting postgres on 127.0.0.1:$port"
        as_postgres "'$bin/pg_ctl' -D '$data' -l '$home/postgres.log' -w -t $READY_TIMEOUT \
            -o \"-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='$home' -c fsync=on -c max_connections=100\" \
            start >/dev/null" || { tail -n 30 "$home/postgres.log" >&2; die "postgres did not start"; }
        wait_for postgres pg_ready "$bin" "$port"
    fi
    if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$PG_DB'" | grep -q 1; then
        "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE $PG_DB" >/dev/null
    fi
}

stop_postgres() {
    local state=$1
    [ -s "$state/postgres/home" ] || return 0
    local bin home port
    bin=$(pg_bindir) || return 0
    home=$(cat "$state/postgres/home")
    port=$(cat "$state/postgres/port" 2>/dev/null || echo 0)
    if [ -s "$home/data/postmaster.pid" ]; then
        log "stopping postgres"
        as_postgres "'$bin/pg_ctl' -D '$home/data' -m fast -w -t $READY_TIMEOUT stop >/dev/null" || true
    fi
    wait_gone postgres port_open "$port"
}

# ----------------------------------------------------------------------------------------------
# Redis

ensure_redis() {
    command -v redis-server >/dev/null || apt_install redis-server
    command -v redis-server >/dev/null || die "redis-server not found after install"
}

redis_ping() {
    local port=$1
    if command -v redis-cli >/dev/null; then
        [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]
    else
        exec 3<>"/dev/tcp/127.0.0.1/$port" && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG
    fi
}

start_redis() {
    local state=$1
    ensure_redis
    mkdir -p "$state/redis"
    local port
    port=$(port_for "$state/redis/port")
    if live_pid "$state/redis/redis.pid" redis-server >/dev/null && redis_ping "$port"; then
        log "redis already running on 127.0.0.1:$port"
        return
    fi
    log "starting redis on 127.0.0.1:$port"
    redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
        --save '' --appendonly no --daemonize yes \
        --dir "$state/redis" --pidfile "$state/redis/redis.pid" --logfile "$state/redis/redis.log"
    wait_for redis redis_ping "$port"
}

stop_redis() {
    local state=$1 pid port
    port=$(cat "$state/redis/port" 2>/dev/null || echo 0)
    if pid=$(live_pid "$state/redis/redis.pid" redis-server); then
        log "stopping redis"
        kill "$pid"
        wait_gone redis kill -0 "$pid"
    fi
    [ "$port" = 0 ] || wait_gone redis port_open "$port"
}

# ----------------------------------------------------------------------------------------------
# S3 (s3s-fs)

ensure_s3s() {
    [ -x "$S3S_BIN" ] && return
    command -v cargo >/dev/null || die "cargo is needed to install s3s-fs"
    log "cargo install s3s-fs@$S3S_VERSION (a few minutes)"
    mkdir -p "$S3S_ROOT"
    # Another install into the same root (an earlier run) holds cargo's lock; this waits for it
    # and then finds the binary installed.
    cargo install "s3s-fs@$S3S_VERSION" --features binary --locked --root "$S3S_ROOT" >&2 ||
        [ -x "$S3S_BIN" ] || die "cargo install s3s-fs failed"
}

s3_ready() {
    local port=$1
    if command -v curl >/dev/null; then
        # Any HTTP answer (403 without credentials) means it serves.
        curl -s -o /dev/null -m 2 "http://127.0.0.1:$port/"
    else
        port_open "$port"
    fi
}

start_s3() {
    local state=$1
    ensure_s3s
    mkdir -p "$state/s3/data/$S3_BUCKET"
    local port access secret
    port=$(port_for "$state/s3/port")
    access=$(secret_for "$state/s3/access-key" 10)
    secret=$(secret_for "$state/s3/secret-key" 20)
    if live_pid "$state/s3/s3s-fs.pid" s3s-fs >/dev/null && s3_ready "$port"; then
        log "s3s-fs already running on 127.0.0.1:$port"
        return
    fi
    log "starting s3s-fs on 127.0.0.1:$port"
    # s3s-fs serves each top-level directory of its root as a bucket.
    setsid "$S3S_BIN" --host 127.0.0.1 --port "$port" --access-key "$access" --secret-key "$secret" \
        "$state/s3/data" </dev/null >"$state/s3/s3s-fs.log" 2>&1 &
    echo $! >"$state/s3/s3s-fs.pid"
    wait_for s3s-fs s3_ready "$port"
}

stop_s3() {
    local state=$1 pid port
    port=$(cat "$state/s3/port" 2>/dev/null || echo 0)
    if pid=$(live_pid "$state/s3/s3s-fs.pid" s3s-fs); then
        log "stopping s3s-fs"
        kill "$pid"
        wait_gone s3s-fs kill -0 "$pid"
    fi
    [ "$port" = 0 ] || wait_gone s3s-fs port_open "$port"
}

# ----------------------------------------------------------------------------------------------

write_env() {
    local state=$1
    {
        echo "# written by scripts/services.sh; source it"
        echo "export LATTICE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$(cat "$state/postgres/port")/$PG_DB"
        echo "export LATTICE_TEST_REDIS_URL=redis://127.0.0.1:$(cat "$state/redis/port")/"
        echo "export LATTICE_TEST_S3_ENDPOINT=http://127.0.0.1:$(cat "$state/s3/port")"
        echo "export LATTICE_TEST_S3_REGION=$S3_REGION"
        echo "export LATTICE_TEST_S3_BUCKET=$S3_BUCKET"
        echo "export LATTICE_TEST_S3_ACCESS_KEY=$(cat "$state/s3/access-key")"
        echo "export LATTICE_TEST_S3_SECRET_KEY=$(cat "$state/s3/secret-key")"
        # For fault tests that stop and start one service with this script.
        echo "export LATTICE_TEST_SERVICES_STATE=$state"
        if [ -s "$state/kube/kube.env" ]; then
            grep '^export ' "$state/kube/kube.env"
        fi
    } >"$state/env.tmp"
    mv "$state/env.tmp" "$state/env"
    log "wrote $state/env"
}

one() {
    local action=$1 service=$2 state=$3
    case "$service" in
        postgres) "${action}_postgres" "$state" ;;
        redis) "${action}_redis" "$state" ;;
        s3) "${action}_s3" "$state" ;;
        *) die "unknown service $service (postgres, redis, s3)" ;;
    esac
}

status() {
    local state=$1 s port
    for s in postgres redis s3; do
        port=$(cat "$state/$s/port" 2>/dev/null || echo "")
        if [ -n "$port" ] && port_open "$port"; then
            echo "$s: up on 127.0.0.1:$port"
        else
            echo "$s: down"
        fi
    done
}

main() {
    [ $# -ge 2 ] || usage
    local cmd=$1 state
    case "$cmd" in
        start | stop | status)
            [ $# -eq 2 ] || usage
            mkdir -p "$2"
            state=$(cd "$2" && pwd)
            case "$cmd" in
                start)
                    # Install first, so the slow s3s-fs build happens before anything runs.
                    ensure_postgres
                    ensure_redis
                    ensure_s3s
                    one start postgres "$state"
                    one start redis "$state"
                    one start s3 "$state"
                    if [ "${LATTICE_SERVICES_KUBE:-1}" != 0 ]; then
                        bash "$(dirname "${BASH_SOURCE[0]}")/kube.sh" start "$state/kube"
                    fi
                    write_env "$state"
                    ;;
                stop)
                    if [ -d "$state/kube" ]; then
                        bash "$(dirname "${BASH_SOURCE[0]}")/kube.sh" stop "$state/kube"
                    fi
                    one stop s3 "$state"
                    one stop redis "$state"
                    one stop postgres "$state"
                    ;;
                status) status "$state" ;;
            esac
            ;;
        start-one | stop-one)
            [ $# -eq 3 ] || usage
            mkdir -p "$3"
            state=$(cd "$3" && pwd)
            one "${cmd%-one}" "$2" "$state"
            if [ "$cmd" = start-one ] && [ -s "$state/postgres/port" ] && [ -s "$state/redis/port" ] &&
                [ -s "$state/s3/port" ]; then
                write_env "$state"
            fi
            ;;
        *) usage ;;
    esac
}

main "$@"
