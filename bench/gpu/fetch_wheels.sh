#!/usr/bin/env bash
# Downloads, here, the wheels bench/gpu/device_run.sh carries to the device machine, into .whl/ (git-ignored).
# Its image has torch, accelerate, safetensors, pillow, numpy, huggingface_hub and tokenizers, but no diffusers,
# and other versions of transformers and peft than engine/requirements.txt pins (transformers 5.17 there): the
# pinned diffusers, transformers and peft travel (all pure Python; its Python is 3.12). huggingface_hub and
# tokenizers stay the image's: theirs satisfy the pinned packages' requirements, and huggingface_hub 2.x would
# need packages the image lacks (httpx2).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
for name in diffusers transformers peft; do
  pin=$(grep -E "^${name}==" engine/requirements.txt)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$pin"
done
ls -l .whl
