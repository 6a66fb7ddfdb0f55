#!/usr/bin/env bash
# Emulate a slow cluster network on one machine (needs root).
#
#   scripts/netns-cluster.sh up N RATE     N namespaces bb-ns0..bb-ns{N-1}, each RATE up and down
#   scripts/netns-cluster.sh status        what exists now, with addresses and shaping
#   scripts/netns-cluster.sh down          remove everything `up` created
#
# Layout: a namespace bb-bridge holds the bridge bb-br0; namespace bb-ns<i> has the interface veth0,
# address 10.77.0.<i+1>/24, joined by a veth pair to port bb-p<i> of the bridge. Nothing is created
# in the caller's namespace, so traffic between the nodes never leaves these namespaces.
#
# Shaping: a tbf qdisc on veth0 (what node i sends) and on bridge port bb-p<i> (what node i
# receives), both at RATE, like a switch port of that speed. RATE is in tc's units: 100mbit, 1gbit,
# 500kbit. (netem is not available on every kernel; tbf is.)
#
# Run ranks inside with scripts/netns-run.sh, e.g. for gloo over the emulated link:
#   scripts/netns-run.sh 0 env GLOO_SOCKET_IFNAME=veth0 MASTER_ADDR=10.77.0.1 ... python train.py
set -Eeuo pipefail

BRIDGE_NS=bb-bridge
BRIDGE=bb-br0
SUBNET=10.77.0
LATENCY=50ms   # tbf queue: packets that would wait longer than this are dropped

die() { echo "netns-cluster: $*" >&2; exit 1; }

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

preflight() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces and tc need CAP_NET_ADMIN)"
    command -v ip >/dev/null || die "'ip' not found; install iproute2"
    command -v tc >/dev/null || die "'tc' not found; install iproute2"
}

our_node_namespaces() {
    ip netns list | awk '{print $1}' | grep -E '^bb-ns[0-9]+$' | sort -V || true
}

have_bridge_ns() {
    ip netns list | awk '{print $1}' | grep -qx "$BRIDGE_NS"
}

# RATE (e.g. 100mbit) -> bits per second; fails on anything tc would read differently.
rate_bits() {
    local rate=${1,,} number unit
    [[ $rate =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] ||
        die "RATE must be an integer with bit, kbit, mbit or gbit (e.g. 100mbit, 1gbit), got '$1'"
    number=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]}
    case $unit in
        bit) echo "$number" ;;
        kbit) echo $((number * 1000)) ;;
        mbit) echo $((number * 1000000)) ;;
        gbit) echo $((number * 1000000000)) ;;
    esac
}

cmd_down() {
    local ns pids removed=0
    for ns in $(our_node_namespaces) $(have_bridge_ns && echo "$BRIDGE_NS"); do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [[ -z $pids ]] || echo "netns-cluster: warning: processes still in $ns: $pids(not killed)" >&2
        ip netns del "$ns"
        removed=$((removed + 1))
    done
    if [[ $removed -eq 0 ]]; then
        echo "netns-cluster: nothing to remove"
    else
        echo "netns-cluster: removed $removed namespaces"
    fi
}

shape() {  # shape NAMESPACE DEVICE RATE BURST
    tc -n "$1" qdisc replace dev "$2" root tbf rate "$3" burst "$4" latency "$LATENCY"
}

cmd_up() {
    [[ $# -eq 2 ]] || usage
    local n=$1 rate=$2 bits burst i ns
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 254)) || die "N must be 1..254, got '$n'"
    bits=$(rate_bits "$rate")
    # Burst: 10 ms of traffic, at least 64 KiB so one TSO/GSO segment always fits.
    burst=$((bits / 8 / 100))
    ((burst >= 65536)) || burst=65536
    if [[ -n $(our_node_namespaces) ]] || have_bridge_ns; then
        echo "netns-cluster: replacing the existing cluster"
        cmd_down >/dev/null
    fi
    trap 'echo "netns-cluster: setup failed; cleaning up" >&2; cmd_down >/dev/null' ERR
    ip netns add "$BRIDGE_NS"
    ip -n "$BRIDGE_NS" link set lo up
    ip -n "$BRIDGE_NS" link add "$BRIDGE" type bridge
    ip -n "$BRIDGE_NS" link set "$BRIDGE" up
    for ((i = 0; i < n; i++)); do
        ns=bb-ns$i
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$BRIDGE_NS" link add "bb-p$i" type veth peer name veth0 netns "$ns"
        ip -n "$BRIDGE_NS" link set "bb-p$i" master "$BRIDGE" up
        ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev veth0
        ip -n "$ns" link set veth0 up
        shape "$ns" veth0 "$rate" "$burst"
        shape "$BRIDGE_NS" "bb-p$i" "$rate" "$burst"
    done
    trap - ERR
    echo "netns-cluster: $n nodes at $rate each way: bb-ns0..bb-ns$((n - 1)) = $SUBNET.1..$SUBNET.$n"
}

cmd_status() {
    local namespaces ns
    namespaces=$(our_node_namespaces)
    if [[ -z $namespaces ]] && ! have_bridge_ns; then
        echo "netns-cluster: down (no bb-* namespaces)"
        return 0
    fi
    have_bridge_ns || echo "netns-cluster: warning: bridge namespace $BRIDGE_NS is missing" >&2
    for ns in $namespaces; do
        local addr qdisc
        addr=$(ip -n "$ns" -4 -o addr show dev veth0 2>/dev/null | awk '{print $4}')
        qdisc=$(tc -n "$ns" qdisc show dev veth0 2>/dev/null | grep -o 'rate [^ ]*' || echo "unshaped")
        echo "$ns  veth0 ${addr:-no-address}  send $qdisc  receive $(
            tc -n "$BRIDGE_NS" qdisc show dev "bb-p${ns#bb-ns}" 2>/dev/null | grep -o 'rate [^ ]*' ||
                echo unshaped)"
    done
}

main() {
    [[ $# -ge 1 ]] || usage
    local command=$1
    shift
    case $command in
        up) preflight; cmd_up "$@" ;;
        down) preflight; cmd_down ;;   # extra arguments (N RATE) are accepted and ignored
        status) preflight; cmd_status ;;
        -h | --help | help) usage ;;
        *) echo "netns-cluster: unknown command '$command'" >&2; usage ;;
    esac
}

main "$@"
