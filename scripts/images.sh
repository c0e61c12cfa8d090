#!/usr/bin/env bash
# Builds the OCI images of the three servers and the CLI from release
# binaries, without a container engine, and pushes them to REGISTRY as
# REGISTRY/oakestra-addons/NAME:VERSION (and :REVISION, the commit's first
# 12 characters). Prints each image's digest and size.
#
#   scripts/images.sh REGISTRY [--plain-http] [--version V]
#
# --plain-http for a registry without TLS (a local one). Credentials, if the
# registry wants them: REGISTRY_USERNAME and REGISTRY_PASSWORD.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: scripts/images.sh REGISTRY [--plain-http] [--version V]" >&2
    exit 2
fi
scripts/setup.sh
cargo build --release --quiet -p addons-marketplace -p addons-manager -p addons-monitor -p oak-addons --bins
cargo build --release --quiet -p oak-tools --bin oak-images
exec target/release/oak-images "$@" --bin-dir target/release
