#!/usr/bin/env bash
# Sets up a fresh machine and runs every stasis test: unit tests and the end-to-end suite
# against a private containerd. Must run as root. Fails (never skips) when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: run as root (sudo $0): the end-to-end tests start containerd, runc and mounts" >&2
  exit 1
fi
export HOME="${HOME:-/root}"
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "test.sh: cargo not found" >&2; exit 1; }

bash scripts/install-deps.sh

cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests each start their own containerd; two at a time fit this 2-core machine.
cargo test --workspace -- --test-threads="${STASIS_TEST_THREADS:-2}"
