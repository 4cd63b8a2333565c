"""SDXL-shaped LoRA slots and LoRA files for bench/infer's switch and cold-read measurement, without exporting
an SDXL model (its fp32 export does not fit a small machine): SDXL base's UNet and both text encoders are built
from their public configs on PyTorch's meta device (no weights), the engine's own slot selection
(onnx_export.insert_slots, as the export runs it) lists their slots, and random LoRA files in diffusers' key form
are written for them.

    PYTHONPATH=engine python bench/infer/sdxl_loras.py OUT_DIR     # prints OUT_DIR/slots.json's path

Writes OUT_DIR/slots.json (the manifest's "slots" list) and OUT_DIR/<name>/pytorch_lora_weights.safetensors for
r16 (attention q/k/v/out of the UNet and both text encoders, rank 16), r4 (UNet attention, rank 4) and r64 (as
r16, rank 64), float32 like the engine's own files; made once (written to a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "engine"))

# SDXL base 1.0's public UNet and text encoder configs (the architecture-defining keys).
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
LORAS = {"r16": (16, "attention", True), "r4": (4, "attention", False), "r64": (64, "attention", True)}


def slots() -> list[dict]:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from loraforge_engine.onnx_export import _slot_modules, insert_slots

    SlotFeed, SlottedLayer, *_ = _slot_modules()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    out = insert_slots(unet, "unet", Transformer2DModel, SlotFeed(), SlottedLayer, unet.config.layers_per_block)
    out += insert_slots(te1, "text_encoder", CLIPEncoderLayer, SlotFeed(), SlottedLayer)
    out += insert_slots(te2, "text_encoder_2", CLIPEncoderLayer, SlotFeed(), SlottedLayer)
    return [s.manifest() for s in out]


def write_lora(path: Path, all_slots: list[dict], rank: int, which: str, text: bool, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for s in all_slots:
        if s["component"] != "unet" and not text:
            continue
        if which == "attention" and not s["module"].endswith(ATTENTION):
            continue
        stem = s["diffusers_key"]
        sd[f"{stem}.lora.down.weight"] = torch.randn(rank, s["in_features"], generator=g) * 0.01
        sd[f"{stem}.lora.up.weight"] = torch.randn(s["out_features"], rank, generator=g) * 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    slots_file = out / "slots.json"
    if not slots_file.is_file():
        tmp = out / "slots.json.tmp"
        tmp.write_text(json.dumps(slots()))
        os.replace(tmp, slots_file)
    all_slots = json.loads(slots_file.read_text())
    for k, (name, (rank, which, text)) in enumerate(LORAS.items()):
        f = out / name / "pytorch_lora_weights.safetensors"
        if not f.is_file():
            write_lora(f, all_slots, rank, which, text, k + 1)
    print(slots_file)


if __name__ == "__main__":
    main()
