#!/usr/bin/env bash
# Everything the GPU checks need, in one command for the device tool (15 minutes of device time per session):
#
#   bash bench/gpu/fetch_wheels.sh          # here, once: diffusers' wheel into .whl/
#   device run: command "bash bench/gpu/device_run.sh", carry [".whl"], timeout_s 580
#
# It installs the carried wheels into /tmp/site, prints the versions, then runs, each under its own time limit
# and logging to $OUT/log (which comes back even when the run is cut short):
#   1. check_mixed_precision.py --arch sd and --arch sdxl (fp16 and bf16 CUDA training: loss falls, skipped
#      steps counted, LoRA loads and changes the image),
#   2. train_sd15.py (SD-1.5 architecture at 512 px, fp16 and bf16, batch 1/4/16, diffusers' script vs engine;
#      the script's extra packages must be carried as wheels, see bench/README.md).
# Record what it prints in bench/RESULTS.md with the date.
set -uo pipefail
OUT=${OUT:-/tmp/loraforge-device-out}
mkdir -p "$OUT"
log="$OUT/log"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=engine:${PYTHONPATH:-}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, diffusers, peft, transformers, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| peft", peft.__version__, "| transformers", transformers.__version__, "| accelerate", accelerate.__version__)'
} 2>&1 | tee -a "$log"
status=0
step() { # step SECONDS command...
  local limit=$1; shift
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== exit $rc" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}
step 120 python3 bench/gpu/check_mixed_precision.py --arch sd --steps 40
step 120 python3 bench/gpu/check_mixed_precision.py --arch sdxl --steps 40
step 300 python3 bench/gpu/train_sd15.py --steps 10 --warmup 3
exit $status
