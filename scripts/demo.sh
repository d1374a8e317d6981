#!/usr/bin/env bash
# Sets up a fresh machine and runs the stasis demo on a private containerd it starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: run as root (sudo $0)" >&2
  exit 1
fi
export HOME="${HOME:-/root}"
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
bash scripts/install-deps.sh >/dev/null
cargo build --workspace --release --bins
export STASIS_BUILD_PROFILE=release
STASIS_SHIM="$PWD/target/release/containerd-shim-stasis-v2" exec target/release/demo "$@"
