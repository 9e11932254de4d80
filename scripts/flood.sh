#!/usr/bin/env bash
# The full-size flood of issue 13, against a CP with the default listener
# bounds: from one agent's network namespace, 5,000 reconnecting idle TLS
# connections and 200 slowloris token requests to the agent listener, and
# 2,000 reconnecting handshakes to another agent's clawkerd, for 60 s.
# Meanwhile a new agent registers, the attacked clawkerd's session is cut
# and re-established, and an agent whose dial failed is redialed. Prints
# the measurements (held connections, CP fds and RSS, `clawker status`
# latency, clawkerd log growth) and checks the same bounds as the CI test.
#
# Usage: scripts/flood.sh [IMAGE_TAG]
#   IMAGE_TAG defaults to $CLAWKER_TEST_IMAGE, else clawker-agent:latest;
#   the image is built from this tree first (CLAWKER_FLOOD_NO_BUILD=1 skips).
#   CLAWKER_FLOOD_SECS sets the flood's minimum duration (default 60).
# Takes /tmp/clawker-docker.lock for the Docker part (the engine is shared).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-${CLAWKER_TEST_IMAGE:-clawker-agent:latest}}
if [ "${CLAWKER_FLOOD_NO_BUILD:-0}" != 1 ]; then
  scripts/build-agent-image.sh "$tag" >/dev/null
fi
cargo build --quiet --tests --bin clawker
export CLAWKER_TEST_IMAGE=$tag CLAWKER_FLOOD_FULL=1
exec flock /tmp/clawker-docker.lock \
  cargo test --quiet --test flood_docker -- --nocapture --test-threads 1
