#!/usr/bin/env bash
# The fault suite's long form (issue 15): the same tests as CI's short form,
# scaled up. Stops by itself; every Docker resource it makes is removed.
#
#   scripts/chaos.sh            engine stop/start with 20 agents (with and
#                               without live-restore), CP restart with 100
#                               running agents, kill -9 of the CP with 50
#                               `agent run`s in flight, 100-agent load;
#                               then the shared-engine faults and the
#                               registry-full fault.
# Env: CLAWKER_TEST_IMAGE (default clawker-agent:latest), FX_AGENTS,
#      FX_RESTART, FX_CRASH, FX_LOAD to override the sizes.
# Needs root (a private dockerd in its own netns, a tmpfs). Numbers are
# printed as `fault …` / `load …` lines (also in target/chaos.log).
set -euo pipefail
cd "$(dirname "$0")/.."
export FX_AGENTS=${FX_AGENTS:-20} FX_RESTART=${FX_RESTART:-100} FX_CRASH=${FX_CRASH:-50} FX_LOAD=${FX_LOAD:-100}
export CLAWKER_TEST_IMAGE=${CLAWKER_TEST_IMAGE:-clawker-agent:latest}
log=target/chaos.log
: >"$log"
run() { timeout 3600 "$@" 2>&1 | tee -a "$log" | grep -E '^(fault|load) |^test |test result|panicked' || true; }
# The private engine never touches the shared one; the shared-engine tests
# take the shared lock like every e2e test.
run cargo test --test faults_engine -- --nocapture
run flock /tmp/clawker-docker.lock cargo test --test faults_docker -- --test-threads=1 --nocapture
run cargo test --test faults_registry -- --nocapture
if grep -q 'test result: FAILED\|panicked' "$log"; then
  echo "chaos: FAILED (see $log)" >&2
  exit 1
fi
echo "chaos: all faults held (numbers above; full log $log)"
