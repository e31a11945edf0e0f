#!/usr/bin/env bash
# make demo: a container through Docker with --runtime=migrun, then a live
# migration of a web service between two "hosts" of the network test bed
# (hack/testbed.sh), while a client keeps requesting from it:
#   1. a busybox httpd container runs on host A (migrun --root /run/mr-demo-a)
#      with the service address 10.77.0.100 on the test bed's L2 segment
#      (hack/netctr.sh: a veth on host A's bridge mrbr)
#   2. a client in the client namespace requests http://10.77.0.100/ in a loop
#   3. the container is live-migrated (pre-copy) to host B over 10.77.0.2:7070
#      (migrate-in --bridge mrbr in mr-host-b, migrate-out in mr-host-a):
#      its network namespace comes along, B plugs it into its bridge and
#      announces the address (gratuitous ARP)
#   4. the migration's figures and the client's view (requests, failures,
#      longest stall) are printed
# Everything it made is removed at the end (container, state dirs, the
# test bed); the project's dockerd is left running.
# Environment: MIGRUN_BIN (default <repo>/target/release/migrun),
#   DEMO_MIGRATE_TIMEOUT (seconds one migration may take, default 120),
#   DEMO_ADDR (service address, default 10.77.0.100),
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
SERVICE_ADDR="${DEMO_ADDR:-10.77.0.100}"
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
CLIENT_PID=""
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
    if [[ -n $CLIENT_PID ]] && kill -0 "$CLIENT_PID" 2>/dev/null; then
        kill -TERM "$CLIENT_PID" 2>/dev/null
        wait "$CLIENT_PID" 2>/dev/null
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
# The client: requests http://ADDR/ in a loop from the client namespace
# until the file STOP exists; keeps its figures in PROGRESS (answers so
# far) and, at the end, OUT (JSON). A request fails when it errs or times
# out (20 s) or the body is not the page; a stall is the time between two
# answers.
write_client() {
    cat >"$1" <<'PY'
import json, os, socket, sys, time
addr, marker, stop, progress, out = sys.argv[1:6]
requests = answers = 0
failures = []
longest = 0.0
last = time.monotonic()
while not os.path.exists(stop):
    requests += 1
    try:
        with socket.create_connection((addr, 80), timeout=20) as s:
            s.settimeout(20)
            s.sendall(b"GET / HTTP/1.0\r\nHost: service\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        if marker.encode() in data:
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now
            answers += 1
        else:
            failures.append("unexpected answer %r" % data[:80])
    except OSError as e:
        failures.append(str(e))
    with open(progress + ".tmp", "w") as f:
        f.write("%d %d\n" % (answers, len(failures)))
    os.replace(progress + ".tmp", progress)
    time.sleep(0.01)
with open(out, "w") as f:
    json.dump({"requests": requests, "answers": answers, "failures": failures,
               "longest_stall_ms": round(longest * 1000, 1)}, f)
PY
}

# answers: what the client has had answered so far.
answers() { awk '{print $1}' "$WORK/client.progress" 2>/dev/null || echo 0; }

# ------------------------------------------------------------- testbed
FAILED_AT="testbed"
step "network test bed: host A, host B and a client in network namespaces"
bash "$TESTBED" up
eval "$(bash "$TESTBED" env)"
ADDR_A=$TESTBED_ADDR_A
ADDR_B=$TESTBED_ADDR_B
NS_A=$TESTBED_NS_A
NS_B=$TESTBED_NS_B
NS_C=$TESTBED_NS_CLIENT
BR=$TESTBED_HOST_BRIDGE
echo "  host A: $NS_A $ADDR_A    host B: $NS_B $ADDR_B    client: $NS_C $TESTBED_ADDR_CLIENT"
echo "  one L2 segment: bridge mr-br0 in $TESTBED_NS_SWITCH; each host's address is on its own bridge $BR"
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
FAILED_AT="starting the web server on host A"
step "a busybox httpd container on host A, service address $SERVICE_ADDR"
PAGE="hello from the migrated container"
bash "$HACK_DIR/mkbundle.sh" "$WORK/bundle" \
    sh -c "mkdir -p /www && echo '$PAGE' > /www/index.html && exec httpd -f -p 80 -h /www" \
    >"$WORK/mkbundle.log" 2>&1 || { cat "$WORK/mkbundle.log" >&2; die "mkbundle.sh failed"; }
echo "  \$ migrun --root $ROOT_A run -d -b $WORK/bundle $CID"
# stdio: /dev/null only (CRIU cannot migrate a terminal or a log file);
# migrun's own messages go to --log.
if ! timeout 30 "$MIGRUN_BIN" --root "$ROOT_A" --log "$WORK/run-a.log" \
    run -d -b "$WORK/bundle" "$CID" </dev/null >/dev/null 2>&1; then
    indent <"$WORK/run-a.log" >&2
    die "migrun run on host A failed"
fi
echo "  \$ hack/netctr.sh attach $ROOT_A $CID $SERVICE_ADDR/$TESTBED_PREFIX $NS_A"
MIGRUN_BIN="$MIGRUN_BIN" bash "$HACK_DIR/netctr.sh" attach "$ROOT_A" "$CID" \
    "$SERVICE_ADDR/$TESTBED_PREFIX" "$NS_A" 2>&1 | indent
wait_until 10 in_host "$NS_C" busybox wget -q -O /dev/null "http://$SERVICE_ADDR/" \
    || die "http://$SERVICE_ADDR/ does not answer from $NS_C"
echo "  from the client: $(in_host "$NS_C" busybox wget -q -O - "http://$SERVICE_ADDR/")"

FAILED_AT="starting the client"
step "a client in $NS_C requesting http://$SERVICE_ADDR/ in a loop"
write_client "$WORK/client.py"
in_host "$NS_C" python3 "$WORK/client.py" "$SERVICE_ADDR" "$PAGE" "$WORK/client.stop" \
    "$WORK/client.progress" "$WORK/client.json" &
CLIENT_PID=$!
wait_until 10 bash -c "(( \$(awk '{print \$1}' '$WORK/client.progress' 2>/dev/null || echo 0) >= 20 ))" \
    || die "the client gets no answers"
echo "  $(answers) answers so far"

# ------------------------------------------------------ live migration
FAILED_AT="live migration A -> B"
step "live migration (pre-copy) of $CID: host A -> host B ($ADDR_B:$PORT), the client still requesting"
busy="$(in_host "$NS_B" ss -Hltnp src "$ADDR_B:$PORT" 2>/dev/null || true)"
[[ -z $busy ]] || die "$ADDR_B:$PORT in $NS_B is already taken: $busy"
echo "  \$ migrun --root $ROOT_B migrate-in --listen $ADDR_B:$PORT --bridge $BR --once (in $NS_B)"
timeout -k 10 $((MIGRATE_TIMEOUT + 60)) nsenter --net="/run/netns/$NS_B" -- \
    "$MIGRUN_BIN" --root "$ROOT_B" migrate-in --listen "$ADDR_B:$PORT" --bridge "$BR" \
    --key "$WORK/demo.key" --once --work-dir "$IN_B" >"$WORK/in.log" 2>&1 &
IN_PID=$!
wait_until 15 grep -q "listening on $ADDR_B:$PORT" "$WORK/in.log" \
    || { indent <"$WORK/in.log" >&2; die "migrate-in in $NS_B does not listen on $ADDR_B:$PORT"; }
before="$(answers)"
echo "  \$ migrun --root $ROOT_A migrate-out $CID --to $ADDR_B:$PORT (in $NS_A)"
rc=0
timeout -k 10 "$MIGRATE_TIMEOUT" nsenter --net="/run/netns/$NS_A" -- \
    "$MIGRUN_BIN" --root "$ROOT_A" migrate-out "$CID" --to "$ADDR_B:$PORT" \
    --key "$WORK/demo.key" --stats-json "$WORK/live.json" --work-dir "$OUT_A" \
    2>&1 | tee "$WORK/out.log" | indent || rc=$?
if ((rc != 0)); then
    wait_until 5 bash -c "! kill -0 $IN_PID 2>/dev/null" || true
    { echo "  migrate-in on the target said:"; indent <"$WORK/in.log"; } >&2
    die "migrate-out failed (exit status $rc; 124 = timed out after ${MIGRATE_TIMEOUT}s)"
fi
rc=0
wait "$IN_PID" || rc=$?
IN_PID=""
echo "  migrate-in said:"
indent <"$WORK/in.log"
((rc == 0)) || die "migrate-in failed (exit status $rc)"

FAILED_AT="checking the service on host B"
step "after the migration"
mr --root "$ROOT_A" state "$CID" >/dev/null 2>&1 && die "$CID is still known under $ROOT_A"
echo "  host A (--root $ROOT_A): $CID is gone"
st="$(mr --root "$ROOT_B" state "$CID" | jq -r '"\(.id) \(.status), pid \(.pid)"')" \
    || die "migrun --root $ROOT_B state $CID failed after the migration"
echo "  host B (--root $ROOT_B): $st"
echo "  host B's bridge $BR: $(ip -n "$NS_B" -o link show master "$BR" | awk -F': ' '{print $2}' | tr '\n' ' ')"
wait_until 30 bash -c "(( \$(awk '{print \$1}' '$WORK/client.progress') >= $before + 50 ))" \
    || die "the client gets no answers after the migration"
touch "$WORK/client.stop"
wait "$CLIENT_PID" || die "the client failed"
CLIENT_PID=""
echo "  \$ migrun --root $ROOT_B exec $CID sh -c 'echo served on B > /www/index.html'"
timeout 30 "$MIGRUN_BIN" --root "$ROOT_B" exec "$CID" sh -c 'echo served on B > /www/index.html' </dev/null \
    || die "migrun exec on host B failed"
echo "  from the client: $(in_host "$NS_C" busybox wget -q -O - "http://$SERVICE_ADDR/")"

# ------------------------------------------------------------- figures
FAILED_AT="figures"
step "the migration's figures (migrate-out --stats-json) and the client's view"
jq -r '"  downtime            \(.downtime_ms * 10 | round / 10) ms
  total time          \(.total_ms * 10 | round / 10) ms
  CRIU dump           \(.criu_dump_ms * 10 | round / 10) ms
  pre-copy rounds     \(.precopy_rounds)
  bytes sent          \(.bytes_total / 1048576 * 100 | round / 100) MiB (\(.bytes_downtime / 1024 | round) KiB during the downtime)
  dirty tracking      \(.dirty_tracking)"' "$WORK/live.json"
jq -r '"  client requests     \(.requests)
  failed requests     \(.failures | length)
  longest stall       \(.longest_stall_ms) ms (between two answers)"' "$WORK/client.json"
failed="$(jq '.failures | length' "$WORK/client.json")"
((failed == 0)) || { jq -r '.failures[]' "$WORK/client.json" | indent >&2; die "$failed requests failed"; }
echo "  (link: $(in_host "$NS_A" tc qdisc show dev eth0 | grep -oE 'rate [^ ]+' | head -n1) each way;" \
    "new connections wait for the service to arrive: their SYNs are dropped and sent again after 1 s)"

FAILED_AT="cleanup"
step "cleanup"
timeout 30 "$MIGRUN_BIN" --root "$ROOT_B" delete -f "$CID" || die "migrun --root $ROOT_B delete -f $CID failed"
echo "  deleted $CID on host B; taking the test bed down"
FAILED_AT=""
echo
echo "demo OK"
