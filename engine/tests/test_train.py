"""The `train` command end to end, as a subprocess on the tiny model: events, learning, the LoRA file,
bad data, SIGTERM, and resume reproducing an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (engine_cmd, engine_env, evaluation_loss, load_pipeline, of_kind, parse_events, render,
                     run_train)
from safetensors.torch import load_file

from loraforge_engine.contract import job_pb2

STEPS = 60
RANK, ALPHA = 8, 16.0


def main_spec(tiny_model: Path, dataset: Path) -> dict:
    # Random crops (a third of the images are 5:4) and flips, so resume must reproduce augmentation too.
    return {
        "baseModel": str(tiny_model), "datasetDir": str(dataset), "resolution": 64, "trainBatchSize": 4,
        "maxTrainSteps": STEPS, "learningRate": 3e-3, "lrScheduler": "LR_SCHEDULER_CONSTANT", "lrWarmupSteps": 0,
        "rank": RANK, "loraAlpha": ALPHA, "randomFlip": True, "centerCrop": False, "seed": "7",
        "checkpointingSteps": 20, "validationPrompt": "a red circle on a blue background",
        "numValidationImages": 2, "validationSteps": 30, "validationInferenceSteps": 2,
    }


@pytest.fixture(scope="module")
def main_run(tiny_model, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "main"
    rc, events, stderr = run_train(main_spec(tiny_model, dataset), out)
    assert rc == 0, stderr[-3000:]
    return out, events


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def test_event_stream(main_run):
    # parse_events has read every line as a JobEvent with json_format; here its content.
    out, events = main_run
    metrics = of_kind(events, "metrics")
    assert [m.step for m in metrics] == list(range(1, STEPS + 1))
    assert all(m.total_steps == STEPS for m in metrics)
    assert [m.epoch for m in metrics] == [(s - 1) // 4 for s in range(1, STEPS + 1)]  # 16 images / batch 4
    for m in metrics:
        assert m.skipped_steps == 0  # no fp16 gradient scaler on CPU
        assert m.peak_memory_bytes == 0  # CPU
        assert m.loss > 0 and m.learning_rate == pytest.approx(3e-3) and m.grad_norm > 0 and m.images_per_second > 0
    assert metrics[-1].eta_seconds == 0 and metrics[0].eta_seconds > 0

    # Artifacts are named by their path in the output folder; the worker joins the name to it.
    checkpoints = of_kind(events, "checkpoint")
    assert [c.step for c in checkpoints] == [20, 40, 60]
    for c in checkpoints:
        art = c.artifact
        assert art.kind == job_pb2.ARTIFACT_KIND_CHECKPOINT and art.step == c.step and art.sha256 == ""
        assert art.name == f"checkpoints/checkpoint-{c.step}/"
        folder = out / art.name
        assert art.size_bytes == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert (folder / "pytorch_lora_weights.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*"))

    validations = of_kind(events, "validation")
    assert [v.step for v in validations] == [30, 60]
    for v in validations:
        assert v.prompt == "a red circle on a blue background" and len(v.images) == 2
        for i, img in enumerate(v.images):
            assert img.name == f"validation/step-{v.step}-{i}.png"
            assert img.kind == job_pb2.ARTIFACT_KIND_VALIDATION_IMAGE and img.step == v.step
            assert img.sha256 == hashlib.sha256((out / img.name).read_bytes()).hexdigest()

    logs = of_kind(events, "log")
    assert all(log.level == job_pb2.LOG_LEVEL_INFO for log in logs)
    last = events[-1]
    assert last.WhichOneof("payload") == "state" and last.state.state == job_pb2.JOB_STATE_SUCCEEDED
    assert not last.state.HasField("error")
    lora = last.state.lora
    assert lora.name == "pytorch_lora_weights.safetensors"
    path = out / lora.name
    assert lora.kind == job_pb2.ARTIFACT_KIND_LORA and lora.step == STEPS
    assert lora.size_bytes == path.stat().st_size
    assert lora.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(of_kind(events, "state")) == 1
    times = [e.time.ToNanoseconds() for e in events]
    assert times == sorted(times) and times[0] > 0


def test_event_lines_are_compact_proto3_json(main_run, tiny_model, dataset, tmp_path):
    """The raw stdout: one compact JSON object per line, proto3 JSON as json_format writes it (camelCase names,
    enum value names, int64 as strings), with no host path in it."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**main_spec(tiny_model, dataset), "maxTrainSteps": 2, "checkpointingSteps": 1,
                                     "validationSteps": 1, "numValidationImages": 1}))
    out = tmp_path / "out"
    proc = subprocess.run(engine_cmd("train", "--spec", str(spec_path), "--output-dir", str(out)),
                          capture_output=True, text=True, env=engine_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines and all(line == json.dumps(json.loads(line), ensure_ascii=False, separators=(",", ":"))
                         for line in lines)
    assert not [line for line in lines if str(tmp_path) in line and '"log"' not in line]  # log lines are prose
    first_metrics = next(json.loads(line)["metrics"] for line in lines if '"metrics"' in line)
    assert first_metrics["step"] == "1" and first_metrics["totalSteps"] == "2"  # int64: strings
    checkpoint = next(json.loads(line)["checkpoint"] for line in lines if '"checkpoint"' in line)
    assert checkpoint["artifact"]["kind"] == "ARTIFACT_KIND_CHECKPOINT"
    assert checkpoint["artifact"]["name"] == "checkpoints/checkpoint-1/"
    assert json.loads(lines[-1])["state"]["lora"]["name"] == "pytorch_lora_weights.safetensors"
    assert json.loads(lines[-1])["time"].endswith("Z")


def test_lora_file_is_diffusers_format(main_run):
    out, _ = main_run
    tensors = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert tensors and all(k.startswith("unet.") and (k.endswith(".lora.down.weight") or k.endswith(".lora.up.weight"))
                           for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("down.weight")} == {RANK}


def test_loss_on_fixed_batch_falls(main_run, tiny_model, dataset):
    out, _ = main_run
    pipe = load_pipeline(tiny_model)
    before = evaluation_loss(pipe, dataset)
    pipe.load_lora_weights(str(out))
    after = evaluation_loss(pipe, dataset)
    print(f"fixed-batch loss: before {before:.4f}, after {after:.4f}")
    assert after < 0.85 * before


def test_lora_loads_changes_image_and_scale_zero_is_base(main_run, tiny_model):
    out, _ = main_run
    pipe = load_pipeline(tiny_model)
    base = render(pipe)
    pipe.load_lora_weights(str(out), adapter_name="trained")
    # alpha != rank: the adapter metadata in the file must restore alpha / rank = 2.
    lora_layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert lora_layer.scaling["trained"] == pytest.approx(ALPHA / RANK)
    with_lora = render(pipe)
    assert with_lora.shape == base.shape
    assert abs(with_lora - base).max() > 1e-3
    scale_zero = render(pipe, cross_attention_kwargs={"scale": 0.0})
    assert abs(scale_zero - base).max() < 1e-5
    pipe.set_adapters(["trained"], adapter_weights=[0.0])
    assert abs(render(pipe) - base).max() < 1e-5


def test_resume_from_checkpoint_equals_uninterrupted(main_run, tiny_model, dataset, tmp_path):
    out, _ = main_run
    rc, events, stderr = run_train(main_spec(tiny_model, dataset), tmp_path / "resumed",
                                   "--resume-from", str(out / "checkpoints" / "checkpoint-20"))
    assert rc == 0, stderr[-3000:]
    assert [m.step for m in of_kind(events, "metrics")] == list(range(21, STEPS + 1))
    diff = max_abs_diff(out / "pytorch_lora_weights.safetensors",
                        tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    print(f"resume from checkpoint-20: largest abs diff {diff:g}")
    assert diff <= 1e-6


def test_sigterm_saves_checkpoint_and_resume_latest_matches(main_run, tiny_model, dataset, tmp_path):
    out_main, _ = main_run
    out = tmp_path / "interrupted"
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(main_spec(tiny_model, dataset)))
    proc = subprocess.Popen(engine_cmd("train", "--spec", str(spec_path), "--output-dir", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=engine_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        ev = json.loads(line)
        if "metrics" in ev and int(ev["metrics"]["step"]) == 3:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 4
    events = parse_events("".join(lines))
    steps = [m.step for m in of_kind(events, "metrics")]
    stopped_at = steps[-1]
    assert 3 <= stopped_at < STEPS and steps == list(range(1, stopped_at + 1))
    assert of_kind(events, "checkpoint")[-1].step == stopped_at
    assert (out / "checkpoints" / f"checkpoint-{stopped_at}" / "training_state.json").is_file()
    assert of_kind(events, "log")[-1].message == f"stopped at step {stopped_at}"
    assert not of_kind(events, "state")  # stopped: neither succeeded nor failed
    assert not (out / "pytorch_lora_weights.safetensors").exists()

    rc, events, stderr = run_train(main_spec(tiny_model, dataset), out, "--resume-from", "latest")
    assert rc == 0, stderr[-3000:]
    assert of_kind(events, "metrics")[0].step == stopped_at + 1
    diff = max_abs_diff(out_main / "pytorch_lora_weights.safetensors", out / "pytorch_lora_weights.safetensors")
    print(f"SIGTERM at step {stopped_at} + resume latest: largest abs diff {diff:g}")
    assert diff <= 1e-6


SUPERVISOR = """
import json, os, signal, subprocess, sys
engine = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, LORAFORGE_SUPERVISOR_PID=str(os.getpid())))
print(engine.pid, flush=True)
for line in engine.stdout:
    if json.loads(line).get("metrics", {}).get("step") == "3":
        os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 of a worker: the engine's pipes lose their reader
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the parent-death signal is Linux's")
def test_an_orphaned_engine_saves_a_checkpoint_and_exits(tiny_model, dataset, tmp_path):
    """The worker supervising the engine is killed outright: the engine gets SIGTERM from the kernel, its event
    and log pipes have no reader any more, and it must still finish its step, save a checkpoint and exit."""
    import time

    out = tmp_path / "orphaned"
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**main_spec(tiny_model, dataset), "maxTrainSteps": 10_000}))
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, *engine_cmd(
        "train", "--spec", str(spec_path), "--output-dir", str(out))], stdout=subprocess.PIPE, env=engine_env())
    engine_pid = int(supervisor.stdout.readline())
    assert supervisor.wait(timeout=120) == -signal.SIGKILL
    # A Node worker killed with -9 gets its engine two SIGTERMs 0.4 ms apart; one more here makes that burst.
    # The engine must take it as one request (a second Ctrl-C a second later would mean: exit at once).
    if _running(engine_pid):
        os.kill(engine_pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while _running(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(engine_pid), "the orphaned engine kept running"
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert saved and saved[-1] >= 3  # the step it was on when its supervisor died, or a later one
    assert (out / "checkpoints" / f"checkpoint-{saved[-1]}" / "training_state.json").is_file()
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_stop_on_signal_takes_a_burst_as_one_request_and_a_later_signal_as_exit_now():
    import io

    from loraforge_engine.__main__ import EXIT_STOPPED, StopOnSignal
    from loraforge_engine.events import EventWriter

    now, exits, out = [100.0], [], io.StringIO()
    stop = StopOnSignal(EventWriter(out), exit_now=exits.append, clock=lambda: now[0])
    assert not stop.is_set()
    stop.handle(signal.SIGTERM)
    assert stop.is_set() and not exits
    now[0] += 0.0004  # the kernel's second SIGTERM when a Node worker dies
    stop.handle(signal.SIGTERM)
    assert not exits and out.getvalue() == ""
    now[0] += StopOnSignal.AGAIN_AFTER_S  # a user's second Ctrl-C
    stop.handle(signal.SIGINT)
    assert exits == [EXIT_STOPPED]
    assert "SIGINT received again; exiting without a checkpoint" in out.getvalue()


def test_corrupt_image_is_skipped_and_reported(tiny_model, dataset, tmp_path):
    # A bad image never kills a run: it is left out, named in the data set report (before the first step) with
    # its reason, and the run trains on the rest.
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    bad = data / "0005.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    spec = {**main_spec(tiny_model, data), "maxTrainSteps": 2, "validationPrompt": None}
    rc, events, stderr = run_train(spec, tmp_path / "out")
    assert rc == 0, stderr[-3000:]
    (report,) = of_kind(events, "dataset")
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds.index("dataset") < kinds.index("metrics")
    assert (report.images_found, report.images_used, report.skipped_total) == (16, 15, 1)
    (skip,) = report.skipped
    assert skip.name == "0005.png" and skip.reason == job_pb2.SKIP_REASON_CORRUPT and "decoded" in skip.detail
    assert str(tmp_path) not in skip.detail  # names relative to the set: no host path leaves the engine
    assert report.caption_source == job_pb2.CAPTION_SOURCE_METADATA_JSONL
    assert sum(s.images for s in report.sizes) == 15 and report.other_sizes == 0
    assert [(b.width, b.height, b.images, b.batches) for b in report.buckets] == [(64, 64, 15, 4)]
    # random crop: only the square images (64x64, already the training size) have cacheable latents.
    assert report.latents_cached == sum(s.images for s in report.sizes if s.width == s.height == 64)
    assert report.latents_cached_flipped and report.text_embeddings_cached
    warnings = [log.message for log in of_kind(events, "log") if log.level == job_pb2.LOG_LEVEL_WARNING]
    assert any("skipped 1 of 16 images: 1 corrupt (0005.png)" in w for w in warnings), warnings
    assert [m.step for m in of_kind(events, "metrics")] == [1, 2]


def test_nothing_usable_fails_fast_naming_why(tiny_model, dataset, tmp_path):
    # Every image corrupt or too small: FAILED_PRECONDITION before any step, after a report that lists them.
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for img in sorted(data.glob("*.png"))[1::2]:
        img.write_bytes(b"not an image")
    rc, events, _ = run_train({**main_spec(tiny_model, data), "minImageSide": 65, "validationPrompt": None},
                              tmp_path / "out")
    assert rc == 3
    assert not of_kind(events, "metrics")
    (report,) = of_kind(events, "dataset")
    assert (report.images_found, report.images_used, report.skipped_total) == (16, 0, 16)
    reasons = sorted(job_pb2.SkipReason.Name(s.reason) for s in report.skipped)
    assert reasons == ["SKIP_REASON_CORRUPT"] * 8 + ["SKIP_REASON_TOO_SMALL"] * 8
    message, code, _ = failure(events)
    assert code == 9 and "no captioned images" in message
    assert "8 corrupt (0001.png, 0003.png" in message and "8 too_small (0000.png" in message, message
    assert "Traceback" not in message and "\n" not in message and str(tmp_path) not in message


def failure(events) -> tuple[str, int, str]:
    """The ERROR log line and the FAILED state's google.rpc.Status an engine that failed ends with."""
    *_, log_ev, state_ev = events
    assert log_ev.log.level == job_pb2.LOG_LEVEL_ERROR
    assert state_ev.state.state == job_pb2.JOB_STATE_FAILED and state_ev.state.error.message == log_ev.log.message
    return log_ev.log.message, state_ev.state.error.code, state_ev.state.error.message


def test_invalid_spec_and_missing_inputs(tiny_model, dataset, tmp_path):
    # Several rules broken at once: every field is named, the error is INVALID_ARGUMENT (3), exit 2.
    rc, events, _ = run_train({**main_spec(tiny_model, dataset), "rank": 0, "resolution": 100,
                               "lrScheduler": "cosine", "targetModules": ["to q"]}, tmp_path / "a")
    assert rc == 2
    message, code, _ = failure(events)
    assert code == 3 and message.startswith("invalid spec: ")
    assert all(f in message for f in ("rank:", "resolution:", "target_modules[0]:", "lr_scheduler:")), message

    rc, events, _ = run_train({**main_spec(tmp_path / "no-such-model", dataset)}, tmp_path / "b")
    message, code, _ = failure(events)
    assert rc == 3 and code == 9 and "no-such-model" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    rc, events, _ = run_train({**main_spec(tiny_model, empty)}, tmp_path / "c")
    message, code, _ = failure(events)
    assert rc == 3 and code == 9 and "no captioned images" in message

    # A checkpoint artifact name is the worker's to restore; the engine refuses it rather than guess a folder.
    rc, events, _ = run_train({**main_spec(tiny_model, dataset), "resumeFromCheckpoint": "jobs/job-1/checkpoint-20/"},
                              tmp_path / "d")
    message, code, _ = failure(events)
    assert rc == 2 and code == 3 and "resume_from_checkpoint" in message


def test_accumulation_schedule_fp16_fallback_and_txt_captions(tiny_model, tmp_path):
    from loraforge_engine.tiny import make_dataset

    data = make_dataset(tmp_path / "txt", count=10, size=64, seed=5, fmt="txt")
    spec = {"baseModel": str(tiny_model), "datasetDir": str(data), "resolution": 64, "trainBatchSize": 3,
            "gradientAccumulationSteps": 2, "numTrainEpochs": 2, "learningRate": 1e-3,
            "lrScheduler": "LR_SCHEDULER_LINEAR", "lrWarmupSteps": 2, "mixedPrecision": "MIXED_PRECISION_FP16",
            "checkpointingSteps": 1000, "seed": 3,
            "maxGradNorm": 1e-4}
    rc, events, stderr = run_train(spec, tmp_path / "out")
    assert rc == 0, stderr[-3000:]
    warnings = [log for log in of_kind(events, "log") if log.level == job_pb2.LOG_LEVEL_WARNING]
    assert any("fp16" in w.message for w in warnings)
    metrics = of_kind(events, "metrics")
    # 10 images / batch 3 = 4 batches per epoch (last has 1) -> 2 optimizer steps per epoch, 2 epochs.
    assert [(m.step, m.epoch) for m in metrics] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    # linear warm-up over 2 optimizer steps, then linear decay to 0 at step 4.
    assert [m.learning_rate for m in metrics] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
    assert of_kind(events, "checkpoint") == []
    assert events[-1].state.lora.step == 4


def test_bf16_on_cpu_runs_under_autocast(tiny_model, dataset, tmp_path):
    spec = {**main_spec(tiny_model, dataset), "mixedPrecision": "MIXED_PRECISION_BF16", "maxTrainSteps": 3,
            "validationPrompt": None, "checkpointingSteps": 3}
    rc, events, stderr = run_train(spec, tmp_path / "out")
    assert rc == 0, stderr[-3000:]
    assert [m.step for m in of_kind(events, "metrics")] == [1, 2, 3]
    assert any("mixed precision: bf16" in log.message for log in of_kind(events, "log"))
    tensors = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())  # LoRA parameters stay fp32
