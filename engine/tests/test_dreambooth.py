"""DreamBooth with prior preservation on the tiny models: class images given, generated with the base model, cached
and reused by a later run; the loss is instance loss + prior_loss_weight x class loss; the LoRA loads in stock
diffusers. A few steps each (the runs share one class-image cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import of_kind, run_train

from loraforge_engine.config import SpecError, parse_spec
from loraforge_engine.dreambooth import combine, prior_loss

CLASS_PROMPT = "a photo of a shape"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(autouse=True)
def cache_env(cache, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE_DIR", str(cache))  # run_train's engine inherits it


@pytest.fixture(scope="module")
def instances(tmp_path_factory, dataset) -> Path:
    """Three uncaptioned photos: DreamBooth's usual instance data."""
    folder = tmp_path_factory.mktemp("instances")
    for name in sorted(p.name for p in dataset.glob("*.png"))[:3]:
        shutil.copy(dataset / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def given_classes(tmp_path_factory, dataset) -> Path:
    """Two class images the user already has (one not at the training size)."""
    folder = tmp_path_factory.mktemp("classes")
    names = sorted(p.name for p in dataset.glob("*.png"))
    shutil.copy(dataset / names[5], folder / "a.png")
    Image.open(dataset / names[6]).resize((80, 64)).save(folder / "b.png")
    return folder


def spec(model: Path, data: Path, **extra) -> dict:
    return {"baseModel": str(model), "datasetDir": str(data), "instancePrompt": "a photo of sks shape",
            "resolution": 64, "trainBatchSize": 2, "maxTrainSteps": 2, "seed": 3, "checkpointingSteps": 1000,
            "withPriorPreservation": True, "classPrompt": CLASS_PROMPT, "classInferenceSteps": 2,
            "classSampleBatchSize": 2, **extra}


def class_cache_files(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*.png")}


def test_class_prompt_is_required_with_prior_preservation():
    with pytest.raises(SpecError) as e:
        parse_spec({"baseModel": "/m", "datasetDir": "/d", "withPriorPreservation": True})
    assert [f for f, _ in e.value.errors] == ["class_prompt"]
    assert parse_spec({"baseModel": "/m", "datasetDir": "/d", "withPriorPreservation": True,
                       "classPrompt": "a dog"}).num_class_images == 100  # diffusers' default


def test_prior_preservation_is_refused_on_several_devices():
    # Its class batch is not sharded across data-parallel ranks yet: the rule refuses the combination up front.
    spec = {"baseModel": "/m", "datasetDir": "/d", "withPriorPreservation": True, "classPrompt": "a dog"}
    with pytest.raises(SpecError) as e:
        parse_spec({**spec, "numDevices": 2})
    assert [f for f, _ in e.value.errors] == ["with_prior_preservation"]
    assert parse_spec({**spec, "numDevices": 1}).num_devices == 1


def test_loss_composition():
    pred, target = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    assert prior_loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert combine(torch.tensor(0.5), prior_loss(pred, target), 2.0).item() == pytest.approx(0.5 + 2 * 2.5)


def test_generates_missing_class_images_caches_them_and_a_second_run_reuses_them(tiny_model, instances,
                                                                                given_classes, cache, tmp_path):
    # Run 1: two class images given, two generated with the base model.
    code, events, err = run_train(spec(tiny_model, instances, classDataDir=str(given_classes), numClassImages=4),
                                  tmp_path / "one")
    assert code == 0, err
    progress = of_kind(events, "class_images")
    assert progress[0].total == 4 and progress[0].given == 2 and progress[0].cached == 0
    assert progress[0].to_generate == 2 and not progress[0].done
    assert [p.generated for p in progress] == [0, 2] and progress[-1].done
    assert of_kind(events, "dataset")[0].images_used == 3
    files = class_cache_files(cache)
    assert len(files) == 2
    # The events came before the first step.
    kinds = [e.WhichOneof("payload") for e in events]
    assert max(i for i, k in enumerate(kinds) if k == "class_images") < kinds.index("metrics")

    # Run 2: the same class prompt, no class images given, two wanted: both from the cache, none made again.
    code, events, err = run_train(spec(tiny_model, instances, numClassImages=2, seed=4), tmp_path / "two")
    assert code == 0, err
    progress = of_kind(events, "class_images")
    assert len(progress) == 1 and progress[0].cached == 2 and progress[0].to_generate == 0 and progress[0].done
    assert class_cache_files(cache) == files  # not rewritten

    # The LoRA loads with stock diffusers and changes the image.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), local_files_only=True, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator("cpu").manual_seed(0)
        return pipe("a photo of sks shape", num_inference_steps=2, generator=g, output_type="np").images

    base = image()
    pipe.load_lora_weights(str(tmp_path / "two"))
    assert np.abs(image() - base).max() > 0


def test_loss_is_instance_plus_weighted_prior(tiny_model, instances, tmp_path):
    """Same first step (same parameters, batches and noise) at two weights: the loss grows by the weight's change
    times a positive class loss, i.e. loss = instance + weight x prior."""
    losses = {}
    for w in (1.0, 3.0):
        code, events, err = run_train(spec(tiny_model, instances, numClassImages=2, maxTrainSteps=1,
                                           priorLossWeight=w), tmp_path / f"w{w}")
        assert code == 0, err
        losses[w] = of_kind(events, "metrics")[0].loss
    prior = (losses[3.0] - losses[1.0]) / 2
    assert prior > 0
    code, events, err = run_train(spec(tiny_model, instances, numClassImages=2, maxTrainSteps=1,
                                       priorLossWeight=5.0), tmp_path / "w5")
    assert code == 0, err
    assert of_kind(events, "metrics")[0].loss == pytest.approx(losses[1.0] + 4 * prior, rel=1e-4)


def test_buckets_put_class_images_through_the_unet_apart(tiny_model, tmp_path, cache):
    """Instance images in a non-square bucket: the class batch (square) cannot join it and runs on its own."""
    wide = tmp_path / "wide"
    wide.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(wide / f"{i}.png")
    code, events, err = run_train(spec(tiny_model, wide, numClassImages=2, aspectRatioBuckets=True, bucketStep=32,
                                       bucketMaxSide=128), tmp_path / "out")
    assert code == 0, err
    assert [(b.width, b.height) for b in of_kind(events, "dataset")[0].buckets] != [(64, 64)]
    assert all(np.isfinite(m.loss) for m in of_kind(events, "metrics"))


def test_sdxl(tiny_sdxl, instances, tmp_path, cache):
    code, events, err = run_train(spec(tiny_sdxl, instances, numClassImages=2), tmp_path / "out")
    assert code == 0, err
    progress = of_kind(events, "class_images")
    assert progress[-1].done and progress[0].to_generate == 2  # SDXL's own cache key: none of SD's images
    assert len(of_kind(events, "metrics")) == 2
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True, use_safetensors=True)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert pipe.unet.peft_config  # the adapter is on the UNet
