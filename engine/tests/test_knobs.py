"""Each knob of the recipe tested for its effect, mostly at unit level on the engine's own Trainer (built on the
tiny model in this process), where a direct check proves the same thing as a training run and costs far less."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from loraforge_engine.config import SpecError, parse_spec
from loraforge_engine.data import (CaptionedImages, DataError, apply_augment, check_all, discover, draw_augment,
                                   load_hub_dataset, select_samples)
from loraforge_engine.events import EventWriter
from loraforge_engine.train import Trainer


def make_trainer(model, data, out, **extra) -> Trainer:
    spec = parse_spec({"baseModel": str(model), "datasetDir": str(data), "resolution": 64, "trainBatchSize": 4,
                       "maxTrainSteps": 10, "learningRate": 1e-3, "lrWarmupSteps": 0, "seed": 5, "rank": 4,
                       "centerCrop": True, **extra})
    return Trainer(spec, str(out), EventWriter(io.StringIO()))


def first_batch(t: Trainer):
    return t.micro_batch(0, 0, 0)


# --------------------------------------------------------------------------------------------- data, images

def landscape(dataset):
    """A 5:4 image of the synthetic set (every third one is), so crops have room to differ."""
    ex = discover(dataset)
    i = next(i for i, s in enumerate(check_all(ex)) if s[0] != s[1])
    return ex, i


def test_center_vs_random_crop_and_flip(dataset):
    ex, i = landscape(dataset)
    centre = CaptionedImages(ex, 64, True, False, seed=1)
    rand = CaptionedImages(ex, 64, False, False, seed=1)
    a = centre.augment(0, i)
    assert (a.left, a.top, a.flip) == (8, 0, False)  # 80x64 -> the middle 64 columns
    lefts = {rand.augment(e, i).left for e in range(20)}
    assert len(lefts) > 3 and lefts <= set(range(17))  # random windows anywhere in 0..16
    crops = {rand.pixels(i, rand.augment(e, i)).tobytes() for e in range(20)}
    assert len(crops) > 3  # different windows, different pixels
    flipper = CaptionedImages(ex, 64, True, True, seed=1)
    flips = [flipper.augment(e, i).flip for e in range(40)]
    assert 5 < sum(flips) < 35  # about half
    e = flips.index(True)
    flipped = flipper.pixels(i, flipper.augment(e, i))
    np.testing.assert_array_equal(flipped, centre.pixels(i, a)[:, :, ::-1])  # a mirror image of the centre crop


def test_interpolation_modes_differ(dataset):
    img = Image.open(discover(dataset)[0].path).convert("RGB")
    aug = draw_augment(img.size, 40, True, False, np.random.default_rng(0))  # 64 -> 40: a real resize
    out = {m: apply_augment(img, 40, aug, m) for m in ("nearest", "bilinear", "lanczos")}
    assert all(v.shape == (3, 40, 40) for v in out.values())
    assert not np.array_equal(out["nearest"], out["bilinear"]) and not np.array_equal(out["bilinear"], out["lanczos"])


def test_caption_dropout_rate(dataset):
    ex = discover(dataset)
    ds = CaptionedImages(ex, 64, True, False, seed=3, caption_dropout=0.3)
    caps = [ds.caption(e, i) for e in range(100) for i in range(len(ex))]
    rate = caps.count("") / len(caps)
    assert 0.26 < rate < 0.34, rate  # 1600 draws: 0.3 +- 4 standard deviations
    assert all(c == ex[i].caption for e in range(5) for i, c in enumerate(ds.caption(e, i) for i in range(len(ex)))
               if c)
    assert all(CaptionedImages(ex, 64, True, False, 3).caption(e, 0) == ex[0].caption for e in range(50))


def test_max_train_samples_limits_the_set(tiny_model, dataset, tmp_path):
    ex = discover(dataset)
    sub = select_samples(ex, 5, seed=1)
    assert len(sub) == 5 and set(sub) <= set(ex) and select_samples(ex, 5, seed=1) == sub
    assert select_samples(ex, 5, seed=2) != sub and select_samples(ex, 100, seed=1) == ex
    t = make_trainer(tiny_model, dataset, tmp_path / "o", maxTrainSamples=6)
    assert len(t.dataset) == 6 and t.batches_per_epoch == 2 and t.steps_per_epoch == 2


def test_metadata_columns_are_configurable(dataset, tmp_path):
    rows = [json.loads(x) for x in (dataset / "metadata.jsonl").read_text().splitlines()]
    custom = tmp_path / "custom"
    custom.mkdir()
    for r in rows[:3]:
        (custom / r["file_name"]).write_bytes((dataset / r["file_name"]).read_bytes())
    (custom / "metadata.jsonl").write_text("".join(json.dumps({"img": r["file_name"], "prompt": r["text"]}) + "\n"
                                                   for r in rows[:3]))
    ex = discover(custom, image_column="img", caption_column="prompt")
    assert [e.caption for e in ex] == [r["text"] for r in rows[:3]]
    with pytest.raises(DataError, match="no column 'file_name'"):
        discover(custom)


def test_hub_dataset_gives_a_clear_error_without_the_hub(monkeypatch):
    monkeypatch.delenv("LORAFORGE_ALLOW_HUB", raising=False)
    with pytest.raises(DataError, match="does not allow downloads from the Hugging Face hub"):
        load_hub_dataset("someone/pets", None, "text")
    monkeypatch.setenv("LORAFORGE_ALLOW_HUB", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # allowed by us, but the host is offline: still refused, no call
    with pytest.raises(DataError, match="Hugging Face hub"):
        load_hub_dataset("someone/pets", None, "text")


# --------------------------------------------------------------------------------------------- schedule, optimiser

@pytest.mark.parametrize("name, extra, expected", [
    # lr at optimizer steps 0..7 of 8, peak 1e-3, 2 warm-up steps
    ("constant", {}, lambda s: 1.0),
    ("constant_with_warmup", {}, lambda s: min(1.0, s / 2)),
    ("linear", {}, lambda s: s / 2 if s < 2 else (8 - s) / 6),
    ("cosine", {}, lambda s: s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))),
    ("cosine_with_restarts", {"lrNumCycles": 2},
     lambda s: s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * ((2 * (s - 2) / 6) % 1.0)))),
    ("polynomial", {"lrPower": 2.0}, lambda s: s / 2 if s < 2 else (1 - 1e-7 / 1e-3) * ((8 - s) / 6) ** 2 + 1e-4),
])
def test_lr_scheduler_shapes(tiny_model, dataset, tmp_path, name, extra, expected):
    t = make_trainer(tiny_model, dataset, tmp_path / "o", lrScheduler=f"LR_SCHEDULER_{name.upper()}", lrWarmupSteps=2, maxTrainSteps=8,
                     maxTrainSamples=4, **extra)
    lrs = []
    for _ in range(8):
        lrs.append(t.lr_scheduler.get_last_lr()[0])
        t.optimizer.step()
        t.lr_scheduler.step()
    assert lrs == pytest.approx([1e-3 * expected(s) for s in range(8)], rel=1e-6, abs=1e-12)


def test_scale_lr_and_adamw_hyperparameters(tiny_model, dataset, tmp_path):
    t = make_trainer(tiny_model, dataset, tmp_path / "a", trainBatchSize=2, gradientAccumulationSteps=3,
                     scaleLr=True, adamBeta1=0.8, adamBeta2=0.95, adamEpsilon=1e-6, adamWeightDecay=0.05,
                     maxTrainSamples=4)
    g = t.optimizer.param_groups[0]
    assert g["lr"] == pytest.approx(1e-3 * 2 * 3)
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)
    assert g["fused"] or g["foreach"]
    # The betas really drive the update: one step with the same gradient, different beta1 -> different moments.
    p = t.lora_params[0]
    p.grad = torch.ones_like(p)
    t.optimizer.step()
    assert torch.allclose(t.optimizer.state[p]["exp_avg"], torch.full_like(p, 1 - 0.8))
    assert torch.allclose(t.optimizer.state[p]["exp_avg_sq"], torch.full_like(p, 1 - 0.95))
    u = make_trainer(tiny_model, dataset, tmp_path / "b", maxTrainSamples=4)
    assert u.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_8bit_adam_needs_cuda(tiny_model, dataset, tmp_path):
    with pytest.raises(SpecError) as e:
        make_trainer(tiny_model, dataset, tmp_path / "o", use8bitAdam=True, maxTrainSamples=4)
    assert e.value.errors[0][0] == "use_8bit_adam" and "CUDA" in str(e.value)


# --------------------------------------------------------------------------------------------- loss

def test_snr_gamma_weights_the_loss_as_min_snr(tiny_model, dataset, tmp_path):
    from diffusers.training_utils import compute_snr

    plain = make_trainer(tiny_model, dataset, tmp_path / "a", maxTrainSamples=4)
    weighted = make_trainer(tiny_model, dataset, tmp_path / "b", maxTrainSamples=4, snrGamma=5.0)
    mb = first_batch(plain)
    with torch.no_grad():
        l_plain, l_snr = plain.loss(mb, 0).item(), weighted.loss(mb, 0).item()
        # Independent oracle: diffusers' compute_snr and the reference's weighting on the same prediction.
        noise, t = plain.noise_and_timesteps(mb.latents, 0)
        pred = plain.c.unet(plain.c.noise_scheduler.add_noise(mb.latents, noise, t), t, mb.hidden).sample
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        snr = compute_snr(plain.c.noise_scheduler, t)
        w = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    assert l_plain == pytest.approx(per_sample.mean().item(), rel=1e-4)
    assert l_snr == pytest.approx((per_sample * w).mean().item(), rel=1e-4)
    assert abs(l_snr - l_plain) > 1e-3


def test_noise_offset_shifts_noise_per_channel(tiny_model, dataset, tmp_path):
    plain = make_trainer(tiny_model, dataset, tmp_path / "a", maxTrainSamples=4)
    offset = make_trainer(tiny_model, dataset, tmp_path / "b", maxTrainSamples=4, noiseOffset=0.1)
    lat = first_batch(plain).latents
    n0, t0 = plain.noise_and_timesteps(lat, 3)
    n1, t1 = offset.noise_and_timesteps(lat, 3)
    assert torch.equal(t0, t1)
    d = n1 - n0
    assert d.abs().max() > 1e-3
    # The same constant over each (sample, channel) plane, of typical size 0.1.
    assert torch.allclose(d, d[:, :, :1, :1].expand_as(d), atol=1e-6)
    assert 0.01 < d[:, :, 0, 0].std().item() < 0.3


def test_v_prediction_target(tiny_model, dataset, tmp_path):
    t = make_trainer(tiny_model, dataset, tmp_path / "v", maxTrainSamples=4, predictionType="PREDICTION_TYPE_V_PREDICTION")
    assert t.prediction_type == "v_prediction"
    assert t.c.noise_scheduler.config.prediction_type == "v_prediction"  # validation samples with it too
    mb = first_batch(t)
    with torch.no_grad():
        loss = t.loss(mb, 0).item()
        noise, ts = t.noise_and_timesteps(mb.latents, 0)
        ab = t.c.noise_scheduler.alphas_cumprod[ts].view(-1, 1, 1, 1)
        velocity = ab.sqrt() * noise - (1 - ab).sqrt() * mb.latents
        pred = t.c.unet(t.c.noise_scheduler.add_noise(mb.latents, noise, ts), ts, mb.hidden).sample
    assert loss == pytest.approx(((pred - velocity) ** 2).mean().item(), rel=1e-4)
    assert loss != pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-3)


def test_gradient_checkpointing_same_loss_and_gradients(tiny_model, dataset, tmp_path):
    results = []
    for gc in (False, True):
        t = make_trainer(tiny_model, dataset, tmp_path / f"gc{gc}", maxTrainSamples=4, gradientCheckpointing=gc)
        assert t.c.unet.is_gradient_checkpointing == gc
        loss = t.loss(first_batch(t), 0)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in t.named_params.items()}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys()
    assert max((g0[k] - g1[k]).abs().max().item() for k in g0) < 1e-6


# --------------------------------------------------------------------------------------------- LoRA

def test_rank_alpha_dropout_targets_reach_peft(tiny_model, dataset, tmp_path):
    from peft.tuners.lora.layer import Linear as LoraLinear

    t = make_trainer(tiny_model, dataset, tmp_path / "o", maxTrainSamples=4, rank=6, loraAlpha=3,
                     loraDropout=0.25, targetModules=["to_q", "to_v"])
    cfg = t.c.unet.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, set(cfg.target_modules)) == (6, 3.0, 0.25, {"to_q", "to_v"})
    layers = {n: m for n, m in t.c.unet.named_modules() if isinstance(m, LoraLinear)}
    assert layers and {n.rsplit(".", 1)[1] for n in layers} == {"to_q", "to_v"}
    for m in layers.values():
        assert m.r["default"] == 6 and m.scaling["default"] == pytest.approx(0.5)
        assert m.lora_dropout["default"].p == 0.25
    with pytest.raises(SpecError, match="target_modules"):
        make_trainer(tiny_model, dataset, tmp_path / "bad", maxTrainSamples=4, targetModules=["no_such_layer"])


def test_kohya_sdxl_refuses_targets_without_an_original_name_before_training(tiny_sdxl, dataset, tmp_path):
    # An upsampler convolution: peft adapts it, but kohya's SDXL names (the original UNet's) cannot name it
    # without the block layout; the spec is refused at start, not after the run.
    with pytest.raises(SpecError, match="lora_format"):
        make_trainer(tiny_sdxl, dataset, tmp_path / "o", maxTrainSamples=4, loraFormat="LORA_FORMAT_KOHYA",
                     targetModules=["to_q", "upsamplers.0.conv"])
    make_trainer(tiny_sdxl, dataset, tmp_path / "ok", maxTrainSamples=4, loraFormat="LORA_FORMAT_KOHYA",
                 targetModules=["to_q", "ff.net.2", "proj_in", "conv1"])  # all have original names


def test_targets_that_infer_cannot_serve_are_warned_about_at_start(tiny_model, dataset, tmp_path):
    sink = io.StringIO()
    spec = parse_spec({"baseModel": str(tiny_model), "datasetDir": str(dataset), "resolution": 64,
                       "maxTrainSamples": 4, "targetModules": ["to_q", "conv1"]})
    Trainer(spec, str(tmp_path / "o"), EventWriter(sink))
    warnings = [json.loads(line)["log"]["message"] for line in sink.getvalue().splitlines()
                if json.loads(line).get("log", {}).get("level") == "LOG_LEVEL_WARNING"]
    assert any("outside its transformers" in w and "resnets" in w for w in warnings), warnings
    sink = io.StringIO()
    spec = parse_spec({"baseModel": str(tiny_model), "datasetDir": str(dataset), "resolution": 64,
                       "maxTrainSamples": 4, "targetModules": ["to_q", "ff.net.2", "proj_in"]})
    Trainer(spec, str(tmp_path / "p"), EventWriter(sink))
    assert "outside its transformers" not in sink.getvalue()


def test_train_text_encoder_puts_lora_on_its_attention(tiny_model, dataset, tmp_path):
    from peft.tuners.lora.layer import Linear as LoraLinear

    t = make_trainer(tiny_model, dataset, tmp_path / "o", maxTrainSamples=4, trainTextEncoder=True)
    te = t.c.text_encoders[0]
    names = {n.rsplit(".", 1)[1] for n, m in te.named_modules() if isinstance(m, LoraLinear)}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert t.text_cache is None  # a trained text encoder cannot be cached
    assert any(n.startswith("text_encoder.") for n in t.named_params)
    loss = t.loss(first_batch(t), 0)
    loss.backward()
    te_grads = [p.grad for n, p in t.named_params.items() if n.startswith("text_encoder.")]
    assert te_grads and all(g is not None for g in te_grads) and any(g.abs().max() > 0 for g in te_grads)


# --------------------------------------------------------------------------------------------- CPU kernels

def test_the_routings_give_diffusers_own_loss_and_gradients(tiny_model, dataset, tmp_path,
                                                                       monkeypatch):
    from loraforge_engine import small_ops

    t = make_trainer(tiny_model, dataset, tmp_path / "o")
    resnets = [m for m in t.c.unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert resnets and all(hasattr(m, "_diffusers_forward") for m in resnets)
    convs = [m for m in t.c.unet.modules() if type(m) is torch.nn.Conv2d]
    assert convs and all(hasattr(m, "_torch_forward") for m in convs)  # on a CPU: few-pixel maps take thnn

    def loss_and_grads():
        t.optimizer.zero_grad(set_to_none=True)
        loss = t.loss(first_batch(t), 3)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in t.named_params.items()}

    loss_and_grads()
    t.optimizer.step()  # lora_B starts at zero, so lora_A's gradients are zero until a step moves B
    routed = loss_and_grads()
    assert all(g.abs().max() > 0 for g in routed[1].values())
    monkeypatch.setattr(small_ops, "PLAIN_BLOCKS", False)  # diffusers' attention processor and resnet forward
    monkeypatch.setattr(small_ops, "DIRECT_ATTENTION", False)
    monkeypatch.setattr(small_ops, "FEW_PIXELS", 0)  # oneDNN for every convolution
    own = loss_and_grads()
    torch.testing.assert_close(routed[0], own[0], rtol=1e-5, atol=1e-6)  # two convolution kernels: to rounding
    assert routed[1].keys() == own[1].keys()
    for name, g in own[1].items():
        torch.testing.assert_close(routed[1][name], g, rtol=1e-3, atol=1e-6, msg=name)

    compiled = make_trainer(tiny_model, dataset, tmp_path / "c", torchCompile=True)
    assert not any(hasattr(m, "_diffusers_forward") for m in compiled.c.unet.modules())
    assert not any(hasattr(m, "_torch_forward") for m in compiled.c.unet.modules())  # inductor picks kernels


# --------------------------------------------------------------------------------------------- caches

def test_caches_follow_the_augmentation_and_match_the_uncached_path(tiny_model, dataset, tmp_path):
    cached = make_trainer(tiny_model, dataset, tmp_path / "a", randomFlip=True, captionDropout=0.5)
    assert cached.latent_cache == {} and cached.text_cache == {}  # filled on first use
    assert all(cached.latent_cacheable)  # centre crop: every image's window is fixed
    uncached = make_trainer(tiny_model, dataset, tmp_path / "b", randomFlip=True, captionDropout=0.5,
                            cacheLatents=False)
    assert uncached.latent_cache is None and uncached.text_cache is None
    for epoch, b in ((0, 0), (1, 2), (2, 0)):
        x, y = cached.micro_batch(epoch, b, 7), uncached.micro_batch(epoch, b, 7)
        assert x.captions == y.captions
        # A cached image or caption was encoded on its own; a batch of four runs kernels that round differently
        # (up to ~1e-3 here). Another image or orientation differs by far more.
        torch.testing.assert_close(x.latents, y.latents, atol=2e-3, rtol=0)
        assert (x.latents - y.latents.roll(1, dims=0)).abs().max() > 0.1
        torch.testing.assert_close(x.hidden, y.hidden, atol=1e-4, rtol=0)
    assert cached.latent_cache and all(isinstance(k[1], bool) for k in cached.latent_cache)
    # A random crop caches the images already at the training size (their crop is the whole image), only them.
    random_crop = make_trainer(tiny_model, dataset, tmp_path / "c", centerCrop=False)
    square = [w == h == 64 for w, h in random_crop.dataset.sizes]
    assert random_crop.latent_cacheable == square and 0 < sum(square) < len(square)
    plain = make_trainer(tiny_model, dataset, tmp_path / "d", centerCrop=False, cacheLatents=False)
    for epoch in range(3):
        for b in range(random_crop.batches_per_epoch):
            x, y = random_crop.micro_batch(epoch, b, b), plain.micro_batch(epoch, b, b)
            # The uncached images go through the VAE in a smaller call than the plain path's, whose kernels round
            # differently (up to ~1e-3 here); another image or orientation differs by far more.
            torch.testing.assert_close(x.latents, y.latents, atol=2e-3, rtol=0)
            assert (x.latents - y.latents.roll(1, dims=0)).abs().max() > 0.1
    assert {i for i, _ in random_crop.latent_cache} == {i for i, sq in enumerate(square) if sq}


def test_each_image_and_orientation_is_encoded_once_when_first_drawn(tiny_model, dataset, tmp_path,
                                                                    monkeypatch):
    from diffusers import AutoencoderKL

    calls = []
    encode = AutoencoderKL.encode

    def counting_encode(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    t = make_trainer(tiny_model, dataset, tmp_path / "a", randomFlip=True)
    assert calls == []  # nothing encoded before the first step
    drawn = set()
    for epoch in range(4):
        for b in range(t.batches_per_epoch):
            ids = t.dataset.batch_ids(epoch, b, t.spec.train_batch_size)
            new = {(i, t.dataset.augment(epoch, i).flip) for i in ids} - drawn
            before = len(calls)
            t.micro_batch(epoch, b, b)
            assert calls[before:] == [1] * len(new)  # only what was not drawn before, each on its own
            drawn |= new
    assert set(t.latent_cache) == drawn


# --------------------------------------------------------------------------------------------- setup

def test_provenance_hashes_run_beside_setup_and_reach_the_lora_file(tiny_model, dataset, tmp_path, monkeypatch):
    # Hashing a real base model reads gigabytes; the Trainer must not wait for it before training starts.
    import threading

    from loraforge_engine import train
    from loraforge_engine.data import dataset_fingerprint
    from loraforge_engine.lora_files import read_metadata

    release, seen = threading.Event(), []

    def slow_hash(path):
        seen.append(threading.current_thread().name)
        assert release.wait(60), "never released"
        return "f" * 32

    monkeypatch.setattr(train, "model_hash", slow_hash)
    t = make_trainer(tiny_model, dataset, tmp_path / "a")  # returns although the hash is still running
    assert seen == ["loraforge-background"] and not release.is_set()
    release.set()
    meta = read_metadata(t.save_lora(tmp_path / "lora", step=0))
    assert meta["loraforge.base_model_sha256"] == "f" * 32
    assert meta["loraforge.dataset_sha256"] == dataset_fingerprint(discover(dataset))

    def unreadable(path):
        raise PermissionError(f"{path}: permission denied")

    monkeypatch.setattr(train, "model_hash", unreadable)
    t = make_trainer(tiny_model, dataset, tmp_path / "b")
    with pytest.raises(PermissionError, match="permission denied"):  # surfaces where the hash is needed
        t.save_lora(tmp_path / "lora-b", step=0)


def test_an_overflowing_fp16_step_is_skipped_and_counted(tiny_model, dataset, tmp_path):
    # The engine's fp16 scaler exists on CUDA only; torch's GradScaler for the CPU has the same contract (inf/NaN
    # gradients: no update, the scale halves), so the engine's skip handling is exercised here with it.
    t = make_trainer(tiny_model, dataset, tmp_path / "a", lrScheduler="LR_SCHEDULER_LINEAR", maxTrainSteps=4)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    first = t.optimizer_step(0)
    assert not first.skipped and t.skipped_steps == 0 and t.scaler.get_scale() == 2.0**10
    before = {n: p.detach().clone() for n, p in t.named_params.items()}
    lr_before = t.lr_scheduler.get_last_lr()[0]
    poisoned = next(iter(t.named_params.values()))
    handle = poisoned.register_hook(lambda g: torch.full_like(g, float("inf")))
    second = t.optimizer_step(1)
    handle.remove()
    assert second.skipped and t.skipped_steps == 1 and t.scaler.get_scale() == 2.0**9
    for n, p in t.named_params.items():
        assert torch.equal(p.detach(), before[n]), n  # no parameter moved
    assert t.lr_scheduler.get_last_lr()[0] == lr_before  # nor did the schedule
    third = t.optimizer_step(2)
    assert not third.skipped and t.skipped_steps == 1 and t.lr_scheduler.get_last_lr()[0] < lr_before
    assert any(not torch.equal(p.detach(), before[n]) for n, p in t.named_params.items())


def test_the_base_model_hash_comes_from_a_child_process_alike(tiny_model):
    from loraforge_engine.fingerprint import model_hash, model_hash_idle

    assert model_hash_idle(str(tiny_model)) == model_hash(str(tiny_model))


def test_the_idle_hash_runs_at_idle_priority_until_hurried(tmp_path):
    import threading
    import time

    from loraforge_engine import fingerprint

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    with open(model / "unet" / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.truncate(2 << 30)  # sparse: seconds of hashing, no disk
    got = []
    worker = threading.Thread(target=lambda: got.append(fingerprint.model_hash_idle(str(model))))
    worker.start()
    deadline = time.monotonic() + 30
    while not fingerprint._RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    (proc,) = fingerprint._RUNNING
    time.sleep(0.2)
    assert os.sched_getscheduler(proc.pid) == os.SCHED_IDLE
    fingerprint.hurry()
    assert os.sched_getscheduler(proc.pid) == os.SCHED_OTHER
    worker.join(120)
    assert got == [fingerprint.model_hash(str(model))] and not fingerprint._RUNNING
