"""bench/models.py: the SDXL-shaped model has SDXL base 1.0's architecture (checked on the meta device: no memory,
no weights), and a model folder without the tokenizer's BPE files is repaired in place."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import models  # noqa: E402

from loraforge_engine.onnx_export import check_inputs  # noqa: E402


def test_sdxl_shape_is_sdxl_base():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**models.SDXL_UNET)
        parts = {"unet": unet, "vae": AutoencoderKL(**models.SDXL_VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**models.SDXL_TEXT)),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**models.SDXL_TEXT_2))}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    # The parameter counts of stabilityai/stable-diffusion-xl-base-1.0's components.
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    depths = [len(a.transformer_blocks) for b in unet.down_blocks for a in getattr(b, "attentions", [])]
    assert depths == [2, 2, 10, 10]  # two transformers per block at 640 (depth 2) and 1280 (depth 10)
    assert unet.config.cross_attention_dim == 2048 and unet.config.addition_embed_type == "text_time"
    # The second encoder's pooled projection plus six size/crop ids of 256 make the added embedding's input.
    assert unet.add_embedding.linear_1.in_features == 1280 + 6 * 256


def test_sd15_folder_without_bpe_files_is_repaired(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).unlink()
    models._repair_tokenizer(folder)
    assert json.loads((folder / "tokenizer" / "vocab.json").read_text()) == vocab
    assert check_inputs(folder) == "sd"  # what the exporter asks for is there again
