"""A base model's identity for a LoRA file's provenance: sha256 over the model folder's config and weight files.

Hashing a real model reads gigabytes (~1.3 s per GiB). `model_fingerprint_idle` does it in a child process at idle
priority, beside training: a Python thread at idle priority would take the interpreter lock with it when the
kernel parks it on busy cores, and stall the training thread (seen with other work on the machine).
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


def model_fingerprint_idle(base_model: str) -> str:
    """model_fingerprint, computed by a child process that runs only on CPU time nothing else wants (Linux)."""
    code = f"import sys; sys.path.insert(0, {ENGINE_DIR!r}); from loraforge_engine.fingerprint import _child; _child()"
    proc = subprocess.run([sys.executable, "-c", code, base_model], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"hashing base_model {base_model!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip()


def _child() -> None:
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    print(model_fingerprint(sys.argv[1]))
