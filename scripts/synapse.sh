#!/usr/bin/env bash
# Synapse, the reference Matrix homeserver, for the side-by-side benchmark: one main process
# (no workers) on a free loopback port, on a fresh database of a PostgreSQL server given by URL,
# configured by bench/synapse/homeserver.yaml.in (no federation, rate limits off).
#
#   scripts/synapse.sh install                       create the cached venv once; print its path
#   scripts/synapse.sh start <state-dir> <pg-url>    (re)create the database, start Synapse, wait
#                                                    for the client API, write <state-dir>/env
#   scripts/synapse.sh stop <state-dir> [<pg-url>]   stop Synapse, drop its database
#   scripts/synapse.sh restart <state-dir>           stop and start again on the same database (a
#                                                    warm start: SYNAPSE_STARTUP_MS is that start's)
#
# <pg-url> is postgres://USER[:PASSWORD]@HOST:PORT[/DB] with a superuser, such as
# LATTICE_TEST_POSTGRES_URL from scripts/services.sh's env (DB is only where CREATE DATABASE is
# issued from). `source <state-dir>/env` exports SYNAPSE_URL, SYNAPSE_PID, SYNAPSE_SERVER_NAME,
# SYNAPSE_STARTUP_MS (launch to the first 200 from /_matrix/client/versions, on the database just
# created: a cold start), SYNAPSE_VERSION, SYNAPSE_DATABASE, SYNAPSE_LOG and
# SYNAPSE_REGISTRATION_SHARED_SECRET.
#
# Environment: LATTICE_CACHE (default /var/cache/lattice) holds the venv, under
# tools/synapse-<version>-<hash of requirements.txt and the Python>; SYNAPSE_PYTHON (default
# python3) builds it; SYNAPSE_SERVER_NAME (default synapse.bench); SYNAPSE_START_TIMEOUT (s,
# default 120).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench/synapse"
REQUIREMENTS="$BENCH/requirements.txt"
LATTICE_CACHE=${LATTICE_CACHE:-/var/cache/lattice}
PYTHON=${SYNAPSE_PYTHON:-python3}
SERVER_NAME=${SYNAPSE_SERVER_NAME:-synapse.bench}
START_TIMEOUT=${SYNAPSE_START_TIMEOUT:-120}
STOP_TIMEOUT=20
# What the main process's command line contains (live_pid checks it before signalling).
NEEDLE=synapse.app.homeserver

LOG_PREFIX=synapse
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----------------------------------------------------------------------------------------------
# venv

synapse_version() {
    sed -n 's/^matrix-synapse==\([^[:space:];#]*\).*/\1/p' "$REQUIREMENTS" | head -n 1
}

# The cached venv for this requirements.txt and this Python (a venv links to its interpreter).
venv_dir() {
    local version key
    version=$(synapse_version)
    [ -n "$version" ] || die "no matrix-synapse==VERSION line in $REQUIREMENTS"
    key=$({
        cat "$REQUIREMENTS"
        "$PYTHON" -c 'import sys; print(sys.version, sys.base_prefix)'
    } | sha256sum | cut -c1-12)
    echo "$LATTICE_CACHE/tools/synapse-$version-$key"
}

# Creates the venv unless a complete one is there (.installed is written last); prints its path.
ensure_venv() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
    local venv
    venv=$(venv_dir)
    if [ ! -f "$venv/.installed" ]; then
        mkdir -p "$LATTICE_CACHE/tools"
        # Another install of the same venv (a concurrent run) holds the lock; wait for it.
        exec 9>"$venv.lock"
        flock 9
        if [ ! -f "$venv/.installed" ]; then
            "$PYTHON" -m venv --help >/dev/null 2>&1 || apt_install python3-venv
            rm -rf "$venv"
            log "creating $venv: pip install -r bench/synapse/requirements.txt (about a minute)"
            "$PYTHON" -m venv "$venv" >&2 || die "python -m venv failed"
            if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --prefer-binary \
                -r "$REQUIREMENTS" >&2 ||
                ! "$venv/bin/python" -c 'import synapse.app.homeserver, psycopg2, matplotlib' >&2; then
                rm -rf "$venv"
                die "installing $REQUIREMENTS failed"
            fi
            touch "$venv/.installed"
        fi
        flock -u 9
        exec 9>&-
    fi
    echo "$venv"
}

# ----------------------------------------------------------------------------------------------
# PostgreSQL

# psql: on the PATH, else from the server install scripts/services.sh uses.
psql_bin() {
    local d
    if command -v psql >/dev/null; then
        command -v psql
        return
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/psql" ]; then
            echo "$d/psql"
            return
        fi
    done
    apt_install postgresql-client
    command -v psql || die "psql not found after install"
}

# Splits a postgres:// URL into PG_USER, PG_PASSWORD, PG_HOST, PG_PORT and PG_ADMIN_DB.
parse_pg_url() {
    local url=$1 re='^postgres(ql)?://(([^:@/]*)(:([^@/]*))?@)?([^:/?]+)(:([0-9]+))?(/([^?]*))?'
    [[ "$url" =~ $re ]] || die "not a postgres:// URL: $url"
    PG_USER=${BASH_REMATCH[3]:-postgres}
    PG_PASSWORD=${BASH_REMATCH[5]}
    PG_HOST=${BASH_REMATCH[6]}
    PG_PORT=${BASH_REMATCH[8]:-5432}
    PG_ADMIN_DB=${BASH_REMATCH[10]:-postgres}
}

# Runs each argument as its own statement (CREATE and DROP DATABASE refuse a transaction block).
pg_sql() {
    local psql args=() s
    psql=$(psql_bin)
    for s; do args+=(-c "$s"); done
    PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=10 PGOPTIONS="-c client_min_messages=warning" "$psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_ADMIN_DB" "${args[@]}" >/dev/null
}

# One database per state directory, so two instances can share a PostgreSQL server.
db_name() {
    echo "synapse_bench_$(printf '%s' "$1" | sha256sum | cut -c1-12)"
}

# Synapse refuses a database whose collation is not C, and wants UTF8.
create_database() {
    local db=$1
    log "creating database $db on $PG_HOST:$PG_PORT"
    pg_sql "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
        "CREATE DATABASE $db TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'" \
        "ALTER DATABASE $db SET synchronous_commit = on" ||
        die "could not create database $db on $PG_HOST:$PG_PORT"
}

# ----------------------------------------------------------------------------------------------
# config

# render <template> <output> NAME=VALUE...: replaces each @NAME@, and fails on one left over.
render() {
    local in=$1 out=$2 kv value args=()
    shift 2
    for kv; do
        value=$(printf '%s' "${kv#*=}" | sed 's/[\\|&]/\\&/g')
        args+=(-e "s|@${kv%%=*}@|$value|g")
    done
    sed "${args[@]}" "$in" >"$out.tmp"
    if grep -v '^[[:space:]]*#' "$out.tmp" | grep -q '@[A-Z_]*@'; then
        die "$out: placeholder left unfilled: $(grep -v '^[[:space:]]*#' "$out.tmp" | grep -o '@[A-Z_]*@' | head -n 1)"
    fi
    mv "$out.tmp" "$out"
}

# A free loopback port, the one used before if it is still free.
free_port() {
    local state=$1
    if [ -s "$state/port" ] && port_open "$(cat "$state/port")"; then
        rm -f "$state/port"
    fi
    port_for "$state/port"
}

# ----------------------------------------------------------------------------------------------

now_ms() { date +%s%3N; }

versions_ok() {
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://127.0.0.1:$1/_matrix/client/versions")" = 200 ]
}

show_logs() {
    local state=$1 f
    for f in "$state/synapse.out" "$state/homeserver.log"; do
        if [ -s "$f" ]; then
            log "--- last lines of $f"
            tail -n 40 "$f" >&2
        fi
    done
}

# SIGTERM, up to $STOP_TIMEOUT s for it to exit, then SIGKILL to its process group (it was
# started in a session of its own, so that is Synapse and anything it started).
kill_synapse() {
    local state=$1 pid deadline
    pid=$(live_pid "$state/synapse.pid" "$NEEDLE") || return 0
    log "stopping synapse (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "synapse did not exit within ${STOP_TIMEOUT}s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$state/synapse.pid"
}

start() {
    local state=$1 url=$2 venv version db port pid t0 ms deadline
    command -v curl >/dev/null || apt_install curl
    command -v flock >/dev/null || apt_install util-linux
    if pid=$(live_pid "$state/synapse.pid" "$NEEDLE"); then
        die "synapse is already running from $state (pid $pid); stop it first"
    fi
    venv=$(ensure_venv)
    version=$(synapse_version)

    parse_pg_url "$url"
    db=$(db_name "$state")
    # restart keeps the data: a warm start (schema in place, Python's bytecode cached).
    if [ "${REUSE_DATABASE:-0}" = 1 ] && [ -s "$state/database" ]; then
        log "reusing database $db"
    else
        create_database "$db"
    fi
    # stop drops the database with these.
    (umask 077 && printf '%s\n' "$url" >"$state/postgres-url")
    echo "$db" >"$state/database"

    port=$(free_port "$state")
    rm -rf "$state/media_store" "$state/homeserver.log" "$state/synapse.out" "$state/env"
    mkdir -p "$state/media_store"
    render "$BENCH/log.config.in" "$state/log.config" "DATA=$state"
    render "$BENCH/homeserver.yaml.in" "$state/homeserver.yaml" \
        "SERVER_NAME=$SERVER_NAME" "PORT=$port" "DATA=$state" \
        "PG_HOST=$PG_HOST" "PG_PORT=$PG_PORT" "PG_USER=$PG_USER" "PG_PASSWORD=$PG_PASSWORD" \
        "PG_DB=$db" \
        "MACAROON_SECRET=$(secret_for "$state/macaroon-secret" 32)" \
        "FORM_SECRET=$(secret_for "$state/form-secret" 32)" \
        "REGISTRATION_SHARED_SECRET=$(secret_for "$state/registration-shared-secret" 32)"
    chmod 600 "$state/homeserver.yaml"

    # The signing key, once per state directory (before the clock starts).
    if [ ! -s "$state/signing.key" ]; then
        "$venv/bin/python" -m synapse.app.homeserver -c "$state/homeserver.yaml" --generate-keys \
            >"$state/synapse.out" 2>&1 || { show_logs "$state"; die "generating the signing key failed"; }
    fi

    log "starting synapse $version on 127.0.0.1:$port"
    t0=$(now_ms)
    # cd: Synapse resolves nothing relative to it, but a crash dump or stray file lands there.
    (cd "$state" && exec setsid "$venv/bin/python" -m "$NEEDLE" -c "$state/homeserver.yaml" \
        </dev/null >>"$state/synapse.out" 2>&1) &
    pid=$!
    echo "$pid" >"$state/synapse.pid"
    deadline=$((SECONDS + START_TIMEOUT))
    until versions_ok "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_logs "$state"
            rm -f "$state/synapse.pid"
            die "synapse exited during startup (scripts/synapse.sh stop $state drops the database)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_logs "$state"
            kill_synapse "$state"
            die "synapse did not answer within ${START_TIMEOUT}s (scripts/synapse.sh stop $state drops the database)"
        fi
        sleep 0.05
    done
    ms=$(($(now_ms) - t0))
    live_pid "$state/synapse.pid" "$NEEDLE" >/dev/null || die "pid $pid is not synapse"

    {
        echo "# written by scripts/synapse.sh; source it"
        echo "export SYNAPSE_URL=http://127.0.0.1:$port"
        echo "export SYNAPSE_PID=$pid"
        echo "export SYNAPSE_SERVER_NAME=$SERVER_NAME"
        echo "export SYNAPSE_STARTUP_MS=$ms"
        echo "export SYNAPSE_VERSION=$version"
        echo "export SYNAPSE_DATABASE=$db"
        echo "export SYNAPSE_LOG=$state/homeserver.log"
        echo "export SYNAPSE_REGISTRATION_SHARED_SECRET=$(cat "$state/registration-shared-secret")"
    } >"$state/env.tmp"
    mv "$state/env.tmp" "$state/env"
    log "up on http://127.0.0.1:$port after ${ms} ms (pid $pid); wrote $state/env"
}

stop() {
    local state=$1 url=${2:-} db
    kill_synapse "$state"
    rm -f "$state/env"
    [ -n "$url" ] || url=$(cat "$state/postgres-url" 2>/dev/null || true)
    db=$(cat "$state/database" 2>/dev/null || true)
    if [ -n "$db" ] && [ -n "$url" ]; then
        parse_pg_url "$url"
        log "dropping database $db"
        if pg_sql "DROP DATABASE IF EXISTS $db WITH (FORCE)"; then
            rm -f "$state/database"
        else
            log "warning: could not drop database $db on $PG_HOST:$PG_PORT (server down?)"
        fi
    fi
}

restart() {
    local state=$1 url
    url=$(cat "$state/postgres-url" 2>/dev/null) || die "$state has no running instance to restart"
    kill_synapse "$state"
    REUSE_DATABASE=1 start "$state" "$url"
}

main() {
    [ $# -ge 1 ] || usage
    local cmd=$1 state
    case "$cmd" in
        install)
            [ $# -eq 1 ] || usage
            ensure_venv
            ;;
        start | stop | restart)
            case "$cmd:$#" in
                start:3 | stop:2 | stop:3 | restart:2) ;;
                *) usage ;;
            esac
            mkdir -p "$2"
            state=$(cd "$2" && pwd)
            "$cmd" "$state" "${3:-}"
            ;;
        *) usage ;;
    esac
}

main "$@"
