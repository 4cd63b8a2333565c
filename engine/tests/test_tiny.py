"""The tiny model and the synthetic data set: deterministic, real formats, loadable by diffusers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helpers import load_pipeline, render

from loraforge_engine.tiny import make_dataset, make_tiny_model


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_model_is_deterministic(tiny_model, tmp_path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    a, b = tree_hashes(tiny_model), tree_hashes(again)
    assert a == b
    assert any(k.endswith(".safetensors") for k in a)
    assert not any(k.endswith((".bin", ".pt", ".ckpt")) for k in a)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert tree_hashes(other)["unet/diffusion_pytorch_model.safetensors"] != a["unet/diffusion_pytorch_model.safetensors"]


def test_tiny_model_layout_and_tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["safety_checker"] == [None, None]
    tok = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    assert len(tok) > 256  # transformers 5 can silently build an empty vocabulary
    assert tok.model_max_length == 77
    ids = tok("a red circle on a blue background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 9  # every caption word is one BPE token
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle on a blue background"
    assert len(tok("zebra qwx").input_ids) > 4  # unknown words still encode through byte symbols
    assert (tiny_model / "tokenizer" / "vocab.json").is_file() and (tiny_model / "tokenizer" / "merges.txt").is_file()


def test_tiny_model_renders_64px_from_8x8_latents(tiny_model):
    pipe = load_pipeline(tiny_model)
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 4
    image = render(pipe)
    assert image.shape == (1, 64, 64, 3)


def test_dataset_is_deterministic(dataset, tmp_path):
    again = make_dataset(tmp_path / "again", count=16, size=64, seed=0)
    assert tree_hashes(dataset) == tree_hashes(again)
    lines = [json.loads(x) for x in (dataset / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 16
    assert all(set(x) == {"file_name", "text"} and (dataset / x["file_name"]).is_file() for x in lines)
    assert all(x["text"].startswith("a ") and x["text"].endswith(" background") for x in lines)


def test_dataset_txt_format(tmp_path):
    from PIL import Image

    out = make_dataset(tmp_path / "txt", count=4, size=32, seed=3, fmt="txt")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and not (out / "metadata.jsonl").exists()
    for p in pngs:
        assert p.with_suffix(".txt").read_text().strip().startswith("a ")
        with Image.open(p) as img:
            assert min(img.size) == 32
