#!/usr/bin/env bash
# Usage: hack/fuzz.sh [--total SECONDS] [--merge] [--no-clippy] [TARGET...]
# Lints and builds the fuzz targets of fuzz/ (cargo-fuzz and libFuzzer on
# stable Rust: no sanitizer, debug assertions on), then runs each target (all
# of fuzz/fuzz_targets/, or the ones named) against its committed corpus
# fuzz/corpus/TARGET/ for FUZZ_SECONDS seconds (default 60), or for SECONDS
# shared out among them with --total. A crash, a time-out (FUZZ_TIMEOUT s per
# input, default 10) or going over FUZZ_RSS_MB of memory (default 2048) fails
# the run; libFuzzer's input that did it is then in fuzz/artifacts/TARGET/.
# New inputs go to fuzz/target/corpus-new/TARGET/, not into the repository.
# The fuzz crate builds with the project's dependency versions: its lock file
# (not committed) is made from ./Cargo.lock, which cargo completes with
# libFuzzer's crates.
#   --merge      afterwards, minimise corpus and new inputs into fuzz/corpus/TARGET/
#   --no-clippy  lint the fuzz crate with rustfmt only (clippy checks all of its
#                dependencies once more: minutes on a fresh clone)
# Prints the executions and exec/s of each target at the end.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

total=""
merge=0
clippy=1
targets=()
while (($#)); do
    case $1 in
        --total) total=${2:?--total needs a number of seconds}; shift ;;
        --merge) merge=1 ;;
        --no-clippy) clippy=0 ;;
        -h|--help) sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) targets+=("$1") ;;
    esac
    shift
done

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
FUZZ_DIR=$REPO_ROOT/fuzz
cd "$REPO_ROOT"

cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz is not installed (run hack/install-deps.sh)"
cp Cargo.lock "$FUZZ_DIR/Cargo.lock"

# Every fuzz_targets/*.rs must have its line in fuzz/Cargo.toml and back.
mapfile -t listed < <(cargo fuzz list)
mapfile -t files < <(find "$FUZZ_DIR/fuzz_targets" -maxdepth 1 -name '*.rs' -printf '%f\n' \
    | sed 's/\.rs$//' | LC_ALL=C sort)
[[ "${listed[*]}" == "${files[*]}" ]] \
    || die "fuzz/Cargo.toml lists targets (${listed[*]}) other than fuzz/fuzz_targets/*.rs (${files[*]}): one line in its bin = [...] per file"
if ((${#targets[@]} == 0)); then
    targets=("${files[@]}")
fi
for t in "${targets[@]}"; do
    [[ -f $FUZZ_DIR/fuzz_targets/$t.rs ]] || die "no fuzz target $t (have: ${files[*]})"
done

log "lint: rustfmt of fuzz/, clippy of migrun-wire's fuzzing feature$( ((clippy)) && echo " and of fuzz/")"
cargo fmt --manifest-path "$FUZZ_DIR/Cargo.toml" -- --check
cargo clippy --quiet --locked -p migrun-wire --features fuzzing --all-targets -- -D warnings
if ((clippy)); then
    cargo clippy --quiet --manifest-path "$FUZZ_DIR/Cargo.toml" --all-targets -- -D warnings
fi

# --sanitizer none: AddressSanitizer needs nightly's -Zsanitizer; the code
# under test is safe Rust. --debug-assertions: integer overflow panics.
FUZZ_FLAGS=(--sanitizer none --debug-assertions)
mkdir -p "$FUZZ_DIR/target"
buildlog=$FUZZ_DIR/target/fuzz-build.log
log "building the fuzz targets (log: ${buildlog#"$REPO_ROOT"/})"
if ! cargo fuzz build "${FUZZ_FLAGS[@]}" >"$buildlog" 2>&1; then
    tail -n 40 "$buildlog" >&2
    die "building the fuzz targets failed"
fi

if [[ -n $total ]]; then
    secs=$((total / ${#targets[@]}))
    ((secs >= 1)) || secs=1
else
    secs=$FUZZ_SECONDS
fi

# fuzz_stat LOG NAME: libFuzzer's final figure NAME (-print_final_stats) in LOG.
fuzz_stat() { awk -v k="stat::$2:" '$1 == k {print $2}' "$1"; }

summary=()
for t in "${targets[@]}"; do
    corpus=$FUZZ_DIR/corpus/$t
    new=$FUZZ_DIR/target/corpus-new/$t
    mkdir -p "$corpus" "$new" "$FUZZ_DIR/artifacts/$t"
    logfile=$FUZZ_DIR/target/fuzz-$t.log
    log "$t: ${secs}s on $(find "$corpus" -type f | wc -l) corpus inputs (log: ${logfile#"$REPO_ROOT"/})"
    if ! cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" "$new" "$corpus" -- \
            -max_total_time="$secs" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb="$FUZZ_RSS_MB" \
            -print_final_stats=1 >"$logfile" 2>&1; then
        tail -n 40 "$logfile" >&2
        die "$t: fuzzing failed (input in fuzz/artifacts/$t/; reproduce: cargo fuzz run ${FUZZ_FLAGS[*]} $t fuzz/artifacts/$t/<file>)"
    fi
    summary+=("$(printf '%-14s %12s runs in %5ss, %8s exec/s, %4s new inputs, peak RSS %s MB' \
        "$t" "$(fuzz_stat "$logfile" number_of_executed_units)" "$secs" \
        "$(fuzz_stat "$logfile" average_exec_per_sec)" "$(fuzz_stat "$logfile" new_units_added)" \
        "$(fuzz_stat "$logfile" peak_rss_mb)")")
    if ((merge)); then
        tmp=$(mktemp -d "$FUZZ_DIR/target/merge-$t.XXXXXX")
        # Edges only (no hit counts): a corpus of a few hundred inputs.
        cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" "$tmp" "$corpus" "$new" -- -merge=1 -use_counters=0 \
            -timeout="$FUZZ_TIMEOUT" -rss_limit_mb="$FUZZ_RSS_MB" >"$logfile.merge" 2>&1 \
            || { tail -n 20 "$logfile.merge" >&2; die "$t: merging the corpus failed"; }
        # Inputs that once crashed a target stay, under their names
        # (libFuzzer names the others by the SHA-1 of their content).
        mkdir "$tmp.keep"
        find "$corpus" -maxdepth 1 -type f -name 'crash-*' -exec mv {} "$tmp.keep"/ \;
        find "$corpus" -type f -delete
        mv "$tmp"/* "$corpus"/ 2>/dev/null || true
        for f in "$tmp.keep"/*; do
            [[ -e $f ]] || continue
            rm -f "$corpus/$(sha1sum <"$f" | cut -d' ' -f1)"
            mv "$f" "$corpus"/
        done
        rmdir "$tmp" "$tmp.keep"
        rm -rf "$new"
        log "$t: corpus minimised to $(find "$corpus" -type f | wc -l) inputs"
    fi
done
printf '%s\n' "${summary[@]}"
echo "fuzz: ${#targets[@]} targets, no crash"
