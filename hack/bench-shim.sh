#!/usr/bin/env bash
# Usage: hack/bench-shim.sh
# migrun's containerd shim (io.containerd.migrun.v1) against containerd's
# io.containerd.runc.v2 (Go shim + runc), on the project's containerd
# (hack/containerd.sh up), in one run:
#   - memory: RSS of the shim process per running container (sum of the
#     Rss lines of /proc/PID/smaps, as containerd's rust-extensions report
#     it), and PSS (shared pages split between the shims), median of N
#   - latency: `ctr run --rm ... true`, median of RUNS runs
# Prints a table and the ratios; writes bench/results/DATE/shim/summary.json.
# Environment: BENCH_CONTAINERS (default 5), BENCH_RUNS (default 20).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_root
need_cmd ctr python3
N="${BENCH_CONTAINERS:-5}"
RUNS="${BENCH_RUNS:-20}"
IMAGE=docker.io/library/busybox:local
eval "$(bash "$HACK_DIR/containerd.sh" env)"
bash "$HACK_DIR/containerd.sh" status >/dev/null || die "the project's containerd is not running (hack/containerd.sh up)"
OUT="$REPO_ROOT/bench/results/$(date +%F)/shim"
mkdir -p "$OUT"
c() { ctr --address "$CONTAINERD_ADDRESS" "$@"; }

cleanup() {
    local id
    for id in $(c containers ls -q | grep '^bench-shim-' || true); do
        c tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            c tasks delete "$id" >/dev/null 2>&1 && break
            c tasks ls -q | grep -qxF "$id" || break
            sleep 0.2
        done
        c containers delete "$id" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
cleanup

# shim_of ID: pid of the shim process serving container ID.
shim_of() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd="$(tr '\0' ' ' 2>/dev/null <"$p/cmdline")" || continue
        [[ $cmd == *containerd-shim*" -id $1 "* && $cmd == *"$CONTAINERD_ADDRESS"* ]] && { echo "${p#/proc/}"; return 0; }
    done
    return 1
}

# memory RUNTIME TAG: "rss_kib pss_kib" of each of N shims, one per line.
memory() {
    local rt=$1 tag=$2 i id pid
    for i in $(seq 1 "$N"); do
        id="bench-shim-$tag-$i"
        c run -d --runtime "$rt" "$IMAGE" "$id" sleep 100000 </dev/null >/dev/null
    done
    sleep 1
    for i in $(seq 1 "$N"); do
        id="bench-shim-$tag-$i"
        pid="$(shim_of "$id")" || die "no shim for $id"
        awk '/^Rss:/{r+=$2} /^Pss:/{p+=$2} END{print r, p}' "/proc/$pid/smaps"
    done
    cleanup
}

# latency RUNTIME TAG: milliseconds of each `ctr run --rm ... true`, one per line.
latency() {
    local rt=$1 tag=$2 i t0 t1
    c run --rm --runtime "$rt" "$IMAGE" "bench-shim-$tag-warm" true </dev/null >/dev/null
    for i in $(seq 1 "$RUNS"); do
        t0=$(date +%s%N)
        c run --rm --runtime "$rt" "$IMAGE" "bench-shim-$tag-run" true </dev/null >/dev/null
        t1=$(date +%s%N)
        echo $(((t1 - t0) / 1000))
    done
}

log "memory: $N containers per runtime"
memory io.containerd.migrun.v1 migrun >"$OUT/memory-migrun.txt"
memory io.containerd.runc.v2 runc >"$OUT/memory-runc.txt"
log "latency: $RUNS runs of ctr run --rm ... true per runtime"
latency io.containerd.migrun.v1 migrun >"$OUT/latency-migrun.txt"
latency io.containerd.runc.v2 runc >"$OUT/latency-runc.txt"

python3 - "$OUT" <<'PY'
import json, statistics, sys, os
out = sys.argv[1]
def mem(tag):
    rows = [list(map(int, l.split())) for l in open(os.path.join(out, f"memory-{tag}.txt")) if l.strip()]
    return statistics.median(r[0] for r in rows) / 1024, statistics.median(r[1] for r in rows) / 1024
def lat(tag):
    return statistics.median(int(l) for l in open(os.path.join(out, f"latency-{tag}.txt")) if l.strip()) / 1000
m_rss, m_pss = mem("migrun"); r_rss, r_pss = mem("runc")
m_lat, r_lat = lat("migrun"), lat("runc")
print(f"{'shim':<26} {'RSS/shim MiB':>12} {'PSS/shim MiB':>12} {'ctr run --rm ms':>16}")
print(f"{'io.containerd.migrun.v1':<26} {m_rss:>12.2f} {m_pss:>12.2f} {m_lat:>16.1f}")
print(f"{'io.containerd.runc.v2':<26} {r_rss:>12.2f} {r_pss:>12.2f} {r_lat:>16.1f}")
print(f"ratios runc/migrun: RSS {r_rss/m_rss:.2f}x, PSS {r_pss/m_pss:.2f}x, latency {r_lat/m_lat:.2f}x")
print(f"targets: RSS <= 4 MiB: {'passed' if m_rss <= 4 else 'MISSED'}; faster than runc v2: {'passed' if m_lat < r_lat else 'MISSED'}")
json.dump({"migrun": {"rss_mib": m_rss, "pss_mib": m_pss, "run_rm_ms": m_lat},
           "runc_v2": {"rss_mib": r_rss, "pss_mib": r_pss, "run_rm_ms": r_lat}},
          open(os.path.join(out, "summary.json"), "w"), indent=2)
PY
