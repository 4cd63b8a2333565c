"""End to end through the `train` command: text-encoder LoRA, both file formats and their metadata, checkpoint
rotation, validation by epochs with several prompts, SDXL, and exact resume with the latent cache on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PROMPT, of_kind, run_train
from safetensors.torch import load_file

from loraforge_engine.lora_files import read_metadata

RANK, ALPHA = 4, 8.0


def spec_for(model: Path, data: Path, **extra) -> dict:
    return {"baseModel": str(model), "datasetDir": str(data), "resolution": 64, "trainBatchSize": 4,
            "maxTrainSteps": 8, "learningRate": 5e-3, "lrWarmupSteps": 0, "rank": RANK, "loraAlpha": ALPHA,
            "centerCrop": True, "randomFlip": True, "seed": "11", "checkpointingSteps": 2, **extra}


def render_np(pipe, seed: int = 1234) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=3, generator=g, output_type="np", height=64, width=64).images


def load(cls, model: Path):
    pipe = cls.from_pretrained(str(model), local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_both_formats_load_and_agree(cls, model: Path, out: Path, text_encoders: list[str]) -> None:
    """diffusers' load_lora_weights reads the diffusers file and the kohya file; both give the same image,
    which differs from the base model's; every text encoder carries the LoRA at alpha / rank."""
    base = render_np(load(cls, model))
    images = []
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = load(cls, model)
        pipe.load_lora_weights(str(out), weight_name=name)
        q = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
        assert q.scaling["default_0"] == pytest.approx(ALPHA / RANK), name
        for te_name in text_encoders:
            te_q = [m for n, m in getattr(pipe, te_name).named_modules() if n.endswith("layers.0.self_attn.q_proj")]
            assert len(te_q) == 1 and te_q[0].scaling["default_0"] == pytest.approx(ALPHA / RANK), (name, te_name)
        images.append(render_np(pipe))
    diff = float(np.abs(images[0] - images[1]).max())
    print(f"{cls.__name__}: diffusers vs kohya file, largest pixel difference {diff:g}; "
          f"vs base {float(np.abs(images[0] - base).max()):g}")
    assert diff < 1e-4
    assert float(np.abs(images[0] - base).max()) > 1e-3


@pytest.fixture(scope="module")
def sd_te_run(tiny_model, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "sd-te"
    spec = spec_for(tiny_model, dataset, trainTextEncoder=True, loraFormat="LORA_FORMAT_KOHYA", checkpointsTotalLimit=2,
                    validationPrompt=PROMPT, validationPrompts=["a green square on a black background"],
                    validationEpochs=1, numValidationImages=2, validationInferenceSteps=2)
    rc, events, stderr = run_train(spec, out)
    assert rc == 0, stderr[-3000:]
    return out, events, spec


def test_text_encoder_lora_and_kohya_file_load_in_diffusers(sd_te_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    out, events, _ = sd_te_run
    lora = events[-1].state.lora
    assert lora.name == "pytorch_lora_weights_kohya.safetensors"  # the requested format
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in kohya)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_out_proj.") for k in kohya)
    alphas = [k for k in kohya if k.endswith(".alpha")]
    assert alphas and len(alphas) * 3 == len(kohya) and all(kohya[k].item() == ALPHA for k in alphas)
    diffusers_keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".")[0] for k in diffusers_keys} == {"unet", "text_encoder"}
    check_both_formats_load_and_agree(StableDiffusionPipeline, tiny_model, out, ["text_encoder"])


def test_metadata_in_the_safetensors_header(sd_te_run, tiny_model, dataset):
    from loraforge_engine.data import dataset_fingerprint, discover
    from loraforge_engine.fingerprint import model_hash

    out, _, spec = sd_te_run
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        meta = read_metadata(out / name)
        assert meta["loraforge.base_model"] == tiny_model.name
        # The base model's identity, as `model-hash` prints it and the ONNX export cache is keyed.
        assert meta["loraforge.base_model_sha256"] == model_hash(str(tiny_model))
        assert (meta["loraforge.rank"], float(meta["loraforge.alpha"])) == (str(RANK), ALPHA)
        assert json.loads(meta["loraforge.target_modules"]) == ["to_q", "to_k", "to_v", "to_out.0"]
        assert json.loads(meta["loraforge.text_encoder_target_modules"]) == ["q_proj", "k_proj", "v_proj", "out_proj"]
        assert (meta["loraforge.steps"], meta["loraforge.resolution"], meta["loraforge.dataset_size"]) == \
            ("8", "64", "16")
        assert meta["loraforge.dataset_sha256"] == dataset_fingerprint(discover(dataset))
        stored = json.loads(meta["loraforge.spec"])
        assert stored["trainTextEncoder"] is True and stored["rank"] == RANK and stored["seed"] == "11"
        assert meta["ss_network_dim"] == str(RANK)
    assert "lora_adapter_metadata" in read_metadata(out / "pytorch_lora_weights.safetensors")
    assert "lora_adapter_metadata" not in read_metadata(out / "pytorch_lora_weights_kohya.safetensors")


def test_checkpoint_limit_and_validation_every_epoch(sd_te_run):
    out, events, _ = sd_te_run
    assert [c.step for c in of_kind(events, "checkpoint")] == [2, 4, 6, 8]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()  # rotation never touches the final LoRA
    # 16 images / batch 4 = 4 steps per epoch: validation after epoch 1 (step 4) and at the end (step 8).
    validations = of_kind(events, "validation")
    assert [(v.step, v.prompt) for v in validations] == [
        (4, PROMPT), (4, "a green square on a black background"),
        (8, PROMPT), (8, "a green square on a black background")]
    for v in validations:
        assert len(v.images) == 2
        for i, img in enumerate(v.images):
            prompt_part = "" if v.prompt == PROMPT else "p1-"
            assert img.name == f"validation/step-{v.step}-{prompt_part}{i}.png"
            assert hashlib.sha256((out / img.name).read_bytes()).hexdigest() == img.sha256


def test_targets_beyond_attention_load_whole_in_diffusers(tiny_model, dataset, tmp_path):
    """Feed-forward and proj_in/proj_out (1x1 convolutions in SD-1.x) as well as the attention projections —
    what kohya's trainer adapts: every adapted layer comes back in load_lora_weights, from both files."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
    out = tmp_path / "wide"
    rc, _, stderr = run_train(spec_for(tiny_model, dataset, targetModules=targets, loraFormat="LORA_FORMAT_KOHYA",
                                       maxTrainSteps=4, checkpointingSteps=100), out)
    assert rc == 0, stderr[-3000:]
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = load(StableDiffusionPipeline, tiny_model)
        pipe.load_lora_weights(str(out), weight_name=name)
        adapted = [n for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)]
        # 6 transformers of one block: proj_in, proj_out, 2 x 4 attention projections, 2 feed-forward layers.
        assert len(adapted) == 6 * 12, (name, len(adapted))
        assert {t for t in targets if any(n.endswith(t) for n in adapted)} == set(targets), name
    check_both_formats_load_and_agree(StableDiffusionPipeline, tiny_model, out, [])


def test_sdxl_trains_and_both_files_load_in_the_sdxl_pipeline(tiny_sdxl, dataset, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "sdxl"
    rc, events, stderr = run_train(spec_for(tiny_sdxl, dataset, trainTextEncoder=True,
                                            loraFormat="LORA_FORMAT_KOHYA", maxTrainSteps=6, checkpointingSteps=100, validationPrompt=PROMPT,
                                            numValidationImages=1, validationInferenceSteps=2), out)
    assert rc == 0, stderr[-3000:]
    assert any("training sdxl" in log.message for log in of_kind(events, "log"))
    assert len(of_kind(events, "validation")) == 1
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors")).keys()
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    # UNet keys in SDXL's original block names, as kohya's SDXL trainer writes them (diffusers maps them back
    # below; the tiny SDXL's transformers sit in down level 1, the middle and up level 0).
    unet_blocks = {"_".join(k.split(".")[0].split("_")[2:5]) for k in kohya if k.startswith("lora_unet_")}
    assert unet_blocks == {"input_blocks_4", "input_blocks_5", "middle_block_1", "output_blocks_0",
                           "output_blocks_1", "output_blocks_2"}, unet_blocks
    assert read_metadata(out / "pytorch_lora_weights.safetensors")["loraforge.arch"] == "sdxl"
    check_both_formats_load_and_agree(StableDiffusionXLPipeline, tiny_sdxl, out, ["text_encoder", "text_encoder_2"])


def test_sdxl_conditioning(tiny_sdxl, dataset, tmp_path):
    """Pooled embeddings and size/crop time ids reach the UNet, per sample, flip-aware."""
    import io

    from loraforge_engine.config import parse_spec
    from loraforge_engine.events import EventWriter
    from loraforge_engine.train import Trainer

    spec = parse_spec(spec_for(tiny_sdxl, dataset, centerCrop=False, randomFlip=True))
    t = Trainer(spec, str(tmp_path / "o"), EventWriter(io.StringIO()))
    mb = t.micro_batch(0, 0, 0)
    assert mb.hidden.shape[-1] == 64 and mb.pooled.shape == (4, 32) and mb.add_time_ids.shape == (4, 6)
    ids = t.dataset.batch_ids(0, 0, 4)
    for row, i in zip(mb.add_time_ids.tolist(), ids):
        w, h = t.dataset.sizes[i]
        a = t.dataset.augment(0, i)
        left = a.resized[0] - 64 - a.left if a.flip else a.left
        assert row == [h, w, a.top, left, 64, 64]
    loss = t.loss(mb, 0)
    loss.backward()
    assert math_finite(loss.item())


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def test_resume_with_latent_cache_equals_uninterrupted(tiny_model, dataset, tmp_path):
    # centre crop + flip + caption dropout: latents and text embeddings come from the caches.
    spec = spec_for(tiny_model, dataset, maxTrainSteps=6, checkpointingSteps=3, captionDropout=0.3,
                    snrGamma=5.0, noiseOffset=0.05)
    rc, events, stderr = run_train(spec, tmp_path / "full")
    assert rc == 0, stderr[-3000:]
    assert any("cached" in log.message and "latents" in log.message for log in of_kind(events, "log"))
    rc, events, stderr = run_train(spec, tmp_path / "resumed", "--resume-from",
                                   str(tmp_path / "full" / "checkpoints" / "checkpoint-3"))
    assert rc == 0, stderr[-3000:]
    assert [m.step for m in of_kind(events, "metrics")] == [4, 5, 6]
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"cached path, resume from checkpoint-3: largest abs diff {diff:g}")
    assert diff <= 1e-6
