"""The diffusers (PyTorch) side of bench/infer: images/s of StableDiffusionPipeline and the cost of switching
LoRAs with load_lora_weights + set_adapters. Prints one JSON object on stdout.

    python diffusers_bench.py MODEL LORA_A LORA_B --steps 20 --images 10 --switches 30 --threads 1 [--size 64] [--warmup 2]
        [--device cpu|cuda] [--dtype fp32|fp16]

--device cuda runs the pipeline on the GPU (the device script's comparison for onnxruntime's CUDA provider), in
--dtype's precision; renders are timed to their images, which waits for the GPU.

--switches 0 measures images/s alone (the switch costs do not depend on the thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("lora_a")
    p.add_argument("lora_b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--switches", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--warmup", type=int, default=2, help="renders before the timed ones")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    a = p.parse_args()

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, use_safetensors=True, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.to(a.device, torch.float16 if a.dtype == "fp16" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def render(seed: int):
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            return pipe("a red circle on a blue background", num_inference_steps=a.steps, guidance_scale=7.5,
                        height=a.size, width=a.size, generator=g).images

    for i in range(a.warmup):
        render(i)
    t = time.perf_counter()
    for i in range(a.images):
        render(100 + i)
    images_per_s = a.images / (time.perf_counter() - t)

    load_switch: list[float] = []
    set_only: list[float] = []
    if a.switches > 0:
        # Switching between requests the way a diffusers server would: drop the previous LoRA, load the next
        # file, activate it. The files are in the page cache after the first round, as ours are in memory.
        files = [a.lora_a, a.lora_b]
        for i in range(a.switches + 2):
            f = files[i % 2]
            t = time.perf_counter()
            if i > 0:
                pipe.delete_adapters(f"l{i - 1}")
            pipe.load_lora_weights(os.path.dirname(f), weight_name=os.path.basename(f), adapter_name=f"l{i}")
            pipe.set_adapters([f"l{i}"], adapter_weights=[1.0])
            if i >= 2:
                load_switch.append((time.perf_counter() - t) * 1000)
        pipe.delete_adapters(f"l{a.switches + 1}")

        # With both already loaded, set_adapters alone (a server that keeps every LoRA resident).
        pipe.load_lora_weights(os.path.dirname(a.lora_a), weight_name=os.path.basename(a.lora_a), adapter_name="a")
        pipe.load_lora_weights(os.path.dirname(a.lora_b), weight_name=os.path.basename(a.lora_b), adapter_name="b")
        combos = [(["a"], [1.0]), (["b"], [1.0]), (["a", "b"], [0.7, 1.3])]
        for i in range(a.switches):
            names, weights = combos[i % 3]
            t = time.perf_counter()
            pipe.set_adapters(names, adapter_weights=weights)
            set_only.append((time.perf_counter() - t) * 1000)

    print(json.dumps({
        "images_per_s": images_per_s,
        "switch_load_p50_ms": statistics.median(load_switch) if load_switch else None,
        "switch_set_adapters_p50_ms": statistics.median(set_only) if set_only else None,
        "torch": torch.__version__,
        "threads": a.threads,
        "device": a.device,
        "dtype": a.dtype,
    }))


if __name__ == "__main__":
    main()
