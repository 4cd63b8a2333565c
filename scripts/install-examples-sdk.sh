#!/usr/bin/env bash
# Installs @loraforge/sdk into examples/ the way another team does: `npm pack` of sdk/ (its prepack
# builds it), then `npm install` of that tarball in examples/, a project of its own
# (examples/package.json depends on file:.sdk/loraforge-sdk.tgz). Nothing is reinstalled when the
# installed copy came from an identical tarball (npm pack is reproducible).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
packed=$(cd sdk && npm pack --json --pack-destination "$stage" 2>/dev/null | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s)[0].filename))')
tarball=examples/.sdk/loraforge-sdk.tgz
if [ -f examples/node_modules/@loraforge/sdk/package.json ] && cmp -s "$stage/$packed" "$tarball"; then exit 0; fi
mkdir -p examples/.sdk
cp "$stage/$packed" "$tarball"
# npm would keep a copy installed from an older tarball at the same path: remove it first.
rm -rf examples/node_modules/@loraforge/sdk examples/node_modules/.package-lock.json
(cd examples && npm install --no-package-lock --prefer-offline --no-audit --no-fund --loglevel=error)
