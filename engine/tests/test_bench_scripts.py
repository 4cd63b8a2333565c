"""The CPU benchmarks run end to end (a few steps each), so that their numbers can be re-measured at any time.
These runs check the scripts, not speed: tests never assert timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import engine_env

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_script(path: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / path), *args], capture_output=True, text=True,
                          env=engine_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_throughput_runs_both_paths(tmp_path):
    out = run_script("train_throughput/run.py", "--steps", "4", "--warmup", "1", "--rounds", "1", "--phases",
                     "--work", str(tmp_path))
    for name in ("reference", "engine"):
        assert out[name]["images_per_s"] > 0 and out[name]["first_step_s"] > 0, out
        phases = out[name]["phases_ms"]
        assert len(phases) >= 5 and all(ms >= 0 for ms in phases.values()), phases
        assert phases["UNet forward + loss"] > 0, phases
        assert out[name]["peak_memory_mb"] > 0, out  # from the separate memory pass on CPU
        assert len(out[name]["rounds_images_per_s"]) == 1
    assert out["engine"]["ratio"] == out["engine"]["images_per_s"] / out["reference"]["images_per_s"]


def test_small_ops_bench_runs_every_setting(tmp_path):
    out = run_script("small_ops/run.py", "--steps", "2", "--max-calls", "2", "--work", str(tmp_path))
    assert len(out["convolutions"]) >= 5 and all(r["onednn_us"] > 0 and r["thnn_us"] > 0 for r in out["convolutions"])
    assert len(out["cross_attention"]) >= 5 and all(r["plain_us"] > 0 and r["padded_us"] > 0
                                                    for r in out["cross_attention"])
    assert set(out["engine_step"]) == {"all", "no_plain_blocks", "no_lora_groups", "no_key_padding", "both",
                                       "lora_fold_only", "none"}
    assert out["engine_step"]["none"]["paired_ratio_to_none"] == 1.0


def test_omp_wait_bench_runs_a_setting_alone_and_in_pairs(tmp_path):
    out = run_script("omp_wait/run.py", "--reps", "1", "--steps", "2", "--settings", "spin300", "--work", str(tmp_path))
    assert out["spin300"]["alone"] > 0 and out["spin300"]["two_at_once"] > 0
