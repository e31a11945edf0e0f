#!/usr/bin/env bash
# Usage: hack/docker.sh up|down|env|status [a|b]
# A dockerd of the project's own, with the migrun runtime registered.
# With an instance name (or DOCKER_INSTANCE=a|b), the dockerd of test-bed
# host A or B instead: it runs inside the network namespace mr-host-a /
# mr-host-b (hack/testbed.sh, brought up if needed), with its own state dir
# /var/lib/migrun-docker-host-{a,b} (data-root, exec-root with its own
# managed containerd, pidfile, docker.sock on the host filesystem) and its
# own bridge and subnet inside that namespace:
#   a: mr-docker-a 172.31.252.1/24      b: mr-docker-b 172.31.253.1/24
# (the default instance: mr-docker0 172.31.250.1/24 in the root namespace).
#   up      start it (no-op if already running and answering); imports the
#           image busybox:local if missing
#   down    stop it (only the dockerd in $DIR/docker.pid, and its containerd)
#   env     print `export DOCKER_HOST=...` (use: eval "$(hack/docker.sh env)")
#   status  exit 0 if it runs and answers
# Environment:
#   MIGRUN_DOCKER_DIR     state dir (default /var/lib/migrun-docker)
#   MIGRUN_DOCKER_BRIDGE  bridge name (default mr-docker0), and
#   MIGRUN_DOCKER_CIDR    its address (default 172.31.250.1/24): a second
#                         daemon on the same host needs its own (see the
#                         Makefile's docker-up-b)
#   MIGRUN_BIN            runtime binary (default <repo>/target/release/migrun)
#   DOCKER_INSTANCE       a or b: as the instance argument
# Everything lives under the state dir: data/ (data-root), exec/ (exec-root,
# with dockerd's managed containerd), docker.pid, docker.sock, dockerd.log,
# daemon.json. Containers use the bridge mr-docker0 (172.31.250.1/24).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The instance: "" (default), a or b (test-bed hosts). The last argument
# or DOCKER_INSTANCE names it.
INSTANCE="${2:-${DOCKER_INSTANCE:-}}"
NETNS=""
case "$INSTANCE" in
    "") ;;
    a|b)
        NETNS="mr-host-$INSTANCE"
        MIGRUN_DOCKER_DIR="/var/lib/migrun-docker-host-$INSTANCE"
        MIGRUN_DOCKER_BRIDGE="mr-docker-$INSTANCE"
        if [[ $INSTANCE == a ]]; then MIGRUN_DOCKER_CIDR=172.31.252.1/24; else MIGRUN_DOCKER_CIDR=172.31.253.1/24; fi
        ;;
    *) echo "usage: $0 up|down|env|status [a|b]" >&2; exit 2 ;;
esac
# in_ns CMD...: CMD in the instance's network namespace (not `ip netns
# exec`, which remounts /sys without the cgroup hierarchies).
in_ns() {
    if [[ -n $NETNS ]]; then nsenter --net="/run/netns/$NETNS" -- "$@"; else "$@"; fi
}
DIR="${MIGRUN_DOCKER_DIR:-/var/lib/migrun-docker}"
MIGRUN_BIN="${MIGRUN_BIN:-$REPO_ROOT/target/release/migrun}"
BRIDGE="${MIGRUN_DOCKER_BRIDGE:-mr-docker0}"
BRIDGE_CIDR="${MIGRUN_DOCKER_CIDR:-172.31.250.1/24}"
IMAGE=busybox:local
START_TIMEOUT=60
STOP_TIMEOUT=20

[[ $DIR == /* ]] || DIR="$PWD/$DIR"
DIR="${DIR%/}"
SOCK="unix://$DIR/docker.sock"
PIDFILE="$DIR/docker.pid"
# The containerd that dockerd starts for itself (under exec-root).
CTRD_PIDFILE="$DIR/exec/containerd/containerd.pid"
# Containers' cgroups go under /sys/fs/cgroup/*/$CGROUP_PARENT, apart from any
# other docker's /docker, so leftovers can be found and killed.
CGROUP_PARENT="$(basename "$DIR")"

dk() { docker -H "$SOCK" "$@"; }
answers() { docker -H "$SOCK" version --format '{{.Server.Version}}' >/dev/null 2>&1; }
daemon_pid() {
    local pid
    pid="$(read_pidfile "$PIDFILE")"
    pid_alive "$pid" dockerd && echo "$pid"
}

daemon_json() {
    local crun_path
    crun_path="$(type -P crun || true)"
    jq -n --arg migrun "$MIGRUN_BIN" --arg crun "$crun_path" --arg bridge "$BRIDGE" \
        --arg cgparent "/$CGROUP_PARENT" '{
        runtimes: ({migrun: {path: $migrun}}
                   + (if $crun != "" then {crun: {path: $crun}} else {} end)),
        experimental: true,
        "storage-driver": "overlay2",
        bridge: $bridge,
        "cgroup-parent": $cgparent,
        "exec-opts": ["native.cgroupdriver=cgroupfs"],
        "live-restore": false,
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "2"},
        features: {buildkit: false}
    }'
}

ensure_bridge() {
    if ! in_ns ip link show "$BRIDGE" >/dev/null 2>&1; then
        log "creating bridge $BRIDGE ($BRIDGE_CIDR)${NETNS:+ in $NETNS}"
        in_ns ip link add "$BRIDGE" type bridge
    fi
    in_ns ip -4 addr show dev "$BRIDGE" | grep -qF " ${BRIDGE_CIDR} " \
        || in_ns ip addr add "$BRIDGE_CIDR" dev "$BRIDGE"
    in_ns ip link set "$BRIDGE" up
}

# ensure_netns: the test bed, whose host namespace the instance runs in.
ensure_netns() {
    [[ -n $NETNS ]] || return 0
    if [[ ! -e /run/netns/$NETNS ]]; then
        log "$NETNS does not exist: bringing the test bed up (hack/testbed.sh up)"
        bash "$HACK_DIR/testbed.sh" up
    fi
}

# Processes whose command line refers to our state dir (managed containerd,
# containerd-shims, ...), never anything else.
our_pids() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd="$(tr '\0' ' ' 2>/dev/null <"$p/cmdline")" || continue
        [[ $cmd == *"$DIR/"* ]] || continue
        [[ ${p#/proc/} != "$$" && ${p#/proc/} != "$BASHPID" ]] || continue
        case $cmd in
            *dockerd*|*containerd*) echo "${p#/proc/}" ;;
        esac
    done
}

import_image() {
    dk image inspect "$IMAGE" >/dev/null 2>&1 && return 0
    log "importing $IMAGE from busybox-static"
    local tmp
    tmp="$(mktemp -d)"
    make_busybox_rootfs "$tmp/rootfs"
    tar -C "$tmp/rootfs" -c . | dk import -c 'CMD ["sh"]' - "$IMAGE" >/dev/null \
        || { rm -rf "$tmp"; die "docker import of $IMAGE failed"; }
    rm -rf "$tmp"
}

cmd_up() {
    require_root
    need_cmd dockerd docker containerd runc jq ip python3 nsenter
    ensure_netns
    local pid
    if pid="$(daemon_pid)"; then
        if ! answers; then
            log "dockerd (pid $pid) is running but not answering yet, waiting"
            wait_until "$START_TIMEOUT" answers \
                || die "dockerd (pid $pid) does not answer on $SOCK (see $DIR/dockerd.log; try '$0 down')"
        fi
        if [[ -f $DIR/daemon.json && $(daemon_json) == "$(cat "$DIR/daemon.json")" ]]; then
            import_image
            return 0
        fi
        # It is our own dockerd: restart it with the new configuration.
        log "daemon.json changed (MIGRUN_BIN?): restarting dockerd (pid $pid)"
        cmd_down
    fi

    [[ -x $MIGRUN_BIN ]] || warn "$MIGRUN_BIN does not exist (yet): --runtime=migrun will fail until it is built"
    # containerd.sock at the default path would make dockerd use that
    # containerd instead of starting its own under our exec-root.
    [[ ! -e /run/containerd/containerd.sock ]] \
        || die "/run/containerd/containerd.sock exists: dockerd would use that containerd instead of its own; stop it or remove the stale socket"
    # Leftovers of a dockerd that died without cleaning up.
    cleanup_leftovers

    mkdir -p "$DIR/data" "$DIR/exec"
    daemon_json >"$DIR/daemon.json"
    ensure_bridge
    rm -f "$PIDFILE" "$DIR/docker.sock"

    log "starting dockerd (state in $DIR, runtime migrun=$MIGRUN_BIN${NETNS:+, network namespace $NETNS})"
    # setsid+nohup: it must outlive this script and its terminal.
    # /usr/local/sbin first: runtimes run `criu` from PATH, and the CRIU >= 4
    # that install-deps.sh builds lives there (Debian's 3.17 is in /usr/sbin).
    PATH="/usr/local/sbin:/usr/local/bin:$PATH" setsid nohup ${NETNS:+nsenter --net=/run/netns/$NETNS --} dockerd \
        --config-file "$DIR/daemon.json" \
        --data-root "$DIR/data" \
        --exec-root "$DIR/exec" \
        --pidfile "$PIDFILE" \
        -H "$SOCK" \
        </dev/null >>"$DIR/dockerd.log" 2>&1 &
    local started=$!
    if ! wait_until "$START_TIMEOUT" answers; then
        tail -n 20 "$DIR/dockerd.log" >&2 || true
        kill -0 "$started" 2>/dev/null && stop_pid "$started" dockerd "$STOP_TIMEOUT"
        die "dockerd did not answer on $SOCK within ${START_TIMEOUT}s (log: $DIR/dockerd.log)"
    fi
    log "dockerd up (pid $(read_pidfile "$PIDFILE")): $SOCK"
    import_image
}

# Unmount everything under $DIR (deepest first) and stop our stray processes.
cleanup_leftovers() {
    [[ -d $DIR ]] || return 0
    local pid
    for pid in $(our_pids); do
        local comm
        comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || continue
        warn "leftover $comm (pid $pid) from $DIR"
        stop_pid "$pid" "$comm" 5
    done
    kill_cgroup_leftovers
    local mnts m
    mnts="$(awk -v d="$DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)"
    for m in $mnts; do
        m="$(printf '%b' "$m")"   # mountinfo escapes spaces as \040
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || warn "cannot unmount $m"
    done
}

# Container processes that outlived their shim (dockerd/containerd killed):
# everything in our cgroup parent. Then remove the empty cgroups.
kill_cgroup_leftovers() {
    local roots=() r pids
    for r in /sys/fs/cgroup/*/"$CGROUP_PARENT" /sys/fs/cgroup/"$CGROUP_PARENT"; do
        [[ -d $r ]] && roots+=("$r")
    done
    ((${#roots[@]})) || return 0
    for _ in 1 2 3 4 5; do
        pids="$(find "${roots[@]}" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)"
        [[ -n $pids ]] || break
        # shellcheck disable=SC2086
        warn "killing leftover container processes in cgroup $CGROUP_PARENT:" $pids
        # Thaw frozen (paused/checkpointing) containers first.
        find /sys/fs/cgroup/freezer/"$CGROUP_PARENT" -name freezer.state 2>/dev/null \
            | while read -r f; do echo THAWED >"$f" 2>/dev/null || true; done
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.2
    done
    # Deepest first; only empty cgroups can go.
    find "${roots[@]}" -depth -type d -exec rmdir {} + 2>/dev/null || true
}

cmd_down() {
    require_root
    [[ -d $DIR ]] || { log "nothing to stop ($DIR does not exist)"; return 0; }
    local pid ctrd
    ctrd="$(read_pidfile "$CTRD_PIDFILE")"
    if pid="$(daemon_pid)"; then
        stop_pid "$pid" dockerd "$STOP_TIMEOUT"
    else
        log "dockerd not running"
    fi
    # dockerd stops its managed containerd on a clean exit; not after SIGKILL.
    if [[ -n $ctrd ]] && pid_alive "$ctrd" containerd \
        && tr '\0' ' ' 2>/dev/null <"/proc/$ctrd/cmdline" | grep -qF "$DIR/"; then
        stop_pid "$ctrd" containerd 10
    fi
    cleanup_leftovers
    rm -f "$PIDFILE" "$DIR/docker.sock"
    log "down"
}

cmd_env() {
    echo "export DOCKER_HOST=$SOCK"
}

cmd_status() {
    local pid
    if pid="$(daemon_pid)" && answers; then
        log "running (pid $pid) on $SOCK"
    else
        log "not running"
        return 1
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|env|status [a|b]" >&2; exit 2 ;;
esac
