#!/usr/bin/env bash
# Builds the control-plane image locally, FROM scratch: the static `clawker`
# binary as the entrypoint, nothing else (no shell, no libc, no CA key:
# `clawker cp deploy` puts the CP's own certificates on its state volume).
# Nothing is pulled from a registry.
#
# Usage: scripts/build-cp-image.sh [TAG]   (default clawker-cp:latest)
# Env:   CLAWKER_IMAGE_PROFILE=release|dev  (cargo profile for clawker)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-clawker-cp:latest}
profile=${CLAWKER_IMAGE_PROFILE:-release}
target=x86_64-unknown-linux-gnu

echo "==> building static clawker ($profile)" >&2
# Same recipe as the agent image's clawkerd: crt-static on the gnu target
# yields a static-pie; --target keeps these artifacts apart from the host
# build. The CP resolves no names (engine socket, IP addresses only), so
# static glibc's missing NSS does not matter.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --profile "$profile" \
  --target "$target" --bin clawker
outdir=$([ "$profile" = dev ] && echo debug || echo "$profile")
bin="target/$target/$outdir/clawker"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/tmp" "$ctx/rootfs/var/lib/clawker"
chmod 1777 "$ctx/rootfs/tmp"
install -m 0755 "$bin" "$ctx/rootfs/clawker"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV HOME=/var/lib/clawker
ENTRYPOINT ["/clawker"]
CMD ["cp", "serve"]
DOCKERFILE
echo "==> docker build -t $tag" >&2
DOCKER_BUILDKIT=0 docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "$tag"
