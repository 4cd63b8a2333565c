"""A base model's identity: one content hash of its diffusers folder, defined here and only here.

The LoRA files a job writes record it (`loraforge.base_model_sha256`), the ONNX export is cached under it
(onnx_export.py), and the server gets it from `python -m loraforge_engine model-hash <dir>`, so all three
agree by construction. Renaming or copying the folder keeps the hash; changing any weight or config changes it.

Hashing a real model reads gigabytes (~1.3 s per GiB). `model_hash_idle` does it in a child process at idle
priority, beside training, and hurry() raises it to normal priority once the hash is needed. (A Python thread at
idle priority would take the interpreter lock with it when the kernel parks it on busy cores, and stall the
training thread: seen with other work on the machine.)
This module imports nothing heavy: the child, and `model-hash`, start in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ENGINE_DIR = str(Path(__file__).resolve().parents[1])

# What the hash covers: the parts of a diffusers folder that training, the exported graphs and the runtime
# read. text_encoder_2 / tokenizer_2 exist only in SDXL folders: SD-1.x hashes are the same as before they
# were added.
HASHED_ENTRIES = ("model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                  "unet", "vae")


def sha256_file(path: str | os.PathLike) -> str:
    """Lower-case hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hashed_files(model_dir: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the files the hash covers, sorted (names starting with '.' skipped)."""
    model_dir = Path(model_dir)
    out = []
    for entry in HASHED_ENTRIES:
        p = model_dir / entry
        if p.is_file():
            out.append(entry)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    if not name.startswith("."):
                        out.append((Path(root) / name).relative_to(model_dir).as_posix())
    return sorted(out)


def model_hash(model_dir: str | os.PathLike) -> str:
    """The base model's identity: sha256 over "<relative path>\\0<sha256 of the file>\\n" for every hashed file,
    sorted by path; the first 32 hex digits. Raises FileNotFoundError for a folder without model_index.json."""
    root = Path(model_dir)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
    h = hashlib.sha256()
    for rel in hashed_files(root):
        h.update(f"{rel}\0{sha256_file(root / rel)}\n".encode())
    return h.hexdigest()[:32]


_RUNNING: set[subprocess.Popen] = set()  # children of model_hash_idle that have not finished


def model_hash_idle(model_dir: str | os.PathLike) -> str:
    """model_hash, computed by a child process that runs only on CPU time nothing else wants (Linux) until
    hurry() is called: on a machine kept busy by other work an idle-priority process never runs at all."""
    code = f"import sys; sys.path.insert(0, {ENGINE_DIR!r}); from loraforge_engine.fingerprint import _child; _child()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(model_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _RUNNING.add(proc)
    try:
        _set_policy(proc.pid, "SCHED_IDLE")
        out, err = proc.communicate()
    finally:
        _RUNNING.discard(proc)
    if proc.returncode != 0:
        raise OSError(f"hashing base_model {str(model_dir)!r} failed: {err.strip().splitlines()[-1:]}")
    return out.strip()


def running_pids() -> list[int]:
    """The pids of the model_hash_idle children still running."""
    return [proc.pid for proc in list(_RUNNING)]


def hurry() -> None:
    """Raise every running model_hash_idle child to normal priority: its result is needed now."""
    for proc in list(_RUNNING):
        _set_policy(proc.pid, "SCHED_OTHER")


def _set_policy(pid: int, policy: str) -> None:
    if hasattr(os, policy):
        try:
            os.sched_setscheduler(pid, getattr(os, policy), os.sched_param(0))
        except OSError:  # the child has already exited
            pass


def _child() -> None:
    print(model_hash(sys.argv[1]))
