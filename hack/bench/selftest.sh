#!/usr/bin/env bash
# Usage: hack/bench/selftest.sh          (make bench-test)
# One tiny scenario of the benchmark suite end to end, through the same
# code as `make bench`: the static web server migrated once with pre-copy
# and once by hand, under the client, on the test bed; then checks that
# every run's JSON has every metric (total, downtime, bytes on the link,
# link share, rounds, downtime phases, client requests/s, failures,
# p50/p99/max latency, longest stall, timeline) and that the report step
# drew its charts. Results in a temporary directory (removed), docs/ is
# not touched.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

require_root
out="$(mktemp -d /tmp/migrun-bench-selftest.XXXXXX)"
trap 'rm -rf "$out"' EXIT
BENCH_OUT=$out BENCH_PARTS=ways BENCH_SCENARIOS=static BENCH_WAYS="pre hand" BENCH_RUNS=1 BENCH_DOCS=0 \
    bash "$HACK_DIR/bench/suite.sh" || die "the suite failed"
n=0
for f in "$out"/runs/*.json; do
    [[ -e $f ]] || die "no run files in $out/runs"
    jq -e '
        (.total_ms | type == "number") and (.downtime_ms | type == "number")
        and (.link_bytes | type == "number") and (.link_share | type == "number")
        and (.rounds | type == "number") and (.downtime_phases | length > 0)
        and (.client.requests_per_s | type == "number") and (.client.requests_failed | type == "number")
        and (.client.latency_ms.p50 | type == "number") and (.client.latency_ms.p99 | type == "number")
        and (.client.latency_ms.max | type == "number") and (.client.longest_stall_ms | type == "number")
        and (.client.timeline.ok | length > 0)' "$f" >/dev/null \
        || die "$(basename "$f") lacks a metric: $(jq -c '{total_ms, downtime_ms, link_bytes, link_share, rounds, client: (.client | {requests_per_s, requests_failed, latency_ms, longest_stall_ms})}' "$f")"
    n=$((n + 1))
done
((n == 2)) || die "expected 2 runs, found $n"
for png in bench-ways-downtime.png bench-ways-total.png bench-timeline-static.png; do
    [[ -s $out/img/$png ]] || die "the report drew no $png"
done
jq -e '.groups | length == 2' "$out/summary.json" >/dev/null || die "summary.json lacks the two groups"
log "ok: $n migrations, every metric present, charts drawn"
