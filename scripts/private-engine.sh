#!/usr/bin/env bash
# A private Docker engine for the fault tests that stop, restart or lose an
# engine: its own network namespace, data-root, exec-root, socket, cgroup
# parent and config — the shared engine (/var/run/docker.sock) is never
# stopped, restarted or reconfigured. (Recipe: /work/spikes/swarm/up.sh,
# single node, no swarm, no veth: the CP under test runs in the same netns.)
#
#   private-engine.sh up [IMAGE…]   start it (idempotent); copy IMAGEs from
#                                   the shared engine (docker save | load)
#   private-engine.sh stop          SIGTERM the daemon, wait until gone
#   private-engine.sh start         start it again (same data-root)
#   private-engine.sh down          kill everything, remove every trace
#
# Env: FX_PREFIX (default cfx), FX_LIVE_RESTORE=1 (live-restore on; read by
# up/start). Addresses: only inside the netns, from 10.243.0.0/16
# (docker0 10.243.250.1/24, address pool 10.243.240.0/21).
# Prints nothing on stdout but `export` lines (up): FX_NETNS, FX_SOCK.
set -euo pipefail

P=${FX_PREFIX:-cfx}
NS=$P-n1
STATE=/run/$P
DATA=/var/lib/$P
SOCK=/run/$P.sock
log() { echo "private-engine: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

ours() { [ -n "${1:-}" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -c -- "--exec-root $STATE/n1 " >/dev/null; }
pid_of() { cat "$STATE/n1.pid" 2>/dev/null || true; }
sock_ok() { timeout 5 docker -H "unix://$SOCK" version >/dev/null 2>&1; }

start_daemon() {
  local pid; pid=$(pid_of)
  if ours "$pid"; then
    for _ in $(seq 1 40); do sock_ok && return 0; sleep 0.25; done
    die "dockerd $pid runs but $SOCK does not answer; run down"
  fi
  mkdir -p "$DATA/n1" "$STATE/n1" "$STATE/n1.cg"
  rm -f "$SOCK" "$STATE/n1.pid"
  if [ "${FX_LIVE_RESTORE:-0}" = 1 ]; then
    echo '{"live-restore": true}' >"$STATE/n1.json"
  else
    echo '{}' >"$STATE/n1.json"
  fi
  [ -e "/run/netns/$NS" ] || ip netns add "$NS"
  ip -n "$NS" link set lo up
  setsid nsenter --net="/run/netns/$NS" \
    unshare --mount --uts --propagation slave -- sh -c '
      set -e
      hostname "$1"
      mount --rbind /sys/fs/cgroup "$2"
      mount -t sysfs sysfs /sys
      mount --move "$2" /sys/fs/cgroup
      shift 2
      exec "$@"' sh "$NS" "$STATE/n1.cg" \
    dockerd \
      --config-file "$STATE/n1.json" \
      --data-root "$DATA/n1" \
      --exec-root "$STATE/n1" \
      --pidfile "$STATE/n1.pid" \
      -H "unix://$SOCK" \
      --bip 10.243.250.1/24 \
      --default-address-pool base=10.243.240.0/21,size=24 \
      --cgroup-parent "/$NS" \
      --storage-driver overlay2 \
    </dev/null >>"$STATE/n1.log" 2>&1 9<&- &
  local t
  for t in $(seq 1 160); do
    sock_ok && return 0
    kill -0 $! 2>/dev/null || break
    sleep 0.25
  done
  tail -n 30 "$STATE/n1.log" >&2
  die "private dockerd did not come up"
}

stop_daemon() {
  local pid; pid=$(pid_of)
  ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  log "dockerd $pid ignored SIGTERM for 30 s; killing"
  kill -9 "$pid" 2>/dev/null || true
}

kill_leftovers() {
  local d pids
  if [ -e "/run/netns/$NS" ]; then
    pids=$(ip netns pids "$NS" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  fi
  for d in /sys/fs/cgroup/*/"$NS"; do
    [ -d "$d" ] || continue
    pids=$(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  done
}

# one at a time
exec 9<"$(cd "$(dirname "$0")" && pwd)"
flock 9

case "${1:-}" in
  up)
    shift
    mkdir -p "$STATE" "$DATA"
    start_daemon
    for img in "$@"; do
      docker -H "unix://$SOCK" image inspect "$img" >/dev/null 2>&1 && continue
      log "copying $img from the shared engine"
      docker save "$img" | docker -H "unix://$SOCK" load -q >/dev/null
    done
    echo "export FX_NETNS=/run/netns/$NS"
    echo "export FX_SOCK=$SOCK"
    ;;
  stop) stop_daemon ;;
  start) start_daemon ;;
  down)
    if sock_ok; then
      ids=$(timeout 10 docker -H "unix://$SOCK" ps -aq 2>/dev/null || true)
      [ -n "$ids" ] && timeout 60 docker -H "unix://$SOCK" rm -f $ids >/dev/null 2>&1 || true
    fi
    stop_daemon
    for _ in 1 2 3; do kill_leftovers; sleep 0.1; done
    for d in /sys/fs/cgroup/*/"$NS"; do
      [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    for root in "$DATA" "$STATE"; do
      awk -v r="$root" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    done
    [ -e "/run/netns/$NS" ] && ip netns del "$NS" 2>/dev/null
    rm -rf "$STATE" "$DATA" "$SOCK" || true
    if [ -e "/run/netns/$NS" ] || [ -e "$STATE" ] || [ -e "$DATA" ]; then
      die "leftovers after down (netns $NS, $STATE or $DATA); run down again"
    fi
    log "down"
    ;;
  *) die "usage: $0 up [IMAGE…] | stop | start | down" ;;
esac
