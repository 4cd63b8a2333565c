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
    ({"captionDropout": 1.5}, "caption_dropout", "1.5"),
    ({"maxTrainSamples": 0}, "max_train_samples", "0"),
    ({"interpolation": "cubic"}, "interpolation", "cubic"),
    ({"lrNumCycles": 0}, "lr_num_cycles", "0"),
    ({"lrPower": 0}, "lr_power", "0"),
    ({"adamBeta1": 1.0}, "adam_beta1", "1.0"),
    ({"adamBeta2": -0.1}, "adam_beta2", "-0.1"),
    ({"adamWeightDecay": 2}, "adam_weight_decay", "2"),
    ({"adamEpsilon": 0}, "adam_epsilon", "0"),
    ({"snrGamma": 0}, "snr_gamma", "0"),
    ({"noiseOffset": -0.1}, "noise_offset", "-0.1"),
    ({"predictionType": "sample"}, "prediction_type", "sample"),
    ({"loraDropout": 1}, "lora_dropout", "1"),
    ({"targetModules": ["to q"]}, "target_modules", "to q"),
    ({"targetModules": "to_q"}, "target_modules", "to_q"),
    ({"checkpointsTotalLimit": 0}, "checkpoints_total_limit", "0"),
    ({"validationPrompts": ["  "]}, "validation_prompts", "'  '"),
    ({"validationEpochs": -1}, "validation_epochs", "-1"),
    ({"loraFormat": "a1111"}, "lora_format", "a1111"),
    ({"use8bitAdam": "yes"}, "use_8bit_adam", "yes"),
    ({"cacheLatents": 1}, "cache_latents", "1"),
    ({"imageColumn": ""}, "image_column", "empty"),
])
def test_bad_values_name_field_and_value(extra, field, value):
    errs = errors_of(extra)
    assert len(errs) == 1
    name, message = errs[0]
    assert name == field and value in message


def test_new_knob_defaults_follow_the_proto():
    s = parse_spec(BASE)
    assert (s.dataset_name, s.image_column, s.caption_column, s.max_train_samples, s.caption_dropout) == \
        (None, None, "text", None, 0.0)
    assert (s.interpolation, s.scale_lr, s.lr_num_cycles, s.lr_power) == ("lanczos", False, 1, 1.0)
    assert (s.adam_beta1, s.adam_beta2, s.adam_weight_decay, s.adam_epsilon, s.use_8bit_adam) == \
        (0.9, 0.999, 1e-2, 1e-8, False)
    assert (s.snr_gamma, s.noise_offset, s.prediction_type, s.gradient_checkpointing, s.allow_tf32) == \
        (None, 0.0, None, False, False)
    assert (s.lora_dropout, s.unet_targets, s.train_text_encoder) == (0.0, ["to_q", "to_k", "to_v", "to_out.0"], False)
    assert (s.checkpoints_total_limit, s.resume_from_checkpoint, s.validation_prompts, s.validation_epochs) == \
        (None, None, (), 0)
    assert (s.lora_format, s.cache_latents, s.torch_compile) == ("diffusers", True, False)
    t = parse_spec({**BASE, "targetModules": ["to_q", "ff.net.2"], "validationPrompts": ["a", "b"],
                    "validationPrompt": "c", "use8bitAdam": True, "resumeFromCheckpoint": "latest"})
    assert t.unet_targets == ["to_q", "ff.net.2"] and t.all_validation_prompts == ["c", "a", "b"]
    assert t.use_8bit_adam and t.resume_from_checkpoint == "latest"
    assert t.to_json_dict()["targetModules"] == ["to_q", "ff.net.2"]
    assert parse_spec(t.to_json_dict()) == t  # what a checkpoint stores parses back to the same spec


def test_dataset_dir_or_dataset_name():
    s = parse_spec({"baseModel": "/m", "datasetName": "someone/pets"})
    assert s.dataset_name == "someone/pets" and s.dataset_dir == ""
    assert [f for f, _ in errors_of({"datasetName": "someone/pets"})] == ["dataset_name"]  # both given
    with pytest.raises(SpecError) as e:
        parse_spec({"baseModel": "/m"})
    assert [f for f, _ in e.value.errors] == ["dataset_dir"]


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
