"""Training throughput: the engine's default path against a reference-equivalent path, in one process and one
run, on the same tiny model, data and batch.

    PYTHONPATH=engine engine/.venv/bin/python bench/train_throughput/run.py [--steps 40] [--batch 4]
        [--resolution 64] [--threads 0] [--rounds 3] [--compile] [--phases] [--work DIR]

reference: what diffusers' train_text_to_image_lora.py does per step — load and transform the batch's images
  (resize, centre crop, random flip, normalise) and tokenize its captions, encode the images with the VAE and
  the captions with the text encoder, UNet forward + backward through peft's LoRA, gradient clipping to norm 1,
  torch's default AdamW (the for-loop implementation on CPU), LR scheduler step.
engine: loraforge_engine.train.Trainer with the spec's defaults (latents and text embeddings cached once per
  run, channels_last, fused AdamW, real gradient clipping, and on a CPU the small-layer kernels of
  loraforge_engine.small_ops), driven through its own training loop.

Both train the same LoRA (rank 4, to_q/to_k/to_v/to_out.0) with the same hyper-parameters. Printed per path:
images/s over the steps after the first `--warmup`, time to first step (from the start of model loading to the
end of the first optimizer step, caches included), peak memory (CUDA: peak allocated, during the timed rounds;
CPU: heap bytes in use (glibc mallinfo2) above the level before the path started, sampled every 2 ms in one
extra untimed run of each path, since the sampling thread would slow the timed steps), and the ratio of the
best rounds and of the median rounds. `--phases` also prints where each path's step goes: the reference's
REFERENCE_PHASES, the engine's ENGINE_PHASES (median milliseconds per step). The last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine"))

from loraforge_engine.openmp import set_wait_policy  # noqa: E402

set_wait_policy()  # as the engine runs, before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

RANK, LR = 4, 1e-4


class PeakMemory:
    """Peak memory while a block runs: CUDA peak allocated, or CPU resident set size above the start level."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        """Bytes the process holds from malloc now (glibc mallinfo2: arena + mmapped blocks in use); torch's
        CPU tensors come straight from malloc. Falls back to the resident set size."""
        try:
            import ctypes

            class MallInfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                           "usmblks", "fsmblks", "uordblks", "fordblks",
                                                           "keepcost")]

            libc = ctypes.CDLL(None)
            libc.mallinfo2.restype = MallInfo2
            info = libc.mallinfo2()
            return int(info.uordblks + info.hblkhd)
        except (OSError, AttributeError):
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        # Objects of the previous run that only the cycle collector frees would otherwise go while this one runs,
        # lowering the level under its base.
        gc.collect()
        self.base = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss() - self.base)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# Where each path's step goes, printed with --phases. The reference's phases end at perf_counter marks in its
# loop (CUDA: after a synchronize, so they add a few syncs per step there); the engine's are timed around the
# Trainer's own calls, its backward being what the rest leaves.
REFERENCE_PHASES = ("load + transform images, tokenize", "VAE encode", "noise + text encode",
                    "UNet forward + loss", "backward", "clip + AdamW + schedule")
ENGINE_PHASES = ("batch from the caches", "UNet forward + loss", "backward (and the rest)", "clip", "AdamW")


def end_of_phase(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def phase_medians(names: tuple[str, ...], marks: list[list[float]]) -> dict[str, float]:
    """Median milliseconds of each phase, from per-step time marks (the step's start, then each phase's end)."""
    spans = np.diff(np.array(marks), axis=1) * 1e3
    return {name: float(np.median(spans[:, i])) for i, name in enumerate(names)}


def reference_path(model: str, data: str, steps: int, batch: int, resolution: int, warmup: int,
                   device: torch.device, precision: str = "no", phases: bool = False) -> dict:
    """The reference script's per-step work, written out (no caching, default AdamW). `precision` fp16/bf16
    (CUDA): frozen weights in that dtype, LoRA fp32, autocast, and a GradScaler for fp16, as accelerate does.
    `phases`: also time REFERENCE_PHASES (on CUDA that adds synchronizations)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    t_start = time.perf_counter()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    common = {"local_files_only": True, "use_safetensors": True}
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **common).to(device, dt)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **common).to(device, dt)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **common).to(device, dt)
    autocast = (lambda: torch.autocast(device.type, dtype=dt)) if dt != torch.float32 else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", local_files_only=True)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    rows = [json.loads(x) for x in (Path(data) / "metadata.jsonl").read_text().splitlines() if x.strip()]
    rng = np.random.default_rng(0)

    def preprocess(row) -> tuple[torch.Tensor, torch.Tensor]:
        # transforms.Resize(res, LANCZOS), CenterCrop(res), RandomHorizontalFlip(), ToTensor(), Normalize([.5], [.5])
        img = Image.open(Path(data) / row["file_name"]).convert("RGB")
        w, h = img.size
        s = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.LANCZOS)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        px = torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        ids = tokenizer(row["text"], max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids[0]
        return (px - 0.5) / 0.5, ids

    unet.train()
    times, first = [], None
    marks: list[list[float]] = []  # per step: the end of each of REFERENCE_PHASES
    phase_end = (lambda: end_of_phase(device)) if phases else time.perf_counter
    order: list[int] = []
    for step in range(steps):
        t0 = time.perf_counter()
        if len(order) < batch:
            order += list(rng.permutation(len(rows)))
        picked, order = order[:batch], order[batch:]
        items = [preprocess(rows[i]) for i in picked]
        pixel_values = torch.stack([x for x, _ in items]).to(device, dt)
        input_ids = torch.stack([y for _, y in items]).to(device)
        mark = [phase_end()]
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        mark.append(phase_end())
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        mark.append(phase_end())
        with autocast():
            pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
        mark.append(phase_end())
        # The recipe's max_grad_norm 1, clipped for real as the engine does. (The reference script calls
        # accelerator.clip_grad_norm_ on an iterator its optimizer already consumed, so there it clips nothing;
        # this path does the work it intends, so that both paths train alike.)
        if scaler:
            scaler.scale(loss).backward()
            mark.append(phase_end())
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            mark.append(phase_end())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        loss.item()
        sync(device)
        now = time.perf_counter()
        if first is None:
            first = now - t_start
        times.append(now - t0)
        marks.append([t0, *mark, now])
    measured = times[warmup:]
    result = {"images_per_s": batch * len(measured) / sum(measured), "first_step_s": first}
    if phases:
        result["phases_ms"] = phase_medians(REFERENCE_PHASES, marks[warmup:])
    return result


def engine_trainer(model: str, data: str, steps: int, batch: int, resolution: int, work: Path, extra: dict):
    """The engine's Trainer for this bench's spec (the spec's defaults otherwise), events to a string."""
    from loraforge_engine.config import parse_spec
    from loraforge_engine.events import EventWriter
    from loraforge_engine.train import Trainer

    spec = parse_spec({"baseModel": model, "datasetDir": data, "resolution": resolution, "trainBatchSize": batch,
                       "maxTrainSteps": steps, "learningRate": LR, "rank": RANK, "centerCrop": True,
                       "randomFlip": True, "checkpointingSteps": 10_000_000, "seed": 0, "lrWarmupSteps": 0,
                       **extra})
    return Trainer(spec, str(work / f"engine-out-{os.getpid()}"), EventWriter(io.StringIO()))


def timed_engine_step(trainer, i: int) -> float:
    """Seconds for the trainer's optimizer step number i (Trainer.optimizer_step: the step its own loop runs,
    without the loop's events, checkpoints and validation): what other benchmarks time while they change one
    thing between steps."""
    t0 = time.perf_counter()
    trainer.optimizer_step(i)
    sync(trainer.device)
    return time.perf_counter() - t0


def tiny_model(work: Path) -> Path:
    """The tiny SD-1.x model under `work`, made on first use."""
    from loraforge_engine.tiny import make_tiny_model

    model = work / "tiny-sd"
    if not (model / "model_index.json").is_file():
        make_tiny_model(model, seed=0)
    return model


def tiny_model_and_data(work: Path, resolution: int = 64) -> tuple[Path, Path]:
    """The tiny SD-1.x model and the 16-image synthetic set under `work`, made on first use."""
    from loraforge_engine.tiny import make_dataset

    data = work / "data"
    if not (data / "metadata.jsonl").is_file():
        make_dataset(data, count=16, size=resolution, seed=0)
    return tiny_model(work), data


def engine_path(model: str, data: str, steps: int, batch: int, resolution: int, warmup: int, work: Path,
                extra: dict, phases: bool = False) -> dict:
    """The engine's own training loop, timed at its step ends. `phases`: also time ENGINE_PHASES."""
    t_start = time.perf_counter()
    trainer = engine_trainer(model, data, steps, batch, resolution, work, extra)
    times: list[float] = []
    first = [None]
    orig_metrics = trainer.events.metrics
    batch_, forward, _, clip, adamw = ENGINE_PHASES  # the backward is what the others leave
    spent = {batch_: 0.0, forward: 0.0, clip: 0.0, adamw: 0.0}  # the current step's timed phases
    marks: list[list[float]] = []  # per step: its start, then the end of each of ENGINE_PHASES

    def on_metrics(**m):  # one call per finished optimizer step
        sync(trainer.device)
        now = time.perf_counter()
        if first[0] is None:
            first[0] = now - t_start
        elif phases:  # as phase ends, in ENGINE_PHASES order, with the backward taking what the rest leaves
            start, rest = times[-1], now - times[-1] - sum(spent.values())
            ends = np.cumsum([spent[batch_], spent[forward], rest, spent[clip], spent[adamw]]) + start
            marks.append([start, *ends])
        times.append(now)
        spent.update(dict.fromkeys(spent, 0.0))
        orig_metrics(**m)

    def timed(name: str, fn):
        @functools.wraps(fn)  # keeps the marks torch's LR scheduler leaves on optimizer.step
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(trainer.device)
                spent[name] += time.perf_counter() - t0
        return call

    trainer.events.metrics = on_metrics
    clip_grad_norm = torch.nn.utils.clip_grad_norm_
    if phases:
        trainer.micro_batch = timed(batch_, trainer.micro_batch)
        trainer.loss = timed(forward, trainer.loss)
        trainer.optimizer.step = timed(adamw, trainer.optimizer.step)
        torch.nn.utils.clip_grad_norm_ = timed(clip, clip_grad_norm)  # train.py looks it up at every step
    try:
        trainer.train(threading.Event())
    finally:
        torch.nn.utils.clip_grad_norm_ = clip_grad_norm
    # Step durations from consecutive step ends (the first step's start is unknown here: drop it).
    durations = np.diff(times)[max(0, warmup - 1):]
    result = {"images_per_s": batch * len(durations) / float(np.sum(durations)), "first_step_s": first[0]}
    if phases:
        result["phases_ms"] = phase_medians(ENGINE_PHASES, marks[max(0, warmup - 1):])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate the paths this many times; each path's best round is reported")
    p.add_argument("--compile", action="store_true", help="also run the engine with torch_compile")
    p.add_argument("--phases", action="store_true",
                   help="also print where each path's step goes (median ms per phase)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraforge-bench-train"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work)
    model, data = tiny_model_and_data(work, a.resolution)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Import everything both paths use first, so neither pays for (or has its memory inflated by) imports.
    import diffusers.optimization  # noqa: F401
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import loraforge_engine.train  # noqa: F401
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}); tiny SD-1.x "
          f"model, {a.resolution} px, batch {a.batch}, {a.steps} steps ({a.warmup} warm-up)", flush=True)

    results = {}
    runs = [("reference", lambda: reference_path(str(model), str(data), a.steps, a.batch, a.resolution,
                                                  a.warmup, device, phases=a.phases)),
            ("engine", lambda: engine_path(str(model), str(data), a.steps, a.batch, a.resolution, a.warmup,
                                           work, {}, phases=a.phases))]
    if a.compile:
        runs.append(("engine+compile", lambda: engine_path(str(model), str(data), a.steps, a.batch, a.resolution,
                                                            a.warmup, work, {"torchCompile": True},
                                                            phases=a.phases)))
    # On a CPU the memory sampler (a Python thread waking every 2 ms) would slow the timed steps it watches,
    # so timed rounds run without it and each path runs once more, untimed, for its peak memory.
    separate_memory_pass = device.type != "cuda"
    for round_ in range(a.rounds + separate_memory_pass):
        memory_pass = separate_memory_pass and round_ == a.rounds
        for name, fn in runs:
            with (PeakMemory(device) if memory_pass or not separate_memory_pass else contextlib.nullcontext()) as mem:
                r = fn()
            best = results.get(name)
            if memory_pass:
                best["peak_memory_mb"] = mem.peak / 2**20
                print(f"memory pass {name:>15}: peak memory {best['peak_memory_mb']:7.1f} MiB", flush=True)
                continue
            peak = "" if separate_memory_pass else f"   peak memory {mem.peak / 2**20:7.1f} MiB"
            print(f"round {round_ + 1} {name:>15}: {r['images_per_s']:7.1f} images/s   first step "
                  f"{r['first_step_s']:6.2f} s{peak}", flush=True)
            results[name] = {
                "images_per_s": max(r["images_per_s"], best["images_per_s"]) if best else r["images_per_s"],
                "first_step_s": min(r["first_step_s"], best["first_step_s"]) if best else r["first_step_s"],
                "peak_memory_mb": 0.0 if separate_memory_pass else max(mem.peak / 2**20,
                                                                       best["peak_memory_mb"] if best else 0.0),
                "rounds_images_per_s": (best["rounds_images_per_s"] if best else []) + [r["images_per_s"]],
            }
            if a.phases:
                results[name]["rounds_phases_ms"] = (best["rounds_phases_ms"] if best else []) + [r["phases_ms"]]
    print("best of rounds (images/s: highest; first step: lowest; peak memory: "
          + ("the memory pass):" if separate_memory_pass else "highest):"))
    for name, r in results.items():
        print(f"{name:>15}: {r['images_per_s']:7.1f} images/s   first step {r['first_step_s']:6.2f} s   "
              f"peak memory {r['peak_memory_mb']:7.1f} MiB")
    ref = results["reference"]["images_per_s"]
    for name in results:
        if name != "reference":
            results[name]["ratio"] = results[name]["images_per_s"] / ref
            # Best rounds reward a lucky round; medians of rounds are steadier on a shared machine.
            results[name]["median_ratio"] = (float(np.median(results[name]["rounds_images_per_s"]))
                                             / float(np.median(results["reference"]["rounds_images_per_s"])))
            print(f"{name} / reference: {results[name]['ratio']:.2f}x images/s (best rounds), "
                  f"{results[name]['median_ratio']:.2f}x (median rounds)")
    if a.phases:
        print("where a step goes (ms; per phase, the median over rounds of its median step):")
        for name, r in results.items():
            rounds = r.pop("rounds_phases_ms")
            r["phases_ms"] = {k: float(np.median([x[k] for x in rounds])) for k in rounds[0]}
            print(f"{name:>15}: " + " | ".join(f"{k} {v:.2f}" for k, v in r["phases_ms"].items())
                  + f" | sum {sum(r['phases_ms'].values()):.2f}")
    print(json.dumps({"device": str(device), "batch": a.batch, "resolution": a.resolution, "steps": a.steps,
                      "threads": torch.get_num_threads(), **results}))


if __name__ == "__main__":
    main()
