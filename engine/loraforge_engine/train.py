"""The LoRA training recipe for Stable Diffusion 1.x/2.x and SDXL, read top to bottom: setup, train, save,
clean up.

It follows diffusers' text-to-image LoRA examples (the reference recipe, SD and SDXL) with these deliberate
differences:
  * gradient clipping is real: the reference passes an already-consumed `filter` iterator to
    clip_grad_norm_, so its --max_grad_norm does nothing;
  * all randomness (data order, crops, flips, caption dropout, VAE sampling, noise, timesteps) is derived
    from (seed, step position), so a run resumed from a checkpoint ends with the same LoRA as an
    uninterrupted one;
  * the LR schedule is counted in optimizer steps (the proto's unit). The reference multiplies warm-up and
    total steps by the accumulation factor because its scheduler is stepped per micro-batch; this is the
    same schedule, sampled once per optimizer step;
  * frozen encoders run once per image and caption, not once per step: VAE latents (the distribution's mean
    and std, so the per-step sample is drawn exactly as the uncached path draws it) and text embeddings are
    cached on first use where the augmentation allows it (centre crop, or a random crop of an image already
    at the training size; both orientations under random flip; the empty caption under caption dropout; text
    embeddings only while the text encoder is frozen);
  * fused AdamW where the device has it, channels_last convolutions, optional torch.compile; attention modules
    call their processor without diffusers' per-call signature inspection, plain SDPA attention and resnet
    blocks skip diffusers' division by an output factor of 1, and peft's LoRA Linear layers run as one autograd
    node each; on a CPU, convolution weights turn channels_last on first use, convolutions whose output has a
    few pixels (4x4 or fewer: low training resolutions) run thnn_conv2d instead of oneDNN (small_ops), and the
    step uses as many threads as there are cores that other work leaves free (cpu_threads);
  * the final LoRA carries peft's adapter config and our provenance as safetensors metadata.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import dreambooth, lora_files
from .config import TEXT_ENCODER_TARGETS, SpecError, TrainingSpec
from .confined import pinned_model
from .cpu_threads import core_share, fixed_threads
from .distributed import Group
from .data import (CaptionedImages, DataError, ImageError, Skipped, caption_source, dataset_fingerprint, discover,
                   inspect, load_hub_dataset, make_buckets, no_usable_images, resized_size, select_samples,
                   size_histogram, skipped_summary)
from .events import EventWriter
from .fingerprint import hurry as hurry_fingerprints
from .fingerprint import model_hash_idle as model_hash
from .fingerprint import running_pids as fingerprint_pids
from .models import Components, encode_text, load_components, time_ids, tokenize
from .small_ops import direct_attention_calls, fused_lora_calls, plain_resnet_calls, route_few_pixel_convs

KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the default; kept for importers


def _contract_enums():
    from .contract import job_pb2

    reasons = {"corrupt": job_pb2.SKIP_REASON_CORRUPT, "too_small": job_pb2.SKIP_REASON_TOO_SMALL,
               "unreadable": job_pb2.SKIP_REASON_UNREADABLE, "no_caption": job_pb2.SKIP_REASON_NO_CAPTION,
               "too_large": job_pb2.SKIP_REASON_TOO_LARGE}
    sources = {"metadata.jsonl": job_pb2.CAPTION_SOURCE_METADATA_JSONL,
               "metadata.csv": job_pb2.CAPTION_SOURCE_METADATA_CSV, "txt": job_pb2.CAPTION_SOURCE_SIDECAR_TXT,
               "instance_prompt": job_pb2.CAPTION_SOURCE_INSTANCE_PROMPT, "hub": job_pb2.CAPTION_SOURCE_HUB}
    return reasons, sources


# The data module's skip reasons and caption sources as the contract's enum values.
SKIP_REASONS, CAPTION_SOURCES = _contract_enums()


class StopFlag(Protocol):
    """What train() polls between steps: a threading.Event, or the engine's signal handler (StopOnSignal)."""

    def is_set(self) -> bool: ...


class Stopped(Exception):
    """Raised after a requested stop has been honoured (checkpoint saved)."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"stopped at step {step}")


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of its parts (independent streams per purpose/step)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep (Min-SNR, Hang et al. 2023)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR for epsilon targets, / (SNR + 1) for v targets."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


@dataclass
class StepResult:
    loss: float  # mean over the step's micro-batches
    images: int
    grad_norm: float  # before clipping
    learning_rate: float  # the rate this step used
    skipped: bool  # fp16: the gradient scaler found inf/NaN gradients and skipped the update


@dataclass
class MicroBatch:
    latents: torch.Tensor  # scaled VAE latents, fp32
    hidden: torch.Tensor  # text encoder hidden states
    pooled: torch.Tensor | None  # SDXL: pooled text embedding
    add_time_ids: torch.Tensor | None  # SDXL: size and crop conditioning
    captions: list[str]
    rows: slice = field(default_factory=lambda: slice(None))  # data parallel: this rank's rows of the global batch
    total: int | None = None  # data parallel: the global batch's size (None: this batch is all of it)


def make_optimizer(spec: TrainingSpec, params: list[torch.Tensor], lr: float, device: torch.device):
    """AdamW with the spec's betas/eps/weight decay: bitsandbytes' 8-bit AdamW on request (CUDA only);
    otherwise torch's fused kernel where the device has one, else the multi-tensor (foreach) one."""
    kwargs = {"lr": lr, "betas": (spec.adam_beta1, spec.adam_beta2), "weight_decay": spec.adam_weight_decay,
              "eps": spec.adam_epsilon}
    if spec.use_8bit_adam:
        if device.type != "cuda":
            raise SpecError([("use_8bit_adam", f"8-bit AdamW (bitsandbytes) needs a CUDA device; "
                                               f"this run is on {device.type}")])
        try:
            import bitsandbytes as bnb  # noqa: PLC0415 - optional, CUDA-only dependency
        except ImportError:
            raise SpecError([("use_8bit_adam", "8-bit AdamW needs the bitsandbytes package, which is not "
                                               "installed (pip install bitsandbytes)")]) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(params, foreach=True, **kwargs)


class _InBackground:
    """fn() on a daemon thread (a failed setup does not wait for it); result() waits and re-raises its error."""

    def __init__(self, fn):
        self._done = threading.Event()
        self._value = self._error = None
        threading.Thread(target=self._run, args=(fn,), name="loraforge-background", daemon=True).start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller of result()
            self._error = e
        finally:
            self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class Trainer:
    """One training run. Construction is the setup (everything that can fail on bad inputs fails here);
    `train()` runs the loop and saves the result."""

    def __init__(self, spec: TrainingSpec, output_dir: str, events: EventWriter, *,
                 resume_from: str | None = None):
        self.spec, self.events = spec, events
        self.out = Path(output_dir).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(self.out)
        self._set_up_device()
        # The folder the base model is read from: with data roots, a view of files checked to lie inside them.
        self.model_dir, self._pinned_model = pinned_model(spec.base_model)
        # Resume target before the seed: an unset seed must come from the checkpoint, not be drawn anew.
        state, tensors = self._load_resume_state(resume_from)
        self.seed = self._choose_seed(state)
        data_sha = self._set_up_data()
        self._load_models()
        # DreamBooth: class images ready (the missing ones generated by the base model, before any LoRA).
        self.prior = dreambooth.PriorData.prepare(self) if spec.with_prior_preservation else None
        self._add_lora()
        self._tune_modules()
        self._set_up_optimizer()
        self._restore(state, tensors)
        self.dist.broadcast(self.lora_params)  # data parallel: rank 0's LoRA weights on every rank
        del state, tensors
        self.bad_images: set[int] = set()  # images that stopped decoding during the run (see _pixels)
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self.latent_cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.latent_cacheable: list[bool] = []
        if spec.cache_latents:
            self._set_up_caches()
        self._report_data()
        self._describe_files(data_sha)

    # ------------------------------------------------------------------------------------------ setup steps
    def _set_up_device(self) -> None:
        """Device, precision (the spec's, or fp16 on CUDA / fp32 on CPU), TF32, and the CPU's threads."""
        spec, events = self.spec, self.events
        # Data parallel (distributed.py): this process's rank, its device (spec.device_kind), the group joined.
        self.dist = Group.from_env()
        self.device = device = self.dist.device(spec)
        self.dist.start(device)
        self.batch = spec.train_batch_size * self.dist.world  # the global micro-batch: all ranks' samples
        self.effective_batch = self.batch * spec.gradient_accumulation_steps  # images per optimizer step
        if spec.num_devices != self.dist.world:
            events.log("warning", f"num_devices {spec.num_devices}: this process trains alone (the `train` command "
                                  "launches the ranks)")
        mixed = spec.mixed_precision or ("fp16" if device.type == "cuda" else "no")
        if device.type == "cpu" and mixed == "fp16":
            # CPU kernels for fp16 training are slow and partly missing; fp32 is the honest fallback.
            events.log("warning", "mixed_precision fp16 is not supported on CPU; training in fp32")
            mixed = "no"
        self.mixed = mixed
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)
        # Frozen weights are stored in the mixed precision (the trained LoRA weights stay fp32), as diffusers'
        # script does on every device: half the bytes to stream per step. CPU fp16 fell back to fp32 above.
        self.weight_dtype = self.autocast_dtype or torch.float32
        if spec.allow_tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.cores = None
        if device.type == "cpu":
            # Denormal floats make CPU kernels crawl; gradients of tiny LoRA updates produce them.
            torch.set_flush_denormal(True)
            # Steps run on the cores other work leaves free (cpu_threads); from here on, setup included.
            fixed = fixed_threads()
            if fixed:
                torch.set_num_threads(fixed)
            else:
                # The base-model hash's idle-priority child is the engine's own: its time is not other work.
                self.cores = core_share(torch.get_num_threads(), helpers=fingerprint_pids)

    def _load_resume_state(self, resume_from: str | None):
        """The checkpoint to resume from (--resume-from, else the spec's "latest"), loaded: (state, tensors), or
        (None, None) to start fresh. A checkpoint artifact name in the spec ("jobs/…/checkpoint-N/") is the
        worker's to restore into a folder and pass as --resume-from; the engine cannot read it."""
        spec, out = self.spec, self.out
        if resume_from is None and spec.resume_from_checkpoint not in (None, "latest"):
            raise SpecError([("resume_from_checkpoint", f"{spec.resume_from_checkpoint!r} names a checkpoint "
                                                        "artifact; the worker restores it and passes --resume-from")])
        resume_from = resume_from or spec.resume_from_checkpoint
        self.resume_path = None
        if resume_from == "latest":
            self.resume_path = ckpt.find_latest(out)
            if self.resume_path is None:
                self.events.log("info", f"no checkpoint under {out / 'checkpoints'}; starting from step 0")
        elif resume_from:
            self.resume_path = Path(resume_from).absolute()
            if not (self.resume_path / ckpt.STATE_JSON).is_file():
                raise DataError(f"resume_from_checkpoint {resume_from!r} is not a checkpoint folder")
        return ckpt.load(self.resume_path) if self.resume_path is not None else (None, None)

    def _choose_seed(self, state) -> int:
        """The spec's seed, else the checkpoint's, else a fresh one (logged, so the run can be repeated)."""
        if self.spec.seed is not None:
            seed = self.spec.seed
        elif state is not None:
            seed = int(state["seed"])
        else:
            seed = self.dist.agree(secrets.randbits(32))  # data parallel: rank 0's draw on every rank
            self.events.log("info", f"seed not set; using seed {seed}")
        if state is not None and int(state["seed"]) != seed:
            self.events.log("warning", f"resuming with seed {seed}, checkpoint was trained with seed {state['seed']}")
        return seed

    def _set_up_data(self) -> dict[str, str]:
        """Find and inspect the data set: every image is decoded once now, and one that cannot be used (corrupt,
        unreadable, too small, without a caption) is left out with its reason, for the data set report. A set
        with nothing usable fails now (DataError, after its report). Starts the provenance hashes; returns the
        data set hash where it is computed here (in-memory images)."""
        spec, events, seed = self.spec, self.events, self.seed
        skipped: list[Skipped] = []
        if spec.dataset_name:
            examples = load_hub_dataset(spec.dataset_name, spec.image_column, spec.caption_column)
            if spec.instance_prompt:
                examples = [type(ex)(ex.path, spec.instance_prompt, ex.image) for ex in examples]
            self.caption_source = "instance_prompt" if spec.instance_prompt else "hub"
        else:
            examples = discover(spec.dataset_dir, spec.image_column, spec.caption_column, skipped,
                                instance_prompt=spec.instance_prompt, require_some=False)
            self.caption_source = caption_source(spec.dataset_dir, spec.instance_prompt)
        self.images_found = len(examples) + len(skipped)
        examples, sizes, bad = inspect(examples, spec.min_image_side, spec.dataset_dir)
        skipped += bad
        self.skipped = skipped
        if skipped:
            events.log("warning", f"skipped {len(skipped)} of {self.images_found} images: {skipped_summary(skipped)}")
        if not examples:
            self.buckets, self.dataset = None, None
            self._report_data()
            raise no_usable_images(skipped)
        keep = select_samples(list(range(len(examples))), spec.max_train_samples, seed)
        examples, sizes = [examples[i] for i in keep], [sizes[i] for i in keep]
        self.buckets = None
        if spec.aspect_ratio_buckets:
            low, high = spec.bucket_sides
            self.buckets = make_buckets(spec.resolution, spec.bucket_step, low, high, spec.bucket_max_aspect)
            if not self.buckets:
                raise SpecError([("aspect_ratio_buckets", f"no bucket of about {spec.resolution}² pixels has sides "
                                                          f"in {low}..{high} px in steps of {spec.bucket_step} and an "
                                                          f"aspect ratio of at most {spec.bucket_max_aspect:g}")])
        # The provenance hashes read every byte of the base model (gigabytes: ~1.3 s per GiB on the CI host)
        # and of the image files; they are needed only when the first LoRA file is written, so they run on a
        # thread beside loading and training instead of delaying the first step. In-memory images (a hub
        # dataset) are hashed here: PIL images are not shared across threads.
        files_only = all(ex.path is not None for ex in examples)
        self.fingerprints = _InBackground(lambda: {
            "base_model_sha256": model_hash(self.model_dir),
            **({"dataset_sha256": dataset_fingerprint(examples)} if files_only else {})})
        self.dataset = CaptionedImages(examples, spec.resolution, spec.center_crop, spec.random_flip, seed,
                                       interpolation=spec.interpolation, caption_dropout=spec.caption_dropout,
                                       sizes=sizes, buckets=self.buckets, shuffle_tags=spec.shuffle_tags,
                                       keep_tags=spec.keep_tags)
        if self.buckets:
            self._describe_buckets()
        return {} if files_only else {"dataset_sha256": dataset_fingerprint(examples)}

    def _describe_buckets(self) -> None:
        """Say in the log how the images fall into buckets and what happens to a bucket's short last batch."""
        ds, batch = self.dataset, self.batch
        used = [(ds.buckets[b], len(m)) for b, m in ds.members.items()]
        line = ", ".join(f"{w}x{h}: {n}" for (w, h), n in used)
        short = [f"{w}x{h} ({n % batch} of {batch})" for (w, h), n in used if n % batch]
        how = ""
        if batch > 1 and short:
            # As kohya's sd-scripts: no image is dropped or repeated; the bucket's last batch is shorter.
            how = (f"; a bucket's images left over after whole batches of {batch} form a shorter batch each epoch "
                   f"(as kohya's sd-scripts; none dropped or repeated): {', '.join(short)}")
        self.events.log("info", f"aspect-ratio buckets: {len(used)} of {len(ds.buckets)} hold images "
                                f"({line}){how}")

    def _check_buckets(self) -> None:
        """Bucket sides the model cannot take fail now: a UNet that halves latents k times needs latent sides that
        are multiples of 2^k, i.e. pixel sides that are multiples of the VAE's factor × 2^k."""
        if not self.buckets:
            return
        c = self.c
        need = 2 ** (len(c.vae.config.block_out_channels) - 1) * 2 ** (len(c.unet.config.down_block_types) - 1)
        bad = sorted({(w, h) for b in self.dataset.members for (w, h) in [self.buckets[b]] if w % need or h % need})
        if bad:
            raise SpecError([("bucket_step", f"this model needs bucket sides that are multiples of {need} px; "
                                             f"bucket_step {self.spec.bucket_step} makes "
                                             f"{', '.join(f'{w}x{h}' for w, h in bad[:5])}")])

    def _load_models(self) -> None:
        """The base model's components, and the training target (the spec's prediction type, else the model's)."""
        spec = self.spec
        self.c = c = load_components(self.model_dir, self.device, self.weight_dtype, shown=spec.base_model)
        if spec.prediction_type:
            # As the reference: the training target and the validation sampler both follow the override.
            c.noise_scheduler.register_to_config(prediction_type=spec.prediction_type)
        self.prediction_type = c.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DataError(f"base_model scheduler prediction_type {self.prediction_type!r} is not supported")
        self.events.log("info", f"training {c.arch} on {self.device.type} (mixed precision: {self.mixed}), "
                                f"{len(self.dataset)} images")
        self._check_buckets()

    def _add_lora(self) -> None:
        """LoRA adapters on the UNet (and the text encoders when asked), refusing targets the chosen file format
        cannot name; the trainable parameters, by name, in fp32."""
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        spec, events, c = self.spec, self.events, self.c
        # Seed before add_adapter: the gaussian init draws from torch's global RNG. Trainable parameters are
        # kept fp32 whatever the frozen weights are.
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        alpha = spec.effective_lora_alpha
        try:
            c.unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=alpha, lora_dropout=spec.lora_dropout,
                                          init_lora_weights="gaussian", target_modules=spec.unet_targets))
        except ValueError as e:
            raise SpecError([("target_modules", f"{spec.unet_targets} match no module of the UNet ({e})")]) from None
        self.layers_per_block = c.unet.config.layers_per_block
        adapted = [name for name, module in c.unet.named_modules() if isinstance(module, BaseTunerLayer)]
        if spec.lora_format == "kohya" and c.arch == "sdxl":
            # Fail now, not after training: kohya's SDXL names exist only for the original UNet's modules.
            for name in adapted:
                if lora_files.sgm_module_name(name, self.layers_per_block) is None:
                    raise SpecError([("lora_format", f"kohya SDXL files name UNet modules as SDXL's original UNet "
                                                     f"does; {name} has no such name (use the diffusers format)")])
        outside = [name for name in adapted if ".attentions." not in f".{name}"]
        if outside:
            # Said before training, not discovered at the first Infer request.
            events.log("warning", f"target_modules adapt {len(outside)} UNet layers outside its transformers "
                                  f"(e.g. {outside[0]}): the LoRA loads in diffusers, but loraforge's Infer serves "
                                  "only layers inside the transformers and will refuse it")
        self.trained_text_encoders = []
        if spec.train_text_encoder:
            for name, te in zip(c.text_encoder_names, c.text_encoders):
                te.add_adapter(LoraConfig(r=spec.rank, lora_alpha=alpha, lora_dropout=spec.lora_dropout,
                                          init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_TARGETS)))
                te.train()
                self.trained_text_encoders.append((name, te))
        # Parameter names: the UNet's as peft names them, text encoders' prefixed with the component name.
        self.named_params = {n: p for n, p in c.unet.named_parameters() if p.requires_grad}
        for name, te in self.trained_text_encoders:
            self.named_params.update({f"{name}.{n}": p for n, p in te.named_parameters() if p.requires_grad})
        for p in self.named_params.values():
            p.data = p.data.float()
        self.param_names = list(self.named_params)
        # A list, not a generator: it is used by both the optimizer and clip_grad_norm_ (the reference's bug).
        self.lora_params = list(self.named_params.values())

    def _tune_modules(self) -> None:
        """Speed and memory settings of the modules: gradient checkpointing, channels_last, the small-op routings
        or torch.compile. None changes what is computed."""
        spec, c = self.spec, self.c
        c.unet.train()
        if spec.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
            for _, te in self.trained_text_encoders:
                te.gradient_checkpointing_enable()
        if self.device.type == "cpu" and not spec.torch_compile:
            # Convolution weights turn channels_last on first use, the mapped file's pages under the old layout
            # given back (a copy of the whole UNet up front held 2.7 GiB more at SD-1.5 widths, and converted the
            # VAE decoder, which training never runs); feature maps of a few pixels skip oneDNN (small_ops).
            route_few_pixel_convs(c.unet)
            route_few_pixel_convs(c.vae)
        else:
            # Convolutions in NHWC: cuDNN's tensor cores (and oneDNN under torch.compile) run them faster that way.
            c.unet.to(memory_format=torch.channels_last)
            c.vae.to(memory_format=torch.channels_last)
        if not spec.torch_compile:
            # Every device (the host's time per step matters on GPUs too): attention modules call their processor
            # without diffusers' per-call inspection, and the plain SDPA attention and resnet blocks skip their
            # division by 1 (small_ops). Under torch.compile the compiler removes such operators itself.
            direct_attention_calls(c.unet)
            plain_resnet_calls(c.unet)
            plain_resnet_calls(c.vae)
            for model in (c.unet, *(te for _, te in self.trained_text_encoders)):
                fused_lora_calls(model)  # peft's LoRA Linear layers in one autograd node each
        if spec.torch_compile:
            # In place (nn.Module.compile) so parameter names, checkpoints and LoRA files stay the same.
            c.unet.compile()
            self.events.log("info", "torch.compile: the first steps include compilation (kernel cache: "
                                    f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR') or 'torch default'})")

    def _set_up_optimizer(self) -> None:
        """AdamW, the step counts, the LR schedule (in optimizer steps) and, for fp16 on CUDA, the gradient scaler."""
        from diffusers.optimization import get_scheduler

        spec = self.spec
        accum = spec.gradient_accumulation_steps
        self.learning_rate = spec.learning_rate
        if spec.scale_lr:
            self.learning_rate = spec.learning_rate * self.batch * accum  # × processes: self.batch counts them
            self.events.log("info", f"scale_lr: learning rate {spec.learning_rate:g} x {self.batch} x "
                                    f"{accum} = {self.learning_rate:g}")
        self.optimizer = make_optimizer(spec, self.lora_params, self.learning_rate, self.device)
        self.batches_per_epoch = self.dataset.batches_per_epoch(self.batch)
        # The last optimizer step of an epoch may accumulate fewer batches (the reference's accelerate
        # syncs at the end of the data loader too).
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        self.total_steps = spec.max_train_steps or spec.num_train_epochs * self.steps_per_epoch
        self.lr_scheduler = get_scheduler(spec.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=spec.lr_warmup_steps,
                                          num_training_steps=self.total_steps, num_cycles=spec.lr_num_cycles,
                                          power=spec.lr_power)
        self.scaler = (torch.amp.GradScaler("cuda") if (self.device.type == "cuda" and self.mixed == "fp16")
                       else None)

    def _restore(self, state, tensors) -> None:
        """Put a checkpoint's parameters, optimizer, schedule and scaler back, and say what differs from it."""
        self.start_step = 0
        self.skipped_steps = 0
        if state is None:
            return
        spec, events = self.spec, self.events
        ckpt.restore(state, tensors, params=self.named_params, optimizer=self.optimizer,
                     param_names=self.param_names, lr_scheduler=self.lr_scheduler, scaler=self.scaler)
        self.start_step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._say_device_change(state)
        if state.get("dataset_size") != len(self.dataset) or state.get("steps_per_epoch") != self.steps_per_epoch:
            events.log("warning", "the data set or batch settings changed since the checkpoint; "
                                  "data order after resume will differ from the original run")
        now, then = spec.to_json_dict(), state.get("spec", {})
        changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k) and k != "resumeFromCheckpoint")
        if changed:
            events.log("warning", f"spec differs from the checkpoint's in: {', '.join(changed)}")
        events.log("info", f"resumed from {self.resume_path} at step {self.start_step}")

    def _say_device_change(self, state) -> None:
        """A checkpoint trained on another number of devices: what the resume continues and what not (the rule is
        in engine/README.md). Optimizer steps, the LR schedule and AdamW's moments always carry over."""
        then_devices, then_effective = int(state.get("num_devices", 1)), state.get("effective_batch")
        then_batch = state.get("global_batch")
        if then_devices == self.dist.world and then_effective in (None, self.effective_batch):
            return
        was = f"checkpoint trained on {then_devices} device{'s' if then_devices > 1 else ''}, this run has {self.dist.world}"
        if then_effective == self.effective_batch and then_batch == self.batch:
            self.events.log("info", f"{was}: same effective batch ({self.effective_batch}) and the same samples and "
                                    "noise each step; the run continues as the uninterrupted one would (up to float "
                                    "rounding)")
        elif then_effective == self.effective_batch:
            self.events.log("warning", f"{was}: same effective batch ({self.effective_batch}), so steps, schedule and "
                                       f"optimizer state continue unchanged, but the micro-batches are cut differently "
                                       f"({self.batch} per pass, was {then_batch}): the data order and noise after the "
                                       "resume differ from the original run's")
        else:
            self.events.log("warning", f"{was}: the effective batch changes from {then_effective} to "
                                       f"{self.effective_batch} images per optimizer step; steps, learning-rate schedule "
                                       "and AdamW state continue as they are (counted in optimizer steps), each "
                                       "remaining step averages over the new batch, and the data order after the "
                                       "resume differs from the original run's")

    def _describe_files(self, data_sha: dict[str, str]) -> None:
        """What every LoRA file carries besides the tensors: peft's adapter config and the provenance."""
        spec, c = self.spec, self.c

        # peft's LoraConfig as safetensors metadata: diffusers' loader rebuilds the config from it, so
        # lora_alpha != rank loads at the trained scale. Sets become sorted lists (stable file bytes).
        def config_dict(model):
            return {k: sorted(v) if isinstance(v, (set, frozenset)) else v
                    for k, v in model.peft_config["default"].to_dict().items()}

        self.adapter_configs = {"unet": config_dict(c.unet),
                                **{name: config_dict(te) for name, te in self.trained_text_encoders}}
        self.provenance_base = {
            "base_model": spec.base_model, "arch": c.arch, "rank": spec.rank, "alpha": spec.effective_lora_alpha,
            "unet_targets": spec.unet_targets,
            "text_encoder_targets": list(TEXT_ENCODER_TARGETS) if spec.train_text_encoder else [],
            "resolution": spec.resolution, "dataset_size": len(self.dataset), **data_sha,
            "spec": spec.to_json_dict()}

    def _report_data(self) -> None:
        """The data set report event: images used and skipped (with reasons), sizes, buckets, caches. Without a
        dataset (nothing usable) only what was found and skipped."""
        from .contract import job_pb2

        spec, ds = self.spec, self.dataset
        sizes = ds.sizes if ds is not None else []
        common, other = size_histogram(sizes)
        report = job_pb2.DatasetReport(
            images_found=self.images_found, images_used=len(ds) if ds is not None else 0,
            skipped=[job_pb2.SkippedImage(name=s.name, reason=SKIP_REASONS[s.reason], detail=s.detail[:500])
                     for s in self.skipped[:200]],
            skipped_total=len(self.skipped), caption_source=CAPTION_SOURCES[self.caption_source],
            sizes=[job_pb2.ImageSizeCount(width=w, height=h, images=n) for (w, h), n in common], other_sizes=other)
        if ds is not None:
            batch = self.batch
            for b, members in ds.members.items():
                w, h = ds.buckets[b] if ds.buckets else (spec.resolution, spec.resolution)
                report.buckets.add(width=w, height=h, images=len(members), batches=-(-len(members) // batch))
            report.latents_cached = sum(self.latent_cacheable) if self.latent_cache is not None else 0
            report.latents_cached_flipped = bool(report.latents_cached and spec.random_flip)
            report.text_embeddings_cached = self.text_cache is not None
        self.events.dataset_report(report)

    # ------------------------------------------------------------------------------------------ helpers
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def _set_up_caches(self) -> None:
        """Decide what the frozen encoders' outputs may be cached for, and say so in the log. The caches fill on
        first use (micro_batch), so the first step costs what an uncached one does and no image or caption is
        encoded twice: text embeddings of each caption (and of "" under caption dropout) while the text encoder
        is frozen; VAE latent moments of each image in each orientation it is shown in, where its crop window is
        the same every epoch (centre crop, or a random crop of an image already at the training size)."""
        spec, ds = self.spec, self.dataset
        said = []
        if spec.train_text_encoder:
            said.append("text embeddings not cached (the text encoder is trained)")
        elif spec.shuffle_tags:
            # Every epoch's tag order is a new caption: a cache would grow with the run and rarely hit.
            said.append("text embeddings not cached (shuffle_tags makes new captions every epoch)")
        else:
            self.text_cache = {}
            said.append("text embeddings cached on first use (text encoder frozen)")
        def whole(i: int) -> bool:  # the image, resized, is exactly its training size: any crop is all of it
            target = ds.target(i)
            return resized_size(ds.sizes[i], target) == ((target, target) if isinstance(target, int) else target)

        self.latent_cacheable = [spec.center_crop or whole(i) for i in range(len(ds))]
        n, total = sum(self.latent_cacheable), len(ds)
        flips = ", both orientations" if spec.random_flip else ""
        if spec.center_crop:
            why = "centre crop: the same window every epoch"
        elif n == total:
            why = "every image is already at the training size: its random crop is the whole image"
        else:
            why = (f"random crop: {total - n} images are larger than their training size and are encoded every "
                   f"step; {n} already at the training size are cached")
        if n:
            self.latent_cache = {}
            said.append(f"VAE latents cached on first use for {n} of {total} images{flips} ({why})")
        else:
            said.append("VAE latents not cached (random crop: every image is larger than the training size)")
        self.events.log("info", "; ".join(said))

    def _pixels(self, epoch: int, i: int, aug) -> tuple[np.ndarray, bool]:
        """Image i's sample, and whether it is a stand-in. Every image decoded at the start; one that no longer does
        (its file changed since) does not end the run: the next image of its bucket that decodes stands in for
        it (cut as that image is this epoch), with a warning the first time."""
        ds = self.dataset
        try:
            return ds.pixels(i, aug), False
        except ImageError as e:
            self._went_bad(i, e)
        members = ds.members[ds.bucket_of[i]]
        at = members.index(i)
        for k in members[at + 1:] + members[:at]:
            if k not in self.bad_images:
                try:
                    return ds.pixels(k, ds.augment(epoch, k)), True
                except ImageError as e:
                    self._went_bad(k, e)
        raise DataError(f"every image of the training size {ds.target(i)} stopped decoding during the run")

    def _went_bad(self, i: int, e: ImageError) -> None:
        if i not in self.bad_images:
            self.bad_images.add(i)
            ex = self.dataset.examples[i]
            self.events.log("warning", f"image {ex.path.name if ex.path else ex.name} no longer decodes ({e.reason}: "
                                       f"{e.detail}); another image of its size stands in for it from now on")

    def _latent_moments(self, ids: list[int], augs: list, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE latent distribution's mean and std of each sample. Cacheable samples come from the cache, or are
        encoded each on its own and cached: a VAE call's kernels round differently at other batch sizes, and a
        cached value must not depend on which batch drew it first (a resumed run rebuilds the cache in other
        batches). The rest are encoded together now, as every step does."""
        cache, ds = self.latent_cache, self.dataset
        keys = [(i, a.flip) if cache is not None and self.latent_cacheable[i] else None for i, a in zip(ids, augs)]
        got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, key in enumerate(keys):
            if key is not None:
                if key not in cache:
                    pixels, stand_in = self._pixels(epoch, ids[j], augs[j])
                    mean, std = self._vae_moments(pixels[None])
                    if stand_in:  # not this image's latents: used this once, never cached under its key
                        got[j] = (mean[0], std[0])
                        continue
                    cache[key] = (mean[0], std[0])
                got[j] = cache[key]
        todo = [j for j, key in enumerate(keys) if key is None]
        if todo:
            mean, std = self._vae_moments(np.stack([self._pixels(epoch, ids[j], augs[j])[0] for j in todo]))
            got.update({j: (mean[n], std[n]) for n, j in enumerate(todo)})
        return torch.stack([got[j][0] for j in range(len(ids))]), torch.stack([got[j][1] for j in range(len(ids))])

    def _text_embeddings(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder hidden states (and SDXL's pooled embedding) of `captions`: each caption not yet in the
        text cache is encoded on its own (its value independent of the batch that drew it first) and kept."""
        c, cache = self.c, self.text_cache
        for cap in dict.fromkeys(captions):
            if cap not in cache:
                with torch.no_grad(), self.autocast():
                    hidden, pooled = encode_text(c, tokenize(c, [cap]))
                cache[cap] = (hidden[0], None if pooled is None else pooled[0])
        hidden = torch.stack([cache[cap][0] for cap in captions])
        pooled = torch.stack([cache[cap][1] for cap in captions]) if c.arch == "sdxl" else None
        return hidden, pooled

    def _vae_moments(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self.autocast():
            x = torch.from_numpy(pixels).to(self.device, dtype=self.weight_dtype)
            dist = self.c.vae.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist
        return dist.mean.contiguous(), dist.std.contiguous()

    def micro_batch(self, epoch: int, b: int, micro_index: int) -> MicroBatch:
        """The b-th batch of `epoch`, encoded: from the caches where they exist, else through the VAE and the
        text encoder(s) now. The VAE sample uses a per-batch generator either way."""
        ds, c = self.dataset, self.c
        ids = ds.batch_ids(epoch, b, self.batch)
        total, shard = len(ids), self.dist.shard(len(ids))  # data parallel: this rank's rows of the batch
        ids = ids[shard]
        if not ids:
            return None  # a short last batch left this rank nothing
        augs = [ds.augment(epoch, i) for i in ids]
        captions = [ds.caption(epoch, i) for i in ids]
        mean, std = self._latent_moments(ids, augs, epoch)
        latents = self.sample_latents(mean, std, micro_index, 1, shard, total)
        if self.text_cache is not None:
            hidden, pooled = self._text_embeddings(captions)
        else:
            # Gradients flow into the text encoders only when they carry LoRA.
            with (nullcontext() if self.trained_text_encoders else torch.no_grad()), self.autocast():
                hidden, pooled = encode_text(c, tokenize(c, captions))
        add_time_ids = None
        if c.arch == "sdxl":
            rows = []
            for i, a in zip(ids, augs):
                w, h = ds.sizes[i]
                tw, th = a.crop or (self.spec.resolution, self.spec.resolution)
                # The crop's top-left corner as seen in the (possibly flipped) training image; the target size
                # is what the sample really is (its bucket's size).
                left = a.resized[0] - tw - a.left if a.flip else a.left
                rows.append(time_ids((h, w), (a.top, left), (th, tw)))
            add_time_ids = torch.tensor(rows, dtype=torch.float32, device=self.device)
        return MicroBatch(latents, hidden, pooled, add_time_ids, captions, shard, total if self.dist.world > 1 else None)

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, micro_index: int, stream: int,
                       rows: slice = slice(None), total: int | None = None) -> torch.Tensor:
        """Scaled latents drawn from the VAE's distribution with a per-batch generator (`stream` tells purposes
        apart). Data parallel: drawn for the whole global batch (`total` rows), this rank's `rows` kept."""
        vae = self.c.vae
        gen = torch.Generator().manual_seed(derived_seed(self.seed, micro_index, stream))
        sample = torch.randn((total or mean.shape[0], *mean.shape[1:]), generator=gen, dtype=torch.float32)[rows]
        sample = sample.to(self.device, mean.dtype)
        # Noise arithmetic in fp32 whatever the VAE ran in; the UNet's autocast picks its own dtype.
        latents = (mean + std * sample).float()
        if vae.config.get("shift_factor") is not None:
            latents = latents - vae.config.shift_factor
        return latents * vae.config.scaling_factor

    def noise_and_timesteps(self, latents: torch.Tensor, micro_index: int, rows: slice = slice(None),
                            total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn on the CPU from per-batch generators: identical on any device and reproducible after a resume.
        # Data parallel: drawn for the whole global batch (`total` rows), this rank's `rows` kept.
        n = total or latents.shape[0]
        gen = torch.Generator().manual_seed(derived_seed(self.seed, micro_index, 2))
        noise = torch.randn((n, *latents.shape[1:]), generator=gen, dtype=torch.float32)
        timesteps = torch.randint(0, self.c.noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
        if self.spec.noise_offset:
            # Offset noise (Guttenberg 2023): a per-sample, per-channel constant shifts mean brightness.
            gen = torch.Generator().manual_seed(derived_seed(self.seed, micro_index, 3))
            offset = torch.randn((n, latents.shape[1], 1, 1), generator=gen, dtype=torch.float32)
            noise = noise + self.spec.noise_offset * offset
        return noise[rows].to(self.device, latents.dtype), timesteps[rows].to(self.device)

    def loss(self, mb: MicroBatch, micro_index: int) -> torch.Tensor:
        """The diffusion loss of one micro-batch (with Min-SNR weighting when snr_gamma is set)."""
        return self.reduce_loss(*self.predict(mb, micro_index), mb.total)

    def predict(self, mb: MicroBatch, micro_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet's prediction for one micro-batch, noised with its noise and timesteps: (prediction, target,
        timesteps)."""
        sched = self.c.noise_scheduler
        noise, timesteps = self.noise_and_timesteps(mb.latents, micro_index, mb.rows, mb.total)
        noisy = sched.add_noise(mb.latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else sched.get_velocity(mb.latents, noise, timesteps)
        extra = {}
        if mb.add_time_ids is not None:
            extra["added_cond_kwargs"] = {"text_embeds": mb.pooled, "time_ids": mb.add_time_ids}
        with self.autocast():
            pred = self.c.unet(noisy.contiguous(memory_format=torch.channels_last), timesteps, mb.hidden,
                               return_dict=False, **extra)[0]
        return pred, target, timesteps

    def reduce_loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    total: int | None = None) -> torch.Tensor:
        """MSE of a prediction, or its Min-SNR weighted mean over samples when snr_gamma is set. Data parallel
        (`total`: the global batch's size): this rank's share of the global batch's mean."""
        sched = self.c.noise_scheduler
        if self.spec.snr_gamma is None and total is None:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.spec.snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(sched.alphas_cumprod, timesteps, self.spec.snr_gamma,
                                                      self.prediction_type)
        # Data parallel: this rank's share of the global batch's mean; the ranks' gradients add up to its gradient.
        return per_sample.mean() if total is None else per_sample.sum() / total

    # ------------------------------------------------------------------------------------------ files
    def _peft_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        from peft.utils import get_peft_model_state_dict

        return {"unet": get_peft_model_state_dict(self.c.unet),
                **{name: get_peft_model_state_dict(te, save_embedding_layers=False)
                    for name, te in self.trained_text_encoders}}

    def save_lora(self, folder: Path, step: int, kohya: bool = False) -> Path:
        from diffusers.utils import convert_state_dict_to_diffusers

        folder.mkdir(parents=True, exist_ok=True)
        hurry_fingerprints()  # needed now: the base model's hash leaves idle priority
        meta = lora_files.provenance(steps=step, **self.provenance_base, **self.fingerprints.result())
        parts = self._peft_parts()
        path = lora_files.save_diffusers(folder / ckpt.LORA_FILE,
                                         {k: lora_files.diffusers_keys(v, convert_state_dict_to_diffusers)
                                          for k, v in parts.items()},
                                         self.adapter_configs, meta)
        if kohya:
            path = lora_files.save_kohya(folder / KOHYA_FILE, self.c.arch, parts, self.spec.effective_lora_alpha,
                                         {**meta, "loraforge.format": "kohya"}, self.layers_per_block)
        return path

    def save_checkpoint(self, step: int) -> None:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        folder = ckpt.save(self.out, step, write_lora=lambda f: self.save_lora(f, step), params=self.named_params,
                           optimizer=self.optimizer, param_names=self.param_names, lr_scheduler=self.lr_scheduler,
                           scaler=self.scaler, info={
                               "seed": self.seed, "epoch": epoch, "step_in_epoch": step_in_epoch,
                               "steps_per_epoch": self.steps_per_epoch, "dataset_size": len(self.dataset),
                               "total_steps": self.total_steps, "skipped_steps": self.skipped_steps,
                               "num_devices": self.dist.world, "effective_batch": self.effective_batch,
                               "global_batch": self.batch,
                               "spec": self.spec.to_json_dict()})
        self.events.checkpoint(step, folder, root=self.out)
        if self.spec.checkpoints_total_limit:
            for old in ckpt.rotate(self.out, self.spec.checkpoints_total_limit):
                self.events.log("info", f"removed {old.name} (checkpoints_total_limit {self.spec.checkpoints_total_limit})")

    def pipeline(self, scheduler=None):
        """A diffusers text-to-image pipeline on the live modules (LoRA active once added), with `scheduler`, else
        a fresh DDPM scheduler of the training configuration (the pipeline mutates its scheduler's state)."""
        from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        c = self.c
        scheduler = scheduler or DDPMScheduler.from_config(c.noise_scheduler.config)
        if c.arch == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0],
                                             text_encoder_2=c.text_encoders[1], tokenizer=c.tokenizers[0],
                                             tokenizer_2=c.tokenizers[1], unet=c.unet, scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                           unet=c.unet, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self, step: int) -> None:
        """Render each validation prompt with the live modules (LoRA active) and report the images."""
        c = self.c
        pipe = self.pipeline()
        folder = self.out / "validation"
        folder.mkdir(exist_ok=True)
        training = [(m, m.training) for m in (c.unet, *(te for _, te in self.trained_text_encoders))]
        for m, _ in training:
            m.eval()  # no LoRA dropout while rendering
        try:
            for k, prompt in enumerate(self.spec.all_validation_prompts):
                generator = torch.Generator(device="cpu").manual_seed(self.seed)
                paths = []
                with torch.no_grad(), self.autocast():
                    for i in range(self.spec.num_validation_images):
                        image = pipe(prompt, num_inference_steps=self.spec.validation_inference_steps,
                                     generator=generator, height=self.spec.resolution,
                                     width=self.spec.resolution).images[0]
                        path = folder / (f"step-{step}-{i}.png" if k == 0 else f"step-{step}-p{k}-{i}.png")
                        image.save(path)
                        paths.append(path)
                self.events.validation(step, prompt, paths, root=self.out)
        finally:
            for m, was_training in training:
                m.train(was_training)
        del pipe

    def optimizer_step(self, step: int) -> StepResult:
        """Optimizer step number `step` (0-based): its micro-batches forward and backward, gradient clipping,
        the update (through the gradient scaler under fp16), the LR schedule. Which batches, and all randomness,
        follow from `step` alone; train() runs these in order, benchmarks call it directly."""
        spec = self.spec
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        first = step_in_epoch * spec.gradient_accumulation_steps
        batch_ids = range(first, min(first + spec.gradient_accumulation_steps, self.batches_per_epoch))
        loss_sum, images = 0.0, 0
        for b in batch_ids:
            micro_index = epoch * self.batches_per_epoch + b  # global batch number: the key of its randomness
            mb = self.micro_batch(epoch, b, micro_index)
            if mb is None:
                continue  # data parallel: nothing of this batch for this rank (it adds zero gradients)
            # With prior preservation: + prior_loss_weight x the loss of as many class images (dreambooth.py).
            loss = self.prior.loss(self, mb, epoch, b, micro_index) if self.prior else self.loss(mb, micro_index)
            scaled = loss / len(batch_ids)  # mean over the accumulated batches
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.item()
            images += len(mb.captions)
        # Data parallel: the ranks' gradients (and losses, images) summed, so every rank takes the same step.
        loss_sum, images = self.dist.sum_gradients(self.lora_params, loss_sum, images)
        images = round(images)

        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, spec.max_grad_norm)
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        skipped = False
        if self.scaler:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped by the scaler if the gradients overflowed
            self.scaler.update()
            # The scaler lowers its scale exactly when it found inf/NaN gradients and skipped the step.
            skipped = self.scaler.get_scale() < scale_before
        else:
            self.optimizer.step()
        if skipped:
            self.skipped_steps += 1  # as accelerate does, the LR schedule does not advance either
        else:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum / len(batch_ids), images, float(grad_norm), learning_rate, skipped)

    def _share_cores(self) -> None:
        """On a CPU: run the next steps on as many threads as other work leaves cores free (cpu_threads)."""
        threads = self.cores.look() if self.cores is not None else None
        if threads is not None:
            torch.set_num_threads(threads)
            self.events.log("info", f"training on {threads} CPU thread{'s' if threads > 1 else ''}: other work on "
                                    f"this machine leaves {threads} of {len(self.cores.cpus)} cores free")

    # ------------------------------------------------------------------------------------------ train
    def train(self, stop: StopFlag) -> tuple[Path, int]:
        spec, events = self.spec, self.events
        accum = spec.gradient_accumulation_steps
        events.log("info", f"{self.total_steps} optimizer steps, {self.steps_per_epoch} per epoch; effective batch "
                           f"{self.effective_batch} = batch {spec.train_batch_size} x {self.dist.world} "
                           f"device{'s' if self.dist.world > 1 else ''} x {accum} accumulation; seed {self.seed}")
        step = self.start_step
        recent: deque[tuple[float, int]] = deque(maxlen=20)  # (seconds, images) of recent steps
        stopping = False
        while step < self.total_steps:
            if self.dist.any(stop.is_set()):  # data parallel: every rank stops after the same step
                stopping = True
                break
            self._share_cores()
            t0 = time.perf_counter()
            epoch = step // self.steps_per_epoch
            r = self.optimizer_step(step)
            step += 1
            recent.append((time.perf_counter() - t0, r.images))
            seconds = sum(s for s, _ in recent)
            events.metrics(step=step, total_steps=self.total_steps, epoch=epoch, loss=r.loss,
                           learning_rate=r.learning_rate, images_per_second=sum(i for _, i in recent) / seconds,
                           eta_seconds=(self.total_steps - step) * seconds / len(recent), grad_norm=r.grad_norm,
                           peak_memory_bytes=(torch.cuda.max_memory_allocated(self.device)
                                              if self.device.type == "cuda" else 0),
                           skipped_steps=self.skipped_steps)

            if self.dist.is_main and spec.all_validation_prompts and step < self.total_steps and (
                    (spec.validation_steps > 0 and step % spec.validation_steps == 0)
                    or (spec.validation_epochs > 0 and step % self.steps_per_epoch == 0
                        and (step // self.steps_per_epoch) % spec.validation_epochs == 0)):
                self.validate(step)
            if step % spec.checkpointing_steps == 0 and self.dist.is_main:
                self.save_checkpoint(step)

        if stopping:
            if self.dist.is_main and not (ckpt.checkpoints_dir(self.out) / f"checkpoint-{step}" / ckpt.STATE_JSON).is_file():
                self.save_checkpoint(step)
            events.log("info", f"stopped at step {step}")
            raise Stopped(step)
        if not self.dist.is_main:  # rank 0 writes the LoRA
            return self.out / ckpt.LORA_FILE, step

        # ---------------------------------------------------------------------------------- save, clean up
        tmp = self.out / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        kohya = spec.lora_format == "kohya"
        self.save_lora(tmp, step, kohya=kohya)
        final = self.out / ckpt.LORA_FILE
        os.replace(tmp / ckpt.LORA_FILE, final)
        if kohya:
            final = self.out / KOHYA_FILE
            os.replace(tmp / KOHYA_FILE, final)
        shutil.rmtree(tmp, ignore_errors=True)

        if spec.all_validation_prompts:
            self.validate(step)
        return final, step


def run(spec: TrainingSpec, output_dir: str, events: EventWriter, stop: StopFlag,
        resume_from: str | None = None) -> tuple[Path, int]:
    """Train; return the final LoRA file and the step it was taken after.
    Raises SpecError (a spec the model or device cannot honour), DataError (bad inputs), Stopped (after a
    stop request was honoured), or anything else."""
    trainer = Trainer(spec, output_dir, events, resume_from=resume_from)
    try:
        return trainer.train(stop)
    finally:
        # Data parallel: the group ends here however training ended; one left to the interpreter's exit can abort
        # the process (its threads still joinable when destroyed: "terminate called without an active exception").
        trainer.dist.close()
