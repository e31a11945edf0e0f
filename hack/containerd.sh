#!/usr/bin/env bash
# Usage: hack/containerd.sh up|down|env|status
# A containerd of the project's own, with migrun's shim (runtime
# io.containerd.migrun.v1) on its PATH.
#   up      start it (no-op if already running and answering); links the shim
#           and imports the image docker.io/library/busybox:local if missing
#   down    remove its tasks and containers, stop it (only the containerd in
#           $DIR/containerd.pid) and the shims that served it
#   env     print `export CONTAINERD_ADDRESS=...` (use: eval "$(hack/containerd.sh env)")
#   status  exit 0 if it runs and answers
# Environment:
#   MIGRUN_CONTAINERD_DIR  state dir (default /var/lib/migrun-containerd)
#   MIGRUN_SHIM_BIN        the shim (default <repo>/target/release/containerd-shim-migrun-v1)
# Everything lives under the state dir: root/, state/, bin/ (the shim link
# first in containerd's PATH), config.toml, containerd.sock(.ttrpc),
# containerd.pid, containerd.log. It never uses /run/containerd/containerd.sock,
# so that hack/docker.sh's dockerd keeps its own containerd.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIR="${MIGRUN_CONTAINERD_DIR:-/var/lib/migrun-containerd}"
SHIM_BIN="${MIGRUN_SHIM_BIN:-$REPO_ROOT/target/release/containerd-shim-migrun-v1}"
SHIM_NAME=containerd-shim-migrun-v1
IMAGE=docker.io/library/busybox:local
START_TIMEOUT=30
STOP_TIMEOUT=20

[[ $DIR == /* ]] || DIR="$PWD/$DIR"
DIR="${DIR%/}"
SOCK="$DIR/containerd.sock"
PIDFILE="$DIR/containerd.pid"

c() { ctr --address "$SOCK" "$@"; }
answers() { ctr --address "$SOCK" version >/dev/null 2>&1; }
daemon_pid() {
    local pid
    pid="$(read_pidfile "$PIDFILE")"
    pid_alive "$pid" containerd || return 1
    # Ours only: its command line names our config.
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$DIR/config.toml" || return 1
    echo "$pid"
}

config_toml() {
    cat <<EOF
version = 2
root = "$DIR/root"
state = "$DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = "$DIR/debug.sock"
EOF
}

# The shim where containerd looks for it: $DIR/bin first in its PATH, and
# /usr/local/bin for any containerd (a link we made, or nothing).
link_shim() {
    [[ -x $SHIM_BIN ]] || warn "$SHIM_BIN does not exist (yet): --runtime io.containerd.migrun.v1 will fail until it is built (make build)"
    mkdir -p "$DIR/bin"
    ln -sfn "$SHIM_BIN" "$DIR/bin/$SHIM_NAME"
    local sys=/usr/local/bin/$SHIM_NAME
    if [[ -L $sys || ! -e $sys ]]; then
        ln -sfn "$SHIM_BIN" "$sys"
    else
        warn "$sys exists and is not a link: left alone"
    fi
}

# An OCI image archive of the busybox rootfs (lib.sh) on stdout.
oci_archive() {
    local tmp=$1
    make_busybox_rootfs "$tmp/rootfs"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
        -C "$tmp/rootfs" -cf "$tmp/layer.tar" .
    python3 - "$tmp" "$IMAGE" <<'PY'
import hashlib, json, os, sys, tarfile, io
tmp, name = sys.argv[1], sys.argv[2]
blobs = {}
def add(data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest, len(data)
layer = open(os.path.join(tmp, "layer.tar"), "rb").read()
ldigest, lsize = add(layer)
config = {
    "architecture": "amd64", "os": "linux",
    "config": {"Cmd": ["sh"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [ldigest]},
}
cdigest, csize = add(json.dumps(config).encode())
manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ldigest, "size": lsize}],
}
mdigest, msize = add(json.dumps(manifest).encode())
index = {
    "schemaVersion": 2,
    "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": mdigest, "size": msize,
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
    }],
}
out = tarfile.open(fileobj=sys.stdout.buffer, mode="w|")
def put(path, data):
    info = tarfile.TarInfo(path)
    info.size = len(data)
    out.addfile(info, io.BytesIO(data))
put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
put("index.json", json.dumps(index).encode())
for d, data in blobs.items():
    put("blobs/sha256/" + d.split(":")[1], data)
out.close()
PY
}

import_image() {
    c images ls -q | grep -qxF "$IMAGE" && return 0
    log "importing $IMAGE from busybox-static"
    local tmp
    tmp="$(mktemp -d)"
    if ! oci_archive "$tmp" | c images import - >/dev/null; then
        rm -rf "$tmp"
        die "ctr images import of $IMAGE failed"
    fi
    rm -rf "$tmp"
    c images ls -q | grep -qxF "$IMAGE" || die "$IMAGE missing after import"
}

# Shim processes that served our containerd (their -address is our socket).
our_shims() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd="$(tr '\0' ' ' 2>/dev/null <"$p/cmdline")" || continue
        [[ $cmd == *"containerd-shim"*" -address $SOCK "* ]] || continue
        echo "${p#/proc/}"
    done
}

cmd_up() {
    require_root
    need_cmd containerd ctr python3 tar
    link_shim
    local pid
    if pid="$(daemon_pid)"; then
        if ! answers; then
            log "containerd (pid $pid) is running but not answering yet, waiting"
            wait_until "$START_TIMEOUT" answers \
                || die "containerd (pid $pid) does not answer on $SOCK (see $DIR/containerd.log; try '$0 down')"
        fi
        if [[ -f $DIR/config.toml && $(config_toml) == "$(cat "$DIR/config.toml")" ]]; then
            import_image
            return 0
        fi
        log "config.toml changed: restarting containerd (pid $pid)"
        cmd_down
    fi
    mkdir -p "$DIR/root" "$DIR/state"
    config_toml >"$DIR/config.toml"
    rm -f "$PIDFILE" "$SOCK" "$SOCK.ttrpc"
    log "starting containerd (state in $DIR, socket $SOCK)"
    # setsid+nohup: it must outlive this script and its terminal. Shims
    # inherit PATH: $DIR/bin for the shim, /usr/local/sbin for CRIU >= 4.
    PATH="$DIR/bin:/usr/local/sbin:/usr/local/bin:$PATH" setsid nohup containerd \
        --config "$DIR/config.toml" \
        </dev/null >>"$DIR/containerd.log" 2>&1 &
    local started=$!
    echo "$started" >"$PIDFILE"
    if ! wait_until "$START_TIMEOUT" answers; then
        tail -n 20 "$DIR/containerd.log" >&2 || true
        stop_pid "$started" containerd "$STOP_TIMEOUT"
        die "containerd did not answer on $SOCK within ${START_TIMEOUT}s (log: $DIR/containerd.log)"
    fi
    log "containerd up (pid $started): $SOCK"
    import_image
}

# Kills and deletes every task and container of our containerd.
remove_containers() {
    local ns id
    for ns in $(c namespaces ls -q 2>/dev/null); do
        for id in $(c -n "$ns" tasks ls -q 2>/dev/null); do
            c -n "$ns" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
        done
        for id in $(c -n "$ns" tasks ls -q 2>/dev/null); do
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                c -n "$ns" tasks delete "$id" >/dev/null 2>&1 && break
                sleep 0.2
            done
        done
        for id in $(c -n "$ns" containers ls -q 2>/dev/null); do
            c -n "$ns" containers delete "$id" >/dev/null 2>&1 || warn "cannot delete container $ns/$id"
        done
    done
}

cmd_down() {
    require_root
    [[ -d $DIR ]] || { log "nothing to stop ($DIR does not exist)"; return 0; }
    local pid
    if pid="$(daemon_pid)"; then
        answers && remove_containers
        stop_pid "$pid" containerd "$STOP_TIMEOUT"
    else
        log "containerd not running"
    fi
    for pid in $(our_shims); do
        stop_pid "$pid" "$(cat "/proc/$pid/comm" 2>/dev/null || echo x)" 5
    done
    local mnts m
    mnts="$(awk -v d="$DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)"
    for m in $mnts; do
        m="$(printf '%b' "$m")"
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || warn "cannot unmount $m"
    done
    rm -f "$PIDFILE" "$SOCK" "$SOCK.ttrpc"
    log "down"
}

cmd_env() {
    echo "export CONTAINERD_ADDRESS=$SOCK"
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
    *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
