#!/usr/bin/env bash
# Usage: hack/e2e-test.sh [NAME...]
# The end-to-end tests (tests/NAME.rs; all of tests/*.rs by default), one
# test binary at a time, each under its own time limit, so that a hang
# costs that binary's limit and not CI's whole time. Builds them first (the
# limits do not include compilation), prints each binary's time, and at the
# end a table; fails if any binary failed or timed out, after running all.
# Environment:
#   E2E_THREADS         --test-threads of each binary (default 2)
#   E2E_LIMIT           seconds per binary (default 600)
#   E2E_LIMIT_<NAME>    seconds for binary NAME, e.g. E2E_LIMIT_hostile=900
# A binary still running 15 s before its limit gets the processes it and the
# runtimes run listed (ps --forest with each one's kernel wait channel),
# then is killed with its process group (timeout --signal=KILL).
set -uo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CARGO="${CARGO:-cargo}"
THREADS="${E2E_THREADS:-2}"
cd "$REPO_ROOT" || exit 1

# Generous: about three times what each takes on a quiet 2-core machine.
default_limit() {
    case $1 in
        hostile | migrate | network | docker_migrate) echo 900 ;;
        *) echo "${E2E_LIMIT:-600}" ;;
    esac
}

limit_of() {
    local var="E2E_LIMIT_$1"
    echo "${!var:-$(default_limit "$1")}"
}

if (($# > 0)); then
    names=("$@")
else
    names=()
    for f in tests/*.rs; do
        names+=("$(basename "$f" .rs)")
    done
fi
for n in "${names[@]}"; do
    [[ -f tests/$n.rs ]] || die "no test binary $n (tests/$n.rs)"
done

log "building the test binaries"
"$CARGO" test -p migrun-tests --no-run || die "building the end-to-end tests failed"

# What runs under the test binaries and the runtimes, for a hang's report.
# shellcheck disable=SC2009 # ps for its --forest and wchan columns
report() {
    echo "--- processes (ps --forest, wchan = where each one waits in the kernel):"
    ps -eo pid,ppid,stat,wchan:32,etime,args --forest \
        | grep -E 'PID|cargo|deps/|ctr |containerd|dockerd|docker |migrun|criu|runc' \
        | grep -v grep | cut -c1-300
}

declare -A took result
failed=()
for n in "${names[@]}"; do
    limit="$(limit_of "$n")"
    echo "=== e2e $n: start $(date -u '+%T') UTC, limit ${limit}s"
    start=$SECONDS
    timeout --signal=KILL "$limit" "$CARGO" test -p migrun-tests --test "$n" -- --test-threads="$THREADS" &
    pid=$!
    warned=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((!warned && SECONDS - start >= limit - 15)); then
            echo "=== e2e $n: still running after $((SECONDS - start))s, killed at ${limit}s"
            report
            warned=1
        fi
        sleep 1
    done
    wait "$pid"
    rc=$?
    took[$n]=$((SECONDS - start))
    if ((rc == 0)); then
        result[$n]=ok
    elif ((rc == 137 && took[$n] >= limit)); then
        result[$n]="TIMED OUT (limit ${limit}s)"
        failed+=("$n")
    else
        result[$n]="FAILED (exit $rc)"
        failed+=("$n")
    fi
    echo "=== e2e $n: ${result[$n]} in ${took[$n]}s"
done

echo "=== e2e summary"
total=0
for n in "${names[@]}"; do
    printf '  %-16s %6ss  %s\n' "$n" "${took[$n]}" "${result[$n]}"
    total=$((total + took[$n]))
done
printf '  %-16s %6ss\n' total "$total"
if ((${#failed[@]} > 0)); then
    die "end-to-end tests failed: ${failed[*]}"
fi
