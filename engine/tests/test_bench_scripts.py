"""The CPU benchmarks run end to end (a few steps each), so that their numbers can be re-measured at any time.
These runs check the scripts, not speed: tests never assert timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import engine_env, needs_reference

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_script(path: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / path), *args], capture_output=True, text=True,
                          env=engine_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_reference
def test_train_throughput_runs_both_paths(tmp_path):
    # diffusers' script and the engine, each as its own process, alone and beside a busy load. The first run on a
    # machine also makes the script's environment (pip, from PyPI) under the loraforge cache, then reuses it.
    out = run_script("train_throughput/run.py", "--steps", "4", "--warmup", "1", "--rounds", "1", "--specs",
                     "default", "--conditions", "alone,shared", "--images", "8", "--work", str(tmp_path))
    assert (out["model"], out["steps"], out["rounds"]) == ("tiny", 4, 1)
    assert set(out["results"]) == {"alone", "shared"}
    for condition in ("alone", "shared"):
        cell = out["results"][condition]["default"]
        for side in ("upstream", "engine"):
            r = cell[side]
            assert r["step_ms"] > 0 and r["wall_s"] > 0 and r["first_step_s"] > 0 and r["peak_rss_mib"] > 0, r
            assert r["first_step_s"] < r["wall_s"]
            (only,) = r["rounds"]  # one round: its raw values are the medians
            assert only["step_s"] * 1e3 == r["step_ms"] and only["timed_steps"] == 3
        up, en = cell["upstream"], cell["engine"]
        assert cell["step_rate_ratio"] == up["step_ms"] / en["step_ms"]
        assert cell["wall_ratio"] == up["wall_s"] / en["wall_s"]
        assert cell["first_step_ratio"] == up["first_step_s"] / en["first_step_s"]


@needs_reference
def test_train_throughput_buckets_spec_reports_what_each_side_trained_on(tmp_path):
    # The mixed-size data set: the engine with aspect-ratio buckets against the script's square crops.
    out = run_script("train_throughput/run.py", "--steps", "4", "--warmup", "1", "--rounds", "1", "--specs",
                     "buckets", "--conditions", "alone", "--images", "10", "--work", str(tmp_path))
    cell = out["results"]["alone"]["buckets"]
    assert cell["upstream"]["step_ms"] > 0 and cell["engine"]["step_ms"] > 0
    what = out["trained_on"]
    assert what["images"] == 10  # the generator's tiny and corrupt files are left out
    up, en = what["upstream"], what["engine"]
    assert up["sizes"] == {"64x64": 10} and up["pixels_per_sample"] == 64 * 64
    # Squares lose the long side's overhang (a 2:1 image keeps half); buckets keep more of every image.
    assert up["kept_min"] == 0.5 and en["kept_min"] > up["kept_min"] and en["kept_mean"] > up["kept_mean"]
    assert sum(en["sizes"].values()) == 10 and len(en["sizes"]) > 1
    for size in en["sizes"]:
        w, h = map(int, size.split("x"))
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64
