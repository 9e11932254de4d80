#!/usr/bin/env bash
# Runs every test: unit, integration (real TLS, real clawkerd processes, real
# redb files) and end-to-end on a real Docker engine, which this script
# installs and starts when missing, with the agent image built locally.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
# The e2e suite runs the image built from this tree's clawkerd.
scripts/build-agent-image.sh clawker-agent:latest >/dev/null
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
