#!/usr/bin/env bash
# Fuzz one cargo-fuzz target for a fixed time on STABLE Rust (no sanitizer).
#   scripts/fuzz.sh TARGET SECONDS      e.g. scripts/fuzz.sh proto_decode 60
#   scripts/fuzz.sh --all SECONDS       every target in turn (CI: short runs)
#   scripts/fuzz.sh --list
# FUZZ_DEV=1: unoptimised build (~3.5x faster to build, ~4-6x fewer exec/s);
# worth it for short CI smoke runs from a cold target dir.
# RUNS=N: also stop after N executions (libFuzzer -runs), whichever of
# SECONDS and N comes first (the long offline runs: RUNS=10000000).
# Exit 0: ran SECONDS with no crash. Non-zero: crash (77), timeout (70),
# OOM (71), build failure, ... The failing input is left in
# fuzz/artifacts/TARGET/ and the reproduce command is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_FUZZ_VERSION=0.13.2
command -v cargo-fuzz >/dev/null 2>&1 ||
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
if [[ ${1:-} == --list ]]; then exec cargo fuzz list; fi
if [[ ${1:-} == --all ]]; then
    secs=${2:?usage: scripts/fuzz.sh --all SECONDS}
    failed=()
    for t in $(cargo fuzz list); do
        "$0" "$t" "$secs" || failed+=("$t")
    done
    if ((${#failed[@]})); then
        echo "fuzz.sh: FAILED: ${failed[*]}" >&2
        exit 1
    fi
    echo "fuzz.sh: every target ran ${secs}s with no crash"
    exit 0
fi
target=${1:?usage: scripts/fuzz.sh TARGET SECONDS}
secs=${2:?usage: scripts/fuzz.sh TARGET SECONDS}
# --sanitizer none: the default (address) passes -Zsanitizer, nightly only.
flags=(--sanitizer none)
[[ ${FUZZ_DEV:-0} == 1 ]] && flags+=(--dev)

corpus=fuzz/corpus/$target       # grows; gitignored (cache it in CI if wanted)
seeds=fuzz/seeds/$target         # committed, read-only for libFuzzer
artifacts=fuzz/artifacts/$target # crash-*/timeout-*/oom-* land here
mkdir -p "$corpus" "$seeds" "$artifacts"
before=$(ls "$artifacts")

cargo fuzz build "${flags[@]}" "$target"
set +e
# First corpus dir is where new inputs are written; seeds are only read.
limits=(-max_total_time="$secs")
[[ -n ${RUNS:-} ]] && limits+=(-runs="$RUNS")
cargo fuzz run "${flags[@]}" "$target" "$corpus" "$seeds" -- \
    "${limits[@]}" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 </dev/null
rc=$?
set -e
new=$(comm -13 <(echo "$before") <(ls "$artifacts"))
if [[ $rc -ne 0 || -n $new ]]; then
    echo "fuzz.sh: $target FAILED (exit $rc); new artifacts in $artifacts/:" >&2
    echo "$new" >&2
    for f in $new; do
        echo "  reproduce: cargo fuzz run ${flags[*]} $target $artifacts/$f" >&2
    done
    exit $(( rc == 0 ? 1 : rc ))
fi
echo "fuzz.sh: $target: no crash in ${secs}s"
