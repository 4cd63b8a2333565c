"""Events on stdout: one loraforge.v1.JobEvent per line, built with the generated messages and written by
json_format as compact proto3 JSON (lowerCamelCase names, enum value names, int64 as strings, zero values
left out), without job_id/sequence (the server's worker adds them). stdout carries nothing else:
`claim_stdout()` keeps a private handle on the real stdout and points file descriptor 1 (and sys.stdout) at
stderr, so library prints, progress bars and even C-level writes land in the log instead of corrupting the
event stream.

Artifacts are named by their path relative to the job's output folder, POSIX separators, a folder ending in
"/" ("pytorch_lora_weights.safetensors", "checkpoints/checkpoint-500/", "validation/step-30-0.png"): no host
path leaves the engine; the worker maps each name to its file and gives it its public name. A failure is
reported as a google.rpc.Status (FAILED with an error) before the engine exits non-zero.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from .contract import job_pb2, json_format, status_pb2
from .fingerprint import sha256_file

LEVELS = {"debug": job_pb2.LOG_LEVEL_DEBUG, "info": job_pb2.LOG_LEVEL_INFO, "warning": job_pb2.LOG_LEVEL_WARNING,
          "error": job_pb2.LOG_LEVEL_ERROR}
# google.rpc.Code numbers of the failures the engine reports (exit codes 2, 3 and 1).
INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL = 3, 9, 13


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


def artifact_name(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """`path`'s name relative to the output folder `root`, POSIX separators, "/" at the end of a folder.
    Raises ValueError for a path outside `root` (it would have no name the worker can map)."""
    p = Path(path).absolute()
    name = p.relative_to(Path(root).absolute()).as_posix()
    return name + "/" if p.is_dir() else name


def file_artifact(kind: int, root: str | os.PathLike, path: str | os.PathLike, step: int) -> job_pb2.Artifact:
    p = Path(path)
    return job_pb2.Artifact(kind=kind, name=artifact_name(root, p), size_bytes=p.stat().st_size,
                            sha256=sha256_file(p), step=step)


def folder_artifact(kind: int, root: str | os.PathLike, path: str | os.PathLike, step: int) -> job_pb2.Artifact:
    """A folder: the size of its files together, no sha256."""
    p = Path(path)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return job_pb2.Artifact(kind=kind, name=artifact_name(root, p), size_bytes=size, step=step)


class EventWriter:
    """Writes JobEvents, one compact proto3-JSON line each. The methods that report files take `root`, the job's
    output folder, which their artifacts are named relative to (see artifact_name)."""

    def __init__(self, out: TextIO):
        self._out = out
        self._closed = False
        self._lock = threading.RLock()  # re-entrant: a signal handler may log mid-write

    @property
    def stream(self) -> TextIO:
        return self._out

    def emit(self, event: job_pb2.JobEvent) -> None:
        """Stamp `event` with the current time and write it."""
        event.time.GetCurrentTime()
        self.forward(json.dumps(json_format.MessageToDict(event), ensure_ascii=False, separators=(",", ":")))

    def forward(self, line: str) -> None:
        """Write one event line as it is (the data-parallel launcher passing on rank 0's events)."""
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
        self.emit(job_pb2.JobEvent(log=job_pb2.LogLine(level=LEVELS[level], message=message)))
        note(f"[loraforge] {level.upper()}: {message}")

    def metrics(self, *, step: int, total_steps: int, epoch: int, loss: float, learning_rate: float,
                images_per_second: float, eta_seconds: float, grad_norm: float,
                peak_memory_bytes: int = 0, skipped_steps: int = 0) -> None:
        self.emit(job_pb2.JobEvent(metrics=job_pb2.StepMetrics(
            step=step, total_steps=total_steps, epoch=epoch, loss=loss, learning_rate=learning_rate,
            images_per_second=images_per_second, eta_seconds=eta_seconds, grad_norm=grad_norm,
            peak_memory_bytes=int(peak_memory_bytes), skipped_steps=int(skipped_steps))))

    def dataset_report(self, report: job_pb2.DatasetReport) -> None:
        """What the run trains on (images used, skipped and why, sizes, buckets, caches), before its first step."""
        self.emit(job_pb2.JobEvent(dataset=report))
        note(f"[loraforge] data set: {report.images_used} of {report.images_found} images used, "
             f"{report.skipped_total} skipped")

    def class_images(self, *, class_prompt: str, total: int, given: int, cached: int, generated: int,
                     to_generate: int, done: bool) -> None:
        """Prior preservation: how many class images are ready, while the missing ones are generated."""
        self.emit(job_pb2.JobEvent(class_images=job_pb2.ClassImageProgress(
            class_prompt=class_prompt, total=total, given=given, cached=cached, generated=generated,
            to_generate=to_generate, done=done)))
        note(f"[loraforge] class images: {given} given, {cached} cached, {generated} of {to_generate} generated"
             f"{' (ready)' if done else ''}")

    def checkpoint(self, step: int, folder: str | os.PathLike, *, root: str | os.PathLike) -> None:
        art = folder_artifact(job_pb2.ARTIFACT_KIND_CHECKPOINT, root, folder, step)
        self.emit(job_pb2.JobEvent(checkpoint=job_pb2.CheckpointSaved(step=step, artifact=art)))

    def validation(self, step: int, prompt: str, paths: list[str | os.PathLike], *,
                   root: str | os.PathLike) -> None:
        images = [file_artifact(job_pb2.ARTIFACT_KIND_VALIDATION_IMAGE, root, p, step) for p in paths]
        self.emit(job_pb2.JobEvent(validation=job_pb2.ValidationImages(step=step, prompt=prompt, images=images)))

    def succeeded(self, lora_path: str | os.PathLike, step: int, *, root: str | os.PathLike) -> None:
        lora = file_artifact(job_pb2.ARTIFACT_KIND_LORA, root, lora_path, step)
        self.emit(job_pb2.JobEvent(state=job_pb2.StateChanged(state=job_pb2.JOB_STATE_SUCCEEDED, lora=lora)))

    def failed(self, code: int, message: str) -> None:
        """The run failed: `code` a google.rpc.Code number (INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL)."""
        error = status_pb2.Status(code=code, message=message)
        self.emit(job_pb2.JobEvent(state=job_pb2.StateChanged(state=job_pb2.JOB_STATE_FAILED, error=error)))
