#!/usr/bin/env bash
# make demo: a container through Docker with --runtime=migrun, then a live
# migration between two "hosts" of the network testbed (hack/testbed.sh):
#   1. a counter container runs on host A (migrun --root /run/mr-demo-a)
#   2. it is live-migrated (pre-copy) to host B over 10.77.0.2:7070
#      (migrate-in --root /run/mr-demo-b in mr-host-b, migrate-out in mr-host-a)
#   3. the counter goes on on B; `migrun exec` into it there
#   4. it comes back to A by stop-and-copy (--no-precopy), and the two
#      migrations' figures are printed side by side
# Everything it made is removed at the end (containers, state dirs, the
# testbed); the project's dockerd is left running.
# Environment: MIGRUN_BIN (default <repo>/target/release/migrun),
#   DEMO_MIGRATE_TIMEOUT (seconds one migration may take, default 120),
#   TESTBED_RATE / TESTBED_DELAY (see hack/testbed.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIGRUN_BIN="${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}"
# CRIU >= 4 from hack/install-deps.sh lives in /usr/local/sbin
export PATH="/usr/local/sbin:/usr/local/bin:$PATH"
TESTBED="$HACK_DIR/testbed.sh"
MIGRATE_TIMEOUT="${DEMO_MIGRATE_TIMEOUT:-120}"
CID=c1
PORT=7070
ROOT_A=/run/mr-demo-a
ROOT_B=/run/mr-demo-b
# migrate-in / migrate-out work dirs (incoming bundles, CRIU images)
IN_A=/run/mr-demo-a-in
IN_B=/run/mr-demo-b-in
OUT_A=/run/mr-demo-a-out
OUT_B=/run/mr-demo-b-out

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
indent() { sed -u 's/^/    /'; }
mr() { "$MIGRUN_BIN" "$@"; }

# in_host NS CMD...: CMD in the network namespace NS only.
# Not `ip netns exec`: that also gives CMD a mount namespace of its own with
# a fresh /sys, i.e. without /sys/fs/cgroup, and migrun then fails with
# "open cgroup of container c1: failed to detect cgroup setup".
in_host() {
    local ns=$1; shift
    nsenter --net="/run/netns/$ns" -- "$@"
}

require_root
need_cmd docker jq nsenter timeout ss sed busybox
[[ -x $MIGRUN_BIN ]] || die "$MIGRUN_BIN not found: build it first (make build)"

WORK=""
IN_PID=""
IN_LOG=""
FAILED_AT=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if ((rc != 0)); then
        printf '\n' >&2
        warn "demo FAILED${FAILED_AT:+ at: $FAILED_AT} (exit $rc); cleaning up"
    fi
    if [[ -n $IN_PID ]] && kill -0 "$IN_PID" 2>/dev/null; then
        kill -TERM "$IN_PID" 2>/dev/null
        wait "$IN_PID" 2>/dev/null
    fi
    local root
    for root in "$ROOT_A" "$ROOT_B"; do
        [[ -d $root ]] || continue
        if mr --root "$root" state "$CID" >/dev/null 2>&1; then
            timeout 30 "$MIGRUN_BIN" --root "$root" delete -f "$CID" \
                || warn "migrun --root $root delete -f $CID failed"
        fi
    done
    rm -rf --one-file-system "$IN_A" "$IN_B" "$OUT_A" "$OUT_B"
    # the state roots: only the (unmounted, empty) file of migrun's
    # read-only re-exec bind mount should be left in them
    for root in "$ROOT_A" "$ROOT_B"; do
        [[ -d $root ]] || continue
        if [[ -f $root/.migrun-exe && ! -s $root/.migrun-exe ]] \
            && ! mountpoint -q "$root/.migrun-exe"; then
            rm -f "$root/.migrun-exe"
        fi
        rmdir "$root" 2>/dev/null || warn "$root is not empty, left in place"
    done
    bash "$TESTBED" down >/dev/null || warn "'$TESTBED down' failed"
    if [[ -n $WORK ]]; then
        if ((rc == 0)); then
            rm -rf --one-file-system "$WORK"
        else
            warn "logs and stats kept in $WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- docker
FAILED_AT="docker"
eval "$(bash "$HACK_DIR/docker.sh" env)"
if ! bash "$HACK_DIR/docker.sh" status >/dev/null 2>&1; then
    log "the project's dockerd is not running: starting it (hack/docker.sh up)"
    bash "$HACK_DIR/docker.sh" up
fi
step "docker run --rm --runtime=migrun busybox:local echo hello from migrun"
timeout 120 docker run --rm --runtime=migrun busybox:local echo hello from migrun \
    || die "docker run with --runtime=migrun failed"

# -------------------------------------------------------------- helpers
# count_of FILE: the counter in FILE (retried: the container rewrites it
# every 50 ms, so a read can land between truncate and write).
count_of() {
    local f=$1 v="" _
    for _ in $(seq 1 50); do
        v="$(tr -dc 0-9 <"$f" 2>/dev/null || true)"
        [[ -n $v ]] && break
        sleep 0.02
    done
    [[ -n $v ]] || die "cannot read the counter from $f"
    echo "$v"
}

# show_counter FILE LABEL: three readings, 0.5 s apart, on one line;
# sets LAST_COUNT.
LAST_COUNT=0
show_counter() {
    local f=$1 label=$2 a b c
    a="$(count_of "$f")"; sleep 0.5
    b="$(count_of "$f")"; sleep 0.5
    c="$(count_of "$f")"
    echo "  $label: $a -> $b -> $c   ($f)"
    ((c > a)) || die "the counter in $f does not move ($a, $b, $c)"
    LAST_COUNT=$c
}

# start_migrate_in NS ADDR ROOT WORKDIR LOG: a one-shot migrate-in in the
# background (IN_PID), back once it listens on ADDR:PORT.
start_migrate_in() {
    local ns=$1 addr=$2 root=$3 workdir=$4 logf=$5 busy
    busy="$(in_host "$ns" ss -Hltnp src "$addr:$PORT" 2>/dev/null || true)"
    [[ -z $busy ]] || die "$addr:$PORT in $ns is already taken: $busy"
    # timeout bounds it even if the source never comes
    timeout -k 10 $((MIGRATE_TIMEOUT + 60)) nsenter --net="/run/netns/$ns" -- \
        "$MIGRUN_BIN" --root "$root" migrate-in --listen "$addr:$PORT" \
        --key "$WORK/demo.key" --once --work-dir "$workdir" >"$logf" 2>&1 &
    IN_PID=$!
    IN_LOG=$logf
    local deadline=$((SECONDS + 15))
    # ready: it says so, and the socket is there
    until grep -q "listening on $addr:$PORT" "$logf" 2>/dev/null \
        && [[ -n "$(in_host "$ns" ss -Hltn src "$addr:$PORT" 2>/dev/null)" ]]; do
        if ! kill -0 "$IN_PID" 2>/dev/null; then
            local rc=0
            wait "$IN_PID" || rc=$?
            IN_PID=""
            indent <"$logf" >&2
            die "migrate-in in $ns exited (status $rc) before listening on $addr:$PORT"
        fi
        ((SECONDS < deadline)) || { indent <"$logf" >&2; die "migrate-in in $ns does not listen on $addr:$PORT after 15 s"; }
        sleep 0.1
    done
    echo "  migrate-in listening on $addr:$PORT in $ns (pid $IN_PID, --root $root)"
}

# finish_migrate_in LOG: waits for the one-shot migrate-in (bounded by its
# timeout wrapper) and shows its output; fails if it failed.
finish_migrate_in() {
    local logf=$1 rc=0
    wait "$IN_PID" || rc=$?
    IN_PID=""
    echo "  migrate-in said:"
    indent <"$logf"
    ((rc == 0)) || die "migrate-in failed (exit status $rc; 124 = timed out)"
}

# migrate_out NS ROOT TO STATS LOG [OPTIONS...]: prints the progress lines
# and the summary as they come.
migrate_out() {
    local ns=$1 root=$2 to=$3 stats=$4 logf=$5 workdir=$6; shift 6
    echo "  \$ migrun --root $root migrate-out $CID --to $to $* (in $ns)"
    local rc=0
    timeout -k 10 "$MIGRATE_TIMEOUT" nsenter --net="/run/netns/$ns" -- \
        "$MIGRUN_BIN" --root "$root" migrate-out "$CID" --to "$to" \
        --key "$WORK/demo.key" --stats-json "$stats" --work-dir "$workdir" "$@" \
        2>&1 | tee "$logf" | indent || rc=$?
    if ((rc != 0)); then
        if [[ -n $IN_PID ]]; then
            # give the target a moment to report, then stop it
            wait_until 5 bash -c "! kill -0 $IN_PID 2>/dev/null || grep -q 'failed' '$IN_LOG'" || true
            kill -TERM "$IN_PID" 2>/dev/null || true
            wait "$IN_PID" 2>/dev/null || true
            IN_PID=""
            { echo "  migrate-in on the target said:"; indent <"$IN_LOG"; } >&2
        fi
        local st
        st="$(mr --root "$root" state "$CID" 2>&1 | jq -r '"\(.status), pid \(.pid)"' 2>/dev/null)" || st="unknown"
        warn "source container $CID under $root after the failure: ${st:-gone}"
        die "migrate-out from $ns failed (exit status $rc; 124 = timed out after ${MIGRATE_TIMEOUT}s)"
    fi
    [[ -s $stats ]] || die "migrate-out succeeded but wrote no $stats"
}

# rootfs_of ROOT: the container's rootfs as migrun's state reports it.
rootfs_of() {
    local root=$1 r
    r="$(mr --root "$root" state "$CID" | jq -r .rootfs)" \
        || die "migrun --root $root state $CID failed"
    [[ -n $r && $r != null && -d $r ]] || die "state of $CID under $root has no usable rootfs ('$r')"
    echo "$r"
}

# ------------------------------------------------------------- testbed
FAILED_AT="testbed"
step "network testbed: host A, host B and a client in network namespaces"
bash "$TESTBED" up
eval "$(bash "$TESTBED" env)"
ADDR_A=$TESTBED_ADDR_A
ADDR_B=$TESTBED_ADDR_B
NS_A=$TESTBED_NS_A
NS_B=$TESTBED_NS_B
echo "  host A: $NS_A $ADDR_A    host B: $NS_B $ADDR_B    (bridge mr-br0 in $TESTBED_NS_SWITCH)"
ip -n "$NS_A" -br addr show dev eth0 | indent
in_host "$NS_A" tc qdisc show dev eth0 | grep -E 'tbf|netem' | sed "s/^/  $NS_A egress: /"

# Leftovers of an interrupted run.
for root in "$ROOT_A" "$ROOT_B"; do
    if [[ -d $root ]] && mr --root "$root" state "$CID" >/dev/null 2>&1; then
        warn "removing leftover container $CID under $root"
        timeout 30 "$MIGRUN_BIN" --root "$root" delete -f "$CID" >/dev/null 2>&1 || true
    fi
done
rm -rf --one-file-system "$IN_A" "$IN_B" "$OUT_A" "$OUT_B"

WORK="$(mktemp -d /tmp/migrun-demo.XXXXXX)"
mr keygen --out "$WORK/demo.key" >/dev/null
echo "  shared key: $WORK/demo.key (migrun keygen)"

# ------------------------------------------------------------ container
FAILED_AT="starting the counter on host A"
step "a counter container on host A (migrun --root $ROOT_A)"
bash "$HACK_DIR/mkbundle.sh" "$WORK/bundle" \
    sh -c 'i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.05; done' \
    >"$WORK/mkbundle.log" 2>&1 || { cat "$WORK/mkbundle.log" >&2; die "mkbundle.sh failed"; }
echo "  \$ migrun --root $ROOT_A run -d -b $WORK/bundle $CID"
# stdio: /dev/null only (CRIU cannot migrate a terminal or a log file);
# migrun's own messages go to --log.
if ! timeout 30 "$MIGRUN_BIN" --root "$ROOT_A" --log "$WORK/run-a.log" \
    run -d -b "$WORK/bundle" "$CID" </dev/null >/dev/null 2>&1; then
    indent <"$WORK/run-a.log" >&2
    die "migrun run on host A failed"
fi
COUNT_A="$WORK/bundle/rootfs/count"
wait_until 15 test -s "$COUNT_A" || die "the counter did not start ($COUNT_A is missing after 15 s)"
mr --root "$ROOT_A" list | indent
show_counter "$COUNT_A" "counter on A"

# ------------------------------------------------------ live migration
FAILED_AT="live migration A -> B"
step "live migration (pre-copy) of $CID: host A -> host B ($ADDR_B:$PORT)"
start_migrate_in "$NS_B" "$ADDR_B" "$ROOT_B" "$IN_B" "$WORK/live.in.log"
before="$(count_of "$COUNT_A")"
echo "  counter on A just before: $before"
migrate_out "$NS_A" "$ROOT_A" "$ADDR_B:$PORT" "$WORK/live.json" "$WORK/live.out.log" "$OUT_A"
finish_migrate_in "$WORK/live.in.log"

FAILED_AT="checking $CID on host B"
step "after the migration"
if mr --root "$ROOT_A" state "$CID" >/dev/null 2>&1; then
    die "$CID is still known under $ROOT_A after migrating away"
fi
echo "  host A (--root $ROOT_A): $CID is gone"
st="$(mr --root "$ROOT_B" state "$CID" | jq -r '"\(.id) \(.status), pid \(.pid)"')" \
    || die "migrun --root $ROOT_B state $CID failed after the migration"
echo "  host B (--root $ROOT_B): $st"
mr --root "$ROOT_B" list | indent
ROOTFS_B="$(rootfs_of "$ROOT_B")"
show_counter "$ROOTFS_B/count" "counter on B"
((LAST_COUNT > before)) \
    || die "the counter on B ($LAST_COUNT) is not past the one on A before the migration ($before): restarted?"
echo "  it went on from $before (A, before) to $LAST_COUNT (B): not restarted"
echo "  \$ migrun --root $ROOT_B exec $CID cat /count"
exec_out="$(timeout 30 "$MIGRUN_BIN" --root "$ROOT_B" exec "$CID" cat /count </dev/null 2>"$WORK/exec.err")" \
    || { indent <"$WORK/exec.err" >&2; die "migrun exec on host B failed"; }
echo "$exec_out" | indent

# ------------------------------------------------------- stop-and-copy
FAILED_AT="stop-and-copy migration B -> A"
step "stop-and-copy (--no-precopy) of $CID back: host B -> host A ($ADDR_A:$PORT)"
start_migrate_in "$NS_A" "$ADDR_A" "$ROOT_A" "$IN_A" "$WORK/stop.in.log"
before="$(count_of "$ROOTFS_B/count")"
echo "  counter on B just before: $before"
migrate_out "$NS_B" "$ROOT_B" "$ADDR_A:$PORT" "$WORK/stop.json" "$WORK/stop.out.log" "$OUT_B" --no-precopy
finish_migrate_in "$WORK/stop.in.log"
FAILED_AT="checking $CID back on host A"
if mr --root "$ROOT_B" state "$CID" >/dev/null 2>&1; then
    die "$CID is still known under $ROOT_B after migrating away"
fi
st="$(mr --root "$ROOT_A" state "$CID" | jq -r '"\(.id) \(.status), pid \(.pid)"')" \
    || die "migrun --root $ROOT_A state $CID failed after the migration"
echo "  host A (--root $ROOT_A): $st; host B: $CID is gone"
ROOTFS_A="$(rootfs_of "$ROOT_A")"
show_counter "$ROOTFS_A/count" "counter on A"
((LAST_COUNT > before)) || die "the counter on A ($LAST_COUNT) is not past $before: restarted?"

# ----------------------------------------------------------- comparison
FAILED_AT="comparison"
step "pre-copy (A -> B) vs stop-and-copy (B -> A)"
row() {   # row LABEL JQ_EXPR
    printf '  %-22s %18s %18s\n' "$1" \
        "$(jq -r "$2" "$WORK/live.json")" "$(jq -r "$2" "$WORK/stop.json")"
}
ms='(. * 10 | round / 10 | tostring) + " ms"'
bytes='if . >= 1048576 then ((. / 1048576 * 100 | round / 100 | tostring) + " MiB")
       else ((. / 1024 * 10 | round / 10 | tostring) + " KiB") end'
printf '  %-22s %18s %18s\n' "" "pre-copy" "stop-and-copy"
row "downtime" ".downtime_ms | $ms"
row "total" ".total_ms | $ms"
row "  of which CRIU dump" ".criu_dump_ms | $ms"
row "pre-copy rounds" ".precopy_rounds"
row "bytes sent" ".bytes_total | $bytes"
row "  during downtime" ".bytes_downtime | $bytes"
row "dirty tracking" ".dirty_tracking"
row "throttled" ".throttled"
echo "  (link: $(in_host "$NS_A" tc qdisc show dev eth0 | grep -oE 'rate [^ ]+' | head -n1) each way;" \
    "$(if in_host "$NS_A" tc qdisc show | grep -q netem; then echo "netem delay on"; else echo "no delay emulation (no netem in this kernel)"; fi))"

FAILED_AT="cleanup"
step "cleanup"
timeout 30 "$MIGRUN_BIN" --root "$ROOT_A" delete -f "$CID" || die "migrun --root $ROOT_A delete -f $CID failed"
echo "  deleted $CID on host A; taking the testbed down"
FAILED_AT=""
echo
echo "demo OK"
