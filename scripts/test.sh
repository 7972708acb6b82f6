#!/usr/bin/env bash
# The whole test suite, set-up included: installs the system packages the tests talk to
# (when run as root and they are missing), then runs every test.
#
#   scripts/test.sh            # what the README and CI run
#   scripts/test.sh l4_        # extra arguments go to the test run (a filter, --test X)
#
# Tests that need root (network namespaces, TUN) or a missing peer are skipped elsewhere,
# with a `SKIPPED <test>: <reason>` line; with CI=true or FLOWGATE_REQUIRE_ALL=1 (.ci/run)
# they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# Benchmarks and load programs: built, so they keep compiling, but not run. Run in test
# mode (`cargo test --all-targets`, which selects benches by `bench = true` and ignores
# `test = false`) they take minutes: the load programs (loadtest/) drive real traffic for
# seconds per phase, and the criterion benches build large policy sets and tables before
# their single test-mode iteration (conntrack ~60 s, reload ~40 s, decide ~14 s here).
# Run them with `cargo bench --bench NAME` (BENCHMARKS.md).
cargo test --locked --benches --no-run

# Unit tests (library, binary) and every tests/*.rs — last, so the run closes on their
# summary.
cargo test --locked --lib --bins --tests "$@"
