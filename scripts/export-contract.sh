#!/usr/bin/env bash
# Exports the whole loraforge contract as a standalone buf workspace another team can build and
# generate from, with nothing else from this repository (and no Buf Schema Registry):
#   OUT/buf.yaml         two modules: loraforge/ (buf.build/loraforge/loraforge) and deps/
#   OUT/README.md        proto/README.md: what is in it and how to generate code from it
#   OUT/loraforge/       every .proto of proto/ (loraforge.v1, grpc.health.v1)
#   OUT/deps/            the pinned imports (buf/validate, google/api, google/rpc)
#   OUT/loraforge.binpb  the same contract as one FileDescriptorSet (proto/loraforge.binpb)
# usage: scripts/export-contract.sh OUT_DIR [--tar FILE.tar.gz]   (OUT_DIR must not exist or be empty)
set -euo pipefail
out=${1:?usage: export-contract.sh OUT_DIR [--tar FILE.tar.gz]}
tarball=""
if [ "${2:-}" = "--tar" ]; then tarball=${3:?--tar needs a file name}; fi
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -z "$tarball" ] || tarball=$(realpath -m "$tarball")
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "$(ls -A "$out")" ]; then echo "export-contract: $out is not empty" >&2; exit 2; fi

cd "$repo"
bash scripts/proto-deps.sh
buf=node_modules/.bin/buf
# Each module's own files (--exclude-imports), so no file is in two modules.
"$buf" export proto --exclude-imports -o "$out/loraforge"
"$buf" export .proto-deps/protovalidate --exclude-imports -o "$out/deps"
"$buf" export .proto-deps/googleapis --exclude-imports -o "$out/deps"
cp proto/README.md "$out/README.md"
cp proto/README.md "$out/loraforge/README.md"
cp proto/loraforge.binpb "$out/loraforge.binpb"

version=$(node -p 'require("./package.json").version')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
cat >"$out/buf.yaml" <<EOF
# The loraforge contract $version (commit $commit), exported by scripts/export-contract.sh.
# loraforge/ is the module buf.build/loraforge/loraforge (not pushed to the Buf Schema Registry);
# deps/ holds the files it imports: buf/validate (protovalidate 1.3.0), google/api and google/rpc
# (googleapis-common-protos 1.76.0). See README.md for buf generate.
version: v2
modules:
  - path: loraforge
    name: buf.build/loraforge/loraforge
  - path: deps
EOF

if [ -n "$tarball" ]; then
  # One top folder, loraforge-contract/ (buf reads it as "FILE.tar.gz#strip_components=1").
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  cp -r "$out" "$stage/loraforge-contract"
  tar -czf "$tarball" -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner loraforge-contract
  echo "export-contract: $tarball" >&2
fi
echo "export-contract: $out" >&2
