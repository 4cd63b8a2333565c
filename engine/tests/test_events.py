"""The event stream in-process: each line is a loraforge.v1.JobEvent that json_format reads back, artifacts are
named relative to the output folder, failures carry a google.rpc.Status."""

from __future__ import annotations

import hashlib
import io
import json
import math

import pytest

from loraforge_engine.contract import job_pb2, json_format
from loraforge_engine.events import FAILED_PRECONDITION, INTERNAL, INVALID_ARGUMENT, EventWriter, artifact_name


def lines_of(sink: io.StringIO) -> list[str]:
    return sink.getvalue().splitlines()


def read(line: str) -> job_pb2.JobEvent:
    return json_format.Parse(line, job_pb2.JobEvent())  # unknown fields refused


@pytest.fixture
def output(tmp_path):
    """An output folder as train leaves it: the LoRA, a checkpoint folder, a validation image."""
    out = tmp_path / "job-out"
    (out / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-20" / "training_state.json").write_text("{}")
    (out / "checkpoints" / "checkpoint-20" / "pytorch_lora_weights.safetensors").write_bytes(b"x" * 100)
    (out / "validation").mkdir()
    (out / "validation" / "step-20-0.png").write_bytes(b"\x89PNG fake")
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"lora bytes")
    return out


def test_every_event_is_a_compact_jobevent_line(output):
    sink = io.StringIO()
    ev = EventWriter(sink)
    ev.log("info", "hello — ünïcode")
    ev.metrics(step=3, total_steps=10, epoch=0, loss=0.25, learning_rate=1e-4, images_per_second=12.5,
               eta_seconds=4.0, grad_norm=float("nan"), peak_memory_bytes=2**40, skipped_steps=1)
    ev.checkpoint(20, output / "checkpoints" / "checkpoint-20", root=output)
    ev.validation(20, "a prompt", [output / "validation" / "step-20-0.png"], root=output)
    ev.succeeded(output / "pytorch_lora_weights.safetensors", 20, root=output)
    lines = lines_of(sink)
    assert len(lines) == 5
    for line in lines:
        assert line == json.dumps(json.loads(line), ensure_ascii=False, separators=(",", ":"))
        assert str(output) not in line
    log, metrics, checkpoint, validation, state = (read(line) for line in lines)

    assert log.log.level == job_pb2.LOG_LEVEL_INFO and log.log.message == "hello — ünïcode"
    assert json.loads(lines[0])["log"]["level"] == "LOG_LEVEL_INFO"  # enum value names
    m = metrics.metrics
    assert (m.step, m.total_steps, m.loss, m.peak_memory_bytes, m.skipped_steps) == (3, 10, 0.25, 2**40, 1)
    assert math.isnan(m.grad_norm) and json.loads(lines[1])["metrics"]["gradNorm"] == "NaN"
    assert json.loads(lines[1])["metrics"]["peakMemoryBytes"] == str(2**40)  # int64 as a string
    assert "epoch" not in json.loads(lines[1])["metrics"]  # proto3 JSON leaves zero values out

    art = checkpoint.checkpoint.artifact
    assert (art.kind, art.name, art.step, art.size_bytes, art.sha256) == \
        (job_pb2.ARTIFACT_KIND_CHECKPOINT, "checkpoints/checkpoint-20/", 20, 102, "")
    (img,) = validation.validation.images
    assert (img.kind, img.name, img.size_bytes) == (job_pb2.ARTIFACT_KIND_VALIDATION_IMAGE,
                                                    "validation/step-20-0.png", 9)
    assert img.sha256 == hashlib.sha256(b"\x89PNG fake").hexdigest()
    assert state.state.state == job_pb2.JOB_STATE_SUCCEEDED and not state.state.HasField("error")
    assert state.state.lora.name == "pytorch_lora_weights.safetensors"
    assert state.state.lora.sha256 == hashlib.sha256(b"lora bytes").hexdigest()
    assert all(read(line).time.ToSeconds() > 1_700_000_000 for line in lines)


@pytest.mark.parametrize("code", [INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL])
def test_a_failure_is_a_failed_state_with_a_google_rpc_status(code):
    sink = io.StringIO()
    EventWriter(sink).failed(code, "invalid spec: rank: must be …")
    (line,) = lines_of(sink)
    ev = read(line)
    assert ev.state.state == job_pb2.JOB_STATE_FAILED and not ev.state.HasField("lora")
    assert (ev.state.error.code, ev.state.error.message) == (code, "invalid spec: rank: must be …")
    assert json.loads(line)["state"]["error"] == {"code": code, "message": "invalid spec: rank: must be …"}
    assert (INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL) == (3, 9, 13)  # google.rpc.Code numbers


def test_a_file_outside_the_output_folder_has_no_name(output, tmp_path):
    stray = tmp_path / "elsewhere.png"
    stray.write_bytes(b"x")
    with pytest.raises(ValueError):
        artifact_name(output, stray)
    sink = io.StringIO()
    with pytest.raises(ValueError):
        EventWriter(sink).validation(1, "p", [stray], root=output)
    assert sink.getvalue() == ""  # nothing half-written


def test_a_closed_reader_stops_the_stream_not_the_run():
    attempts = []

    class Gone(io.StringIO):
        def write(self, s):
            attempts.append(s)
            raise BrokenPipeError

    ev = EventWriter(Gone())
    ev.log("info", "first")  # returns: training goes on toward its checkpoint
    ev.failed(INTERNAL, "second")
    assert len(attempts) == 1 and read(attempts[0]).log.message == "first"  # then the stream is closed
