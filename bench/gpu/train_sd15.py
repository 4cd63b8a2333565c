"""GPU training benchmark on the SD-1.5 architecture with random weights (nothing is downloaded): diffusers' own
LoRA script against the engine, each as its own process, through bench/train_throughput's functions.

    PYTHONPATH=engine python bench/gpu/train_sd15.py [--precisions fp16,bf16] [--batches 1,4,16] [--steps 12]
        [--warmup 4] [--work DIR] [--sides upstream,engine] [--device cuda|cpu] [--tiny]
        [--reference-script PATH] [--ref-wheels DIR]

Model: bench/models.py's SD-1.5-shaped model (public widths, random weights), saved once under --work. Data: 32
synthetic 512 px captioned images (square, so cropping changes nothing); centre crop and random flip on both sides.

For each precision and batch size it runs, one after the other (alternating which goes first):
  upstream  diffusers' train_text_to_image_lora.py, unmodified, with --mixed_precision <precision>, in the
            benchmark-only environment bench/train_throughput makes (ensure_refvenv; --ref-wheels: install its
            extra packages from that folder, for a machine without network);
  engine    `python -m loraforge_engine train --spec ...` with mixedPrecision <precision>, as the worker runs it.
Both run with the interpreter running this script (the device image's Python, with the carried wheels on
PYTHONPATH). It prints images/s (batch / median step time after --warmup), time to first step, peak GPU memory
(the device's memory in use above the level before the run, sampled every 0.2 s by nvidia-smi: the two sides are
separate processes) and achieved TFLOP/s (FLOPs of one training step counted with torch.utils.flop_counter at
batch 1 — the script also runs the VAE and the text encoder every step, the engine reads them from its caches —
times images/s), and the engine/upstream ratio. The last line is JSON. Needs CUDA; refuses to run without it,
except for `--device cpu --tiny`, a dry run of the script itself on the tiny model at 64 px (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "engine"))
sys.path.insert(0, str(ROOT / "bench" / "train_throughput"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import models  # noqa: E402  bench/models.py
import run as throughput  # noqa: E402  bench/train_throughput/run.py


def model_and_data(work: Path, tiny: bool) -> tuple[Path, Path, int]:
    """The benchmark's model folder, its 32-image data set and their resolution, made under `work` on first use:
    the SD-1.5 architecture at 512 px, or with `tiny` the tiny test model at 64 px (dry runs)."""
    from loraforge_engine.tiny import make_dataset

    resolution = 64 if tiny else 512
    model = models.make_model("tiny" if tiny else "sd15", work)
    data = work / f"data-{resolution}"
    if not (data / "metadata.jsonl").is_file():
        make_dataset(data, count=32, size=resolution, seed=0)
    return model, data, resolution


def step_flops(model: Path, side: str, precision: str, device: str = "cuda", resolution: int = 512) -> float:
    """FLOPs of one batch-1 training step of `side` at `resolution` (UNet forward + backward; for the upstream
    script also the VAE encode and text encode it runs every step), counted by torch's FlopCounterMode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet", torch_dtype=dt).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    side_px = resolution // 8
    latents = torch.randn(1, 4, side_px, side_px, device=device)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dt)
    counter = FlopCounterMode(display=False)
    with counter:
        if side == "upstream":
            vae = AutoencoderKL.from_pretrained(str(model), subfolder="vae", torch_dtype=dt).to(device)
            te = CLIPTextModel.from_pretrained(str(model), subfolder="text_encoder", dtype=dt).to(device)
            with torch.no_grad():
                vae.encode(torch.randn(1, 3, resolution, resolution, device=device, dtype=dt))
                te(torch.zeros(1, 77, dtype=torch.long, device=device))
        with torch.autocast(device, dtype=dt):
            out = unet(latents, torch.tensor([500], device=device), hidden).sample
        out.float().square().mean().backward()
    del unet
    if device == "cuda":
        torch.cuda.empty_cache()
    return float(counter.get_total_flops())


class GpuMemory:
    """Peak GPU memory in use (MiB) above the level at the start, sampled with nvidia-smi while a child runs: the
    device's total (the child's `pid` goes unused: a container's process ids need not match nvidia-smi's)."""

    def __init__(self, pid: int):
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def used_mib() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True)
        return float(out.stdout.split()[0])

    def __enter__(self):
        base = self.used_mib()

        def sample():
            while not self._stop.wait(0.2):
                self.peak = max(self.peak, self.used_mib() - base)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", default="fp16,bf16")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--sides", default="upstream,engine")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraforge-bench-gpu"))
    p.add_argument("--reference-script", default=str(throughput.DEFAULT_REFERENCE_SCRIPT))
    p.add_argument("--ref-wheels", default=None,
                   help="folder of wheels for the upstream script's extra packages (a machine without network)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu (with --tiny): a dry run of this script's own code, which CI runs; no numbers to keep")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny test model at 64 px instead of the SD-1.5 architecture at 512 px (dry runs)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu/train_sd15.py needs a CUDA device (--device cpu --tiny for a dry run)")
    sides = a.sides.split(",")
    work = Path(a.work)
    model, data, resolution = model_and_data(work, a.tiny)
    # The children see the device the bench was asked for (none at all for a CPU dry run).
    child_env = {"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {}
    ref_python = throughput.ensure_refvenv(sys.executable, wheels=a.ref_wheels) if "upstream" in sides else None
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)"
    print(f"{name}, torch {torch.__version__}; {'tiny model' if a.tiny else 'SD-1.5 architecture'}, random "
          f"weights, {resolution} px", flush=True)
    results = []
    for precision in a.precisions.split(","):
        flops = {side: step_flops(model, side, precision, a.device, resolution) for side in sides}
        for i, batch in enumerate(int(b) for b in a.batches.split(",")):
            row = {"precision": precision, "batch": batch}
            s = throughput.Settings(str(model), str(data), resolution, batch, a.steps, precision, center_crop=True)
            for side in (sides if i % 2 == 0 else sides[::-1]):  # alternate which side goes first
                run_dir = work / "runs" / f"{precision}-{batch}-{side}"
                monitors: list[GpuMemory] = []  # the sampler that watched this side's process (CUDA only)

                def watch(pid: int) -> GpuMemory:
                    monitors.append(GpuMemory(pid))
                    return monitors[-1]

                watch_child = watch if a.device == "cuda" else None
                if side == "upstream":
                    r = throughput.run_upstream(s, run_dir, a.warmup, ref_python, a.reference_script, child_env,
                                                watch_child)
                else:
                    r = throughput.run_engine(s, run_dir, a.warmup, sys.executable, child_env, watch_child)
                r["images_per_s"] = batch / r["step_s"]
                r["peak_gpu_mib"] = monitors[0].peak if monitors else None
                r["tflops"] = flops[side] * r["images_per_s"] / 1e12
                row[side] = r
                gpu = f"  peak GPU {r['peak_gpu_mib'] / 1024:6.2f} GiB" if monitors else ""
                print(f"{precision} batch {batch:2d} {side:>8}: {r['images_per_s']:7.2f} images/s  first step "
                      f"{r['first_step_s']:6.1f} s  wall {r['wall_s']:6.1f} s{gpu}  peak RSS "
                      f"{r['peak_rss_mib'] / 1024:5.1f} GiB  {r['tflops']:6.2f} TFLOP/s", flush=True)
            if "upstream" in row and "engine" in row:
                row["ratio"] = row["upstream"]["step_s"] / row["engine"]["step_s"]
                print(f"{precision} batch {batch:2d} engine / upstream step rate: {row['ratio']:.2f}x", flush=True)
            results.append(row)
    print(json.dumps({"device": name, "torch": torch.__version__, "resolution": resolution,
                      "reference_script": a.reference_script, "results": results}))


if __name__ == "__main__":
    main()
