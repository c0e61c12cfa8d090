#!/usr/bin/env bash
# Runs every check and test of the workspace, as CI does: set-up, format,
# lints, buf lint, then unit and integration tests. The tests start and stop
# every server they need themselves; nothing is left running.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

cleanup() {
    # Safety net: a test that panicked between start and stop of a server
    # must not leave it running.
    pkill -f "^$ROOT/target/" 2>/dev/null || true
}
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*" >&2; }

step "set-up"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "buf lint"
buf lint

step "buf breaking (against the frozen v1 contracts, proto/v1.binpb)"
buf breaking --against proto/v1.binpb

step "build oak-images alone, as scripts/images.sh does (no features borrowed from the workspace)"
cargo build -p oak-tools --bin oak-images

step "build the binaries the integration tests start"
cargo build --workspace --bins

step "tests"
export ADDONS_NX27017="$ROOT/target/test-env/venv/bin/nx-27017"
if [ -n "${MONGODB_URI:-}" ]; then
    echo "MONGODB_URI is set: the MongoDB suites run against that server instead of nx-27017" >&2
fi
cargo test --workspace --no-fail-fast -- --test-threads "${ADDONS_TEST_THREADS:-4}"

step "fault campaigns: a fixed seed and a new one (printed), 2 minutes each, alone on the machine"
cargo test -p integration-tests --test chaos -- --ignored --test-threads 1 --nocapture

step "all checks passed"
