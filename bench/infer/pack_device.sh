#!/usr/bin/env bash
# Packs into .devcarry/ (ignored by git) what bench/infer/device_run.sh needs on a device machine, which has no Node,
# no network and only what a call carries (64 MiB with the working tree):
#   node.xz      this machine's Node binary (x86-64 Linux, glibc)
#   js.tar.xz    server/dist and the Node packages the inference path loads (onnxruntime-node's linux-x64 binaries
#                only, onnxruntime-common, sharp with its libvips, detect-libc, semver, @img/colour)
#   whl/         the diffusers wheel of the engine's version (the device image has torch, transformers, peft, onnx,
#                onnxscript and onnxruntime, not diffusers), fetched with pip
#   ort-cuda/    onnxruntime-node's CUDA provider libraries, only if ORT_CUDA_DIR names a folder holding them
# Build first (npx tsc -b sdk server). Then name .devcarry in the device call's carry and run
# `bash bench/infer/device_run.sh --model sd15` there. Prints the sizes; fails when the total is over 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f server/dist/infer/pipeline.js ] || { echo "pack_device: build first (npx tsc -b sdk server)" >&2; exit 2; }
OUTDIR=.devcarry
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR/whl"

xz -T0 -6 -c "$(readlink -f "$(command -v node)")" >"$OUTDIR/node.xz"

ORT=node_modules/onnxruntime-node
tar -cJf "$OUTDIR/js.tar.xz" --dereference \
  server/dist server/package.json \
  "$ORT/package.json" "$ORT/dist" "$ORT/bin/napi-v6/linux/x64/libonnxruntime.so.1" "$ORT/bin/napi-v6/linux/x64/onnxruntime_binding.node" \
  node_modules/onnxruntime-common node_modules/sharp node_modules/@img/sharp-linux-x64 node_modules/@img/sharp-libvips-linux-x64 \
  node_modules/@img/colour node_modules/detect-libc node_modules/semver

DIFFUSERS=$(engine/.venv/bin/python -c "import diffusers; print(diffusers.__version__)")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform any -d "$OUTDIR/whl" "diffusers==$DIFFUSERS"

if [ -n "${ORT_CUDA_DIR:-}" ]; then
  mkdir -p "$OUTDIR/ort-cuda" && cp "$ORT_CUDA_DIR"/libonnxruntime_providers_* "$OUTDIR/ort-cuda/"
fi

du -ab "$OUTDIR" | sort -n | awk '{ printf "%8.1f MiB  %s\n", $1 / 1048576, $2 }'
total=$(du -sb "$OUTDIR" | cut -f1)
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "pack_device: $OUTDIR is $((total / 1048576)) MiB, over the 60 MiB that leaves room for the working tree in a 64 MiB call" >&2
  exit 1
fi
