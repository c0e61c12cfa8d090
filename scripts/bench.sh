#!/usr/bin/env bash
# Runs the benchmarks against release builds and prints their tables, each
# figure next to its baseline measured in the same run.
#
#   scripts/bench.sh            every benchmark
#   scripts/bench.sh NAME       one (verification)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
scripts/setup.sh
cargo build --release --bins --quiet
export ADDONS_NX27017="$ROOT/target/test-env/venv/bin/nx-27017"
benches=("${@:-verification api status monitor swap}")
read -r -a benches <<<"${benches[*]}"
for bench in "${benches[@]}"; do
    echo "## $bench ($(date -u +%Y-%m-%d), $(nproc) cores)"
    cargo bench --quiet -p integration-tests --bench "$bench" 2>/dev/null
done
