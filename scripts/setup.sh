#!/usr/bin/env bash
# Sets up everything loraforge needs on a fresh machine, idempotently:
#   - nats-server (Debian package) for the managed local NATS, chromium for the dashboard tests;
#   - the engine's Python environment, kept outside the clone under
#     ${LORAFORGE_CACHE:-~/.cache/loraforge}/venv-<hash of engine/requirements.txt + python version>
#     so clones share it, and linked as engine/.venv;
#   - the Python subscriber example's small environment (nats-py, protobuf), linked as examples/python/.venv;
#   - node_modules (npm ci), the TypeScript build, and examples/node_modules (the SDK's packed tarball).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. nats-server ---------------------------------------------------------------
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  say "installing nats-server (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi

# 1b. Chromium, for the dashboard's browser tests (playwright-core drives it) ------
if ! command -v chromium >/dev/null 2>&1; then
  say "installing chromium (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# 2. Python environment for the engine -----------------------------------------
PYTHON=${LORAFORGE_BASE_PYTHON:-python3}
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
hash=$( (cat engine/requirements.txt; echo "$pyver") | sha256sum | cut -c1-12)
cache=${LORAFORGE_CACHE:-$HOME/.cache/loraforge}
venv="$cache/venv-$hash"
if [ ! -f "$venv/.complete" ]; then
  say "creating the engine environment in $venv (torch is a large download the first time)"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r engine/requirements.txt
  touch "$venv/.complete"
fi
ln -sfn "$venv" engine/.venv

# 2b. The Python subscriber example's environment (examples/python/requirements.txt) ----
subhash=$( (cat examples/python/requirements.txt; echo "$pyver") | sha256sum | cut -c1-12)
subvenv="$cache/subscriber-venv-$subhash"
if [ ! -f "$subvenv/.complete" ]; then
  say "creating the Python subscriber example's environment in $subvenv"
  rm -rf "$subvenv"
  mkdir -p "$cache"
  "$PYTHON" -m venv "$subvenv"
  "$subvenv/bin/python" -m pip install -q -r examples/python/requirements.txt
  touch "$subvenv/.complete"
fi
ln -sfn "$subvenv" examples/python/.venv

# 2c. grpcurl, for the test that an error's details read as JSON through reflection ----
# A test tool only (a Go program, from the Go module proxy), built once into the cache where Go is installed;
# without Go that one test is skipped and says why.
grpcurl_version=v1.9.3
grpcurl_bin="$cache/grpcurl-$grpcurl_version/grpcurl"
if [ ! -x "$grpcurl_bin" ] && command -v go >/dev/null 2>&1; then
  say "building grpcurl $grpcurl_version (test tool)"
  if GOBIN="$cache/grpcurl-$grpcurl_version" GOFLAGS=-mod=mod go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$grpcurl_version" >/dev/null 2>&1; then
    :
  else
    say "could not build grpcurl; its test will be skipped"
  fi
fi
mkdir -p .tools
if [ -x "$grpcurl_bin" ]; then ln -sfn "$grpcurl_bin" .tools/grpcurl; fi

# 3. Node dependencies and build -----------------------------------------------
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing node modules"
  ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error
fi
say "building TypeScript"
npx tsc -b sdk server tests
# examples/ is a project of its own that installs the SDK from its npm pack tarball, as another team does.
bash scripts/install-examples-sdk.sh
npx tsc -b examples
chmod +x server/dist/cli/main.js   # the `loraforge` bin (npx loraforge) is linked before it is built
say "ready"
