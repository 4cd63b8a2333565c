"""GPU training benchmark on the SD-1.5 architecture with random weights (nothing is downloaded).

    PYTHONPATH=engine python bench/gpu/train_sd15.py [--precisions fp16,bf16] [--batches 1,4,16] [--steps 12]
        [--warmup 4] [--work DIR] [--paths reference,engine] [--device cuda|cpu] [--tiny]

The UNet, VAE and CLIP text encoder are built from the public SD-1.5 configs written out below
(runwayml/stable-diffusion-v1-5: unet/config.json, vae/config.json, text_encoder/config.json,
scheduler/scheduler_config.json), with random weights, saved once as a diffusers folder (safetensors) under
--work, with the tiny test tokenizer (its ids are valid for the 49408-token embedding; tokenization is not what
is measured). Data: 32 synthetic 512 px captioned images.

For each precision and batch size, in one process, it runs bench/train_throughput's two paths at 512 px:
  reference  the reference script's per-step work: images transformed, VAE encode + text encode every step,
             frozen weights in the precision, LoRA fp32, autocast (+ GradScaler for fp16), default AdamW;
  engine     loraforge_engine's Trainer with its defaults (latents and text embeddings cached, fused AdamW,
             channels_last), mixed_precision as given.
It prints images/s, time to first step, peak GPU memory (torch.cuda.max_memory_allocated) and achieved
TFLOP/s (FLOPs of one training step of that path counted with torch.utils.flop_counter at batch 1, times
images/s), and the engine/reference ratio. The last line is JSON. Needs CUDA; refuses to run without it, except
for `--device cpu --tiny`, a dry run of the script itself on the tiny model at 64 px (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "engine"))
sys.path.insert(0, str(ROOT / "bench" / "train_throughput"))

import torch  # noqa: E402

# The public SD-1.5 configs (only the architecture-defining keys; the rest are diffusers' defaults).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                 "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                 mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, prediction_type="epsilon", steps_offset=1)


def make_sd15(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraforge_engine.tiny import make_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(os.path.join(tmp, "tok"))
        torch.manual_seed(0)
        text_cfg = CLIPTextConfig(**{**SD15_TEXT, "bos_token_id": tokenizer.bos_token_id,
                                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
        pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(text_cfg),
                                       tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
                                       scheduler=DDPMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def model_and_data(work: Path, tiny: bool) -> tuple[Path, Path, int]:
    """The benchmark's model folder, its 32-image data set and their resolution, made under `work` on first use:
    the SD-1.5 architecture at 512 px, or with `tiny` the tiny test model at 64 px (dry runs)."""
    import run as throughput  # bench/train_throughput/run.py

    from loraforge_engine.tiny import make_dataset

    resolution = 64 if tiny else 512
    model = throughput.tiny_model(work) if tiny else make_sd15(work / "sd15-random")
    data = work / f"data-{resolution}"
    if not (data / "metadata.jsonl").is_file():
        make_dataset(data, count=32, size=resolution, seed=0)
    return model, data, resolution


def step_flops(model: Path, path: str, precision: str, device: str = "cuda", resolution: int = 512) -> float:
    """FLOPs of one batch-1 training step of `path` at `resolution` (forward + backward; the VAE and text
    encoder forward only for the reference path), counted by torch's FlopCounterMode."""
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
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, device=device)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dt)
    counter = FlopCounterMode(display=False)
    with counter:
        if path == "reference":
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", default="fp16,bf16")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--paths", default="reference,engine")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraforge-bench-gpu"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu (with --tiny): a dry run of this script's own code, which CI runs; no numbers to keep")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny test model at 64 px instead of the SD-1.5 architecture at 512 px (dry runs)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu/train_sd15.py needs a CUDA device (--device cpu --tiny for a dry run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    import run as throughput  # bench/train_throughput/run.py

    work = Path(a.work)
    model, data, resolution = model_and_data(work, a.tiny)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)"
    print(f"{name}, torch {torch.__version__}; {'tiny model' if a.tiny else 'SD-1.5 architecture'}, random "
          f"weights, {resolution} px", flush=True)
    results = []
    for precision in a.precisions.split(","):
        flops = {path: step_flops(model, path, precision, a.device, resolution) for path in a.paths.split(",")}
        for batch in (int(b) for b in a.batches.split(",")):
            row = {"precision": precision, "batch": batch}
            for path in a.paths.split(","):
                if a.device == "cuda":
                    torch.cuda.empty_cache()
                with throughput.PeakMemory(device) as mem:
                    if path == "reference":
                        r = throughput.reference_path(str(model), str(data), a.steps, batch, resolution, a.warmup,
                                                      device, precision=precision)
                    else:
                        r = throughput.engine_path(str(model), str(data), a.steps, batch, resolution, a.warmup,
                                                   work, {"mixedPrecision": precision})
                r["peak_memory_gib"] = mem.peak / 2**30
                r["tflops"] = flops[path] * r["images_per_s"] / 1e12
                row[path] = r
                print(f"{precision} batch {batch:2d} {path:>9}: {r['images_per_s']:7.2f} images/s  first step "
                      f"{r['first_step_s']:6.1f} s  peak {r['peak_memory_gib']:6.2f} GiB  {r['tflops']:6.1f} TFLOP/s",
                      flush=True)
            if "reference" in row and "engine" in row:
                row["ratio"] = row["engine"]["images_per_s"] / row["reference"]["images_per_s"]
                print(f"{precision} batch {batch:2d} engine / reference: {row['ratio']:.2f}x", flush=True)
            results.append(row)
    print(json.dumps({"device": name, "torch": torch.__version__, "resolution": resolution, "results": results}))


if __name__ == "__main__":
    main()
