"""DreamBooth prior preservation (Ruiz et al. 2022), as diffusers' train_dreambooth_lora*.py do it: each batch of
instance images trains together with as many class images captioned by the class prompt, and the loss is
    instance loss + prior_loss_weight x MSE of the class images' predictions
(Min-SNR weighting, when asked, applies to the instance part only, as in diffusers' scripts).

Class images are those the spec gives (class_data_dir; an uploaded class set reaches the engine as such a
folder), then, up to num_class_images, images generated with the base model before any LoRA is added. Generated
images are cached under <cache root>/class-images/<key>/, the key a hash of what decides them (the base model's
content hash, architecture, class prompt, resolution, denoising steps, guidance and scheduler), so a later job
with the same settings on this host reuses them. Image i of a key is drawn from a generator seeded by (key, i):
the same image whichever job makes it, alone or in a batch of any size.

The cache root is $LORAFORGE_CACHE_DIR (the worker sets <state dir>/cache), else $XDG_CACHE_HOME/loraforge, else
~/.cache/loraforge.

Which class images pair with a batch is a pure function of (seed, epoch, batch), so a resumed run sees the same
ones. Class images are centre-cropped to resolution x resolution and never flipped: their latents are encoded
once per image (cache_latents) like any image whose window is fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError, Example, ImageError, apply_augment, discover, draw_augment, inspect, open_rgb
from .events import note
from .fingerprint import hurry as hurry_fingerprints
from .models import encode_text, time_ids, tokenize

if TYPE_CHECKING:
    from .train import MicroBatch, Trainer

CACHE_ENV = "LORAFORGE_CACHE_DIR"
# The pipelines' default guidance scales, which class images are generated with (as diffusers' scripts do).
GUIDANCE = {"sd": 7.5, "sdxl": 5.0}
# Added to a batch's index for the class batch's own noise when it goes through the UNet apart from its instances.
CLASS_STREAM = 1 << 48


def cache_root() -> Path:
    """Where this host keeps engine caches: $LORAFORGE_CACHE_DIR, else the user's cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraforge"


def generation_settings(model_sha256: str, arch: str, prompt: str, resolution: int, steps: int,
                        scheduler: str) -> dict:
    """Everything that decides a generated class image, recorded beside the images."""
    return {"base_model_sha256": model_sha256, "arch": arch, "class_prompt": prompt, "resolution": resolution,
            "inference_steps": steps, "guidance_scale": GUIDANCE[arch], "scheduler": scheduler}


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def image_seed(key: str, index: int) -> int:
    """The seed of class image `index` of cache `key` (63 bits)."""
    return int.from_bytes(hashlib.sha256(f"{key}/{index}".encode()).digest()[:8], "big") >> 1


def class_file(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def prior_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The class images' loss: plain MSE, as diffusers' scripts compute it."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def combine(instance_loss: torch.Tensor, class_loss: torch.Tensor, weight: float) -> torch.Tensor:
    """DreamBooth's loss: the instance loss + prior_loss_weight x the class images' loss."""
    return instance_loss + weight * class_loss


def _scheduler(base_model: str):
    """The base model's own sampling scheduler (its scheduler_config.json's class), for generating class images;
    DDPM when diffusers has no class of that name."""
    import diffusers

    folder = Path(base_model) / "scheduler"
    try:
        name = json.loads((folder / "scheduler_config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        name = None
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = diffusers.DDPMScheduler
    return cls.from_pretrained(base_model, subfolder="scheduler", local_files_only=True)


@dataclass
class PriorData:
    """The class images a run trains with, and how a batch of them joins each instance batch."""
    examples: list[Example]
    sizes: list[tuple[int, int]]
    prompt: str
    weight: float
    latent_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None

    # -------------------------------------------------------------------------------------------- setup
    @classmethod
    def prepare(cls, t: Trainer) -> PriorData:
        """Class images ready: those given, those cached, the rest generated now (progress events as it goes)."""
        spec, events = t.spec, t.events
        total, prompt = spec.num_class_images, spec.class_prompt
        given: list[Example] = []
        given_sizes: list[tuple[int, int]] = []
        if spec.class_data_dir:
            if not Path(spec.class_data_dir).is_dir():
                raise DataError(f"class_data_dir {spec.class_data_dir!r} is not a folder")
            # Every image of the folder, captioned by the class prompt (its own captions are not read).
            found = discover(spec.class_data_dir, instance_prompt=prompt, require_some=False)
            found, sizes, bad = inspect(found, spec.min_image_side, spec.class_data_dir)
            if bad:
                events.log("warning", f"class images: skipped {len(bad)} unusable: "
                                      f"{', '.join(f'{s.name} ({s.reason})' for s in bad[:5])}")
            given, given_sizes = found[:total], sizes[:total]
        need = total - len(given)
        examples, sizes = list(given), list(given_sizes)
        cached = generated = 0
        missing: list[int] = []
        if need > 0:
            hurry_fingerprints()  # the base model's identity is part of the cache key: needed now
            sha = t.fingerprints.result()["base_model_sha256"]
            scheduler = _scheduler(t.model_dir)
            settings = generation_settings(sha, t.c.arch, prompt, spec.resolution, spec.class_inference_steps,
                                           type(scheduler).__name__)
            key = cache_key(settings)
            folder = cache_root() / "class-images" / key
            folder.mkdir(parents=True, exist_ok=True)
            os.utime(folder)  # just used: the worker's disk bound (LORAFORGE_CLASS_IMAGES_MAX_MB) removes others first
            (folder / "settings.json").write_text(json.dumps(settings, indent=1, sort_keys=True), encoding="utf-8")
            for i in range(need):
                path = class_file(folder, i)
                if path.is_file():
                    try:
                        open_rgb(path)  # a damaged cache file is made again, not trained on
                        cached += 1
                        continue
                    except ImageError:
                        path.unlink(missing_ok=True)
                missing.append(i)
        progress = dict(class_prompt=prompt, total=total, given=len(given), cached=cached, to_generate=len(missing))
        events.class_images(generated=0, done=not missing, **progress)
        if missing:
            events.log("info", f"generating {len(missing)} class images of {prompt!r} with the base model "
                               f"({spec.class_inference_steps} steps, batches of {spec.class_sample_batch_size}), "
                               "kept in this worker's cache for later jobs")
            note(f"[loraforge] class-image cache: {folder}")  # the host path stays in the worker's log
            pipe = t.pipeline(scheduler)
            batch = spec.class_sample_batch_size
            for s in range(0, len(missing), batch):
                ids = missing[s:s + batch]
                gens = [torch.Generator(device="cpu").manual_seed(image_seed(key, i)) for i in ids]
                with torch.no_grad(), t.autocast():
                    images = pipe([prompt] * len(ids), num_inference_steps=spec.class_inference_steps,
                                  guidance_scale=GUIDANCE[t.c.arch], generator=gens, height=spec.resolution,
                                  width=spec.resolution).images
                for i, image in zip(ids, images):
                    # Written beside and renamed: another job filling the same cache never sees half a file.
                    tmp = folder / f".{i:06d}.{os.getpid()}.png"
                    image.save(tmp)
                    os.replace(tmp, class_file(folder, i))
                generated += len(ids)
                events.class_images(generated=generated, done=generated == len(missing), **progress)
            del pipe
        if need > 0:
            for i in range(need):
                examples.append(Example(class_file(folder, i), prompt))
                sizes.append((spec.resolution, spec.resolution))
        if not spec.instance_prompt:
            events.log("warning", "with_prior_preservation without instance_prompt: the instance images keep "
                                  "their own captions")
        return cls(examples, sizes, prompt, spec.prior_loss_weight, {} if spec.cache_latents else None)

    # -------------------------------------------------------------------------------------------- training
    def ids(self, seed: int, epoch: int, b: int, n: int, batch_size: int) -> list[int]:
        """The class images of batch b of an epoch: consecutive in a per-epoch permutation, wrapping around."""
        order = np.random.default_rng([seed, epoch, 6]).permutation(len(self.examples))
        return [int(order[(b * batch_size + j) % len(order)]) for j in range(n)]

    def micro_batch(self, t: Trainer, epoch: int, b: int, micro_index: int, n: int) -> MicroBatch:
        """n class images, encoded, for instance batch b of `epoch`."""
        from .train import MicroBatch

        spec, c, res = t.spec, t.c, t.spec.resolution
        ids = self.ids(t.seed, epoch, b, n, spec.train_batch_size)
        augs = [draw_augment(self.sizes[i], res, True, False, None) for i in ids]
        got = []
        for i, aug in zip(ids, augs):
            if self.latent_cache is not None and i in self.latent_cache:
                got.append(self.latent_cache[i])
                continue
            pixels = apply_augment(open_rgb(self.examples[i]), res, aug, spec.interpolation)
            mean, std = t._vae_moments(pixels[None])
            got.append((mean[0], std[0]))
            if self.latent_cache is not None:
                self.latent_cache[i] = got[-1]
        latents = t.sample_latents(torch.stack([m for m, _ in got]), torch.stack([s for _, s in got]),
                                   micro_index, 7)
        captions = [self.prompt] * n
        if t.text_cache is not None:
            hidden, pooled = t._text_embeddings(captions)
        else:
            with (torch.enable_grad() if t.trained_text_encoders else torch.no_grad()), t.autocast():
                hidden, pooled = encode_text(c, tokenize(c, captions))
        add_time_ids = None
        if c.arch == "sdxl":
            rows = [time_ids((self.sizes[i][1], self.sizes[i][0]), (a.top, a.left), res) for i, a in zip(ids, augs)]
            add_time_ids = torch.tensor(rows, dtype=torch.float32, device=t.device)
        return MicroBatch(latents, hidden, pooled, add_time_ids, captions)

    def loss(self, t: Trainer, mb: MicroBatch, epoch: int, b: int, micro_index: int) -> torch.Tensor:
        """Instance loss + prior_loss_weight x class loss for one micro-batch. Instance and class images go through
        the UNet as one batch where their sizes agree (as diffusers does), in two where they do not (aspect-ratio
        buckets)."""
        from .train import MicroBatch

        n = len(mb.captions)
        cb = self.micro_batch(t, epoch, b, micro_index, n)
        if cb.latents.shape[1:] == mb.latents.shape[1:]:
            joint = MicroBatch(torch.cat([mb.latents, cb.latents]), torch.cat([mb.hidden, cb.hidden]),
                               None if mb.pooled is None else torch.cat([mb.pooled, cb.pooled]),
                               None if mb.add_time_ids is None else torch.cat([mb.add_time_ids, cb.add_time_ids]),
                               mb.captions + cb.captions)
            pred, target, timesteps = t.predict(joint, micro_index)
            instance = t.reduce_loss(pred[:n], target[:n], timesteps[:n])
            return combine(instance, prior_loss(pred[n:], target[n:]), self.weight)
        instance = t.reduce_loss(*t.predict(mb, micro_index))
        # The class batch's noise from its own stream (an index no instance batch has), not the instance draws again.
        pred, target, _ = t.predict(cb, CLASS_STREAM + micro_index)
        return combine(instance, prior_loss(pred, target), self.weight)
