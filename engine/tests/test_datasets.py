"""Real users' data sets: captions from every source the anchors read (metadata.jsonl/csv, .txt sidecars, one
instance prompt, shuffled tags), aspect-ratio buckets on generated sets of mixed sizes (portrait, landscape,
square, tiny, corrupt, uncaptioned), latents cached per image equal to fresh encodings, SDXL's size and crop
conditioning taken from what was done to each image, and a bucketed run that learns and loads in diffusers."""

from __future__ import annotations

import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_pipeline, of_kind, render, run_train
from PIL import Image

from loraforge_engine.config import SpecError, parse_spec
from loraforge_engine.contract import job_pb2
from loraforge_engine.data import (CORRUPT, NO_CAPTION, TOO_SMALL, CaptionedImages, DataError, discover, inspect,
                                   make_buckets, nearest_bucket, shuffle_tags)
from loraforge_engine.events import EventWriter
from loraforge_engine.tiny import make_dataset
from loraforge_engine.train import Trainer


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """10 captioned images of 1:1, 3:2, 2:3, 2:1 and 1:2 (64 px short side), plus tiny, corrupt, uncaptioned."""
    return make_dataset(tmp_path_factory.mktemp("mixed") / "set", count=10, size=64, seed=3, fmt="txt", mixed=True)


def image(path: Path, size=(32, 32)) -> None:
    Image.new("RGB", size, (200, 30, 30)).save(path)


# --------------------------------------------------------------------------------------------- captions

def test_metadata_csv_with_quoted_captions(tmp_path):
    for i in range(3):
        image(tmp_path / f"{i}.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\n0.png,"a cat, sitting"\n1.png,"say ""hi"""\n'
                                           "missing.png,gone\n2.png,plain\n")
    skipped: list = []
    ex = discover(tmp_path, skipped=skipped)
    assert [(e.path.name, e.caption) for e in ex] == [("0.png", "a cat, sitting"), ("1.png", 'say "hi"'),
                                                      ("2.png", "plain")]
    assert [(s.name, s.reason) for s in skipped] == [("missing.png", "unreadable")]
    (tmp_path / "metadata.csv").write_text("image,caption\n0.png,x\n")
    with pytest.raises(DataError, match="no column 'file_name'"):
        discover(tmp_path)
    assert [e.caption for e in discover(tmp_path, "image", "caption")] == ["x"]


def test_metadata_jsonl_wins_over_csv_and_sidecars(tmp_path):
    image(tmp_path / "0.png")
    (tmp_path / "0.txt").write_text("from the sidecar")
    (tmp_path / "metadata.csv").write_text("file_name,text\n0.png,from the csv\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "from the jsonl"}) + "\n")
    assert [e.caption for e in discover(tmp_path)] == ["from the jsonl"]
    (tmp_path / "metadata.jsonl").unlink()
    assert [e.caption for e in discover(tmp_path)] == ["from the csv"]
    (tmp_path / "metadata.csv").unlink()
    assert [e.caption for e in discover(tmp_path)] == ["from the sidecar"]


def test_instance_prompt_captions_every_image_and_needs_no_caption_files(mixed):
    skipped: list = []
    ex = discover(mixed, skipped=skipped, instance_prompt="a photo of sks shape")
    assert skipped == []
    assert {e.caption for e in ex} == {"a photo of sks shape"}
    assert "uncaptioned.png" in {e.path.name for e in ex}  # no .txt needed
    without: list = []
    discover(mixed, skipped=without)
    assert [(s.name, s.reason) for s in without] == [("uncaptioned.png", NO_CAPTION)]


def test_inspect_skips_corrupt_and_tiny_images_with_their_reasons(mixed):
    skipped: list = []
    ex = discover(mixed, skipped=skipped)
    kept, sizes, bad = inspect(ex, min_side=16, root=mixed)
    assert sorted((s.name, s.reason) for s in bad) == [("corrupt.png", CORRUPT), ("tiny.png", TOO_SMALL)]
    assert "4x4" in next(s.detail for s in bad if s.reason == TOO_SMALL)
    assert len(kept) == len(sizes) == 10
    assert Counter(sizes) == {(64, 64): 2, (96, 64): 2, (64, 96): 2, (128, 64): 2, (64, 128): 2}
    assert [s for s in sizes] == [Image.open(e.path).size for e in kept]


def test_shuffle_tags_keeps_the_first_tags_and_is_seeded(dataset):
    caption = "sks, a dog, on grass, at noon, smiling, photo"
    rng = lambda k: np.random.default_rng([1, k])  # noqa: E731
    outs = {shuffle_tags(caption, 2, rng(k)) for k in range(30)}
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "a dog"] and sorted(tags) == sorted(caption.split(", "))
    assert shuffle_tags(caption, 2, rng(4)) == shuffle_tags(caption, 2, rng(4))
    ex = discover(dataset)[:4]
    ds = CaptionedImages(ex, 64, True, False, seed=3, sizes=[(64, 64)] * 4, shuffle_tags=True, keep_tags=1)
    plain = ex[0].caption.split(" ")  # the synthetic captions have no commas: one tag, unchanged
    assert ds.caption(0, 0).split(" ") == plain
    assert ds.caption(5, 0) == ds.caption(5, 0)  # a function of (seed, epoch, image): resume sees the same


# --------------------------------------------------------------------------------------------- buckets

@pytest.mark.parametrize("resolution,step,low,high,aspect", [(512, 64, 256, 1024, 4.0), (1024, 64, 512, 2048, 2.0),
                                                             (64, 16, 32, 128, 4.0), (768, 32, 384, 1536, 3.0)])
def test_buckets_keep_area_steps_sides_and_aspect(resolution, step, low, high, aspect):
    buckets = make_buckets(resolution, step, low, high, aspect)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and low <= min(w, h) and max(w, h) <= high
        assert w * h <= resolution * resolution and max(w, h) / min(w, h) <= aspect
        assert (h, w) in buckets
        # About resolution² pixels: one more step on either side would pass the area (or the largest side).
        area = resolution * resolution
        assert w * (h + step) > area or (w + step) * h > area or max(w, h) == high


def test_images_go_to_the_nearest_bucket():
    buckets = make_buckets(512, 64, 256, 1024, 4.0)
    at = lambda size: buckets[nearest_bucket(size, buckets)]  # noqa: E731
    assert at((800, 800)) == (512, 512)
    assert at((1200, 800)) == (640, 384) and at((800, 1200)) == (384, 640)  # 3:2 -> 5:3, its mirror
    w, h = at((1920, 1080))
    assert w > h
    for bw, bh in buckets:  # no bucket is nearer in aspect ratio
        assert abs(math.log(bw / bh) - math.log(1920 / 1080)) >= abs(math.log(w / h) - math.log(1920 / 1080)) - 1e-12
    assert at((300, 2000)) == (256, 1024)  # beyond the largest aspect ratio: the most extreme bucket


def test_bucketed_batches_draw_from_one_bucket_and_cover_each_image_once(mixed):
    ex = [e for e in discover(mixed) if e.path.name not in ("corrupt.png", "tiny.png")]
    sizes = [Image.open(e.path).size for e in ex]
    buckets = make_buckets(64, 16, 32, 128, 4.0)
    ds = CaptionedImages(ex, 64, True, True, seed=2, sizes=sizes, buckets=buckets)
    assert {ds.target(i) for i in range(len(ds))} == {(64, 64), (80, 48), (48, 80)}
    for i, (w, h) in enumerate(sizes):  # landscape images in landscape buckets, portraits in portrait ones
        tw, th = ds.target(i)
        assert (w > h) == (tw > th) and (w < h) == (tw < th)
    for batch in (1, 3, 4):
        n = ds.batches_per_epoch(batch)
        assert n == sum(-(-len(m) // batch) for m in ds.members.values())
        for epoch in (0, 1):
            seen = []
            for b in range(n):
                ids = ds.batch_ids(epoch, b, batch)
                assert 1 <= len(ids) <= batch and len({ds.target(i) for i in ids}) == 1
                seen += ids
            assert sorted(seen) == list(range(len(ds)))
    orders = [[ds.batch_ids(e, b, 2) for b in range(ds.batches_per_epoch(2))] for e in range(4)]
    assert len({json.dumps(o) for o in orders}) > 1  # reshuffled every epoch
    for i in range(len(ds)):  # each sample is cut to its bucket's size, as little as possible
        a = ds.augment(0, i)
        px = ds.pixels(i, a)
        tw, th = ds.target(i)
        assert px.shape == (3, th, tw)
        w, h = sizes[i]
        assert min(a.resized[0] / w, a.resized[1] / h) == pytest.approx(max(tw / w, th / h), abs=0.02)
        assert a.resized[0] == tw or a.resized[1] == th  # one side fits exactly: only the other is cropped


def make_trainer(model, data, out, **extra) -> Trainer:
    spec = parse_spec({"baseModel": str(model), "datasetDir": str(data), "resolution": 64, "trainBatchSize": 2,
                       "maxTrainSteps": 10, "learningRate": 1e-3, "lrWarmupSteps": 0, "seed": 5,
                       "aspectRatioBuckets": True, "bucketStep": 16, "minImageSide": 16, **extra})
    return Trainer(spec, str(out), EventWriter(io.StringIO()))


def test_cached_latents_equal_fresh_encodings_per_bucket_and_orientation(tiny_model, mixed, tmp_path):
    t = make_trainer(tiny_model, mixed, tmp_path / "out", centerCrop=True, randomFlip=True)
    ds = t.dataset
    assert all(t.latent_cacheable) and t.latent_cache == {}
    for step in range(2 * t.steps_per_epoch):  # two epochs: most images in both orientations
        t.optimizer_step(step)
    assert len({k[0] for k in t.latent_cache}) == len(ds)
    assert any(flip for _, flip in t.latent_cache) and any(not flip for _, flip in t.latent_cache)
    vae = t.c.vae
    for (i, flip), (mean, std) in t.latent_cache.items():
        epoch = next(e for e in range(50) if ds.augment(e, i).flip == flip)
        pixels = ds.pixels(i, ds.augment(epoch, i))
        tw, th = ds.target(i)
        with torch.no_grad():  # encoded afresh, straight through diffusers' VAE
            fresh = vae.encode(torch.from_numpy(pixels)[None]).latent_dist
        assert mean.shape == (4, th // 8, tw // 8)
        torch.testing.assert_close(mean, fresh.mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std, fresh.std[0], rtol=1e-5, atol=1e-5)


def test_random_crops_are_cached_only_where_the_image_fits_its_bucket(tiny_model, mixed, tmp_path):
    t = make_trainer(tiny_model, mixed, tmp_path / "out", centerCrop=False)
    ds = t.dataset
    for i in range(len(ds)):
        tw, th = ds.target(i)
        w, h = ds.sizes[i]
        assert t.latent_cacheable[i] == (w * th == h * tw)  # same aspect ratio: the resized image is the crop
    assert 0 < sum(t.latent_cacheable) < len(ds)  # the squares fit 64x64; 3:2 does not fit 5:3


def test_sdxl_size_and_crop_conditioning_follow_each_image(tiny_sdxl, mixed, tmp_path):
    t = make_trainer(tiny_sdxl, mixed, tmp_path / "out", centerCrop=False, randomFlip=True)
    ds = t.dataset
    seen = set()
    for b in range(t.batches_per_epoch):
        mb = t.micro_batch(0, b, b)
        ids = ds.batch_ids(0, b, 2)
        h, w = mb.latents.shape[-2:]
        for row, i in zip(mb.add_time_ids.tolist(), ids):
            orig = Image.open(ds.examples[i].path).size
            a = ds.augment(0, i)
            assert row[:2] == [orig[1], orig[0]]  # original (height, width): the file's real size
            assert row[4:] == [h * 8, w * 8]  # target (height, width): the bucket this batch really has
            left = a.resized[0] - w * 8 - a.left if a.flip else a.left
            assert row[2:4] == [a.top, left]  # crop corner in the resized (and flipped) image
            assert 0 <= row[2] <= a.resized[1] - h * 8 and 0 <= row[3] <= a.resized[0] - w * 8
            seen.add((h * 8, w * 8))
    assert len(seen) == 3


def test_bucket_sides_the_model_cannot_take_fail_at_start(tiny_model, mixed, tmp_path):
    # The tiny UNet halves 8x-downsampled latents once: sides must be multiples of 16; step 8 makes 88x40.
    with pytest.raises(SpecError, match="bucket_step"):
        make_trainer(tiny_model, mixed, tmp_path / "out", bucketStep=8, centerCrop=True)
    with pytest.raises(SpecError, match="bucket_max_side"):
        parse_spec({"baseModel": str(tiny_model), "datasetDir": str(mixed), "bucketMinSide": 256,
                    "bucketMaxSide": 128})


class Never:
    def is_set(self) -> bool:
        return False


def test_bucketed_run_resumed_from_a_checkpoint_ends_as_an_uninterrupted_one(tiny_model, mixed, tmp_path):
    # Bucket batches, random crops, flips and shuffled tags are functions of (seed, epoch): a resumed run sees the
    # batches the uninterrupted one saw after its checkpoint.
    spec = parse_spec({"baseModel": str(tiny_model), "datasetDir": str(mixed), "resolution": 64, "trainBatchSize": 3,
                       "maxTrainSteps": 10, "learningRate": 3e-3, "lrWarmupSteps": 0, "seed": 9,
                       "aspectRatioBuckets": True, "bucketStep": 16, "minImageSide": 16, "randomFlip": True,
                       "shuffleTags": True, "checkpointingSteps": 4})
    whole, _ = Trainer(spec, str(tmp_path / "a"), EventWriter(io.StringIO())).train(Never())
    resumed = Trainer(spec, str(tmp_path / "b"), EventWriter(io.StringIO()),
                      resume_from=str(tmp_path / "a" / "checkpoints" / "checkpoint-4"))
    assert resumed.start_step == 4
    again, _ = resumed.train(Never())
    from safetensors.torch import load_file

    a, b = load_file(str(whole)), load_file(str(again))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"bucketed resume from checkpoint-4: largest abs diff {diff:g}")
    assert diff <= 1e-6


def test_an_image_that_goes_bad_mid_run_does_not_end_it(tiny_model, mixed, tmp_path):
    data = tmp_path / "set"
    shutil.copytree(mixed, data)
    out = io.StringIO()
    spec = parse_spec({"baseModel": str(tiny_model), "datasetDir": str(data), "resolution": 64, "trainBatchSize": 2,
                       "maxTrainSteps": 20, "seed": 5, "aspectRatioBuckets": True, "bucketStep": 16,
                       "minImageSide": 16, "cacheLatents": False})
    t = Trainer(spec, str(tmp_path / "out"), EventWriter(out))
    t.optimizer_step(0)
    victim = t.dataset.examples[0].path
    victim.write_bytes(b"truncated")  # changed on disk after the start's inspection
    results = [t.optimizer_step(step) for step in range(1, 2 * t.steps_per_epoch)]
    assert all(math.isfinite(r.loss) for r in results)
    assert t.bad_images == {0}
    logs = [json.loads(line).get("log", {}).get("message", "") for line in out.getvalue().splitlines()]
    warnings = [m for m in logs if "no longer decodes" in m]
    assert len(warnings) == 1 and victim.name in warnings[0] and "corrupt" in warnings[0]


# --------------------------------------------------------------------------------------------- a real run

def bucket_loss(pipe, ds: CaptionedImages) -> float:
    """Diffusion loss of `pipe.unet` on a fixed set: every image at its bucket (centre crop, no flip), fixed VAE
    sample, noise and four timesteps across the schedule. The same function before and after training."""
    g = torch.Generator().manual_seed(99)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            a = ds.augment(0, i)
            pixels = torch.from_numpy(ds.pixels(i, a))[None]
            ids = pipe.tokenizer([ds.examples[i].caption], max_length=pipe.tokenizer.model_max_length,
                                 padding="max_length", truncation=True, return_tensors="pt").input_ids
            text = pipe.text_encoder(ids)[0]
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
            for k in range(4):
                noise = torch.randn(latents.shape, generator=g)
                t = torch.full((1,), int((k + 0.5) * 250), dtype=torch.long)
                pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, t), t, text).sample
                total += torch.nn.functional.mse_loss(pred, noise).item()
                n += 1
    return total / n


def test_bucketed_run_learns_reports_and_loads_in_diffusers(tiny_model, mixed, tmp_path):
    spec = {"baseModel": str(tiny_model), "datasetDir": str(mixed), "resolution": 64, "trainBatchSize": 4,
            "maxTrainSteps": 60, "learningRate": 3e-3, "lrWarmupSteps": 0, "rank": 8, "seed": 11,
            "centerCrop": True, "randomFlip": True, "aspectRatioBuckets": True, "bucketStep": 16,
            "minImageSide": 16, "checkpointingSteps": 1000}
    rc, events, stderr = run_train(spec, tmp_path / "out")
    assert rc == 0, stderr[-3000:]
    (report,) = of_kind(events, "dataset")
    assert (report.images_found, report.images_used, report.skipped_total) == (13, 10, 3)
    assert sorted(job_pb2.SkipReason.Name(s.reason) for s in report.skipped) == [
        "SKIP_REASON_CORRUPT", "SKIP_REASON_NO_CAPTION", "SKIP_REASON_TOO_SMALL"]
    assert sorted((b.width, b.height, b.images, b.batches) for b in report.buckets) == [
        (48, 80, 4, 1), (64, 64, 2, 1), (80, 48, 4, 1)]
    assert report.latents_cached == 10 and report.latents_cached_flipped and report.text_embeddings_cached
    logs = [log.message for log in of_kind(events, "log")]
    assert any("aspect-ratio buckets: 3 of" in m and "64x64 (2 of 4)" in m and "shorter batch" in m for m in logs)
    assert all(0 < m.loss < 10 for m in of_kind(events, "metrics"))

    # The LoRA loads in stock diffusers, lowers the loss on the training images at their buckets, and changes
    # what the model draws.
    examples = [e for e in discover(mixed) if e.path.name not in ("corrupt.png", "tiny.png")]
    sizes = [Image.open(e.path).size for e in examples]
    ds = CaptionedImages(examples, 64, True, False, seed=0, sizes=sizes, buckets=make_buckets(64, 16, 32, 128, 4.0))
    pipe = load_pipeline(tiny_model)
    base_image = render(pipe)
    before = bucket_loss(pipe, ds)
    pipe.load_lora_weights(str(tmp_path / "out"))
    after = bucket_loss(pipe, ds)
    print(f"bucketed fixed-set loss: before {before:.4f}, after {after:.4f}")
    assert after < 0.85 * before
    assert abs(render(pipe) - base_image).max() > 1e-3
    shutil.rmtree(tmp_path / "out")
