"""A client-named base model is read only from inside the data roots (confined.py): every file is opened once and
judged by the real path of what was opened, and the loaders read links to those open files, so a file swapped for a
link after the check is not read. Links that stay inside the roots (a Hugging Face cache snapshot) still work."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import PROMPT, engine_cmd, engine_env, run_train

from loraforge_engine.confined import ROOTS_ENV, PinnedModel, pinned_model
from loraforge_engine.data import DataError
from loraforge_engine.fingerprint import model_hash, model_hash_idle

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def layout(tmp_path, tiny_model):
    """A data root holding a copy of the tiny model, and a private folder outside it."""
    root, private = tmp_path / "root", tmp_path / "private"
    root.mkdir()
    private.mkdir()
    shutil.copytree(tiny_model, root / "model")
    shutil.copytree(tiny_model, private / "model")
    return root, private


def test_view_reads_the_same_model(layout):
    root, _ = layout
    pinned = PinnedModel(str(root / "model"), [str(root)])
    try:
        view = Path(pinned.path)
        assert view.name == "model"
        assert model_hash(view) == model_hash(root / "model")
        assert (view / UNET).read_bytes() == (root / "model" / UNET).read_bytes()
        # The idle-priority hash runs in a child process: it reads the view's links to this process's files.
        assert model_hash_idle(view) == model_hash(root / "model")
    finally:
        pinned.close()
    assert not view.parent.exists()
    assert pinned.fds == []


@pytest.mark.parametrize("what", ["file", "folder"])
def test_link_leading_out_is_refused(layout, what):
    root, private = layout
    model = root / "model"
    if what == "file":
        (model / UNET).unlink()
        os.symlink(private / "model" / UNET, model / UNET)
        rel = UNET
    else:
        shutil.rmtree(model / "vae")
        os.symlink(private / "model" / "vae", model / "vae")
        rel = "vae/"
    with pytest.raises(DataError, match=f"{rel}.* leads outside the server's data roots") as e:
        PinnedModel(str(model), [str(root)])
    assert str(private) not in str(e.value)  # the message names the file inside the model, not the target


def test_links_inside_the_roots_are_followed(layout):
    """A Hugging Face cache snapshot: its files are links into the cache's blobs folder, beside the snapshot."""
    root, _ = layout
    snapshot, blobs = root / "hub" / "snapshots" / "abc", root / "hub" / "blobs"
    shutil.copytree(root / "model", snapshot)
    blobs.mkdir()
    (snapshot / UNET).rename(blobs / "1234")
    os.symlink(Path("../../../blobs/1234"), snapshot / UNET)
    pinned = PinnedModel(str(snapshot), [str(root)])
    try:
        assert model_hash(pinned.path) == model_hash(root / "model")
    finally:
        pinned.close()


def test_a_file_swapped_for_a_link_after_the_check_is_not_read(layout):
    root, private = layout
    model = root / "model"
    original = (model / UNET).read_bytes()
    pinned = PinnedModel(str(model), [str(root)])
    try:
        # A local user replaces the weights with a link to a private file once the folder was judged.
        (private / "model" / UNET).write_bytes(b"private weights")
        (model / UNET).unlink()
        os.symlink(private / "model" / UNET, model / UNET)
        assert (Path(pinned.path) / UNET).read_bytes() == original
    finally:
        pinned.close()


def test_fifos_and_loops_do_not_hang_the_walk(layout):
    root, private = layout
    model = root / "model"
    os.mkfifo(model / "unet" / "pipe")
    os.symlink("..", model / "unet" / "up")  # a loop back to the model folder
    done: list = []
    walker = threading.Thread(target=lambda: done.append(PinnedModel(str(model), [str(root)])), daemon=True)
    walker.start()
    walker.join(20)
    assert done, "the walk hung"
    pinned = done[0]
    try:
        # The FIFO is left out, and the loop back up adds no folder: the view is the model as it was copied.
        assert sorted(os.listdir(Path(pinned.path) / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]
        assert model_hash(pinned.path) == model_hash(private / "model")
    finally:
        pinned.close()


def test_without_roots_the_folder_is_read_as_it_is(layout, monkeypatch):
    root, _ = layout
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    assert pinned_model(str(root / "model")) == (str(root / "model"), None)


def test_engine_commands_refuse_a_model_leading_out(layout, monkeypatch, tmp_path, dataset):
    """train, model-hash and export-onnx, run as the worker and Infer run them (roots in the environment)."""
    root, private = layout
    model = root / "model"
    (model / UNET).unlink()
    os.symlink(private / "model" / UNET, model / UNET)
    monkeypatch.setenv(ROOTS_ENV, str(root))
    for args in (["model-hash", str(model)], ["export-onnx", str(model), "--out", str(tmp_path / "onnx")]):
        proc = subprocess.run(engine_cmd(*args), capture_output=True, text=True, env=engine_env(), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"{UNET} leads outside the server's data roots" in proc.stderr
    spec = {"baseModel": str(model), "datasetDir": str(dataset), "resolution": 32, "maxTrainSteps": 1,
            "validationPrompt": PROMPT}
    code, events, stderr = run_train(spec, tmp_path / "out")
    assert code == 3, stderr
    assert "leads outside the server's data roots" in events[-1].state.error.message
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_engine_trains_through_the_view(layout, monkeypatch, tmp_path, dataset):
    root, _ = layout
    monkeypatch.setenv(ROOTS_ENV, str(root))
    spec = {"baseModel": str(root / "model"), "datasetDir": str(dataset), "resolution": 32, "maxTrainSteps": 2,
            "trainBatchSize": 2}
    code, events, stderr = run_train(spec, tmp_path / "out")
    assert code == 0, stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    # The LoRA records the model as the client named it and the same identity as the folder read directly.
    assert meta["loraforge.base_model"] == "model"
    assert meta["loraforge.base_model_sha256"] == model_hash(root / "model")
