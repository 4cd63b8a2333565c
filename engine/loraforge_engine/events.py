"""Events on stdout: one proto3-JSON loraforge.v1.JobEvent per line, without job_id/sequence (the server's
worker adds them). stdout carries nothing else: `claim_stdout()` keeps a private handle on the real stdout
and points file descriptor 1 (and sys.stdout) at stderr, so library prints, progress bars and even C-level
writes land in the log instead of corrupting the event stream.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

LEVELS = {"debug": "LOG_LEVEL_DEBUG", "info": "LOG_LEVEL_INFO", "warning": "LOG_LEVEL_WARNING",
          "error": "LOG_LEVEL_ERROR"}


def claim_stdout() -> TextIO:
    """Return a line-buffered handle on the original stdout and send everything else written to
    stdout (Python or C) to stderr from now on."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)


def note(text: str) -> None:
    """Write a line for the supervisor's log to stderr. A supervisor killed outright (kill -9 of its worker)
    leaves the pipe without a reader: the write then fails with EPIPE, and the engine carries on without its log,
    toward the checkpoint it saves when the SIGTERM that the parent's death sends arrives, instead of dying of the
    error (a signal handler's failed write would surface anywhere in the training step)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError, RuntimeError):  # BrokenPipeError; stderr closed; a signal handler's write
        pass                                        # inside the main thread's ("reentrant call")


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _double(x: float) -> float | str:
    """proto3 JSON encodes non-finite doubles as strings."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_artifact(kind: str, path: str | os.PathLike, step: int, with_sha: bool = True) -> dict[str, Any]:
    p = Path(path).absolute()
    art = {"kind": kind, "path": str(p), "sizeBytes": p.stat().st_size, "step": step}
    if with_sha:
        art["sha256"] = sha256_file(p)
    return art


def folder_artifact(kind: str, path: str | os.PathLike, step: int) -> dict[str, Any]:
    p = Path(path).absolute()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return {"kind": kind, "path": str(p), "sizeBytes": size, "step": step}


class EventWriter:
    """Writes JobEvents. int64 fields are written as JSON numbers (every proto3 JSON parser accepts them)."""

    def __init__(self, out: TextIO):
        self._out = out
        self._closed = False
        self._lock = threading.RLock()  # re-entrant: a signal handler may log mid-write

    def emit(self, payload_key: str, payload: dict[str, Any]) -> None:
        line = json.dumps({"time": now_rfc3339(), payload_key: payload}, ensure_ascii=False, allow_nan=False)
        with self._lock:
            if self._closed:
                return
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except (BrokenPipeError, ValueError):
                # The supervisor is gone (e.g. its worker was killed): keep training
                # toward the checkpoint that a new worker will resume from.
                self._closed = True

    def log(self, level: str, message: str) -> None:
        self.emit("log", {"level": LEVELS[level], "message": message})
        note(f"[loraforge] {level.upper()}: {message}")

    def metrics(self, *, step: int, total_steps: int, epoch: int, loss: float, learning_rate: float,
                images_per_second: float, eta_seconds: float, grad_norm: float,
                peak_memory_bytes: int = 0, skipped_steps: int = 0) -> None:
        self.emit("metrics", {
            "step": step, "totalSteps": total_steps, "epoch": epoch, "loss": _double(loss),
            "learningRate": _double(learning_rate), "imagesPerSecond": _double(images_per_second),
            "etaSeconds": _double(eta_seconds), "gradNorm": _double(grad_norm),
            "peakMemoryBytes": int(peak_memory_bytes), "skippedSteps": int(skipped_steps),
        })

    def checkpoint(self, step: int, folder: str | os.PathLike) -> None:
        self.emit("checkpoint", {"step": step,
                                 "artifact": folder_artifact("ARTIFACT_KIND_CHECKPOINT", folder, step)})

    def validation(self, step: int, prompt: str, paths: list[str | os.PathLike]) -> None:
        self.emit("validation", {"step": step, "prompt": prompt, "images": [
            file_artifact("ARTIFACT_KIND_VALIDATION_IMAGE", p, step) for p in paths]})

    def succeeded(self, lora_path: str | os.PathLike, step: int) -> None:
        self.emit("state", {"state": "JOB_STATE_SUCCEEDED",
                            "lora": file_artifact("ARTIFACT_KIND_LORA", lora_path, step)})
