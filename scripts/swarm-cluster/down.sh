#!/usr/bin/env bash
# Tears down everything up.sh made: leaves the swarm, stops the private
# dockerds (and their containerd, shims and containers), deletes the network
# namespaces, the host veth and the host route, the cgroups, the mounts, the
# sockets and the data/exec roots. Idempotent: safe to run when nothing (or
# only half of it) is up. Never touches the main engine (/var/run/docker.sock).
#
# Env: CLSW_PREFIX (default clsw) — must match the one up.sh used.
set -uo pipefail

P=${CLSW_PREFIX:-clsw}
STATE=/run/$P             # exec roots, pidfiles, logs, daemon configs
DATA=/var/lib/$P          # data roots
MAXN=${CLSW_MAX_NODES:-9} # node names n1..nMAXN are looked for

log() { echo "down.sh: $*" >&2; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# the pidfile's pid is our dockerd (not a recycled pid of something else)
ours() { [ -n "${1:-}" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -c -- "--exec-root $STATE/$2 " >/dev/null; }

node_names() {
  local i
  for i in $(seq 1 "$MAXN"); do
    if [ -e "/run/netns/$P-n$i" ] || [ -e "$STATE/n$i.pid" ] || [ -S "/run/$P-n$i.sock" ] ||
       [ -d "$DATA/n$i" ] || [ -d "$STATE/n$i" ]; then
      echo "n$i"
    fi
  done
}

# one up.sh/down.sh at a time, from any checkout
exec 9>"/run/$P.scripts.lock"
flock 9
nodes=$(node_names)

# 1. Kill every container (SIGKILL: no 10 s stop grace for a PID 1 that
#    ignores SIGTERM), then leave the swarm, workers first, manager (n1) last.
#    Best effort, bounded.
answering=""
for n in $nodes; do
  sock=/run/$P-$n.sock
  [ -S "$sock" ] && timeout 5 docker -H "unix://$sock" version >/dev/null 2>&1 &&
    answering="$answering $n"
done
for n in $answering; do
  d="docker -H unix:///run/$P-$n.sock"
  ids=$(timeout 10 $d ps -aq 2>/dev/null || true)
  [ -n "$ids" ] && timeout 30 $d rm -f $ids >/dev/null 2>&1 &
done
wait
for n in $(echo "$answering" | tr ' ' '\n' | sort -r); do
  timeout 30 docker -H "unix:///run/$P-$n.sock" swarm leave --force >/dev/null 2>&1 &&
    log "$n left the swarm" || true
done
# tasks the swarm re-created between the first rm and the leave
for n in $answering; do
  d="docker -H unix:///run/$P-$n.sock"
  ids=$(timeout 10 $d ps -aq 2>/dev/null || true)
  [ -n "$ids" ] && timeout 30 $d rm -f $ids >/dev/null 2>&1 &
done
wait

# 2. Stop each dockerd: SIGTERM, wait, SIGKILL; then everything left in the
#    node's network namespace (containerd, shims) and in its cgroup parent
#    (container processes live in their own netns, but in /<P>-<node>/ cgroups).
kill_cgroup_procs() {
  local n=$1 d pids
  for d in /sys/fs/cgroup/*/"$P-$n"; do
    [ -d "$d" ] || continue
    pids=$(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  done
}
pids_term=""
for n in $nodes; do
  pid=$(cat "$STATE/$n.pid" 2>/dev/null || true)
  if ours "$pid" "$n"; then kill -TERM "$pid" 2>/dev/null; pids_term="$pids_term $pid"; fi
done
for _ in $(seq 1 60); do            # all daemons stop in parallel, 15 s at most
  still=""
  for pid in $pids_term; do alive "$pid" && still="$still $pid"; done
  [ -z "$still" ] && break
  sleep 0.25
done
for pid in $still; do log "dockerd $pid ignored SIGTERM for 15 s, killing"; kill -9 "$pid" 2>/dev/null; done
for round in 1 2 3; do
  for n in $nodes; do
    if [ -e "/run/netns/$P-$n" ]; then
      pids=$(ip netns pids "$P-$n" 2>/dev/null)
      [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    fi
    kill_cgroup_procs "$n"
  done
  sleep 0.1
done

# 3. Mounts left in the host mount namespace under our roots (only if a daemon
#    ran without its private mount namespace, e.g. an older version of up.sh).
for root in "$DATA" "$STATE"; do
  awk -v r="$root" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo |
    sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
done

# 4. Network namespaces, host veth, host route.
for n in $nodes; do
  [ -e "/run/netns/$P-$n" ] && ip netns del "$P-$n" 2>/dev/null
done
if [ -e "/run/netns/$P-u" ]; then
  pids=$(ip netns pids "$P-u" 2>/dev/null); [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  ip netns del "$P-u" 2>/dev/null
fi
ip link show "$P-h" >/dev/null 2>&1 && ip link del "$P-h" 2>/dev/null
ip route show type unreachable 2>/dev/null | grep -c '^unreachable 10.241.0.0/16' >/dev/null &&
  ip route del unreachable 10.241.0.0/16 2>/dev/null

# 5. cgroups (deepest first; they are empty once their processes are gone).
for n in $nodes; do
  for d in /sys/fs/cgroup/*/"$P-$n"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
done

# 6. Files: sockets, pidfiles, roots.
for n in $nodes; do rm -f "/run/$P-$n.sock"; done
rm -rf "$STATE" 2>/dev/null
if [ -d "$DATA" ]; then
  rm -rf "$DATA" 2>/dev/null || {
    # a mount still pinned by a dying process: retry once after a moment
    sleep 1; rm -rf "$DATA" || log "could not remove $DATA completely"
  }
fi

# 7. Report anything left behind (non-fatal, but loud).
left=""
ip netns list 2>/dev/null | grep -c "^$P-" >/dev/null && left="$left netns"
ip link show "$P-h" >/dev/null 2>&1 && left="$left veth"
pgrep -f -- "--exec-root $STATE/" >/dev/null 2>&1 && left="$left dockerd"
ls -d /sys/fs/cgroup/*/"$P"-n* >/dev/null 2>&1 && left="$left cgroups"
[ -e "$DATA" ] && left="$left $DATA"
if [ -n "$left" ]; then log "left behind:$left"; exit 1; fi
log "clean"
