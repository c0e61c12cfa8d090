#!/usr/bin/env bash
# Runs the addons system on this machine.
#
#   scripts/dev.sh up      set up, build (release), start everything, print how to reach it
#   scripts/dev.sh down    stop everything `up` started
#   scripts/dev.sh status  show what runs
#
# Everything lives under .data/dev: a private containerd (own root, state and
# socket; never the machine's default one), the embedded stores, logs and pid
# files. The servers listen on Oakestra's ports on 127.0.0.1: marketplace
# 11102, manager 11101 (root plane), monitor 11103.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA="$ROOT/.data/dev"
BIN="$ROOT/target/release"
MARKETPLACE_ADDR=127.0.0.1:11102
MANAGER_ADDR=127.0.0.1:11101
MONITOR_ADDR=127.0.0.1:11103
COMPONENTS=(containerd marketplace manager monitor)

log() { echo "dev: $*" >&2; }

pid_of() {
    local pidfile="$DATA/$1.pid"
    [ -f "$pidfile" ] || return 1
    local pid
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    else
        rm -f "$pidfile" # left over from a crash
        return 1
    fi
}

# start NAME LISTEN_ADDR COMMAND... : starts a server unless it runs, waits
# until it prints the address it listens on.
start() {
    local name=$1 addr=$2; shift 2
    if pid=$(pid_of "$name"); then
        log "$name already runs (pid $pid)"
        return
    fi
    : >"$DATA/$name.out"
    "$@" >"$DATA/$name.out" 2>"$DATA/$name.log" </dev/null &
    echo $! >"$DATA/$name.pid"
    for _ in $(seq 1 100); do
        if grep -q "^listening on $addr$" "$DATA/$name.out" 2>/dev/null; then
            log "$name listens on $addr (log: $DATA/$name.log)"
            return
        fi
        if ! kill -0 "$(cat "$DATA/$name.pid")" 2>/dev/null; then
            log "$name failed to start:"
            tail -n 5 "$DATA/$name.log" >&2
            rm -f "$DATA/$name.pid"
            exit 1
        fi
        sleep 0.1
    done
    log "$name did not listen on $addr within 10 s; see $DATA/$name.log"
    exit 1
}

start_containerd() {
    if pid=$(pid_of containerd); then
        log "containerd already runs (pid $pid)"
        return
    fi
    local dir="$DATA/containerd"
    mkdir -p "$dir"
    cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  address = "$dir/debug.sock"
TOML
    containerd --config "$dir/config.toml" >"$DATA/containerd.log" 2>&1 </dev/null &
    echo $! >"$DATA/containerd.pid"
    for _ in $(seq 1 100); do
        [ -S "$dir/containerd.sock" ] && { log "containerd runs (socket $dir/containerd.sock)"; return; }
        sleep 0.1
    done
    log "containerd did not start; see $DATA/containerd.log"
    exit 1
}

stop() {
    local name=$1 pid
    pid=$(pid_of "$name") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop within 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DATA/$name.pid"
    log "$name stopped"
}

up() {
    "$ROOT/scripts/setup.sh"
    log "building (release)"
    (cd "$ROOT" && cargo build --release --bins --quiet)
    mkdir -p "$DATA"
    start_containerd
    start marketplace "$MARKETPLACE_ADDR" "$BIN/addons-marketplace" \
        --listen "$MARKETPLACE_ADDR" --store "embedded:$DATA/marketplace.redb"
    start manager "$MANAGER_ADDR" "$BIN/addons-manager" \
        --listen "$MANAGER_ADDR" --store "embedded:$DATA/manager.redb" \
        --marketplace "http://$MARKETPLACE_ADDR" --plane root
    start monitor "$MONITOR_ADDR" "$BIN/addons-monitor" \
        --listen "$MONITOR_ADDR" --manager "http://$MANAGER_ADDR" \
        --containerd-socket "$DATA/containerd/containerd.sock" --namespace oakestra \
        --node-id "$(hostname)" --state-dir "$DATA/monitor" --plane root
    echo
    for addr in "$MARKETPLACE_ADDR" "$MANAGER_ADDR" "$MONITOR_ADDR"; do
        echo "== $addr"
        "$BIN/oak-addons" probe "http://$addr"
    done
    cat <<TEXT

The addons system runs. Explore it:
  $BIN/oak-addons probe http://$MARKETPLACE_ADDR
  grpcurl -plaintext $MARKETPLACE_ADDR list
  grpcurl -plaintext $MARKETPLACE_ADDR describe oakestra.addons.marketplace.v1.MarketplaceService
  grpcurl -plaintext -d '{"addon":{"name":"hello","services":[{"service_name":"hello","image":"127.0.0.1:5000/hello:1"}]}}' \\
      $MARKETPLACE_ADDR oakestra.addons.marketplace.v1.MarketplaceService/PublishAddon
  grpcurl -plaintext $MONITOR_ADDR oakestra.addons.monitor.v1.NodeMonitorService/GetRuntimeInfo
Logs are in $DATA/*.log. Stop everything with: scripts/dev.sh down
TEXT
}

down() {
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        stop "${COMPONENTS[$i]}"
    done
    # Addon containers outlive the monitor and containerd by design (their
    # shims keep them); the dev stack takes them down with it.
    local socket="$DATA/containerd/containerd.sock"
    for shim in $(pgrep -f "containerd-shim.*-address $socket" || true); do
        pkill -KILL -P "$shim" 2>/dev/null || true
        kill -KILL "$shim" 2>/dev/null || true
    done
    if [ -d "$DATA/monitor/netns" ]; then
        for ns in "$DATA"/monitor/netns/*; do
            [ -e "$ns" ] || continue
            umount -l "$ns" 2>/dev/null || true
            rm -f "$ns"
        done
    fi
}

status() {
    local running=0
    for name in "${COMPONENTS[@]}"; do
        if pid=$(pid_of "$name"); then
            printf '%-12s running (pid %s)\n' "$name" "$pid"
            running=1
        else
            printf '%-12s stopped\n' "$name"
        fi
    done
    [ "$running" -eq 1 ]
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: scripts/dev.sh up|down|status" >&2; exit 2 ;;
esac
