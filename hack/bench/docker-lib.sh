# shellcheck shell=bash
# Docker helpers shared by hack/bench-docker.sh and hack/bench/suite.sh (its
# part `docker`). Source it after hack/lib.sh, do not run it:
#   . "$HACK_DIR/bench/docker-lib.sh"
# Daemon A is the project's dockerd (make docker-up), daemon B the second one
# on this host (make docker-up-b); migrun is registered as runtime `migrun`
# in both.

# shellcheck disable=SC2034 # used by the scripts that source this file
DOCKER_A=unix:///var/lib/migrun-docker/docker.sock
# shellcheck disable=SC2034
DOCKER_B=unix:///var/lib/migrun-docker-b/docker.sock
DOCKER_LIB="${BASH_SOURCE[0]}"

# dk HOST ARGS...: docker against HOST; da / db: against A / B.
dk() { local h=$1; shift; docker -H "$h" "$@"; }
da() { dk "$DOCKER_A" "$@"; }
db() { dk "$DOCKER_B" "$@"; }

# docker_require_ab: both daemons answer, or die saying how to start them.
docker_require_ab() {
    dk "$DOCKER_A" version >/dev/null 2>&1 || die "Docker daemon A ($DOCKER_A) does not answer (make docker-up)"
    dk "$DOCKER_B" version >/dev/null 2>&1 || die "Docker daemon B ($DOCKER_B) does not answer (make docker-up-b)"
}

# in_netns NS CMD...: CMD in the network namespace /run/netns/NS (not `ip
# netns exec`, which remounts /sys without the cgroup hierarchies).
in_netns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" -- "$@"; }

# link_receive NS ADDR PORT: listens on ADDR:PORT inside NS (a test-bed
# host), writes what one sender sends to stdout.
link_receive() { in_netns "$1" socat -u "TCP-LISTEN:$3,bind=$2,reuseaddr" STDOUT; }

# link_send NS ADDR PORT: stdin to ADDR:PORT, from inside NS.
link_send() { in_netns "$1" socat -u STDIN "TCP:$2:$3"; }

# docker_gc HOST: runs the garbage collector of HOST's containerd (a lease
# deleted with --sync). `docker checkpoint create` leaves the checkpoint
# tarball in containerd's content store until the collector runs, and
# `docker start --checkpoint` of the same tarball then fails with "content
# sha256:...: already exists" (moby#42900; tests/docker.rs does the same).
docker_gc() {
    local sock lease
    sock="$(dirname "${1#unix://}")/exec/containerd/containerd.sock"
    lease="migrun-gc-$$-$RANDOM"
    ctr --address "$sock" --namespace moby leases create --id "$lease" >/dev/null \
        && ctr --address "$sock" --namespace moby leases delete --sync "$lease" >/dev/null
}

# docker_share_image FROM TO REF: TO holds REF with the same image id as
# FROM (docker save | docker load, as a pull from a registry would give);
# nothing is done when it has it already.
docker_share_image() {
    local from=$1 to=$2 ref=$3 id_from id_to
    id_from="$(dk "$from" image inspect -f '{{.Id}}' "$ref" 2>/dev/null)" || return 1
    id_to="$(dk "$to" image inspect -f '{{.Id}}' "$ref" 2>/dev/null)" || id_to=""
    [[ $id_from != "$id_to" ]] || return 0
    dk "$from" save "$ref" | dk "$to" load -q >/dev/null || return 1
    [[ $(dk "$to" image inspect -f '{{.Id}}' "$ref" 2>/dev/null) == "$id_from" ]]
}

# docker_start_from_checkpoint HOST ID DIR CK ROOT: the created (not
# started) container ID (the full id `docker create` prints) of HOST, whose
# DockerRootDir is ROOT (`docker info -f '{{.DockerRootDir}}'`, asked
# beforehand), is started from the checkpoint DIR/CK, moved into the
# container's own checkpoint directory: Docker 20.10 refuses `docker start
# --checkpoint-dir` ("custom checkpointdir is not supported").
docker_start_from_checkpoint() {
    local h=$1 id=$2 dir=$3 ck=$4 root=$5
    [[ $id =~ ^[0-9a-f]{64}$ && -d $root/containers/$id ]] || { echo "no container $id under $root" >&2; return 1; }
    mkdir -p "$root/containers/$id/checkpoints" || return 1
    rm -rf "${root:?}/containers/$id/checkpoints/$ck"
    mv "$dir/$ck" "$root/containers/$id/checkpoints/$ck" || return 1
    dk "$h" start --checkpoint "$ck" "$id" >/dev/null
}
