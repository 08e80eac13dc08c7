# shellcheck shell=bash
# Shell helpers shared by scripts/services.sh, scripts/kube.sh and scripts/synapse.sh; sourced
# after LOG_PREFIX is set.

log() { printf '%s: %s\n' "$LOG_PREFIX" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Prints the script's header comment (everything after the shebang up to the first line that is
# not a comment) as its usage, and exits 2.
usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2
    exit 2
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# A free loopback port, remembered in $1 (a file) so it stays the same across restarts.
port_for() {
    local file=$1 port
    if [ -s "$file" ]; then
        cat "$file"
        return
    fi
    # Below the kernel's ephemeral range (ip_local_port_range, 32768 and up by default): a port
    # in that range can be the local end of some outgoing connection, which a probe by
    # connecting does not see but which makes bind fail.
    local low=20000 high
    high=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    [ "$high" -gt $((low + 1000)) ] || { low=10000; high=20000; }
    for _ in $(seq 1 200); do
        port=$(( (RANDOM * 32768 + RANDOM) % (high - low) + low ))
        if ! port_open "$port"; then
            echo "$port" >"$file"
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

secret_for() {
    local file=$1 bytes=$2
    if [ ! -s "$file" ]; then
        od -An -tx1 -N"$bytes" /dev/urandom | tr -d ' \n' >"$file"
        chmod 600 "$file"
    fi
    cat "$file"
}

# A pid from a pid file, if that process is alive and its command line contains $2.
live_pid() {
    local file=$1 needle=$2 pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$needle" || return 1
    echo "$pid"
}
