"""Reading a spec: json_format for the JSON, the .proto's buf.validate rules through protovalidate, the engine's
defaults and enum strings; errors name every bad field and its value."""

from __future__ import annotations

import json

import pytest

from loraforge_engine.config import DEFAULTS, SpecError, enum_string, load_spec, parse_spec
from loraforge_engine.contract import training_spec_pb2

BASE = {"baseModel": "/models/sd", "datasetDir": "/data/set"}
DESCRIPTOR = training_spec_pb2.TrainingSpec.DESCRIPTOR


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
    assert (s.dataset_name, s.dataset_id, s.image_column, s.caption_column, s.max_train_samples) == \
        (None, None, None, "text", None)
    assert (s.caption_dropout, s.interpolation, s.scale_lr, s.lr_num_cycles, s.lr_power) == \
        (0.0, "lanczos", False, 1, 1.0)
    assert (s.adam_beta1, s.adam_beta2, s.adam_weight_decay, s.adam_epsilon, s.use_8bit_adam) == \
        (0.9, 0.999, 1e-2, 1e-8, False)
    assert (s.snr_gamma, s.noise_offset, s.prediction_type, s.gradient_checkpointing, s.allow_tf32) == \
        (None, 0.0, None, False, False)
    assert (s.lora_dropout, s.unet_targets, s.train_text_encoder) == (0.0, ["to_q", "to_k", "to_v", "to_out.0"], False)
    assert (s.checkpoints_total_limit, s.resume_from_checkpoint, s.validation_prompts, s.validation_epochs) == \
        (None, None, (), 0)
    assert (s.lora_format, s.cache_latents, s.torch_compile) == ("diffusers", True, False)
    assert (s.instance_prompt, s.shuffle_tags, s.keep_tags, s.min_image_side) == (None, False, 0, 8)
    assert (s.aspect_ratio_buckets, s.bucket_step, s.bucket_max_aspect, s.bucket_sides) == (False, 64, 4.0, (256, 1024))
    assert (s.with_prior_preservation, s.class_prompt, s.class_data_dir, s.prior_loss_weight, s.num_class_images,
            s.class_sample_batch_size, s.class_inference_steps) == (False, None, None, 1.0, 100, 4, 50)
    assert parse_spec({**BASE, "resolution": 64}).bucket_sides == (64, 128)  # the minimum is at least one step
    assert parse_spec({**BASE, "bucketMinSide": 320, "bucketMaxSide": 640}).bucket_sides == (320, 640)


def test_every_default_names_an_optional_field_or_an_enum():
    # A default under a misspelt name would never be used: each one must be a field that can be left unset.
    for name in DEFAULTS:
        field = DESCRIPTOR.fields_by_name[name]
        assert field.has_presence or field.enum_type is not None, name


def test_enum_values_read_as_the_strings_the_libraries_take():
    from diffusers.optimization import SchedulerType

    from loraforge_engine.data import RESAMPLING

    def strings(enum_type):
        return {enum_string(enum_type, v.number) for v in enum_type.values if v.number != 0}

    enums = {name: DESCRIPTOR.fields_by_name[name].enum_type for name in
             ("lr_scheduler", "mixed_precision", "interpolation", "prediction_type", "lora_format")}
    assert strings(enums["lr_scheduler"]) <= {t.value for t in SchedulerType}
    assert strings(enums["interpolation"]) == set(RESAMPLING)
    assert strings(enums["mixed_precision"]) == {"no", "fp16", "bf16"}
    assert strings(enums["prediction_type"]) == {"epsilon", "v_prediction"}
    assert strings(enums["lora_format"]) == {"diffusers", "kohya"}
    s = parse_spec({**BASE, "lrScheduler": "LR_SCHEDULER_COSINE_WITH_RESTARTS", "mixedPrecision": "MIXED_PRECISION_NO",
                    "interpolation": "INTERPOLATION_BICUBIC", "predictionType": "PREDICTION_TYPE_V_PREDICTION",
                    "loraFormat": "LORA_FORMAT_KOHYA"})
    assert (s.lr_scheduler, s.mixed_precision, s.interpolation, s.prediction_type, s.lora_format) == \
        ("cosine_with_restarts", "no", "bicubic", "v_prediction", "kohya")
    # UNSPECIFIED is "the documented default", as unset is; enums may also be given by number.
    t = parse_spec({**BASE, "lrScheduler": "LR_SCHEDULER_UNSPECIFIED", "interpolation": 2})
    assert (t.lr_scheduler, t.interpolation) == ("constant", "bilinear")


def test_camel_and_snake_case_and_int64_strings():
    s = parse_spec({"base_model": "/m", "datasetDir": "/d", "trainBatchSize": 4, "lora_alpha": 8,
                    "seed": "12345", "learningRate": "0.001", "max_train_steps": 10})
    assert (s.train_batch_size, s.lora_alpha, s.seed, s.learning_rate, s.max_train_steps) == (4, 8.0, 12345, 1e-3, 10)
    assert parse_spec({**BASE, "seed": None}).seed is None  # proto3 JSON null = unset
    assert s.base_model == "/m" and parse_spec({"baseModel": "m", "datasetDir": "d"}).base_model.startswith("/")


@pytest.mark.parametrize("extra, field, value", [
    # Broken rules (protovalidate)
    ({"rank": 0}, "rank", "0"),
    ({"rank": 1025}, "rank", "1025"),
    ({"resolution": 100}, "resolution", "100"),
    ({"learningRate": -0.001}, "learning_rate", "-0.001"),
    ({"learningRate": 0}, "learning_rate", "0"),
    ({"lrScheduler": 99}, "lr_scheduler", "99"),
    ({"maxGradNorm": 0}, "max_grad_norm", "0"),
    ({"loraAlpha": -1}, "lora_alpha", "-1"),
    ({"seed": -5}, "seed", "-5"),
    ({"numValidationImages": 17}, "num_validation_images", "17"),
    ({"captionDropout": 1.5}, "caption_dropout", "1.5"),
    ({"maxTrainSamples": 0}, "max_train_samples", "0"),
    ({"lrNumCycles": 0}, "lr_num_cycles", "0"),
    ({"lrPower": 0}, "lr_power", "0"),
    ({"adamBeta1": 1.0}, "adam_beta1", "1.0"),
    ({"adamBeta2": -0.1}, "adam_beta2", "-0.1"),
    ({"adamWeightDecay": 2}, "adam_weight_decay", "2"),
    ({"adamEpsilon": 0}, "adam_epsilon", "0"),
    ({"snrGamma": 0}, "snr_gamma", "0"),
    ({"noiseOffset": -0.1}, "noise_offset", "-0.1"),
    ({"loraDropout": 1}, "lora_dropout", "1"),
    ({"targetModules": ["to_q", "to q"]}, "target_modules[1]", "to q"),
    ({"checkpointsTotalLimit": 0}, "checkpoints_total_limit", "0"),
    ({"validationPrompts": ["  "]}, "validation_prompts[0]", "'  '"),
    ({"validationEpochs": -1}, "validation_epochs", "-1"),
    ({"imageColumn": ""}, "image_column", "''"),
    ({"resumeFromCheckpoint": "/host/path/checkpoint-5"}, "resume_from_checkpoint", "/host/path"),
    ({"baseModel": ""}, "base_model", "''"),
    ({"instancePrompt": "   "}, "instance_prompt", "'   '"),
    ({"keepTags": -1}, "keep_tags", "-1"),
    ({"withPriorPreservation": True, "classPrompt": " "}, "class_prompt", "' '"),
    ({"priorLossWeight": 0}, "prior_loss_weight", "0"),
    ({"numClassImages": 0}, "num_class_images", "0"),
    ({"classSampleBatchSize": 0}, "class_sample_batch_size", "0"),
    ({"classInferenceSteps": 1001}, "class_inference_steps", "1001"),
    ({"classDataDir": ""}, "class_data_dir", "''"),
    ({"minImageSide": 0}, "min_image_side", "0"),
    ({"bucketStep": 12}, "bucket_step", "12"),
    ({"bucketMinSide": 4}, "bucket_min_side", "4"),
    ({"bucketMaxAspect": 0.5}, "bucket_max_aspect", "0.5"),
    ({"bucketMinSide": 512, "bucketMaxSide": 256}, "bucket_max_side", "256"),
    # Values json_format cannot read as the field's type
    ({"lrScheduler": "cosine"}, "lr_scheduler", "cosine"),
    ({"mixedPrecision": "fp8"}, "mixed_precision", "fp8"),
    ({"trainBatchSize": "four"}, "train_batch_size", "four"),
    ({"centerCrop": "yes"}, "center_crop", "yes"),
    ({"resolution": 4.5}, "resolution", "4.5"),
    ({"targetModules": "to_q"}, "target_modules", "to_q"),
    ({"use8bitAdam": "yes"}, "use_8bit_adam", "yes"),
    ({"cacheLatents": 1}, "cache_latents", "1"),
])
def test_bad_values_name_field_and_value(extra, field, value):
    errs = errors_of(extra)
    assert len(errs) == 1, errs
    name, message = errs[0]
    assert name == field and value in message


def test_every_bad_field_is_named_at_once():
    bad = {"rank": 0, "resolution": 100, "seed": -1, "targetModules": ["ok", "not ok"], "lrScheduler": 42,
           "validationPrompts": ["fine", " "], "adamBeta2": 1.0,
           "numTrainEpochs": "many", "interpolation": "INTERPOLATION_SHARP", "learningRat": 0.1}
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, **bad})
    fields = [f for f, _ in e.value.errors]
    assert sorted(fields) == sorted(["rank", "resolution", "seed", "target_modules[1]", "lr_scheduler",
                                     "validation_prompts[1]", "adam_beta2", "num_train_epochs", "interpolation",
                                     "learningRat"])
    assert all(f in str(e.value) for f in fields)  # the one-line form the engine logs names them too


def test_required_fields():
    with pytest.raises(SpecError) as e:
        parse_spec({"rank": 0})
    assert sorted(f for f, _ in e.value.errors) == ["base_model", "dataset", "rank"]
    dataset_error = dict(e.value.errors)["dataset"]
    assert all(n in dataset_error for n in ("dataset_id", "dataset_dir", "dataset_name"))


def test_dataset_is_one_of_three():
    s = parse_spec({"baseModel": "/m", "datasetName": "someone/pets"})
    assert s.dataset_name == "someone/pets" and s.dataset_dir is None
    assert [f for f, _ in errors_of({"datasetName": "someone/pets"})] == ["dataset"]  # two sources
    # An uploaded set is the worker's to fetch: the engine is handed dataset_dir, never the id.
    errs = errors_of({"datasetDir": None, "datasetId": "ds-abc123"})
    assert [f for f, _ in errs] == ["dataset_id"] and "dataset_dir" in errs[0][1]
    assert [f for f, _ in errors_of({"datasetDir": None, "datasetId": "DS-1"})][0] == "dataset_id"  # the pattern


def test_unknown_and_twice_given_keys_are_named():
    errs = errors_of({"learningRat": 0.1})
    assert errs[0][0] == "learningRat" and "unknown field" in errs[0][1]
    errs = errors_of({"rank": 4, "lora_alpha": 2, "loraAlpha": 3})
    assert errs == [("lora_alpha", "given twice (as 'lora_alpha' and 'loraAlpha')")]


def test_what_a_checkpoint_stores_reads_back_to_the_same_spec():
    t = parse_spec({**BASE, "targetModules": ["to_q", "ff.net.2"], "validationPrompts": ["a", "b"],
                    "validationPrompt": "c", "use8bitAdam": True, "resumeFromCheckpoint": "latest",
                    "lrScheduler": "LR_SCHEDULER_COSINE", "seed": 7, "rank": 8})
    assert t.unet_targets == ["to_q", "ff.net.2"] and t.all_validation_prompts == ["c", "a", "b"]
    assert t.use_8bit_adam and t.resume_from_checkpoint == "latest"
    stored = t.to_json_dict()
    assert stored["targetModules"] == ["to_q", "ff.net.2"] and stored["lrScheduler"] == "LR_SCHEDULER_COSINE"
    assert stored["seed"] == "7" and stored["rank"] == 8 and "resolution" not in stored  # only what was set
    assert parse_spec(json.loads(json.dumps(stored))) == t


def test_not_json_and_not_object():
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec("{nope")
    with pytest.raises(SpecError, match="JSON object"):
        load_spec(json.dumps([1, 2]))
