#!/usr/bin/env bash
# Usage: hack/bench-docker.sh        (make bench-docker)
# Docker-to-Docker migration: migrun against the by-hand route, in one run.
# Daemon A is the project's dockerd (hack/docker.sh), daemon B the second one
# (make docker-up-b); both on this host. The transfer runs on the test bed
# (hack/testbed.sh, links shaped to BENCH_RATE): migrate-out in mr-host-a,
# migrate-in in mr-host-b; the by-hand route pipes its tarballs through the
# same link (socat from mr-host-a to mr-host-b).
#
# The image: A's busybox:local plus a layer of BENCH_LAYER_MIB MiB of random
# data (a realistic application layer). Three cases for B: it lacks the
# image (no layer of it), it has the base layer (a two-layer image on top
# of the same base is loaded there first), it has the image.
# Each case: migrun pre-copy (migrate-out --docker-host / migrate-in
# --docker-host) and by hand: docker checkpoint create on A; docker save of
# the image and a tar of the checkpoint through the link; docker load,
# docker create and docker start --checkpoint on B.
# Figures: bytes over the link, total time, downtime (migrun: its own; by
# hand: from checkpoint create to start returning). Targets: with the image
# on B, migrun sends < 5% of the by-hand bytes; its downtime >= 10x below.
# Environment: BENCH_RUNS (3), BENCH_RATE (1gbit), BENCH_LAYER_MIB (64),
# BENCH_OUT (bench/results/DATE/docker).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=bench/docker-lib.sh
. "$HACK_DIR/bench/docker-lib.sh"

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,22s/^# \{0,1\}//p' "$0"; exit 0; }
require_root
need_cmd docker jq socat nsenter python3

RUNS=${BENCH_RUNS:-3}
RATE=${BENCH_RATE:-1gbit}
LAYER_MIB=${BENCH_LAYER_MIB:-64}
OUT=${BENCH_OUT:-$REPO_ROOT/bench/results/$(date +%F)/docker}
MIGRUN_BIN=${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}
A=$DOCKER_A
B=$DOCKER_B
PORT=7272
XPORT=7273

in_a() { in_netns mr-host-a "$@"; }
in_b() { in_netns mr-host-b "$@"; }
now_ms() { date +%s%3N; }

docker_require_ab
TESTBED_RATE=$RATE bash "$HACK_DIR/testbed.sh" up >/dev/null 2>&1 || die "hack/testbed.sh up failed"
eval "$(bash "$HACK_DIR/testbed.sh" env)"
ADDR_B=$TESTBED_ADDR_B

WORK="$(mktemp -d /tmp/migrun-bench-docker.XXXXXX)"
NAME=bench-dmig
BASE=bench-dmig-base:1
IMG=bench-dmig-app:1
cleanup() {
    set +e
    for h in "$A" "$B"; do
        docker -H "$h" rm -f "$NAME" "$NAME-build" >/dev/null 2>&1
        docker -H "$h" rmi -f "$IMG" "$BASE" >/dev/null 2>&1
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT/summary.md"
"$MIGRUN_BIN" keygen --out "$WORK/key" >/dev/null

# The images on A: BASE = busybox + a small layer, IMG = BASE + LAYER_MIB MiB.
da rm -f "$NAME-build" >/dev/null 2>&1 || true
da run --name "$NAME-build" busybox:local sh -c 'echo base > /base' >/dev/null
da commit "$NAME-build" "$BASE" >/dev/null && da rm "$NAME-build" >/dev/null
da run --name "$NAME-build" "$BASE" sh -c "head -c $((LAYER_MIB << 20)) /dev/urandom > /app.bin" >/dev/null
da commit "$NAME-build" "$IMG" >/dev/null && da rm "$NAME-build" >/dev/null

# prepare_b CASE: B lacks the image / has BASE / has IMG (loaded from A).
prepare_b() {
    db rm -f "$NAME" >/dev/null 2>&1 || true
    db rmi -f "$IMG" "$BASE" >/dev/null 2>&1 || true
    case $1 in
        lacks) ;;
        base) docker_share_image "$A" "$B" "$BASE" || die "docker save | load of $BASE failed" ;;
        has) docker_share_image "$A" "$B" "$IMG" || die "docker save | load of $IMG failed" ;;
    esac
}

start_app() {
    da rm -f "$NAME" >/dev/null 2>&1 || true
    da run -d --name "$NAME" --runtime=migrun "$IMG" sh -c \
        'i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done' >/dev/null
    wait_until 10 bash -c "[[ \$(docker -H $A logs $NAME 2>/dev/null | wc -l) -ge 3 ]]" || die "app did not start"
}

# migrun_run CASE RUN: one migrun migration A -> B; prints a JSON line.
migrun_run() {
    local case=$1 run=$2 stats=$WORK/stats.json
    prepare_b "$case"
    start_app
    in_b "$MIGRUN_BIN" --root "$WORK/rootb" migrate-in --listen "$ADDR_B:$PORT" --key "$WORK/key" \
        --once --work-dir "$WORK/inb" --docker-host "$B" >"$WORK/in.log" 2>&1 &
    local inpid=$!
    wait_until 10 grep -q listening "$WORK/in.log" || die "migrate-in did not listen: $(cat "$WORK/in.log")"
    in_a "$MIGRUN_BIN" migrate-out --docker-host "$A" "$NAME" --to "$ADDR_B:$PORT" --key "$WORK/key" \
        --work-dir "$WORK/outa" --stats-json "$stats" >"$WORK/out.log" 2>&1 \
        || die "migrate-out failed: $(tail -3 "$WORK/out.log") / $(tail -3 "$WORK/in.log")"
    wait "$inpid" || die "migrate-in failed: $(tail -3 "$WORK/in.log")"
    [[ $(db inspect -f '{{.State.Running}}' "$NAME") == true ]] || die "not running on B"
    jq -c --arg case "$case" --argjson run "$run" '{way: "migrun", case: $case, run: $run,
        bytes: .bytes_total, total_ms: .total_ms, downtime_ms: .downtime_ms,
        layers_sent: .layers_sent, layers_total: .layers_total}' "$stats"
    db rm -f "$NAME" >/dev/null
}

# byhand_run CASE RUN: docker checkpoint create, save + checkpoint through
# the link, load, create, start --checkpoint; prints a JSON line.
byhand_run() {
    local case=$1 run=$2
    prepare_b "$case"
    start_app
    local root_b id_b t0 t1 t2 bytes
    root_b="$(db info -f '{{.DockerRootDir}}')"
    rm -rf "$WORK/recv" && mkdir -p "$WORK/recv"
    link_receive mr-host-b "$ADDR_B" "$XPORT" >"$WORK/recv/bundle.tar" &
    local rpid=$!
    sleep 0.2
    t0=$(now_ms)
    da checkpoint create --checkpoint-dir "$WORK/ck" "$NAME" cp1 >/dev/null
    t1=$(now_ms)
    # What people send: the image (docker save) and the checkpoint.
    (
        cd "$WORK" && da save "$IMG" -o "$WORK/image.tar" \
            && tar -cf - image.tar -C "$WORK/ck" cp1
    ) | link_send mr-host-a "$ADDR_B" "$XPORT"
    wait "$rpid"
    bytes=$(stat -c %s "$WORK/recv/bundle.tar")
    tar -C "$WORK/recv" -xf "$WORK/recv/bundle.tar"
    db load -q -i "$WORK/recv/image.tar" >/dev/null
    id_b="$(db create --name "$NAME" --runtime=migrun "$IMG" sh -c \
        'i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done')"
    docker_start_from_checkpoint "$B" "$id_b" "$WORK/recv" cp1 "$root_b"
    t2=$(now_ms)
    [[ $(db inspect -f '{{.State.Running}}' "$NAME") == true ]] || die "by hand: not running on B"
    jq -cn --arg case "$case" --argjson run "$run" --argjson bytes "$bytes" \
        --argjson total $((t2 - t0)) --argjson ck $((t1 - t0)) '{way: "by-hand", case: $case,
        run: $run, bytes: $bytes, total_ms: $total, downtime_ms: $total, checkpoint_ms: $ck}'
    rm -rf "$WORK/ck" "$WORK/image.tar" "$WORK/recv"
    db rm -f "$NAME" >/dev/null
    da rm -f "$NAME" >/dev/null
}

: >"$OUT/runs.jsonl"
for case in lacks base has; do
    for run in $(seq 1 "$RUNS"); do
        log "$case, run $run: migrun"
        migrun_run "$case" "$run" | tee -a "$OUT/runs.jsonl" >&2
        log "$case, run $run: by hand"
        byhand_run "$case" "$run" | tee -a "$OUT/runs.jsonl" >&2
    done
done

python3 - "$OUT/runs.jsonl" "$OUT/summary.md" "$OUT/summary.json" "$RATE" "$LAYER_MIB" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out_md, out_json, rate, mib = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def med(xs): return statistics.median(xs) if xs else float("nan")
rows, summary = [], {}
for case in ["lacks", "base", "has"]:
    for way in ["migrun", "by-hand"]:
        rs = [r for r in runs if r["case"] == case and r["way"] == way]
        s = {k: med([r[k] for r in rs]) for k in ["bytes", "total_ms", "downtime_ms"]}
        s["n"] = len(rs)
        if way == "migrun":
            s["layers_sent"] = med([r["layers_sent"] for r in rs])
        summary[f"{case}/{way}"] = s
        rows.append(f"| {case} | {way} | {s['n']} | {s['bytes']/1048576:.2f} | {s['total_ms']:.0f} | {s['downtime_ms']:.0f} | {s.get('layers_sent', '')} |")
h, m = summary["has/by-hand"], summary["has/migrun"]
share = m["bytes"] / h["bytes"] * 100
ratio = h["downtime_ms"] / m["downtime_ms"]
lines = [
    "# Docker-to-Docker migration: migrun against the by-hand route",
    "",
    f"Image: busybox plus a small layer plus {mib} MiB of random data; daemons A and B on one host, the transfer over the test bed shaped to {rate}. Median of the runs.",
    "",
    "| B has | way | n | MiB over the link | total (ms) | downtime (ms) | layers sent |",
    "|---|---|---|---|---|---|---|",
    *rows,
    "",
    f"- {'PASS' if share < 5 else 'MISS'}: with the image on B, migrun sends {share:.1f}% of the by-hand bytes (target < 5%)",
    f"- {'PASS' if ratio >= 10 else 'MISS'}: with the image on B, migrun's downtime is {ratio:.1f}x below the by-hand route's (target >= 10x)",
]
open(out_md, "w").write("\n".join(lines) + "\n")
json.dump(summary, open(out_json, "w"), indent=2)
print("\n".join(lines))
EOF
