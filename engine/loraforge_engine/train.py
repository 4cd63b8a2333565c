"""The LoRA training recipe for Stable Diffusion 1.x/2.x, read top to bottom: setup, train, save, clean up.

It follows diffusers' text-to-image LoRA example (the reference recipe) with these deliberate differences:
  * gradient clipping is real: the reference passes an already-consumed `filter` iterator to
    clip_grad_norm_, so its --max_grad_norm does nothing;
  * all randomness (data order, crops, flips, VAE sampling, noise, timesteps) is derived from
    (seed, step position), so a run resumed from a checkpoint ends with the same LoRA as an
    uninterrupted one;
  * the LR schedule is counted in optimizer steps (the proto's unit). The reference multiplies warm-up and
    total steps by the accumulation factor because its scheduler is stepped per micro-batch; this is the
    same schedule, sampled once per optimizer step;
  * the final LoRA carries peft's adapter config as safetensors metadata, so alpha != rank loads at the
    right scale in diffusers.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import threading
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import TrainingSpec
from .data import CaptionedImages, DataError, check_all, discover
from .events import EventWriter

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class Stopped(Exception):
    """Raised after a requested stop has been honoured (checkpoint saved)."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"stopped at step {step}")


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of its parts (independent streams per purpose/step)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def load_components(base_model: str, device: torch.device, weight_dtype: torch.dtype):
    """Tokenizer, text encoder, VAE, UNet and DDPM scheduler from a local diffusers folder.
    safetensors only (use_safetensors=True refuses pickle weights); never touches the network."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(base_model)
    missing = [p for p in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (root / p).exists()]
    if not root.is_dir() or missing:
        raise DataError(f"base_model {base_model!r} is not a diffusers model folder"
                        + (f" (missing {', '.join(missing)})" if root.is_dir() else ""))
    try:
        common = {"local_files_only": True, "use_safetensors": True}
        tokenizer = CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", dtype=weight_dtype,
                                                     **common)
        vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae", torch_dtype=weight_dtype, **common)
        unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", torch_dtype=weight_dtype,
                                                    **common)
        noise_scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler", local_files_only=True)
    except Exception as e:
        raise DataError(f"base_model {base_model!r} cannot be loaded: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e
    # transformers 5 can build an empty CLIP vocabulary without complaint; catch it here.
    if len(tokenizer) < 3:
        raise DataError(f"base_model {base_model!r}: tokenizer has an empty vocabulary")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(device)
    text_encoder.eval()
    vae.eval()
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def run(spec: TrainingSpec, output_dir: str, events: EventWriter, stop: threading.Event,
        resume_from: str | None = None) -> tuple[Path, int]:
    """Train; return the final LoRA file and the step it was taken after.
    Raises DataError (bad inputs), Stopped (after a stop request was honoured), or anything else."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # ------------------------------------------------------------------------------------------ setup
    out = Path(output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_temporaries(out)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = spec.mixed_precision or ("fp16" if device.type == "cuda" else "no")
    if device.type == "cpu" and mixed == "fp16":
        # CPU kernels for fp16 training are slow and partly missing; fp32 is the honest fallback.
        events.log("warning", "mixed_precision fp16 is not supported on CPU; training in fp32")
        mixed = "no"
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)
    # Frozen weights are stored in half precision on CUDA only (memory); on CPU they stay fp32 and bf16
    # runs under autocast, as the reference's CPU validation does.
    weight_dtype = autocast_dtype if (device.type == "cuda" and autocast_dtype is not None) else torch.float32

    # Resume target first: an unset seed must come from the checkpoint, not be drawn anew.
    resume_path: Path | None = None
    if resume_from:
        if resume_from == "latest":
            resume_path = ckpt.find_latest(out)
            if resume_path is None:
                events.log("info", f"no checkpoint under {out / 'checkpoints'}; starting from step 0")
        else:
            resume_path = Path(resume_from).absolute()
            if not (resume_path / ckpt.STATE_JSON).is_file():
                raise DataError(f"--resume-from {resume_from!r} is not a checkpoint folder")
    state = tensors = None
    if resume_path is not None:
        state, tensors = ckpt.load(resume_path)

    if spec.seed is not None:
        seed = spec.seed
    elif state is not None:
        seed = int(state["seed"])
    else:
        seed = secrets.randbits(32)
        events.log("info", f"seed not set; using seed {seed}")
    if state is not None and int(state["seed"]) != seed:
        events.log("warning", f"resuming with seed {seed}, checkpoint was trained with seed {state['seed']}")

    # Data: fail fast on a missing/empty set or any image that does not decode.
    examples = discover(spec.dataset_dir)
    check_all(examples)
    dataset = CaptionedImages(examples, spec.resolution, spec.center_crop, spec.random_flip, seed)

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(spec.base_model, device, weight_dtype)
    events.log("info", f"training on {device.type} (mixed precision: {mixed}), {len(dataset)} images")

    # LoRA on the UNet's attention projections. Seed before add_adapter: the gaussian init draws from
    # torch's global RNG. Trainable parameters are kept fp32 whatever the frozen weights are.
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.effective_lora_alpha,
                                init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    named_params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    for p in named_params.values():
        p.data = p.data.float()
    param_names = list(named_params)
    # A list, not a generator: it is used by both the optimizer and clip_grad_norm_ (the reference's bug).
    lora_params = list(named_params.values())
    unet.train()

    optimizer = torch.optim.AdamW(lora_params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8, foreach=True)

    accum = spec.gradient_accumulation_steps
    batches_per_epoch = dataset.batches_per_epoch(spec.train_batch_size)
    # The last optimizer step of an epoch may accumulate fewer batches (the reference's accelerate
    # syncs at the end of the data loader too).
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = spec.max_train_steps or spec.num_train_epochs * steps_per_epoch

    lr_scheduler = get_scheduler(spec.lr_scheduler, optimizer=optimizer, num_warmup_steps=spec.lr_warmup_steps,
                                 num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and mixed == "fp16") else None

    start_step = 0
    if state is not None:
        ckpt.restore(state, tensors, params=named_params, optimizer=optimizer, param_names=param_names,
                     lr_scheduler=lr_scheduler, scaler=scaler)
        start_step = int(state["step"])
        if state.get("dataset_size") != len(dataset) or state.get("steps_per_epoch") != steps_per_epoch:
            events.log("warning", "the data set or batch settings changed since the checkpoint; "
                                  "data order after resume will differ from the original run")
        changed = sorted(k for k in set(state.get("spec", {})) | set(spec.to_json_dict())
                         if state.get("spec", {}).get(k) != spec.to_json_dict().get(k))
        if changed:
            events.log("warning", f"spec differs from the checkpoint's in: {', '.join(changed)}")
        events.log("info", f"resumed from {resume_path} at step {start_step}")
        del state, tensors

    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise DataError(f"base_model scheduler prediction_type {prediction_type!r} is not supported")
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext

    # peft's LoraConfig as safetensors metadata: diffusers' loader rebuilds the config from it, so
    # lora_alpha != rank loads at the trained scale. Sets become sorted lists (stable file bytes).
    adapter_metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v
                        for k, v in unet.peft_config["default"].to_dict().items()}

    def save_lora(folder: Path) -> None:
        lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(folder), unet_lora_layers={k: v.float() for k, v in lora_state.items()},
            safe_serialization=True, unet_lora_adapter_metadata=adapter_metadata)

    def save_checkpoint(step: int) -> None:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        folder = ckpt.save(out, step, write_lora=save_lora, params=named_params, optimizer=optimizer,
                           param_names=param_names, lr_scheduler=lr_scheduler, scaler=scaler, info={
                               "seed": seed, "epoch": epoch, "step_in_epoch": step_in_epoch,
                               "steps_per_epoch": steps_per_epoch, "dataset_size": len(dataset),
                               "total_steps": total_steps, "spec": spec.to_json_dict()})
        events.checkpoint(step, folder)

    def validate(step: int) -> None:
        # Render with the live modules (LoRA active). A fresh scheduler: the pipeline mutates its state.
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDPMScheduler.from_config(noise_scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        folder = out / "validation"
        folder.mkdir(exist_ok=True)
        paths = []
        with torch.no_grad(), autocast():
            for i in range(spec.num_validation_images):
                image = pipe(spec.validation_prompt, num_inference_steps=spec.validation_inference_steps,
                             generator=generator).images[0]
                path = folder / f"step-{step}-{i}.png"
                image.save(path)
                paths.append(path)
        del pipe
        events.validation(step, spec.validation_prompt, paths)

    def encode_batch(pixels: np.ndarray, captions: list[str], micro_index: int):
        """Latents and text embeddings of one batch (frozen models, no gradients)."""
        with torch.no_grad(), autocast():
            ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids.to(device)
            encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
            pixel_values = torch.from_numpy(pixels).to(device, dtype=weight_dtype)
            gen = torch.Generator().manual_seed(derived_seed(seed, micro_index, 1))
            latents = vae.encode(pixel_values).latent_dist.sample(generator=gen)
            # Noise arithmetic in fp32 whatever the VAE ran in; the UNet's autocast picks its own dtype.
            latents = latents.float() * vae.config.scaling_factor
        return latents, encoder_hidden_states

    def diffusion_loss(latents, encoder_hidden_states, micro_index: int) -> torch.Tensor:
        # Noise and timesteps drawn on the CPU from a per-batch generator: identical on any device
        # and reproducible after a resume.
        gen = torch.Generator().manual_seed(derived_seed(seed, micro_index, 2))
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(device, latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen).to(device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        with autocast():
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")

    events.log("info", f"{total_steps} optimizer steps, {steps_per_epoch} per epoch; "
                       f"batch {spec.train_batch_size} x {accum} accumulation; seed {seed}")

    # ------------------------------------------------------------------------------------------ train
    step = start_step
    recent: deque[tuple[float, int]] = deque(maxlen=20)  # (seconds, images) of recent steps
    while step < total_steps:
        if stop.is_set():
            break
        t0 = time.perf_counter()
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        first = step_in_epoch * accum
        batch_ids = range(first, min(first + accum, batches_per_epoch))
        loss_sum, images = 0.0, 0
        for b in batch_ids:
            micro_index = epoch * batches_per_epoch + b  # global batch number: the key of its randomness
            pixels, captions = dataset.batch(epoch, b, spec.train_batch_size)
            latents, encoder_hidden_states = encode_batch(pixels, captions, micro_index)
            loss = diffusion_loss(latents, encoder_hidden_states, micro_index)
            scaled = loss / len(batch_ids)  # mean over the accumulated batches
            (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.item()
            images += len(captions)

        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, spec.max_grad_norm)
        learning_rate = lr_scheduler.get_last_lr()[0]
        if scaler:
            scaler.step(optimizer)  # skipped by the scaler if the gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        recent.append((time.perf_counter() - t0, images))
        seconds = sum(s for s, _ in recent)
        events.metrics(step=step, total_steps=total_steps, epoch=epoch, loss=loss_sum / len(batch_ids),
                       learning_rate=learning_rate, images_per_second=sum(i for _, i in recent) / seconds,
                       eta_seconds=(total_steps - step) * seconds / len(recent), grad_norm=float(grad_norm),
                       peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)

        if spec.validation_prompt and spec.validation_steps > 0 and step % spec.validation_steps == 0 \
                and step < total_steps:
            validate(step)
        if step % spec.checkpointing_steps == 0:
            save_checkpoint(step)

    if stop.is_set() and step < total_steps:
        if not (ckpt.checkpoints_dir(out) / f"checkpoint-{step}" / ckpt.STATE_JSON).is_file():
            save_checkpoint(step)
        events.log("info", f"stopped at step {step}")
        raise Stopped(step)

    # ---------------------------------------------------------------------------------- save, clean up
    final = out / ckpt.LORA_FILE
    tmp = out / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_lora(tmp)
    os.replace(tmp / ckpt.LORA_FILE, final)
    shutil.rmtree(tmp, ignore_errors=True)

    if spec.validation_prompt:
        validate(step)
    return final, step
