#!/usr/bin/env bash
# Usage: hack/bench-migrate.sh        (make bench-migrate)
# Live migration between the two hosts of the test bed (hack/testbed.sh:
# network namespaces mr-host-a 10.77.0.1 / mr-host-b 10.77.0.2, links shaped
# to BENCH_RATE), for three workloads, each a busybox bundle started on host A:
#   idle     `sleep 1000000`
#   counter  the shell counter of hack/demo.sh (rewrites /count every 50 ms)
#   mem512   `/dirtier 512 4` (tests/programs/dirtier.c: 512 MiB, 4 MiB/s dirtied)
# Per workload, BENCH_RUNS migrations with pre-copy and BENCH_RUNS with
# stop-and-copy (--no-precopy), in the order pre, stop, stop, pre, pre, ...,
# the direction alternating A->B, B->A, ... (the container goes back and
# forth); each migration is
#   migrun --root R_DST migrate-in --listen DST:PORT --once ...   (in DST's netns)
#   migrun --root R_SRC migrate-out ID --to DST:PORT --stats-json F ...  (in SRC's)
# and is followed by a check: the container runs on the target and is gone
# from the source; the counter went on (not restarted); the mem512 dirtier
# verifies its memory (touch /check, expects /result "ok 512").
# Prints medians (min-max) per workload and mode, the downtime ratio
# stop-and-copy / pre-copy and PASS/MISS for the targets (pre-copy medians):
# downtime <= 150 ms (idle, counter), <= 300 ms (mem512); mem512 total time
# <= 1.3 x 512 MiB / link rate; mem512 downtime >= 10x below stop-and-copy.
# Writes summary.md/summary.json, raw/ (per-run figures and stats JSON) and
# logs/ (migrate-in/-out output).
# Environment:
#   MIGRUN_BIN              migrun binary (default: target/release/migrun)
#   BENCH_RUNS              migrations per workload and mode (default 3)
#   BENCH_WORKLOADS         subset of "idle counter mem512" (default: all three)
#   BENCH_RATE              test bed link rate, tc units (default 1gbit)
#   BENCH_PORT              migrate-in port on the target (default 7171)
#   BENCH_MIGRATE_TIMEOUT   seconds one migrate-out may take (default 120)
#   BENCH_SETTLE            seconds between migrations (default 1)
#   BENCH_OUT               results dir (default bench/results/DATE/migrate)
#   BENCH_STRICT=1          exit 1 when a target is missed
# A failed migration or memory check always exits 1. The test bed is brought
# up (re-shaped to BENCH_RATE if it was up) and taken down at the end unless
# it was up before.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,37s/^# \{0,1\}//p' "$0"; exit 0; }
[[ $# -eq 0 ]] || die "no arguments expected (see $0 --help)"

RUNS=${BENCH_RUNS:-3}
read -r -a WORKLOADS <<<"${BENCH_WORKLOADS:-idle counter mem512}"
RATE=${BENCH_RATE:-1gbit}
PORT=${BENCH_PORT:-7171}
MIGRATE_TIMEOUT=${BENCH_MIGRATE_TIMEOUT:-120}
SETTLE=${BENCH_SETTLE:-1}
OUT=${BENCH_OUT:-$REPO_ROOT/bench/results/$(date +%F)/migrate}
MIGRUN_BIN=${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-120}
CHECK_TIMEOUT=${BENCH_CHECK_TIMEOUT:-60}
LISTEN_TIMEOUT=15
MEM_MIB=512
DIRTY_RATE=4
# CRIU >= 4 from hack/install-deps.sh lives in /usr/local/sbin
export PATH="/usr/local/sbin:/usr/local/bin:$PATH"

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, got '$RUNS'"
[[ $PORT =~ ^[1-9][0-9]*$ ]] || die "BENCH_PORT must be a port number, got '$PORT'"
[[ $MIGRATE_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "BENCH_MIGRATE_TIMEOUT must be a positive integer, got '$MIGRATE_TIMEOUT'"
[[ $SETTLE =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "BENCH_SETTLE must be a number of seconds, got '$SETTLE'"
((${#WORKLOADS[@]} > 0)) || die "BENCH_WORKLOADS is empty"
for w in "${WORKLOADS[@]}"; do
    [[ $w == idle || $w == counter || $w == mem512 ]] \
        || die "unknown workload '$w' in BENCH_WORKLOADS (idle, counter, mem512)"
done
# The link rate in bit/s, for the total-time target (tc units: bit, kbit,
# mbit, gbit; decimal, as tc takes them).
RATE_BPS="$(python3 -c '
import re, sys
m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", sys.argv[1].lower())
if not m:
    sys.exit(1)
print(int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]))
' "$RATE")" || die "BENCH_RATE must be a tc rate in bit/s units (e.g. 1gbit, 500mbit), got '$RATE'"

require_root
need_cmd jq nsenter timeout ss gcc python3 busybox runc ip tc
[[ -x $MIGRUN_BIN ]] || die "migrun binary $MIGRUN_BIN not found (make build, or set MIGRUN_BIN)"
command -v criu >/dev/null 2>&1 || die "criu not found (hack/install-deps.sh)"

TESTBED="$HACK_DIR/testbed.sh"
eval "$(bash "$TESTBED" env)"
NS_A=$TESTBED_NS_A NS_B=$TESTBED_NS_B
ADDR_A=$TESTBED_ADDR_A ADDR_B=$TESTBED_ADDR_B
ROOT_A=/run/mr-bench-a ROOT_B=/run/mr-bench-b
IN_A=/run/mr-bench-a-in IN_B=/run/mr-bench-b-in
OUT_A=/run/mr-bench-a-out OUT_B=/run/mr-bench-b-out
declare -A NS=([a]=$NS_A [b]=$NS_B) ADDR=([a]=$ADDR_A [b]=$ADDR_B)
declare -A ROOT=([a]=$ROOT_A [b]=$ROOT_B) INDIR=([a]=$IN_A [b]=$IN_B) OUTDIR=([a]=$OUT_A [b]=$OUT_B)

mr() { "$MIGRUN_BIN" "$@"; }

# Was the test bed up before? (all four namespaces of hack/testbed.sh there)
testbed_was_up=1
for ns in "$TESTBED_NS_A" "$TESTBED_NS_B" "$TESTBED_NS_CLIENT" "$TESTBED_NS_SWITCH"; do
    [[ -e /run/netns/$ns ]] || testbed_was_up=0
done

WORK=""
IN_PID=""
failures=0

# delete_all ROOT: removes every container known under ROOT.
delete_all() {
    local root=$1 id
    [[ -d $root ]] || return 0
    for id in $(mr --root "$root" list -q 2>/dev/null); do
        timeout 30 "$MIGRUN_BIN" --root "$root" delete -f "$id" >/dev/null 2>&1 \
            || warn "migrun --root $root delete -f $id failed"
    done
}

# remove_bench_dirs: every /run/mr-bench-* (state roots, incoming and
# outgoing work dirs); a dir with something still mounted in it is left.
remove_bench_dirs() {
    local d
    for d in /run/mr-bench-*; do
        [[ -e $d ]] || continue
        if awk -v d="$d" '$5 == d || index($5, d "/") == 1 {f = 1} END {exit !f}' /proc/self/mountinfo; then
            warn "$d has mounts in it, left in place: $(awk -v d="$d" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | tr '\n' ' ')"
            continue
        fi
        rm -rf --one-file-system "$d" || warn "cannot remove $d"
    done
}

# remove_parent_cgroups: migrate-in puts a container under the cgroup
# /migrun-TAG/ID (TAG: FNV-1a of the --root path, see local_config in
# crates/migrate/src/target.rs); delete removes ID but leaves /migrun-TAG.
# Those of this script's two roots are removed here, if empty, and reported.
remove_parent_cgroups() {
    local root tag d n
    for root in "$ROOT_A" "$ROOT_B"; do
        tag="$(python3 -c '
import sys
h = 2166136261
for b in sys.argv[1].encode():
    h = ((h ^ b) * 16777619) & 0xffffffff
print(f"migrun-{h:08x}")' "$root")" || continue
        n=0
        for d in /sys/fs/cgroup/"$tag" /sys/fs/cgroup/*/"$tag"; do
            [[ -d $d ]] || continue
            if rmdir "$d" 2>/dev/null; then
                n=$((n + 1))
            else
                warn "cgroup $d (--root $root) is not empty, left in place: $(find "$d" -mindepth 1 -maxdepth 1 -type d -printf '%f ')"
            fi
        done
        ((n == 0)) || warn "migrun left the empty parent cgroup $tag (--root $root) in $n hierarchies; removed"
    done
}

stop_migrate_in() {
    if [[ -n $IN_PID ]] && kill -0 "$IN_PID" 2>/dev/null; then
        kill -TERM "$IN_PID" 2>/dev/null || true
        wait_until 10 bash -c "! kill -0 $IN_PID 2>/dev/null" || kill -KILL "$IN_PID" 2>/dev/null || true
    fi
    [[ -z $IN_PID ]] || wait "$IN_PID" 2>/dev/null || true
    IN_PID=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    stop_migrate_in
    delete_all "$ROOT_A"
    delete_all "$ROOT_B"
    remove_bench_dirs
    remove_parent_cgroups
    if ((testbed_was_up)); then
        log "the test bed was up before this run: left up (shaped to $RATE)"
    else
        bash "$TESTBED" down >/dev/null 2>&1 || warn "'$TESTBED down' failed"
    fi
    [[ -z $WORK ]] || rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ----------------------------------------------------------------- setup
max_mem=0
for w in "${WORKLOADS[@]}"; do [[ $w != mem512 ]] || max_mem=$MEM_MIB; done
mem_free_mib=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
# the container, the target's page store and CRIU's completed images
((mem_free_mib > 3 * max_mem + 512)) \
    || die "only ${mem_free_mib} MiB of memory available, mem512 needs about $((3 * max_mem + 512))"

log "test bed: hack/testbed.sh up (TESTBED_RATE=$RATE)"
((testbed_was_up == 0)) || log "the test bed is already up: re-shaping it to $RATE"
TESTBED_RATE=$RATE bash "$TESTBED" up 2>&1 | sed 's/^/    /' >&2 \
    || die "hack/testbed.sh up failed"
shaping="$(nsenter --net="/run/netns/$NS_A" -- tc qdisc show dev eth0 | grep -oE '(tbf|netem) .*' | tr '\n' ';' || true)"
netem=no
nsenter --net="/run/netns/$NS_A" -- tc qdisc show | grep -q netem && netem=yes

# Leftovers of an interrupted run.
for root in "$ROOT_A" "$ROOT_B"; do
    if [[ -d $root && -n "$(mr --root "$root" list -q 2>/dev/null)" ]]; then
        warn "removing leftover containers under $root"
        delete_all "$root"
    fi
done
remove_bench_dirs
for d in "$ROOT_A" "$ROOT_B" "$IN_A" "$IN_B" "$OUT_A" "$OUT_B"; do mkdir -p "$d"; done

WORK="$(mktemp -d /tmp/migrun-bench-migrate.XXXXXX)"
# A copy of the binary: a rebuild during the run (make build elsewhere) must
# not swap it between two migrations.
MIGRUN_SRC=$MIGRUN_BIN
cp "$MIGRUN_SRC" "$WORK/migrun" || die "cannot copy $MIGRUN_SRC"
MIGRUN_BIN=$WORK/migrun
mr keygen --out "$WORK/bench.key" >/dev/null || die "migrun keygen failed"
gcc -O2 -static -o "$WORK/dirtier" "$REPO_ROOT/tests/programs/dirtier.c" \
    || die "compiling tests/programs/dirtier.c failed (static glibc: apt-get install libc6-dev)"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Rewrite results of this run only (a re-run on the same day replaces them).
rm -rf "$OUT/raw" "$OUT/logs" "$OUT/summary.md" "$OUT/summary.json"
mkdir -p "$OUT/raw" "$OUT/logs"

loadavg_start="$(cut -d" " -f1-3 /proc/loadavg)"
busy_start="$(ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 >= 20 {printf "%s(%s%%) ", $2, $1}' | head -c 300)"

# ---------------------------------------------------------------- helpers
# count_of FILE: the counter in FILE (retried: the container rewrites it
# every 50 ms, so a read can land between truncate and write).
count_of() {
    local f=$1 v="" _
    for _ in $(seq 1 50); do
        v="$(tr -dc 0-9 <"$f" 2>/dev/null || true)"
        [[ -n $v ]] && break
        sleep 0.02
    done
    echo "$v"
}

# rootfs_of ROOT ID: the container's rootfs as migrun's state reports it.
rootfs_of() {
    local r
    r="$(mr --root "$1" state "$2" 2>/dev/null | jq -r .rootfs 2>/dev/null)" || return 1
    [[ -n $r && $r != null && -d $r ]] || return 1
    echo "$r"
}

# tail_of FILE: its last lines on one line, for FAILED messages.
tail_of() { [[ -s $1 ]] && tail -n 4 "$1" | tr '\n' ' ' | sed 's/ *$//'; }

# start_migrate_in SIDE LOG: a one-shot migrate-in on host SIDE (a|b), in
# the background (IN_PID), back once it listens. Returns 1 with a message.
start_migrate_in() {
    local side=$1 logf=$2 ns=${NS[$1]} addr=${ADDR[$1]} busy
    busy="$(nsenter --net="/run/netns/$ns" -- ss -Hltnp src "$addr:$PORT" 2>/dev/null || true)"
    [[ -z $busy ]] || { echo "$addr:$PORT in $ns is already taken: $busy"; return 1; }
    # timeout bounds it even if the source never comes
    timeout -k 10 $((MIGRATE_TIMEOUT + 60)) nsenter --net="/run/netns/$ns" -- \
        "$MIGRUN_BIN" --root "${ROOT[$side]}" migrate-in --listen "$addr:$PORT" \
        --key "$WORK/bench.key" --once --work-dir "${INDIR[$side]}" >"$logf" 2>&1 &
    IN_PID=$!
    local deadline=$((SECONDS + LISTEN_TIMEOUT))
    until grep -q "listening on $addr:$PORT" "$logf" 2>/dev/null \
        && [[ -n "$(nsenter --net="/run/netns/$ns" -- ss -Hltn src "$addr:$PORT" 2>/dev/null)" ]]; do
        if ! kill -0 "$IN_PID" 2>/dev/null; then
            local rc=0
            wait "$IN_PID" || rc=$?
            IN_PID=""
            echo "migrate-in in $ns exited (status $rc) before listening on $addr:$PORT: $(tail_of "$logf")"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            stop_migrate_in
            echo "migrate-in in $ns does not listen on $addr:$PORT after ${LISTEN_TIMEOUT} s: $(tail_of "$logf")"
            return 1
        fi
        sleep 0.05
    done
}

# verify_memory ROOTFS: the dirtier checks its whole memory; 0 if "ok 512".
VERIFY_MSG=""
verify_memory() {
    local rootfs=$1 result
    rm -f "$rootfs/result"
    touch "$rootfs/check"
    if ! wait_until "$CHECK_TIMEOUT" test -s "$rootfs/result"; then
        VERIFY_MSG="no /result within ${CHECK_TIMEOUT} s after touching /check"
        return 1
    fi
    result="$(cat "$rootfs/result")"
    VERIFY_MSG="/result says '$result'"
    [[ $result == "ok $MEM_MIB" ]]
}

# bench WORKLOAD: starts the container on A, then the 2 x RUNS migrations.
# Figures go to raw/WORKLOAD.tsv; a failure to raw/WORKLOAD.failed (returns 1).
bench() {
    local w=$1
    local id=bench-$w bundle=$WORK/bundle-$w raw=$OUT/raw/$w
    local args
    # shellcheck disable=SC2016 # the counter's $i is the container shell's
    case $w in
        idle) args=(sleep 1000000) ;;
        counter) args=(sh -c 'i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.05; done') ;;
        mem512) args=(/dirtier "$MEM_MIB" "$DIRTY_RATE") ;;
    esac

    fail() {
        local msg="$w: $1"
        warn "FAILED: $msg"
        echo "$msg" >>"$raw.failed"
        stop_migrate_in
        delete_all "$ROOT_A"
        delete_all "$ROOT_B"
        return 1
    }

    bash "$HACK_DIR/mkbundle.sh" "$bundle" "${args[@]}" >"$OUT/logs/$w-mkbundle.log" 2>&1 \
        || fail "making the bundle failed: $(tail_of "$OUT/logs/$w-mkbundle.log")" || return 1
    [[ $w != mem512 ]] || cp "$WORK/dirtier" "$bundle/rootfs/dirtier"
    rm -f "$bundle/rootfs"/{ready,check,result,count}

    log "$w: migrun run -d on host A (--root $ROOT_A)"
    # stdio: /dev/null only (CRIU cannot migrate a terminal or a host file)
    timeout 30 "$MIGRUN_BIN" --root "$ROOT_A" --log "$OUT/logs/$w-run.log" \
        run -d -b "$bundle" "$id" </dev/null >/dev/null 2>&1 \
        || fail "migrun run -d on host A failed: $(tail_of "$OUT/logs/$w-run.log")" || return 1
    case $w in
        counter) wait_until 15 test -s "$bundle/rootfs/count" \
            || fail "the counter did not start (no /count after 15 s)" || return 1 ;;
        mem512) wait_until "$READY_TIMEOUT" test -e "$bundle/rootfs/ready" \
            || fail "the dirtier did not write /ready within ${READY_TIMEOUT} s" || return 1
            verify_memory "$bundle/rootfs" \
                || fail "memory check before any migration: $VERIFY_MSG" || return 1 ;;
        *) sleep 0.5 ;;
    esac

    : >"$raw.tsv"
    local i k=0 mode modes src=a dst st rootfs before after n json tag rc st_src
    for ((i = 1; i <= RUNS; i++)); do
        if ((i % 2)); then modes=(pre stop); else modes=(stop pre); fi
        for mode in "${modes[@]}"; do
            k=$((k + 1))
            dst=$([[ $src == a ]] && echo b || echo a)
            tag="$w-$mode-$i"
            json=$OUT/raw/$tag.json
            sleep "$SETTLE"
            start_migrate_in "$dst" "$OUT/logs/$tag.in.log" >"$WORK/msg" \
                || fail "$mode run $i: $(cat "$WORK/msg")" || return 1
            before=""
            if [[ $w == counter ]]; then
                rootfs="$(rootfs_of "${ROOT[$src]}" "$id")" \
                    || fail "$mode run $i: the state of $id under ${ROOT[$src]} has no usable rootfs" || return 1
                before="$(count_of "$rootfs/count")"
            fi
            local opt=()
            [[ $mode == pre ]] || opt=(--no-precopy)
            rc=0
            timeout -k 10 "$MIGRATE_TIMEOUT" nsenter --net="/run/netns/${NS[$src]}" -- \
                "$MIGRUN_BIN" --root "${ROOT[$src]}" migrate-out "$id" --to "${ADDR[$dst]}:$PORT" \
                --key "$WORK/bench.key" --stats-json "$json" --work-dir "${OUTDIR[$src]}" "${opt[@]}" \
                </dev/null >"$OUT/logs/$tag.out.log" 2>&1 || rc=$?
            if ((rc != 0)); then
                # give the target a moment to report, then stop it
                wait_until 10 bash -c "! kill -0 $IN_PID 2>/dev/null" || true
                stop_migrate_in
                st_src="$(mr --root "${ROOT[$src]}" state "$id" 2>/dev/null | jq -r .status 2>/dev/null)" || true
                local why="exit status $rc"
                ((rc != 124)) || why+=" (timed out after ${MIGRATE_TIMEOUT} s)"
                fail "$mode run $i (${src^^} -> ${dst^^}): migrate-out $why: $(tail_of "$OUT/logs/$tag.out.log") | migrate-in: $(tail_of "$OUT/logs/$tag.in.log") | container on the source: ${st_src:-gone}" || return 1
            fi
            # migrate-in --once exits right after the source's Done
            if ! wait_until 30 bash -c "! kill -0 $IN_PID 2>/dev/null"; then
                stop_migrate_in
                fail "$mode run $i: migrate-out succeeded but migrate-in did not exit within 30 s: $(tail_of "$OUT/logs/$tag.in.log")" || return 1
            fi
            rc=0
            wait "$IN_PID" || rc=$?
            IN_PID=""
            ((rc == 0)) || fail "$mode run $i: migrate-out succeeded but migrate-in exited with status $rc: $(tail_of "$OUT/logs/$tag.in.log")" || return 1
            [[ -s $json ]] || fail "$mode run $i: migrate-out succeeded but wrote no --stats-json file" || return 1

            # where the container is now
            if mr --root "${ROOT[$src]}" state "$id" >/dev/null 2>&1; then
                fail "$mode run $i: $id is still known under ${ROOT[$src]} after migrating away" || return 1
            fi
            st="$(mr --root "${ROOT[$dst]}" state "$id" 2>/dev/null | jq -r .status 2>/dev/null)" || st=""
            [[ $st == running ]] || fail "$mode run $i: $id under ${ROOT[$dst]} is '${st:-missing}' after the migration, not running" || return 1
            rootfs="$(rootfs_of "${ROOT[$dst]}" "$id")" \
                || fail "$mode run $i: the state of $id under ${ROOT[$dst]} has no usable rootfs" || return 1
            [[ -z "$(ls -A "${OUTDIR[$src]}" 2>/dev/null)" ]] \
                || warn "$tag: migrate-out left files in its work dir ${OUTDIR[$src]}: $(find "${OUTDIR[$src]}" -mindepth 1 -maxdepth 1 -printf '%f ')"

            jq -r --arg run "$i" --arg mode "$mode" --arg dir "${src^^}->${dst^^}" \
                '[$run, $mode, $dir, .downtime_ms, .total_ms, .bytes_total, .bytes_downtime,
                  .precopy_rounds, .criu_dump_ms, .throttled] | @tsv' "$json" >>"$raw.tsv" \
                || fail "$mode run $i: cannot read $json" || return 1
            log "$w $mode $i/$RUNS (${src^^} -> ${dst^^}): $(tail -n 1 "$OUT/logs/$tag.out.log" | sed 's/^migrated [^:]*: //')"

            case $w in
                counter)
                    sleep 0.3
                    after="$(count_of "$rootfs/count")"
                    [[ -n $before && -n $after ]] && ((after > before)) \
                        || fail "$mode run $i: the counter on ${dst^^} (${after:-unreadable}) is not past the one before the migration (${before:-unreadable}): restarted or stuck?" || return 1 ;;
                mem512)
                    if ! verify_memory "$rootfs"; then
                        fail "$mode run $i (${src^^} -> ${dst^^}): memory check after the migration: $VERIFY_MSG" || return 1
                    fi
                    log "$w $mode $i: memory verified on ${dst^^} ($VERIFY_MSG)" ;;
            esac

            # The container left SRC: its incoming bundle there is no longer
            # anyone's (migrun leaves a migrated-in bundle, as runc does).
            rm -rf --one-file-system "${INDIR[$src]:?}"/incoming-* 2>/dev/null || true
            src=$dst
        done
    done

    timeout 30 "$MIGRUN_BIN" --root "${ROOT[$src]}" delete -f "$id" >/dev/null 2>"$WORK/err" \
        || fail "migrun --root ${ROOT[$src]} delete -f $id failed at the end: $(tail_of "$WORK/err")" || return 1
    rm -rf --one-file-system "${INDIR[$src]:?}"/incoming-* "$bundle" 2>/dev/null || true
    n=$(wc -l <"$raw.tsv")
    log "$w: $n migrations done"
}

for w in "${WORKLOADS[@]}"; do
    bench "$w" || failures=$((failures + 1))
done

env_json="$(
    {
        echo "date=$(date -Is)"
        echo "kernel=$(uname -r)"
        echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo) x $(nproc)"
        echo "loadavg_at_start=$loadavg_start"
        echo "loadavg_at_end=$(cut -d" " -f1-3 /proc/loadavg)"
        echo "busy_processes_at_start=${busy_start:-none}"
        echo "runs=$RUNS"
        echo "rate=$RATE"
        echo "rate_bps=$RATE_BPS"
        echo "shaping_host_a_eth0=$shaping"
        echo "netem_delay=$netem"
        echo "settle_s=$SETTLE"
        echo "work_dirs=$(stat -f -c %T /run) (/run)"
        echo "criu=$(command -v criu) ($(criu --version 2>/dev/null | awk '/^Version:/ {print $2}'))"
        echo "migrun_commit=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
        echo "version_migrun=$("$MIGRUN_BIN" --version 2>/dev/null | head -n 1)"
        echo "migrun_bin=$MIGRUN_SRC (sha256 $(sha256sum "$MIGRUN_BIN" | cut -c1-16), built $(date -r "$MIGRUN_SRC" -Is 2>/dev/null))"
    } | python3 -c 'import json, sys; print(json.dumps(dict(l.rstrip("\n").split("=", 1) for l in sys.stdin if "=" in l)))'
)"

status=0
python3 - "$OUT" "$env_json" "$MEM_MIB" "${WORKLOADS[@]}" <<'PY' || status=$?
import json, os, statistics, sys

out, env, mem_mib, workloads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
rate_bps = int(env["rate_bps"])
MODES = [("pre", "pre-copy"), ("stop", "stop-and-copy")]
FIELDS = ["downtime_ms", "total_ms", "bytes_total", "bytes_downtime", "precopy_rounds", "criu_dump_ms"]

def summ(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs} if xs else None

def load(w):
    base = os.path.join(out, "raw", w)
    d = {"failed": None, "runs": []}
    if os.path.exists(base + ".failed"):
        with open(base + ".failed") as f:
            d["failed"] = f.read().strip()
    try:
        with open(base + ".tsv") as f:
            for line in f:
                run, mode, direction, *vals = line.rstrip("\n").split("\t")
                r = {"run": int(run), "mode": mode, "direction": direction}
                for k, v in zip(FIELDS + ["throttled"], vals):
                    r[k] = v == "true" if k == "throttled" else float(v)
                d["runs"].append(r)
    except OSError:
        pass
    for m, _ in MODES:
        rs = [r for r in d["runs"] if r["mode"] == m]
        d[m] = {k: summ([r[k] for r in rs]) for k in FIELDS}
        d[m]["n"] = len(rs)
    return d

data = {w: load(w) for w in workloads}

def med(w, m, k):
    return ((data[w][m].get(k)) or {}).get("median")

for w in workloads:
    p, s = med(w, "pre", "downtime_ms"), med(w, "stop", "downtime_ms")
    data[w]["downtime_ratio_stop_over_pre"] = s / p if p and s else None

def ms(r):
    return f"{r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f})" if r else "n/a"

def mib(r):
    if not r:
        return "n/a"
    f = lambda x: f"{x / 1048576:.1f}" if x >= 1048576 else f"{x / 1048576:.2f}"
    return f"{f(r['median'])} ({f(r['min'])}-{f(r['max'])})"

def num(r):
    return f"{r['median']:g} ({r['min']:g}-{r['max']:g})" if r else "n/a"

def table(head, rows):
    width = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, width)) + " |"
    return [line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in rows]

head = ["workload", "mode", "n", "downtime (ms)", "total (ms)", "MiB on the wire",
        "MiB in downtime", "pre-copy rounds", "criu dump (ms)"]
rows = []
for w in workloads:
    for m, label in MODES:
        d = data[w][m]
        rows.append([w, label, d["n"], ms(d["downtime_ms"]), ms(d["total_ms"]), mib(d["bytes_total"]),
                     mib(d["bytes_downtime"]), num(d["precopy_rounds"]), ms(d["criu_dump_ms"])])
    r = data[w]["downtime_ratio_stop_over_pre"]
    rows.append([w, "stop/pre downtime", "", f"{r:.1f}x" if r else "n/a", "", "", "", "", ""])
main = table(head, rows)
legend = (f"Median (min-max) over {env['runs']} migrations per workload and mode, on the test bed "
          f"at {env['rate']} per link and direction (netem delay: {env['netem_delay']}); "
          "figures from migrate-out --stats-json (bytes both directions). "
          "stop/pre downtime: median stop-and-copy downtime / median pre-copy downtime.")

per_run_head = ["workload", "run", "mode", "direction", "downtime (ms)", "total (ms)", "MiB total",
                "MiB downtime", "rounds", "criu dump (ms)", "throttled"]
per_run = table(per_run_head, [
    [w, r["run"], r["mode"], r["direction"], f"{r['downtime_ms']:.0f}", f"{r['total_ms']:.0f}",
     f"{r['bytes_total'] / 1048576:.2f}", f"{r['bytes_downtime'] / 1048576:.2f}",
     f"{r['precopy_rounds']:.0f}", f"{r['criu_dump_ms']:.0f}", "yes" if r["throttled"] else "no"]
    for w in workloads for r in data[w]["runs"]])

checks = []
def check(ok, label):
    checks.append(("PASS" if ok else "MISS", label))

def nodata(w):
    return "no data" + (f" ({data[w]['failed']})" if data[w]["failed"] else "")

limits = {"idle": 150, "counter": 150, "mem512": 300}
for w in workloads:
    v = med(w, "pre", "downtime_ms")
    lim = limits[w]
    if v is None:
        check(False, f"{w}: pre-copy downtime <= {lim} ms: {nodata(w)}")
    else:
        mx = data[w]["pre"]["downtime_ms"]["max"]
        check(v <= lim, f"{w}: pre-copy downtime <= {lim} ms: median {v:.0f} ms (max {mx:.0f} ms)")
if "mem512" in workloads:
    link_s = mem_mib * 1048576 * 8 / rate_bps
    lim_ms = 1.3 * link_s * 1000
    v = med("mem512", "pre", "total_ms")
    label = (f"mem512: pre-copy total time <= 1.3 x {mem_mib} MiB / {env['rate']} "
             f"= 1.3 x {link_s:.2f} s = {lim_ms / 1000:.2f} s")
    if v is None:
        check(False, f"{label}: {nodata('mem512')}")
    else:
        mx = data["mem512"]["pre"]["total_ms"]["max"]
        check(v <= lim_ms, f"{label}: median {v / 1000:.2f} s (max {mx / 1000:.2f} s)")
    r = data["mem512"]["downtime_ratio_stop_over_pre"]
    label = "mem512: pre-copy downtime >= 10x below stop-and-copy"
    if r is None:
        check(False, f"{label}: {nodata('mem512')}")
    else:
        check(r >= 10, f"{label}: {med('mem512', 'stop', 'downtime_ms'):.0f} ms / "
                       f"{med('mem512', 'pre', 'downtime_ms'):.0f} ms = {r:.1f}x")

fails = [data[w]["failed"] for w in workloads if data[w]["failed"]]

print()
print("\n".join(main))
print(legend)
print()
print("\n".join(per_run))
print()
for v, l in checks:
    print(f"{v}: {l}")
for f in fails:
    for l in f.splitlines():
        print(f"FAILED: {l}")

with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("# migrun live-migration benchmark\n\n")
    f.write(f"Test bed (hack/testbed.sh): hosts mr-host-a / mr-host-b as network namespaces, links "
            f"shaped to {env['rate']} each way. Workloads (busybox bundles, stdio /dev/null, started on A):\n\n")
    f.write("- idle: `sleep 1000000`\n")
    f.write("- counter: `sh -c 'i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.05; done'`\n")
    f.write(f"- mem512: `/dirtier {mem_mib} 4` (tests/programs/dirtier.c; memory verified after every migration)\n\n")
    f.write("Each migration: `migrun --root R_DST migrate-in --listen DST:PORT --once` in the target's "
            "netns, `migrun --root R_SRC migrate-out ID --to DST:PORT --stats-json F [--no-precopy]` in "
            "the source's; modes in the order pre, stop, stop, pre, ...; direction alternating A->B, B->A.\n\n")
    f.write("\n".join(main) + "\n\n" + legend + "\n\n")
    f.write("\n".join(f"- {v}: {l}" for v, l in checks) + "\n")
    if fails:
        f.write("\n## Failures\n\n" + "\n".join(f"- {l}" for x in fails for l in x.splitlines()) + "\n")
    f.write("\n## Every migration\n\n" + "\n".join(per_run) + "\n")
    f.write("\n## Environment\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"env": env, "results": data,
               "targets": [{"verdict": v, "check": l} for v, l in checks]}, f, indent=2)
    f.write("\n")
print(f"\nresults: {out}")
sys.exit(3 if any(v == "MISS" for v, _ in checks) else 0)
PY
case $status in
    0) ;;
    3) if [[ ${BENCH_STRICT:-0} == 1 && $failures -eq 0 ]]; then die "some targets were missed"; fi ;;
    *) die "summary failed (status $status)" ;;
esac
((failures == 0)) || die "$failures workload(s) failed (see FAILED above, $OUT/logs and $OUT/raw/*.failed)"
