#!/usr/bin/env bash
# The demo: sets everything up, makes a tiny Stable Diffusion model and a synthetic
# captioned data set, starts `loraforge serve`, uploads the data set and trains a LoRA on
# it through the SDK with a live progress line, downloads the LoRA file by its artifact
# name, and draws an image with it through Infer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

demo=${LORAFORGE_DEMO_DIR:-$PWD/.demo}
mkdir -p "$demo"
py() { PYTHONPATH=engine engine/.venv/bin/python -m loraforge_engine "$@"; }
[ -f "$demo/tiny-sd/model_index.json" ] || py make-tiny-model "$demo/tiny-sd"
[ -f "$demo/shapes/metadata.jsonl" ] || py make-dataset "$demo/shapes" --count 16

LORAFORGE_DASHBOARD_ADDRESS=${LORAFORGE_DASHBOARD_ADDRESS:-127.0.0.1:0} \
  node server/dist/cli/main.js serve --address 127.0.0.1:0 --state-dir "$demo/state" >"$demo/server.out" 2>"$demo/server.log" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 150); do
  grep -q "dashboard on\|listening on" "$demo/server.out" 2>/dev/null && sleep 0.2 && break
  kill -0 $server 2>/dev/null || { cat "$demo/server.log" >&2; exit 1; }
  sleep 0.2
done
address=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$demo/server.out")
dashboard=$(sed -n 's/.*dashboard on \([^ ]*\).*/\1/p' "$demo/server.out")
echo "loraforge server on $address (log: $demo/server.log)"
[ -n "$dashboard" ] && echo "live dashboard: $dashboard"

node examples/dist/train.js --address "$address" --model "$demo/tiny-sd" --upload "$demo/shapes" \
  --lora "$demo/pytorch_lora_weights.safetensors" --image "$demo/lora-image.png"
