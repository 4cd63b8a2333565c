"""The GPU scripts in bench/gpu, dry-run on CPU: device sessions are rare and short, so their code must already
work when one comes. These runs check the scripts' own code paths (model building, training through the real
`train` command and Trainer, event parsing, rendering, FLOP counting, the JSON summary), not CUDA numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import engine_env, needs_reference

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_script(name: str, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / "gpu" / name), *args], capture_output=True, text=True,
                          env=engine_env(), timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_check_mixed_precision_dry_run(tmp_path):
    out = run_script("check_mixed_precision.py", "--device", "cpu", "--steps", "8", "--work", str(tmp_path))
    assert out["device"] == "cpu (dry run)" and out["arch"] == "sd"
    for precision in ("fp16", "bf16"):
        row = out[precision]
        assert row["loss_last"] < row["loss_first"], row
        assert row["image_diff_vs_base"] > 1e-3 and row["skipped_steps"] == 0
    # On CPU fp16 falls back to fp32; bf16 trains under autocast. The summary reports which ran.
    assert any("mixed precision: no" in m for m in out["fp16"]["precision_log"]), out["fp16"]["precision_log"]
    assert any("mixed precision: bf16" in m for m in out["bf16"]["precision_log"]), out["bf16"]["precision_log"]


@needs_reference
def test_train_sd15_dry_run(tmp_path):
    # diffusers' script and the engine as separate processes, both with --mixed_precision bf16 (on CPU: autocast).
    out = run_script("train_sd15.py", "--device", "cpu", "--tiny", "--precisions", "bf16", "--batches", "2",
                     "--steps", "3", "--warmup", "1", "--work", str(tmp_path))
    assert out["resolution"] == 64 and len(out["results"]) == 1
    row = out["results"][0]
    assert (row["precision"], row["batch"]) == ("bf16", 2)
    for side in ("upstream", "engine"):
        r = row[side]
        assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["first_step_s"] > 0 and r["peak_rss_mib"] > 0, r
        assert r["peak_gpu_mib"] is None  # sampled on CUDA only
    # The script does more work per step (VAE and text encoder forward): more FLOPs per image.
    assert row["upstream"]["tflops"] / row["upstream"]["images_per_s"] > \
        row["engine"]["tflops"] / row["engine"]["images_per_s"]
    assert row["ratio"] == row["upstream"]["step_s"] / row["engine"]["step_s"]
    # Both sides were given the precision: the engine says so in its log.
    assert "mixed precision: bf16" in (tmp_path / "runs" / "bf16-2-engine" / "log.txt").read_text()


def test_profile_step_dry_run(tmp_path):
    out = run_script("profile_step.py", "--device", "cpu", "--tiny", "--precision", "no", "--steps", "1",
                     "--profile-steps", "1", "--work", str(tmp_path))
    assert (out["device"], out["resolution"], out["batch"], out["compile"]) == ("cpu (dry run)", 64, 1, False)
    # Both layouts were timed, alternating, in the one Trainer.
    assert set(out["median_step_s"]) == {"channels_last", "contiguous"}
    assert all(t > 0 for t in out["median_step_s"].values())
    assert out["profiled_wall_s"] > 0 and out["gpu_busy_s"] is None and out["launches"] is None
    # The profiler saw the training step: the UNet's convolutions are among the host's costliest operators.
    ops = [row["op"] for row in out["top_host_ops"]]
    assert len(ops) == 10 and all(row["calls"] > 0 for row in out["top_host_ops"])
    assert any("conv" in op for op in ops), ops
