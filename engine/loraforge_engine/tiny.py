"""Deterministic generators for tests: a tiny SD-1.x-architecture model and a synthetic captioned data set.

The tiny model is the real architecture (UNet2DConditionModel with cross-attention, a 4-block AutoencoderKL
that downsamples 8x, a CLIP text encoder, a real CLIP byte-level BPE tokenizer, DDPMScheduler) shrunk so
that one training step at 64 px takes milliseconds on a CPU. It is written in the diffusers folder layout
with safetensors weights, so it is loaded by exactly the code path real users run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# Words the synthetic captions use; each gets BPE merges so it encodes as a single token (as real CLIP
# vocabularies do for common words). Anything else still encodes through the 256 byte symbols.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")
EXTRA_WORDS = ("a", "an", "on", "background", "photo", "of", "small", "big", "lora", "style")


# ---------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map (what ByteLevel pre-tokenizes to)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to a list of symbols, as the tokenizer will."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_clip_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary: 256 byte symbols, their end-of-word forms, merges that make each of `words`
    a single token, then the two special tokens last (as in OpenAI's CLIP vocab).

    Each word is first tokenized with the merges made so far; new merges join its pieces left to right.
    New merges rank after all earlier ones, so they never change how earlier words tokenize."""
    byte_map = _bytes_to_unicode()
    tokens = list(byte_map.values()) + [c + "</w>" for c in byte_map.values()]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        pieces = _bpe(chars, ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks[(left, right)] = len(merges)
            merges.append((left, right))
            tokens.append(left + right)
            left = left + right
    vocab: dict[str, int] = {}
    for tok in tokens + ["<|startoftext|>", "<|endoftext|>"]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab, merges


def caption_words() -> list[str]:
    return list(COLOURS) + list(SHAPES) + list(EXTRA_WORDS)


def make_tokenizer(save_dir: str | os.PathLike):
    """Write vocab.json + merges.txt, load them through from_pretrained (constructing CLIPTokenizer with
    file paths silently yields an empty vocabulary in transformers 5), save_pretrained, reload, and check
    the vocabulary really is there."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_bpe(caption_words())
    with tempfile.TemporaryDirectory() as staging:
        with open(os.path.join(staging, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(staging, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for a, b in merges:
                f.write(f"{a} {b}\n")
        tok = CLIPTokenizer.from_pretrained(staging, model_max_length=77)
        if len(tok) <= 256:
            raise RuntimeError(f"tokenizer built from vocab.json has only {len(tok)} tokens")
        tok.save_pretrained(save_dir)
        # Keep the classic vocab.json + merges.txt next to tokenizer.json, as real SD-1.x folders have them.
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(staging, name), os.path.join(save_dir, name))
    reloaded = CLIPTokenizer.from_pretrained(save_dir)
    if len(reloaded) != len(vocab) or len(reloaded) <= 256:
        raise RuntimeError(f"saved tokenizer reloads with {len(reloaded)} tokens, expected {len(vocab)}")
    ids = reloaded("a red circle on a blue background").input_ids
    if ids[0] != vocab["<|startoftext|>"] or ids[-1] != vocab["<|endoftext|>"] or len(ids) != 9:
        raise RuntimeError(f"tokenizer round trip failed: {ids}")
    return reloaded


# ------------------------------------------------------------------------------------------------- model


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, arch: str = "sd") -> Path:
    """Write a tiny SD-1.x (arch "sd") or SDXL (arch "sdxl") pipeline to `out_dir` (diffusers layout,
    safetensors). Same seed and arch -> same bytes."""
    if arch == "sdxl":
        return _make_tiny_sdxl(out_dir, seed)
    if arch != "sd":
        raise ValueError(f"arch must be sd or sdxl, got {arch!r}")
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(os.path.join(tmp, "tokenizer"))

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,  # 64 px / 8 (VAE downsampling)
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae()
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
        # SD-1.5's training scheduler config (DDPMScheduler takes no set_alpha_to_one).
        scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(tmp, "tokenizer", name), out / "tokenizer" / name)
    # transformers records how the tokenizer was loaded (local_files_only follows HF_HUB_OFFLINE); those
    # keys are not part of the model, and dropping them keeps the folder byte-identical everywhere.
    _clean_tokenizer_config(out / "tokenizer")
    return out


def _clean_tokenizer_config(folder: Path) -> None:
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("local_files_only", "is_local", "name_or_path"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplers: 64 px -> 8x8 latents
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _make_tiny_sdxl(out_dir: str | os.PathLike, seed: int) -> Path:
    """The SDXL architecture shrunk: a UNet with `text_time` added conditioning (pooled text embedding +
    six size/crop numbers), linear-projection transformers, two CLIP text encoders (the second with a
    projection: its pooled output conditions the UNet) whose hidden states are concatenated (32 + 32 = 64 =
    cross_attention_dim), and SDXL's Euler scheduler config (training reads it as DDPM, as the reference)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    time_embed_dim, pooled_dim = 8, 32
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(os.path.join(tmp, "tokenizer"))
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
            cross_attention_dim=64,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae()
        common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      hidden_act="gelu", projection_dim=pooled_dim)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**common))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common))
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
        )
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=scheduler)
        pipe.save_pretrained(out, safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2"):
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(os.path.join(tmp, "tokenizer", name), out / sub / name)
    for sub in ("tokenizer", "tokenizer_2"):
        _clean_tokenizer_config(out / sub)
    return out


# ------------------------------------------------------------------------------------------------ dataset


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        raise ValueError(shape)


# Mixed data sets cycle through these (width, height) shapes, in units of `size`: square, landscape 3:2,
# portrait 2:3, wide 2:1, tall 1:2.
MIXED_SHAPES = ((1, 1), (1.5, 1), (1, 1.5), (2, 1), (1, 2))


def make_dataset(out_dir: str | os.PathLike, count: int = 16, size: int = 64, seed: int = 0,
                 fmt: str = "jsonl", mixed: bool = False) -> Path:
    """Write `count` captioned images ("a red circle on a blue background"). `size` is the shorter side;
    every third image is landscape (5:4) so that cropping has something to do. Deterministic in `seed`.

    `mixed`: real users' folders instead. The images cycle through MIXED_SHAPES (portrait, landscape, square),
    and three more files are written that a run must skip: a tiny image (4x4 px, "tiny.png"), a corrupt one
    ("corrupt.png", captioned) and, in the .txt format, an image without a caption ("uncaptioned.png")."""
    from PIL import Image, ImageDraw

    if fmt not in ("jsonl", "txt"):
        raise ValueError(f"format must be jsonl or txt, got {fmt!r}")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    records = []
    for i in range(count):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        fg, bg = rng.choice(len(names), size=2, replace=False)
        if mixed:
            fw, fh = MIXED_SHAPES[i % len(MIXED_SHAPES)]
            width, height = int(size * fw), int(size * fh)
        else:
            width = size + size // 4 if i % 3 == 2 else size
            height = size
        img = Image.new("RGB", (width, height), COLOURS[names[bg]])
        r = size * float(rng.uniform(0.2, 0.32))
        cx = width / 2 + float(rng.uniform(-0.12, 0.12)) * size
        cy = height / 2 + float(rng.uniform(-0.12, 0.12)) * size
        _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[names[fg]])
        file_name = f"{i:04d}.png"
        img.save(out / file_name, format="PNG")
        text = f"a {names[fg]} {shape} on a {names[bg]} background"
        records.append({"file_name": file_name, "text": text})
        if fmt == "txt":
            (out / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    if mixed:
        Image.new("RGB", (4, 4), COLOURS[names[0]]).save(out / "tiny.png", format="PNG")
        (out / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20)
        records += [{"file_name": "tiny.png", "text": "a tiny image"},
                    {"file_name": "corrupt.png", "text": "a corrupt image"}]
        if fmt == "txt":
            for rec in records[-2:]:
                (out / rec["file_name"]).with_suffix(".txt").write_text(rec["text"] + "\n", encoding="utf-8")
            Image.new("RGB", (size, size), COLOURS[names[1]]).save(out / "uncaptioned.png", format="PNG")
    if fmt == "jsonl":
        with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return out
