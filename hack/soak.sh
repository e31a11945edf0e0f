#!/usr/bin/env bash
# Usage: hack/soak.sh            (make soak; not part of make test)
# Live-migrates containers back and forth between two migrun roots on this
# host (migrate-in daemons on loopback, one per side), SOAK_MOVES times per
# scenario, and checks the data after every move. Counts moves that failed
# (the container must then still run on the side it was on), lost
# containers and corrupt data; exits non-zero if any was lost or corrupt.
#   dirtier  tests/programs/dirtier holding SOAK_DIRTIER_MIB MiB and
#            rewriting it at 8 MiB/s; after each move its own pattern check
#            (every page holds what it last wrote)
#   redis    redis-server; before each move a burst of 20,000 SETs (1 KiB
#            values over 100,000 keys) from redis-benchmark inside the
#            container, then the keyspace's DEBUG DIGEST; after the move the
#            digest on the other side must be the same. (The load does not
#            run during the move: a SIGSTOPped load generator in the
#            container made migrate-out hang, see the closing note.)
# Environment: SOAK_MOVES (default 500), SOAK_SCENARIOS ("dirtier redis"),
# SOAK_DIRTIER_MIB (64), SOAK_OUT (default bench/results/<date>/soak):
# summary.json and moves.tsv (one line per move: scenario, n, direction,
# result, downtime ms, total ms).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MOVES=${SOAK_MOVES:-500}
read -r -a SCENARIOS <<<"${SOAK_SCENARIOS:-dirtier redis}"
DIRTIER_MIB=${SOAK_DIRTIER_MIB:-64}
OUT=${SOAK_OUT:-$REPO_ROOT/bench/results/$(date -u +%F)/soak}
IMAGES=${BENCH_IMAGES:-/var/cache/migrun/bench-images}
MIGRUN=${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}
export PATH=/usr/local/sbin:$PATH

[[ -x $MIGRUN ]] || die "$MIGRUN not built (make build)"
need_cmd jq
WORK="$(mktemp -d /run/migrun-soak.XXXXXX)"
declare -A ROOT=([a]="$WORK/root-a" [b]="$WORK/root-b")
declare -A PORT=([a]=$((30000 + RANDOM % 2000)) [b]=$((32000 + RANDOM % 2000)))
declare -A INPID=()
KEY="$WORK/pair.key"
mkdir -p "$OUT"
: >"$OUT/moves.tsv"

mr() { local side=$1; shift; "$MIGRUN" --root "${ROOT[$side]}" "$@"; }
other() { [[ $1 == a ]] && echo b || echo a; }

cleanup() {
    local side id
    for side in a b; do
        [[ -n ${INPID[$side]:-} ]] && kill "${INPID[$side]}" 2>/dev/null || true
        for id in $(mr "$side" list -q 2>/dev/null); do mr "$side" delete -f "$id" >/dev/null 2>&1 || true; done
    done
    wait 2>/dev/null || true
    for d in "$WORK"/bundle-*; do
        [[ -d $d ]] || continue
        umount "$d/rootfs" 2>/dev/null || true
    done
    umount -R "$WORK"/root-*/.bundles/*/bundle/rootfs 2>/dev/null || true
    rm -rf --one-file-system "$WORK" 2>/dev/null || true
}
trap cleanup EXIT

"$MIGRUN" keygen --out "$KEY" >/dev/null
for side in a b; do
    mkdir -p "${ROOT[$side]}" "$WORK/in-$side"
    "$MIGRUN" --root "${ROOT[$side]}" migrate-in --listen "127.0.0.1:${PORT[$side]}" --key "$KEY" \
        --work-dir "$WORK/in-$side" 2>>"$WORK/migrate-in-$side.log" &
    INPID[$side]=$!
done
for side in a b; do
    for _ in $(seq 100); do grep -q listening "$WORK/migrate-in-$side.log" 2>/dev/null && break; sleep 0.1; done
    grep -q listening "$WORK/migrate-in-$side.log" || die "migrate-in on $side did not start: $(tail -n 5 "$WORK/migrate-in-$side.log")"
done

# bundle NAME IMAGE ARGS...: an overlay bundle over the benchmark image.
bundle() {
    local dir="$WORK/bundle-$1" image=$2; shift 2
    [[ -d $IMAGES/$image/rootfs ]] || die "no image $image in $IMAGES (hack/bench/images.sh $image)"
    mkdir -p "$dir"/{upper,work,rootfs}
    mount -t overlay overlay -o "lowerdir=$IMAGES/$image/rootfs,upperdir=$dir/upper,workdir=$dir/work" "$dir/rootfs"
    "$MIGRUN" spec --bundle "$dir" 2>/dev/null || (cd "$dir" && "$MIGRUN" spec)
    local args
    args="$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@")"
    jq --argjson args "$args" '.process.terminal = false | .process.args = $args | .root.path = "rootfs" | .root.readonly = false' \
        "$dir/config.json" >"$dir/config.json.new"
    mv "$dir/config.json.new" "$dir/config.json"
    echo "$dir"
}

pid_of() { mr "$1" state "$2" 2>/dev/null | jq -r '.pid // empty'; }
status_of() { mr "$1" state "$2" 2>/dev/null | jq -r '.status // empty'; }

# dirtier_check SIDE ID: its pattern check, through the container's root.
dirtier_check() {
    local pid r
    pid="$(pid_of "$1" "$2")"
    [[ -n $pid ]] || { echo "no process"; return; }
    r="/proc/$pid/root"
    rm -f "$r/result"
    : >"$r/check"
    for _ in $(seq 300); do [[ -s $r/result ]] && break; sleep 0.1; done
    cat "$r/result" 2>/dev/null || echo "no answer"
}

redis_digest() { mr "$1" exec "$2" redis-cli -p 6379 debug digest 2>/dev/null | tr -d '\r'; }

# Lost and corrupt moves end a scenario (counted here); moved and failed
# ones are counted from moves.tsv.
declare -A LOST=() CORRUPT=()

# move SCENARIO N ID FROM: one migration; prints the side it runs on after.
move() {
    local sc=$1 n=$2 id=$3 from=$4 to stats err result dt tt
    to="$(other "$from")"
    stats="$WORK/stats.json"
    err="$WORK/out.log"
    rm -f "$stats"
    if mr "$from" migrate-out "$id" --to "127.0.0.1:${PORT[$to]}" --key "$KEY" \
        --work-dir "$WORK/out-$from" --stats-json "$stats" >/dev/null 2>"$err"; then
        result=moved
    else
        result="failed: $(tail -n 1 "$err")"
        to=$from
    fi
    dt="$(jq -r '.downtime_ms // 0' "$stats" 2>/dev/null || echo 0)"
    tt="$(jq -r '.total_ms // 0' "$stats" 2>/dev/null || echo 0)"
    printf '%s\t%s\t%s->%s\t%s\t%.0f\t%.0f\n' "$sc" "$n" "$from" "$(other "$from")" "$result" "$dt" "$tt" >>"$OUT/moves.tsv"
    echo "$to"
}

count_moves() { awk -F'\t' -v s="$1" -v r="$2" '$1 == s && ($4 == r || (r == "failed" && $4 ~ /^failed/))' "$OUT/moves.tsv" | wc -l; }
failed_moves() { count_moves "$1" failed; }

soak_dirtier() {
    local id b side=a n res
    id="soak-dirtier-$$"
    b="$(bundle dirtier dirtier /dirtier "$DIRTIER_MIB" 8)"
    mr a run -d -b "$b" "$id" </dev/null >/dev/null 2>&1
    res="$(dirtier_check a "$id")"
    [[ $res == "ok $DIRTIER_MIB" ]] || die "dirtier not ready: $res"
    for n in $(seq "$MOVES"); do
        side="$(move dirtier "$n" "$id" "$side")"
        if [[ $(status_of "$side" "$id") != running || -n $(status_of "$(other "$side")" "$id") ]]; then
            LOST[dirtier]=$((${LOST[dirtier]:-0} + 1))
            log "dirtier: move $n: lost (on $side: '$(status_of "$side" "$id")', on the other: '$(status_of "$(other "$side")" "$id")')"
            return 1
        fi
        res="$(dirtier_check "$side" "$id")"
        if [[ $res != "ok $DIRTIER_MIB" ]]; then
            CORRUPT[dirtier]=$((${CORRUPT[dirtier]:-0} + 1))
            log "dirtier: move $n: memory check says '$res'"
            return 1
        fi
        ((n % 25)) || log "dirtier: $n moves, $(failed_moves dirtier) failed (container kept), 0 lost, 0 corrupt"
    done
    mr "$side" delete -f "$id" >/dev/null 2>&1 || true
}

soak_redis() {
    local id b side=a n before after p
    id="soak-redis-$$"
    b="$(bundle redis redis redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no \
        --protected-mode no --enable-debug-command yes --daemonize no)"
    mr a run -d -b "$b" "$id" </dev/null >/dev/null 2>&1
    # migrun's default spec has a network namespace with loopback down.
    nsenter -t "$(pid_of a "$id")" -n ip link set lo up
    for _ in $(seq 100); do mr a exec "$id" redis-cli -p 6379 ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
    for n in $(seq "$MOVES"); do
        # A burst of SETs (new keys and overwrites) before each move.
        mr "$side" exec "$id" redis-benchmark -p 6379 -q -t set -n 20000 -r 100000 -d 1000 -c 2 -P 4 \
            </dev/null >/dev/null 2>&1 || log "redis: move $n: the load failed"
        before="$(redis_digest "$side" "$id")"
        side="$(move redis "$n" "$id" "$side")"
        if [[ $(status_of "$side" "$id") != running || -n $(status_of "$(other "$side")" "$id") ]]; then
            LOST[redis]=$((${LOST[redis]:-0} + 1))
            log "redis: move $n: lost"
            return 1
        fi
        after="$(redis_digest "$side" "$id")"
        if [[ -z $before || $before != "$after" ]]; then
            CORRUPT[redis]=$((${CORRUPT[redis]:-0} + 1))
            log "redis: move $n: digest '$before' before, '$after' after"
            return 1
        fi
        ((n % 25)) || log "redis: $n moves, $(failed_moves redis) failed (container kept), 0 lost, 0 corrupt; $(mr "$side" exec "$id" redis-cli -p 6379 dbsize | tr -d '\r') keys"
    done
    mr "$side" delete -f "$id" >/dev/null 2>&1 || true
}

rc=0
for sc in "${SCENARIOS[@]}"; do
    log "$sc: $MOVES moves back and forth"
    "soak_$sc" || rc=1
done

{
    echo "{"
    first=1
    for sc in "${SCENARIOS[@]}"; do
        ((first)) || echo ","
        first=0
        dts="$(awk -F'\t' -v s="$sc" '$1 == s && $4 == "moved" {print $5}' "$OUT/moves.tsv" | sort -n)"
        cnt="$(grep -c . <<<"$dts" || true)"
        med="$(awk -v c="$cnt" 'NR == int((c + 1) / 2) {print}' <<<"$dts")"
        p99="$(awk -v c="$cnt" 'NR == int(c * 0.99 + 0.5) {print}' <<<"$dts")"
        max="$(tail -n 1 <<<"$dts")"
        printf '  "%s": {"planned": %s, "moved": %s, "failed": %s, "lost": %s, "corrupt": %s, "downtime_ms": {"median": %s, "p99": %s, "max": %s}}' \
            "$sc" "$MOVES" "$(count_moves "$sc" moved)" "$(failed_moves "$sc")" "${LOST[$sc]:-0}" "${CORRUPT[$sc]:-0}" \
            "${med:-null}" "${p99:-null}" "${max:-null}"
    done
    echo
    echo "}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
exit "$rc"
