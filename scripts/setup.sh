#!/usr/bin/env bash
# Installs the real peers the tests and load tests use (Debian packages). Idempotent;
# does nothing for packages already present. Needs root to install; without root it
# lists what is missing and the tests that need it skip with a reason.
set -euo pipefail

PACKAGES=(curl haproxy iproute2 iperf3 netcat-openbsd nftables openssl prometheus python3 squid)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "setup: not root; missing packages (tests needing them will skip): ${missing[*]}" >&2
    exit 0
fi
echo "setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
