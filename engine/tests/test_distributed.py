"""Data-parallel training (distributed.py) on CPU with gloo: 2 ranks x batch 2 train the LoRA that 1 x batch 4
trains, only rank 0 reports and writes, a killed rank ends the job at once with a retryable exit code, resume
across a change of device count, and device_kind CUDA without a GPU fails clearly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import engine_cmd, engine_env, of_kind, parse_events, run_train
from safetensors.torch import load_file

from loraforge_engine.contract import job_pb2
from loraforge_engine.distributed import EXIT_RANK_LOST, Group, cpu_shares
from loraforge_engine.train import Trainer

STEPS = 12
# 2 x batch 2 against 1 x batch 4: the same samples, VAE samples, noise and timesteps (drawn for the global batch
# and sliced), so the two runs differ only by float rounding: kernels at batch 2 and 4 sum in other orders, and the
# gradient is a sum of two halves. AdamW turns a gradient that is nearly zero into a step of about ±lr, so a
# rounding difference there moves a weight visibly. Measured: relative L2 difference of the LoRA ~8e-5 after 12
# steps (the LoRA moved ~0.14 relative between steps 4 and 12). Bound: 1e-3, still 100x below what training moves.
REL_TOLERANCE = 1e-3


def spec(tiny_model: Path, dataset: Path, devices: int, batch: int, **extra) -> dict:
    return {"baseModel": str(tiny_model), "datasetDir": str(dataset), "resolution": 64, "trainBatchSize": batch,
            "numDevices": devices, "deviceKind": "DEVICE_KIND_CPU", "maxTrainSteps": STEPS, "learningRate": 3e-3,
            "lrScheduler": "LR_SCHEDULER_CONSTANT", "rank": 8, "randomFlip": True, "seed": "7",
            "checkpointingSteps": 4, **extra}


def rel_diff(a: Path, b: Path) -> float:
    """||a - b|| / ||b|| over every tensor of two LoRA files."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    num = sum(((ta[k] - tb[k]) ** 2).sum() for k in ta) ** 0.5
    return float(num / sum((tb[k] ** 2).sum() for k in tb) ** 0.5)


@pytest.fixture(scope="module")
def single(tiny_model, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "one-by-4"
    rc, events, stderr = run_train(spec(tiny_model, dataset, 1, 4), out)
    assert rc == 0, stderr[-3000:]
    return out, events


@pytest.fixture(scope="module")
def parallel(tiny_model, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "two-by-2"
    rc, events, stderr = run_train(spec(tiny_model, dataset, 2, 2), out)
    assert rc == 0, stderr[-3000:]
    return out, events, stderr


def test_two_ranks_of_batch_2_train_the_lora_of_one_of_batch_4(single, parallel):
    (one, one_events), (two, two_events, _) = single, parallel
    diff = rel_diff(two / "pytorch_lora_weights.safetensors", one / "pytorch_lora_weights.safetensors")
    moved = rel_diff(one / "pytorch_lora_weights.safetensors",
                     one / "checkpoints" / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    print(f"2x2 against 1x4: relative difference {diff:.3g}; training moved the LoRA {moved:.3g} in steps 5-12")
    assert diff < REL_TOLERANCE < moved / 100
    # The global batch's loss, step by step, and the images each step saw.
    for m1, m2 in zip(of_kind(one_events, "metrics"), of_kind(two_events, "metrics"), strict=True):
        assert m1.step == m2.step and m2.loss == pytest.approx(m1.loss, rel=1e-4)
    logs = [m.message for m in of_kind(two_events, "log")]
    assert any("effective batch 4 = batch 2 x 2 devices x 1 accumulation" in m for m in logs), logs
    assert any(m.startswith("data parallel: 2 ranks") and "effective batch 2 per device x 2 devices" in m
               for m in logs), logs


def test_only_rank_0_reports_and_writes(parallel):
    out, events, stderr = parallel
    assert len(of_kind(events, "dataset")) == 1
    assert [m.step for m in of_kind(events, "metrics")] == list(range(1, STEPS + 1))  # once each, not per rank
    assert [c.step for c in of_kind(events, "checkpoint")] == [4, 8, 12]
    states = of_kind(events, "state")
    assert len(states) == 1 and states[0].state == job_pb2.JOB_STATE_SUCCEEDED
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        f"checkpoints/checkpoint-{s}/{f}" for s in (12, 4, 8)
        for f in ("pytorch_lora_weights.safetensors", "training_state.json", "training_state.safetensors")
    ] + ["pytorch_lora_weights.safetensors"]
    state = json.loads((out / "checkpoints" / "checkpoint-12" / "training_state.json").read_text())
    assert (state["num_devices"], state["effective_batch"], state["global_batch"]) == (2, 4, 4)
    # Rank 1 says nothing on info level: its lines would carry its prefix.
    assert "[loraforge rank 1] INFO" not in stderr


def test_resume_on_one_device_from_two_continues_the_same_run(single, parallel, tiny_model, dataset, tmp_path):
    (one, _), (two, _, _) = single, parallel
    out = tmp_path / "resumed"
    rc, events, stderr = run_train(spec(tiny_model, dataset, 1, 4), out,
                                   "--resume-from", str(two / "checkpoints" / "checkpoint-4"))
    assert rc == 0, stderr[-3000:]
    assert [m.step for m in of_kind(events, "metrics")] == list(range(5, STEPS + 1))
    logs = [m.message for m in of_kind(events, "log")]
    assert any("checkpoint trained on 2 devices, this run has 1: same effective batch (4) and the same samples"
               in m for m in logs), logs
    diff = rel_diff(out / "pytorch_lora_weights.safetensors", one / "pytorch_lora_weights.safetensors")
    print(f"2 ranks to step 4, then 1 process: relative difference {diff:.3g} from the 1x4 run")
    assert diff < REL_TOLERANCE


def test_buckets_sdxl_and_an_unset_seed_on_two_ranks(tiny_sdxl, tmp_path):
    """Aspect-ratio buckets of mixed sizes (a bucket's short last batch leaves rank 1 an empty slice), SDXL's size
    conditioning sliced with its samples, and a seed left unset (rank 0 draws it, every rank uses it): 2 x batch 1
    then matches 1 x batch 2 with the seed the first run logged."""
    from loraforge_engine.tiny import make_dataset

    data = make_dataset(tmp_path / "mixed", count=11, size=64, seed=3, fmt="txt", mixed=True)  # buckets of 4, 4, 3
    common = {"aspectRatioBuckets": True, "bucketStep": 16, "minImageSide": 16, "maxTrainSteps": 8,
              "checkpointingSteps": 100}
    base = spec(tiny_sdxl, data, 2, 1, **common)
    del base["seed"]
    rc, events, stderr = run_train(base, tmp_path / "two")
    assert rc == 0, stderr[-3000:]
    logs = [m.message for m in of_kind(events, "log")]
    [seed] = [int(m.split()[-1]) for m in logs if m.startswith("seed not set; using seed")]
    assert any("a shorter batch each epoch" in m for m in logs), logs  # some bucket's batch is short
    rc, _, stderr = run_train(spec(tiny_sdxl, data, 1, 2, **common, seed=str(seed)), tmp_path / "one")
    assert rc == 0, stderr[-3000:]
    diff = rel_diff(tmp_path / "two" / "pytorch_lora_weights.safetensors",
                    tmp_path / "one" / "pytorch_lora_weights.safetensors")
    print(f"SDXL, buckets, 2x1 against 1x2: relative difference {diff:.3g}")
    assert diff < REL_TOLERANCE


def test_resume_rule_says_what_changes_with_the_device_count():
    """The three cases of _say_device_change, on the values it reads (the real method, not a copy)."""
    def said(world, batch, accum, state):
        lines = []
        me = SimpleNamespace(dist=Group(0, world), batch=batch, effective_batch=batch * accum,
                             events=SimpleNamespace(log=lambda level, msg: lines.append((level, msg))))
        Trainer._say_device_change(me, state)
        return lines

    assert said(2, 4, 1, {"num_devices": 2, "effective_batch": 4, "global_batch": 4}) == []
    assert said(1, 4, 1, {}) == []  # a checkpoint from before data parallelism: one device
    [(level, msg)] = said(1, 4, 1, {"num_devices": 2, "effective_batch": 4, "global_batch": 4})
    assert level == "info" and "continues as the uninterrupted one would" in msg
    [(level, msg)] = said(1, 2, 2, {"num_devices": 2, "effective_batch": 4, "global_batch": 4})
    assert level == "warning" and "cut differently (2 per pass, was 4)" in msg
    [(level, msg)] = said(4, 8, 1, {"num_devices": 2, "effective_batch": 4, "global_batch": 4})
    assert level == "warning" and "effective batch changes from 4 to 8" in msg


def test_shards_and_core_shares():
    assert [Group(r, 2).shard(4) for r in (0, 1)] == [slice(0, 2), slice(2, 4)]
    assert [Group(r, 2).shard(1) for r in (0, 1)] == [slice(0, 0), slice(0, 1)]  # a short batch: one rank idles
    assert [Group(r, 3).shard(7) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert cpu_shares([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert cpu_shares([0, 1, 2], 2) == [[0], [1, 2]]
    assert cpu_shares([5], 2) is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _interrupt_two_ranks(tiny_model, dataset, out: Path, spec_extra: dict, when: str, act, what: str):
    """Runs a 2-rank engine until its first `when` event (after it named its ranks' pids), calls act(proc, pids),
    and waits for it to end. Returns (exit code, stderr, events, rank pids); a hang fails the test."""
    spec_path = out.parent / f"{out.name}-spec.json"
    spec_path.write_text(json.dumps(spec(tiny_model, dataset, 2, 2, maxTrainSteps=400, **spec_extra)))
    proc = subprocess.Popen(engine_cmd("train", "--spec", str(spec_path), "--output-dir", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=engine_env())
    lines, pids = [], None
    for line in proc.stdout:
        lines.append(line)
        ev = json.loads(line)
        if pids is None and (m := re.search(r"data parallel: 2 ranks \(pids (\d+), (\d+);",
                                            ev.get("log", {}).get("message", ""))):
            pids = int(m.group(1)), int(m.group(2))
        if when in ev:
            act(proc, pids)
            break
    lines += proc.stdout.readlines()
    try:
        rc = proc.wait(timeout=180)  # a guard against a hang, not a timing assertion
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the engine hung after {what}") from None
    return rc, proc.stderr.read(), parse_events("".join(lines)), pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_rank_ends_the_job_with_a_retryable_error(tiny_model, dataset, tmp_path):
    out = tmp_path / "killed"
    rc, stderr, events, pids = _interrupt_two_ranks(
        tiny_model, dataset, out, {"checkpointingSteps": 2}, "checkpoint",
        lambda proc, pids: os.kill(pids[1], signal.SIGKILL), "one of its ranks was killed")  # rank 1, mid-run
    assert rc == EXIT_RANK_LOST, stderr[-3000:]
    assert not _alive(pids[0]), "rank 0 outlived the launcher"
    [state] = of_kind(events, "state")
    assert state.state == job_pb2.JOB_STATE_FAILED and state.error.code == 14  # UNAVAILABLE: retry
    assert re.search(r"rank 1 of 2 \(pid \d+\) was killed by SIGKILL; .* a retry resumes from the last checkpoint",
                     state.error.message), state.error.message
    assert of_kind(events, "log")[-1].message == state.error.message
    # What a retry resumes from is whole.
    saved = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert (out / "checkpoints" / f"checkpoint-{saved}" / "training_state.json").is_file()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_every_rank_after_the_same_step(tiny_model, dataset, tmp_path):
    out = tmp_path / "stopped"
    rc, stderr, events, pids = _interrupt_two_ranks(
        tiny_model, dataset, out, {"checkpointingSteps": 1000}, "metrics",
        lambda proc, pids: proc.send_signal(signal.SIGTERM), "SIGTERM")  # as the worker stops a job
    assert rc == 4, stderr[-3000:]
    assert not any(_alive(p) for p in pids)
    stopped_at = of_kind(events, "metrics")[-1].step
    assert [c.step for c in of_kind(events, "checkpoint")] == [stopped_at]
    assert of_kind(events, "log")[-1].message == f"stopped at step {stopped_at}"
    assert not of_kind(events, "state")
    state = json.loads((out / "checkpoints" / f"checkpoint-{stopped_at}" / "training_state.json").read_text())
    assert state["step"] == stopped_at and state["num_devices"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("devices", [1, 2])
def test_cuda_without_a_gpu_fails_clearly(tiny_model, dataset, tmp_path, devices):
    rc, events, stderr = run_train(spec(tiny_model, dataset, devices, 2, deviceKind="DEVICE_KIND_CUDA"),
                                   tmp_path / "cuda")
    assert rc == 2, stderr[-3000:]
    [state] = of_kind(events, "state")
    assert state.state == job_pb2.JOB_STATE_FAILED and state.error.code == 3  # INVALID_ARGUMENT
    assert f"device_kind: the job needs {devices} CUDA device" in state.error.message
    assert "this worker sees 0" in state.error.message
