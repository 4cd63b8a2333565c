"""TrainingSpec: the proto contract (proto/loraforge/v1/training_spec.proto) as a validated dataclass.

The spec arrives as proto3 JSON (lowerCamelCase keys; snake_case is accepted too). Unset optional fields
take the proto's documented defaults; an explicitly set value is validated as given, so `rank: 0` is refused
rather than replaced. Every error names the field (in the proto's snake_case) and the bad value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_FORMATS = ("diffusers", "kohya")
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class SpecError(ValueError):
    """An invalid spec. `errors` lists (field, message) pairs; str() reads as one line."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))


@dataclass(frozen=True)
class TrainingSpec:
    base_model: str
    dataset_dir: str = ""
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int = 100
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    max_grad_norm: float = 1.0
    rank: int = 4
    lora_alpha: float | None = None  # None: equal to rank
    mixed_precision: str | None = None  # None: "fp16" on CUDA, "no" on CPU (resolved at start)
    checkpointing_steps: int = 500
    seed: int | None = None  # None: drawn at start and reported
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_steps: int = 0
    validation_inference_steps: int = 30
    # Data
    dataset_name: str | None = None  # a Hugging Face dataset (needs network and LORAFORGE_ALLOW_HUB=1)
    dataset_id: str | None = None  # an uploaded set; the server resolves it into dataset_dir (kept for the record)
    image_column: str | None = None  # None: "file_name" (metadata.jsonl) / "image" (hub data set)
    caption_column: str = "text"
    max_train_samples: int | None = None
    caption_dropout: float = 0.0
    # Images
    interpolation: str = "lanczos"
    # Schedule
    scale_lr: bool = False
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    # Optimiser
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    # Loss
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    prediction_type: str | None = None  # None: the base model scheduler's
    # Precision and memory
    gradient_checkpointing: bool = False
    allow_tf32: bool = False
    # LoRA
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: DEFAULT_UNET_TARGETS
    train_text_encoder: bool = False
    # Operations
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompts: tuple[str, ...] = ()
    validation_epochs: int = 0
    # Files
    lora_format: str = "diffusers"
    # Speed
    cache_latents: bool = True
    torch_compile: bool = False

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.rank) if self.lora_alpha is None else float(self.lora_alpha)

    @property
    def unet_targets(self) -> list[str]:
        return list(self.target_modules or DEFAULT_UNET_TARGETS)

    @property
    def all_validation_prompts(self) -> list[str]:
        return ([self.validation_prompt] if self.validation_prompt else []) + list(self.validation_prompts)

    def to_json_dict(self) -> dict[str, Any]:
        """proto3 JSON (lowerCamelCase) of the set fields, for storing with a checkpoint."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value != ():
                out[_camel(f.name)] = str(value) if f.name == "seed" else list(value) if isinstance(value, tuple) \
                    else value
        return out


# field name -> (kind, min, max). Kinds: str, bool, int32, int64, double. Ranges inclusive unless noted.
_FIELDS: dict[str, tuple[str, Any, Any]] = {
    "base_model": ("str", None, None),
    "dataset_dir": ("str", None, None),
    "resolution": ("int32", 8, 4096),
    "center_crop": ("bool", None, None),
    "random_flip": ("bool", None, None),
    "train_batch_size": ("int32", 1, 1024),
    "gradient_accumulation_steps": ("int32", 1, 1024),
    "max_train_steps": ("int32", 1, 10_000_000),
    "num_train_epochs": ("int32", 1, 100_000),
    "learning_rate": ("double", None, None),
    "lr_scheduler": ("str", None, None),
    "lr_warmup_steps": ("int32", 0, 2**31 - 1),
    "max_grad_norm": ("double", None, None),
    "rank": ("int32", 1, 1024),
    "lora_alpha": ("double", None, None),
    "mixed_precision": ("str", None, None),
    "checkpointing_steps": ("int32", 1, 2**31 - 1),
    "seed": ("int64", 0, 2**32 - 1),
    "validation_prompt": ("str", None, None),
    "num_validation_images": ("int32", 1, 16),
    "validation_steps": ("int32", 0, 2**31 - 1),
    "validation_inference_steps": ("int32", 1, 1000),
    "dataset_name": ("str", None, None),
    "dataset_id": ("str", None, None),
    "image_column": ("str", None, None),
    "caption_column": ("str", None, None),
    "max_train_samples": ("int32", 1, 2**31 - 1),
    "caption_dropout": ("double", None, None),
    "interpolation": ("str", None, None),
    "scale_lr": ("bool", None, None),
    "lr_num_cycles": ("int32", 1, 10_000),
    "lr_power": ("double", None, None),
    "adam_beta1": ("double", None, None),
    "adam_beta2": ("double", None, None),
    "adam_weight_decay": ("double", None, None),
    "adam_epsilon": ("double", None, None),
    "use_8bit_adam": ("bool", None, None),
    "snr_gamma": ("double", None, None),
    "noise_offset": ("double", None, None),
    "prediction_type": ("str", None, None),
    "gradient_checkpointing": ("bool", None, None),
    "allow_tf32": ("bool", None, None),
    "lora_dropout": ("double", None, None),
    "target_modules": ("strlist", None, None),
    "train_text_encoder": ("bool", None, None),
    "checkpoints_total_limit": ("int32", 1, 2**31 - 1),
    "resume_from_checkpoint": ("str", None, None),
    "validation_prompts": ("strlist", None, None),
    "validation_epochs": ("int32", 0, 2**31 - 1),
    "lora_format": ("str", None, None),
    "cache_latents": ("bool", None, None),
    "torch_compile": ("bool", None, None),
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


_BY_JSON_NAME = {**{n: n for n in _FIELDS}, **{_camel(n): n for n in _FIELDS}}


def _coerce(name: str, kind: str, value: Any) -> Any:
    """proto3 JSON value -> Python value of the field's type; raises ValueError with a readable message."""
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        return value
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a list of strings, got {value!r}")
        return tuple(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if kind in ("int32", "int64"):
        # proto3 JSON allows integers as numbers or decimal strings (int64 is normally a string).
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value.strip())
        raise ValueError(f"must be an integer, got {value!r}")
    if kind == "double":
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # proto3 JSON: numbers as strings, also "NaN"/"Infinity"
            except ValueError:
                pass
        raise ValueError(f"must be a number, got {value!r}")
    raise AssertionError(kind)


def parse_spec(data: Any) -> TrainingSpec:
    """Validate a decoded proto3-JSON TrainingSpec object; raise SpecError listing every bad field."""
    if not isinstance(data, dict):
        raise SpecError([("spec", f"must be a JSON object, got {type(data).__name__}")])
    errors: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    for key, raw in data.items():
        name = _BY_JSON_NAME.get(key)
        if name is None:
            errors.append((str(key), f"unknown field {key!r} (value {raw!r})"))
            continue
        if name in values:
            errors.append((name, f"given twice (as {name!r} and {_camel(name)!r})"))
            continue
        if raw is None:  # proto3 JSON: null means "not set"
            continue
        try:
            values[name] = _coerce(name, _FIELDS[name][0], raw)
        except ValueError as e:
            errors.append((name, str(e)))

    def check(name: str, ok: bool, message: str) -> None:
        if name in values and not ok:
            errors.append((name, f"{message}, got {values[name]!r}"))

    # Ranges from the proto's comments.
    for name, (kind, lo, hi) in _FIELDS.items():
        if kind in ("int32", "int64") and name in values:
            check(name, lo <= values[name] <= hi, f"must be in {lo}..{hi}")
    if not values.get("base_model"):
        errors.append(("base_model", "is required" if "base_model" not in values else "must not be empty"))
    if values.get("dataset_dir") and values.get("dataset_name"):
        errors.append(("dataset_name", f"must not be set together with dataset_dir, got {values['dataset_name']!r}"))
    elif not values.get("dataset_dir") and not values.get("dataset_name"):
        errors.append(("dataset_dir", "is required (or dataset_name)" if "dataset_dir" not in values
                       else "must not be empty"))
    if "resolution" in values and 8 <= values["resolution"] <= 4096:
        check("resolution", values["resolution"] % 8 == 0, "must be a multiple of 8")
    lr = values.get("learning_rate")
    check("learning_rate", lr is not None and math.isfinite(lr) and 0 < lr <= 1, "must be > 0 and <= 1")
    mgn = values.get("max_grad_norm")
    check("max_grad_norm", mgn is not None and math.isfinite(mgn) and mgn > 0, "must be > 0")
    alpha = values.get("lora_alpha")
    check("lora_alpha", alpha is not None and math.isfinite(alpha) and alpha > 0, "must be > 0")
    check("lr_scheduler", values.get("lr_scheduler") in LR_SCHEDULERS, f"must be one of {', '.join(LR_SCHEDULERS)}")
    check("mixed_precision", values.get("mixed_precision") in MIXED_PRECISIONS,
          f"must be one of {', '.join(MIXED_PRECISIONS)}")
    if "validation_prompt" in values and not values["validation_prompt"].strip():
        errors.append(("validation_prompt", "must not be blank when set"))

    def finite(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        v = values.get(name)
        ok = v is not None and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        check(name, ok, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")

    finite("caption_dropout", 0.0, 1.0)
    finite("lr_power", 0.0, 100.0, lo_open=True)
    finite("adam_beta1", 0.0, 1.0, hi_open=True)
    finite("adam_beta2", 0.0, 1.0, hi_open=True)
    finite("adam_weight_decay", 0.0, 1.0)
    finite("adam_epsilon", 0.0, 1.0, lo_open=True)
    finite("snr_gamma", 0.0, 1000.0, lo_open=True)
    finite("noise_offset", 0.0, 1.0)
    finite("lora_dropout", 0.0, 1.0, hi_open=True)
    check("interpolation", values.get("interpolation") in INTERPOLATIONS, f"must be one of {', '.join(INTERPOLATIONS)}")
    check("prediction_type", values.get("prediction_type") in PREDICTION_TYPES,
          f"must be one of {', '.join(PREDICTION_TYPES)}")
    check("lora_format", values.get("lora_format") in LORA_FORMATS, f"must be one of {', '.join(LORA_FORMATS)}")
    for name in ("image_column", "caption_column", "dataset_name", "resume_from_checkpoint"):
        if name in values and not values[name].strip():
            errors.append((name, "must not be empty when set"))
    check("target_modules", all(_MODULE_NAME.match(m) for m in values.get("target_modules", ())),
          "must be module names such as to_q or to_out.0")
    check("target_modules", len(values.get("target_modules", ())) <= 64, "must name at most 64 modules")
    check("validation_prompts", all(p.strip() and len(p) <= 2000 for p in values.get("validation_prompts", ())),
          "must be non-blank prompts of at most 2000 characters")
    check("validation_prompts", len(values.get("validation_prompts", ())) <= 16, "must hold at most 16 prompts")
    if errors:
        raise SpecError(errors)

    for name in ("base_model", "dataset_dir"):
        if values.get(name):
            values[name] = os.path.abspath(values[name])
    if values.get("resume_from_checkpoint") not in (None, "latest"):
        values["resume_from_checkpoint"] = os.path.abspath(values["resume_from_checkpoint"])
    return TrainingSpec(**values)


def load_spec(text: str) -> TrainingSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError([("spec", f"is not valid JSON: {e}")]) from None
    return parse_spec(data)
