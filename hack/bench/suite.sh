#!/usr/bin/env bash
# Usage: hack/bench/suite.sh [--quick]      (make bench / make bench-quick)
# The live-migration benchmark suite, on the test bed (hack/testbed.sh:
# hosts mr-host-a 10.77.0.1 and mr-host-b 10.77.0.2 as network namespaces,
# links shaped with tbf). Three parts:
#   ways    every scenario migrated three ways, BENCH_RUNS times each, at
#           BENCH_RATE: migrun pre-copy, migrun --no-precopy (stop-and-copy),
#           and by hand (`migrun checkpoint`, image dir + upper dir +
#           config.json through the link with tar | socat, `migrun restore`
#           on the other host: the route Docker offers with checkpoint
#           create / copy / start --checkpoint)
#   dirty   the dirtier (tests/programs/dirtier.c) with BENCH_DIRTY_MIB MiB
#           at each of BENCH_DIRTY_RATES MiB/s, pre-copy and stop-and-copy
#   link    the dirtier (BENCH_LINK_MIB MiB at BENCH_LINK_DIRTY MiB/s) at each
#           of BENCH_LINKS, pre-copy and stop-and-copy
# Scenarios (images from hack/bench/images.sh, overlay root filesystems):
#   idle     busybox `sleep`
#   static   nginx serving 300 files of 1-64 KiB
#   dynamic  a python3 app server computing each answer (keep-alive)
#   cgi      busybox httpd + a CGI shell script that computes each answer,
#            a connection per request (not in the default list: CRIU
#            refuses connections in the accept queue, see docs/benchmarks.md)
#   cpu      sysbench cpu + stress-ng (--cpu 1 --cpu-load 40, --vm 64 MiB)
#   redis    redis-server filled to about BENCH_REDIS_MIB MiB with
#            redis-benchmark, under a SET load of BENCH_REDIS_SETS/s (1 KiB)
#   mem      the dirtier, BENCH_DIRTY_MIB MiB at BENCH_MEM_DIRTY MiB/s
# The client (hack/bench/loadgen.py) runs from the root namespace inside the
# container's network namespace (re-resolved with `migrun state` when the
# container moves; failures and stalls count as downtime seen by the
# client), or, with BENCH_SERVICE_ADDR=IP set, in mr-client against IP.
# Every migration writes RESULTS/runs/PART-SCENARIO-WAY-RUN.json; at the end
# hack/bench/report.py writes RESULTS/summary.json, the charts (benchplot)
# and docs/benchmarks.md.
# Environment (defaults; --quick in brackets):
#   BENCH_OUT            results dir (bench/results/DATE/suite [suite-quick])
#   BENCH_RUNS           runs per figure, 3 [1]
#   BENCH_PARTS          "ways dirty link"
#   BENCH_SCENARIOS      "idle static dynamic cpu redis mem"
#   BENCH_WAYS           "pre stop hand"
#   BENCH_RATE           link rate of the ways and dirty parts, 1gbit
#   BENCH_DIRTY_MIB      1024 [256];  BENCH_DIRTY_RATES "0 16 64 256"
#   BENCH_MEM_DIRTY      64
#   BENCH_REDIS_MIB      1024 [256];  BENCH_REDIS_SETS 2000
#   BENCH_LINKS          "100mbit 1gbit 10gbit" [100mbit 1gbit]
#   BENCH_LINK_MIB       256 [64];    BENCH_LINK_DIRTY 2
#   BENCH_MIGRATE_TIMEOUT seconds per migration, 300
#   BENCH_SERVICE_ADDR   a service address to reach containers at (issue 6)
#   BENCH_DOCS           write docs/benchmarks.md and docs/img (1)
# Dirty rate 0 means "none": the dirtier gets 0.0001 MiB/s (its own 0 is
# "as fast as the CPU allows").
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

QUICK=0
case ${1:-} in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,47s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac
q() { if ((QUICK)); then echo "$2"; else echo "$1"; fi; }

DATE=$(date +%F)
OUT=${BENCH_OUT:-$REPO_ROOT/bench/results/$DATE/$(q suite suite-quick)}
RUNS=${BENCH_RUNS:-$(q 3 1)}
read -r -a PARTS <<<"${BENCH_PARTS:-ways dirty link}"
read -r -a SCENARIOS <<<"${BENCH_SCENARIOS:-idle static dynamic cpu redis mem}"
read -r -a WAYS <<<"${BENCH_WAYS:-pre stop hand}"
RATE=${BENCH_RATE:-1gbit}
DIRTY_MIB=${BENCH_DIRTY_MIB:-$(q 1024 256)}
read -r -a DIRTY_RATES <<<"${BENCH_DIRTY_RATES:-0 16 64 256}"
MEM_DIRTY=${BENCH_MEM_DIRTY:-64}
REDIS_MIB=${BENCH_REDIS_MIB:-$(q 1024 256)}
REDIS_SETS=${BENCH_REDIS_SETS:-2000}
WEB_RATE=${BENCH_WEB_RATE:-1000}
CGI_RATE=${BENCH_CGI_RATE:-100}
read -r -a LINKS <<<"${BENCH_LINKS:-$(q "100mbit 1gbit 10gbit" "100mbit 1gbit")}"
LINK_MIB=${BENCH_LINK_MIB:-$(q 256 64)}
LINK_DIRTY=${BENCH_LINK_DIRTY:-2}
MIGRATE_TIMEOUT=${BENCH_MIGRATE_TIMEOUT:-300}
SERVICE_ADDR=${BENCH_SERVICE_ADDR:-}
WRITE_DOCS=${BENCH_DOCS:-1}
PORT=7272
COPY_PORT=7300
COPY_N=0
PRE_S=1.5       # client baseline before a migration
POST_S=2        # client after it
export PATH="/usr/local/sbin:/usr/local/bin:$PATH"
MIGRUN_BIN=${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}
BENCHPLOT_BIN=${BENCHPLOT_BIN:-$REPO_ROOT/target/release/benchplot}
IMAGES=${BENCH_IMAGES:-/var/cache/migrun/bench-images}

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, got '$RUNS'"
require_root
need_cmd jq nsenter timeout ss python3 socat tar mount umount redis-benchmark redis-cli
[[ -x $MIGRUN_BIN ]] || die "migrun binary $MIGRUN_BIN not found (make build)"
command -v criu >/dev/null || die "criu not found (hack/install-deps.sh)"

TESTBED="$HACK_DIR/testbed.sh"
eval "$(bash "$TESTBED" env)"
declare -A NS=([a]=$TESTBED_NS_A [b]=$TESTBED_NS_B) ADDR=([a]=$TESTBED_ADDR_A [b]=$TESTBED_ADDR_B)
declare -A ROOT=([a]=/run/mr-suite-a [b]=/run/mr-suite-b)
declare -A INDIR=([a]=/run/mr-suite-a-in [b]=/run/mr-suite-b-in)
declare -A OUTDIR=([a]=/run/mr-suite-a-out [b]=/run/mr-suite-b-out)
LOADGEN="$HACK_DIR/bench/loadgen.py"

testbed_was_up=1
for ns in "$TESTBED_NS_A" "$TESTBED_NS_B" "$TESTBED_NS_CLIENT" "$TESTBED_NS_SWITCH"; do
    [[ -e /run/netns/$ns ]] || testbed_was_up=0
done

WORK=""
IN_PID=""
CLIENT_PID=""
failures=0
mr() { "$MIGRUN_BIN" "$@"; }
tail_of() { [[ -s $1 ]] && tail -n 4 "$1" | tr '\n' ' ' | sed 's/ *$//'; }
now() { date +%s.%N; }

# ------------------------------------------------------------- cleanup
delete_all() {
    local root=$1 id
    [[ -d $root ]] || return 0
    for id in $(mr --root "$root" list -q 2>/dev/null); do
        timeout 30 "$MIGRUN_BIN" --root "$root" delete -f "$id" >/dev/null 2>&1 \
            || warn "migrun --root $root delete -f $id failed"
    done
}

# unmount_under DIR: every mount below DIR, deepest first.
unmount_under() {
    local m
    awk -v d="$1/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r \
        | while read -r m; do umount "$(printf '%b' "$m")" 2>/dev/null || umount -l "$(printf '%b' "$m")" 2>/dev/null || true; done
}

remove_suite_dirs() {
    local d
    for d in /run/mr-suite-*; do
        [[ -e $d ]] || continue
        unmount_under "$d"
        rm -rf --one-file-system "$d" || warn "cannot remove $d"
    done
}

# migrate-in puts containers under /migrun-TAG/ID (TAG: FNV-1a of --root),
# delete leaves /migrun-TAG: removed here if empty.
remove_parent_cgroups() {
    local root tag d
    for root in "${ROOT[a]}" "${ROOT[b]}"; do
        tag="$(python3 -c '
import sys
h = 2166136261
for b in sys.argv[1].encode():
    h = ((h ^ b) * 16777619) & 0xffffffff
print(f"migrun-{h:08x}")' "$root")" || continue
        for d in /sys/fs/cgroup/"$tag" /sys/fs/cgroup/*/"$tag"; do
            if [[ -d $d ]]; then rmdir "$d" 2>/dev/null || true; fi
        done
    done
}

stop_bg() {
    local pid=$1
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_until 15 bash -c "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    stop_bg "$IN_PID"
    stop_bg "$CLIENT_PID"
    delete_all "${ROOT[a]}"
    delete_all "${ROOT[b]}"
    [[ -z $WORK ]] || unmount_under "$WORK"
    remove_suite_dirs
    remove_parent_cgroups
    if ((testbed_was_up)); then
        log "the test bed was up before: left up (shaped to ${CUR_RATE:-$RATE})"
    else
        bash "$TESTBED" down >/dev/null 2>&1 || warn "'$TESTBED down' failed"
    fi
    [[ -z $WORK ]] || rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------- test bed
CUR_RATE=""
testbed_rate() {
    local rate=$1 burst=64kb
    [[ $rate != "$CUR_RATE" ]] || return 0
    # tbf needs a bucket of at least rate/HZ: 64 KiB is too small for 10gbit
    case $rate in *gbit) burst=$(python3 -c "import sys; g = float(sys.argv[1][:-4]); print(64 if g <= 1 else int(g * 160))" "$rate")kb ;; esac
    log "test bed: TESTBED_RATE=$rate TESTBED_BURST=$burst hack/testbed.sh up"
    TESTBED_RATE=$rate TESTBED_BURST=$burst bash "$TESTBED" up 2>&1 | sed 's/^/    /' >&2 \
        || die "hack/testbed.sh up failed"
    CUR_RATE=$rate
}
# link_bytes: bytes received + sent on host A's eth0 so far.
link_bytes() {
    nsenter --net="/run/netns/${NS[a]}" -- cat /proc/net/dev \
        | awk -F'[: ]+' '$2 == "eth0" {print $3 + $11}'
}
rate_bps() {
    python3 -c '
import re, sys
m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", sys.argv[1].lower())
print(int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]))' "$1"
}

# ------------------------------------------------------------- containers
# The container lives on host LOC (a|b) under ${ROOT[$LOC]}; its bundle is
# BUNDLE (ours, or migrate-in's incoming dir, or a by-hand copy).
LOC=a
BUNDLE=""

# make_bundle DIR IMAGE ARGS...: an overlay bundle: DIR/rootfs = IMAGE's
# rootfs below DIR/upper; config.json from `runc spec` (no terminal).
make_bundle() {
    local dir=$1 image=$2; shift 2
    mkdir -p "$dir"/{upper,work,rootfs}
    mount -t overlay overlay -o "lowerdir=$IMAGES/$image/rootfs,upperdir=$dir/upper,workdir=$dir/work" "$dir/rootfs" \
        || { echo "mounting the overlay of $image failed"; return 1; }
    local tmp
    tmp="$(mktemp -d)"
    runc spec --bundle "$tmp"
    jq --argjson args "$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@")" \
        '.process.terminal = false | .process.args = $args | .root.path = "rootfs" | .root.readonly = false
         | .process.env += ["HOME=/root"]' "$tmp/config.json" >"$dir/config.json"
    rm -rf "$tmp"
    # kept for the by-hand route, which sends it along
    cp "$dir/config.json" "$WORK/config-$(basename "$dir").json"
}

# release_bundle DIR: a bundle the container left (on the other host now).
release_bundle() {
    local dir=$1
    [[ -n $dir && -d $dir ]] || return 0
    unmount_under "$dir"
    umount "$dir/rootfs" 2>/dev/null || true
    rm -rf --one-file-system "$dir" 2>/dev/null || true
}

cpid() { mr --root "${ROOT[$LOC]}" state "$1" 2>/dev/null | jq -r .pid; }
in_ct() { local id=$1; shift; nsenter --net="/proc/$(cpid "$id")/ns/net" -- "$@"; }

# start_migrate_in SIDE LOG: migrate-in --once on SIDE, back when it listens.
start_migrate_in() {
    local side=$1 logf=$2 ns=${NS[$1]} addr=${ADDR[$1]}
    timeout -k 10 $((MIGRATE_TIMEOUT + 60)) nsenter --net="/run/netns/$ns" -- \
        "$MIGRUN_BIN" --root "${ROOT[$side]}" migrate-in --listen "$addr:$PORT" \
        --key "$WORK/bench.key" --once --work-dir "${INDIR[$side]}" >"$logf" 2>&1 &
    IN_PID=$!
    local deadline=$((SECONDS + 15))
    until grep -q "listening on $addr:$PORT" "$logf" 2>/dev/null; do
        kill -0 "$IN_PID" 2>/dev/null || { IN_PID=""; echo "migrate-in exited: $(tail_of "$logf")"; return 1; }
        ((SECONDS < deadline)) || { stop_bg "$IN_PID"; IN_PID=""; echo "migrate-in does not listen"; return 1; }
        sleep 0.05
    done
}

# ------------------------------------------------------------- the client
# start_client SCENARIO ID FILE: the load generator for SCENARIO, if any.
start_client() {
    local s=$1 id=$2 f=$3 a=()
    case $s in
        static) a=(--proto http --port 8080 --path '/f{n:03d}.html' --path-count 300 --conns 4 --rate "$WEB_RATE") ;;
        dynamic) a=(--proto http --port 8080 --path /app --query --conns 4 --rate "$CGI_RATE") ;;
        cgi) a=(--proto http --port 8080 --path /cgi-bin/app --query --conns 4 --rate "$CGI_RATE") ;;
        redis) a=(--proto redis --port 6379 --conns 4 --rate "$REDIS_SETS" --keys "$REDIS_KEYS" --value-size 1000) ;;
        *) return 0 ;;
    esac
    if [[ -n $SERVICE_ADDR ]]; then
        a+=(--host "$SERVICE_ADDR")
        nsenter --net="/run/netns/$TESTBED_NS_CLIENT" -- python3 "$LOADGEN" "${a[@]}" --out "$f" --ready-file "$f.ready" 2>"$f.log" &
    else
        a+=(--host 127.0.0.1 --migrun "$MIGRUN_BIN" --roots "${ROOT[a]},${ROOT[b]}" --id "$id")
        python3 "$LOADGEN" "${a[@]}" --out "$f" --ready-file "$f.ready" 2>"$f.log" &
    fi
    CLIENT_PID=$!
    wait_until 20 test -e "$f.ready" || { echo "the client got no answer within 20 s: $(tail_of "$f.log")"; return 1; }
}

stop_client() {
    [[ -n $CLIENT_PID ]] || return 0
    stop_bg "$CLIENT_PID"
    CLIENT_PID=""
}

# ------------------------------------------------------------- scenarios
# start_scenario SCENARIO ID [MIB RATE]: the container on host A, ready.
REDIS_KEYS=1000
start_scenario() {
    local s=$1 id=$2 mib=${3:-} drate=${4:-} image args=()
    case $s in
        idle) image=busybox; args=(sleep 1000000) ;;
        static) image=nginx; args=(nginx -c /etc/nginx/bench.conf) ;;
        dynamic) image=pyapp; args=(python3 /app/server.py) ;;
        cgi) image=cgi; args=(httpd -f -p 8080 -h /www) ;;
        cpu) image=cpu; args=(sh -c 'stress-ng --cpu 1 --cpu-load 40 --vm 1 --vm-bytes 64M --quiet --timeout 0 & exec sysbench cpu --threads=1 --time=0 --report-interval=1 run >/tmp/sysbench.log 2>&1') ;;
        redis) image=redis; args=(redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --protected-mode no --enable-debug-command yes --daemonize no) ;;
        mem|dirtier*) image=dirtier
            [[ $drate != 0 ]] || drate=0.0001
            args=(/dirtier "$mib" "$drate") ;;
        *) echo "unknown scenario $s"; return 1 ;;
    esac
    LOC=a
    BUNDLE=$WORK/bundles/$id
    make_bundle "$BUNDLE" "$image" "${args[@]}" || return 1
    timeout 30 "$MIGRUN_BIN" --root "${ROOT[a]}" --log "$OUT/logs/$id.run.log" run -d -b "$BUNDLE" "$id" </dev/null >/dev/null 2>&1 \
        || { echo "migrun run failed: $(tail_of "$OUT/logs/$id.run.log")"; return 1; }
    # the loopback of the container's netns (nginx and redis listen on it)
    in_ct "$id" ip link set lo up 2>/dev/null || true
    case $s in
        static|dynamic|cgi) wait_until 20 in_ct "$id" busybox wget -q -O /dev/null "http://127.0.0.1:8080/" \
            || { echo "the web server does not answer"; return 1; } ;;
        redis)
            wait_until 20 in_ct "$id" redis-cli -p 6379 ping || { echo "redis does not answer"; return 1; }
            # about REDIS_MIB MiB: 1000-byte values, ~1.1 KiB per key with
            # redis' overhead; redis-benchmark writes REDIS_KEYS/2 SETs to
            # random keys (~40% of REDIS_KEYS distinct), DEBUG POPULATE adds
            # key:0 .. key:REDIS_KEYS-1 (the keys the client then overwrites)
            REDIS_KEYS=$((REDIS_MIB * 1024 * 10 / 11 * 10 / 14))
            log "redis: filling (redis-benchmark, $((REDIS_KEYS / 2)) SETs of 1000 bytes, then DEBUG POPULATE $REDIS_KEYS)"
            in_ct "$id" redis-benchmark -p 6379 -q -t set -n $((REDIS_KEYS / 2)) -r "$REDIS_KEYS" -d 1000 -P 64 -c 4 >"$WORK/fill.log" 2>&1 \
                || { echo "redis-benchmark failed: $(tail_of "$WORK/fill.log")"; return 1; }
            in_ct "$id" redis-cli -p 6379 debug populate "$REDIS_KEYS" key 1000 >/dev/null
            log "redis: $(in_ct "$id" redis-cli -p 6379 info memory | tr -d '\r' | awk -F: '/^used_memory_human/ {print $2}') used, $(in_ct "$id" redis-cli -p 6379 dbsize | tr -d '\r') keys" ;;
        mem|dirtier*) wait_until 300 test -e "$BUNDLE/rootfs/ready" || { echo "the dirtier is not ready"; return 1; } ;;
        *) sleep 1 ;;
    esac
}

scenario_note() {
    case $1 in
        redis) in_ct "$2" redis-cli -p 6379 info memory | tr -d '\r' | awk -F: '/^used_memory:/ {print "used_memory=" $2}' ;;
        cpu) mr --root "${ROOT[$LOC]}" exec "$2" tail -n 40 /tmp/sysbench.log 2>/dev/null | grep -o 'eps: [0-9.]*' | awk '{print $2}' | tr '\n' ' ' ;;
    esac
}

# ------------------------------------------------------------- migrations
# migrate ID WAY TAG: moves the container from LOC to the other host.
# Leaves WORK/m.json (the figures) and updates LOC and BUNDLE.
migrate() {
    local id=$1 way=$2 tag=$3 src=$LOC dst rc=0 logs=$OUT/logs
    dst=$([[ $LOC == a ]] && echo b || echo a)
    local stats=$WORK/stats.json
    rm -f "$stats"
    M_T0=$(now)
    case $way in
        pre|stop)
            start_migrate_in "$dst" "$logs/$tag.in.log" >"$WORK/msg" || { cat "$WORK/msg"; return 1; }
            local opt=()
            [[ $way == pre ]] || opt=(--no-precopy)
            M_T0=$(now)
            timeout -k 10 "$MIGRATE_TIMEOUT" nsenter --net="/run/netns/${NS[$src]}" -- \
                "$MIGRUN_BIN" --root "${ROOT[$src]}" migrate-out "$id" --to "${ADDR[$dst]}:$PORT" \
                --key "$WORK/bench.key" --stats-json "$stats" --work-dir "${OUTDIR[$src]}" "${opt[@]}" \
                </dev/null >"$logs/$tag.out.log" 2>&1 || rc=$?
            M_T1=$(now)
            if ((rc != 0)); then
                stop_bg "$IN_PID"; IN_PID=""
                echo "migrate-out exit $rc: $(tail_of "$logs/$tag.out.log") | in: $(tail_of "$logs/$tag.in.log")"
                return 1
            fi
            wait_until 30 bash -c "! kill -0 $IN_PID 2>/dev/null" || true
            stop_bg "$IN_PID"; IN_PID=""
            rm -rf --one-file-system "${OUTDIR[$src]:?}"/* 2>/dev/null || true
            # the container's new bundle: migrate-in's incoming dir
            local nb
            nb="$(mr --root "${ROOT[$dst]}" state "$id" 2>/dev/null | jq -r .bundle)"
            [[ $BUNDLE == "$WORK"/* ]] && release_bundle "$BUNDLE"
            [[ $BUNDLE == "${INDIR[$src]}"/* ]] && rm -rf --one-file-system "$BUNDLE"
            BUNDLE=$nb ;;
        hand)
            local pid upper hd=$WORK/hand-$tag img
            pid="$(cpid "$id")"
            # the upper dir of the container's overlay root (its mount namespace's /)
            upper="$(awk '$5 == "/" && / - overlay / {print}' "/proc/$pid/mountinfo" | tail -n 1 \
                | grep -o 'upperdir=[^,]*' | cut -d= -f2)"
            upper="$(printf '%b' "$upper")"
            [[ -d $upper ]] || { echo "no overlay upper dir for $id (pid $pid)"; return 1; }
            img=$WORK/ckpt-$tag
            mkdir -p "$hd"/{upper,work,rootfs} "$img"
            # the receiver on DST first (its side of the link), in a process
            # group of its own (killed as a whole on failure); a port per copy
            COPY_N=$((COPY_N + 1))
            local cport=$((COPY_PORT + COPY_N % 100))
            setsid bash -c 'nsenter --net="/run/netns/$1" -- socat -u "TCP-LISTEN:$2,bind=$3,reuseaddr" STDOUT \
                | tar -x --xattrs --xattrs-include="trusted.*" -C "$4"' _ "${NS[$dst]}" "$cport" "${ADDR[$dst]}" "$hd" \
                2>"$logs/$tag.socat.log" &
            local rx=$!
            local kill_rx="kill -TERM -- -$rx 2>/dev/null; wait $rx 2>/dev/null"
            wait_until 5 bash -c "nsenter --net=/run/netns/${NS[$dst]} -- ss -Hltn 'sport = :$cport' | grep -q ." \
                || { eval "$kill_rx"; echo "socat does not listen"; return 1; }
            M_T0=$(now)
            timeout "$MIGRATE_TIMEOUT" "$MIGRUN_BIN" --root "${ROOT[$src]}" checkpoint --tcp-established \
                --image-path "$img" "$id" </dev/null >"$logs/$tag.checkpoint.log" 2>&1 \
                || { eval "$kill_rx"; echo "checkpoint failed: $(tail_of "$logs/$tag.checkpoint.log")"; return 1; }
            M_CK=$(now)
            # image dir + upper dir + config.json, through the link
            local ub
            ub="$(basename "$upper")"
            tar -c --xattrs --xattrs-include='trusted.*' \
                --transform "s|^ckpt-$tag|img|;s|^config-$id.json|config.json|;s|^$ub|upper|" \
                -C "$WORK" "ckpt-$tag" "config-$id.json" -C "$(dirname "$upper")" "$ub" 2>>"$logs/$tag.socat.log" \
                | nsenter --net="/run/netns/${NS[$src]}" -- socat -u STDIN "TCP:${ADDR[$dst]}:$cport" 2>>"$logs/$tag.socat.log" \
                || { eval "$kill_rx"; echo "copy failed: $(tail_of "$logs/$tag.socat.log")"; return 1; }
            wait "$rx" || { echo "receiving failed: $(tail_of "$logs/$tag.socat.log")"; return 1; }
            M_CP=$(now)
            # a stopped state of the same id left on DST by an earlier
            # migration away from it would block the restore: removed, noted
            if mr --root "${ROOT[$dst]}" state "$id" >/dev/null 2>&1; then
                warn "$tag: ${ROOT[$dst]} still knows $id ($(mr --root "${ROOT[$dst]}" state "$id" | jq -r .status)) before the restore: deleted"
                mr --root "${ROOT[$dst]}" delete -f "$id" >/dev/null 2>&1 || true
            fi
            mount -t overlay overlay -o "lowerdir=$IMG_LOWER,upperdir=$hd/upper,workdir=$hd/work" "$hd/rootfs" \
                || { echo "overlay on the target failed"; return 1; }
            nsenter --net="/run/netns/${NS[$dst]}" -- timeout "$MIGRATE_TIMEOUT" "$MIGRUN_BIN" --root "${ROOT[$dst]}" \
                restore -d --tcp-established --image-path "$hd/img" -b "$hd" "$id" \
                </dev/null >/dev/null 2>"$logs/$tag.restore.log" \
                || { echo "restore failed: $(tail_of "$logs/$tag.restore.log")"; return 1; }
            M_T1=$(now)
            mr --root "${ROOT[$src]}" delete -f "$id" >/dev/null 2>&1 || true
            rm -rf "$img" "$hd/img"
            [[ $BUNDLE == "$WORK"/* ]] && release_bundle "$BUNDLE"
            [[ $BUNDLE == "${INDIR[$src]}"/* ]] && rm -rf --one-file-system "$BUNDLE"
            BUNDLE=$hd
            python3 - "$M_T0" "$M_CK" "$M_CP" "$M_T1" >"$stats" <<'PY'
import json, sys
t0, ck, cp, t1 = map(float, sys.argv[1:])
ms = lambda a: round((a - t0) * 1000, 3)
print(json.dumps({"precopy": False, "total_ms": ms(t1), "downtime_ms": ms(t1), "precopy_rounds": 0,
                  "downtime_phases": [{"name": "checkpointed (migrun checkpoint)", "at_ms": ms(ck)},
                                      {"name": "copied (tar | socat)", "at_ms": ms(cp)},
                                      {"name": "restored (migrun restore)", "at_ms": ms(t1)}]}))
PY
            ;;
    esac
    LOC=$dst
    local st
    st="$(mr --root "${ROOT[$LOC]}" state "$id" 2>/dev/null | jq -r .status)" || st=""
    [[ $st == running ]] || { echo "$id is '${st:-missing}' on ${LOC^^} after the migration"; return 1; }
}

# one PART SCENARIO WAY RUN ID [EXTRA_JSON]: one measured migration.
one() {
    local part=$1 s=$2 way=$3 i=$4 id=$5 extra=${6:-"{}"}
    local tag=$part-$s-$way-$i f=$OUT/runs/$part-$s-$way-$i.json cf=$WORK/client.json
    local b0 b1 dir note
    rm -f "$cf" "$cf.ready"
    start_client "$s" "$id" "$cf" >"$WORK/msg" || { warn "$tag: $(cat "$WORK/msg")"; echo "$tag: $(cat "$WORK/msg")" >>"$OUT/failed.txt"; stop_client; return 1; }
    [[ -z $CLIENT_PID ]] || sleep "$PRE_S"
    dir="${LOC^^}->$([[ $LOC == a ]] && echo B || echo A)"
    b0=$(link_bytes)
    if ! migrate "$id" "$way" "$tag" >"$WORK/msg" 2>&1; then
        stop_client
        warn "$tag FAILED: $(tail -c 600 "$WORK/msg")"
        echo "$tag: $(tail -c 600 "$WORK/msg")" >>"$OUT/failed.txt"
        return 1
    fi
    b1=$(link_bytes)
    if [[ -n $CLIENT_PID ]]; then sleep "$POST_S"; fi
    stop_client
    note="$(scenario_note "$s" "$id" 2>/dev/null || true)"
    python3 - "$f" "$WORK/stats.json" "$cf" <<PY || { warn "$tag: cannot write $f"; return 1; }
import json, os, sys
f, stats_f, client_f = sys.argv[1:]
stats = json.load(open(stats_f))
client = json.load(open(client_f)) if os.path.exists(client_f) else None
r = {"part": "$part", "scenario": "$s", "way": "$way", "run": $i, "direction": "$dir",
     "link_rate": "$CUR_RATE", "link_bps": $(rate_bps "$CUR_RATE"),
     "t_start": $M_T0, "t_end": $M_T1,
     "total_ms": stats.get("total_ms"), "downtime_ms": stats.get("downtime_ms"),
     "wall_ms": round(($M_T1 - $M_T0) * 1000, 3),
     "link_bytes": $b1 - $b0, "migrun_bytes": stats.get("bytes_total"),
     "rounds": stats.get("precopy_rounds"), "downtime_phases": stats.get("downtime_phases"),
     "dirty_tracking": stats.get("dirty_tracking"), "throttled": stats.get("throttled"),
     "note": """$note""".strip(), "stats": stats, "client": client}
r.update(json.loads('''$extra'''))
r["link_share"] = round(r["link_bytes"] * 8 / (r["link_bps"] * r["wall_ms"] / 1000), 4) if r["wall_ms"] else None
json.dump(r, open(f, "w"), indent=1)
PY
    local c=""
    [[ ! -s $cf ]] || c=", client: $(jq -r '"\(.requests_ok) ok \(.requests_failed) failed, stall \(.longest_stall_ms) ms"' "$cf")"
    log "$tag ($dir): $(jq -r '"total \(.total_ms|floor) ms, downtime \(.downtime_ms|floor) ms, \(.link_bytes/1048576|floor) MiB on the link, rounds \(.rounds)"' "$f")$c"
}

finish_container() {
    local id=$1
    stop_client
    timeout 30 "$MIGRUN_BIN" --root "${ROOT[$LOC]}" delete -f "$id" >/dev/null 2>&1 || warn "delete $id failed"
    [[ $BUNDLE == "$WORK"/* ]] && release_bundle "$BUNDLE"
    [[ -z $BUNDLE || $BUNDLE != /run/mr-suite-* ]] || rm -rf --one-file-system "$BUNDLE" 2>/dev/null
    BUNDLE=""
    rm -rf --one-file-system "${INDIR[a]:?}"/incoming-* "${INDIR[b]:?}"/incoming-* 2>/dev/null || true
}

# warm_layers IMAGE: a `sleep` container on IMAGE goes A->B->A once, so
# that both hosts hold the image's layer (as a pulled image) before the
# measured runs.
warm_layers() {
    local image=$1 id=warm-$1
    LOC=a
    BUNDLE=$WORK/bundles/$id
    make_bundle "$BUNDLE" "$image" /bin/sleep 1000000 >"$WORK/msg" || { warn "warm $image: $(cat "$WORK/msg")"; return 1; }
    timeout 30 "$MIGRUN_BIN" --root "${ROOT[a]}" run -d -b "$BUNDLE" "$id" </dev/null >/dev/null 2>&1 || { warn "warm $image: run failed"; return 1; }
    { migrate "$id" pre "warm-$image-1" && migrate "$id" pre "warm-$image-2"; } >"$WORK/msg" 2>&1 \
        || warn "warming the layer of $image failed: $(tail -c 300 "$WORK/msg")"
    finish_container "$id"
}

image_of() {
    case $1 in idle) echo busybox ;; static) echo nginx ;; dynamic) echo pyapp ;; cgi) echo cgi ;; cpu) echo cpu ;; redis) echo redis ;; *) echo dirtier ;; esac
}

# series PART SCENARIO MIB RATE EXTRA WAYS...: one container, RUNS rounds of WAYS.
series() {
    local part=$1 s=$2 mib=$3 drate=$4 extra=$5; shift 5
    local ways=("$@") id="b-$part-$s" i k way order
    IMG_LOWER=$IMAGES/$(image_of "$s")/rootfs
    log "$part/$s: starting the container on A${mib:+ ($mib MiB, $drate MiB/s)}"
    if ! start_scenario "$s" "$id" "$mib" "$drate" >"$WORK/msg" 2>&1; then
        warn "$part/$s: $(tail -c 400 "$WORK/msg")"
        echo "$part-$s: start: $(tail -c 400 "$WORK/msg")" >>"$OUT/failed.txt"
        finish_container "$id"
        failures=$((failures + 1))
        return 0
    fi
    for ((i = 1; i <= RUNS; i++)); do
        # rotate the order of the ways from run to run
        order=()
        for ((k = 0; k < ${#ways[@]}; k++)); do order+=("${ways[(k + i - 1) % ${#ways[@]}]}"); done
        for way in "${order[@]}"; do
            sleep 1
            if ! one "$part" "$s" "$way" "$i" "$id" "$extra"; then
                failures=$((failures + 1))
                # the container may be gone: start it again for the rest
                if [[ "$(mr --root "${ROOT[$LOC]}" state "$id" 2>/dev/null | jq -r .status)" != running ]]; then
                    finish_container "$id"
                    delete_all "${ROOT[a]}"; delete_all "${ROOT[b]}"
                    start_scenario "$s" "$id" "$mib" "$drate" >"$WORK/msg" 2>&1 || { finish_container "$id"; return 0; }
                fi
            fi
        done
    done
    finish_container "$id"
}

# ------------------------------------------------------------- setup
mem_mib=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
((mem_mib > 4 * DIRTY_MIB + 1024)) || die "only $mem_mib MiB available; BENCH_DIRTY_MIB=$DIRTY_MIB needs ~$((4 * DIRTY_MIB + 1024))"
bash "$HACK_DIR/bench/images.sh" || die "building the images failed"
delete_all "${ROOT[a]}"; delete_all "${ROOT[b]}"
remove_suite_dirs
mkdir -p "${ROOT[a]}" "${ROOT[b]}" "${INDIR[a]}" "${INDIR[b]}" "${OUTDIR[a]}" "${OUTDIR[b]}"
WORK="$(mktemp -d /tmp/migrun-suite.XXXXXX)"
cp "$MIGRUN_BIN" "$WORK/migrun" || die "cannot copy $MIGRUN_BIN"
MIGRUN_SRC=$MIGRUN_BIN
MIGRUN_BIN=$WORK/migrun
mr keygen --out "$WORK/bench.key" >/dev/null || die "migrun keygen failed"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -rf "$OUT/runs" "$OUT/logs" "$OUT/failed.txt" "$OUT"/*.json
mkdir -p "$OUT/runs" "$OUT/logs"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
T_START=$(now)
log "results in $OUT (runs $RUNS, parts ${PARTS[*]}, load average $LOAD_START)"

for part in "${PARTS[@]}"; do
    case $part in
        ways)
            testbed_rate "$RATE"
            for s in "${SCENARIOS[@]}"; do
                warm_layers "$(image_of "$s")"
                case $s in
                    mem) series ways mem "$DIRTY_MIB" "$MEM_DIRTY" "{\"mib\": $DIRTY_MIB, \"dirty_mib_s\": $MEM_DIRTY}" "${WAYS[@]}" ;;
                    redis) series ways redis "" "" "{\"mib\": $REDIS_MIB}" "${WAYS[@]}" ;;
                    *) series ways "$s" "" "" "{}" "${WAYS[@]}" ;;
                esac
            done ;;
        dirty)
            testbed_rate "$RATE"
            warm_layers dirtier
            for r in "${DIRTY_RATES[@]}"; do
                series dirty "dirtier$r" "$DIRTY_MIB" "$r" "{\"mib\": $DIRTY_MIB, \"dirty_mib_s\": $r}" pre stop
            done ;;
        link)
            for l in "${LINKS[@]}"; do
                testbed_rate "$l"
                warm_layers dirtier
                series "link$l" dirtier "$LINK_MIB" "$LINK_DIRTY" "{\"mib\": $LINK_MIB, \"dirty_mib_s\": $LINK_DIRTY}" pre stop
            done ;;
        *) die "unknown part '$part' (ways dirty link)" ;;
    esac
done

# ------------------------------------------------------------- report
criu_v="$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')"
jq -n --arg date "$(date -Is)" --arg kernel "$(uname -r)" \
    --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo) x $(nproc)" \
    --arg mem "$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)" \
    --arg os "$(. /etc/os-release && echo "$PRETTY_NAME")" \
    --arg criu "$(command -v criu) $criu_v" \
    --arg load_start "$LOAD_START" --arg load_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --arg duration_s "$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1])))" "$T_START" "$(now)")" \
    --arg quick "$QUICK" --arg runs "$RUNS" --arg rate "$RATE" \
    --arg commit "$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)" \
    --arg migrun "$MIGRUN_SRC (sha256 $(sha256sum "$MIGRUN_BIN" | cut -c1-16))" \
    --arg client "$([[ -n $SERVICE_ADDR ]] && echo "mr-client -> $SERVICE_ADDR" || echo "root netns, setns into the container's netns, 127.0.0.1")" \
    --arg images "$(for i in "$IMAGES"/*/size_mib; do printf '%s=%s MiB ' "$(basename "$(dirname "$i")")" "$(cat "$i")"; done)" \
    '{date: $date, kernel: $kernel, cpu: $cpu, memory: $mem, os: $os, criu: $criu,
      load_average_start: $load_start, load_average_end: $load_end, duration_s: ($duration_s | tonumber),
      quick: ($quick == "1"), runs: ($runs | tonumber), rate: $rate, commit: $commit, migrun: $migrun,
      client: $client, images: $images}' >"$OUT/env.json"
report_args=("$OUT")
[[ $WRITE_DOCS != 1 ]] || report_args+=(--docs "$REPO_ROOT/docs")
python3 "$HACK_DIR/bench/report.py" "${report_args[@]}" --benchplot "$BENCHPLOT_BIN" \
    || die "the report failed"
((failures == 0)) || die "$failures migration(s) or scenario(s) failed (see $OUT/failed.txt and $OUT/logs)"
log "done: $OUT"
