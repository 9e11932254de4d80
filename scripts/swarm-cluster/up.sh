#!/usr/bin/env bash
# Starts a private Docker Swarm for the Swarm-mode tests, isolated from the
# main engine (/var/run/docker.sock is never touched, beyond a read-only
# `docker save` of the images named in CLSW_IMAGES).
#
#   up.sh [NODES]        NODES (default $CLSW_NODES or 1): n1 is the manager,
#                        n2.. join as workers. Re-running with more nodes adds
#                        them to the running swarm.
#   eval "$(./up.sh 2)"  exports CLSW_* and DOCKER_HOST for the manager.
#
# Why private engines in network namespaces, and every quirk worked around
# here: /work/spikes/swarm/FINDINGS.md (a second engine in the host netns
# flushes the main engine's iptables chains; `ip netns exec` hides the
# cgroup mounts; no IPVS, so no ingress network).
#
# Layout (P = $CLSW_PREFIX, default clsw; addresses inside 10.241.0.0/16):
#   netns P-u         underlay: bridge br0 joining the host and all nodes
#   host  P-h         10.241.254.1/24 (veth into P-u); host route
#                     "unreachable 10.241.0.0/16" so nothing in our range can
#                     ever leave through the default route
#   netns P-n<i>      eth0 10.241.254.(10+i)/24, no default route; dockerd runs
#                     here in its own mount+UTS namespace (hostname P-n<i>)
#   sockets           /run/P-n<i>.sock   (-H unix://...)
#   data-root         /var/lib/P/n<i>    exec-root /run/P/n<i>
#   pidfile / log     /run/P/n<i>.pid    /run/P/n<i>.log
#   cgroup parent     /P-n<i>            (down.sh kills leftovers through it)
#   swarm addr pool   10.241.128.0/18 /24s (auto-allocated overlays)
#   node-local nets   docker0 10.241.250.1/24, pool 10.241.240.0/21 /24s
#                     (only visible inside the node netns)
#   node labels       P.node=n<i> (place tasks with node.labels.P.node==n2)
#   images            $CLSW_IMAGES copied to every node from the main engine
#                     (reloaded when the main engine's image id differs)
#
# Overlay networks are not created here: `clawker cp deploy` creates the
# agent overlay itself, as it would on a real cluster.
#
# Idempotent: every step checks what is already there. Prints `export KEY=VALUE`
# lines on stdout (also in /run/P/env); progress goes to stderr.
set -euo pipefail

P=${CLSW_PREFIX:-clsw}
NODES=${1:-${CLSW_NODES:-1}}
STATE=/run/$P
DATA=/var/lib/$P
UL=10.241.254                       # underlay /24
KEEP_INGRESS=${CLSW_KEEP_INGRESS:-0}  # 0: remove the ingress network (no IPVS here)
EXTRA_IMAGES=${CLSW_IMAGES:-}         # images copied to every node …
IMAGES_FROM=${CLSW_IMAGES_FROM:-unix:///var/run/docker.sock}  # … from this engine (read-only)

log() { echo "up.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "$NODES" in ''|*[!0-9]*) die "NODES must be a number";; esac
[ "$NODES" -ge 1 ] && [ "$NODES" -le 9 ] || die "NODES must be 1..9"
[ "$(id -u)" = 0 ] || die "must run as root"
for c in dockerd docker ip nsenter unshare flock; do
  command -v "$c" >/dev/null || die "missing $c (apt-get install docker.io iproute2 util-linux)"
done

dk() { local n=$1; shift; docker -H "unix:///run/$P-$n.sock" "$@"; }
# the pidfile's pid is our dockerd (not a recycled pid of something else)
ours() { [ -n "${1:-}" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -c -- "--exec-root $STATE/$2 " >/dev/null; }
sock_ok() { timeout 5 docker -H "unix:///run/$P-$1.sock" version >/dev/null 2>&1; }

# one up.sh/down.sh at a time, from any checkout (a fixed lock file: the
# addresses are fixed, so two clusters could not coexist anyway)
exec 9>"/run/$P.scripts.lock"
flock 9
mkdir -p "$STATE" "$DATA"

# ---------------------------------------------------------------- underlay
if [ ! -e "/run/netns/$P-u" ]; then
  ip netns add "$P-u"
fi
ip -n "$P-u" link set lo up
ip -n "$P-u" link show br0 >/dev/null 2>&1 || ip -n "$P-u" link add br0 type bridge
ip -n "$P-u" link set br0 up
if ! ip link show "$P-h" >/dev/null 2>&1; then
  ip -n "$P-u" link del hostp 2>/dev/null || true
  ip link add "$P-h" type veth peer name hostp netns "$P-u"
fi
ip -n "$P-u" link set dev hostp master br0 up
ip addr show dev "$P-h" | grep -c "inet $UL.1/24" >/dev/null || ip addr add "$UL.1/24" dev "$P-h"
ip link set "$P-h" up
ip route show type unreachable | grep -c '^unreachable 10.241.0.0/16' >/dev/null ||
  ip route add unreachable 10.241.0.0/16

# ---------------------------------------------------------------- nodes
start_node() {
  local i=$1 n=n$1 ns=$P-n$1
  if [ ! -e "/run/netns/$ns" ]; then
    ip netns add "$ns"
  fi
  ip -n "$ns" link set lo up
  if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
    ip -n "$P-u" link del "$n" 2>/dev/null || true
    ip link add "$n" netns "$P-u" type veth peer name eth0 netns "$ns"
  fi
  ip -n "$P-u" link set dev "$n" master br0 up
  ip -n "$ns" addr show dev eth0 | grep -c "inet $UL.$((10 + i))/24" >/dev/null ||
    ip -n "$ns" addr add "$UL.$((10 + i))/24" dev eth0
  ip -n "$ns" link set eth0 up

  local pid
  pid=$(cat "$STATE/$n.pid" 2>/dev/null || true)
  if ours "$pid" "$n"; then
    sock_ok "$n" && return 0
    # just started by a concurrent up.sh, or wedged: give it a moment
    for _ in $(seq 1 40); do sock_ok "$n" && return 0; sleep 0.25; done
    die "$n: dockerd $pid runs but /run/$P-$n.sock does not answer; run down.sh"
  fi
  mkdir -p "$DATA/$n" "$STATE/$n" "$STATE/$n.cg"
  rm -f "/run/$P-$n.sock" "$STATE/$n.pid"
  # A config file of our own, so a future /etc/docker/daemon.json of the
  # main engine is never read by ours.
  echo '{}' >"$STATE/$n.json"
  log "starting dockerd $n in netns $ns (log $STATE/$n.log)"
  # nsenter --net keeps the host mount namespace; unshare then gives dockerd
  # a private one with a sysfs of ITS netns (/sys/class/net shows the node's
  # links) while keeping the host's cgroup mounts. (`ip netns exec` would
  # remount /sys and lose /sys/fs/cgroup: "Devices cgroup isn't mounted".)
  # DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1: the swarm executor does not try to
  # pull task images from a registry (there is none reachable).
  setsid nsenter --net="/run/netns/$ns" \
    unshare --mount --uts --propagation slave -- sh -c '
      set -e
      hostname "$1"
      mount --rbind /sys/fs/cgroup "$2"
      mount -t sysfs sysfs /sys
      mount --move "$2" /sys/fs/cgroup
      shift 2
      exec env DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 "$@"' sh "$ns" "$STATE/$n.cg" \
    dockerd \
      --config-file "$STATE/$n.json" \
      --data-root "$DATA/$n" \
      --exec-root "$STATE/$n" \
      --pidfile "$STATE/$n.pid" \
      -H "unix:///run/$P-$n.sock" \
      --bip 10.241.250.1/24 \
      --default-address-pool base=10.241.240.0/21,size=24 \
      --cgroup-parent "/$P-$n" \
      --storage-driver overlay2 \
      --swarm-default-advertise-addr "$UL.$((10 + i))" \
    </dev/null >"$STATE/$n.log" 2>&1 9<&- &
  local t
  for t in $(seq 1 120); do
    sock_ok "$n" && return 0
    kill -0 $! 2>/dev/null || break
    sleep 0.25
  done
  tail -n 30 "$STATE/$n.log" >&2
  die "dockerd $n did not come up"
}

for i in $(seq 1 "$NODES"); do start_node "$i"; done

# ---------------------------------------------------------------- swarm
state() { dk "$1" info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null; }

if [ "$(state n1)" != active ]; then
  log "swarm init on n1"
  dk n1 swarm init --advertise-addr "$UL.11" --listen-addr "$UL.11:2377" \
    --default-addr-pool 10.241.128.0/18 --default-addr-pool-mask-length 24 >/dev/null
fi
dk n1 info --format '{{.Swarm.ControlAvailable}}' | grep -c true >/dev/null || die "n1 is not a manager"

if [ "$KEEP_INGRESS" != 1 ] && dk n1 network inspect ingress >/dev/null 2>&1; then
  # The routing mesh needs IPVS (CONFIG_IP_VS), which this kernel lacks:
  # a published port in ingress mode would accept nothing. Without the
  # ingress network, such a service is refused at create time instead.
  dk n1 network rm ingress >/dev/null 2>&1 <<<y || log "could not remove ingress (in use?)"
fi

token=""
for i in $(seq 2 "$NODES"); do
  n=n$i
  if [ "$(state "$n")" != active ]; then
    [ -n "$token" ] || token=$(dk n1 swarm join-token -q worker)
    log "joining $n as worker"
    dk "$n" swarm join --token "$token" --advertise-addr "$UL.$((10 + i))" \
      --listen-addr "$UL.$((10 + i)):2377" "$UL.11:2377" >/dev/null
  fi
done

# every node Ready (the manager sees them by hostname P-n<i>)
for t in $(seq 1 120); do
  ready=$(dk n1 node ls --format '{{.Hostname}} {{.Status}}' | grep -c ' Ready$' || true)
  [ "$ready" -ge "$NODES" ] && break
  sleep 0.25
done
[ "$ready" -ge "$NODES" ] || die "only $ready of $NODES nodes Ready"
# label nodes so tests can place tasks: node.labels.$P.node==n<i>
for i in $(seq 1 "$NODES"); do
  id=$(dk "n$i" info --format '{{.Swarm.NodeID}}')
  dk n1 node inspect "$id" --format "{{index .Spec.Labels \"$P.node\"}}" | grep -cx "n$i" >/dev/null ||
    dk n1 node update --label-add "$P.node=n$i" "$id" >/dev/null
done

# ---------------------------------------------------------------- images
# Images are per engine (no registry): copy each to every node, unless the
# node already has the same image id.
for img in $EXTRA_IMAGES; do
  want=$(docker -H "$IMAGES_FROM" image inspect --format '{{.Id}}' "$img") ||
    die "image $img not found on $IMAGES_FROM (build it first)"
  for i in $(seq 1 "$NODES"); do
    n=n$i
    have=$(dk "$n" image inspect --format '{{.Id}}' "$img" 2>/dev/null || true)
    [ "$have" = "$want" ] && continue
    log "copying $img from $IMAGES_FROM to $n"
    docker -H "$IMAGES_FROM" save "$img" | dk "$n" load -q >/dev/null
  done
done

# ---------------------------------------------------------------- report
socks=""
for i in $(seq 1 "$NODES"); do socks="$socks /run/$P-n$i.sock"; done
{
  echo "export CLSW_MANAGER_SOCK=/run/$P-n1.sock"
  echo "export CLSW_NODE_SOCKS='${socks# }'"
  echo "export CLSW_NODES=$NODES"
  echo "export CLSW_HOST_IP=$UL.1"
  echo "export CLSW_MANAGER_IP=$UL.11"
  echo "export DOCKER_HOST=unix:///run/$P-n1.sock"
} | tee "$STATE/env"
log "up: $NODES node(s); env also in $STATE/env"
