#!/usr/bin/env bash
# The main job: on a fresh Debian machine (root), bring up Docker, build,
# create the CA, start the control plane, run three demo agents with live
# init progress, then show the registry, recent events and the supervision
# tree. The CP keeps running afterwards; `scripts/demo.sh stop` ends it and
# removes the demo agents. `scripts/demo.sh impostor` adds an agent whose
# certificate names another container (it comes up untrusted: try it with
# `cargo run --example quarantine_untrusted` running).
set -euo pipefail
cd "$(dirname "$0")/.."
state=${CLAWKER_STATE_DIR:-$PWD/target/demo-state}
export CLAWKER_STATE_DIR=$state
bin=target/x86_64-unknown-linux-gnu/release/clawker
pidfile=$state/cp.pid

stop_demo() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill -TERM "$(cat "$pidfile")"
    for _ in $(seq 1 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
  for a in alpha beta gamma mallory; do "$bin" agent rm "$a" --project demo >/dev/null 2>&1 || true; done
}

if [ "${1:-}" = stop ]; then
  stop_demo
  echo "demo stopped"
  exit 0
fi

if [ "${1:-}" = impostor ]; then
  "$bin" agent rm mallory --project demo >/dev/null 2>&1 || true
  echo "==> clawker agent run mallory --project demo (certificate minted for another container)"
  "$bin" agent run mallory --project demo --leaf-for-container 0000000000000000deadbeef || true
  "$bin" worldview
  exit 0
fi

scripts/ensure-deps.sh
echo "==> building clawker + clawkerd (static) and the agent image"
scripts/build-agent-image.sh clawker-agent:latest
# The same static build gives us the CLI.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
  --target x86_64-unknown-linux-gnu --bin clawker
mkdir -p "$state"
echo "==> clawker ca init ($state)"
"$bin" ca init
stop_demo
echo "==> starting the control plane (log: $state/cp.log)"
nohup "$bin" cp serve --log-format json >"$state/cp.log" 2>&1 &
echo $! >"$pidfile"
for _ in $(seq 1 100); do
  "$bin" status >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin" status
for a in alpha beta gamma; do
  echo "==> clawker agent run $a --project demo"
  "$bin" agent run "$a" --project demo
done
echo "==> clawker agents"
"$bin" agents
echo "==> recent events"
"$bin" events --last 25
echo "==> supervision tree"
"$bin" tree
echo
echo "The control plane is still running (pid $(cat "$pidfile")). Try: $bin worldview | $bin events -f"
echo "  $bin agent shell alpha --project demo       # a shell in an agent, over the CP's session"
echo "  $bin agent exec alpha --project demo -- ps  # one command; its exit code is clawker's"
echo "  cargo run --example quarantine_untrusted -- --evidence & scripts/demo.sh impostor"
echo "Stop it and remove the demo agents with: scripts/demo.sh stop"
