#!/usr/bin/env bash
# Runs the addons system on this machine.
#
#   scripts/dev.sh up      set up, build (release), start everything, walk through the demo story
#   scripts/dev.sh down    stop everything `up` started and remove what it left on the host
#   scripts/dev.sh status  show what runs
#
# Everything lives under .data/dev: a private containerd (own root, state and
# socket; never the machine's default one), a loopback OCI registry with the
# demo images, the embedded stores, logs and pid files. The servers listen on
# Oakestra's ports on 127.0.0.1: marketplace 11102, manager 11101 (root
# plane), monitor 11103; the registry on 11105. The monitor runs the demo
# core scheduler from demo/core-components.yaml on port 11180.
#
# The stack is secured as a real one is: a throwaway CA in .data/dev/pki
# signs the servers' TLS certificate; every call carries a role token signed
# with the stack's JWT secret (the user's: publisher, reviewer, operator;
# the manager's, to read the marketplace: viewer; the node's: node). The CLI
# reads them from the context `dev` of .data/dev/oak-addons.yaml.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA="$ROOT/.data/dev"
BIN="$ROOT/target/release"
OAK="$BIN/oak-addons"
GRPCURL="$ROOT/target/test-env/venv/bin/grpcurl" # installed by scripts/setup.sh
MARKETPLACE_ADDR=127.0.0.1:11102
MANAGER_ADDR=127.0.0.1:11101
MONITOR_ADDR=127.0.0.1:11103
REGISTRY_ADDR=127.0.0.1:11105
SCHEDULER_URL=http://127.0.0.1:11180/
DASHBOARD_URL=http://127.0.0.1:11190/
BRIDGE_PREFIX=oakdev
SUBNET_PREFIX=10.88
COMPONENTS=(containerd registry marketplace manager monitor)
PKI="$DATA/pki"
NODE_ID=$(hostname)
# The CLI's config file, with the context `dev`; the script's own calls use
# it too, and nothing from the caller's environment overrides it.
export OAK_ADDONS_CONFIG="$DATA/oak-addons.yaml"
unset OAK_ADDONS_MARKETPLACE OAK_ADDONS_MANAGER OAK_ADDONS_MONITOR OAK_ADDONS_CONTEXT \
    OAK_ADDONS_TOKEN OAK_ADDONS_TOKEN_FILE OAK_ADDONS_CA_CERT OAK_ADDONS_CLIENT_CERT OAK_ADDONS_CLIENT_KEY

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

start_registry() {
    if pid=$(pid_of registry); then
        log "registry already runs (pid $pid)"
        return
    fi
    local dir="$DATA/registry"
    mkdir -p "$dir/data"
    cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: $REGISTRY_ADDR
  secret: oakestra-addons-dev
YAML
    /usr/bin/docker-registry serve "$dir/config.yml" >"$DATA/registry.log" 2>&1 </dev/null &
    echo $! >"$DATA/registry.pid"
    for _ in $(seq 1 100); do
        if curl -fsS --max-time 1 -o /dev/null "http://$REGISTRY_ADDR/v2/" 2>/dev/null; then
            log "registry listens on $REGISTRY_ADDR"
            return
        fi
        sleep 0.1
    done
    log "the registry did not start; see $DATA/registry.log"
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

# step TEXT: prints a step of the story.
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# show COMMAND...: prints a command, then runs it.
show() { printf '$ %s\n' "$*" | sed "s#$BIN/##" >&2; "$@"; }

# get URL: the body at URL, or nothing.
get() { curl -fsS --max-time 2 "$1" 2>/dev/null || true; }

# until_answers URL TEXT: waits up to 20 s for URL to answer with TEXT.
until_answers() {
    for _ in $(seq 1 100); do
        if get "$1" | grep -q "$2"; then
            show curl -fsS "$1"
            return
        fi
        sleep 0.2
    done
    log "$1 did not answer with '$2' within 20 s"
    exit 1
}

# addon_id NAME FILE: the id of the approved addon NAME, published from FILE
# if the marketplace does not have it yet.
addon_id() {
    local id
    id=$("$OAK" -o id marketplace list --name "$1" | head -n 1)
    if [ -z "$id" ]; then
        id=$(show "$OAK" -o id marketplace publish "$2" --wait)
    fi
    echo "$id"
}

story() {
    step "1. The core scheduler runs, started by the monitor from demo/core-components.yaml"
    until_answers "$SCHEDULER_URL" "core scheduler"
    echo "Every call needs a token (the CLI's context \`dev\` has the developer's); without one:"
    if show "$OAK" --token-file /dev/null marketplace list; then
        log "the marketplace answered a caller without a token"
        exit 1
    fi

    step "2. Publish two addons from Oakestra descriptor files, unchanged, and wait for verification"
    local scheduler metrics
    scheduler=$(addon_id energy-scheduler "$ROOT/demo/energy-scheduler.json")
    metrics=$(addon_id node-metrics "$ROOT/demo/metrics.json")
    show "$OAK" marketplace list

    step "3. Install the extension (two services sharing a volume): grant what it asks for"
    local ext
    ext=$("$OAK" -o id list --addon node-metrics | head -n 1)
    if [ -z "$ext" ]; then
        echo "Approved is not consent: an install must grant every privilege the addon needs."
        if show "$OAK" -o id install "$metrics"; then
            log "the manager installed an addon without consent"
            exit 1
        fi
        ext=$(show "$OAK" -o id install "$metrics" --wait --grant host-port=11190/tcp)
    fi
    show "$OAK" get "$ext"
    until_answers "$DASHBOARD_URL" "[0-9]"

    step "4. Install the energy-aware scheduler: it replaces the core scheduler on the same port"
    local plugin
    plugin=$("$OAK" -o id list --addon energy-scheduler | head -n 1)
    if [ -z "$plugin" ]; then
        echo "Replacing a core component is a privilege; this node's core-components file marks the scheduler replaceable."
        show "$OAK" marketplace get "$scheduler"
        plugin=$(show "$OAK" -o id install "$scheduler" --wait --grant core-component=scheduler)
    fi
    show "$OAK" get "$plugin"
    until_answers "$SCHEDULER_URL" "energy-aware scheduler"
    show "$OAK" node

    step "5. Uninstall it: the core scheduler comes back"
    show "$OAK" uninstall "$plugin" --purge --wait
    until_answers "$SCHEDULER_URL" "core scheduler"

    step "6. What runs now"
    show "$OAK" list
}

up() {
    "$ROOT/scripts/setup.sh"
    log "building (release)"
    (cd "$ROOT" && cargo build --release --bins --quiet)
    mkdir -p "$DATA"
    start_containerd
    start_registry
    log "building and pushing the demo images"
    "$BIN/oak-dev" images "$REGISTRY_ADDR" >"$DATA/images.txt"
    log "making the stack's CA, certificate, JWT secret and role tokens in $PKI"
    "$BIN/oak-dev" pki "$PKI" "$NODE_ID" >&2
    "$OAK" config set-context dev --set-marketplace "https://$MARKETPLACE_ADDR" \
        --set-manager "https://$MANAGER_ADDR" --set-monitor "https://$MONITOR_ADDR" \
        --set-ca-cert "$PKI/ca.pem" --set-token-file "$PKI/user.jwt" >/dev/null
    "$OAK" config use-context dev >/dev/null
    local secured=(--tls-cert "$PKI/ca/server.pem" --tls-key "$PKI/ca/server.key"
        --jwt-secret-file "$PKI/jwt-secret")
    start marketplace "$MARKETPLACE_ADDR" "$BIN/addons-marketplace" "${secured[@]}" \
        --listen "$MARKETPLACE_ADDR" --store "embedded:$DATA/marketplace.redb" \
        --insecure-registry "$REGISTRY_ADDR"
    start manager "$MANAGER_ADDR" "$BIN/addons-manager" "${secured[@]}" \
        --listen "$MANAGER_ADDR" --store "embedded:$DATA/manager.redb" \
        --marketplace "https://$MARKETPLACE_ADDR" --marketplace-ca "$PKI/ca.pem" \
        --marketplace-token-file "$PKI/manager.jwt" --plane root
    start monitor "$MONITOR_ADDR" "$BIN/addons-monitor" "${secured[@]}" \
        --listen "$MONITOR_ADDR" --manager "https://$MANAGER_ADDR" \
        --manager-ca "$PKI/ca.pem" --token-file "$PKI/node.jwt" \
        --containerd-socket "$DATA/containerd/containerd.sock" --namespace oakestra \
        --node-id "$NODE_ID" --state-dir "$DATA/monitor" --plane root \
        --insecure-registry "$REGISTRY_ADDR" --core-components "$ROOT/demo/core-components.yaml" \
        --bridge-prefix "$BRIDGE_PREFIX" --subnet-prefix "$SUBNET_PREFIX" --stop-grace 5s
    story
    cat <<TEXT

The addons system runs, with the extension installed, over TLS and with
role tokens (CA and tokens in $PKI). Explore it:
  export PATH=$BIN:\$PATH OAK_ADDONS_CONFIG=$OAK_ADDONS_CONFIG
  oak-addons config get-contexts       # the context \`dev\`: servers, CA, token
  oak-addons list                      # installations
  oak-addons marketplace list --all    # addons
  oak-addons get ID                    # services, phases, restarts, exit codes
  oak-addons watch                     # one line per change
  oak-addons logs ID dashboard         # a service's log, through the monitor
  oak-addons probe https://$MANAGER_ADDR
  oak-addons --token-file /dev/null list   # refused: UNAUTHENTICATED
  $GRPCURL -cacert $PKI/ca.pem $MARKETPLACE_ADDR list
  $GRPCURL -cacert $PKI/ca.pem -H "authorization: Bearer \$(cat $PKI/user.jwt)" \\
      $MANAGER_ADDR oakestra.addons.engine.v1.AddonsManagerService/ListInstallations
  curl $SCHEDULER_URL   # the core scheduler
  curl $DASHBOARD_URL   # the extension's dashboard
Logs are in $DATA/*.log. Stop everything with: scripts/dev.sh down
TEXT
}

down() {
    # Uninstall everything first, so the monitor removes the addon
    # containers and their networks the normal way.
    if pid_of manager >/dev/null && pid_of monitor >/dev/null; then
        for id in $("$OAK" -o id list 2>/dev/null || true); do
            "$OAK" uninstall "$id" --purge --wait --wait-timeout 60s >/dev/null ||
                log "could not uninstall $id; cleaning up below"
        done
    fi
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        stop "${COMPONENTS[$i]}"
    done
    # Containers outlive the monitor and containerd by design (their shims
    # keep them): the dev stack takes them down with it, then removes what
    # containerd and the CNI plugins left on the host.
    local socket="$DATA/containerd/containerd.sock"
    for shim in $(pgrep -f "containerd-shim.*-address $socket" || true); do
        pkill -KILL -P "$shim" 2>/dev/null || true
        kill -KILL "$shim" 2>/dev/null || true
    done
    if [ -x "$BIN/oak-dev" ]; then
        "$BIN/oak-dev" clean-network "$DATA/monitor" "$BRIDGE_PREFIX" "$SUBNET_PREFIX"
    fi
    awk -v data="$DATA/" 'index($2, data) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
    rm -rf "$DATA/containerd" "$DATA/monitor"
    local left
    left=$(leftovers)
    if [ -n "$left" ]; then
        log "stopped, but these are left:"
        echo "$left" >&2
        exit 1
    fi
    log "stopped; no process, container, mount, namespace, bridge or iptables rule is left"
}

# leftovers: what the dev stack has on the host, one line each.
leftovers() {
    local socket="$DATA/containerd/containerd.sock"
    pgrep -af "containerd-shim.*-address $socket" | grep -v defunct || true
    awk -v data="$DATA/" 'index($2, data) == 1 { print "mount " $2 }' /proc/mounts
    ip -br link 2>/dev/null | awk -v prefix="$BRIDGE_PREFIX" 'index($1, prefix) == 1 { print "link " $1 }'
    iptables-save 2>/dev/null | grep -F -- "$SUBNET_PREFIX." | sed 's/^/iptables /' || true
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
    if [ "$running" -eq 0 ]; then
        local left
        left=$(leftovers)
        [ -z "$left" ] || printf 'left on the host:\n%s\n' "$left"
    fi
    [ "$running" -eq 1 ]
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: scripts/dev.sh up|down|status" >&2; exit 2 ;;
esac
