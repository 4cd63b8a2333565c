"""Spec validation: proto defaults, ranges, and errors that name the field and the bad value."""

from __future__ import annotations

import json

import pytest

from loraforge_engine.config import SpecError, load_spec, parse_spec

BASE = {"baseModel": "/models/sd", "datasetDir": "/data/set"}


def errors_of(extra: dict) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, **extra})
    return e.value.errors


def test_defaults_follow_the_proto():
    s = parse_spec(BASE)
    assert (s.resolution, s.center_crop, s.random_flip, s.train_batch_size) == (512, False, False, 1)
    assert (s.gradient_accumulation_steps, s.max_train_steps, s.num_train_epochs) == (1, None, 100)
    assert (s.learning_rate, s.lr_scheduler, s.lr_warmup_steps, s.max_grad_norm) == (1e-4, "constant", 500, 1.0)
    assert (s.rank, s.lora_alpha, s.effective_lora_alpha) == (4, None, 4.0)
    assert (s.mixed_precision, s.checkpointing_steps, s.seed, s.validation_prompt) == (None, 500, None, None)
    assert (s.num_validation_images, s.validation_steps, s.validation_inference_steps) == (4, 0, 30)


def test_camel_and_snake_case_and_int64_strings():
    s = parse_spec({"base_model": "/m", "datasetDir": "/d", "trainBatchSize": 4, "lora_alpha": 8,
                    "seed": "12345", "learningRate": "0.001", "max_train_steps": 10})
    assert (s.train_batch_size, s.lora_alpha, s.seed, s.learning_rate, s.max_train_steps) == (4, 8.0, 12345, 1e-3, 10)
    assert parse_spec({**BASE, "seed": None}).seed is None  # proto3 JSON null = unset


@pytest.mark.parametrize("extra, field, value", [
    ({"rank": 0}, "rank", "0"),
    ({"resolution": 100}, "resolution", "100"),
    ({"learningRate": -0.001}, "learning_rate", "-0.001"),
    ({"learningRate": 0}, "learning_rate", "0"),
    ({"lrScheduler": "exponential"}, "lr_scheduler", "exponential"),
    ({"mixedPrecision": "fp8"}, "mixed_precision", "fp8"),
    ({"rank": 1025}, "rank", "1025"),
    ({"maxGradNorm": 0}, "max_grad_norm", "0"),
    ({"loraAlpha": -1}, "lora_alpha", "-1"),
    ({"seed": -5}, "seed", "-5"),
    ({"numValidationImages": 17}, "num_validation_images", "17"),
    ({"trainBatchSize": "four"}, "train_batch_size", "four"),
    ({"centerCrop": "yes"}, "center_crop", "yes"),
    ({"resolution": 4.5}, "resolution", "4.5"),
])
def test_bad_values_name_field_and_value(extra, field, value):
    errs = errors_of(extra)
    assert len(errs) == 1
    name, message = errs[0]
    assert name == field and value in message


def test_unknown_key_is_named():
    errs = errors_of({"learningRat": 0.1})
    assert errs[0][0] == "learningRat" and "unknown field" in errs[0][1]


def test_required_fields_and_every_error_reported():
    with pytest.raises(SpecError) as e:
        parse_spec({"rank": 0})
    fields = [f for f, _ in e.value.errors]
    assert set(fields) == {"rank", "base_model", "dataset_dir"}
    assert "rank" in str(e.value) and "base_model" in str(e.value)


def test_not_json_and_not_object():
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec("{nope")
    with pytest.raises(SpecError, match="JSON object"):
        load_spec(json.dumps([1, 2]))
