"""A base model's identity for a LoRA file's provenance: sha256 over the model folder's config and weight files.

Hashing a real model reads gigabytes (~1.3 s per GiB). `model_fingerprint_idle` does it in a child process at idle
priority, beside training, and hurry() raises it to normal priority once the hash is needed. (A Python thread at
idle priority would take the interpreter lock with it when the kernel parks it on busy cores, and stall the
training thread: seen with other work on the machine.)
This module imports nothing heavy: the child starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ENGINE_DIR = str(Path(__file__).resolve().parents[1])


def model_fingerprint(base_model: str) -> str:
    """sha256 over the model folder's config and weight files (names and bytes, sorted): the base model's
    identity for metadata, independent of where it lies."""
    root = Path(base_model)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".txt"):
            h.update(str(p.relative_to(root)).encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


_RUNNING: set[subprocess.Popen] = set()  # children of model_fingerprint_idle that have not finished


def model_fingerprint_idle(base_model: str) -> str:
    """model_fingerprint, computed by a child process that runs only on CPU time nothing else wants (Linux) until
    hurry() is called: on a machine kept busy by other work an idle-priority process never runs at all."""
    code = f"import sys; sys.path.insert(0, {ENGINE_DIR!r}); from loraforge_engine.fingerprint import _child; _child()"
    proc = subprocess.Popen([sys.executable, "-c", code, base_model], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _RUNNING.add(proc)
    try:
        _set_policy(proc.pid, "SCHED_IDLE")
        out, err = proc.communicate()
    finally:
        _RUNNING.discard(proc)
    if proc.returncode != 0:
        raise OSError(f"hashing base_model {base_model!r} failed: {err.strip().splitlines()[-1:]}")
    return out.strip()


def hurry() -> None:
    """Raise every running model_fingerprint_idle child to normal priority: its result is needed now."""
    for proc in list(_RUNNING):
        _set_policy(proc.pid, "SCHED_OTHER")


def _set_policy(pid: int, policy: str) -> None:
    if hasattr(os, policy):
        try:
            os.sched_setscheduler(pid, getattr(os, policy), os.sched_param(0))
        except OSError:  # the child has already exited
            pass


def _child() -> None:
    print(model_fingerprint(sys.argv[1]))
