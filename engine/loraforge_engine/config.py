"""TrainingSpec: a loraforge.v1.TrainingSpec read from proto3 JSON, checked against the contract's rules, and
read the way the trainer uses it.

The fields, their JSON forms and their rules (ranges, required fields, enum membership, patterns) live once, in
proto/loraforge/v1/training_spec.proto: the generated message and google.protobuf.json_format read the JSON
(lowerCamelCase or snake_case keys), protovalidate checks the buf.validate rules. A bad spec raises SpecError
naming every bad field, in the proto's snake_case. What the engine adds lives here and nowhere else: the
documented default of each field left unset (DEFAULTS), the strings diffusers, torch and PIL take for the enum
values, and the checks no rule can make (the engine trains from a folder, not from an upload id).
"""

from __future__ import annotations

import json
import os
from typing import Any

from .contract import json_format, training_spec_pb2, validator

DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# "Unset means X", as the .proto documents it: the value an optional field takes when the spec leaves it
# unset, and an enum's (as the library string) when it is UNSPECIFIED. Fields not named here read as None
# when unset: they have no fixed default (max_train_steps, lora_alpha = rank, mixed_precision by device, seed
# drawn at start, image_column by data source, prediction_type the model's, ...), and the trainer decides.
DEFAULTS: dict[str, Any] = {
    "resolution": 512, "center_crop": False, "random_flip": False, "train_batch_size": 1,
    "gradient_accumulation_steps": 1, "num_train_epochs": 100, "learning_rate": 1e-4, "lr_scheduler": "constant",
    "lr_warmup_steps": 500, "max_grad_norm": 1.0, "rank": 4, "checkpointing_steps": 500,
    "num_validation_images": 4, "validation_steps": 0, "validation_inference_steps": 30, "caption_column": "text",
    "caption_dropout": 0.0, "interpolation": "lanczos", "scale_lr": False, "lr_num_cycles": 1, "lr_power": 1.0,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8, "noise_offset": 0.0,
    "lora_dropout": 0.0, "validation_epochs": 0, "lora_format": "diffusers", "cache_latents": True,
    "shuffle_tags": False, "keep_tags": 0, "min_image_side": 8, "aspect_ratio_buckets": False, "bucket_step": 64,
    "bucket_max_aspect": 4.0, "num_devices": 1, "min_device_memory_mb": 0,
    "prior_loss_weight": 1.0, "num_class_images": 100, "class_sample_batch_size": 4, "class_inference_steps": 50,
}

_DESCRIPTOR = training_spec_pb2.TrainingSpec.DESCRIPTOR


class SpecError(ValueError):
    """An invalid spec. `errors` lists (field, message) pairs; str() reads as one line."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))


def enum_string(enum_type, number: int) -> str:
    """The library string of an enum value: its name without the enum's prefix, lower case
    (LR_SCHEDULER_COSINE_WITH_RESTARTS -> "cosine_with_restarts", MIXED_PRECISION_BF16 -> "bf16"): the names
    diffusers' get_scheduler, the precision switch, PIL's Resampling and the scheduler configs use."""
    prefix = enum_type.values_by_number[0].name.removesuffix("UNSPECIFIED")
    return enum_type.values_by_number[number].name.removeprefix(prefix).lower()


def _read_field(message, field) -> Any:
    """The engine's reading of one field: a tuple for a repeated field, the library string for an enum,
    DEFAULTS (or None) for an unset optional field or an UNSPECIFIED enum, else the value."""
    if field.is_repeated:
        return tuple(getattr(message, field.name))
    if field.enum_type is not None:
        number = getattr(message, field.name)
        return DEFAULTS.get(field.name) if number == 0 else enum_string(field.enum_type, number)
    if field.has_presence and not message.HasField(field.name):
        return DEFAULTS.get(field.name)
    return getattr(message, field.name)


class TrainingSpec:
    """A checked spec as the trainer reads it. `message` is the loraforge.v1.TrainingSpec (base_model and
    dataset_dir made absolute); every field of it is an attribute of the same name holding the engine's
    reading (see _read_field): `spec.rank` is 4 when unset, `spec.lr_scheduler` is "cosine" for
    LR_SCHEDULER_COSINE, `spec.target_modules` a tuple."""

    def __init__(self, message: training_spec_pb2.TrainingSpec):
        m = training_spec_pb2.TrainingSpec()
        m.CopyFrom(message)
        # Host folders are read relative to where the engine was started; record them absolute.
        if m.base_model:
            m.base_model = os.path.abspath(m.base_model)
        if m.WhichOneof("dataset") == "dataset_dir":
            m.dataset_dir = os.path.abspath(m.dataset_dir)
        if m.WhichOneof("class_data") == "class_data_dir":
            m.class_data_dir = os.path.abspath(m.class_data_dir)
        self.message = m
        self._values = {f.name: _read_field(m, f) for f in _DESCRIPTOR.fields}

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"TrainingSpec has no field {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainingSpec) and self.message == other.message

    __hash__ = None  # mutable message inside

    def __repr__(self) -> str:
        return f"TrainingSpec({self.to_json_dict()})"

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.rank) if self.lora_alpha is None else float(self.lora_alpha)

    @property
    def unet_targets(self) -> list[str]:
        return list(self.target_modules or DEFAULT_UNET_TARGETS)

    @property
    def bucket_sides(self) -> tuple[int, int]:
        """(min, max) bucket side: the spec's, else resolution / 2 rounded down to bucket_step (at least one
        step) and resolution × 2, as the .proto documents."""
        step = self.bucket_step
        low = self.bucket_min_side if self.bucket_min_side is not None else max(step, self.resolution // 2 // step * step)
        high = self.bucket_max_side if self.bucket_max_side is not None else self.resolution * 2
        return low, high

    @property
    def all_validation_prompts(self) -> list[str]:
        return ([self.validation_prompt] if self.validation_prompt else []) + list(self.validation_prompts)

    def to_json_dict(self) -> dict[str, Any]:
        """proto3 JSON of the set fields (json_format), for the checkpoint and the LoRA file's metadata."""
        return json_format.MessageToDict(self.message)


# ------------------------------------------------------------------------------------------------ reading


def _expected(field) -> str:
    """What a JSON value of this field must look like, for a readable error."""
    if field.enum_type is not None:
        what = "one of " + ", ".join(v.name for v in field.enum_type.values)
    elif field.cpp_type == field.CPPTYPE_BOOL:
        what = "true or false"
    elif field.cpp_type in (field.CPPTYPE_INT32, field.CPPTYPE_INT64, field.CPPTYPE_UINT32, field.CPPTYPE_UINT64):
        what = "an integer in range"
    elif field.cpp_type in (field.CPPTYPE_DOUBLE, field.CPPTYPE_FLOAT):
        what = "a number"
    else:
        what = "a string"
    return f"a list, each item {what}" if field.is_repeated else what


def _read_json(data: Any) -> tuple[training_spec_pb2.TrainingSpec, list[tuple[str, str]]]:
    """json_format's reading of the object: the message of every key it can read, and an error for each one it
    cannot (json_format alone stops at the first), for a key given twice (snake_case and camelCase) and for a
    oneof given more than one member."""
    if not isinstance(data, dict):
        raise SpecError([("spec", f"must be a JSON object, got {type(data).__name__}")])
    by_key = {**{f.name: f for f in _DESCRIPTOR.fields}, **{f.json_name: f for f in _DESCRIPTOR.fields}}
    message, errors, seen = training_spec_pb2.TrainingSpec(), [], {}
    for key, value in data.items():
        field = by_key.get(key)
        if field is None:
            errors.append((str(key), f"unknown field {key!r} (value {value!r})"))
        elif field.name in seen:
            errors.append((field.name, f"given twice (as {seen[field.name]!r} and {key!r})"))
        else:
            seen[field.name] = key
            try:
                json_format.ParseDict({key: value}, message)  # merges into `message`
            except json_format.ParseError:
                errors.append((field.name, f"must be {_expected(field)}, got {value!r}"))
    for oneof in _DESCRIPTOR.oneofs:
        given = [f.name for f in oneof.fields if data.get(seen.get(f.name)) is not None]
        if len(given) > 1:
            errors.append((oneof.name, f"set only one of {', '.join(f.name for f in oneof.fields)}, got "
                                       f"{' and '.join(given)}"))
    if not errors:
        message = json_format.ParseDict(data, training_spec_pb2.TrainingSpec())  # the same, read whole
    return message, errors


def _field_path(path) -> str:
    """A violation's field path as text: "rank", "target_modules[0]"."""
    out = ""
    for el in path.elements:
        out += ("." if out else "") + el.field_name
        sub = el.WhichOneof("subscript")
        if sub is not None:
            out += f"[{getattr(el, sub)!r}]" if sub == "string_key" else f"[{getattr(el, sub)}]"
    return out


def _value_at(message, path) -> Any:
    """The value a (top-level, possibly indexed) field path points at, or None where there is none."""
    if len(path.elements) != 1 or path.elements[0].field_name not in _DESCRIPTOR.fields_by_name:
        return None
    el = path.elements[0]
    value = getattr(message, el.field_name)
    return value[el.index] if el.WhichOneof("subscript") == "index" else value


def rule_violations(message: training_spec_pb2.TrainingSpec) -> list[tuple[str, str]]:
    """(field, message) for every buf.validate rule of the .proto the spec breaks, as protovalidate reports it."""
    out = []
    for v in validator().collect_violations(message):
        field = _field_path(v.proto.field)
        text = v.proto.message or v.proto.rule_id
        if not field and "." in v.proto.rule_id:  # a rule across fields: named by the field its id starts with
            field = v.proto.rule_id.split(".")[0]
        oneof = _DESCRIPTOR.oneofs_by_name.get(field)
        if oneof is not None:
            text += f" ({', '.join(f.name for f in oneof.fields)})"
        else:
            value = v.field_value if v.field_value is not None else _value_at(message, v.proto.field)
            if value is not None:
                text += f", got {value!r}"
        out.append((field, text))
    return out


def _engine_checks(message: training_spec_pb2.TrainingSpec) -> list[tuple[str, str]]:
    """What the rules allow but this engine cannot do."""
    errors = []
    if message.WhichOneof("dataset") == "dataset_id":
        errors.append(("dataset_id", f"{message.dataset_id!r}: the engine trains from a folder; the worker fetches "
                                     "an uploaded data set and hands the engine dataset_dir instead"))
    if message.WhichOneof("class_data") == "class_dataset_id":
        errors.append(("class_dataset_id", f"{message.class_dataset_id!r}: the engine reads class images from a "
                                           "folder; the worker fetches an uploaded data set and hands the engine "
                                           "class_data_dir instead"))
    if (message.HasField("bucket_min_side") and message.HasField("bucket_max_side")
            and message.bucket_min_side > message.bucket_max_side):
        errors.append(("bucket_max_side", f"must be at least bucket_min_side ({message.bucket_min_side}), "
                                          f"got {message.bucket_max_side}"))
    return errors


def parse_spec(data: Any) -> TrainingSpec:
    """A decoded proto3-JSON TrainingSpec object, read and checked; raises SpecError listing every bad field:
    those json_format cannot read, and those that break a rule (checked on the fields that could be read)."""
    message, errors = _read_json(data)
    unread = {f for f, _ in errors}
    unread |= {o.name for o in _DESCRIPTOR.oneofs if any(f.name in unread for f in o.fields)}
    errors += [(f, m) for f, m in rule_violations(message) if f.split("[")[0].split(".")[0] not in unread]
    errors += _engine_checks(message)
    if errors:
        raise SpecError(errors)
    return TrainingSpec(message)


def load_spec(text: str) -> TrainingSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError([("spec", f"is not valid JSON: {e}")]) from None
    return parse_spec(data)
