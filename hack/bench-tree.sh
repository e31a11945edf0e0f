#!/usr/bin/env bash
# Usage: hack/bench-tree.sh        (make bench-tree)
# The time cost of confined file access in the live-migration file sync
# (commit 192c4cc): crates/migrate/examples/tree_cost/ times the
# path-based code from before it (a labelled copy of
# crates/migrate/src/rootfs.rs at dcaa4ff, used by nothing else) against
# the current migrun_migrate::tree / rootfs, on the same tree in the same
# run, old and new alternating, BENCH_RUNS runs after BENCH_WARMUP warm-up
# runs (caches warm). Phases: snapshot (source walk), read (round 0: every
# file's data; read.shipped: with each source's own buffer allocation),
# write (target: every file into an empty directory), apply
# (round 0's manifest), round.source / round.target (a later round with
# nothing changed: snapshot + changed files, manifest applied). The first
# warm-up run checks both copies against the tree.
# The tree: the static-web scenario's image of the benchmark suite (nginx
# serving 300 files of 1-64 KiB, hack/bench/images.sh nginx, built here if
# missing), read in place. The target side is timed on each of
# BENCH_TREE_TARGETS:
#   tmpfs  a tmpfs mounted for the run: the code's system calls without a
#          disk file system's allocation costs (copies removed after each run)
#   disk   a directory in BENCH_TREE_DISK_DIR (the file system migrate-in's
#          work dir would be on); every run writes a new copy and all are
#          removed at the end (ext4 without a journal makes allocating inodes
#          slow for a minute after freeing as many)
# The benchmark's own build: cargo build --release -p migrun-migrate
# --example tree_cost. Writes summary.md/summary.json and raw/ (per target:
# the example's JSON with every sample, its table, its log).
# Environment:
#   BENCH_RUNS            timed runs per side (default 20)
#   BENCH_WARMUP          warm-up runs per side (default 2)
#   BENCH_TREE            the tree (default: BENCH_IMAGES/nginx/rootfs)
#   BENCH_IMAGES          the suite's images (default /var/cache/migrun/bench-images)
#   BENCH_TREE_TARGETS    default "tmpfs disk"
#   BENCH_TREE_DISK_DIR   where the disk target's copies go (default /var/tmp)
#   BENCH_OUT             results dir (default bench/results/DATE/tree)
#   TREE_COST_BIN         a built tree_cost (default: built here)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,36s/^# \{0,1\}//p' "$0"; exit 0; }
[[ $# -eq 0 ]] || die "no arguments expected (see $0 --help)"

RUNS=${BENCH_RUNS:-20}
WARMUP=${BENCH_WARMUP:-2}
IMAGES=${BENCH_IMAGES:-/var/cache/migrun/bench-images}
TREE=${BENCH_TREE:-}
read -r -a TARGETS <<<"${BENCH_TREE_TARGETS:-tmpfs disk}"
DISK_DIR=${BENCH_TREE_DISK_DIR:-/var/tmp}
OUT=${BENCH_OUT:-$REPO_ROOT/bench/results/$(date +%F)/tree}
CARGO=${CARGO:-cargo}
export PATH="/usr/local/sbin:/usr/local/bin:$PATH:/root/.cargo/bin"

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, got '$RUNS'"
[[ $WARMUP =~ ^[1-9][0-9]*$ ]] || die "BENCH_WARMUP must be a positive integer (the first warm-up run checks the copies), got '$WARMUP'"
((${#TARGETS[@]} > 0)) || die "BENCH_TREE_TARGETS is empty"
for t in "${TARGETS[@]}"; do
    [[ $t == tmpfs || $t == disk ]] || die "unknown target '$t' in BENCH_TREE_TARGETS (tmpfs, disk)"
done
require_root
need_cmd python3 mount umount findmnt

if [[ -z $TREE ]]; then
    bash "$HACK_DIR/bench/images.sh" nginx || die "building the nginx image failed (hack/bench/images.sh nginx)"
    TREE=$IMAGES/nginx/rootfs
fi
[[ -d $TREE ]] || die "the tree $TREE is not a directory"

BIN=${TREE_COST_BIN:-}
if [[ -z $BIN ]]; then
    log "building the benchmark: $CARGO build --release -p migrun-migrate --example tree_cost"
    (cd "$REPO_ROOT" && "$CARGO" build --release -p migrun-migrate --example tree_cost) >&2 \
        || die "building tree_cost failed"
    BIN=$REPO_ROOT/target/release/examples/tree_cost
fi
[[ -x $BIN ]] || die "$BIN is not executable"

WORK=""
MNT=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -z $MNT ]] || umount "$MNT" || warn "cannot unmount $MNT"
    [[ -z $WORK ]] || rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK="$(mktemp -d "$DISK_DIR/migrun-bench-tree.XXXXXX")"
tree_kib=$(du -sk "$TREE" | awk '{print $1}')
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -rf "$OUT/raw" "$OUT/summary.md" "$OUT/summary.json"
mkdir -p "$OUT/raw"
loadavg_start="$(cut -d" " -f1-3 /proc/loadavg)"
busy_start="$(ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 >= 20 {printf "%s(%s%%) ", $2, $1}' | head -c 300)"
# fs_of DIR: its file system type and mount options; for ext4, whether it
# has a journal (this machine's root file system has none)
fs_of() {
    local src type opts j=""
    src="$(findmnt -no SOURCE -T "$1" 2>/dev/null || true)"
    type="$(findmnt -no FSTYPE -T "$1" 2>/dev/null || true)"
    opts="$(findmnt -no OPTIONS -T "$1" 2>/dev/null || true)"
    if [[ -r /sys/fs/ext4/${src##*/}/journal_task ]]; then
        if [[ $(cat "/sys/fs/ext4/${src##*/}/journal_task") == "<none>" ]]; then j=", no journal"; else j=", journal"; fi
    fi
    echo "${type:-unknown} ($opts$j)"
}
declare -A TARGET_FS
for t in "${TARGETS[@]}"; do
    args=(--tree "$TREE" --runs "$RUNS" --warmup "$WARMUP" --json "$OUT/raw/$t.json")
    case $t in
        tmpfs)
            MNT=$WORK/tmpfs
            mkdir -p "$MNT"
            # one copy at a time, twice the tree is plenty
            mount -t tmpfs -o "size=$((2 * tree_kib + 65536))k,mode=0700" tmpfs "$MNT" \
                || die "mounting a tmpfs on $MNT failed"
            TARGET_FS[$t]="$(fs_of "$MNT")"
            args+=(--work "$MNT/copies") ;;
        disk)
            avail_kib=$(df -Pk "$WORK" | awk 'NR == 2 {print $4}')
            need_kib=$((2 * (RUNS + WARMUP) * tree_kib + 1048576))
            ((avail_kib > need_kib)) || die "$DISK_DIR has $((avail_kib / 1024)) MiB free; the disk target needs about $((need_kib / 1024)) MiB"
            TARGET_FS[$t]="$DISK_DIR: $(fs_of "$WORK")"
            args+=(--work "$WORK/copies" --keep-copies) ;;
    esac
    log "$t: $BIN ${args[*]}"
    "$BIN" "${args[@]}" >"$OUT/raw/$t.md" 2>"$OUT/raw/$t.log" \
        || die "tree_cost on the $t target failed: $(tail -n 5 "$OUT/raw/$t.log" | tr '\n' ' ')"
    cat "$OUT/raw/$t.md" >&2
    if [[ $t == tmpfs ]]; then
        umount "$MNT" || warn "cannot unmount $MNT"
        MNT=""
    fi
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
        echo "warmup=$WARMUP"
        echo "tree=$TREE"
        echo "tree_fs=$(fs_of "$TREE")"
        echo "tree_recipe=$(cat "$TREE/../recipe" 2>/dev/null || echo none)"
        echo "tree_du_mib=$((tree_kib / 1024))"
        for t in "${TARGETS[@]}"; do echo "target_fs_$t=${TARGET_FS[$t]}"; done
        echo "migrun_commit=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
        echo "tree_cost_bin=$BIN (sha256 $(sha256sum "$BIN" | cut -c1-16))"
    } | python3 -c 'import json, sys; print(json.dumps(dict(l.rstrip("\n").split("=", 1) for l in sys.stdin if "=" in l)))'
)"

python3 - "$OUT" "$env_json" "${TARGETS[@]}" <<'PY' || die "the summary failed"
import json, os, sys

out, env, targets = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
res = {t: json.load(open(os.path.join(out, "raw", t + ".json"))) for t in targets}
first = res[targets[0]]

def kinds(side):
    s = first[side]
    k = ", ".join(f"{n} {v}" for v, n in sorted(s["snapshot"]["kinds"].items()))
    return (f"{s['snapshot']['entries']} entries ({k}); round 0 reads {s['files_read']} files, "
            f"{s['bytes_read'] / 1048576:.1f} MiB")

lines = ["# Confined file access: time cost on the static-web rootfs", ""]
lines.append(f"Tree: `{env['tree']}` ({env['tree_du_mib']} MiB on {env['tree_fs']}, recipe {env['tree_recipe']}).")
lines.append(f"- old (before 192c4cc, path-based; baseline copy in crates/migrate/examples/tree_cost/old_rootfs.rs): {kinds('old')}")
lines.append(f"- new (migrun_migrate::tree / rootfs): {kinds('new')}")
lines.append("")
lines.append(f"Median (p25-p75) in ms of {env['runs']} runs per side after {env['warmup']} warm-up runs, "
             "old and new alternating which goes first; new/old: ratio of the medians, and the median "
             "(min-max) of the per-run ratios (the two sides of one run back to back). "
             "read.shipped: read with each source's own buffer (old: a zeroed 4 MiB buffer per file, "
             "as the old Source::stream_file; new: one per round, as Source::send_tree). "
             "round = round.source + round.target; total = every phase but read.shipped.")
for t in targets:
    lines += ["", f"## Target on {t} ({env['target_fs_' + t]})", ""]
    if t == "disk":
        lines += ["Every run writes a new copy (new inodes, removed at the end); write and apply include the "
                  "file system's own allocation work and whatever else writes to that disk meanwhile: "
                  "compare the spreads.", ""]
    lines.append("| phase | old ms | new ms | new/old | new/old per run |")
    lines.append("|---|---|---|---|---|")
    for r in res[t]["phases"]:
        o, n, pr = r["old"], r["new"], r["ratio_per_run"]
        lines.append(f"| {r['phase']} | {o['median_ms']:.2f} ({o['p25_ms']:.2f}-{o['p75_ms']:.2f}) "
                     f"| {n['median_ms']:.2f} ({n['p25_ms']:.2f}-{n['p75_ms']:.2f}) "
                     f"| {r['ratio_new_over_old']:.2f} | {pr['median']:.2f} ({pr['min']:.2f}-{pr['max']:.2f}) |")
    j = res[t]["manifest_json_ms"]
    lines.append("")
    lines.append(f"Manifest JSON encode + decode, not in the phases (median of 5): "
                 f"old {j['old']['median_ms']:.2f} ms, new {j['new']['median_ms']:.2f} ms.")
lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"env": env, "results": res}, f, indent=2)
    f.write("\n")
print(f"results: {out}", file=sys.stderr)
PY
