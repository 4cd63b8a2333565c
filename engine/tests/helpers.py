"""Shared test helpers (no mocks: everything runs the real engine and real diffusers code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ENGINE_DIR = Path(__file__).resolve().parents[1]
# diffusers' own script, the benchmarks' baseline: in shared/ beside the repository, as CI lays it out.
REFERENCE_SCRIPT = ENGINE_DIR.parents[1] / "shared" / "reference" / "diffusers" / "train_text_to_image_lora.py"
needs_reference = pytest.mark.skipif(not REFERENCE_SCRIPT.is_file(), reason=f"no {REFERENCE_SCRIPT}")
PROMPT = "a red circle on a blue background"


def engine_env(share_cores: bool = False) -> dict[str, str]:
    """The engine's environment in tests. The thread count is fixed (conftest) so that results compare
    bit for bit whatever else the machine runs; share_cores=True lets the engine follow the free cores."""
    env = dict(os.environ)
    if share_cores:
        env.pop("LORAFORGE_CPU_THREADS", None)
    env["PYTHONPATH"] = str(ENGINE_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def engine_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraforge_engine", *args]


def run_train(spec: dict, output_dir: Path, *extra: str, timeout: float = 300,
              share_cores: bool = False) -> tuple[int, list[dict], str]:
    """Run `train` as a subprocess; return (exit code, parsed events, stderr)."""
    spec_path = output_dir.parent / f"{output_dir.name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(engine_cmd("train", "--spec", str(spec_path), "--output-dir", str(output_dir), *extra),
                          capture_output=True, text=True, env=engine_env(share_cores), timeout=timeout)
    return proc.returncode, parse_events(proc.stdout), proc.stderr


def artifacts_of(ev) -> list:
    """The Artifact messages a JobEvent carries."""
    kind = ev.WhichOneof("payload")
    if kind == "checkpoint":
        return [ev.checkpoint.artifact]
    if kind == "validation":
        return list(ev.validation.images)
    if kind == "state" and ev.state.HasField("lora"):
        return [ev.state.lora]
    return []


def parse_events(stdout: str) -> list:
    """Every stdout line read by json_format as a loraforge.v1.JobEvent (unknown fields refused): the stream is
    the contract's. Each event has a time and one payload, no job id or sequence (the worker adds those), and
    names its artifacts relative to the output folder."""
    from loraforge_engine.contract import job_pb2, json_format

    events = []
    for line in stdout.splitlines():
        raw = json.loads(line)  # one compact JSON object per line
        assert "jobId" not in raw and "sequence" not in raw, line
        ev = json_format.Parse(line, job_pb2.JobEvent())
        assert ev.HasField("time") and ev.WhichOneof("payload") is not None, line
        for art in artifacts_of(ev):
            name = art.name
            assert name and not name.startswith("/") and "\\" not in name and ".." not in name.split("/"), line
        events.append(ev)
    return events


def of_kind(events: list, kind: str) -> list:
    """The payloads of one kind ("metrics", "checkpoint", "validation", "log", "state"), in order."""
    return [getattr(e, kind) for e in events if e.WhichOneof("payload") == kind]


def load_pipeline(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(1234)
    return pipe(PROMPT, num_inference_steps=4, generator=generator, output_type="np", **kwargs).images


def evaluation_loss(pipe, dataset_dir: Path, resolution: int = 64) -> float:
    """Diffusion loss of `pipe.unet` on a FIXED batch: every data set image (centre crop), fixed VAE
    sample, noise and timesteps (4 per image, spread over the schedule). Same function before/after."""
    from loraforge_engine.data import discover, open_rgb, transform

    examples = discover(dataset_dir)
    rng = np.random.default_rng(0)
    pixels = np.stack([transform(open_rgb(e.path), resolution, True, False, rng) for e in examples])
    captions = [e.caption for e in examples]
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        ids = pipe.tokenizer(captions, max_length=pipe.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
        latents = pipe.vae.encode(torch.from_numpy(pixels)).latent_dist.sample(generator=g)
        latents = latents * pipe.vae.config.scaling_factor
        total = 0.0
        n_t = 4
        for k in range(n_t):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.full((latents.shape[0],), int((k + 0.5) * 1000 / n_t), dtype=torch.long)
            noisy = pipe.scheduler.add_noise(latents, noise, t)  # the model folder's DDPMScheduler
            pred = pipe.unet(noisy, t, text).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / n_t
