"""The models the benchmarks train, generated here (random weights, nothing downloaded), in the diffusers folder
layout with safetensors weights, so that both the engine and diffusers' own scripts load them as they would a
real checkpoint.

    tiny  loraforge_engine.tiny.make_tiny_model: the SD-1.x architecture shrunk (UNet blocks 32/64), made in
          seconds; a step costs milliseconds, so it measures per-operator overhead more than arithmetic.
    sd15  the SD-1.5 architecture at its public widths (runwayml/stable-diffusion-v1-5's unet, vae, text_encoder
          and scheduler configs, written out below): UNet 320/640/1280/1280 with cross-attention 768, CLIP text
          encoder 768 wide with 12 layers, the SD VAE 128/256/512/512; random weights, the tiny test tokenizer
          (its ids are valid for the 49408-token embedding; tokenization is not what is measured). About 40 s
          and 4 GB on disk to make.

    sdxl  the SDXL base 1.0 architecture at its public widths: UNet 320/640/1280 with transformer depths 1/2/10,
          cross-attention 2048 and text_time added conditioning; CLIP-L (768 x 12) and OpenCLIP-bigG (1280 x 32,
          with projection) text encoders; the SDXL VAE (force_upcast); Euler scheduler. Random weights written
          in float16 (as SDXL's fp16 variant; ~6.9 GB on disk, ~14 GB as float32), one component at a time.

    PYTHONPATH=engine engine/.venv/bin/python bench/models.py {tiny,sd15,sdxl} WORK_DIR   # prints the model's folder

Each is made once under the work folder (WORK/tiny-sd, WORK/sd15-random, WORK/sdxl-random) and reused; it is written to a
temporary folder first and renamed, so an interrupted run leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "engine") not in sys.path:
    sys.path.insert(0, str(ROOT / "engine"))

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

# The public SDXL base 1.0 configs (stabilityai/stable-diffusion-xl-base-1.0), architecture-defining keys.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu")
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT = {**SD15_TEXT}  # CLIP ViT-L/14's text tower, as SD 1.5's
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)  # OpenCLIP ViT-bigG/14's text tower
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)

MODEL_FOLDERS = {"tiny": "tiny-sd", "sd15": "sd15-random", "sdxl": "sdxl-random"}


def _write_once(folder: Path, write) -> Path:
    """Call write(tmp) to fill a temporary sibling of `folder`, then rename it into place; reuse a finished
    folder (one with model_index.json)."""
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        shutil.rmtree(folder, ignore_errors=True)  # a folder without model_index.json is a broken leftover
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_sd15(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraforge_engine.tiny import make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(os.path.join(tmp, "tok"))
        torch.manual_seed(0)
        # The special tokens' ids are the tokenizer's, so that its padding and end-of-text ids mean the same.
        text_cfg = CLIPTextConfig(**{**SD15_TEXT, "bos_token_id": tokenizer.bos_token_id,
                                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
        pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(text_cfg),
                                       tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
                                       scheduler=DDPMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
        _write_tokenizer_files(out / "tokenizer", os.path.join(tmp, "tok"))


def _write_tokenizer_files(dest: Path, src: str) -> None:
    """save_pretrained writes only tokenizer.json for a fast tokenizer (transformers 5); real SD folders, the
    exporter and the server's TypeScript tokenizer read the CLIP BPE pair vocab.json + merges.txt."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(src, name), dest / name)


def _repair_tokenizer(folder: Path, subs=("tokenizer",)) -> None:
    """A folder made before the BPE files were written gets them (the tokenizer is deterministic), instead of
    rebuilding gigabytes of weights."""
    from loraforge_engine.tiny import make_tokenizer

    missing = [sub for sub in subs if not all((folder / sub / n).is_file() for n in ("vocab.json", "merges.txt"))]
    if not missing:
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(os.path.join(tmp, "tok"))
        for sub in missing:
            _write_tokenizer_files(folder / sub, os.path.join(tmp, "tok"))


def _write_sdxl(out: Path) -> None:
    """One component at a time, each made in float16 and saved (as SDXL's published fp16 weights are), then
    freed: the whole model in float32 (~14 GB) would not fit beside other work on an ordinary machine."""
    import gc

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraforge_engine.tiny import make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(os.path.join(tmp, "tok"))
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        makers = [("unet", lambda: UNet2DConditionModel(**SDXL_UNET)),
                  ("vae", lambda: AutoencoderKL(**SDXL_VAE)),
                  ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**{**SDXL_TEXT, **ids}))),
                  ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**{**SDXL_TEXT_2, **ids})))]
        default = torch.get_default_dtype()
        for seed, (sub, make) in enumerate(makers):
            torch.manual_seed(seed)
            torch.set_default_dtype(torch.float16)  # random init straight into half precision
            try:
                model = make()
            finally:
                torch.set_default_dtype(default)
            model.save_pretrained(out / sub, safe_serialization=True)
            del model
            gc.collect()
        EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(out / "scheduler")
        for sub in ("tokenizer", "tokenizer_2"):
            tokenizer.save_pretrained(out / sub)
            _write_tokenizer_files(out / sub, os.path.join(tmp, "tok"))
    # What StableDiffusionXLPipeline.save_pretrained writes for these components.
    import diffusers

    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
             "force_zeros_for_empty_prompt": True,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_sdxl(folder: Path) -> Path:
    """The SDXL-shaped model (random float16 weights) in `folder`, made on first use."""
    return _write_once(Path(folder), _write_sdxl)


def make_sd15(folder: Path) -> Path:
    """The SD-1.5-shaped model (random weights) in `folder`, made on first use."""
    folder = _write_once(Path(folder), _write_sd15)
    _repair_tokenizer(folder)
    return folder


def tiny_model(work: Path) -> Path:
    """The tiny SD-1.x model under `work`, made on first use."""
    from loraforge_engine.tiny import make_tiny_model

    return _write_once(Path(work) / MODEL_FOLDERS["tiny"], lambda out: make_tiny_model(out, seed=0))


def make_model(kind: str, work: Path) -> Path:
    """The benchmark model `kind` (tiny or sd15) under `work`, made on first use."""
    if kind == "tiny":
        return tiny_model(work)
    if kind == "sd15":
        return make_sd15(Path(work) / MODEL_FOLDERS["sd15"])
    if kind == "sdxl":
        return make_sdxl(Path(work) / MODEL_FOLDERS["sdxl"])
    raise ValueError(f"unknown model {kind!r} (tiny, sd15 or sdxl)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in MODEL_FOLDERS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(MODEL_FOLDERS)}}} WORK_DIR")
    print(make_model(sys.argv[1], Path(sys.argv[2])))
