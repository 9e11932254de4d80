#!/usr/bin/env bash
# Runs every test: unit, integration (real TLS, real clawkerd processes, real
# redb files) and end-to-end on a real Docker engine, which this script
# installs and starts when missing, with the agent image built locally.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
# The e2e suite runs the image built from this tree's clawkerd.
scripts/build-agent-image.sh clawker-agent:latest >/dev/null
cargo test --workspace --all-targets "$@"
