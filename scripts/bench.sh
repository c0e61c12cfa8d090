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
benches=("${@:-verification api status monitor swap replicas}")
read -r -a benches <<<"${benches[*]}"
for bench in "${benches[@]}"; do
    echo "## $bench ($(date -u +%Y-%m-%d), $(nproc) cores)"
    if ! cargo bench --quiet -p integration-tests --bench "$bench" 2>"$ROOT/target/bench-$bench.log"; then
        echo "bench $bench failed; the end of target/bench-$bench.log:" >&2
        tail -n 20 "$ROOT/target/bench-$bench.log" >&2
        exit 1
    fi
done
