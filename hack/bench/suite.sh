#!/usr/bin/env bash
# Usage: hack/bench/suite.sh [--quick]      (make bench / make bench-quick)
# The live-migration benchmark suite, on the test bed (hack/testbed.sh:
# hosts mr-host-a 10.77.0.1 and mr-host-b 10.77.0.2 as network namespaces,
# links shaped with tbf). Four parts:
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
#   docker  every scenario run under Docker (--runtime=migrun) and moved
#           between the project's two dockerds (A: make docker-up, B: make
#           docker-up-b; the transfer on the test bed, mr-host-a/mr-host-b)
#           two ways, BENCH_RUNS times each, at BENCH_RATE: dmigrun
#           (migrate-out/migrate-in --docker-host, pre-copy) and dhand
#           (docker checkpoint create on one daemon, the checkpoint through
#           the link with tar | socat, docker create + docker start
#           --checkpoint on the other). Each image is imported into A
#           (docker import of the rootfs, tag = its recipe id) and loaded
#           into B (docker save | docker load: the same image id), so both
#           daemons hold it before the runs, as after a registry pull.
#           Docker's checkpoint create has no --tcp-established, and a
#           restore through a daemon takes no established connection: a
#           migration refused for the client's established connections is
#           done again with the client stopped (noted in its JSON and the
#           report). After each move the container's network namespace on
#           the target is recorded (the daemon's own? addresses? loopback
#           up? a loopback left down is brought up for the client)
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
# container's network namespace (re-resolved with `migrun state`, or for
# Docker containers the daemons' Engine API, when the container moves;
# failures and stalls count as downtime seen by the client). Containers run
# by migrun that serve a client get the service address BENCH_SERVICE_ADDR
# on the test bed (hack/netctr.sh; migrate-in --bridge and, by hand,
# restore --bridge move it along) and the client runs in
# mr-client against it, so its TCP connections are migrated with the
# container. Docker containers get a new address from the target daemon:
# their client runs from the root namespace inside the container's network
# namespace (re-resolved through the daemons' Engine API when it moves).
# Every migration writes RESULTS/runs/PART-SCENARIO-WAY-RUN.json; at the end
# hack/bench/report.py writes RESULTS/summary.json, the charts (benchplot)
# and docs/benchmarks.md.
# Environment (defaults; --quick in brackets):
#   BENCH_OUT            results dir (bench/results/DATE/suite [suite-quick])
#   BENCH_RUNS           runs per figure, 3 [1]
#   BENCH_PARTS          "ways dirty link docker"
#   BENCH_SCENARIOS      "idle static dynamic cpu redis mem"
#   BENCH_WAYS           "pre stop hand"
#   BENCH_DOCKER_WAYS    "dmigrun dhand"
#   BENCH_DOCKER_SCENARIOS  the scenarios of part docker (BENCH_SCENARIOS)
#   BENCH_RATE           link rate of the ways and dirty parts, 1gbit
#   BENCH_DIRTY_MIB      1024 [256];  BENCH_DIRTY_RATES "0 16 64 256"
#   BENCH_MEM_DIRTY      64
#   BENCH_REDIS_MIB      1024 [256];  BENCH_REDIS_SETS 2000
#   BENCH_LINKS          "100mbit 1gbit 10gbit" [100mbit 1gbit]
#   BENCH_LINK_MIB       256 [64];    BENCH_LINK_DIRTY 2
#   BENCH_MIGRATE_TIMEOUT seconds per migration, 300
#   BENCH_SERVICE_ADDR   the service address of containers with a client,
#                        10.77.0.100 (empty: the client in the container's
#                        netns over its loopback, as before)
#   BENCH_DOCS           write docs/benchmarks.md and docs/img (1)
# Dirty rate 0 means "none": the dirtier gets 0.0001 MiB/s (its own 0 is
# "as fast as the CPU allows").
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
# shellcheck source-path=SCRIPTDIR source=docker-lib.sh
. "$HACK_DIR/bench/docker-lib.sh"

QUICK=0
case ${1:-} in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,70s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac
q() { if ((QUICK)); then echo "$2"; else echo "$1"; fi; }

DATE=$(date +%F)
OUT=${BENCH_OUT:-$REPO_ROOT/bench/results/$DATE/$(q suite suite-quick)}
RUNS=${BENCH_RUNS:-$(q 3 1)}
read -r -a PARTS <<<"${BENCH_PARTS:-ways dirty link docker}"
read -r -a SCENARIOS <<<"${BENCH_SCENARIOS:-idle static dynamic cpu redis mem}"
read -r -a WAYS <<<"${BENCH_WAYS:-pre stop hand}"
read -r -a DOCKER_WAYS <<<"${BENCH_DOCKER_WAYS:-dmigrun dhand}"
read -r -a DOCKER_SCENARIOS <<<"${BENCH_DOCKER_SCENARIOS:-${SCENARIOS[*]}}"
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
# unset: the default address; set empty: the loopback client of before
SERVICE_ADDR=${BENCH_SERVICE_ADDR-10.77.0.100}
HAS_ADDR=0      # the current container has SERVICE_ADDR (hack/netctr.sh)
WRITE_DOCS=${BENCH_DOCS:-1}
PORT=7272
COPY_PORT=7300
COPY_N=0
LINK_B0=0       # link_bytes before the migration being measured
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
if [[ " ${PARTS[*]} " == *" docker "* ]]; then
    need_cmd docker ctr
    docker_require_ab
fi

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
RX_PID=""
# part docker: containers run by the daemons instead of `migrun run`
DOCKER_MODE=0
declare -A DH=([a]=$DOCKER_A [b]=$DOCKER_B)
DOCKER_LABEL=migrun-bench-suite
DOCKER_NAMES=()     # the containers this run made (removed from both daemons on exit)
D_IMAGE_REF=""      # the scenario's image in both daemons
D_RUN=()            # `docker create` arguments of the scenario's container (dhand makes it again)
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

# docker_remove NAME: the container NAME, if this run made it (our label),
# removed from both daemons; a container of that name that is not ours is
# left alone.
docker_remove() {
    local name=$1 h
    for h in "${DH[a]}" "${DH[b]}"; do
        [[ $(dk "$h" inspect -f "{{index .Config.Labels \"$DOCKER_LABEL\"}}" "$name" 2>/dev/null) == 1 ]] || continue
        timeout 60 docker -H "$h" rm -f "$name" >/dev/null 2>&1 || warn "docker -H $h rm -f $name failed"
    done
}

# docker_cleanup: every container this run made, on both daemons; then
# containerd's garbage collector drops the checkpoint tarballs that docker
# checkpoint create left in the content stores (dhand's checkpoint
# directories are under WORK).
docker_cleanup() {
    ((${#DOCKER_NAMES[@]})) || return 0
    local n
    for n in "${DOCKER_NAMES[@]}"; do docker_remove "$n"; done
    docker_gc "${DH[a]}" 2>/dev/null || true
    docker_gc "${DH[b]}" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    stop_bg "$IN_PID"
    stop_bg "$CLIENT_PID"
    [[ -z $RX_PID ]] || { kill -TERM -- "-$RX_PID" 2>/dev/null; wait "$RX_PID" 2>/dev/null; }
    docker_cleanup
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

cpid() {
    if ((DOCKER_MODE)); then dk "${DH[$LOC]}" inspect -f '{{.State.Pid}}' "$1" 2>/dev/null; return; fi
    mr --root "${ROOT[$LOC]}" state "$1" 2>/dev/null | jq -r .pid
}
# ct_status ID: running, stopped, ... (migrun's state, or Docker's)
ct_status() {
    if ((DOCKER_MODE)); then dk "${DH[$LOC]}" inspect -f '{{.State.Status}}' "$1" 2>/dev/null; return; fi
    mr --root "${ROOT[$LOC]}" state "$1" 2>/dev/null | jq -r .status
}
in_ct() { local id=$1; shift; nsenter --net="/proc/$(cpid "$id")/ns/net" -- "$@"; }

# start_migrate_in SIDE LOG [OPTION...]: migrate-in --once on SIDE, back
# when it listens.
start_migrate_in() {
    local side=$1 logf=$2 ns=${NS[$1]} addr=${ADDR[$1]}
    shift 2
    timeout -k 10 $((MIGRATE_TIMEOUT + 60)) nsenter --net="/run/netns/$ns" -- \
        "$MIGRUN_BIN" --root "${ROOT[$side]}" --log "${logf%.log}.trace.log" migrate-in --listen "$addr:$PORT" \
        --key "$WORK/bench.key" --once --work-dir "${INDIR[$side]}" "$@" >"$logf" 2>&1 &
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
    if ((HAS_ADDR)); then
        a+=(--host "$SERVICE_ADDR")
        nsenter --net="/run/netns/$TESTBED_NS_CLIENT" -- python3 "$LOADGEN" "${a[@]}" --out "$f" --ready-file "$f.ready" 2>"$f.log" &
    else
        if ((DOCKER_MODE)); then
            a+=(--host 127.0.0.1 --docker-hosts "${DH[a]},${DH[b]}" --docker-name "$id")
        else
            a+=(--host 127.0.0.1 --migrun "$MIGRUN_BIN" --roots "${ROOT[a]},${ROOT[b]}" --id "$id")
        fi
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
# scenario_cmd SCENARIO MIB RATE: SC_IMAGE and SC_ARGS, the scenario's
# image and command.
SC_IMAGE=""
SC_ARGS=()
scenario_cmd() {
    local s=$1 mib=$2 drate=$3 image args=()
    case $s in
        idle) image=busybox; args=(sleep 1000000) ;;
        static) image=nginx; args=(nginx -c /etc/nginx/bench.conf) ;;
        dynamic) image=pyapp; args=(python3 /app/server.py) ;;
        cgi) image=cgi; args=(httpd -f -p 8080 -h /www) ;;
        cpu) image=cpu; args=(sh -c 'stress-ng --cpu 1 --cpu-load 40 --vm 1 --vm-bytes 64M --quiet --timeout 0 & exec sysbench cpu --threads=1 --time=0 --report-interval=1 run >/tmp/sysbench.log 2>&1') ;;
        redis) image=redis; args=(redis-server --port 6379 --bind 0.0.0.0 --save "" --appendonly no --protected-mode no --enable-debug-command yes --daemonize no) ;;
        mem|dirtier*) image=dirtier
            [[ $drate != 0 ]] || drate=0.0001
            args=(/dirtier "$mib" "$drate") ;;
        *) echo "unknown scenario $s"; return 1 ;;
    esac
    SC_IMAGE=$image
    SC_ARGS=("${args[@]}")
}

# has_client SCENARIO: whether the scenario has a client (a service).
has_client() { [[ $1 == static || $1 == dynamic || $1 == cgi || $1 == redis ]]; }

start_scenario() {
    local s=$1 id=$2 mib=${3:-} drate=${4:-}
    scenario_cmd "$s" "$mib" "$drate" || return 1
    LOC=a
    HAS_ADDR=0
    if ((DOCKER_MODE)); then
        docker_run_scenario "$id" || return 1
    else
        BUNDLE=$WORK/bundles/$id
        make_bundle "$BUNDLE" "$SC_IMAGE" "${SC_ARGS[@]}" || return 1
        timeout 30 "$MIGRUN_BIN" --root "${ROOT[a]}" --log "$OUT/logs/$id.run.log" run -d -b "$BUNDLE" "$id" </dev/null >/dev/null 2>&1 \
            || { echo "migrun run failed: $(tail_of "$OUT/logs/$id.run.log")"; return 1; }
        # the loopback of the container's netns (the readiness checks use it)
        in_ct "$id" ip link set lo up 2>/dev/null || true
        if [[ -n $SERVICE_ADDR ]] && has_client "$s"; then
            MIGRUN_BIN=$MIGRUN_BIN bash "$HACK_DIR/netctr.sh" attach "${ROOT[a]}" "$id" "$SERVICE_ADDR/24" "${NS[a]}" \
                >"$WORK/netctr.log" 2>&1 || { echo "netctr.sh attach failed: $(tail_of "$WORK/netctr.log")"; return 1; }
            HAS_ADDR=1
        fi
    fi
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
        mem|dirtier*)
            if ((DOCKER_MODE)); then
                wait_until 300 bash -c "test -e /proc/\$(docker -H ${DH[a]} inspect -f '{{.State.Pid}}' $id)/root/ready" \
                    || { echo "the dirtier is not ready"; return 1; }
            else
                wait_until 300 test -e "$BUNDLE/rootfs/ready" || { echo "the dirtier is not ready"; return 1; }
            fi ;;
        *) sleep 1 ;;
    esac
}

scenario_note() {
    case $1 in
        redis) in_ct "$2" redis-cli -p 6379 info memory | tr -d '\r' | awk -F: '/^used_memory:/ {print "used_memory=" $2}' ;;
        cpu)
            if ((DOCKER_MODE)); then dk "${DH[$LOC]}" exec "$2" tail -n 40 /tmp/sysbench.log 2>/dev/null
            else mr --root "${ROOT[$LOC]}" exec "$2" tail -n 40 /tmp/sysbench.log 2>/dev/null
            fi | grep -o 'eps: [0-9.]*' | awk '{print $2}' | tr '\n' ' ' ;;
    esac
}

# ------------------------------------------------------------- Docker
# docker_image IMAGE: IMAGE's rootfs (hack/bench/images.sh) imported into
# daemon A as migrun-bench/IMAGE:RECIPE (RECIPE: images.sh's recipe id, so
# the tag changes when the rootfs does; kept for the next run) and loaded
# into B from A (docker save | docker load: the same image id, as a pull
# from a registry gives, so that dmigrun sends no layer); older tags of
# migrun-bench/IMAGE are removed from both. Sets D_IMAGE_REF.
docker_image() {
    local image=$1 ref h old
    [[ -s $IMAGES/$image/recipe ]] || { warn "no image $image in $IMAGES"; return 1; }
    ref="migrun-bench/$image:$(cat "$IMAGES/$image/recipe")"
    if ! da image inspect "$ref" >/dev/null 2>&1; then
        log "docker: importing $IMAGES/$image/rootfs into A as $ref"
        tar -C "$IMAGES/$image/rootfs" -c . | da import - "$ref" >/dev/null || { warn "docker import of $image failed"; return 1; }
    fi
    if [[ $(db image inspect -f '{{.Id}}' "$ref" 2>/dev/null) != "$(da image inspect -f '{{.Id}}' "$ref")" ]]; then
        log "docker: loading $ref into B (docker save | docker load)"
        docker_share_image "${DH[a]}" "${DH[b]}" "$ref" || { warn "docker save | load of $ref failed"; return 1; }
    fi
    for h in "${DH[a]}" "${DH[b]}"; do
        for old in $(dk "$h" images --format '{{.Repository}}:{{.Tag}}' "migrun-bench/$image"); do
            [[ $old == "$ref" ]] || dk "$h" rmi "$old" >/dev/null 2>&1 || true
        done
    done
    D_IMAGE_REF=$ref
}

# docker_run_scenario ID: the container ID (SC_IMAGE's D_IMAGE_REF running
# SC_ARGS, --runtime=migrun, our label) on daemon A. A container of that
# name that is not the suite's is left alone (and the scenario fails).
docker_run_scenario() {
    local id=$1 h
    for h in "${DH[a]}" "${DH[b]}"; do
        dk "$h" inspect "$id" >/dev/null 2>&1 || continue
        if [[ $(dk "$h" inspect -f "{{index .Config.Labels \"$DOCKER_LABEL\"}}" "$id" 2>/dev/null) == 1 ]]; then
            timeout 60 docker -H "$h" rm -f "$id" >/dev/null 2>&1   # left by an earlier run
        else
            echo "a container named $id that the suite did not make exists in $h: left alone"; return 1
        fi
    done
    D_RUN=(--runtime=migrun --label "$DOCKER_LABEL=1" "$D_IMAGE_REF" "${SC_ARGS[@]}")
    [[ " ${DOCKER_NAMES[*]} " == *" $id "* ]] || DOCKER_NAMES+=("$id")
    timeout 60 docker -H "${DH[a]}" run -d --name "$id" "${D_RUN[@]}" </dev/null >/dev/null 2>"$OUT/logs/$id.run.log" \
        || { echo "docker run failed: $(tail_of "$OUT/logs/$id.run.log")"; return 1; }
}

# docker_netns_after ID SIDE: the moved container's network namespace on
# SIDE, as JSON into WORK/stats.json (netns_after): whether it is the
# daemon's own (inode of docker inspect's SandboxKey), its IPv4 addresses,
# and whether its loopback was down. A loopback left down is brought up:
# the scenario's server and its client use 127.0.0.1 (a container moved by
# migrate-in --docker-host was seen restored into a new, empty namespace).
docker_netns_after() {
    local id=$1 side=$2 pid sbox own=false lo_down=false addrs
    pid="$(dk "${DH[$side]}" inspect -f '{{.State.Pid}}' "$id" 2>/dev/null)" || return 0
    [[ $pid =~ ^[1-9][0-9]*$ && -e /proc/$pid/ns/net ]] || return 0
    sbox="$(dk "${DH[$side]}" inspect -f '{{.NetworkSettings.SandboxKey}}' "$id" 2>/dev/null)" || sbox=""
    if [[ -n $sbox && -e $sbox && $(stat -L -c %i "$sbox") == "$(stat -L -c %i "/proc/$pid/ns/net")" ]]; then own=true; fi
    addrs="$(nsenter --net="/proc/$pid/ns/net" -- ip -o -4 addr show | awk '{printf "%s%s=%s", sep, $2, $4; sep=" "}')"
    if ! nsenter --net="/proc/$pid/ns/net" -- ip -o link show lo | grep -q '[<,]UP[,>]'; then
        lo_down=true
        nsenter --net="/proc/$pid/ns/net" -- ip link set lo up || true
    fi
    jq --argjson own "$own" --argjson lo "$lo_down" --arg addrs "$addrs" \
        '. + {netns_after: {docker_netns: $own, ipv4: $addrs, lo_was_down: $lo}}' "$WORK/stats.json" >"$WORK/stats.json.new" \
        && mv "$WORK/stats.json.new" "$WORK/stats.json"
}

kill_rx() {
    [[ -n $RX_PID ]] || return 0
    kill -TERM -- "-$RX_PID" 2>/dev/null
    wait "$RX_PID" 2>/dev/null
    RX_PID=""
}

# docker_by_hand ID TAG SRC DST: Docker's own route, by hand: docker
# checkpoint create on SRC (into a checkpoint dir of ours), the checkpoint
# through the link (tar | socat from mr-host-SRC to mr-host-DST), docker
# create of the same image, command and config on DST, and docker start
# --checkpoint there. Downtime: from checkpoint create to start returning.
# Docker passes no --tcp-established: when CRIU refuses the client's
# established connections, the client is stopped (its figures dropped) and
# the checkpoint made again; stats.json says so (client_stopped).
docker_by_hand() {
    local id=$1 tag=$2 src=$3 dst=$4 logs=$OUT/logs ck=$WORK/dck-$2 rd=$WORK/drx-$2 stopped="" pre="" droot cid
    rm -rf "$ck" "$rd"
    mkdir -p "$ck" "$rd"
    droot="$(dk "${DH[$dst]}" info -f '{{.DockerRootDir}}')" || { echo "docker info on ${dst^^} failed"; return 1; }
    # the target's content store: garbage collected first (moby#42900)
    docker_gc "${DH[$dst]}" 2>"$logs/$tag.gc.log" || warn "$tag: containerd GC on ${dst^^} failed: $(tail_of "$logs/$tag.gc.log")"
    COPY_N=$((COPY_N + 1))
    local cport=$((COPY_PORT + COPY_N % 100))
    # the receiver in a process group of its own (killed as a whole on failure)
    setsid bash -c '. "$1"; link_receive "$2" "$3" "$4" | tar -x -C "$5"' _ "$DOCKER_LIB" \
        "${NS[$dst]}" "${ADDR[$dst]}" "$cport" "$rd" 2>"$logs/$tag.socat.log" &
    RX_PID=$!
    wait_until 5 bash -c "nsenter --net=/run/netns/${NS[$dst]} -- ss -Hltn 'sport = :$cport' | grep -q ." \
        || { kill_rx; echo "socat does not listen"; return 1; }
    local upper tupper
    upper="$(dk "${DH[$src]}" inspect -f '{{.GraphDriver.Data.UpperDir}}' "$id")" && [[ $(basename "$upper") == diff && -d $upper ]] \
        || { kill_rx; echo "no overlay2 upper dir for $id on ${src^^}: '$upper'"; return 1; }
    M_T0=$(now)
    if ! timeout "$MIGRATE_TIMEOUT" docker -H "${DH[$src]}" checkpoint create --checkpoint-dir "$ck" "$id" cp \
        </dev/null >"$logs/$tag.checkpoint.log" 2>&1; then
        if [[ -n $CLIENT_PID ]] && grep -q 'Connected TCP socket' "$logs/$tag.checkpoint.log" \
            && [[ $(ct_status "$id") == running ]]; then
            stopped="docker checkpoint create refused the client's established TCP connections (CRIU: Connected TCP socket; Docker passes no --tcp-established): client stopped, checkpoint made again"
            pre="client stopped (checkpoint create refused its established TCP connections), then "
            stop_client
            rm -f "$WORK/client.json"
            sleep 1
            rm -rf "${ck:?}"/*
            LINK_B0=$(link_bytes)
            M_T0=$(now)
            timeout "$MIGRATE_TIMEOUT" docker -H "${DH[$src]}" checkpoint create --checkpoint-dir "$ck" "$id" cp \
                </dev/null >>"$logs/$tag.checkpoint.log" 2>&1 \
                || { kill_rx; echo "${pre}docker checkpoint create failed: $(tail_of "$logs/$tag.checkpoint.log")"; return 1; }
        else
            kill_rx
            echo "docker checkpoint create failed: $(tail_of "$logs/$tag.checkpoint.log")"
            return 1
        fi
    fi
    M_CK=$(now)
    # the checkpoint and the container's writable layer (overlay2's upper
    # dir "diff": files the processes have open there, e.g. a log in /tmp,
    # must exist on the target), in one stream
    tar -c -C "$ck" cp -C "$(dirname "$upper")" diff 2>>"$logs/$tag.socat.log" | link_send "${NS[$src]}" "${ADDR[$dst]}" "$cport" 2>>"$logs/$tag.socat.log" \
        || { kill_rx; echo "${pre}copy failed: $(tail_of "$logs/$tag.socat.log")"; return 1; }
    wait "$RX_PID" || { RX_PID=""; echo "${pre}receiving failed: $(tail_of "$logs/$tag.socat.log")"; return 1; }
    RX_PID=""
    M_CP=$(now)
    cid="$(timeout 60 docker -H "${DH[$dst]}" create --name "$id" "${D_RUN[@]}" </dev/null 2>"$logs/$tag.create.log")" \
        || { echo "${pre}docker create on ${dst^^} failed: $(tail_of "$logs/$tag.create.log")"; return 1; }
    tupper="$(dk "${DH[$dst]}" inspect -f '{{.GraphDriver.Data.UpperDir}}' "$cid")" && [[ -d $tupper ]] \
        || { echo "${pre}no overlay2 upper dir for the new $id on ${dst^^}: '$tupper'"; return 1; }
    tar -c -C "$rd/diff" . | tar -x -C "$tupper" \
        || { echo "${pre}copying the writable layer into the new $id on ${dst^^} failed"; return 1; }
    M_CR=$(now)
    docker_start_from_checkpoint "${DH[$dst]}" "$cid" "$rd" cp "$droot" </dev/null >/dev/null 2>"$logs/$tag.start.log" \
        || { echo "${pre}docker start --checkpoint on ${dst^^} failed: $(tail_of "$logs/$tag.start.log")"; return 1; }
    M_T1=$(now)
    local ck_bytes
    ck_bytes=$(du -sb "$ck" | cut -f1)
    timeout 60 docker -H "${DH[$src]}" rm -f "$id" >/dev/null 2>&1 || warn "$tag: docker rm of $id on ${src^^} failed"
    rm -rf "$ck" "$rd"
    by_hand_stats "$(jq -cn --argjson b "$ck_bytes" --arg s "$stopped" \
        '{checkpoint_bytes: $b, client_stopped: (if $s == "" then null else $s end)}')" "$M_T0" \
        "checkpointed (docker checkpoint create)" "$M_CK" "copied (tar | socat)" "$M_CP" \
        "created (docker create, writable layer copied in)" "$M_CR" "restored (docker start --checkpoint)" "$M_T1" >"$WORK/stats.json"
}

# announce_restored SIDE ID: the restored container announces its service
# address (gratuitous ARP), as migrate-in does after a network move.
announce_restored() {
    local pid
    pid="$(mr --root "${ROOT[$1]}" state "$2" | jq -r .pid)"
    nsenter --net="/proc/$pid/ns/net" -- busybox arping -U -c 1 -I eth0 "$SERVICE_ADDR" >/dev/null 2>&1 || true
}

# by_hand_stats EXTRA_JSON T0 NAME TIME...: the figures of a by-hand
# migration started at T0 (seconds since the epoch), through the named
# phases; the last one ends it (total = downtime). EXTRA_JSON's fields are
# added.
by_hand_stats() {
    python3 - "$@" <<'PY'
import json, sys
extra, t0, rest = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
ms = lambda a: round((float(a) - t0) * 1000, 3)
phases = [{"name": n, "at_ms": ms(t)} for n, t in zip(rest[::2], rest[1::2])]
end = phases[-1]["at_ms"]
print(json.dumps({"precopy": False, "total_ms": end, "downtime_ms": end, "precopy_rounds": 0,
                  **extra, "downtime_phases": phases}))
PY
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
        pre|stop|dmigrun)
            local opt=() in_opt=()
            [[ $way != stop ]] || opt=(--no-precopy)
            # Docker: the container of daemon SRC, rebuilt in daemon DST
            [[ $way != dmigrun ]] || { opt=(--docker-host "${DH[$src]}"); in_opt=(--docker-host "${DH[$dst]}"); }
            # the service address moves along: the veth onto the host's bridge
            ((!HAS_ADDR)) || in_opt+=(--bridge mrbr)
            local attempt stopped=""
            for attempt in 1 2; do
                rc=0
                start_migrate_in "$dst" "$logs/$tag.in.log" "${in_opt[@]}" >"$WORK/msg" || { cat "$WORK/msg"; return 1; }
                M_T0=$(now)
                timeout -k 10 "$MIGRATE_TIMEOUT" nsenter --net="/run/netns/${NS[$src]}" -- \
                    "$MIGRUN_BIN" --root "${ROOT[$src]}" --log "$logs/$tag.out.trace.log" migrate-out "$id" --to "${ADDR[$dst]}:$PORT" \
                    --key "$WORK/bench.key" --stats-json "$stats" --work-dir "${OUTDIR[$src]}" "${opt[@]}" \
                    </dev/null >"$logs/$tag.out.log" 2>&1 || rc=$?
                M_T1=$(now)
                ((rc != 0)) || break
                stop_bg "$IN_PID"; IN_PID=""
                # Docker: the restore through the target daemon cannot take
                # the client's established connections (CRIU: "Connected TCP
                # socket in image"): the client is stopped and the container
                # migrated again (the first attempt's logs kept as *.1.log)
                if ((attempt == 1)) && [[ $way == dmigrun && -n $CLIENT_PID ]] \
                    && cat "$logs/$tag.out.log" "$logs/$tag.in.log" 2>/dev/null | grep -q 'Connected TCP socket' \
                    && [[ $(ct_status "$id") == running ]]; then
                    stopped="migrate-out --docker-host failed on the client's established TCP connections (the restore through the target daemon: CRIU 'Connected TCP socket in image'): client stopped, migrated again"
                    mv "$logs/$tag.out.log" "$logs/$tag.out.1.log"; mv "$logs/$tag.in.log" "$logs/$tag.in.1.log"
                    stop_client
                    rm -f "$WORK/client.json"
                    sleep 1
                    LINK_B0=$(link_bytes)   # the failed attempt's bytes not counted
                    continue
                fi
                echo "${stopped:+client stopped (established TCP connections), then }migrate-out exit $rc: $(tail_of "$logs/$tag.out.log") | in: $(tail_of "$logs/$tag.in.log")"
                return 1
            done
            if [[ -n $stopped ]]; then
                jq --arg r "$stopped" '. + {client_stopped: $r}' "$stats" >"$stats.new" && mv "$stats.new" "$stats"
            fi
            wait_until 30 bash -c "! kill -0 $IN_PID 2>/dev/null" || true
            stop_bg "$IN_PID"; IN_PID=""
            rm -rf --one-file-system "${OUTDIR[$src]:?}"/* 2>/dev/null || true
            if [[ $way == dmigrun ]]; then
                # the container is the daemon's now: no bundle of ours
                rm -rf --one-file-system "${INDIR[$dst]:?}"/incoming-* 2>/dev/null || true
                docker_netns_after "$id" "$dst"
            else
                # the container's new bundle: migrate-in's incoming dir
                local nb
                nb="$(mr --root "${ROOT[$dst]}" state "$id" 2>/dev/null | jq -r .bundle)"
                [[ $BUNDLE == "$WORK"/* ]] && release_bundle "$BUNDLE"
                [[ $BUNDLE == "${INDIR[$src]}"/* ]] && rm -rf --one-file-system "$BUNDLE"
                BUNDLE=$nb
            fi ;;
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
            local bridge=()
            ((!HAS_ADDR)) || bridge=(--bridge mrbr)
            nsenter --net="/run/netns/${NS[$dst]}" -- timeout "$MIGRATE_TIMEOUT" "$MIGRUN_BIN" --root "${ROOT[$dst]}" \
                restore -d --tcp-established "${bridge[@]}" --image-path "$hd/img" -b "$hd" "$id" \
                </dev/null >/dev/null 2>"$logs/$tag.restore.log" \
                || { echo "restore failed: $(tail_of "$logs/$tag.restore.log")"; return 1; }
            # restore --bridge put the veth's outside end (CRIU made it in
            # DST's namespace) on the host's bridge; the address moved
            ((!HAS_ADDR)) || announce_restored "$dst" "$id"
            M_T1=$(now)
            mr --root "${ROOT[$src]}" delete -f "$id" >/dev/null 2>&1 || true
            rm -rf "$img" "$hd/img"
            [[ $BUNDLE == "$WORK"/* ]] && release_bundle "$BUNDLE"
            [[ $BUNDLE == "${INDIR[$src]}"/* ]] && rm -rf --one-file-system "$BUNDLE"
            BUNDLE=$hd
            by_hand_stats '{}' "$M_T0" "checkpointed (migrun checkpoint)" "$M_CK" \
                "copied (tar | socat)" "$M_CP" "restored (migrun restore)" "$M_T1" >"$stats" ;;
        dhand) docker_by_hand "$id" "$tag" "$src" "$dst" || return 1
            docker_netns_after "$id" "$dst" ;;
    esac
    LOC=$dst
    local st
    st="$(ct_status "$id")" || st=""
    if [[ $st != running ]]; then
        local why=""
        if ((DOCKER_MODE)); then
            why=" ($(dk "${DH[$LOC]}" inspect -f 'exit code {{.State.ExitCode}}, error "{{.State.Error}}", OOM killed {{.State.OOMKilled}}' "$id" 2>&1 | head -c 300); its last output: $(dk "${DH[$LOC]}" logs --tail 5 "$id" 2>&1 | tr '\n' ' ' | head -c 600))"
        fi
        echo "$id is '${st:-missing}' on ${LOC^^} after the migration$why"
        return 1
    fi
}

# one PART SCENARIO WAY RUN ID [EXTRA_JSON]: one measured migration.
one() {
    local part=$1 s=$2 way=$3 i=$4 id=$5 extra=${6:-"{}"}
    local tag=$part-$s-$way-$i f=$OUT/runs/$part-$s-$way-$i.json cf=$WORK/client.json
    local b1 dir note
    rm -f "$cf" "$cf.ready"
    start_client "$s" "$id" "$cf" >"$WORK/msg" || { warn "$tag: $(cat "$WORK/msg")"; echo "$tag: $(cat "$WORK/msg")" >>"$OUT/failed.txt"; stop_client; return 1; }
    [[ -z $CLIENT_PID ]] || sleep "$PRE_S"
    dir="${LOC^^}->$([[ $LOC == a ]] && echo B || echo A)"
    LINK_B0=$(link_bytes)
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
     "link_bytes": $b1 - $LINK_B0, "migrun_bytes": stats.get("bytes_total"),
     "rounds": stats.get("precopy_rounds"), "downtime_phases": stats.get("downtime_phases"),
     "dirty_tracking": stats.get("dirty_tracking"), "throttled": stats.get("throttled"),
     "note": """$note""".strip(), "stats": stats, "client": client}
r.update(json.loads('''$extra'''))
r["link_share"] = round(r["link_bytes"] * 8 / (r["link_bps"] * r["wall_ms"] / 1000), 4) if r["wall_ms"] else None
json.dump(r, open(f, "w"), indent=1)
PY
    local c=""
    [[ ! -s $cf ]] || c=", client: $(jq -r '"\(.requests_ok) ok \(.requests_failed) failed, stall \(.longest_stall_ms) ms"' "$cf")"
    # Docker: a migration redone with the client stopped (see docker_by_hand)
    c+="$(jq -r '(if .stats.client_stopped then " [client stopped: \(.stats.client_stopped)]" else "" end)
        + (if .stats.netns_after then " [netns on the target: docker_netns=\(.stats.netns_after.docker_netns) ipv4=\(.stats.netns_after.ipv4 | if . == "" then "none" else . end) lo_was_down=\(.stats.netns_after.lo_was_down)]" else "" end)' "$f")"
    log "$tag ($dir): $(jq -r '"total \(.total_ms|floor) ms, downtime \(.downtime_ms|floor) ms, \(.link_bytes/1048576|floor) MiB on the link, rounds \(.rounds)"' "$f")$c"
}

finish_container() {
    local id=$1
    stop_client
    if ((DOCKER_MODE)); then
        docker_remove "$id"
        rm -rf --one-file-system "${INDIR[a]:?}"/incoming-* "${INDIR[b]:?}"/incoming-* 2>/dev/null || true
        return 0
    fi
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
                if [[ "$(ct_status "$id")" != running ]]; then
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
        docker)
            testbed_rate "$RATE"
            DOCKER_MODE=1
            for s in "${DOCKER_SCENARIOS[@]}"; do
                if ! docker_image "$(image_of "$s")"; then
                    echo "docker-$s: the image $(image_of "$s") is not in both daemons" >>"$OUT/failed.txt"
                    failures=$((failures + 1))
                    continue
                fi
                dx="\"image\": \"$D_IMAGE_REF\", \"image_on_both_daemons\": true"
                case $s in
                    mem) series docker mem "$DIRTY_MIB" "$MEM_DIRTY" "{\"mib\": $DIRTY_MIB, \"dirty_mib_s\": $MEM_DIRTY, $dx}" "${DOCKER_WAYS[@]}" ;;
                    redis) series docker redis "" "" "{\"mib\": $REDIS_MIB, $dx}" "${DOCKER_WAYS[@]}" ;;
                    *) series docker "$s" "" "" "{$dx}" "${DOCKER_WAYS[@]}" ;;
                esac
            done
            DOCKER_MODE=0 ;;
        *) die "unknown part '$part' (ways dirty link docker)" ;;
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
    --arg client "$([[ -n $SERVICE_ADDR ]] && echo "mr-client (10.77.0.10) -> the service address $SERVICE_ADDR on the test bed, moved with the container" || echo "root netns, setns into the container's netns, 127.0.0.1")" \
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
