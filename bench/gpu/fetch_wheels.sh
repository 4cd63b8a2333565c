#!/usr/bin/env bash
# Downloads, here, the wheels the device machine lacks (its image has torch, transformers, peft, accelerate,
# safetensors, pillow, numpy, but not diffusers) into .whl/ (git-ignored), for bench/gpu/device_run.sh.
# The device machine's Python is 3.12; diffusers is pure Python.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(grep -E '^diffusers==' engine/requirements.txt | cut -d= -f3)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==${version}"
ls -l .whl
