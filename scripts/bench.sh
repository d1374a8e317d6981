#!/usr/bin/env bash
# Runs a benchmark against a private containerd with a release build of the shim.
#   sudo scripts/bench.sh runtime [--runs N]
#   sudo scripts/bench.sh checkpoint [--runs N] [--sizes 0,256,1024]
#   sudo scripts/bench.sh pod [--sizes 1,2,4,8] [--memory 0,256]
#   sudo scripts/bench.sh soak [--rounds 200] [--baseline 10] [--seed N]
#   sudo scripts/bench.sh backends [--containers 1,4] [--runs N] [--format json] [--handler H …]
#   sudo scripts/bench.sh migrate [--memory 0,256,1024] [--runs N]
#   sudo scripts/bench.sh migsoak [--rounds 50] [--memory 256] [--every 5] [--seed N]
#   sudo scripts/bench.sh image [--memory 0,256] [--runs N]
#   sudo scripts/bench.sh restore_check [--memory 0,256] [--runs N]
#   sudo scripts/bench.sh archive [--memory 0,256,1024] [--runs N]   (unpacks Podman, the peer)
#   sudo scripts/bench.sh page_server [--memory 0,256,1024] [--runs N]
#   sudo scripts/bench.sh scale [--containers 1,4,16] [--memory 0,64] [--pods 1,4]   (likewise)
set -euo pipefail
cd "$(dirname "$0")/.."
export HOME="${HOME:-/root}"
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
which="${1:-runtime}"; shift || true
bash scripts/install-deps.sh >/dev/null
# The archive and scale benches' peer: Podman 5.4.2 from trixie, unpacked into a private
# directory (never installed, never by CI): scripts/podman-private.sh. STASIS_BENCH_NO_PODMAN=1
# leaves it out (the Podman columns then say "-").
if { [ "$which" = archive ] || [ "$which" = scale ]; } && [ -z "${STASIS_BENCH_NO_PODMAN:-}" ]; then
    STASIS_PODMAN="$(bash scripts/podman-private.sh)"
    export STASIS_PODMAN
fi
cargo build -q --workspace --release --bins
# Every binary the bench runs is the release build (stasisctl too: the newest build of an
# unchanged binary may be a debug one).
export STASIS_BUILD_PROFILE=release
STASIS_SHIM="$PWD/target/release/containerd-shim-stasis-v2" exec "target/release/bench_$which" "$@"
