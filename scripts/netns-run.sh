#!/usr/bin/env bash
# Run a command inside node I of the emulated cluster (see scripts/netns-cluster.sh):
#   scripts/netns-run.sh I CMD [ARGS...]
# The command sees only veth0 (10.77.0.<I+1>) and lo. Needs root.
set -euo pipefail

die() { echo "netns-run: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || die "usage: $0 I CMD [ARGS...]   (I = node index, 0-based)"
[[ $1 =~ ^[0-9]+$ ]] || die "node index must be a non-negative integer, got '$1'"
[[ $(id -u) -eq 0 ]] || die "must run as root (ip netns exec needs CAP_SYS_ADMIN)"
ns=bb-ns$1
shift
ip netns list | awk '{print $1}' | grep -qx "$ns" ||
    die "no namespace $ns; start the cluster with: scripts/netns-cluster.sh up N RATE"
exec ip netns exec "$ns" "$@"
