#!/usr/bin/env bash
# bench/infer as one prepared run for a device session (issue 20, item 5), that also runs on a CPU-only machine:
# onnxruntime's CUDA execution provider with an fp16 export where the CUDA provider library is installed beside
# onnxruntime-node and a GPU answers, else the CPU provider (fp32 unless --dtype says otherwise). What a device
# machine lacks (Node, the built server, the Node packages, diffusers) comes from .devcarry/, made here by
# bench/infer/pack_device.sh; on a developer machine or in CI nothing is unpacked.
#
#   bash bench/infer/device_run.sh [--model tiny|sd15] [--provider auto|cuda|cpu] [--dtype fp32|fp16] [run.js flags…]
#
# Other flags go to bench/infer/run.js (--threads, --images, --switches, --size, --work, --no-diffusers, …); --work
# defaults to $WORK or /tmp/loraforge-device-bench. With $OUT set (the device tool), the report is also written to
# $OUT/bench-infer.txt. The last line printed is run.js's JSON result.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.devcarry

model=tiny provider=auto dtype="" work="${WORK:-/tmp/loraforge-device-bench}" rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --provider) provider="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
case "$provider" in auto|cuda|cpu) ;; *) echo "device_run: --provider must be auto, cuda or cpu, got $provider" >&2; exit 2 ;; esac
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/bench-infer.txt") 2>&1; fi
say() { echo "[device_run] $*" >&2; }

# Node: the one on PATH, else the carried binary.
if command -v node >/dev/null 2>&1; then
  NODE=$(command -v node)
elif [ -f "$CARRY/node.xz" ]; then
  mkdir -p /tmp/loraforge-node && xz -dc "$CARRY/node.xz" >/tmp/loraforge-node/node && chmod +x /tmp/loraforge-node/node
  NODE=/tmp/loraforge-node/node
else
  say "no node on PATH and no $CARRY/node.xz: run bench/infer/pack_device.sh on a machine with Node and carry $CARRY"
  exit 2
fi

# The built server and the Node packages the inference path loads, unpacked from the carry where missing.
ORT_BIN=node_modules/onnxruntime-node/bin/napi-v6/linux/x64
if [ ! -f server/dist/infer/pipeline.js ] || [ ! -f "$ORT_BIN/libonnxruntime.so.1" ]; then
  if [ ! -f "$CARRY/js.tar.xz" ]; then
    say "server/dist or node_modules/onnxruntime-node is missing and there is no $CARRY/js.tar.xz (bench/infer/pack_device.sh)"
    exit 2
  fi
  tar -xJf "$CARRY/js.tar.xz"
fi
# onnxruntime-node's CUDA provider libraries, when carried (see bench/README.md for why they usually cannot be).
if [ -d "$CARRY/ort-cuda" ]; then cp "$CARRY"/ort-cuda/libonnxruntime_providers_* "$ORT_BIN/"; fi

# Python: the engine's venv here; the machine's python3 there, with diffusers from carried wheels when it lacks it.
PY="${LORAFORGE_PYTHON:-}"
if [ -z "$PY" ]; then if [ -x engine/.venv/bin/python ]; then PY=$PWD/engine/.venv/bin/python; else PY=$(command -v python3); fi; fi
export LORAFORGE_PYTHON="$PY"
if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
  if ! ls "$CARRY"/whl/*.whl >/dev/null 2>&1; then say "$PY has no diffusers and $CARRY/whl holds no wheels"; exit 2; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/loraforge-site "$CARRY"/whl/*.whl
  export PYTHONPATH="/tmp/loraforge-site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The provider: CUDA when its library is beside onnxruntime-node and a GPU answers.
gpu=""
if command -v nvidia-smi >/dev/null 2>&1; then gpu=$(nvidia-smi -L 2>/dev/null | head -1 || true); fi
cuda_lib=no
if ls "$ORT_BIN"/libonnxruntime_providers_cuda.so* >/dev/null 2>&1; then cuda_lib=yes; fi
if [ "$provider" = auto ]; then
  if [ "$cuda_lib" = yes ] && [ -n "$gpu" ]; then provider=cuda; else provider=cpu; fi
fi
[ -n "$dtype" ] || { [ "$provider" = cuda ] && dtype=fp16 || dtype=fp32; }
say "node $("$NODE" --version); python $("$PY" -c 'import sys; print(sys.version.split()[0])'); GPU: ${gpu:-none}; onnxruntime-node CUDA provider library: $cuda_lib"
say "running bench/infer --model $model --provider $provider --dtype $dtype (work: $work)"
"$NODE" bench/infer/run.js --model "$model" --provider "$provider" --dtype "$dtype" --work "$work" ${rest[@]+"${rest[@]}"}
