"""export-onnx: the exported graphs with LoRA slots give diffusers' outputs (onnxruntime vs PyTorch).

One export of the tiny model serves every test here (it takes most of a minute on a 2-core CPU).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from helpers import engine_cmd, engine_env, load_pipeline
from loraforge_engine.lora_files import diffusers_keys
from loraforge_engine.onnx_export import export_model, model_hash

# Every layer kohya's sd-scripts adapts (the export's slots): attention, feed-forward, proj_in/proj_out (1x1
# convolutions in SD-1.x, Linear in SDXL) and the text encoders' attention and MLP.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


EXPORT_LOG: list[str] = []  # what the module's export logged (its progress lines among them)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    model = tiny_model
    out, digest, fresh = export_model(model, root / "cache", log=EXPORT_LOG.append)
    assert fresh
    return model, out, digest, root


def test_export_reports_progress_and_writes_weights_beside_the_graphs(exported):
    """Progress lines with percentages: every component, per-tensor steps inside the UNet, never going back,
    ending at 100%. Each graph's weights are in <graph>.onnx.data, which onnxruntime finds on its own."""
    import re

    _, out, _, _ = exported
    progress = [re.fullmatch(r"progress +(\d+)% (.*)", line) for line in EXPORT_LOG]
    progress = [(int(m[1]), m[2]) for m in progress if m]
    assert [p for p, _ in progress] == sorted(p for p, _ in progress)
    assert progress[-1] == (100, "done")
    for component in ("text_encoder", "unet", "vae"):
        steps = [step for _, step in progress if step.startswith(component + ":")]
        assert f"{component}: loading weights" in steps and f"{component}: running onnxruntime on the example inputs" in steps
    assert any(re.fullmatch(r"unet: writing weights \d+/\d+", step) for _, step in progress)
    model = exported[0]
    manifest = json.loads((out / "manifest.json").read_text())
    for component, graph in manifest["files"].items():
        data = out / manifest["external_data"][component]
        assert data.name == graph + ".data" and data.stat().st_size > 0
    # The text encoder's and the UNet's weights are all in their .data files (the VAE decoder is part of its file).
    for component in ("text_encoder", "unet"):
        weights = sum(f.stat().st_size for f in (model / component).glob("*.safetensors"))
        assert (out / f"{component}.onnx.data").stat().st_size >= 0.9 * weights


def save_random_lora(pipe, parts, out_dir, seed: int, rank: int, alpha: float):
    """Adds a peft adapter to each (component name, model, targets) of `pipe`, gives its up weights random
    non-zero values, and saves them as diffusers does (save_lora_weights, alpha in the metadata)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    layers, meta = {}, {}
    for name, model, targets in parts:
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.2)
        layers[f"{name}_lora_layers"] = diffusers_keys(get_peft_model_state_dict(model),
                                                       convert_state_dict_to_diffusers)
        cfg = model.peft_config["default"].to_dict()
        meta[f"{name}_lora_adapter_metadata"] = {k: sorted(v) if isinstance(v, (set, frozenset)) else v
                                                for k, v in cfg.items()}
    type(pipe).save_lora_weights(save_directory=str(out_dir), safe_serialization=True, **layers, **meta)
    return out_dir / "pytorch_lora_weights.safetensors"


def make_lora(model_dir, out_dir, seed: int, *, rank=4, alpha=8.0, text_encoder=False):
    """An SD LoRA on the UNet (and the text encoder), with non-zero up weights."""
    pipe = load_pipeline(model_dir)
    parts = [("unet", pipe.unet, UNET_TARGETS)] + ([("text_encoder", pipe.text_encoder, TE_TARGETS)] if text_encoder else [])
    return save_random_lora(pipe, parts, out_dir, seed, rank, alpha)


def slot_feeds(manifest, component: str, lora_file=None) -> dict:
    """Slot inputs for one component: rank-0 tensors, or the file's A/B with alpha / r folded into B."""
    feeds = {}
    slots = [s for s in manifest["slots"] if s["component"] == component]
    for s in slots:
        feeds[s["input_a"]] = np.zeros((0, s["in_features"]), np.float32)
        feeds[s["input_b"]] = np.zeros((s["out_features"], 0), np.float32)
    if lora_file is None:
        return feeds
    with safe_open(str(lora_file), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        scale = meta[f"{component}.lora_alpha"] / meta[f"{component}.r"] if f"{component}.r" in meta else 1.0
        for s in slots:
            for down, up in ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight"),
                             (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")):
                if s["diffusers_key"] + down in f.keys():
                    # 1x1 convolution LoRAs are [r, in, 1, 1] / [out, r, 1, 1]: the slots take them 2-D.
                    a = f.get_tensor(s["diffusers_key"] + down).numpy()
                    b = f.get_tensor(s["diffusers_key"] + up).numpy()
                    feeds[s["input_a"]] = a.reshape(a.shape[0], a.shape[1])
                    feeds[s["input_b"]] = b.reshape(b.shape[0], b.shape[1]) * scale
    return feeds


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_export_is_cached_by_content(exported, tmp_path):
    model, out, digest, root = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_hash"] == digest and manifest["complete"] is True
    unet_slots = [s for s in manifest["slots"] if s["component"] == "unet"]
    # 6 transformers of one block each: proj_in, proj_out, 2 attentions x 4 projections, 2 feed-forward layers.
    assert len(unet_slots) == 6 * (2 + 2 * 4 + 2)
    assert {s["kind"] for s in unet_slots if s["module"].endswith(("proj_in", "proj_out"))} == {"conv1x1"}
    assert {s["kind"] for s in unet_slots if not s["module"].endswith(("proj_in", "proj_out"))} == {"linear"}
    assert len([s for s in manifest["slots"] if s["component"] == "text_encoder"]) == 3 * 6
    # A copy elsewhere has the same hash, and the CLI finds the export instead of redoing it.
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert model_hash(copy) == digest
    proc = subprocess.run(engine_cmd("export-onnx", str(copy), "--out", str(root / "cache")), capture_output=True,
                          text=True, env=engine_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"dir": str(out), "model_hash": digest,
                                                                 "exported": False}
    (copy / "unet" / "config.json").write_text((copy / "unet" / "config.json").read_text() + "\n")
    assert model_hash(copy) != digest


# Runs `python -m loraforge_engine ARGS...` as the server does, then reports on stderr's last line whether torch or
# diffusers were imported on the way.
IMPORTS_PROBE = """
import runpy, sys
try:
    runpy.run_module("loraforge_engine", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print("heavy imports:", sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def test_bad_inputs_are_refused_before_any_heavy_work(tiny_model, tmp_path):
    """A folder without the tokenizer's BPE files (or with a broken config) fails at once, naming every problem,
    and leaves nothing in the cache: no hash read, no weights loaded, no graph traced."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "tokenizer" / "vocab.json").unlink()
    (bad / "tokenizer" / "merges.txt").unlink()
    (bad / "vae" / "config.json").write_text("{not json")
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, "export-onnx", str(bad), "--out", str(cache)],
                          capture_output=True, text=True, env=engine_env(), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "tokenizer/ lacks vocab.json and merges.txt" in proc.stderr
    assert "vae/config.json is not valid JSON" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "heavy imports: []"  # refused before torch was imported
    assert not cache.exists()
    with pytest.raises(FileNotFoundError, match="tokenizer/ lacks merges.txt"):
        (bad / "vae" / "config.json").write_text((tiny_model / "vae" / "config.json").read_text())
        (bad / "tokenizer" / "vocab.json").write_text((tiny_model / "tokenizer" / "vocab.json").read_text())
        export_model(bad, cache)


def test_one_base_model_identity(exported, dataset, tmp_path):
    """What `model-hash` prints is the ONNX export's cache key and the hash training records in the LoRA file."""
    import io

    from loraforge_engine.config import parse_spec
    from loraforge_engine.events import EventWriter
    from loraforge_engine.lora_files import read_metadata
    from loraforge_engine.train import Trainer

    model, out, digest, _ = exported
    proc = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, "model-hash", str(model)], capture_output=True,
                          text=True, env=engine_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == digest + "\n"  # exactly the hash, one line
    assert proc.stderr.strip().splitlines()[-1] == "heavy imports: []"  # fast: no torch
    assert out.name == digest  # the export's folder (its cache key) is that hash

    spec = parse_spec({"baseModel": str(model), "datasetDir": str(dataset), "resolution": 64, "maxTrainSamples": 4})
    lora = Trainer(spec, str(tmp_path / "o"), EventWriter(io.StringIO())).save_lora(tmp_path / "lora", step=0)
    assert read_metadata(lora)["loraforge.base_model_sha256"] == digest

    proc = subprocess.run(engine_cmd("model-hash", str(tmp_path)), capture_output=True, text=True, env=engine_env(),
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and "model_index.json" in proc.stderr


def test_unet_and_text_encoder_slots_match_load_lora_weights(exported, tmp_path):
    model, out, _, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    lora = make_lora(model, tmp_path / "lora", seed=3, rank=4, alpha=8.0, text_encoder=True)
    pipe = load_pipeline(model)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([981.0, 981.0])
    ids = torch.tensor([pipe.tokenizer("a red circle", padding="max_length", max_length=77).input_ids] * 2)
    unet_sess, te_sess = session(out / "unet.onnx"), session(out / "text_encoder.onnx")

    def run_torch():
        with torch.no_grad():
            ehs = pipe.text_encoder(ids)[0]
            return ehs, pipe.unet(sample, timestep, ehs).sample

    def run_onnx(lora_file, ehs):
        te = te_sess.run(None, {"input_ids": ids.numpy(), **slot_feeds(manifest, "text_encoder", lora_file)})[0]
        u = unet_sess.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                 "encoder_hidden_states": ehs.numpy(), **slot_feeds(manifest, "unet", lora_file)})[0]
        return te, u

    base_ehs, base_out = run_torch()
    te, u = run_onnx(None, base_ehs)
    np.testing.assert_allclose(te, base_ehs.numpy(), atol=1e-5)
    np.testing.assert_allclose(u, base_out.numpy(), atol=1e-5)

    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    lora_ehs, lora_out = run_torch()
    assert float((lora_out - base_out).abs().max()) > 1e-2  # the LoRA really changes the output
    assert float((lora_ehs - base_ehs).abs().max()) > 1e-2
    te, u = run_onnx(lora, lora_ehs)
    np.testing.assert_allclose(te, lora_ehs.numpy(), atol=1e-5)
    np.testing.assert_allclose(u, lora_out.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def exported_xl(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-xl")
    out, digest, fresh = export_model(tiny_sdxl, root / "cache")
    assert fresh
    return tiny_sdxl, out, digest


def load_xl(model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_xl_lora(model_dir, out_dir, seed: int, *, rank=4, alpha=8.0):
    """An SDXL LoRA on the UNet and both text encoders, as a train_text_encoder run saves it."""
    pipe = load_xl(model_dir)
    parts = [("unet", pipe.unet, UNET_TARGETS), ("text_encoder", pipe.text_encoder, TE_TARGETS),
             ("text_encoder_2", pipe.text_encoder_2, TE_TARGETS)]
    return save_random_lora(pipe, parts, out_dir, seed, rank, alpha)


def test_sdxl_exports_two_text_encoders_and_added_conditioning(exported_xl):
    model, out, digest = exported_xl
    m = json.loads((out / "manifest.json").read_text())
    assert m["arch"] == "sdxl" and m["force_zeros_for_empty_prompt"] is True
    assert set(m["files"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert m["text_encoder_2"]["projection_dim"] == 32 and m["unet"]["cross_attention_dim"] == 64
    assert (out / "tokenizer_2" / "vocab.json").is_file()
    counts = {c: sum(s["component"] == c for s in m["slots"]) for c in ("unet", "text_encoder", "text_encoder_2")}
    # 6 transformers (proj_in, proj_out) holding 12 blocks (2 attentions x 4 projections, 2 feed-forward).
    assert counts == {"unet": 6 * 2 + 12 * (2 * 4 + 2), "text_encoder": 18, "text_encoder_2": 18}
    sgm = {s["module"]: s.get("kohya_sgm_key") for s in m["slots"] if s["component"] == "unet"}
    assert sgm["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == \
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    assert sgm["up_blocks.0.attentions.2.proj_out"] == "lora_unet_output_blocks_2_1_proj_out"
    assert len({s["input_a"] for s in m["slots"]}) == len(m["slots"])  # input names never collide
    names = [i.name for i in session(out / "unet.onnx").get_inputs()][:5]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert model_hash(model) == digest


def test_sdxl_graphs_match_load_lora_weights(exported_xl, tmp_path):
    model, out, _ = exported_xl
    manifest = json.loads((out / "manifest.json").read_text())
    lora = make_xl_lora(model, tmp_path / "lora", seed=4)
    with safe_open(str(lora), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = load_xl(model)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([981.0, 981.0])
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 80.0, 8.0, 0.0, 64.0, 64.0]])
    ids1 = torch.tensor(pipe.tokenizer(["a red circle", ""], padding="max_length", max_length=77).input_ids)
    ids2 = torch.tensor(pipe.tokenizer_2(["a red circle", ""], padding="max_length", max_length=77).input_ids)
    te1, te2, unet = session(out / "text_encoder.onnx"), session(out / "text_encoder_2.onnx"), session(out / "unet.onnx")

    def run_torch():
        with torch.no_grad():
            # What StableDiffusionXLPipeline.encode_prompt does.
            h1 = pipe.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
            o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
            ehs = torch.cat([h1, o2.hidden_states[-2]], dim=-1)
            pooled = o2[0]
            pred = pipe.unet(sample, timestep, ehs, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            return ehs, pooled, pred

    def run_onnx(lora_file, ehs, pooled):
        h1 = te1.run(None, {"input_ids": ids1.numpy(), **slot_feeds(manifest, "text_encoder", lora_file)})[0]
        h2, p = te2.run(None, {"input_ids": ids2.numpy(), **slot_feeds(manifest, "text_encoder_2", lora_file)})
        u = unet.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": ehs.numpy(),
                            "text_embeds": pooled.numpy(), "time_ids": time_ids.numpy(),
                            **slot_feeds(manifest, "unet", lora_file)})[0]
        return np.concatenate([h1, h2], axis=-1), p, u

    base = run_torch()
    for got, want in zip(run_onnx(None, base[0], base[1]), base, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)

    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    with_lora = run_torch()
    for changed, unchanged in zip(with_lora, base):
        assert float((changed - unchanged).abs().max()) > 1e-2  # the LoRA changes every output
    for got, want in zip(run_onnx(lora, with_lora[0], with_lora[1]), with_lora, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_sdxl_fp16_export_loads_and_runs_on_cpu(tiny_sdxl, tmp_path):
    """The fp16 variant (meant for CUDA; no GPU here): it exports, onnxruntime's CPU provider loads and runs
    every graph, and the UNet agrees with the float32 diffusers UNet to half precision."""
    out, digest, fresh = export_model(tiny_sdxl, tmp_path / "cache", dtype="fp16")
    assert fresh and out.name == f"{digest}-fp16"
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "fp16" and m["vae"]["force_upcast"] is True
    # The VAE decoder stays float32: the config asks for upcasting.
    assert m["io_dtype"] == {"text_encoder": "float16", "text_encoder_2": "float16", "unet": "float16",
                             "vae_decoder": "float32"}
    pipe = load_xl(tiny_sdxl)
    g = torch.Generator().manual_seed(0)
    sample, ehs, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.randn(1, 32, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        want = pipe.unet(sample, torch.tensor([500.0]), ehs,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.numpy()
    unet = session(out / "unet.onnx")
    assert {i.name: i.type for i in unet.get_inputs()[:5]} == {
        "sample": "tensor(float16)", "timestep": "tensor(float)", "encoder_hidden_states": "tensor(float16)",
        "text_embeds": "tensor(float16)", "time_ids": "tensor(float)"}
    got = unet.run(None, {"sample": sample.numpy().astype(np.float16), "timestep": np.array([500.0], np.float32),
                          "encoder_hidden_states": ehs.numpy().astype(np.float16),
                          "text_embeds": pooled.numpy().astype(np.float16), "time_ids": time_ids.numpy(),
                          **{k: v.astype(np.float16) for k, v in slot_feeds(m, "unet").items()}})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-2 * max(1.0, float(np.abs(want).max())))
    for name in ("text_encoder", "text_encoder_2", "vae_decoder"):
        session(out / m["files"][name])  # loads on the CPU provider
