#!/usr/bin/env bash
# Packet mode in one command: flowgate as a stateful packet filter on a TUN device, in a
# client — gateway — server topology of network namespaces built here and removed on exit.
#
#   sudo scripts/demo-packet.sh          # builds target/release/flowgate if missing
#
#  client ns                       gateway ns                         server ns
#  eth0 198.18.1.2 (allowed)  ── gw-c 198.18.1.1   gw-s 198.18.2.1 ── eth0 198.18.2.2
#       198.18.1.3 (denied)         └─ iif gw-c|gw-s → table 100 → flowgate0 (TUN) ─┘
#
# flowgate runs in the gateway namespace with `[packet]` (frontend "tun"); policy routing
# sends everything the gateway forwards into its TUN, and what flowgate writes back is
# routed on. The server runs `python3 -m http.server`. An allowed curl gets the page; a
# denied one times out (its SYN is dropped) and the flow log shows the `deny` line.
# Needs root, /dev/net/tun, ip (iproute2), curl and python3. Addresses are from
# 198.18.0.0/15 (benchmarking space) and live only inside the namespaces.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "demo-packet: needs root (network namespaces, a TUN device): sudo $0" >&2
    exit 1
fi
for bin in ip curl python3; do
    command -v "$bin" >/dev/null || { echo "demo-packet: needs $bin" >&2; exit 1; }
done
[ -e /dev/net/tun ] || { echo "demo-packet: /dev/net/tun is missing (modprobe tun)" >&2; exit 1; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${FLOWGATE_BIN:-$ROOT/target/release/flowgate}
if [ ! -x "$BIN" ]; then
    echo "== building $BIN"
    (cd "$ROOT" && cargo build --release --locked)
fi

C=fgdemo-client-$$ G=fgdemo-gw-$$ S=fgdemo-server-$$
TUN=flowgate0
WORK=$(mktemp -d)
FG_PID= HTTP_PID=

cleanup() {
    set +e
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
    [ -n "$FG_PID" ] && kill "$FG_PID" 2>/dev/null
    wait 2>/dev/null
    for ns in "$C" "$G" "$S"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== namespaces: $C — $G — $S"
for ns in "$C" "$G" "$S"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip -n "$G" link add gw-c type veth peer name eth0 netns "$C"
ip -n "$G" link add gw-s type veth peer name eth0 netns "$S"
ip -n "$G" addr add 198.18.1.1/24 dev gw-c
ip -n "$G" addr add 198.18.2.1/24 dev gw-s
ip -n "$G" link set gw-c up
ip -n "$G" link set gw-s up
ip netns exec "$G" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
    net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.send_redirects=0
ip -n "$C" addr add 198.18.1.2/24 dev eth0
ip -n "$C" addr add 198.18.1.3/24 dev eth0
ip -n "$C" link set eth0 up
ip -n "$C" route add default via 198.18.1.1
ip -n "$S" addr add 198.18.2.2/24 dev eth0
ip -n "$S" link set eth0 up
ip -n "$S" route add default via 198.18.2.1

mkdir -p "$WORK/policies" "$WORK/www"
echo "hello from the server, through flowgate's packet filter" >"$WORK/www/index.html"
cat >"$WORK/inventory.yaml" <<'EOF'
namespaces:
  - name: demo
workloads:
  - {name: client, namespace: demo, labels: {app: client}, ips: [198.18.1.2]}
  - {name: intruder, namespace: demo, labels: {app: intruder}, ips: [198.18.1.3]}
  - {name: web, namespace: demo, labels: {app: web}, ips: [198.18.2.2],
     ports: [{name: http, port: 8000}]}
EOF
cat >"$WORK/policies/demo.yaml" <<'EOF'
# client may reach web on its named port http (8000/TCP); nothing else is allowed.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{port: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-ingress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: http}]
EOF
cat >"$WORK/flowgate.toml" <<EOF
[policy]
dir = "policies"
inventory = "inventory.yaml"
[flowlog]
output = "flow.log"
[admin]
bind = "127.0.0.1:9901"    # inside the gateway namespace
[control]
watch = false
[packet]
frontend = "tun"
workers = 2
[packet.tun]
device = "$TUN"
EOF

echo "== flowgate in $G: $BIN run --config $WORK/flowgate.toml"
ip netns exec "$G" "$BIN" run --config "$WORK/flowgate.toml" 2>"$WORK/flowgate.err" &
FG_PID=$!
for _ in $(seq 100); do
    grep -q "flowgate: ready" "$WORK/flowgate.err" 2>/dev/null && break
    kill -0 "$FG_PID" 2>/dev/null || { cat "$WORK/flowgate.err" >&2; exit 1; }
    sleep 0.1
done
grep "flowgate: " "$WORK/flowgate.err" | sed 's/^/   /'

echo "== policy routing in $G: forwarded traffic into $TUN, what flowgate writes back on"
ip netns exec "$G" sh -ec "
    ip link set $TUN addrgenmode none   # no link-local address: no RS/MLD of its own
    ip link set $TUN up
    sysctl -qw net.ipv4.conf.$TUN.rp_filter=0
    ip route add default dev $TUN table 100
    ip rule add iif gw-c lookup 100 pref 100
    ip rule add iif gw-s lookup 100 pref 101"

ip netns exec "$S" python3 -m http.server 8000 --bind 198.18.2.2 --directory "$WORK/www" \
    >/dev/null 2>&1 &
HTTP_PID=$!
for _ in $(seq 100); do
    ip netns exec "$S" curl -s -o /dev/null http://198.18.2.2:8000/ && break
    sleep 0.1
done

echo
echo "== allowed: curl from the client (198.18.1.2) to web (198.18.2.2:8000)"
ip netns exec "$C" curl -sS --max-time 5 http://198.18.2.2:8000/

echo
echo "== denied: the same from 198.18.1.3, which no policy allows (its SYN is dropped)"
if ip netns exec "$C" curl -sS --max-time 3 --interface 198.18.1.3 http://198.18.2.2:8000/ 2>&1; then
    echo "demo-packet: the denied curl got through" >&2
    exit 1
fi

echo
echo "== the flow log's deny line for it"
DENY='"event":"deny","listener":"packet","proto":"tcp","src":"198.18.1.3:'
for _ in $(seq 50); do
    grep -q "$DENY" "$WORK/flow.log" 2>/dev/null && break
    sleep 0.1
done
grep "$DENY" "$WORK/flow.log" | head -n 1

echo
echo "== packet counters (GET /metrics in $G)"
ip netns exec "$G" curl -sS --max-time 5 http://127.0.0.1:9901/metrics |
    grep -E '^flowgate_packet_(packets_total|dropped_total\{.*reason="policy")'
echo
echo "== done; cleaning up"
