"""A short CUDA training check in fp16 and in bf16: the loss falls, the fp16 gradient scaler's skipped steps are
counted, and the LoRA loads with diffusers' load_lora_weights and changes the image.

    PYTHONPATH=engine python bench/gpu/check_mixed_precision.py [--steps 60] [--work DIR] [--arch sd|sdxl]

Runs the real `train` command (a subprocess, as the server runs it) on the tiny model at 64 px, batch 4, then
renders the validation prompt with and without the LoRA. Prints one line per precision and a JSON summary;
exits non-zero when a check fails. Needs CUDA; `--device cpu` is a dry run of the script itself (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle on a blue background"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--arch", choices=("sd", "sdxl"), default="sd")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraforge-check-mp"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of this script's own code (CI runs it so that it still works when a GPU "
                        "session comes); fp16 then trains in fp32 and says nothing about CUDA")
    a = p.parse_args()
    import numpy as np
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu/check_mixed_precision.py needs a CUDA device (--device cpu for a dry run)")
    # The engine first, then whatever PYTHONPATH holds (on the device machine: the carried wheels).
    path = os.pathsep.join(part for part in (str(ROOT / "engine"), os.environ.get("PYTHONPATH", "")) if part)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the engine picks CUDA whenever it sees one
    work = Path(a.work)
    model, data = work / f"tiny-{a.arch}", work / "data"
    py = [sys.executable, "-m", "loraforge_engine"]
    if not (model / "model_index.json").is_file():
        subprocess.run(py + ["make-tiny-model", str(model), "--arch", a.arch], check=True, env=env)
    if not (data / "metadata.jsonl").is_file():
        subprocess.run(py + ["make-dataset", str(data)], check=True, env=env)

    from diffusers import DiffusionPipeline

    def render(lora_dir: Path | None) -> np.ndarray:
        pipe = DiffusionPipeline.from_pretrained(str(model), local_files_only=True, use_safetensors=True).to(a.device)
        pipe.set_progress_bar_config(disable=True)
        if lora_dir is not None:
            pipe.load_lora_weights(str(lora_dir))
        g = torch.Generator("cpu").manual_seed(0)
        return pipe(PROMPT, num_inference_steps=10, generator=g, output_type="np", height=64, width=64).images

    base = render(None)
    summary, ok = {}, True
    for precision in ("fp16", "bf16"):
        out = work / f"out-{a.arch}-{precision}"
        spec = {"baseModel": str(model), "datasetDir": str(data), "resolution": 64, "trainBatchSize": 4,
                "maxTrainSteps": a.steps, "learningRate": 3e-3, "lrWarmupSteps": 0, "rank": 8, "loraAlpha": 16,
                "centerCrop": True, "randomFlip": True, "seed": 7, "checkpointingSteps": a.steps,
                "mixedPrecision": f"MIXED_PRECISION_{precision.upper()}"}
        spec_file = work / f"spec-{precision}.json"
        spec_file.write_text(json.dumps(spec))
        proc = subprocess.run(py + ["train", "--spec", str(spec_file), "--output-dir", str(out)], env=env,
                              capture_output=True, text=True)
        events = [json.loads(x) for x in proc.stdout.splitlines()]
        metrics = [e["metrics"] for e in events if "metrics" in e]
        logs = [e["log"]["message"] for e in events if "log" in e]
        if proc.returncode != 0 or not metrics:
            print(f"{precision}: train failed (exit {proc.returncode}): {logs[-1:]}\n{proc.stderr[-2000:]}")
            ok = False
            continue
        k = max(1, len(metrics) // 5)
        first = sum(m["loss"] for m in metrics[:k]) / k
        last = sum(m["loss"] for m in metrics[-k:]) / k
        diff = float(np.abs(render(out) - base).max())
        # proto3 JSON: int64 fields are strings, and zero values are left out.
        row = {"loss_first": first, "loss_last": last, "skipped_steps": int(metrics[-1].get("skippedSteps", 0)),
               "peak_memory_bytes": int(metrics[-1].get("peakMemoryBytes", 0)),
               "images_per_s": metrics[-1]["imagesPerSecond"],
               "image_diff_vs_base": diff, "precision_log": [m for m in logs if "mixed precision" in m]}
        summary[precision] = row
        passed = last < first and diff > 1e-3
        ok &= passed
        print(f"{precision}: loss {first:.4f} -> {last:.4f} (mean of first/last {k} steps), skipped steps "
              f"{row['skipped_steps']}, peak {row['peak_memory_bytes'] / 2**20:.0f} MiB, "
              f"{row['images_per_s']:.0f} images/s, LoRA image vs base max diff {diff:.3f} -> "
              f"{'ok' if passed else 'FAILED'}", flush=True)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)"
    print(json.dumps({"device": name, "arch": a.arch, **summary}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
