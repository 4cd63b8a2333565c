"""Training throughput: diffusers' own LoRA training script against the engine, each run as its own process the way
its users run it, on the same model, data and settings.

    PYTHONPATH=engine engine/.venv/bin/python bench/train_throughput/run.py [--model tiny|sd15] [--steps N]
        [--warmup N] [--rounds 3] [--specs default,center_crop] [--conditions alone,shared] [--batch 4]
        [--resolution 64] [--images 64] [--precision no|bf16] [--bucket-step 16] [--reference-script PATH] [--work DIR]

upstream  diffusers' examples/text_to_image/train_text_to_image_lora.py, unmodified (--reference-script; default
          ../shared/reference/diffusers/train_text_to_image_lora.py beside the repository), run with a
          benchmark-only Python environment that this bench makes on first use (ensure_refvenv): the engine
          venv's own torch/diffusers/transformers/peft through a .pth file, plus the script's extra packages
          (REF_EXTRAS). Offline, HF_HOME in the run's folder, --report_to tensorboard: its per-step times are
          the wall-clock stamps of its `train_loss` scalars.
engine    `python -m loraforge_engine train --spec spec.json --output-dir DIR`, as the server's worker starts it
          (the caller's environment plus PYTHONPATH=<repo>/engine and PYTHONUNBUFFERED=1); its per-step times
          are the moments this bench reads each metrics event from its stdout.

Both sides: rank 4, lr 1e-3 constant, random flip, random crop ("default", the spec's default) or centre crop
("center_crop"), or "buckets": a data set of mixed sizes and aspect ratios (square, 3:2, 2:3, 2:1, 1:2; the
shorter side --resolution), on which the engine trains with aspect-ratio buckets (sides in steps of --bucket-step)
and its caches (centre crop within each bucket, both orientations cached) and the script as it always does, each
image resized and cropped to a --resolution square (--center_crop); the report then also says what each side
trained on (the training sizes, how much of each image survived the crop, samples per step). Batch --batch at --resolution px, --steps optimizer steps, --precision, seed 0, no validation,
no checkpoint (both default to one every 500 steps). Each run starts clean: a fresh output folder, a fresh HF_HOME
(so the script's datasets cache is built as on a user's first run, as the engine builds its own caches).

Per run: the median step time over the steps after --warmup (from consecutive step stamps), time to first step
(from just before the process starts to the first step's stamp), whole-run wall time (start to exit) and the
child's peak resident set size (os.wait4's ru_maxrss). Each condition x spec cell runs both sides --rounds times,
alternating which goes first; the report gives the median over rounds and the ratios upstream/engine of step
time, wall time and time to first step (above 1: the engine is faster). Conditions: "alone" starts nothing else
(with a warning when the 1-minute load average shows other work); "shared" runs one busy-looping process per
usable core beside each side for the whole of its run. The last line is JSON with every number.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_DIR = ROOT / "engine"
DEFAULT_ENGINE_PYTHON = ENGINE_DIR / ".venv" / "bin" / "python"
DEFAULT_REFERENCE_SCRIPT = ROOT.parent / "shared" / "reference" / "diffusers" / "train_text_to_image_lora.py"
MODELS_SCRIPT = ROOT / "bench" / "models.py"

# What diffusers' script needs beyond the engine's environment (its requirements.txt, pinned), kept out of the
# engine's runtime requirements. torchvision goes without dependencies: the engine's torch must stay as it is.
REF_EXTRAS = ("datasets==5.2.0", "tensorboard==2.21.0", "ftfy==6.3.1", "Jinja2==3.1.6")
REF_NO_DEPS = ("torchvision==0.29.2",)
RANK, LEARNING_RATE, SEED = 4, 1e-3, 0
LORA_FILE = "pytorch_lora_weights.safetensors"
SIDES = ("upstream", "engine")
SPECS = ("default", "center_crop", "buckets")
DEFAULT_SPECS = ("default", "center_crop")
CONDITIONS = ("alone", "shared")
DEFAULT_STEPS = {"tiny": (200, 10), "sd15": (12, 2)}  # model: (steps, warm-up steps)


def say(text: str) -> None:
    """Progress on stderr, so that stdout holds the report alone."""
    print(text, file=sys.stderr, flush=True)


@dataclass
class Settings:
    """What both sides train: the same model, data and recipe."""

    model: str
    data: str
    resolution: int
    batch: int
    steps: int
    precision: str  # "no", "fp16" or "bf16", given alike to both sides
    center_crop: bool
    seed: int = SEED
    bucket_step: int = 0  # > 0: the engine trains with aspect-ratio buckets in steps of this many pixels


# ------------------------------------------------------------------------------------------ environments


def python_info(python: str | os.PathLike) -> dict:
    """The interpreter's real prefix, site-packages folders and library versions (asked of it, so that the bench
    may run under another Python than the engine's)."""
    code = ("import json, os, site, sys\n"
            "from importlib import metadata\n"
            "def v(n):\n"
            "    try: return metadata.version(n)\n"
            "    except metadata.PackageNotFoundError: return None\n"
            "print(json.dumps({'prefix': os.path.realpath(sys.prefix),"
            " 'site': [os.path.realpath(p) for p in site.getsitepackages() if os.path.isdir(p)],"
            " 'python': '%d.%d.%d' % sys.version_info[:3],"
            " 'versions': {n: v(n) for n in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate')}}))\n")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def ensure_refvenv(engine_python: str | os.PathLike = DEFAULT_ENGINE_PYTHON, cache: str | os.PathLike | None = None,
                   wheels: str | os.PathLike | None = None) -> Path:
    """The upstream script's Python: a venv under ${LORAFORGE_CACHE:-~/.cache/loraforge}/refvenv-<hash of the
    pinned extras and the engine environment's real path>, seeing the engine environment's site-packages through
    a .pth file (the same torch and diffusers on both sides, no second torch download) plus REF_EXTRAS. Made once
    and marked with .complete, as scripts/setup.sh does for the engine venv; a lock keeps two benches from making
    it at once. `wheels`: install the same packages from that folder only, in the versions it holds (for a
    machine without network, whose torch may want another torchvision). Returns its python."""
    info = python_info(engine_python)
    cache = Path(cache or os.environ.get("LORAFORGE_CACHE") or Path.home() / ".cache" / "loraforge")
    extras, no_deps = list(REF_EXTRAS), list(REF_NO_DEPS)
    if wheels:
        extras, no_deps = [r.split("==")[0] for r in extras], [r.split("==")[0] for r in no_deps]
    found = sorted(p.name for p in Path(wheels).glob("*.whl")) if wheels else []
    key = "\n".join([*extras, *no_deps, *found, info["prefix"]])
    venv = cache / f"refvenv-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").is_file():  # another bench finished it while this one waited
            return python
        say(f"making the upstream script's environment in {venv} (once; pip: {' '.join(extras + no_deps)})")
        shutil.rmtree(venv, ignore_errors=True)
        # venv from the engine's interpreter: the same Python version, so its site-packages are importable.
        pip_python = python
        if subprocess.run([str(engine_python), "-m", "venv", str(venv)]).returncode != 0:
            # A system Python without ensurepip (Debian's without python3-venv): a venv without pip, filled by
            # the engine interpreter's pip pointed at it.
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([str(engine_python), "-m", "venv", "--without-pip", str(venv)], check=True)
            pip_python = Path(engine_python)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        Path(purelib, "engine-venv.pth").write_text("".join(p + "\n" for p in info["site"]))
        source = ["--no-index", "--find-links", str(wheels)] if wheels else []
        target = [] if pip_python == python else ["--python", str(python)]
        pip = [str(pip_python), "-m", "pip", *target, "install", "-q", "--disable-pip-version-check", *source]
        for args in (extras, ["--no-deps", *no_deps]):
            if subprocess.run([*pip, *args]).returncode != 0:
                sys.exit(f"could not install {' '.join(args)} into {venv}" + ("" if wheels else
                         " (no network? give a folder of their wheels: --ref-wheels where offered)"))
        # The extras must not have brought their own torch, diffusers etc.: both sides use the engine's.
        seen = python_info(python)["versions"]
        if seen != info["versions"]:
            sys.exit(f"{venv}: its libraries {seen} differ from the engine's {info['versions']}")
        (venv / ".complete").touch()
    return python


def base_env(run_dir: Path) -> dict[str, str]:
    """The environment both sides start from: the caller's, offline, HF_HOME inside the run's folder."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(run_dir / "hf-home"), PYTHONUNBUFFERED="1")
    return env


def _pythonpath_without_engine(env: dict[str, str]) -> list[str]:
    """The caller's PYTHONPATH entries, absolute, without the engine's folder (the upstream script runs as by a
    user without loraforge; other entries, e.g. carried wheels on a device machine, stay for both sides)."""
    entries = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [p for p in entries if Path(p).resolve() != ENGINE_DIR.resolve()]


def engine_env(run_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = base_env(run_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_DIR), *_pythonpath_without_engine(env)])
    env.update(extra or {})
    return env


def upstream_env(run_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = base_env(run_dir)
    rest = _pythonpath_without_engine(env)
    if rest:
        env["PYTHONPATH"] = os.pathsep.join(rest)
    else:
        env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------ processes


class BusyLoad:
    """A second load on the machine: `count` processes that spin in pure Python until stopped."""

    def __init__(self, count: int):
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"]) for _ in range(self.count)]
        time.sleep(0.3)  # let them reach their loops before the measured process starts
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


@dataclass
class ChildRun:
    start: float  # time.time() just before the process started
    end: float  # time.time() once it had exited
    returncode: int
    peak_rss_mib: float
    stamps: list[tuple[int, float]]  # (step, time.time() of its end), as far as the caller collected them


def run_child(cmd: list[str], env: dict[str, str], cwd: Path, log: Path, step_of_line=None, watch=None) -> ChildRun:
    """Run `cmd` to its end. With `step_of_line`, stdout is read line by line as it comes and each line for
    which it returns a step number is stamped with time.time() on arrival; stderr (and otherwise stdout too)
    goes to `log`. `watch(pid)`: a context manager that runs while the child lives (e.g. a GPU memory sampler)."""
    stamps: list[tuple[int, float]] = []
    with open(log, "wb") as log_file:
        start = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if step_of_line else log_file, stderr=log_file)
        with watch(proc.pid) if watch else contextlib.nullcontext():
            if step_of_line:
                for raw in iter(proc.stdout.readline, b""):
                    now = time.time()
                    step = step_of_line(raw)
                    if step is not None:
                        stamps.append((step, now))
                proc.stdout.close()
            # wait4 rather than wait: it also gives the child's resource usage, its peak RSS among it.
            _, status, usage = os.wait4(proc.pid, 0)
            end = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return ChildRun(start, end, proc.returncode, usage.ru_maxrss / 1024, stamps)  # ru_maxrss is in KiB


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def fail(side: str, run_dir: Path, why: str) -> None:
    sys.exit(f"{side} run in {run_dir} failed: {why}\n--- last lines of {run_dir / 'log.txt'}:\n"
             f"{log_tail(run_dir / 'log.txt')}")


def summarize(side: str, run_dir: Path, child: ChildRun, stamps: list[tuple[int, float]], steps: int,
              warmup: int) -> dict:
    """Check the run did every step and wrote its LoRA, then its timings: median step time over the steps after
    `warmup` (each step's time: its stamp minus the previous one's), time to first step, wall time, peak RSS."""
    if child.returncode != 0:
        fail(side, run_dir, f"exit status {child.returncode}")
    if [s for s, _ in stamps] != list(range(1, steps + 1)):
        fail(side, run_dir, f"expected steps 1..{steps}, saw {[s for s, _ in stamps][:8]}... ({len(stamps)} stamps)")
    if not (run_dir / "out" / LORA_FILE).is_file():
        fail(side, run_dir, f"no {LORA_FILE} in its output folder")
    times = [t for _, t in stamps]
    durations = [b - a for a, b in zip(times, times[1:])][max(0, warmup - 1):]  # step k's lies between stamps k-1, k
    if not durations:
        sys.exit(f"no steps left to time after {warmup} warm-up steps of {steps}: give more --steps")
    return {"step_s": statistics.median(durations), "first_step_s": times[0] - child.start,
            "wall_s": child.end - child.start, "peak_rss_mib": child.peak_rss_mib, "timed_steps": len(durations)}


def fresh_run_dir(run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "out").mkdir(parents=True)
    return run_dir


def engine_spec(s: Settings) -> dict:
    """The job's TrainingSpec in proto3 JSON, as the worker writes it (unset fields take the spec's defaults)."""
    return {"baseModel": s.model, "datasetDir": s.data, "resolution": s.resolution, "trainBatchSize": s.batch,
            "rank": RANK, "learningRate": LEARNING_RATE, "lrScheduler": "LR_SCHEDULER_CONSTANT", "randomFlip": True,
            "centerCrop": s.center_crop, "maxTrainSteps": s.steps,
            "mixedPrecision": f"MIXED_PRECISION_{s.precision.upper()}", "seed": s.seed,
            **({"aspectRatioBuckets": True, "bucketStep": s.bucket_step} if s.bucket_step else {})}


def _metrics_step(raw: bytes) -> int | None:
    """The step of a metrics event line of the engine's stdout; None for any other event."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    metrics = event.get("metrics") if isinstance(event, dict) else None
    return int(metrics["step"]) if metrics and "step" in metrics else None


def run_engine(s: Settings, run_dir: Path, warmup: int, engine_python: str | os.PathLike = DEFAULT_ENGINE_PYTHON,
               env_extra: dict[str, str] | None = None, watch=None) -> dict:
    """One engine run from a clean start; its summary (see summarize)."""
    fresh_run_dir(run_dir)
    spec = run_dir / "out" / "spec.json"  # where the worker writes it: in the output folder
    spec.write_text(json.dumps(engine_spec(s), indent=2))
    cmd = [str(engine_python), "-m", "loraforge_engine", "train", "--spec", str(spec), "--output-dir",
           str(run_dir / "out")]
    child = run_child(cmd, engine_env(run_dir, env_extra), run_dir, run_dir / "log.txt", _metrics_step, watch)
    return summarize("engine", run_dir, child, child.stamps, s.steps, warmup)


# Reads the script's tensorboard log with the refvenv's tensorboard (the bench's own Python need not have it).
READ_SCALARS = ("import json, sys\n"
                "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
                "acc = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0})\n"
                "acc.Reload()\n"
                "print(json.dumps([[e.step, e.wall_time] for e in acc.Scalars('train_loss')]))\n")


def upstream_command(ref_python: str | os.PathLike, script: str | os.PathLike, s: Settings, out: Path) -> list[str]:
    cmd = [str(ref_python), str(script), "--pretrained_model_name_or_path", s.model, "--train_data_dir", s.data,
           "--resolution", str(s.resolution), "--train_batch_size", str(s.batch), "--rank", str(RANK),
           "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--random_flip",
           "--max_train_steps", str(s.steps), "--mixed_precision", s.precision, "--dataloader_num_workers", "0",
           "--report_to", "tensorboard", "--output_dir", str(out), "--seed", str(s.seed)]
    return cmd + (["--center_crop"] if s.center_crop else [])


def run_upstream(s: Settings, run_dir: Path, warmup: int, ref_python: str | os.PathLike,
                 script: str | os.PathLike = DEFAULT_REFERENCE_SCRIPT, env_extra: dict[str, str] | None = None,
                 watch=None) -> dict:
    """One run of diffusers' script from a clean start; its summary (see summarize). Its step stamps are the
    wall_time of its train_loss scalars, which it logs once per optimizer step, after the step."""
    fresh_run_dir(run_dir)
    child = run_child(upstream_command(ref_python, script, s, run_dir / "out"), upstream_env(run_dir, env_extra),
                      run_dir, run_dir / "log.txt", None, watch)
    if child.returncode != 0:
        fail("upstream", run_dir, f"exit status {child.returncode}")
    files = sorted((run_dir / "out").rglob("events.out.tfevents.*"))
    if not files:
        fail("upstream", run_dir, "no tensorboard log")
    read = subprocess.run([str(ref_python), "-c", READ_SCALARS, str(files[-1])], capture_output=True, text=True)
    if read.returncode != 0:
        fail("upstream", run_dir, f"reading {files[-1]}: {read.stderr[-2000:]}")
    stamps = [(int(step), float(t)) for step, t in json.loads(read.stdout)]
    return summarize("upstream", run_dir, child, stamps, s.steps, warmup)


# ------------------------------------------------------------------------------------------ the bench


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {"cores_usable": len(os.sched_getaffinity(0)), "cores": os.cpu_count(), "cpu": model}


def busy_share(seconds: float = 1.0) -> float:
    """Share of all cores busy over the next `seconds` (from /proc/stat), while this bench runs nothing."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def prepare(a, engine_python: str) -> tuple[Path, Path]:
    """The model (made by bench/models.py in a process of its own: the bench keeps no torch in memory) and the
    data set, under --work, made on first use."""
    work = Path(a.work)
    folder = work / ("tiny-sd" if a.model == "tiny" else "sd15-random")
    if not (folder / "model_index.json").is_file():
        say(f"making the {a.model} model in {folder}" + (" (about 40 s and 4 GB)" if a.model == "sd15" else ""))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ENGINE_DIR), *_pythonpath_without_engine(os.environ)]))
    made = subprocess.run([engine_python, str(MODELS_SCRIPT), a.model, str(work)], env=env, capture_output=True,
                          text=True)
    if made.returncode != 0:
        sys.exit(f"making the {a.model} model failed:\n{made.stderr[-3000:]}")
    model = Path(made.stdout.strip().splitlines()[-1])
    data = work / f"data-{a.images}-{a.resolution}"
    if not (data / "metadata.jsonl").is_file():
        sys.path.insert(0, str(ENGINE_DIR))
        from loraforge_engine.tiny import make_dataset  # PIL and numpy only

        tmp = Path(tempfile.mkdtemp(prefix=".data-", dir=work))
        make_dataset(tmp, count=a.images, size=a.resolution, seed=0)
        shutil.rmtree(data, ignore_errors=True)
        os.replace(tmp, data)
    return model, data


def prepare_mixed(a) -> Path:
    """The "buckets" spec's data set: the engine's mixed-size generator (tiny.make_dataset(mixed=True)) without
    the two files it adds for the skip tests (a 4 px image and a corrupt one): both sides must train on the same,
    valid images."""
    data = Path(a.work) / f"data-mixed-{a.images}-{a.resolution}"
    if not (data / "metadata.jsonl").is_file():
        sys.path.insert(0, str(ENGINE_DIR))
        from loraforge_engine.tiny import make_dataset  # PIL and numpy only

        tmp = Path(tempfile.mkdtemp(prefix=".data-", dir=a.work))
        make_dataset(tmp, count=a.images, size=a.resolution, seed=0, mixed=True)
        drop = {"tiny.png", "corrupt.png"}
        rows = [r for r in (tmp / "metadata.jsonl").read_text().splitlines() if json.loads(r)["file_name"] not in drop]
        (tmp / "metadata.jsonl").write_text("".join(r + "\n" for r in rows))
        for name in drop:
            (tmp / name).unlink()
        shutil.rmtree(data, ignore_errors=True)
        os.replace(tmp, data)
    return data


def trained_on(data: Path, resolution: int, bucket_step: int, batch: int) -> dict:
    """What each side makes of the data set's images. The script: every image resized so its shorter side is
    `resolution`, then a centred `resolution` square. The engine: each image to its nearest bucket (the engine's
    own make_buckets / nearest_bucket / resized_size, with the spec's default sides and aspect limit), resized
    to cover it and cropped to it. Per side: training sizes (w x h: images), the share of each image's area that
    survives the crop (mean and least), pixels per sample, and samples per optimizer step over one epoch (a
    bucket's images left over after whole batches form a shorter batch; the script's last batch may be short)."""
    sys.path.insert(0, str(ENGINE_DIR))
    from PIL import Image

    from loraforge_engine.data import make_buckets, nearest_bucket, resized_size

    sizes = []
    for row in (data / "metadata.jsonl").read_text().splitlines():
        with Image.open(data / json.loads(row)["file_name"]) as img:
            sizes.append(img.size)
    buckets = make_buckets(resolution, bucket_step, max(bucket_step, resolution // 2 // bucket_step * bucket_step),
                           resolution * 2, 4.0)

    def side(targets: list[tuple[int, int]]) -> dict:
        kept = []
        for size, (tw, th) in zip(sizes, targets):
            rw, rh = resized_size(size, (tw, th))
            kept.append(tw * th / (rw * rh))
        counts: dict[str, int] = {}
        for tw, th in targets:
            counts[f"{tw}x{th}"] = counts.get(f"{tw}x{th}", 0) + 1
        steps = sum(-(-n // batch) for n in counts.values())
        return {"sizes": dict(sorted(counts.items())), "kept_mean": statistics.mean(kept), "kept_min": min(kept),
                "pixels_per_sample": statistics.mean(w * h for w, h in targets),
                "samples_per_step": len(targets) / steps}

    upstream = side([(resolution, resolution)] * len(sizes))
    upstream["samples_per_step"] = len(sizes) / -(-len(sizes) // batch)  # one loader over all images
    return {"images": len(sizes), "upstream": upstream,
            "engine": side([buckets[nearest_bucket(size, buckets)] for size in sizes])}


def med(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def report(results: dict) -> None:
    """The table: medians over rounds per condition x spec x side, and the ratios upstream/engine."""
    print(f"{'condition':<9} {'spec':<11} {'side':<8} {'ms/step':>9} {'wall s':>8} {'1st step s':>10} "
          f"{'peak RSS MiB':>12}")
    for cond, per_spec in results.items():
        for spec, cell in per_spec.items():
            for side in SIDES:
                r = cell[side]
                print(f"{cond:<9} {spec:<11} {side:<8} {r['step_ms']:9.1f} {r['wall_s']:8.1f} "
                      f"{r['first_step_s']:10.2f} {r['peak_rss_mib']:12.0f}")
            print(f"{'':<9} {'':<11} engine/upstream: step rate {cell['step_rate_ratio']:.2f}x, wall time "
                  f"{cell['wall_ratio']:.2f}x, time to first step {cell['first_step_ratio']:.2f}x "
                  f"(above 1: the engine is faster)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--steps", type=int, help="optimizer steps per run (tiny: 200, sd15: 12)")
    p.add_argument("--warmup", type=int, help="first steps left out of the step time (tiny: 10, sd15: 2)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side per cell, alternating which goes first")
    p.add_argument("--specs", default=",".join(DEFAULT_SPECS),
                   help="default (random crop), center_crop and/or buckets (a mixed-size data set; see above)")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help="alone (nothing else started) and/or shared (a busy loop per usable core beside each run)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=64, help="synthetic captioned images in the data set")
    p.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no", help="given alike to both sides")
    p.add_argument("--bucket-step", type=int, default=16,
                   help="the buckets spec's bucket_step (the tiny UNet takes multiples of 16, SD 1.5 of 64)")
    p.add_argument("--reference-script", default=str(DEFAULT_REFERENCE_SCRIPT),
                   help="diffusers' train_text_to_image_lora.py (an unmodified copy)")
    p.add_argument("--engine-python", default=str(DEFAULT_ENGINE_PYTHON), help="the engine's interpreter")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraforge-bench-train"))
    a = p.parse_args()
    steps, warmup = DEFAULT_STEPS[a.model]
    a.steps = a.steps or steps
    a.warmup = warmup if a.warmup is None else a.warmup
    specs, conditions = a.specs.split(","), a.conditions.split(",")
    if set(specs) - set(SPECS) or set(conditions) - set(CONDITIONS) or a.steps <= max(1, a.warmup):
        p.error(f"--specs from {SPECS}, --conditions from {CONDITIONS}, --steps above --warmup (and 1)")
    if not Path(a.reference_script).is_file():
        p.error(f"no reference script at {a.reference_script}")

    info = python_info(a.engine_python)
    host = machine()
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {host['cores_usable']} usable cores of {host['cores']}, {host['cpu']}; python {info['python']}, "
          + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"{a.model} model, {a.images} images, {a.resolution} px, batch {a.batch}, rank {RANK}, lr {LEARNING_RATE} "
          f"constant, random flip, precision {a.precision}, {a.steps} steps ({a.warmup} warm-up), {a.rounds} rounds",
          flush=True)
    model, data = prepare(a, a.engine_python)
    mixed = prepare_mixed(a) if "buckets" in specs else None
    ref_python = ensure_refvenv(a.engine_python)
    runs = Path(a.work) / "runs"
    rounds: dict = {c: {s: {side: [] for side in SIDES} for s in specs} for c in conditions}
    for round_ in range(a.rounds):
        order = SIDES if round_ % 2 == 0 else SIDES[::-1]
        for cond in conditions:
            for spec in specs:
                s = Settings(str(model), str(mixed if spec == "buckets" else data), a.resolution, a.batch, a.steps,
                             a.precision, spec != "default", bucket_step=a.bucket_step if spec == "buckets" else 0)
                load_before = {"loadavg1": os.getloadavg()[0], "busy_share": busy_share()} if cond == "alone" else {}
                if load_before and load_before["loadavg1"] > 0.5:
                    say(f"warning: 1-minute load average {load_before['loadavg1']:.2f} before an 'alone' round "
                        f"({load_before['busy_share']:.0%} of the cores busy in the last second while this bench "
                        f"ran nothing; the average also keeps this bench's own runs for about a minute)")
                for position, side in enumerate(order):
                    run_dir = runs / f"{cond}-{spec}-{side}"
                    with BusyLoad(host["cores_usable"]) if cond == "shared" else contextlib.nullcontext():
                        if side == "engine":
                            r = run_engine(s, run_dir, a.warmup, a.engine_python)
                        else:
                            r = run_upstream(s, run_dir, a.warmup, ref_python, a.reference_script)
                    r.update(round=round_ + 1, position=position + 1, **load_before)
                    rounds[cond][spec][side].append(r)
                    say(f"round {round_ + 1} {cond:<6} {spec:<11} {side:<8}: {r['step_s'] * 1e3:8.1f} ms/step, "
                        f"first step {r['first_step_s']:6.2f} s, wall {r['wall_s']:6.1f} s, "
                        f"peak RSS {r['peak_rss_mib']:6.0f} MiB")

    results: dict = {}
    for cond in conditions:
        for spec in specs:
            cell = {}
            for side in SIDES:
                rs = rounds[cond][spec][side]
                cell[side] = {"step_ms": med(rs, "step_s") * 1e3, "wall_s": med(rs, "wall_s"),
                              "first_step_s": med(rs, "first_step_s"), "peak_rss_mib": med(rs, "peak_rss_mib"),
                              "rounds": rs}
            up, en = cell["upstream"], cell["engine"]
            cell["step_rate_ratio"] = up["step_ms"] / en["step_ms"]
            cell["wall_ratio"] = up["wall_s"] / en["wall_s"]
            cell["first_step_ratio"] = up["first_step_s"] / en["first_step_s"]
            results.setdefault(cond, {})[spec] = cell
    print("medians over rounds:")
    report(results)
    what = trained_on(mixed, a.resolution, a.bucket_step, a.batch) if mixed else None
    if what:
        print(f"buckets spec, what each side trained on ({what['images']} images of mixed sizes):")
        for side in SIDES:
            w = what[side]
            print(f"  {side:<8} sizes {', '.join(f'{k}: {v}' for k, v in w['sizes'].items())}; image area kept "
                  f"{w['kept_mean']:.0%} on average, {w['kept_min']:.0%} at least; {w['pixels_per_sample']:.0f} px "
                  f"per sample, {w['samples_per_step']:.2f} samples per step")
    print(json.dumps({"command": shlex.join([sys.executable, *sys.argv]), "machine": host, "python": info["python"],
                      "versions": info["versions"], "model": a.model, "images": a.images,
                      "resolution": a.resolution, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
                      "rounds": a.rounds, "precision": a.precision, "reference_script": a.reference_script,
                      "bucket_step": a.bucket_step, "trained_on": what, "results": results}))


if __name__ == "__main__":
    main()
