#!/usr/bin/env bash
# Usage: hack/mkbundle.sh DIR [ARGS...]
# Makes an OCI bundle at DIR: DIR/rootfs from busybox-static and
# DIR/config.json from `runc spec`, with process.args=ARGS (default: sh),
# process.terminal=false and root.readonly=false.
# If DIR/rootfs already holds busybox, only config.json is rewritten.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || {
    echo "usage: $0 DIR [ARGS...]" >&2
    exit 2
}
dir=$1; shift
[[ $# -gt 0 ]] || set -- sh
need_cmd runc jq python3

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

if [[ -x $dir/rootfs/bin/busybox ]]; then
    log "rootfs exists at $dir/rootfs, refreshing config.json only"
else
    make_busybox_rootfs "$dir/rootfs"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
runc spec --bundle "$tmp"
# ARGS are JSON-encoded by python: jq 1.6 would parse "-c" etc. as its own
# options even after --args.
args_json="$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@")"
jq --argjson args "$args_json" '.process.terminal = false
    | .process.args = $args
    | .root.path = "rootfs"
    | .root.readonly = false' \
    "$tmp/config.json" >"$tmp/config.json.new"
mv -f "$tmp/config.json.new" "$dir/config.json"
log "bundle ready: $dir (args: $*)"
