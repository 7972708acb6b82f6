#!/usr/bin/env bash
# The L4 comparison against HAProxy alone, with the driver's own options (e.g. `--seconds 5`,
# `--concurrency 64`): builds flowgate (release) and the driver `loadtest/`, then runs it.
# For the results table, use `loadtest/run --only l4` (it runs this driver and records it).
# Needs haproxy and iperf3 (scripts/setup.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# One target dir for both builds, so the driver reuses flowgate's compiled dependencies.
target="$root/target"
cargo build --release --locked --bin flowgate --manifest-path "$root/Cargo.toml" --target-dir "$target"
cargo build --release --locked --bin flowgate-loadtest --manifest-path "$here/Cargo.toml" --target-dir "$target"
exec "$target/release/flowgate-loadtest" --flowgate "$target/release/flowgate" "$@"
