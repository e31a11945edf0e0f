#!/usr/bin/env bash
# Usage: hack/install-deps.sh [--crun]
# Installs the Debian packages the project's tests need, cargo-fuzz (pinned,
# for hack/fuzz.sh), and CRIU >= 4.2
# (built from Debian sid's 4.2.1 source into /usr/local/sbin/criu when the
# installed one is older or fails `criu check`). 4.2 is the first CRIU that
# dumps inet sockets on Linux >= 6.16 (SO_PASSCRED is AF_UNIX-only there);
# 4.1.1 from trixie fails every --tcp-established dump on this kernel.
#   --crun   also mount the cgroup v1 hugetlb hierarchy crun wants.
# Idempotent; when everything is in place it only checks and exits quickly.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CRIU_VERSION=4.2.1
CRIU_MIN_MAJOR=4
CRIU_MIN_MINOR=2
# Debian suite whose source package carries CRIU_VERSION (deb-src only, pinned low).
SRC_SUITE=sid
CRIU_PREFIX_BIN=/usr/local/sbin/criu
# Where our CRIU build keeps its kernel-feature cache (criu.kdat). CRIU only
# keeps it on a tmpfs and defaults to /run, which is not one on this machine:
# every dump and restore then probes the kernel again (about 40 ms each, in
# a migration's downtime). /dev/shm is a tmpfs on every Debian system.
CRIU_RUNDIR=/dev/shm
# Our patches to CRIU (hack/criu-patches/*.patch, applied in name order): fast
# paths that shorten a migration's downtime; see DEVELOPERS.md.
CRIU_PATCHES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/criu-patches"
CRIU_BUILD_STAMP=/usr/local/share/migrun/criu-build-id
CRIU_WORK=/var/cache/migrun/criu-build
# cargo-fuzz for the fuzz targets (fuzz/, hack/fuzz.sh): built from crates.io
# with its lock file; it runs libFuzzer on stable Rust (--sanitizer none).
CARGO_FUZZ_VERSION=0.13.2
SRC_LIST=/etc/apt/sources.list.d/migrun-criu-src.list
SRC_PIN=/etc/apt/preferences.d/migrun-criu-src
# Left by earlier versions of this script (trixie's 4.1.1).
OLD_SRC_FILES=(/etc/apt/sources.list.d/migrun-trixie-src.list /etc/apt/preferences.d/migrun-trixie-src)

PACKAGES=(
    docker.io containerd runc crun busybox-static iproute2 hyperfine iptables nftables
    libseccomp-dev pkg-config jq util-linux procps psmisc python3
    file kmod tar xz-utils ca-certificates time gcc g++ libc6-dev
)
CRIU_BUILD_DEPS=(
    patch
    build-essential make gcc libc6-dev
    libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev
    libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler
    protobuf-compiler pkgconf uuid-dev python3-protobuf
)

with_crun=0
for arg in "$@"; do
    case $arg in
        --crun) with_crun=1 ;;
        -h|--help) sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--crun])" ;;
    esac
done

require_root
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 NEEDRESTART_MODE=l

apt_updated=0
apt_update() {
    ((apt_updated)) && return 0
    log "apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
}

# missing_packages PKG...: prints the packages that are not installed.
missing_packages() {
    local installed
    installed="$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "$@" 2>/dev/null \
        | awk '$2 == "ii" {print $1}' | sed 's/:.*//')" || true
    local p
    for p in "$@"; do
        grep -qxF "$p" <<<"$installed" || echo "$p"
    done
}

ensure_packages() {
    local missing
    missing="$(missing_packages "$@")"
    [[ -n $missing ]] || return 0
    # shellcheck disable=SC2086
    log "installing:" $missing
    apt_update
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >&2 \
        || die "apt-get install failed for:" $missing
}

# criu_version BIN: prints the version of BIN (empty if it can't tell).
criu_version() {
    "$1" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}

# What our CRIU build is made of: version, kdat cache dir, patches. A change
# of any of them rebuilds it.
criu_build_id() {
    local sum
    sum="$(cat "$CRIU_PATCHES"/*.patch 2>/dev/null | sha256sum | cut -c1-16)"
    echo "criu $CRIU_VERSION rundir=$CRIU_RUNDIR patches=$sum"
}

# criu_is_current: the installed CRIU_PREFIX_BIN is this script's current build.
criu_is_current() {
    [[ -f $CRIU_BUILD_STAMP && "$(cat "$CRIU_BUILD_STAMP")" == "$(criu_build_id)" ]]
}

criu_ok() {
    local bin=$1 ver
    [[ -x $bin ]] || return 1
    ver="$(criu_version "$bin")"
    criu_new_enough "$ver" || return 1
    # Our own build is redone when this script builds it differently now.
    [[ $bin != "$CRIU_PREFIX_BIN" ]] || criu_is_current || return 1
    "$bin" check >/dev/null 2>&1
}

# criu_new_enough VERSION: true when VERSION >= CRIU_MIN_MAJOR.CRIU_MIN_MINOR.
criu_new_enough() {
    local major minor rest
    IFS=. read -r major minor rest <<<"$1"
    [[ $major =~ ^[0-9]+$ ]] || return 1
    [[ $minor =~ ^[0-9]+$ ]] || minor=0
    ((major > CRIU_MIN_MAJOR || (major == CRIU_MIN_MAJOR && minor >= CRIU_MIN_MINOR)))
}

# The mirror this machine's apt uses for Debian itself (not -security etc).
debian_mirror() {
    local f
    {
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -r $f ]] || continue
            # deb [opts] URI SUITE COMPONENTS...
            sed -E 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && $3 ~ /^(bookworm|stable|trixie)$/ {print $2}'
        done
        for f in /etc/apt/sources.list.d/*.sources; do
            [[ -r $f ]] || continue
            awk 'BEGIN {RS = ""; FS = "\n"}
                {
                    uris = ""; ok = 0; enabled = 1
                    for (i = 1; i <= NF; i++) {
                        if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); uris = $i }
                        if ($i ~ /^Suites:/ && $i ~ /[ \t](bookworm|stable|trixie)([ \t]|$)/) ok = 1
                        if ($i ~ /^Enabled:[ \t]*no/) enabled = 0
                    }
                    if (ok && enabled && uris != "") { split(uris, u, /[ \t]+/); print u[1] }
                }' "$f"
        done
    } | grep -v -e security -e '^$' | head -n1
}

ensure_criu_src() {
    local mirror line pin f
    mirror="$(debian_mirror)"
    [[ -n $mirror ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d/*}"
    line="deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $SRC_SUITE main"
    pin=$'Explanation: migrun: '"$SRC_SUITE"$' is here for CRIU sources only; never install from it.\nPackage: *\nPin: release n='"$SRC_SUITE"$'\nPin-Priority: 1'
    for f in "${OLD_SRC_FILES[@]}"; do
        [[ ! -e $f ]] || { rm -f "$f"; apt_updated=0; }
    done
    if [[ ! -f $SRC_LIST || $(cat "$SRC_LIST") != "$line" ]]; then
        log "adding $SRC_LIST ($mirror $SRC_SUITE, sources only)"
        printf '%s\n' "$line" >"$SRC_LIST"
        apt_updated=0
    fi
    if [[ ! -f $SRC_PIN || $(cat "$SRC_PIN") != "$pin" ]]; then
        printf '%s\n' "$pin" >"$SRC_PIN"
    fi
}

build_criu() {
    local tarball=$CRIU_WORK/criu_$CRIU_VERSION.orig.tar.xz
    local src=$CRIU_WORK/criu-$CRIU_VERSION
    mkdir -p "$CRIU_WORK"
    if [[ ! -s $tarball ]]; then
        ensure_criu_src
        apt_update
        log "downloading criu $CRIU_VERSION source from $SRC_SUITE"
        # It fetches the .dsc and tarballs; later steps may fail (no dpkg-dev,
        # signature checks...): only the orig tarball matters.
        (cd "$CRIU_WORK" && apt-get source -qq --download-only "criu=$CRIU_VERSION-1" >&2) \
            || warn "apt-get source reported an error (checking for the tarball anyway)"
        [[ -s $tarball ]] || die "apt-get source did not fetch $tarball"
    fi
    ensure_packages "${CRIU_BUILD_DEPS[@]}"
    local id patch
    id="$(criu_build_id)"
    if [[ ! -x $src/criu/criu || "$(cat "$src/.migrun-build-id" 2>/dev/null)" != "$id" ]]; then
        log "building $id in $src"
        rm -rf "$src"
        tar -C "$CRIU_WORK" -xJf "$tarball"
        [[ -d $src ]] || die "tarball did not unpack to $src"
        for patch in "$CRIU_PATCHES"/*.patch; do
            [[ -e $patch ]] || continue
            patch -d "$src" -p1 --quiet <"$patch" || die "patch $patch does not apply to criu $CRIU_VERSION"
        done
        make -C "$src" -j"$(nproc)" RUNDIR="$CRIU_RUNDIR" criu >"$CRIU_WORK/build.log" 2>&1 \
            || { tail -n 30 "$CRIU_WORK/build.log" >&2; die "criu build failed (log: $CRIU_WORK/build.log)"; }
        echo "$id" >"$src/.migrun-build-id"
    fi
    install -D -m 0755 "$src/criu/criu" "$CRIU_PREFIX_BIN"
    mkdir -p "$(dirname "$CRIU_BUILD_STAMP")"
    echo "$id" >"$CRIU_BUILD_STAMP"
    log "installed $CRIU_PREFIX_BIN ($(criu_version "$CRIU_PREFIX_BIN"))"
}

ensure_criu() {
    local bin path_bin ver
    path_bin="$(type -P criu || true)"
    for bin in "$CRIU_PREFIX_BIN" "$path_bin"; do
        [[ -n $bin ]] || continue
        if criu_ok "$bin"; then
            CRIU_BIN=$bin
            break
        fi
    done
    if [[ -z ${CRIU_BIN:-} ]]; then
        ver="$(criu_version "$CRIU_PREFIX_BIN" || true)"
        if criu_new_enough "$ver" && criu_is_current; then
            # A rebuild would not change anything: say why check fails.
            "$CRIU_PREFIX_BIN" check >&2 || true
            die "$CRIU_PREFIX_BIN $ver is installed but 'criu check' fails (see above)"
        fi
        build_criu
        CRIU_BIN=$CRIU_PREFIX_BIN
        local out
        out="$("$CRIU_BIN" check 2>&1)" || { printf '%s\n' "$out" >&2; die "'criu check' failed"; }
        grep -q 'Looks good' <<<"$out" || { printf '%s\n' "$out" >&2; die "'criu check' did not say 'Looks good.'"; }
    fi
    # Tools and the runtime call plain `criu`: it must resolve to ours.
    path_bin="$(type -P criu || true)"
    if [[ $CRIU_BIN == "$CRIU_PREFIX_BIN" && $path_bin != "$CRIU_PREFIX_BIN" ]]; then
        warn "'criu' in PATH is ${path_bin:-missing}, not $CRIU_PREFIX_BIN: put /usr/local/sbin before /usr/sbin in PATH"
    fi
}

ensure_iptables_restore() {
    command -v iptables-restore >/dev/null 2>&1 && return 0
    # Debian's iptables package provides it through alternatives.
    update-alternatives --auto iptables >/dev/null 2>&1 || true
    command -v iptables-restore >/dev/null 2>&1 \
        || die "iptables-restore not found (CRIU's network lock needs it)"
}

# cargo-fuzz CARGO_FUZZ_VERSION in cargo's bin directory (libFuzzer itself is
# built by the fuzz crate's libfuzzer-sys, with g++).
ensure_cargo_fuzz() {
    local cargo have
    cargo="$(type -P cargo || echo "${CARGO_HOME:-$HOME/.cargo}/bin/cargo")"
    [[ -x $cargo ]] || die "cargo not found: install Rust (rustup) first"
    have="$("$cargo" fuzz --version 2>/dev/null | awk '{print $2}')" || true
    [[ $have == "$CARGO_FUZZ_VERSION" ]] && return 0
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION (was: ${have:-none})"
    "$cargo" install --quiet --locked --force cargo-fuzz --version "$CARGO_FUZZ_VERSION" >&2 \
        || die "cargo install cargo-fuzz $CARGO_FUZZ_VERSION failed"
}

ensure_hugetlb_v1() {
    local mnt=/sys/fs/cgroup/hugetlb
    if awk -v m="$mnt" '$2 == m && $3 == "cgroup" {f = 1} END {exit !f}' /proc/mounts; then
        return 0
    fi
    grep -qw hugetlb /proc/cgroups || die "kernel has no hugetlb cgroup controller"
    # /sys/fs/cgroup is a tmpfs on cgroup v1 hybrid hosts; it may be read-only.
    mkdir -p "$mnt" 2>/dev/null || {
        mount -o remount,rw /sys/fs/cgroup && mkdir -p "$mnt"
    } || die "cannot create $mnt"
    log "mounting cgroup v1 hugetlb hierarchy at $mnt"
    mount -t cgroup -o hugetlb cgroup "$mnt" || die "mounting hugetlb cgroup failed"
}

ensure_packages "${PACKAGES[@]}"
ensure_iptables_restore
ensure_cargo_fuzz
ensure_criu
if ((with_crun)); then ensure_hugetlb_v1; fi
echo "install-deps: ok (criu $(criu_version "$CRIU_BIN"))"
