"""Base models: load a local diffusers folder (SD 1.x/2.x or SDXL, told apart by model_index.json), and
turn captions into the conditioning each architecture's UNet takes.

SD 1.x/2.x: one CLIP text encoder; the UNet is conditioned on its last hidden state.
SDXL: two CLIP text encoders (CLIPTextModel and CLIPTextModelWithProjection); the UNet takes their
penultimate hidden states concatenated, plus `added_cond_kwargs`: the second encoder's pooled, projected
embedding ("text_embeds") and the size/crop conditioning ("time_ids": original height and width, crop top
and left, target height and width).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import DataError
from .small_ops import cast_frozen
from .fingerprint import model_hash  # noqa: F401 - re-exported for importers

ARCH_BY_PIPELINE = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}


def detect_arch(base_model: str, shown: str | None = None) -> str:
    """The architecture ("sd" or "sdxl") named by the folder's model_index.json; messages name the folder as
    `shown` (default: itself)."""
    shown = shown or base_model
    index = Path(base_model) / "model_index.json"
    try:
        cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except OSError as e:
        raise DataError(f"base_model {shown!r}: cannot read model_index.json ({e.strerror})") from None
    except ValueError as e:
        raise DataError(f"base_model {shown!r}: model_index.json is not valid JSON ({e})") from None
    if cls not in ARCH_BY_PIPELINE:
        raise DataError(f"base_model {shown!r} is a {cls!r}; supported: {', '.join(ARCH_BY_PIPELINE)}")
    return ARCH_BY_PIPELINE[cls]


@dataclass
class Components:
    arch: str  # "sd" or "sdxl"
    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    text_encoder_names: list[str] = field(default_factory=list)  # "text_encoder", "text_encoder_2"


def load_components(base_model: str, device: torch.device, weight_dtype: torch.dtype,
                    shown: str | None = None) -> Components:
    """Tokenizer(s), text encoder(s), VAE, UNet and DDPM scheduler from a local diffusers folder.
    safetensors only (use_safetensors=True refuses pickle weights); never touches the network. Messages name the
    folder as `shown` (the spec's base_model when `base_model` is a pinned view of it)."""
    shown = shown or base_model
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(base_model)
    if not root.is_dir() or not (root / "model_index.json").is_file():
        raise DataError(f"base_model {shown!r} is not a diffusers model folder"
                        + (" (missing model_index.json)" if root.is_dir() else ""))
    arch = detect_arch(base_model, shown)
    te_names = ["text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    tok_names = ["tokenizer"] + (["tokenizer_2"] if arch == "sdxl" else [])
    missing = [p for p in ("unet", "vae", "scheduler", *te_names, *tok_names) if not (root / p).exists()]
    if missing:
        raise DataError(f"base_model {shown!r} is not a diffusers model folder (missing {', '.join(missing)})")
    # On a CPU, weights stored in half precision are loaded as the file has them (mapped, not copied) and cast one
    # tensor at a time, each mapped source given back (small_ops.cast_frozen): a cast while loading holds the
    # model in both precisions at once. To a GPU they go already cast, as the host copy is then transient.
    load_dtype = torch.float32 if device.type == "cpu" else weight_dtype
    try:
        common = {"local_files_only": True, "use_safetensors": True}
        tokenizers = [CLIPTokenizer.from_pretrained(base_model, subfolder=n, local_files_only=True) for n in tok_names]
        text_encoders = [CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", dtype=load_dtype,
                                                       **common)]
        if arch == "sdxl":
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                base_model, subfolder="text_encoder_2", dtype=load_dtype, **common))
        vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae", torch_dtype=load_dtype, **common)
        unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", torch_dtype=load_dtype,
                                                    **common)
        noise_scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler", local_files_only=True)
    except Exception as e:
        raise DataError(f"base_model {shown!r} cannot be loaded: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e
    # transformers 5 can build an empty CLIP vocabulary without complaint; catch it here.
    for t in tokenizers:
        if len(t) < 3:
            raise DataError(f"base_model {shown!r}: tokenizer has an empty vocabulary")
    for model in (*text_encoders, vae, unet):
        model.requires_grad_(False)
        if load_dtype != weight_dtype:
            cast_frozen(model, weight_dtype)
        model.to(device)
    for model in (*text_encoders, vae):
        model.eval()
    return Components(arch, tokenizers, text_encoders, vae, unet, noise_scheduler, te_names)


def tokenize(c: Components, captions: list[str]) -> list[torch.Tensor]:
    return [t(captions, max_length=t.model_max_length, padding="max_length", truncation=True,
              return_tensors="pt").input_ids for t in c.tokenizers]


def encode_text(c: Components, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (one tensor per tokenizer) -> (encoder hidden states, pooled embedding or None)."""
    if c.arch == "sd":
        return c.text_encoders[0](ids[0].to(c.text_encoders[0].device), return_dict=False)[0], None
    hidden, pooled = [], None
    for te, x in zip(c.text_encoders, ids):
        out = te(x.to(te.device), output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # the last encoder's
    return torch.cat(hidden, dim=-1), pooled


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
             target: int | tuple[int, int]) -> list[int]:
    """SDXL size and crop conditioning: (orig h, orig w, crop top, crop left, target h, target w); `target` is
    (h, w), or a square resolution."""
    th, tw = (target, target) if isinstance(target, int) else target
    return [original_size[0], original_size[1], crop_top_left[0], crop_top_left[1], th, tw]
