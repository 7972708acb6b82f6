#!/usr/bin/env bash
# Installs the real peers the tests and load tests use (Debian packages). Idempotent;
# does nothing for packages already present. Needs root to install.
#
# What needs what (keep in step with `Need::Bin` in tests/ and the load programs):
#   curl            egress_*, admin_api (independent HTTP client)
#   etcd-server     tests/fleet_etcd.rs, benches/fleet_propagation.rs (etcd 3.4: a 3-member cluster on loopback)
#   haproxy         tests/haproxy.rs; loadtest/ (L4 comparison)
#   iproute2 (ip)   egress_ssrf_netns, egress_transparent (network namespaces)
#   iperf3          loadtest/ (bulk throughput)
#   netcat-openbsd  tests/readme.rs (the README demo's `nc`)
#   nftables (nft)  egress_transparent (redirects)
#   openssl         egress_* (TLS server and certificates)
#   prometheus      tests/prometheus.rs (prometheus and promtool)
#   python3         egress_* (HTTP server, probes)
#   squid           loadtest/egress_vs_squid.rs
#   kubernetes-validate (PyPI)  generate_cli (generated NetworkPolicy against the k8s schema)
#
# Without root, it lists what is missing: elsewhere the tests that need it are skipped
# (and say so), but when every peer is required (CI=true or FLOWGATE_REQUIRE_ALL=1) that
# is an error here already.
set -euo pipefail

command -v kubernetes-validate >/dev/null || python3 -m pip install -q kubernetes-validate >&2 || echo "setup: pip could not install kubernetes-validate" >&2

PACKAGES=(curl etcd-server haproxy iproute2 iperf3 netcat-openbsd nftables openssl prometheus python3 squid)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    if [[ ${CI:-} == true || ${FLOWGATE_REQUIRE_ALL:-} == 1 ]]; then
        echo "setup: not root, and every peer is required here; missing: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: not root; missing packages (tests needing them will be skipped): ${missing[*]}" >&2
    exit 0
fi
echo "setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
