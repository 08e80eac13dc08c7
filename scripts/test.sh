#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (the Rust toolchain's
# wasm32-wasip2 target, Debian packages, the S3 server), starts PostgreSQL, Redis and an S3
# server on loopback ports of their own, runs every test, and stops the services again.
set -euo pipefail
cd "$(dirname "$0")/.."
export LATTICE_CACHE=${LATTICE_CACHE:-/var/cache/lattice}
mkdir -p "$LATTICE_CACHE"
if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo not found: install Rust with rustup first (https://rustup.rs)" >&2
    exit 1
fi
# rust-toolchain.toml pins the toolchain and its wasm32-wasip2 target; rustup installs both
# on first use. Make sure the target is there even when the toolchain already was.
rustup target add wasm32-wasip2 >/dev/null
exec cargo xtask ci
