#!/usr/bin/env bash
# Runs every test: unit, integration (real TLS, real clawkerd processes, real
# redb files) and end-to-end on a real Docker engine, which this script
# installs and starts when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
# The Docker e2e suite refuses to skip when this is set.
export CLAWKER_REQUIRE_DOCKER=1
cargo test --workspace --all-targets "$@"
