#!/usr/bin/env bash
# Runs every test: unit, integration (real TLS, real clawkerd processes, real
# redb files) and end-to-end on a real Docker engine, which this script
# installs and starts when missing, with the agent image built locally.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
# The e2e suites run the images built from this tree: the agent image
# (clawkerd) and, for Swarm mode, the CP image (clawker).
scripts/build-agent-image.sh "${CLAWKER_TEST_IMAGE:-clawker-agent:latest}" >/dev/null
scripts/build-cp-image.sh "${CLAWKER_TEST_CP_IMAGE:-clawker-cp:latest}" >/dev/null
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: one run reports every failing test binary, not only the
# first (a CI log that stops at the first failure hides the rest).
status=0
cargo test --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary),
# and the failing tests by name, last, where a cut log still shows them.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
grep -E '^test .* FAILED$' "$log" | sed 's/^/failed: /' || true
exit "$status"
