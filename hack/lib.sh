# shellcheck shell=bash
# Shared helpers for the hack/ scripts. Source it, do not run it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Scripts set `set -euo pipefail` themselves before sourcing.

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"
# Name used as the prefix of every message (e.g. "docker.sh: ...").
SCRIPT_NAME="${SCRIPT_NAME:-$(basename "${BASH_SOURCE[-1]:-$0}")}"

log() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
}

need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "required command '$c' not found (run hack/install-deps.sh)"
    done
}

# wait_until TIMEOUT_SECONDS CMD [ARGS...]
# Re-runs CMD (silenced) every 0.2 s until it succeeds; returns 1 on timeout.
wait_until() {
    local timeout=$1; shift
    local deadline=$((SECONDS + timeout))
    while true; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# pid_alive PID [COMM]: PID exists (and, if given, /proc/PID/comm is COMM).
pid_alive() {
    local pid=$1 comm=${2:-}
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -n $comm ]]; then
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
        # a zombie is not alive
        [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    fi
    return 0
}

# read_pidfile FILE: prints the pid stored in FILE, or nothing.
read_pidfile() {
    [[ -r $1 ]] || return 0
    tr -dc '0-9' <"$1"
}

# stop_pid PID COMM TIMEOUT: SIGTERM, wait up to TIMEOUT s, then SIGKILL.
# Does nothing unless PID is alive and its comm is COMM.
stop_pid() {
    local pid=$1 comm=$2 timeout=$3
    pid_alive "$pid" "$comm" || return 0
    log "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until "$timeout" bash -c "! kill -0 $pid 2>/dev/null || [[ \$(awk '{print \$3}' /proc/$pid/stat 2>/dev/null) == Z ]]"; then
        warn "$comm (pid $pid) still alive after ${timeout}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 5 bash -c "! kill -0 $pid 2>/dev/null" || warn "$comm (pid $pid) did not die"
    fi
}

BUSYBOX_BIN="${BUSYBOX_BIN:-/bin/busybox}"

# check_static_busybox: BUSYBOX_BIN exists and is statically linked.
check_static_busybox() {
    [[ -x $BUSYBOX_BIN ]] || die "$BUSYBOX_BIN not found (apt-get install busybox-static)"
    if command -v file >/dev/null 2>&1; then
        file -L "$BUSYBOX_BIN" | grep -q 'statically linked' \
            || die "$BUSYBOX_BIN is not statically linked (install busybox-static, not busybox)"
    elif ldd "$BUSYBOX_BIN" >/dev/null 2>&1; then
        die "$BUSYBOX_BIN is dynamically linked (install busybox-static, not busybox)"
    fi
}

# make_busybox_rootfs DIR: a minimal root filesystem made of the static
# busybox, a symlink per applet in /bin, and a few dirs and /etc files.
# Idempotent; existing files are left alone except bin/busybox (refreshed).
make_busybox_rootfs() {
    local root=$1
    check_static_busybox
    mkdir -p "$root"/{bin,proc,sys,dev,tmp,etc,root}
    chmod 1777 "$root/tmp"
    chmod 0700 "$root/root"
    cp -f "$BUSYBOX_BIN" "$root/bin/busybox"
    chmod 0755 "$root/bin/busybox"
    # One process for ~400 symlinks instead of one `ln` each.
    "$BUSYBOX_BIN" --list | python3 -c '
import os, sys
d = sys.argv[1]
for name in sys.stdin.read().split():
    p = os.path.join(d, name)
    if name != "busybox" and not os.path.lexists(p):
        os.symlink("busybox", p)
' "$root/bin"
    [[ -e $root/etc/passwd ]] || printf '%s\n' \
        'root:x:0:0:root:/root:/bin/sh' \
        'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$root/etc/passwd"
    [[ -e $root/etc/group ]] || printf '%s\n' \
        'root:x:0:' \
        'nogroup:x:65534:' >"$root/etc/group"
    [[ -e $root/etc/hostname ]] || echo migrun >"$root/etc/hostname"
    [[ -e $root/etc/hosts ]] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$root/etc/hosts"
}
