#!/usr/bin/env bash
# Runs a benchmark against a private containerd with a release build of the shim.
#   sudo scripts/bench.sh runtime [--runs N]
#   sudo scripts/bench.sh checkpoint [--runs N] [--sizes 0,256,1024]
#   sudo scripts/bench.sh pod [--sizes 1,2,4,8] [--memory 0,256]
#   sudo scripts/bench.sh soak [--rounds 200] [--baseline 10] [--seed N]
#   sudo scripts/bench.sh backends [--containers 1,4] [--runs N] [--format json] [--handler H …]
#   sudo scripts/bench.sh migrate [--memory 0,256,1024] [--runs N]
#   sudo scripts/bench.sh image [--memory 0,256] [--runs N]
#   sudo scripts/bench.sh restore_check [--memory 0,256] [--runs N]
#   sudo scripts/bench.sh archive [--memory 0,256,1024] [--runs N]   (installs Podman, the peer)
#   sudo scripts/bench.sh scale [--containers 1,4,16] [--memory 0,64] [--pods 1,4]   (likewise)
set -euo pipefail
cd "$(dirname "$0")/.."
export HOME="${HOME:-/root}"
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
which="${1:-runtime}"; shift || true
bash scripts/install-deps.sh >/dev/null
# The archive bench's peer: Podman from trixie (never installed by CI). On bookworm it brings
# trixie's systemd, util-linux and openssl with it: STASIS_BENCH_NO_PODMAN=1 skips it (the
# Podman columns then say "-").
if { [ "$which" = archive ] || [ "$which" = scale ]; } && [ -z "${STASIS_BENCH_NO_PODMAN:-}" ] && ! command -v podman >/dev/null; then
    apt-get install -y -q --no-install-recommends -t trixie podman >/dev/null
fi
cargo build -q --workspace --release --bins
STASIS_SHIM="$PWD/target/release/containerd-shim-stasis-v2" exec "target/release/bench_$which" "$@"
