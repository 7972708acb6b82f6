#!/usr/bin/env bash
# The whole test suite, set-up included: installs the system packages the tests talk to
# (when run as root and they are missing), then runs every test.
#
#   scripts/test.sh            # what the README and CI run
#
# Tests that need root (network namespaces, TUN) skip with a printed reason elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

cargo test --all-targets --locked "$@"
