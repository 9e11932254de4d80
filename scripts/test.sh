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
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
