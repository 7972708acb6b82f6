#!/usr/bin/env bash
# Builds flowgate (release) and the driver, then runs the comparison against HAProxy.
# Extra arguments go to the driver (e.g. `--seconds 5`, `--concurrency 64`).
# Needs haproxy and iperf3 (scripts/setup.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# One target dir for both builds, so the driver reuses flowgate's compiled dependencies.
target="$root/target"
cargo build --release --locked --bin flowgate --manifest-path "$root/Cargo.toml" --target-dir "$target"
cargo build --release --locked --manifest-path "$here/Cargo.toml" --target-dir "$target"
exec "$target/release/flowgate-loadtest" --flowgate "$target/release/flowgate" "$@"
