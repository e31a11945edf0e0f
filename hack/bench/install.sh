#!/usr/bin/env bash
# Usage: hack/bench/install.sh
# Installs the host-side Debian packages of the live-migration benchmark
# suite (hack/bench/suite.sh), after hack/install-deps.sh:
#   mmdebstrap         builds the workload images (hack/bench/images.sh)
#   wrk                HTTP load generator (a cross-check; the suite's own
#                      client is hack/bench/loadgen.py, see there why)
#   redis-tools        redis-benchmark and redis-cli (fill the 1 GiB dataset)
#   socat              the by-hand route's copy over the test-bed link
#   fonts-dejavu-core  the font the plots are drawn with (crates/benchplot)
#   busybox-static     idle and dynamic-web images, as in hack/mkbundle.sh
# Idempotent: when everything is there it only checks.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

PACKAGES=(mmdebstrap wrk redis-tools socat fonts-dejavu-core busybox-static jq python3 gcc libc6-dev)

require_root
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
fi
echo "bench install: ok"
