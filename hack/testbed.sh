#!/usr/bin/env bash
# Usage: hack/testbed.sh up|down|status|env
# A two-host network for live-migration demos and tests, made of network
# namespaces only (nothing is added to the root namespace's links/addresses):
#
#   mr-host-a  mrbr 10.77.0.1/24 [eth0] ─┐
#   mr-host-b  mrbr 10.77.0.2/24 [eth0] ─┼─ mr-br0 (bridge, in namespace mr-switch)
#   mr-client  eth0 10.77.0.10/24       ─┘
#
# Each namespace's eth0 is a veth whose peer (veth-a, veth-b, veth-c) is a
# port of mr-br0. In the two hosts, eth0 is itself a port of a host bridge
# `mrbr` that holds the host's address (and eth0's MAC): containers wired
# with hack/netctr.sh get a veth on mrbr, i.e. a service address on the
# test bed's L2 segment, and `migrate-in --bridge mrbr` attaches a migrated
# container's veth to it again.
# The two hosts' links are shaped on their eth0, both ways:
#   out of the host: root qdisc of eth0             tbf rate R [+ netem delay D]
#   into the host:   eth0 ingress -> ifb-eth0 (mirred), tbf rate R [+ netem delay D]
# so A -> B crosses two shaped hops (A out, B in): rate R, one-way delay 2*D.
# The client's link is not shaped.
#
#   up      create (or complete/re-shape) the testbed; idempotent
#   down    delete the namespaces (and with them every link made here)
#   status  show namespaces, addresses, qdiscs, ping A->B and a throughput
#           check (busybox nc, A->B and B->A); exit 1 if the testbed is not up
#   env     print the addresses and namespace names as shell variables
#           (use: eval "$(hack/testbed.sh env)")
# Environment:
#   TESTBED_RATE   rate of each host link and direction (tc units; default 1gbit)
#   TESTBED_DELAY  delay of each host link and direction (default 0.5ms; 0 = none)
#                  needs sch_netem; without it (CONFIG_NET_SCH_NETEM unset),
#                  `up` warns and shapes the rate only
#   TESTBED_BURST  tbf bucket size (default 64kb)
#   TESTBED_PROBE_MB  megabytes sent by the throughput check (default 64)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NS_A=mr-host-a
NS_B=mr-host-b
NS_C=mr-client
NS_SW=mr-switch
BRIDGE=mr-br0
ADDR_A=10.77.0.1
ADDR_B=10.77.0.2
ADDR_C=10.77.0.10
PREFIX=24
IFACE=eth0          # the link's name inside each host/client namespace
HOST_BRIDGE=mrbr    # the bridge of each host namespace (eth0 + containers)
IFB=ifb-eth0        # ingress shaping device inside each host namespace
PROBE_PORT=9000

RATE="${TESTBED_RATE:-1gbit}"
DELAY="${TESTBED_DELAY:-0.5ms}"
BURST="${TESTBED_BURST:-64kb}"
PROBE_MB="${TESTBED_PROBE_MB:-64}"
# tbf queue: packets waiting longer than this are dropped
TBF_LATENCY=50ms
NETEM_LIMIT=10000

# name:address:switch-port
NODES=("$NS_A:$ADDR_A:veth-a" "$NS_B:$ADDR_B:veth-b" "$NS_C:$ADDR_C:veth-c")
SHAPED=("$NS_A" "$NS_B")
ALL_NS=("$NS_A" "$NS_B" "$NS_C" "$NS_SW")

ns_exists() { [[ -e /run/netns/$1 ]] && ip netns exec "$1" true 2>/dev/null; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
link_exists() { ip -n "$1" link show "$2" >/dev/null 2>&1; }
delay_wanted() { [[ -n $DELAY && ! $DELAY =~ ^0+(\.0*)?(s|ms|us)?$ ]]; }

ensure_ns() {
    local ns=$1
    if ! ns_exists "$ns"; then
        # a stale /run/netns entry (file without a namespace) blocks `add`
        if [[ -e /run/netns/$ns ]]; then ip netns delete "$ns" 2>/dev/null || true; fi
        ip netns add "$ns"
        log "created namespace $ns"
    fi
    ip -n "$ns" link set lo up
}

ensure_addr() {
    local ns=$1 dev=$2 cidr=$3
    ip -n "$ns" -4 addr show dev "$dev" | grep -qF " $cidr " \
        || ip -n "$ns" addr add "$cidr" dev "$dev"
}

# The rate (tbf) and, if wanted and available, the delay (netem under tbf)
# of DEV's egress in NS. Sets NETEM_MISSING=1 if the delay was wanted but
# the kernel has no netem.
NETEM_MISSING=0
shape_egress() {
    local ns=$1 dev=$2 err
    in_ns "$ns" tc qdisc replace dev "$dev" root handle 1: \
        tbf rate "$RATE" burst "$BURST" latency "$TBF_LATENCY"
    delay_wanted || return 0
    if ! err="$(in_ns "$ns" tc qdisc replace dev "$dev" parent 1:1 handle 10: \
        netem delay "$DELAY" limit "$NETEM_LIMIT" 2>&1)"; then
        [[ $err == *"qdisc kind is unknown"* ]] || die "tc netem on $ns/$dev failed: $err"
        NETEM_MISSING=1
    fi
}

shape_host() {
    local ns=$1
    # out of the host
    shape_egress "$ns" "$IFACE"
    # into the host: redirect eth0's ingress to an ifb and shape its egress
    link_exists "$ns" "$IFB" || ip -n "$ns" link add "$IFB" type ifb
    ip -n "$ns" link set "$IFB" up
    shape_egress "$ns" "$IFB"
    in_ns "$ns" tc qdisc del dev "$IFACE" ingress 2>/dev/null || true
    in_ns "$ns" tc qdisc add dev "$IFACE" handle ffff: ingress
    in_ns "$ns" tc filter add dev "$IFACE" parent ffff: protocol all prio 1 \
        u32 match u32 0 0 action mirred egress redirect dev "$IFB"
}

# ensure_host_bridge NS CIDR: the host's bridge, with eth0 as a port and the
# host's address (moved from eth0 if it is still there) and MAC on it.
ensure_host_bridge() {
    local ns=$1 cidr=$2 mac
    if ! link_exists "$ns" "$HOST_BRIDGE"; then
        ip -n "$ns" link add "$HOST_BRIDGE" type bridge stp_state 0 forward_delay 0
        log "created bridge $ns/$HOST_BRIDGE"
    fi
    # The bridge keeps eth0's MAC whatever ports come and go.
    mac="$(ip -n "$ns" -o link show "$IFACE" | grep -oE 'link/ether [0-9a-f:]+' | awk '{print $2}')"
    [[ -z $mac ]] || ip -n "$ns" link set "$HOST_BRIDGE" address "$mac"
    ip -n "$ns" link set "$IFACE" master "$HOST_BRIDGE"
    if ip -n "$ns" -4 addr show dev "$IFACE" | grep -qF " $cidr "; then
        ip -n "$ns" addr del "$cidr" dev "$IFACE"
    fi
    ensure_addr "$ns" "$HOST_BRIDGE" "$cidr"
    ip -n "$ns" link set "$HOST_BRIDGE" up
}

# host_dev NS: the device holding the node's address (mrbr on hosts, eth0 on the client).
host_dev() {
    local s
    for s in "${SHAPED[@]}"; do [[ $1 == "$s" ]] && { echo "$HOST_BRIDGE"; return; }; done
    echo "$IFACE"
}

cmd_up() {
    require_root
    need_cmd ip tc busybox
    local ns node addr port
    for ns in "${ALL_NS[@]}"; do ensure_ns "$ns"; done

    if ! link_exists "$NS_SW" "$BRIDGE"; then
        ip -n "$NS_SW" link add "$BRIDGE" type bridge stp_state 0
        log "created bridge $BRIDGE in $NS_SW"
    fi
    ip -n "$NS_SW" link set "$BRIDGE" up

    for node in "${NODES[@]}"; do
        IFS=: read -r ns addr port <<<"$node"
        # A half-made pair (one end lost with a deleted namespace) is
        # removed first; a complete pair is kept.
        if link_exists "$NS_SW" "$port" && ! link_exists "$ns" "$IFACE"; then
            ip -n "$NS_SW" link del "$port"
        fi
        if link_exists "$ns" "$IFACE" && ! link_exists "$NS_SW" "$port"; then
            ip -n "$ns" link del "$IFACE"
        fi
        if ! link_exists "$NS_SW" "$port"; then
            # made inside the switch namespace, peer moved straight to $ns:
            # neither end ever appears in the root namespace
            ip -n "$NS_SW" link add "$port" type veth peer name "$IFACE" netns "$ns"
            log "created link $ns/$IFACE <-> $NS_SW/$port"
        fi
        ip -n "$NS_SW" link set "$port" master "$BRIDGE"
        ip -n "$NS_SW" link set "$port" up
        ip -n "$ns" link set "$IFACE" up
        if [[ $(host_dev "$ns") == "$HOST_BRIDGE" ]]; then
            ensure_host_bridge "$ns" "$addr/$PREFIX"
        else
            ensure_addr "$ns" "$IFACE" "$addr/$PREFIX"
        fi
    done

    for ns in "${SHAPED[@]}"; do shape_host "$ns"; done
    if ((NETEM_MISSING)); then
        warn "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM not set):" \
            "TESTBED_DELAY=$DELAY is NOT applied; host links are rate-limited only"
    fi

    # the bridge forwards at once (STP off), but give the links a moment
    local n
    for n in "$NS_B:$ADDR_A" "$NS_C:$ADDR_A" "$NS_A:$ADDR_B"; do
        wait_until 10 in_ns "${n%%:*}" busybox ping -c 1 -W 1 "${n#*:}" \
            || die "${n%%:*} cannot reach ${n#*:} over $BRIDGE"
    done
    local d="delay ${DELAY}"
    delay_wanted || d="no delay"
    ((NETEM_MISSING == 0)) || d="no delay (netem unavailable)"
    log "up: $NS_A=$ADDR_A $NS_B=$ADDR_B $NS_C=$ADDR_C on $BRIDGE ($NS_SW);" \
        "host links: rate $RATE, $d, each direction"
}

cmd_down() {
    require_root
    local ns pids
    for ns in "${ALL_NS[@]}"; do
        [[ -e /run/netns/$ns ]] || continue
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        # The namespace (and its links) lives on as long as a process is in it.
        [[ -z ${pids// /} ]] \
            || warn "processes still in $ns (not started by this script, not killed): $pids"
        ip netns delete "$ns"
        log "deleted namespace $ns"
    done
    log "down"
}

cmd_env() {
    cat <<EOF
export TESTBED_NS_A=$NS_A
export TESTBED_NS_B=$NS_B
export TESTBED_NS_CLIENT=$NS_C
export TESTBED_NS_SWITCH=$NS_SW
export TESTBED_ADDR_A=$ADDR_A
export TESTBED_ADDR_B=$ADDR_B
export TESTBED_ADDR_CLIENT=$ADDR_C
export TESTBED_PREFIX=$PREFIX
export TESTBED_HOST_BRIDGE=$HOST_BRIDGE
EOF
}

# throughput FROM_NS TO_NS TO_ADDR: MB megabytes through busybox nc; prints Mbit/s
throughput() {
    local from=$1 to=$2 to_addr=$3 port=$PROBE_PORT
    local bytes=$((PROBE_MB * 1024 * 1024)) lpid got t0 t1 ms rc=0
    local tmp
    tmp="$(mktemp -d)"
    mkfifo "$tmp/stdin"
    # The listener's stdin must stay open without data: busybox nc
    # half-closes the connection at EOF on stdin, which makes the sender
    # quit. A FIFO opened read-write never reaches EOF.
    timeout 60 ip netns exec "$to" busybox nc -l -p "$port" \
        <>"$tmp/stdin" | wc -c >"$tmp/count" &
    lpid=$!
    if ! wait_until 5 bash -c "ip netns exec '$to' ss -Hltn 'sport = :$port' | grep -q ."; then
        kill "$lpid" 2>/dev/null || true
        wait "$lpid" 2>/dev/null || true
        rm -rf "$tmp"
        echo "listener did not start"
        return 1
    fi
    t0=$(date +%s%N)
    head -c "$bytes" /dev/zero \
        | timeout 60 ip netns exec "$from" busybox nc "$to_addr" "$port" || rc=$?
    wait "$lpid" || true
    t1=$(date +%s%N)
    got="$(tr -dc 0-9 <"$tmp/count")"
    rm -rf "$tmp"
    ms=$(((t1 - t0) / 1000000))
    if ((rc != 0)) || [[ $got != "$bytes" ]]; then
        echo "FAILED (nc rc $rc, received ${got:-0} of $bytes bytes)"
        return 1
    fi
    ((ms > 0)) || ms=1
    echo "$((bytes * 8 / 1000 / ms)) Mbit/s ($PROBE_MB MiB in ${ms} ms)"
}

cmd_status() {
    require_root
    need_cmd ip tc busybox ss
    local ns ok=1 node addr port
    for ns in "${ALL_NS[@]}"; do
        if ns_exists "$ns"; then echo "namespace $ns: present"; else echo "namespace $ns: MISSING"; ok=0; fi
    done
    if ((ok)); then
        link_exists "$NS_SW" "$BRIDGE" || { echo "bridge $BRIDGE: MISSING"; ok=0; }
        for node in "${NODES[@]}"; do
            IFS=: read -r ns addr port <<<"$node"
            if ! ip -n "$NS_SW" link show "$port" 2>/dev/null | grep -qF "master $BRIDGE "; then
                echo "$ns: $NS_SW/$port is not a port of $BRIDGE"; ok=0
            else
                local dev
                dev="$(host_dev "$ns")"
                if ip -n "$ns" -4 addr show dev "$dev" 2>/dev/null | grep -qF " $addr/$PREFIX "; then
                    echo "$ns: $dev $addr/$PREFIX ($(ip -n "$ns" -br link show "$dev" | awk '{print $2}'))"
                else
                    echo "$ns: $dev $addr/$PREFIX MISSING"; ok=0
                fi
                if [[ $dev != "$IFACE" ]] \
                    && ! ip -n "$ns" link show "$IFACE" 2>/dev/null | grep -qF "master $dev "; then
                    echo "$ns: $IFACE is not a port of $dev"; ok=0
                fi
            fi
        done
    fi
    if ((!ok)); then
        log "testbed is not (completely) up; run '$0 up'"
        return 1
    fi
    for ns in "${SHAPED[@]}"; do
        echo "$ns shaping:"
        { in_ns "$ns" tc qdisc show dev "$IFACE"; in_ns "$ns" tc qdisc show dev "$IFB"; } \
            | grep -E 'tbf|netem|ingress' | sed 's/^/    /'
        in_ns "$ns" tc qdisc show | grep -q netem \
            || echo "    (no netem qdisc: no delay emulated)"
    done
    echo "ping $NS_A -> $ADDR_B: $(in_ns "$NS_A" busybox ping -c 5 -i 0.2 -q "$ADDR_B" 2>&1 | tail -n 1)"
    local r rc=0
    r="$(throughput "$NS_A" "$NS_B" "$ADDR_B")" || rc=1
    echo "throughput $NS_A -> $NS_B: $r"
    r="$(throughput "$NS_B" "$NS_A" "$ADDR_A")" || rc=1
    echo "throughput $NS_B -> $NS_A: $r"
    # busybox nc itself is CPU-bound well below 1 Gbit/s on small machines:
    # the same transfer over an unshaped loopback shows its ceiling.
    r="$(throughput "$NS_C" "$NS_C" 127.0.0.1)" || rc=1
    echo "throughput $NS_C loopback (unshaped, busybox nc's own ceiling): $r"
    return "$rc"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
