#!/usr/bin/env bash
# Runs one randomized fault campaign (integration-tests/src/chaos): a
# marketplace, a manager (its store, embedded or MongoDB-wire, chosen by
# the seed unless --store says) and nodes in network namespaces, each with
# its own containerd and monitor; a workload and overlapping faults chosen
# from the seed; then the invariants. Exits 1 when one is violated.
#
#   scripts/chaos.sh [--duration 10m] [--seed N] [--nodes 3]
#                    [--store embedded|mongo] [--history FILE] [--settle 3m]
#
# Without --seed, the seed is the time; it is printed, and replays the run's
# choices with --seed. The history (one JSON line per operation, fault and
# violation) goes to target/chaos/<seed>.jsonl unless --history says;
# a failing run keeps every process's log beside it (<seed>.logs/).
# Needs root (namespaces, iptables), as the tests do.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
scripts/setup.sh >&2
cargo build --workspace --bins --quiet
export ADDONS_NX27017="$ROOT/target/test-env/venv/bin/nx-27017"

args=("$@")
seed=""
history=""
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
    --seed) seed="${args[$((i + 1))]:-}" ;;
    --history) history="${args[$((i + 1))]:-}" ;;
    esac
done
if [ -z "$seed" ]; then
    seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    args+=(--seed "$seed")
fi
if [ -z "$history" ]; then
    mkdir -p target/chaos
    args+=(--history "target/chaos/$seed.jsonl")
fi
exec target/debug/chaos "${args[@]}"
