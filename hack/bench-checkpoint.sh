#!/usr/bin/env bash
# Usage: hack/bench-checkpoint.sh        (make bench-checkpoint)
# Times checkpoint and restore of migrun against runc, both driving the same
# CRIU (--criu BENCH_CRIU), on a busybox bundle running tests/programs/pattern
# (`/pattern SIZE`: SIZE MiB of anonymous memory filled with a known pattern).
# Per size and runtime: run -d, wait for /ready, one untimed warm-up cycle, then BENCH_RUNS cycles of
#   RT checkpoint --image-path IMG ID      (timed; images on tmpfs)
#   RT restore -d --image-path IMG -b B ID (timed; IMG deleted afterwards)
# then verifies the pattern in the restored process and deletes it. Prints a
# table (median and min-max of checkpoint, restore and their sum; ratio
# runc/migrun, > 1: migrun faster) and PASS/MISS for "migrun no slower than
# runc at every size", and writes summary.md/summary.json, the raw times
# (raw/) and CRIU's logs and stats of every cycle (logs/, *.log gzipped).
# Environment:
#   MIGRUN_BIN      migrun binary (default: target/release/migrun)
#   BENCH_SIZES     memory sizes in MiB (default "64 256 1024")
#   BENCH_RUNS      checkpoint/restore cycles per size and runtime (default 3)
#   BENCH_CRIU      CRIU binary given to both runtimes (default /usr/local/sbin/criu)
#   BENCH_OUT       results dir (default bench/results/DATE/checkpoint)
#   BENCH_STRICT=1  exit 1 when the target is missed
# A failed checkpoint, restore or pattern check always exits 1.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,21s/^# \{0,1\}//p' "$0"; exit 0; }
[[ $# -eq 0 ]] || die "no arguments expected (see $0 --help)"

read -r -a SIZES <<<"${BENCH_SIZES:-64 256 1024}"
RUNS=${BENCH_RUNS:-3}
CRIU_BIN=${BENCH_CRIU:-/usr/local/sbin/criu}
OUT=${BENCH_OUT:-$REPO_ROOT/bench/results/$(date +%F)/checkpoint}
MIGRUN_BIN=${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-180}
CHECK_TIMEOUT=${BENCH_CHECK_TIMEOUT:-120}
RUNTIMES=(migrun runc)

((${#SIZES[@]} > 0)) || die "BENCH_SIZES is empty"
for s in "${SIZES[@]}"; do
    [[ $s =~ ^[1-9][0-9]*$ ]] || die "BENCH_SIZES must hold positive integers (MiB), got '$s'"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, got '$RUNS'"

require_root
[[ -x $MIGRUN_BIN ]] || die "migrun binary $MIGRUN_BIN not found (make build, or set MIGRUN_BIN)"

deps_missing=0
for c in runc gcc jq python3; do command -v "$c" >/dev/null 2>&1 || deps_missing=1; done
[[ -x $CRIU_BIN ]] || deps_missing=1
if ((deps_missing)); then
    log "installing missing dependencies: hack/install-deps.sh"
    bash "$HACK_DIR/install-deps.sh" >&2
fi
need_cmd runc gcc jq python3
[[ -x $CRIU_BIN ]] || die "CRIU binary $CRIU_BIN not found (hack/install-deps.sh, or set BENCH_CRIU)"
RUNC_BIN="$(command -v runc)"
declare -A BIN=([migrun]=$MIGRUN_BIN [runc]=$RUNC_BIN)

work="$(mktemp -d /tmp/migrun-bench-ckpt.XXXXXX)"
# CRIU images go to tmpfs so that the disk does not enter the measurement.
[[ $(stat -f -c %T /dev/shm 2>/dev/null) == tmpfs ]] || die "/dev/shm is not a tmpfs"
images="$(mktemp -d /dev/shm/migrun-bench-ckpt.XXXXXX)"
cleanup() {
    local name id
    for name in "${RUNTIMES[@]}"; do
        [[ -d $work/root-$name ]] || continue
        for id in $("${BIN[$name]}" --root "$work/root-$name" list -q 2>/dev/null); do
            "${BIN[$name]}" --root "$work/root-$name" delete -f "$id" >/dev/null 2>&1 || true
        done
    done
    rm -rf "$work" "$images"
}
trap cleanup EXIT

max_size=0
for s in "${SIZES[@]}"; do ((s > max_size)) && max_size=$s; done
shm_free_mib=$(($(stat -f -c '%a * %S' /dev/shm) / 1048576))
((shm_free_mib > max_size + 256)) \
    || die "/dev/shm has ${shm_free_mib} MiB free, the ${max_size} MiB checkpoint needs about $((max_size + 256))"
mem_free_mib=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
((mem_free_mib > 2 * max_size + 512)) \
    || die "only ${mem_free_mib} MiB of memory available, ${max_size} MiB needs about $((2 * max_size + 512)) (container + images)"

gcc -O2 -static -o "$work/pattern" "$REPO_ROOT/tests/programs/pattern.c" \
    || die "compiling tests/programs/pattern.c failed (static glibc: apt-get install libc6-dev)"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Rewrite results of this run only (a re-run on the same day replaces them).
rm -rf "$OUT/raw" "$OUT/logs" "$OUT/summary.md" "$OUT/summary.json"
mkdir -p "$OUT/raw" "$OUT/logs"

loadavg_start="$(cut -d" " -f1-3 /proc/loadavg)"
failures=0

# now_us: wall clock in microseconds, without forking.
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }

# first_criu_error LOG: the first error line of a CRIU log, or nothing.
first_criu_error() {
    if [[ -r $1 ]]; then grep -m1 'Error (' "$1" || true; fi
}

# keep_logs DIR PREFIX: copy CRIU's logs and stats of an image dir to the results.
keep_logs() {
    local dir=$1 prefix=$2 f
    for f in dump.log restore.log stats-dump stats-restore; do
        [[ -e $dir/$f ]] && cp "$dir/$f" "$OUT/logs/$prefix-$f"
    done
    return 0
}

# bench NAME SIZE: BENCH_RUNS checkpoint/restore cycles of a SIZE MiB pattern
# container. Times go to raw/NAME-SIZE.tsv (cycle, checkpoint us, restore us);
# a failure to raw/NAME-SIZE.failed, and returns 1.
bench() {
    local name=$1 size=$2
    local root=$work/root-$name id=ckpt-$name-$size bundle=$work/bundle-$name-$size
    local rt=("${BIN[$name]}" --criu "$CRIU_BIN" --root "$root")
    local rootfs=$bundle/rootfs err=$work/err raw=$OUT/raw/$name-$size
    local cycle img t0 t1 t2 t3 result

    fail() {
        local msg="$name $size MiB: $1"
        [[ -s $err ]] && msg+=" -- $(tail -n 3 "$err" | tr '\n' ' ')"
        warn "FAILED: $msg"
        echo "$msg" >"$raw.failed"
        "${rt[@]}" delete -f "$id" >/dev/null 2>&1 || true
        return 1
    }

    mkdir -p "$root"
    bash "$HACK_DIR/mkbundle.sh" "$bundle" /pattern "$size" 2>/dev/null || fail "making the bundle failed" || return 1
    cp "$work/pattern" "$rootfs/pattern"
    rm -f "$rootfs"/{ready,check,result}
    : >"$err"

    log "$name $size MiB: run -d, waiting for /ready"
    # The container's stdio is this, so /dev/null: CRIU cannot dump host files.
    "${rt[@]}" run -d -b "$bundle" "$id" </dev/null >/dev/null 2>&1 \
        || fail "run -d failed (run it by hand to see why)" || return 1
    wait_until "$READY_TIMEOUT" test -e "$rootfs/ready" \
        || fail "pattern did not write /ready within ${READY_TIMEOUT}s" || return 1

    : >"$raw.tsv"
    # Cycle 0 is a warm-up, not timed: the first checkpoint of a size fills
    # the image tmpfs with fresh pages and takes up to 3x longer, which
    # would count against whichever runtime goes first.
    for ((cycle = 0; cycle <= RUNS; cycle++)); do
        img=$images/$name-$size
        rm -rf "$img"
        mkdir -p "$img"
        t0=$(now_us)
        "${rt[@]}" checkpoint --image-path "$img" "$id" </dev/null >/dev/null 2>"$err" || {
            keep_logs "$img" "$name-$size-c$cycle"
            fail "checkpoint (cycle $cycle) failed$(first_criu_error "$img/dump.log" | sed 's/^/: /')"
            return 1
        }
        t1=$(now_us)
        if "${rt[@]}" state "$id" >/dev/null 2>&1; then
            warn "$name $size MiB: container still exists after checkpoint (cycle $cycle); deleting it"
            "${rt[@]}" delete -f "$id" >/dev/null 2>&1 || true
        fi
        t2=$(now_us)
        "${rt[@]}" restore -d --image-path "$img" -b "$bundle" "$id" </dev/null >/dev/null 2>"$err" || {
            keep_logs "$img" "$name-$size-c$cycle"
            fail "restore (cycle $cycle) failed$(first_criu_error "$img/restore.log" | sed 's/^/: /')"
            return 1
        }
        t3=$(now_us)
        ((cycle == 0)) || keep_logs "$img" "$name-$size-c$cycle"
        rm -rf "$img"
        [[ $("${rt[@]}" state "$id" 2>/dev/null | jq -r .status 2>/dev/null) == running ]] \
            || fail "container is not running after restore (cycle $cycle)" || return 1
        if ((cycle == 0)); then
            log "$name $size MiB warm-up cycle: checkpoint $(((t1 - t0) / 1000)) ms, restore $(((t3 - t2) / 1000)) ms (not counted)"
            continue
        fi
        printf '%d\t%d\t%d\n' "$cycle" $((t1 - t0)) $((t3 - t2)) >>"$raw.tsv"
        log "$name $size MiB cycle $cycle/$RUNS: checkpoint $(((t1 - t0) / 1000)) ms, restore $(((t3 - t2) / 1000)) ms"
    done

    # The memory of the last restored process must be the pattern, byte for byte.
    rm -f "$rootfs/result"
    touch "$rootfs/check"
    if ! wait_until "$CHECK_TIMEOUT" test -s "$rootfs/result"; then
        fail "ERROR: pattern check after the last restore got no /result within ${CHECK_TIMEOUT}s" || return 1
    fi
    result="$(cat "$rootfs/result")"
    [[ $result == "ok $size" ]] \
        || fail "ERROR: pattern check after the last restore says '$result', expected 'ok $size'" || return 1
    log "$name $size MiB: pattern verified after $RUNS restores ($result)"
    "${rt[@]}" delete -f "$id" >/dev/null 2>"$err" || warn "$name: delete -f $id failed: $(tail -n 1 "$err")"
    rm -rf "$bundle"
}

for size in "${SIZES[@]}"; do
    for name in "${RUNTIMES[@]}"; do
        bench "$name" "$size" || failures=$((failures + 1))
    done
done

env_json="$(
    {
        echo "date=$(date -Is)"
        echo "kernel=$(uname -r)"
        echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo) x $(nproc)"
        echo "loadavg_at_start=$loadavg_start"
        echo "loadavg_at_end=$(cut -d" " -f1-3 /proc/loadavg)"
        echo "sizes_mib=${SIZES[*]}"
        echo "runs=$RUNS"
        echo "criu=$CRIU_BIN ($("$CRIU_BIN" --version 2>/dev/null | awk '/^Version:/ {print $2}'))"
        echo "images=tmpfs ($images)"
        echo "migrun_commit=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
        echo "version_migrun=$("$MIGRUN_BIN" --version 2>/dev/null | head -n 1)"
        echo "version_runc=$(runc --version 2>/dev/null | head -n 1)"
    } | python3 -c 'import json, sys; print(json.dumps(dict(l.rstrip("\n").split("=", 1) for l in sys.stdin if "=" in l)))'
)"

status=0
python3 - "$OUT" "$env_json" "${SIZES[@]}" <<'PY' || status=$?
import json, os, re, statistics, subprocess, sys, shutil

out, env, sizes = sys.argv[1], json.loads(sys.argv[2]), [int(s) for s in sys.argv[3:]]
runtimes = ["migrun", "runc"]
crit = shutil.which("crit")

def stats(xs):
    return {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs),
            "samples_ms": xs} if xs else None

def log_ms(path):
    """CRIU's own duration: the last timestamp of its log, in ms."""
    last = None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = re.match(r"\((\d+)\.(\d+)\)", line)
                if m:
                    last = int(m.group(1)) * 1e3 + int(m.group(2)) / 1e3
    except OSError:
        pass
    return last

def crit_stats(path, key):
    if not crit or not os.path.exists(path):
        return None
    try:
        r = subprocess.run([crit, "show", path], capture_output=True, text=True, timeout=30)
        return json.loads(r.stdout)["entries"][0][key]
    except Exception:
        return None

def load(name, size):
    base = os.path.join(out, "raw", f"{name}-{size}")
    d = {"failed": None}
    if os.path.exists(base + ".failed"):
        with open(base + ".failed") as f:
            d["failed"] = f.read().strip()
    ck, rs = [], []
    try:
        with open(base + ".tsv") as f:
            for line in f:
                _, c, r = line.split()
                ck.append(int(c) / 1e3)
                rs.append(int(r) / 1e3)
    except OSError:
        pass
    if d["failed"]:
        ck, rs = [], []
    d["checkpoint"] = stats(ck)
    d["restore"] = stats(rs)
    d["checkpoint_restore"] = stats([c + r for c, r in zip(ck, rs)])
    # CRIU's share of the wall clock, from its logs and stats images.
    criu = {"dump_log_ms": [], "restore_log_ms": [], "frozen_ms": [], "memdump_ms": [],
            "memwrite_ms": [], "restore_time_ms": []}
    for cyc in range(1, len(ck) + 1):
        p = os.path.join(out, "logs", f"{name}-{size}-c{cyc}-")
        for k, f in (("dump_log_ms", "dump.log"), ("restore_log_ms", "restore.log")):
            v = log_ms(p + f)
            if v is not None:
                criu[k].append(v)
        sd = crit_stats(p + "stats-dump", "dump") or {}
        for k, f in (("frozen_ms", "frozen_time"), ("memdump_ms", "memdump_time"),
                     ("memwrite_ms", "memwrite_time")):
            if f in sd:
                criu[k].append(sd[f] / 1e3)
        sr = crit_stats(p + "stats-restore", "restore") or {}
        if "restore_time" in sr:
            criu["restore_time_ms"].append(sr["restore_time"] / 1e3)
    d["criu"] = {k: (statistics.median(v) if v else None) for k, v in criu.items()}
    return d

data = {s: {n: load(n, s) for n in runtimes} for s in sizes}
KEYS = [("checkpoint", "checkpoint (ms)"), ("restore", "restore (ms)"),
        ("checkpoint_restore", "checkpoint+restore (ms)")]

def med(s, n, k):
    return (data[s][n][k] or {}).get("median_ms")

for s in sizes:
    data[s]["ratio_runc_over_migrun"] = {
        k: (med(s, "runc", k) / med(s, "migrun", k)
            if med(s, "runc", k) and med(s, "migrun", k) else None) for k, _ in KEYS}

def fmt(r):
    if not r:
        return "failed"
    return f"{r['median_ms']:.0f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})"

def fx(x):
    return f"{x:.2f}x" if x else "n/a"

def table(head, rows):
    width = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, width)) + " |"
    return [line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in rows]

head = ["size (MiB)", "runtime"] + [label for _, label in KEYS]
rows = []
for s in sizes:
    for n in runtimes:
        rows.append([s, n] + [fmt(data[s][n][k]) for k, _ in KEYS])
    rows.append([s, "runc/migrun"] + [fx(data[s]["ratio_runc_over_migrun"][k]) for k, _ in KEYS])
main = table(head, rows)

def fm(x):
    return f"{x:.0f}" if x is not None else "n/a"

chead = ["size (MiB)", "runtime", "dump wall", "criu dump (log)", "frozen", "memdump",
         "memwrite", "restore wall", "criu restore (log)", "criu restore_time"]
crows = []
for s in sizes:
    for n in runtimes:
        d, c = data[s][n], data[s][n]["criu"]
        crows.append([s, n, fm(med(s, n, "checkpoint")), fm(c["dump_log_ms"]), fm(c["frozen_ms"]),
                      fm(c["memdump_ms"]), fm(c["memwrite_ms"]), fm(med(s, n, "restore")),
                      fm(c["restore_log_ms"]), fm(c["restore_time_ms"])])
criu_tab = table(chead, crows)

legend = (f"Wall-clock ms, median (min-max) over {env['runs']} checkpoint/restore cycles per size "
          "and runtime, both runtimes driving " + env["criu"] + "; images on tmpfs. "
          "runc/migrun > 1 means migrun is faster.")
criu_legend = ("CRIU's share (medians, ms): 'criu dump/restore (log)' is the last timestamp of "
               "dump.log/restore.log; frozen/memdump/memwrite/restore_time come from CRIU's "
               "stats-dump/stats-restore images (crit). Wall minus CRIU's log time is the "
               "runtime's own overhead plus starting CRIU.")

checks = []
for s in sizes:
    m, r = med(s, "migrun", "checkpoint_restore"), med(s, "runc", "checkpoint_restore")
    if m and r:
        checks.append(("PASS" if m <= r else "MISS",
                       f"migrun no slower than runc at {s} MiB (checkpoint+restore median): "
                       f"{m:.0f} ms vs {r:.0f} ms, runc/migrun = {r / m:.2f}x"))
    else:
        checks.append(("MISS", f"migrun no slower than runc at {s} MiB: no data "
                       f"(migrun: {data[s]['migrun']['failed'] or 'ok'}; runc: {data[s]['runc']['failed'] or 'ok'})"))
overall = "PASS" if all(v == "PASS" for v, _ in checks) else "MISS"
checks.append((overall, "migrun no slower than runc at every size (" + ", ".join(f"{s}" for s in sizes) + " MiB)"))

print()
print("\n".join(main))
print(legend)
print()
print("\n".join(criu_tab))
print(criu_legend)
print()
for v, l in checks:
    print(f"{v}: {l}")

with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("# migrun checkpoint/restore benchmark\n\n")
    f.write("busybox bundle running `/pattern SIZE` (tests/programs/pattern.c, SIZE MiB of "
            "anonymous memory filled with a pattern); stdio /dev/null; per size and runtime:\n\n")
    f.write("- checkpoint: `RT --criu CRIU --root ROOT checkpoint --image-path IMG ID`\n")
    f.write("- restore: `RT --criu CRIU --root ROOT restore -d --image-path IMG -b BUNDLE ID`\n")
    f.write("- cycles checkpoint -> restore repeated; the pattern is verified after the last restore\n\n")
    f.write("\n".join(main) + "\n\n" + legend + "\n\n")
    f.write("\n".join(criu_tab) + "\n\n" + criu_legend + "\n\n")
    f.write("\n".join(f"- {v}: {l}" for v, l in checks) + "\n")
    fails = [(s, n, data[s][n]["failed"]) for s in sizes for n in runtimes if data[s][n]["failed"]]
    if fails:
        f.write("\n## Failures\n\n" + "\n".join(f"- {msg}" for _, _, msg in fails) + "\n")
    f.write("\n## Environment\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"env": env, "results": {str(s): data[s] for s in sizes},
               "targets": [{"verdict": v, "check": l} for v, l in checks]}, f, indent=2)
    f.write("\n")
print(f"\nresults: {out}")
sys.exit(3 if overall == "MISS" else 0)
PY
# CRIU's debug logs compress about 10x (summary.py has read them by now).
if compgen -G "$OUT/logs/*.log" >/dev/null; then gzip -9f "$OUT"/logs/*.log; fi
case $status in
    0) ;;
    3) if [[ ${BENCH_STRICT:-0} == 1 && $failures -eq 0 ]]; then die "the target was missed"; fi ;;
    *) die "summary failed (status $status)" ;;
esac
((failures == 0)) || die "$failures checkpoint/restore benchmark(s) failed (see FAILED above and $OUT/logs)"
