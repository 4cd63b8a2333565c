"""LoRA files that load everywhere, with what they are written in their safetensors header.

diffusers format (`pytorch_lora_weights.safetensors`): keys `unet.<module>.lora.down.weight` /
`.lora.up.weight` and `text_encoder[_2].<module>.lora_linear_layer.{down,up}.weight`, as diffusers' own
training scripts write them (peft's `<component>.<module>.lora_A.weight` / `.lora_B.weight` when the targets
go beyond the attention projections; see `diffusers_keys`), plus peft's adapter config under the header key
`lora_adapter_metadata`, from which diffusers' `load_lora_weights` rebuilds alpha (so alpha != rank loads at the
trained scale).

kohya / A1111 format: keys `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight` and a scalar
`.alpha` per module; text encoders as `lora_te_` (SD 1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL). SD 1.x/2.x
UNet modules keep diffusers' names (as kohya's sd-scripts writes them); SDXL ones take the original (SGM)
UNet's names (`input_blocks.4.1.…`, `middle_block.1.…`, `output_blocks.0.1.…`), as sd-scripts' SDXL
trainer writes them and A1111/Forge look them up (see `sgm_module_name`). Loaders
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


_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def sgm_module_name(module: str, layers_per_block: int, up_attention_blocks: set[int] | None = None) -> str | None:
    """The original (SGM / CompVis) UNet's name of a diffusers UNet module, or None where there is none.

    In the SGM UNet input_blocks[0] is conv_in; then each down block i contributes one input block per layer j
    (index 1 + i·(L+1) + j: [0] its resnet, [1] its transformer) and, except the last, one more holding the
    downsampler ([0].op); middle_block is [resnet, transformer, resnet]; each up block i contributes L+1 output
    blocks (index i·(L+1) + j: [0] resnet, [1] transformer, the last one also the upsampler, at [2] when the
    block has transformers else at [1]). Inside a transformer the names are the same in both; resnets rename
    conv1/conv2/time_emb_proj/conv_shortcut. This is the inverse of the index arithmetic in diffusers'
    `_maybe_map_sgm_blocks_to_diffusers` (tests check it against that function)."""
    if not isinstance(layers_per_block, int):
        return None  # per-block layer counts: no single SGM layout
    step = layers_per_block + 1
    parts = module.split(".")

    def resnet(rest: list[str]) -> str | None:
        name = ".".join(rest)
        return _RESNET_SGM.get(name, name if rest and rest[0] in ("norm1", "norm2") else None)

    if module in _TOP_SGM:
        return _TOP_SGM[module]
    if len(parts) < 4 or not parts[1].isdigit():
        if parts[0] == "mid_block" and len(parts) >= 4 and parts[2].isdigit():
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "attentions" and j == 0:
                return ".".join(["middle_block", "1", *rest])
            if kind == "resnets" and j in (0, 1):
                r = resnet(rest)
                return None if r is None else f"middle_block.{2 * j}.{r}"
        return None
    block, i, kind, j, rest = parts[0], int(parts[1]), parts[2], parts[3], parts[4:]
    if not j.isdigit():
        return None
    j_ = int(j)
    if block == "down_blocks":
        if kind == "attentions":
            return ".".join(["input_blocks", str(1 + i * step + j_), "1", *rest])
        if kind == "resnets":
            r = resnet(rest)
            return None if r is None else f"input_blocks.{1 + i * step + j_}.0.{r}"
        if kind == "downsamplers" and j_ == 0 and rest == ["conv"]:
            return f"input_blocks.{(i + 1) * step}.0.op"
    elif block == "up_blocks":
        if kind == "attentions":
            return ".".join(["output_blocks", str(i * step + j_), "1", *rest])
        if kind == "resnets":
            r = resnet(rest)
            return None if r is None else f"output_blocks.{i * step + j_}.0.{r}"
        if kind == "upsamplers" and j_ == 0 and rest == ["conv"] and up_attention_blocks is not None:
            return f"output_blocks.{i * step + layers_per_block}.{2 if i in up_attention_blocks else 1}.conv"
    return None


def kohya_unet_module(arch: str, module: str, layers_per_block: int) -> str:
    """The module name kohya files use for a UNet module: diffusers' for SD 1.x/2.x, SGM's for SDXL."""
    if arch != "sdxl":
        return module
    sgm = sgm_module_name(module, layers_per_block)
    if sgm is None:
        raise ValueError(f"UNet module {module} has no name in SDXL's original UNet layout; kohya files cannot "
                         "name it (use the diffusers format)")
    return sgm


def diffusers_keys(peft_sd: dict[str, torch.Tensor], convert) -> dict[str, torch.Tensor]:
    """The keys diffusers' training scripts write (`convert` = diffusers' convert_state_dict_to_diffusers:
    `.lora.down`/`.lora.up`, `.lora_linear_layer.…`) when it renames every layer; peft's own keys otherwise.

    The conversion knows only the attention projections; with other targets (feed-forward, proj_in, MLP) it
    leaves those as `lora_A`/`lora_B`, and load_lora_weights, reading that mixed file as peft's form, drops
    the renamed attention layers (seen with diffusers 0.42). peft's form loads whole."""
    converted = convert(peft_sd)
    if any(".lora_A." in k or ".lora_B." in k for k in converted):
        return dict(peft_sd)
    return converted


def to_kohya(arch: str, peft_parts: dict[str, dict[str, torch.Tensor]], alpha: float,
             layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """peft state dicts (`<module>.lora_A.weight` / `.lora_B.weight`, per component) -> kohya keys.
    `layers_per_block`: the UNet's (SDXL names depend on it)."""
    out: dict[str, torch.Tensor] = {}
    for part, sd in peft_parts.items():
        prefix = "lora_unet_" if part == "unet" else KOHYA_TE_PREFIX[arch][part]
        for key, value in sd.items():
            for peft_suffix, kohya_suffix in ((".lora_A.weight", ".lora_down.weight"),
                                              (".lora_B.weight", ".lora_up.weight")):
                if key.endswith(peft_suffix):
                    module = key[: -len(peft_suffix)]
                    if part == "unet":
                        module = kohya_unet_module(arch, module, layers_per_block)
                    elif not module.startswith("text_model."):
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
               metadata: dict[str, str], layers_per_block: int = 2) -> Path:
    return _atomic_save(to_kohya(arch, peft_parts, alpha, layers_per_block), path, {"format": "pt", **metadata})


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
