"""How idle OpenMP threads wait, and what it does to engine steps: alone on the CPU, and with a second engine
process training at the same time (the case that made the engine wait passively).

    PYTHONPATH=engine engine/.venv/bin/python bench/omp_wait/run.py [--reps 3] [--steps 60] [--threads 0]
        [--settings passive,spin300,spin1000] [--work DIR]

OpenMP reads its settings once, when torch loads it, so every measurement is a fresh process (`--child`) that
builds the engine's Trainer on the tiny model (the bench/train_throughput spec: 64 px, batch 4) and times
`--steps` training steps (median step time, after 5 warm-up steps). The settings are environments for
libgomp, the OpenMP runtime of torch's Linux wheels:

  passive   OMP_WAIT_POLICY=PASSIVE — idle threads sleep at once (the engine's setting until spin300)
  spinN     OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=N — idle threads poll N times, then sleep (spin300: the
            engine's setting now, loraforge_engine/openmp.py)
  default   GOMP_SPINCOUNT=300000 — libgomp's own default when neither is set

The parent rotates through the settings `--reps` times; each turn runs one process alone, then two at once.
It prints the median images/s of each setting in each case and its ratio to `passive`. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
SETTINGS = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    # libgomp's own default count, given explicitly: with neither variable set the engine would set its own.
    "default": {"GOMP_SPINCOUNT": "300000"},
}


def setting_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ENGINE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    if name.startswith("spin"):
        env.update(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT=str(int(name[4:])))
    else:
        env.update(SETTINGS[name])
    return env


def child(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(ENGINE))
    sys.path.insert(0, str(ENGINE.parent / "bench" / "train_throughput"))  # before this folder
    import numpy as np
    import run as throughput  # bench/train_throughput/run.py: the same spec and step
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work)
    t = throughput.engine_trainer(str(work / "tiny-sd"), str(work / "data"), 10_000, 4, 64, work, {})
    times = [throughput.timed_engine_step(t, i) for i in range(a.steps + 5)]
    print(json.dumps({"images_per_s": 4 / float(np.median(times[5:]))}))


def run_children(a: argparse.Namespace, name: str, count: int) -> list[float]:
    cmd = [sys.executable, __file__, "--child", "--steps", str(a.steps), "--threads", str(a.threads),
           "--work", a.work]
    procs = [subprocess.Popen(cmd, env=setting_env(name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1200)
        if p.returncode != 0:
            raise SystemExit(f"{name}: child failed:\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1])["images_per_s"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each process (0: torch's default)")
    p.add_argument("--settings", default="passive,spin300,spin1000")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraforge-bench-train"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    import numpy as np

    sys.path.insert(0, str(ENGINE))
    sys.path.insert(0, str(ENGINE.parent / "bench" / "train_throughput"))  # before this folder
    import run as throughput  # bench/train_throughput/run.py

    throughput.tiny_model_and_data(Path(a.work))  # made here, once, not by each child
    names = a.settings.split(",")
    for name in names:
        if not (name in SETTINGS or (name.startswith("spin") and name[4:].isdigit())):
            raise SystemExit(f"unknown setting {name!r}: passive, default or spinN")
    alone: dict[str, list[float]] = {n: [] for n in names}
    pair: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(a.reps):
        for name in names:
            alone[name] += run_children(a, name, 1)
            pair[name] += run_children(a, name, 2)
            print(f"rep {rep + 1} {name:>9}: alone {alone[name][-1]:6.1f} images/s   two at once "
                  f"{pair[name][-2]:6.1f} + {pair[name][-1]:6.1f} images/s", flush=True)
    results = {}
    for name in names:
        results[name] = {"alone": float(np.median(alone[name])), "two_at_once": float(np.median(pair[name]))}
    base = results.get("passive")
    for name, r in results.items():
        if base:
            r["alone_vs_passive"] = r["alone"] / base["alone"]
            r["two_at_once_vs_passive"] = r["two_at_once"] / base["two_at_once"]
        vs = (f"   vs passive: {r['alone_vs_passive']:.2f}x alone, {r['two_at_once_vs_passive']:.2f}x two at once"
              if base else "")
        print(f"{name:>9}: median {r['alone']:6.1f} images/s alone, {r['two_at_once']:6.1f} per process two at once{vs}")
    print(json.dumps({"threads": a.threads, "steps": a.steps, "reps": a.reps, **results}))


if __name__ == "__main__":
    main()
