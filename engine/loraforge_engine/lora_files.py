"""LoRA files that load everywhere, with what they are written in their safetensors header.

diffusers format (`pytorch_lora_weights.safetensors`): keys `unet.<module>.lora.down.weight` /
`.lora.up.weight` and `text_encoder[_2].<module>.lora_linear_layer.{down,up}.weight`, as diffusers' own
training scripts write them, plus peft's adapter config under the header key `lora_adapter_metadata`, from
which diffusers' `load_lora_weights` rebuilds alpha (so alpha != rank loads at the trained scale).

kohya / A1111 format: keys `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight` and a scalar
`.alpha` per module; text encoders as `lora_te_` (SD 1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL). Loaders
that know nothing of peft (A1111, ComfyUI) scale each module by alpha / rank from that tensor. It must not
carry `lora_adapter_metadata` (diffusers refuses a file with both alphas and adapter metadata).

Both carry the provenance keys `loraforge.*` (base model name and content hash, rank, alpha, target modules,
steps, resolution, data set size and hash, the full spec as JSON) and the `ss_*` keys that A1111/ComfyUI
front ends display.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key
KOHYA_TE_PREFIX = {"sd": {"text_encoder": "lora_te_"},
                   "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}


def provenance(*, base_model: str, base_model_sha256: str, arch: str, rank: int, alpha: float,
               unet_targets: list[str], text_encoder_targets: list[str], steps: int, resolution: int,
               dataset_size: int, dataset_sha256: str, spec: dict[str, Any]) -> dict[str, str]:
    """Header metadata (str -> str, as safetensors requires)."""
    return {
        "loraforge.base_model": Path(base_model).name,
        "loraforge.base_model_sha256": base_model_sha256,
        "loraforge.arch": arch,
        "loraforge.rank": str(rank),
        "loraforge.alpha": repr(float(alpha)),
        "loraforge.target_modules": json.dumps(unet_targets),
        "loraforge.text_encoder_target_modules": json.dumps(text_encoder_targets),
        "loraforge.steps": str(steps),
        "loraforge.resolution": str(resolution),
        "loraforge.dataset_size": str(dataset_size),
        "loraforge.dataset_sha256": dataset_sha256,
        "loraforge.spec": json.dumps(spec, sort_keys=True),
        # The keys kohya's sd-scripts write; A1111 and ComfyUI show them.
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(float(alpha)),
        "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_num_train_images": str(dataset_size),
        "ss_sd_model_name": Path(base_model).name,
    }


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_diffusers(path: Path, parts: dict[str, dict[str, torch.Tensor]], adapter_configs: dict[str, dict],
                   metadata: dict[str, str]) -> Path:
    """`parts`: component name ("unet", "text_encoder", "text_encoder_2") -> its diffusers-format LoRA
    state dict (convert_state_dict_to_diffusers of peft's); `adapter_configs`: component -> peft config dict."""
    tensors = {f"{part}.{k}": v for part, sd in parts.items() for k, v in sd.items()}
    packed = {f"{part}.{k}": v for part, cfg in adapter_configs.items() for k, v in cfg.items()}
    header = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True), **metadata}
    return _atomic_save(tensors, path, header)


def to_kohya(arch: str, peft_parts: dict[str, dict[str, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    """peft state dicts (`<module>.lora_A.weight` / `.lora_B.weight`, per component) -> kohya keys."""
    out: dict[str, torch.Tensor] = {}
    for part, sd in peft_parts.items():
        prefix = "lora_unet_" if part == "unet" else KOHYA_TE_PREFIX[arch][part]
        for key, value in sd.items():
            for peft_suffix, kohya_suffix in ((".lora_A.weight", ".lora_down.weight"),
                                              (".lora_B.weight", ".lora_up.weight")):
                if key.endswith(peft_suffix):
                    module = key[: -len(peft_suffix)]
                    if part != "unet" and not module.startswith("text_model."):
                        # transformers 5 flattened CLIPTextModel; A1111/ComfyUI know the classic module path.
                        module = "text_model." + module
                    name = prefix + module.replace(".", "_")
                    out[name + kohya_suffix] = value
                    out[name + ".alpha"] = torch.tensor(float(alpha))
                    break
            else:
                raise ValueError(f"unexpected LoRA key {key!r} in {part}")
    return out


def save_kohya(path: Path, arch: str, peft_parts: dict[str, dict[str, torch.Tensor]], alpha: float,
               metadata: dict[str, str]) -> Path:
    return _atomic_save(to_kohya(arch, peft_parts, alpha), path, {"format": "pt", **metadata})


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
