"""Where a training step of the engine spends its time on a GPU: wall time per step against the GPU's busy time,
the operators that cost the most host (CPU) time, and the memory peaks of setup and of the steps.

    PYTHONPATH=engine python bench/gpu/profile_step.py [--precision bf16] [--batch 1] [--steps 8] [--work DIR]
        [--device cuda|cpu] [--tiny] [--layouts channels_last,contiguous] [--compile | --compile-mode MODE]

Model and data as bench/gpu/train_sd15.py makes them (SD-1.5 architecture, random weights, 512 px). In one
process and one Trainer (the engine's defaults), it times optimizer steps with the UNet in channels_last (the
engine's default) and in the plain (contiguous) layout, alternating the layout every step, then profiles a few
steps with torch.profiler; the last line is a JSON summary (per-step figures). `--compile --layouts
channels_last` does the same with the engine's torch_compile option (its first steps include the compilation);
`--compile-mode reduce-overhead --layouts channels_last` compiles the engine's UNet in that torch.compile mode
instead (here: CUDA graphs, which replay a step's kernels without launching each one from the host).
When the wall time of a step is much larger than the GPU's busy time, the step is bound by the host (kernel
launches and Python), not by the GPU. Needs CUDA; `--device cpu --tiny` is a dry run of the script itself (CI
runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Importing it sets what this script needs too: offline hub, quiet libraries, the engine and bench/ on the import
# path.
import train_sd15  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_trainer(model: str, data: str, steps: int, batch: int, resolution: int, work: Path, extra: dict):
    """The engine's Trainer in this process, for bench/train_throughput's recipe (rank 4, lr 1e-3 constant,
    centre crop, random flip; the spec's defaults otherwise, no checkpoints), events to a string: a profiler
    sees one step at a time here, which a separate `train` process would not allow."""
    import io

    from loraforge_engine.config import parse_spec
    from loraforge_engine.events import EventWriter
    from loraforge_engine.train import Trainer

    spec = parse_spec({"baseModel": model, "datasetDir": data, "resolution": resolution, "trainBatchSize": batch,
                       "maxTrainSteps": steps, "learningRate": 1e-3, "lrScheduler": "LR_SCHEDULER_CONSTANT", "rank": 4,
                       "centerCrop": True, "randomFlip": True, "checkpointingSteps": 10_000_000, "seed": 0, **extra})
    return Trainer(spec, str(work / f"engine-out-{os.getpid()}"), EventWriter(io.StringIO()))


def timed_engine_step(trainer, i: int) -> float:
    """Seconds for the trainer's optimizer step number i (Trainer.optimizer_step: the step its own loop runs,
    without the loop's events and checkpoints)."""
    t0 = time.perf_counter()
    trainer.optimizer_step(i)
    sync(trainer.device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", default="bf16", choices=("fp16", "bf16", "no"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed steps per layout")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraforge-bench-gpu"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny test model at 64 px (dry runs)")
    p.add_argument("--layouts", default="channels_last,contiguous",
                   help="UNet memory layouts to time, alternating every step; the first one is profiled")
    p.add_argument("--compile", action="store_true",
                   help="the engine's torch_compile option (then give one layout: a layout change recompiles)")
    p.add_argument("--compile-mode", default=None,
                   help="compile the engine's UNet in this torch.compile mode (e.g. reduce-overhead) instead of "
                        "through its torch_compile option (one layout, as with --compile)")
    a = p.parse_args()
    if a.compile and a.compile_mode:
        p.error("--compile and --compile-mode are two ways to compile: give one")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu/profile_step.py needs a CUDA device (--device cpu --tiny for a dry run)")
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from torch.profiler import ProfilerActivity, profile

    work = Path(a.work)
    model, data, resolution = train_sd15.model_and_data(work, a.tiny)
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    known = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    layouts = {k: known[k] for k in a.layouts.split(",")}
    warmup_rounds = 2  # the first steps of each layout (and under --compile, its compilation)
    # The LR schedule's length: warm-up, timed and profiled steps.
    total = (warmup_rounds + a.steps) * len(layouts) + a.profile_steps
    trainer = engine_trainer(str(model), str(data), total, a.batch, resolution, work,
                                        {"mixedPrecision": f"MIXED_PRECISION_{a.precision.upper()}",
                                         "torchCompile": a.compile})
    if a.compile_mode:
        trainer.c.unet.compile(mode=a.compile_mode)  # in place, as the engine's own option compiles it
    setup_peak = torch.cuda.max_memory_allocated() if cuda else 0
    name = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
    print(f"{name}, torch {torch.__version__}; {'tiny model' if a.tiny else 'SD-1.5 architecture'}, {resolution} px, "
          f"{a.precision}, batch {a.batch}{', torch_compile' if a.compile else ''}"
          f"{f', torch.compile mode {a.compile_mode}' if a.compile_mode else ''}", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    unet = trainer.c.unet
    times: dict[str, list[float]] = {k: [] for k in layouts}
    i = 0
    for _ in range(warmup_rounds):
        for key, fmt in layouts.items():
            unet.to(memory_format=fmt)
            t = timed_engine_step(trainer, i)
            if i < len(layouts):
                print(f"{key:>13}: first step {t:.1f} s", flush=True)
            i += 1
    for _ in range(a.steps):
        for key, fmt in layouts.items():
            unet.to(memory_format=fmt)
            sync(trainer.device)
            times[key].append(timed_engine_step(trainer, i))
            i += 1
    step_peak = torch.cuda.max_memory_allocated() if cuda else 0
    for key, ts in times.items():
        med = float(np.median(ts))
        print(f"{key:>13}: median step {med * 1e3:7.1f} ms  ({a.batch / med:6.2f} images/s), "
              f"min {min(ts) * 1e3:7.1f} ms", flush=True)
    if len(times) == 2:
        (k1, t1), (k2, t2) = times.items()
        print(f"{k1} / {k2} step time: {float(np.median(t1)) / float(np.median(t2)):.2f}", flush=True)
    print(f"peak memory: setup (load + caches) {setup_peak / 2**30:.2f} GiB, steps {step_peak / 2**30:.2f} GiB",
          flush=True)

    unet.to(memory_format=next(iter(layouts.values())))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        walls = [timed_engine_step(trainer, i + k) for k in range(a.profile_steps)]
    events = prof.key_averages()
    wall = sum(walls)
    print(f"profiled {a.profile_steps} steps ({next(iter(layouts))}; the profiler slows the host): wall "
          f"{wall * 1e3 / a.profile_steps:.1f} ms per step", flush=True)
    device_busy = launches = None
    if cuda:
        # Kernel rows only (operator rows repeat their kernels' time), as the table's own total counts them.
        device_busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                          and not e.is_user_annotation) / 1e3  # µs -> ms
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                             "cudaLaunchKernelExC", "cuLaunchKernelEx"))
        print(f"GPU busy {device_busy / a.profile_steps:.1f} ms per step; kernel launches per step "
              f"{launches / a.profile_steps:.0f}", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    per_step = 1 / a.profile_steps
    print(json.dumps({
        "device": name, "torch": torch.__version__, "resolution": resolution, "precision": a.precision,
        "batch": a.batch, "compile": a.compile, "compile_mode": a.compile_mode,
        "median_step_s": {k: float(np.median(t)) for k, t in times.items()},
        "setup_peak_bytes": setup_peak, "step_peak_bytes": step_peak, "profiled_wall_s": wall * per_step,
        "gpu_busy_s": None if device_busy is None else device_busy / 1e3 * per_step,
        "launches": None if launches is None else launches * per_step,
        "top_host_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6 * per_step,
                          "calls": e.count * per_step} for e in host]}))


if __name__ == "__main__":
    main()
