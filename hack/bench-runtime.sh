#!/usr/bin/env bash
# Usage: hack/bench-runtime.sh        (make bench-runtime)
# Benchmarks migrun against the other OCI runtimes installed here (runc, crun,
# youki if on PATH) on a busybox bundle running `true`:
#   run   RT --root ROOT run --bundle B ID
#   seq   RT --root ROOT create --bundle B ID && RT --root ROOT start ID
#           && RT --root ROOT delete -f ID      (youki's published benchmark)
#   rss   peak RSS of `RT create` as GNU time reports it (median of N runs)
# then prints a table with migrun's ratio against each peer and PASS/MISS for
# the targets, and writes summary.md/summary.json next to hyperfine's JSON.
# Environment:
#   MIGRUN_BIN      migrun binary (default: target/release/migrun)
#   BENCH_RUNS      hyperfine --runs (default 30; --warmup is BENCH_WARMUP, 5)
#   BENCH_RSS_RUNS  create runs for the RSS median (default 10)
#   BENCH_OUT       results dir (default bench/results/DATE/runtime)
#   BENCH_STRICT=1  exit 1 when a target is missed
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0; }
[[ $# -eq 0 ]] || die "no arguments expected (see $0 --help)"

RUNS=${BENCH_RUNS:-30}
WARMUP=${BENCH_WARMUP:-5}
RSS_RUNS=${BENCH_RSS_RUNS:-10}
OUT=${BENCH_OUT:-$REPO_ROOT/bench/results/$(date +%F)/runtime}
MIGRUN_BIN=${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}
GNU_TIME=/usr/bin/time
for v in RUNS WARMUP RSS_RUNS; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || ((${!v} < 1)); then
        die "BENCH_$v must be a positive integer, got '${!v}'"
    fi
done
((RUNS >= 2)) || die "BENCH_RUNS must be >= 2 (hyperfine needs 2 runs for a stddev)"

require_root
[[ -x $MIGRUN_BIN ]] || die "migrun binary $MIGRUN_BIN not found (make build, or set MIGRUN_BIN)"

hugetlb_mounted() {
    awk '$2 == "/sys/fs/cgroup/hugetlb" && $3 == "cgroup" {f = 1} END {exit !f}' /proc/mounts
}

# Dependencies: hyperfine, GNU time, jq/python3/runc (for the bundle and the
# summary) and, when crun is installed, the hugetlb v1 hierarchy it needs on
# this hybrid-cgroup host. install-deps.sh is idempotent but only run if needed.
deps_missing=0
for c in hyperfine jq python3 runc; do command -v "$c" >/dev/null 2>&1 || deps_missing=1; done
[[ -x $GNU_TIME ]] || deps_missing=1
if command -v crun >/dev/null 2>&1 && ! hugetlb_mounted; then deps_missing=1; fi
if ((deps_missing)); then
    log "installing missing dependencies: hack/install-deps.sh --crun"
    bash "$HACK_DIR/install-deps.sh" --crun >&2
fi
need_cmd hyperfine jq python3 runc
[[ -x $GNU_TIME ]] || die "$GNU_TIME not found (apt-get install time)"

work="$(mktemp -d /tmp/migrun-bench.XXXXXX)"
names=() bins=() roots=()
cleanup() {
    local i id
    for i in "${!names[@]}"; do
        for id in $("${bins[$i]}" --root "${roots[$i]}" list -q 2>/dev/null); do
            "${bins[$i]}" --root "${roots[$i]}" delete -f "$id" >/dev/null 2>&1 || true
        done
    done
    rm -rf "$work"
}
trap cleanup EXIT

bundle=$work/bundle
bash "$HACK_DIR/mkbundle.sh" "$bundle" true 2>/dev/null || die "making the busybox bundle failed"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# smoke NAME BIN ROOT: both benchmark commands work once and `run` leaves no
# container behind. Sets run_prepare to a delete command if it does.
smoke() {
    local name=$1 bin=$2 root=$3 id=bench-$1 err=$work/smoke.err
    run_prepare=""
    if ! "$bin" --root "$root" run --bundle "$bundle" "$id-run" </dev/null >/dev/null 2>"$err"; then
        warn "$name: 'run' of busybox true failed: $(tail -n 3 "$err")"
        return 1
    fi
    if "$bin" --root "$root" state "$id-run" >/dev/null 2>&1; then
        warn "$name: 'run' leaves the container behind; deleting it in hyperfine --prepare"
        run_prepare="$(printf '%q --root %q delete -f %q >/dev/null 2>&1 || true' "$bin" "$root" "$id-run")"
        "$bin" --root "$root" delete -f "$id-run" >/dev/null 2>&1 || true
    fi
    if ! { "$bin" --root "$root" create --bundle "$bundle" "$id-seq" \
            && "$bin" --root "$root" start "$id-seq" \
            && "$bin" --root "$root" delete -f "$id-seq"; } </dev/null >/dev/null 2>"$err"; then
        warn "$name: create/start/delete failed: $(tail -n 3 "$err")"
        "$bin" --root "$root" delete -f "$id-seq" >/dev/null 2>&1 || true
        return 1
    fi
}

candidates=("migrun:$MIGRUN_BIN")
for rt in runc crun; do
    if command -v "$rt" >/dev/null 2>&1; then
        candidates+=("$rt:$(command -v "$rt")")
    else
        log "$rt is not installed, skipping it"
    fi
done
if command -v youki >/dev/null 2>&1; then
    candidates+=("youki:$(command -v youki)")
else
    log "youki is not installed, skipping it: its upstream binary is built without cgroup v1 support and fails on this hybrid-cgroup (v1) host"
fi

declare -A prepare=()
for c in "${candidates[@]}"; do
    name=${c%%:*} bin=${c#*:} root=$work/root-$name
    mkdir -p "$root"
    if smoke "$name" "$bin" "$root"; then
        names+=("$name") bins+=("$bin") roots+=("$root")
        prepare[$name]=$run_prepare
    elif [[ $name == migrun ]]; then
        die "migrun does not pass the smoke test, nothing to benchmark"
    else
        warn "$name: smoke test failed, leaving it out"
    fi
done

# Rewrite results of this run only (a re-run on the same day replaces them).
rm -f "$OUT"/run-*.json "$OUT"/seq-*.json "$OUT"/rss-*.txt "$OUT"/summary.md "$OUT"/summary.json

# hyperfine_bench BENCH NAME CMD [PREPARE]
hyperfine_bench() {
    local bench=$1 name=$2 cmd=$3 prep=${4:-}
    local args=(--warmup "$WARMUP" --runs "$RUNS" --command-name "$name $bench"
        --export-json "$OUT/$bench-$name.json")
    [[ -z $prep ]] || args+=(--prepare "$prep")
    log "hyperfine: $name $bench"
    hyperfine "${args[@]}" "$cmd" </dev/null || { warn "$name: hyperfine $bench failed"; rm -f "$OUT/$bench-$name.json"; }
}

for i in "${!names[@]}"; do
    name=${names[$i]} bin=${bins[$i]} root=${roots[$i]} id=bench-${names[$i]}
    rt="$(printf '%q --root %q' "$bin" "$root")"
    hyperfine_bench run "$name" "$rt run --bundle $(printf %q "$bundle") $id-run" "${prepare[$name]}"
    hyperfine_bench seq "$name" "$rt create --bundle $(printf %q "$bundle") $id-seq && $rt start $id-seq && $rt delete -f $id-seq"
done

# Peak RSS of `create`: GNU time's %M is ru_maxrss (KiB) of its child, which
# covers the largest process among that child and the descendants it waited
# for; the container init process left behind by create is not included.
for i in "${!names[@]}"; do
    name=${names[$i]} bin=${bins[$i]} root=${roots[$i]} id=bench-${names[$i]}-rss
    log "peak RSS during create: $name ($RSS_RUNS runs)"
    : >"$OUT/rss-$name.txt"
    for ((n = 0; n < RSS_RUNS; n++)); do
        if ! "$GNU_TIME" -f %M -o "$work/rss" "$bin" --root "$root" create --bundle "$bundle" "$id" \
                </dev/null >/dev/null 2>"$work/rss.err"; then
            warn "$name: create failed: $(tail -n 3 "$work/rss.err")"
            "$bin" --root "$root" delete -f "$id" >/dev/null 2>&1 || true
            rm -f "$OUT/rss-$name.txt"
            break
        fi
        "$bin" --root "$root" delete -f "$id" >/dev/null 2>&1 || warn "$name: delete -f $id failed"
        tail -n 1 "$work/rss" >>"$OUT/rss-$name.txt"
    done
done

# Environment for the summary.
env_json="$(
    {
        echo "date=$(date -Is)"
        echo "kernel=$(uname -r)"
        echo "loadavg_at_end=$(cut -d" " -f1-3 /proc/loadavg)"
        echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo) x $(nproc)"
        echo "hyperfine=$(hyperfine --version)"
        echo "runs=$RUNS"
        echo "warmup=$WARMUP"
        echo "rss_runs=$RSS_RUNS"
        echo "migrun_commit=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
        for i in "${!names[@]}"; do
            echo "version_${names[$i]}=$("${bins[$i]}" --version 2>/dev/null | head -n 1)"
        done
    } | python3 -c 'import json, sys; print(json.dumps(dict(l.rstrip("\n").split("=", 1) for l in sys.stdin if "=" in l)))'
)"

status=0
python3 - "$OUT" "$env_json" "${names[@]}" <<'PY' || status=$?
import json, os, statistics, sys

out, env, names = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
BENCHES = [("run", "run (ms)"), ("seq", "create+start+delete (ms)")]

def load(bench, name):
    try:
        with open(os.path.join(out, f"{bench}-{name}.json")) as f:
            r = json.load(f)["results"][0]
        return {"mean_ms": r["mean"] * 1e3, "stddev_ms": (r["stddev"] or 0) * 1e3,
                "median_ms": r["median"] * 1e3, "min_ms": r["min"] * 1e3,
                "max_ms": r["max"] * 1e3, "runs": len(r["times"])}
    except (OSError, KeyError, IndexError, ValueError):
        return None

def rss(name):
    try:
        with open(os.path.join(out, f"rss-{name}.txt")) as f:
            kib = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None
    if not kib:
        return None
    return {"median_mib": statistics.median(kib) / 1024, "min_mib": min(kib) / 1024,
            "max_mib": max(kib) / 1024, "samples_kib": kib}

data = {n: {"run": load("run", n), "seq": load("seq", n), "rss_create": rss(n)} for n in names}
mig = data["migrun"]

def ratio(peer, key, field):
    a, b = (peer[key] or {}).get(field), (mig[key] or {}).get(field)
    return a / b if a and b else None

for n in names:
    if n == "migrun":
        continue
    data[n]["ratio_vs_migrun"] = {
        "run": ratio(data[n], "run", "mean_ms"),
        "seq": ratio(data[n], "seq", "mean_ms"),
        "rss_create": ratio(data[n], "rss_create", "median_mib"),
    }

def fmt_t(r):
    return f"{r['mean_ms']:.2f} ± {r['stddev_ms']:.2f}" if r else "n/a"

def fmt_x(x):
    return f"{x:.2f}x" if x else "n/a"

head = ["runtime", "run (ms)", "create+start+delete (ms)", "peak RSS create (MiB)",
        "run ratio", "c+s+d ratio", "RSS ratio"]
rows = []
for n in names:
    d = data[n]
    rr = d.get("ratio_vs_migrun", {})
    rows.append([n, fmt_t(d["run"]), fmt_t(d["seq"]),
                 f"{d['rss_create']['median_mib']:.2f}" if d["rss_create"] else "n/a",
                 "-" if n == "migrun" else fmt_x(rr.get("run")),
                 "-" if n == "migrun" else fmt_x(rr.get("seq")),
                 "-" if n == "migrun" else fmt_x(rr.get("rss_create"))])
width = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, width)) + " |"
table = [line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in rows]
legend = ("Ratios are peer / migrun (mean time; median peak RSS): > 1 means migrun is "
          "faster / smaller. Times are mean ± stddev over "
          f"{env['runs']} runs ({env['warmup']} warmup); peak RSS is GNU time's %M of `create`, median of {env['rss_runs']} runs.")

checks = []
def check(label, ok):
    checks.append(("PASS" if ok else "MISS") if ok is not None else "SKIP")
    checks[-1] = (checks[-1], label)

def mean(n, b):
    return (data.get(n, {}).get(b) or {}).get("mean_ms")

for b, label in BENCHES:
    m, r, c = mean("migrun", b), mean("runc", b), mean("crun", b)
    check(f"migrun faster than runc on {label.split(' (')[0]}: "
          + (f"{m:.2f} ms vs {r:.2f} ms" if m and r else "no data"),
          m < r if m and r else None)
    check(f"migrun within 1.5x of crun on {label.split(' (')[0]}: "
          + (f"{m:.2f} ms vs {c:.2f} ms = {m / c:.2f}x" if m and c else "no data"),
          m <= 1.5 * c if m and c else None)
mr = (mig["rss_create"] or {}).get("median_mib")
rr = ((data.get("runc") or {}).get("rss_create") or {}).get("median_mib")
check("migrun peak RSS during create <= runc's: "
      + (f"{mr:.2f} MiB vs {rr:.2f} MiB" if mr and rr else "no data"),
      mr <= rr if mr and rr else None)

print()
print("\n".join(table))
print(legend)
print()
for verdict, label in checks:
    print(f"{verdict}: {label}")

with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("# migrun runtime benchmark\n\n")
    f.write("busybox bundle running `true`; each runtime with its own --root.\n\n")
    f.write("- run: `RT --root ROOT run --bundle B ID`\n")
    f.write("- create+start+delete: `RT create --bundle B ID && RT start ID && RT delete -f ID`\n")
    f.write("- peak RSS create: `/usr/bin/time -f %M RT create --bundle B ID`\n\n")
    f.write("\n".join(table) + "\n\n" + legend + "\n\n")
    f.write("\n".join(f"- {v}: {l}" for v, l in checks) + "\n\n## Environment\n\n")
    f.write("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"env": env, "results": data,
               "targets": [{"verdict": v, "check": l} for v, l in checks]}, f, indent=2)
    f.write("\n")
print(f"\nresults: {out}")
sys.exit(3 if any(v == "MISS" for v, _ in checks) else 0)
PY
case $status in
    0) ;;
    3) if [[ ${BENCH_STRICT:-0} == 1 ]]; then die "some targets were missed"; fi ;;
    *) die "summary failed (status $status)" ;;
esac
for b in run seq; do
    [[ -s $OUT/$b-migrun.json ]] || die "no $b result for migrun (hyperfine failed, see above)"
done
