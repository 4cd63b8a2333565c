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


class SpecError(ValueError):
    """An invalid spec. `errors` lists (field, message) pairs; str() reads as one line."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))


@dataclass(frozen=True)
class TrainingSpec:
    base_model: str
    dataset_dir: str
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

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.rank) if self.lora_alpha is None else float(self.lora_alpha)

    def to_json_dict(self) -> dict[str, Any]:
        """proto3 JSON (lowerCamelCase) of the set fields, for storing with a checkpoint."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[_camel(f.name)] = str(value) if f.name == "seed" else value
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
    for name in ("base_model", "dataset_dir"):
        if not values.get(name):
            errors.append((name, "is required" if name not in values else "must not be empty"))
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
    if errors:
        raise SpecError(errors)

    for name in ("base_model", "dataset_dir"):
        values[name] = os.path.abspath(values[name])
    return TrainingSpec(**values)


def load_spec(text: str) -> TrainingSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError([("spec", f"is not valid JSON: {e}")]) from None
    return parse_spec(data)
