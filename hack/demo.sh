#!/usr/bin/env bash
# make demo: a container run through Docker with --runtime=migrun, then the
# same container driven directly through migrun's runc-compatible CLI.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIGRUN_BIN=${MIGRUN_BIN:-$here/target/release/migrun}
eval "$(bash "$here/hack/docker.sh" env)"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "docker run --rm --runtime=migrun busybox:local echo hello from migrun"
docker run --rm --runtime=migrun busybox:local echo hello from migrun

step "a counter in a detached container"
name=migrun-demo-$$
docker rm -f "$name" >/dev/null 2>&1 || true
docker run -d --name "$name" --runtime=migrun busybox:local \
    sh -c 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done' >/dev/null
sleep 1
docker ps --filter "name=$name" --format 'table {{.Names}}\t{{.Image}}\t{{.Status}}'
docker inspect -f 'runtime: {{.HostConfig.Runtime}}' "$name"
docker logs "$name" | tail -n 3
step "docker exec"
docker exec "$name" sh -c 'echo "inside: $(hostname), pid 1 is $(cat /proc/1/comm)"'
step "docker pause / unpause"
docker pause "$name" >/dev/null; before=$(docker logs "$name" | wc -l); sleep 0.6
after=$(docker logs "$name" | wc -l); echo "paused: $before lines, 0.6 s later $after lines"
docker unpause "$name" >/dev/null
docker rm -f "$name" >/dev/null

step "the same runtime, directly: migrun run on a busybox bundle"
bundle="$(mktemp -d)"
trap 'rm -rf "$bundle"' EXIT
bash "$here/hack/mkbundle.sh" "$bundle" sh -c 'echo "exit status 7 from $(hostname)"; exit 7' 2>/dev/null
set +e
"$MIGRUN_BIN" --root /run/migrun-demo run --bundle "$bundle" demo-$$
echo "migrun run returned $?"
set -e
echo
echo "Live migration (migrun migrate-out / migrate-in) is not in this build yet."
