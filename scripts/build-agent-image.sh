#!/usr/bin/env bash
# Builds the agent image locally, FROM scratch: a static clawkerd as PID 1,
# a static busybox (sh, awk, grep, …) and /etc/passwd + /etc/group with the
# user claude (1001:1001). Nothing is pulled from a registry.
#
# Usage: scripts/build-agent-image.sh [TAG]   (default clawker-agent:latest)
# Env:   CLAWKER_IMAGE_PROFILE=release|dev    (cargo profile for clawkerd)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-clawker-agent:latest}
profile=${CLAWKER_IMAGE_PROFILE:-release}
target=x86_64-unknown-linux-gnu

busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
  busybox=/bin/busybox
fi
[ -x "$busybox" ] || { echo "build-agent-image: static busybox missing (apt-get install busybox-static)" >&2; exit 1; }

echo "==> building static clawkerd ($profile)" >&2
# crt-static on the gnu target yields a static-pie; --target keeps these
# artifacts apart from the host build (RUSTFLAGS would otherwise rebuild it).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --profile "$profile" \
  --target "$target" --bin clawkerd
outdir=$([ "$profile" = dev ] && echo debug || echo "$profile")
clawkerd="target/$target/$outdir/clawkerd"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root"/{bin,etc,tmp,run,home,usr/local/bin,root} "$ctx/home/claude"
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
install -m 0755 "$clawkerd" "$root/usr/local/bin/clawkerd"
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
claude:x:1001:1001:claude:/home/claude:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
claude:x:1001:
nogroup:x:65534:
GROUP
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
# COPY makes everything root-owned; the agent user's home must be its own
# (copying the parent makes `claude` itself an entry that --chown applies to).
COPY --chown=1001:1001 home/ /home/
ENV PATH=/usr/local/bin:/bin HOME=/root
ENTRYPOINT ["/usr/local/bin/clawkerd"]
CMD ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
DOCKERFILE
echo "==> docker build -t $tag" >&2
DOCKER_BUILDKIT=0 docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "$tag"
