"""Resumable checkpoints: <output>/checkpoints/checkpoint-<step>/

  pytorch_lora_weights.safetensors  the LoRA so far, diffusers format (usable on its own)
  training_state.safetensors        every tensor needed to resume: LoRA parameters by name, AdamW moments,
                                    torch/CUDA RNG states
  training_state.json               everything else: step, epoch, data position, seed, spec, optimizer
                                    hyper-parameters, lr-scheduler and GradScaler state, python/numpy RNG

No pickle anywhere, so loading a checkpoint cannot execute code. A checkpoint is written into a temporary
folder beside its final place, fsynced, and renamed: a crash leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and
             (p / STATE_JSON).is_file()]
    return max(found)[1] if found else None


def rotate(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (oldest first); return what was deleted. Only
    checkpoint-<step> folders under checkpoints/ are touched, never the final LoRA beside them."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())
    removed = []
    for _, p in found[:max(0, len(found) - keep)]:
        # Rename first: a crash mid-delete leaves a .tmp- folder (cleaned at start), never half a checkpoint.
        doomed = root / f".tmp-old-{p.name}-{os.getpid()}"
        os.rename(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(p)
    return removed


def remove_stale_temporaries(output_dir: str | os.PathLike) -> None:
    """Left-overs of a run killed while writing a checkpoint."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [version, list(internal), gauss],
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return js, tensors


def set_rng_state(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def save(output_dir: str | os.PathLike, step: int, *, write_lora, params: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, param_names: list[str], lr_scheduler, scaler,
         info: dict[str, Any]) -> Path:
    """Write checkpoint-<step> atomically and return its path. `write_lora(folder)` writes the diffusers
    LoRA file; `param_names[i]` names the optimizer's i-th parameter."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    write_lora(tmp)
    tensors: dict[str, torch.Tensor] = {f"param.{n}": t.detach().float().cpu().contiguous()
                                        for n, t in params.items()}
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{param_names[idx]}.{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(param_names[idx], {})[key] = value
    rng_js, rng_tensors = rng_state()
    tensors.update(rng_tensors)
    save_file(tensors, str(tmp / STATE_TENSORS))

    groups = []
    for g in opt["param_groups"]:
        g = dict(g)
        g["params"] = [param_names[i] for i in g["params"]]
        groups.append(g)
    state = {
        **info,
        "step": step,
        "optimizer": {"param_groups": groups, "scalars": opt_scalars},
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_js,
    }
    with open(tmp / STATE_JSON, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1, default=_json_default)

    _fsync_tree(tmp)
    if final.exists():  # e.g. a run resumed from an earlier checkpoint reaches this step again
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint")


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(path)
    with open(folder / STATE_JSON, encoding="utf-8") as f:
        state = json.load(f)
    return state, load_file(str(folder / STATE_TENSORS))


def restore(state: dict[str, Any], tensors: dict[str, torch.Tensor], *, params: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer, param_names: list[str], lr_scheduler, scaler) -> None:
    """Put a loaded checkpoint back into live objects (in place)."""
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks LoRA parameters such as {missing[0]!r} (different rank or model?)")
    with torch.no_grad():
        for n, p in params.items():
            src = tensors[f"param.{n}"]
            if src.shape != p.shape:
                raise ValueError(f"checkpoint parameter {n!r} has shape {tuple(src.shape)}, "
                                 f"this run expects {tuple(p.shape)} (different rank?)")
            p.copy_(src)
    index = {n: i for i, n in enumerate(param_names)}
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, _, field = key[len("optimizer."):].rpartition(".")
            opt_state.setdefault(index[name], {})[field] = value
    for name, scalars in state["optimizer"]["scalars"].items():
        opt_state.setdefault(index[name], {}).update(scalars)
    groups = []
    for g in state["optimizer"]["param_groups"]:
        g = dict(g)
        g["params"] = [index[n] for n in g["params"]]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], tensors)
