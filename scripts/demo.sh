#!/usr/bin/env bash
# The main job. Today: build, create the auth material, mint an agent
# bootstrap bundle and show what was produced. (Grows into: start the CP and
# three demo agents on a local Docker engine.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
echo "==> building"
cargo build --release --bin clawker --bin clawkerd
state=${CLAWKER_STATE_DIR:-$PWD/target/demo-state}
bin=target/release/clawker
echo "==> clawker ca init (state dir $state)"
$bin --state-dir "$state" ca init
$bin --state-dir "$state" ca init
echo "==> minting a bootstrap bundle for clawker.demo.alpha"
$bin --state-dir "$state" ca mint-agent --project demo --agent alpha \
  --container-id "$(head -c 32 /dev/urandom | sha256sum | cut -c1-64)" \
  --out "$state/bundles/alpha"
openssl x509 -in "$state/bundles/alpha/cert.pem" -noout -subject -ext subjectAltName,extendedKeyUsage
openssl verify -CAfile "$state/auth/ca/ca.pem" "$state/bundles/alpha/cert.pem"
