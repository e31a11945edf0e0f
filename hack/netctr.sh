#!/usr/bin/env bash
# Usage: hack/netctr.sh attach ROOT ID ADDR/PREFIX [HOSTNS]
#        hack/netctr.sh show ROOT ID
# Gives a running migrun container a service address on the test bed's L2
# segment (hack/testbed.sh), reachable from mr-client and the other host:
#
#   container netns            host netns HOSTNS (default mr-host-a)
#   eth0 ADDR/PREFIX  <-veth->  mrv<hash> ── mrbr (bridge, host address) ── eth0 ── mr-br0
#
# The container must have a network namespace of its own (config.json's
# linux.namespaces has "network" without a path: migrun's default spec) and
# stdio that CRIU can dump; it is found by `migrun --root ROOT state ID`.
# The veth's outside end is named mrv + 8 hex digits of a hash of ROOT/ID.
# After `attach`, a gratuitous ARP from the container announces ADDR.
#
# Live migration keeps it: CRIU dumps the container's network namespace with
# its eth0 (addresses, routes, MAC); on the target `migrate-in --bridge mrbr`
# has CRIU recreate the pair with the outside end in migrate-in's namespace,
# attaches that end to mrbr, brings it up and announces the addresses with
# gratuitous ARP, so the switch learns that the MAC moved.
#   show   print the container's pid, its interfaces and the outside end
# Environment: MIGRUN_BIN (default <repo>/target/release/migrun),
#   NETCTR_BRIDGE (host bridge, default mrbr), NETCTR_IFNAME (default eth0).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIGRUN_BIN="${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}"
BRIDGE="${NETCTR_BRIDGE:-mrbr}"
IFNAME="${NETCTR_IFNAME:-eth0}"

usage() {
    echo "usage: $0 attach ROOT ID ADDR/PREFIX [HOSTNS] | show ROOT ID" >&2
    exit 2
}

# ctr_pid ROOT ID: the container's init pid (it must be running).
ctr_pid() {
    local root=$1 id=$2 st pid status
    st="$("$MIGRUN_BIN" --root "$root" state "$id" 2>&1)" \
        || die "migrun --root $root state $id failed: $st"
    pid="$(jq -r '.pid // empty' <<<"$st")"
    status="$(jq -r '.status // empty' <<<"$st")"
    [[ $status == running || $status == paused ]] || die "container $id is $status, not running"
    [[ $pid =~ ^[0-9]+$ && $pid -gt 0 ]] || die "container $id has no pid"
    echo "$pid"
}

# outside_name ROOT ID: mrv + 8 hex digits of a hash of ROOT/ID (<= 15 chars).
outside_name() {
    printf 'mrv%s' "$(printf '%s/%s' "$1" "$2" | md5sum | cut -c1-8)"
}

in_ctr() {
    local pid=$1; shift
    nsenter --net="/proc/$pid/ns/net" -- "$@"
}

cmd_attach() {
    (($# >= 3 && $# <= 4)) || usage
    local root=$1 id=$2 cidr=$3 hostns=${4:-mr-host-a}
    require_root
    need_cmd ip jq nsenter md5sum busybox
    [[ $cidr =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$ ]] || die "ADDR/PREFIX expected, got '$cidr'"
    [[ -e /run/netns/$hostns ]] || die "network namespace $hostns does not exist (hack/testbed.sh up)"
    ip -n "$hostns" link show "$BRIDGE" >/dev/null 2>&1 \
        || die "$hostns has no bridge $BRIDGE (hack/testbed.sh up makes it)"
    local pid out
    pid="$(ctr_pid "$root" "$id")"
    local ino
    ino="$(stat -L -c %i "/proc/$pid/ns/net")"
    [[ $ino != "$(stat -L -c %i "/run/netns/$hostns")" && $ino != "$(stat -L -c %i /proc/self/ns/net)" ]] \
        || die "container $id shares a host's network namespace: it needs one of its own"
    if in_ctr "$pid" ip link show "$IFNAME" >/dev/null 2>&1; then
        die "container $id already has an interface $IFNAME"
    fi
    out="$(outside_name "$root" "$id")"
    if ip -n "$hostns" link show "$out" >/dev/null 2>&1; then
        warn "removing a stale $hostns/$out"
        ip -n "$hostns" link del "$out"
    fi
    # Made in the host namespace, the inside end moved straight into the
    # container's (by pid): neither end is ever in the root namespace.
    ip -n "$hostns" link add "$out" type veth peer name "$IFNAME" netns "$pid"
    ip -n "$hostns" link set "$out" master "$BRIDGE"
    ip -n "$hostns" link set "$out" up
    in_ctr "$pid" ip link set lo up
    in_ctr "$pid" ip addr add "$cidr" dev "$IFNAME"
    in_ctr "$pid" ip link set "$IFNAME" up
    # Tell the segment where the address is now.
    in_ctr "$pid" busybox arping -U -c 1 -I "$IFNAME" "${cidr%/*}" >/dev/null 2>&1 \
        || warn "gratuitous ARP for ${cidr%/*} failed"
    log "$id (pid $pid): $IFNAME $cidr, outside end $hostns/$out on $BRIDGE"
}

cmd_show() {
    (($# == 2)) || usage
    local pid
    pid="$(ctr_pid "$1" "$2")"
    echo "pid $pid, outside end name $(outside_name "$1" "$2")"
    in_ctr "$pid" ip -br addr
}

case "${1:-}" in
    attach) shift; cmd_attach "$@" ;;
    show) shift; cmd_show "$@" ;;
    *) usage ;;
esac
