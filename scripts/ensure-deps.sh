#!/usr/bin/env bash
# Installs and starts what the build and the tests need on a fresh Debian
# machine (as root): Docker engine + iptables, a static busybox for the agent
# image, openssl for chain checks, g++ for libFuzzer, nftables (the CP's `lock`, agent-port
# guard and quarantine host guard run `nft`), iproute2 and util-linux
# (nsenter, unshare) for the private engines of the Swarm-mode and fault
# tests. Idempotent; quiet when all is present.
set -euo pipefail

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# A C++ compiler: the fuzz targets' libfuzzer-sys builds libFuzzer from C++
# (ring and the rest need only the C compiler the Rust toolchain links with).
command -v c++ >/dev/null 2>&1 || need+=(g++)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
# Containment installs nftables rules with the `nft` binary (src/netns/nft.rs).
[ -x /usr/sbin/nft ] || command -v nft >/dev/null 2>&1 || need+=(nftables)
# Private dockerds in network namespaces (the Swarm-mode tests, the fault
# suite's scripts/private-engine.sh): ip netns, nsenter/unshare, mount (tmpfs).
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v mount >/dev/null 2>&1 || need+=(mount)
if ((${#need[@]})); then
  echo "ensure-deps: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! docker version >/dev/null 2>&1; then
  log=/var/log/clawker-dockerd.log
  echo "ensure-deps: starting dockerd (log: $log)" >&2
  nohup dockerd >"$log" 2>&1 &
  for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker version >/dev/null 2>&1; then
    echo "ensure-deps: dockerd did not come up; last log lines:" >&2
    tail -n 40 "$log" >&2 || true
    exit 1
  fi
fi
