"""Export an SD-1.x/2.x or SDXL base model (diffusers layout, safetensors) to ONNX for the server's
onnxruntime inference.

    python -m loraforge_engine export-onnx MODEL_DIR --out CACHE_ROOT [--dtype fp32|fp16]

writes CACHE_ROOT/<model hash>/ (fp16: CACHE_ROOT/<model hash>-fp16/) with text_encoder.onnx, unet.onnx,
vae_decoder.onnx, the tokenizer files and manifest.json — for SDXL also text_encoder_2.onnx and tokenizer_2/
— and prints one JSON line ({"dir", "model_hash", "exported"}) on stdout. An export that is already there and
complete is not redone. Each graph's weights are in <graph>.onnx.data beside it. The inputs are checked before
any heavy work; the components are exported one at a time, each freed before the next, so that the peak memory is
about the largest component's (the UNet's), not the whole model's; `progress NN% <component>: <step>` lines on
stderr say how far it is (the server logs them). The model hash is the base model's identity (fingerprint.py), the hash that
`python -m loraforge_engine model-hash` prints and that training records in every LoRA file.

LoRA "slots": every layer a LoRA may adapt in the places LoRA trainers put them — in the UNet every Linear
and 1x1 convolution inside each transformer (Transformer2DModel: proj_in, the attention projections to_q, to_k,
to_v, to_out.0, the feed-forward ff.net.0.proj and ff.net.2, proj_out), in each text encoder every Linear of
every layer (q_proj, k_proj, v_proj, out_proj, mlp.fc1, mlp.fc2); the set kohya's sd-scripts trains — is
wrapped so that it computes y = W x + b + B (A x) (per pixel for a 1x1 convolution), with A [r, in] and
B [out, r] two extra graph inputs whose rank axis r is dynamic. A LoRA is then only tensors fed to the
session: the runtime folds alpha / rank and the user's scale into B, concatenates several LoRAs along r, and
feeds rank-0 tensors to unused slots (which leaves the base model's output unchanged).

SDXL (a UNet with addition_embed_type "text_time" and a second text encoder): as StableDiffusionXLPipeline
reads them, both text encoders output their penultimate hidden states (concatenated by the runtime into the
UNet's encoder_hidden_states), text_encoder_2 also its projected pooled output `text_embeds`, and the UNet
takes `text_embeds` and `time_ids` (original size, crop top-left, target size) as its added conditioning.

fp16 (for the CUDA execution provider): text encoders and UNet in half precision with float16 inputs and
outputs (input_ids stay int64); the VAE decoder stays float32 when the VAE's config says force_upcast (as the
diffusers pipelines upcast it), else float16 too. The manifest's "dtype" and per-graph "io_dtype" say which.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The export is cached under the base model's identity, defined once in fingerprint.py (re-exported here).
from .fingerprint import HASHED_ENTRIES, hashed_files, model_hash  # noqa: F401

# /2: slots on every transformer Linear / 1x1 conv and text encoder MLP (/1 had attention projections only).
MANIFEST_FORMAT = "loraforge-onnx/2"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# diffusers' upsampling takes a different branch for batch >= 64: the exported graph serves batch 1..63.
MAX_BATCH = 63
OPSET = 18
# Graph input name prefixes and kohya key prefixes per component (kohya's SDXL files say lora_te1_ for the
# first text encoder; the runtime accepts both forms for it).
INPUT_PREFIX = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
DTYPES = ("fp32", "fp16")


# ------------------------------------------------------------------------------------------------ the slots


@dataclass
class Slot:
    component: str  # "unet", "text_encoder" or (SDXL) "text_encoder_2"
    module: str  # module path inside the component, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    in_features: int
    out_features: int
    input_a: str
    input_b: str
    kind: str = "linear"  # or "conv1x1" (the slot's A and B are still 2-D; applied per pixel)
    sgm_module: str | None = None  # UNet slots: the module's name in the original (SGM) UNet, if it has one

    def manifest(self) -> dict:
        out = {
            "component": self.component,
            "module": self.module,
            # The key stem a diffusers / peft LoRA file uses for this layer (before .lora_A/.lora.down …).
            "diffusers_key": f"{self.component}.{self.module}",
            # The kohya / A1111 form (lora_unet_… / lora_te_…, dots as underscores).
            # Text encoder modules are "text_model.encoder…" in transformers 4 and "encoder…" in 5; LoRA files
            # carry either, so the runtime matches text encoder keys with "text_model." removed.
            "kohya_key": KOHYA_PREFIX[self.component] + self.module.replace(".", "_"),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "input_a": self.input_a,
            "input_b": self.input_b,
            "kind": self.kind,
        }
        if self.sgm_module is not None:
            # kohya's SDXL files name UNet modules as SDXL's original (SGM) UNet does.
            out["kohya_sgm_key"] = "lora_unet_" + self.sgm_module.replace(".", "_")
        return out


def _slot_modules():
    """Built lazily so that importing this module does not import torch."""
    import torch
    import torch.nn.functional as F

    class SlotFeed:
        """Carries the current call's slot tensors from the wrapper's forward to the wrapped projections."""

        def __init__(self):
            self.tensors: list = []

    class SlottedLayer(torch.nn.Module):
        """A Linear, or a 1x1 Conv2d applied per pixel, plus a low-rank update read from the feed:
        y = W x + b + B (A x) (as peft's LoRA layers compute it)."""

        def __init__(self, base, feed: SlotFeed, index: int):
            super().__init__()
            self.base = base
            self.feed = feed
            self.index = index
            self.per_pixel = isinstance(base, torch.nn.Conv2d)

        def forward(self, x):
            a = self.feed.tensors[2 * self.index]
            b = self.feed.tensors[2 * self.index + 1]
            if self.per_pixel:
                # MatMuls over the channel axis rather than convolutions: they take rank 0 (an unused slot).
                return self.base(x) + F.linear(F.linear(x.movedim(1, -1), a), b).movedim(-1, 1)
            return self.base(x) + F.linear(F.linear(x, a), b)

    class SlottedUNet(torch.nn.Module):
        def __init__(self, unet, feed):
            super().__init__()
            self.unet = unet
            self.feed = feed

        def forward(self, sample, timestep, encoder_hidden_states, *lora):
            self.feed.tensors = lora
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class SlottedUNetXL(torch.nn.Module):
        """SDXL's UNet: the added conditioning (pooled text embeds, size/crop time ids) as two more inputs."""

        def __init__(self, unet, feed):
            super().__init__()
            self.unet = unet
            self.feed = feed

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *lora):
            self.feed.tensors = lora
            # float32 text_embeds: the UNet concatenates them with its float32 time-id embeddings (PyTorch
            # promotes; the exported Concat of an fp16 graph would not) and casts the result to its dtype.
            cond = {"text_embeds": text_embeds.float(), "time_ids": time_ids}
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]

    class SlottedTextEncoder(torch.nn.Module):
        """outputs: "last" (SD: last_hidden_state), "penultimate" (SDXL's first encoder: hidden_states[-2],
        before the final layer norm) or "penultimate+pooled" (SDXL's second encoder: also text_embeds, the
        projected pooled output)."""

        def __init__(self, text_encoder, feed, outputs: str = "last"):
            super().__init__()
            self.text_encoder = text_encoder
            self.feed = feed
            self.outputs = outputs

        def forward(self, input_ids, *lora):
            self.feed.tensors = lora
            if self.outputs == "last":
                return self.text_encoder(input_ids=input_ids, return_dict=True).last_hidden_state
            out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
            if self.outputs == "penultimate":
                return out.hidden_states[-2]
            return out.hidden_states[-2], out.text_embeds

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return SlotFeed, SlottedLayer, SlottedUNet, SlottedUNetXL, SlottedTextEncoder, VaeDecoder


def insert_slots(model, component: str, parent_type, feed, SlottedLayer, layers_per_block=None) -> list[Slot]:
    """Wrap every Linear and 1x1 Conv2d inside each `parent_type` module of `model` (in module order) in a
    slotted layer; returns the slots (graph input names follow the order). `layers_per_block`: the UNet's,
    for its slots' SGM names (None for text encoders)."""
    import torch

    from .lora_files import sgm_module_name

    slots: list[Slot] = []
    prefix = INPUT_PREFIX[component]
    found = []
    for name, module in model.named_modules():
        if isinstance(module, parent_type):
            for sub, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    found.append((f"{name}.{sub}", layer, "linear", layer.in_features, layer.out_features))
                elif isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) \
                        and tuple(layer.stride) == (1, 1) and layer.groups == 1:
                    found.append((f"{name}.{sub}", layer, "conv1x1", layer.in_channels, layer.out_channels))
    for path, layer, kind, in_f, out_f in found:
        i = len(slots)
        wrapped = SlottedLayer(layer, feed, i)
        parent_name, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        if leaf.isdigit():
            parent[int(leaf)] = wrapped
        else:
            setattr(parent, leaf, wrapped)
        sgm = sgm_module_name(path, layers_per_block) if layers_per_block is not None else None
        slots.append(Slot(component, path, in_f, out_f, f"{prefix}_lora_{i}_a", f"{prefix}_lora_{i}_b", kind, sgm))
    return slots


def example_slot_tensors(slots: list[Slot], rank: int = 2, seed: int = 0):
    """Non-zero example A/B tensors of rank `rank` (≥ 2, so that the rank axis stays dynamic)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for s in slots:
        out.append(torch.randn(rank, s.in_features, generator=g) * 0.1)
        out.append(torch.randn(s.out_features, rank, generator=g) * 0.1)
    return out


def slot_dynamic_shapes(slots: list[Slot]):
    from torch.export import Dim

    shapes = []
    for i, s in enumerate(slots):
        r = Dim(f"{s.input_a}_rank", min=0, max=4096)
        shapes.append({0: r})
        shapes.append({1: r})
    return tuple(shapes)


# ------------------------------------------------------------------------------------------------ export


def _release_memory() -> None:
    """Collect freed modules and hand glibc's free pages back to the system, so that the next component's peak
    starts from the last one's floor rather than on top of it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the allocator keeps its pages, which costs memory, not correctness


def _drop_file_pages(folder: Path) -> int:
    """Drop this process's resident pages of the safetensors files in `folder` (once their module is freed);
    returns the bytes of mappings advised. The weights are loaded as private mappings of those files, and after
    torch.onnx.export a mapping outlives every tensor that used it (the export keeps a reference we could not
    find), holding the whole component resident. MADV_DONTNEED on a private file mapping that was only read is
    safe: the pages are the file's, and a later read would fault them back in from the file."""
    import ctypes

    files = {str(f.resolve()) for f in folder.glob("*.safetensors")}
    if not files:
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    advised = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in files and fields[1].endswith("p"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0:  # 4: MADV_DONTNEED
                advised += hi - lo
    return advised


def _limit_malloc_caching() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which tensors of up to 32 MiB come
    from the heap and stay in the process when freed; a fixed threshold keeps every weight-sized block mmapped, so
    freeing a component returns its memory."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (also stops its adjustment)
    except (OSError, AttributeError):
        pass


class Progress:
    """Progress lines on stderr, `progress NN% <component>: <step>`, for the server to forward. Each component
    counts for its share of the weights (safetensors bytes), and within one: loading 10%, tracing and converting
    50%, writing the weights 20% (per tensor), checking 20%."""

    PHASES = {"load": (0.0, 0.1), "trace": (0.1, 0.6), "save": (0.6, 0.8), "check": (0.8, 1.0)}

    def __init__(self, shares: dict[str, float], log):
        total = sum(shares.values()) or 1.0
        self.shares = {k: v / total for k, v in shares.items()}
        self.log = log
        self.done = 0.0  # sum of the shares of finished components
        self.last: tuple[int, str] | None = None

    def __call__(self, component: str, phase: str, what: str, fraction: float = 0.0) -> None:
        lo, hi = self.PHASES[phase]
        pct = int(100 * (self.done + self.shares[component] * (lo + (hi - lo) * min(max(fraction, 0.0), 1.0))))
        line = f"{component}: {what}"
        if self.last is not None and self.last[0] == pct and phase == "save":
            return  # per-tensor updates only when the percentage moves
        self.last = (pct, line)
        self.log(f"progress {pct:3d}% {line}")

    def finished(self, component: str) -> None:
        self.done += self.shares[component]

    def end(self) -> None:
        self.log("progress 100% done")


def _component_bytes(model_dir: Path, part: str) -> int:
    return sum(f.stat().st_size for f in (model_dir / part).glob("*.safetensors"))


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes, progress) -> None:
    """Trace `module` to ONNX and write it with its weights in `<file>.data` beside it, tensor by tensor (always:
    one code path, no 2 GB protobuf limit, and the runtime can map the weights instead of parsing them)."""
    import warnings

    import onnx_ir as ir
    import torch

    with warnings.catch_warnings():
        # One line per rank axis that shares another's constraint (each slot's A and B): noise, not news.
        warnings.filterwarnings("ignore", message=r"# The axis name")
        program = torch.onnx.export(module, tuple(args), dynamo=True, opset_version=OPSET,
                                    input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    written = [0]

    def saved(tensor, info) -> None:
        written[0] += 1
        progress("save", f"writing weights {written[0]}/{info.total}", written[0] / max(info.total, 1))

    # The initializers still share the PyTorch parameters' memory: each is copied only while it is written, one at
    # a time. Tensors over 1 MiB start at 64 KiB offsets: onnxruntime's CPU provider then maps them from the file
    # instead of reading them into memory of its own (page-aligned external data is used in place).
    progress("save", "writing weights")
    ir.save(program.model, path, external_data=f"{path.name}.data", callback=saved, max_workers=1,
            alignment=1 << 16)
    # Something past this call keeps the exported graph alive (seen: the parameters outlived the module); cut its
    # links to the weights so that they are freed with the module.
    for value in program.model.graph.initializers.values():
        value.const_value = None
    program.exported_program = None
    del program


def _check(path: Path, expected, args, names, atol: float) -> float:
    """Run the exported graph on the example inputs with onnxruntime; every output must agree with PyTorch's
    (`expected`, computed before the PyTorch model was freed), relative to the output's magnitude."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    # Pre-packing copies every MatMul weight into a second layout: a one-off run does not need it.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    del sess
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        err = float(np.abs(g.astype(np.float32) - e).max())
        if not err <= atol * max(1.0, float(np.abs(e).max())):
            raise RuntimeError(f"{path.name}: onnxruntime differs from PyTorch by {err:.3g} on the example inputs")
        worst = max(worst, err)
    return worst


def export_dir_name(digest: str, dtype: str = "fp32") -> str:
    """fp32 exports live in <hash>/, fp16 ones in <hash>-fp16/ (the server picks by execution provider)."""
    return digest if dtype == "fp32" else f"{digest}-{dtype}"


def export_model(model_dir: str | os.PathLike, out_root: str | os.PathLike, *, check: bool = True,
                 dtype: str = "fp32", source: str | None = None,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> tuple[Path, str, bool]:
    """Export `model_dir` into out_root/<hash>/ (fp16: <hash>-fp16/) unless a complete export is there; the
    manifest names the model as `source` (default: `model_dir`; the original folder when that is a pinned view).
    Returns (dir, hash, exported now). The steps: check the inputs, find the target, then one component at a time
    (text encoder(s), UNet, VAE decoder) load it, export its graph, check it against PyTorch and free it, so that
    the peak memory is the largest component's rather than the whole model's; write the manifest, publish the
    folder atomically."""
    model_dir, out_root, digest, final = _export_target(model_dir, out_root, dtype)
    if is_complete(final):
        return final, digest, False

    import torch

    _limit_malloc_caching()
    torch.manual_seed(0)  # the example inputs the graphs are traced and checked with
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out_root))
    try:
        cfg = _Configs.read(model_dir)
        parts = ["text_encoder"] + (["text_encoder_2"] if cfg.xl else []) + ["unet", "vae"]
        progress = Progress({p: _component_bytes(model_dir, p) for p in parts}, log)
        run = _ExportRun(tmp, model_dir, dtype, check, log, progress, int(cfg.text_encoder["max_position_embeddings"]))
        slots = _export_text_encoders(run, model_dir, cfg)
        slots += _export_unet(run, model_dir, cfg)
        vae_dtype = _export_vae_decoder(run, model_dir, cfg)
        _write_manifest(run, cfg, model_dir, digest, slots, vae_dtype, source or str(model_dir))
        _publish(tmp, final, out_root)
        progress.end()
        return final, digest, True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _export_target(model_dir, out_root, dtype: str) -> tuple[Path, Path, str, Path]:
    """Check the arguments; the model's hash names the export folder: (model_dir, out_root, hash, folder)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir = Path(model_dir).absolute()
    check_inputs(model_dir)
    out_root = Path(out_root).absolute()
    digest = model_hash(model_dir)
    return model_dir, out_root, digest, out_root / export_dir_name(digest, dtype)


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{path.parent.name}/{path.name} is missing")
        return None
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        problems.append(f"{path.parent.name}/{path.name} is not valid JSON ({e})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.parent.name}/{path.name} is not a JSON object")
        return None
    return value


def _check_weights(folder: Path, problems: list[str]) -> None:
    """A component folder needs safetensors weights (one file or a sharded index); pickles are refused."""
    if not folder.is_dir():
        problems.append(f"{folder.name}/ is missing")
        return
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        problems.append(f"{folder.name}/ has only pickle weights (.bin/.ckpt); convert them to safetensors")
    else:
        problems.append(f"{folder.name}/ has no .safetensors weights")


def check_inputs(model_dir: Path) -> str:
    """Everything the export reads, checked before any heavy work (hashing gigabytes, loading weights, tracing):
    configs that parse, safetensors weights for each component, the CLIP BPE tokenizer files, the scheduler
    config, a supported UNet. Raises FileNotFoundError / ValueError naming every problem; returns "sd" or "sdxl"."""
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a diffusers model folder (no model_index.json)")
    problems: list[str] = []
    _read_json(model_dir / "model_index.json", problems)
    unet_cfg = _read_json(model_dir / "unet" / "config.json", problems)
    add_type = (unet_cfg or {}).get("addition_embed_type")
    xl = add_type == "text_time"
    if add_type is not None and not xl:
        problems.append(f"unet/config.json: addition_embed_type {add_type!r} is not exported (SD-1.x/2.x and SDXL are)")
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if xl else [])
    for part in parts:
        if part != "unet":
            _read_json(model_dir / part / "config.json", problems)
        _check_weights(model_dir / part, problems)
    _read_json(model_dir / "scheduler" / "scheduler_config.json", problems)
    for sub in ["tokenizer"] + (["tokenizer_2"] if xl else []):
        missing = [n for n in ("vocab.json", "merges.txt") if not (model_dir / sub / n).is_file()]
        if missing:
            problems.append(f"{sub}/ lacks {' and '.join(missing)} (the CLIP BPE files the runtime tokenizes with)")
    if problems:
        kind = FileNotFoundError if all("missing" in p or "lacks" in p or "has no" in p for p in problems) \
            else ValueError
        raise kind(f"{model_dir} cannot be exported: " + "; ".join(problems))
    return "sdxl" if xl else "sd"


@dataclass
class _Configs:
    """The base model's configs (read from its JSON files, so that no component needs to stay loaded for the
    manifest)."""
    model_index: dict
    unet: dict
    vae: dict
    text_encoder: dict
    text_encoder_2: dict | None  # SDXL only
    xl: bool

    @staticmethod
    def read(model_dir: Path) -> _Configs:
        """Each config with the class's defaults for keys the file leaves out, as from_pretrained fills them
        (an SD-1.5 vae/config.json has no force_upcast; AutoencoderKL's default is True)."""
        import inspect

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig

        def js(rel: str) -> dict:
            return json.loads((model_dir / rel).read_text())

        def diffusers_config(cls, rel: str) -> dict:
            defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                        if p.default is not inspect.Parameter.empty}
            return {**defaults, **js(rel)}

        def clip_config(rel: str) -> dict:
            return CLIPTextConfig.from_dict(js(rel)).to_dict()

        unet = diffusers_config(UNet2DConditionModel, "unet/config.json")
        xl = unet.get("addition_embed_type") == "text_time"
        return _Configs(js("model_index.json"), unet, diffusers_config(AutoencoderKL, "vae/config.json"),
                        clip_config("text_encoder/config.json"),
                        clip_config("text_encoder_2/config.json") if xl else None, xl)


def _load(model_dir: Path, part: str, dtype):
    """One component, in `dtype` (fp16 exports load half precision directly: half the memory of loading fp32 and
    casting, and the same values)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
           "text_encoder_2": CLIPTextModelWithProjection}[part]
    return cls.from_pretrained(model_dir, subfolder=part, use_safetensors=True, local_files_only=True,
                               torch_dtype=dtype).eval()


class _ExportRun:
    """What every graph's export shares: the folder being written, the precision, whether to check each graph
    against PyTorch, progress, the batch axis, and the graph files written so far (component -> file name)."""

    def __init__(self, tmp: Path, model_dir: Path, dtype: str, check: bool, log, progress: Progress, max_len: int):
        import torch
        from torch.export import Dim

        self.tmp, self.dtype, self.check, self.log, self.max_len = tmp, dtype, check, log, max_len
        self.model_dir = model_dir
        self.progress = progress
        self.half = dtype == "fp16"
        self.fdt = torch.float16 if self.half else torch.float32  # dtype of the graphs' float inputs and outputs
        self.atol = 2e-2 if self.half else 1e-4
        self.batch = Dim("batch", min=1, max=MAX_BATCH)
        self.files: dict[str, str] = {}
        (self.SlotFeed, self.SlottedLayer, self.SlottedUNet, self.SlottedUNetXL, self.SlottedTextEncoder,
         self.VaeDecoder) = _slot_modules()

    def slot_args(self, slots: list[Slot], seed: int) -> list:
        return [t.to(self.fdt) for t in example_slot_tensors(slots, seed=seed)]

    def load(self, model_dir: Path, part: str, dtype):
        self.progress(part, "load", "loading weights")
        return _load(model_dir, part, dtype)

    def write(self, component: str, part: str, holder: list, args, names, output_names, dynamic_shapes,
              atol: float) -> None:
        """Export one graph to <component>.onnx (+ .data), then, unless told not to, check it against PyTorch.
        `holder` holds the only reference to the wrapped module: it is emptied (the weights freed) once
        PyTorch's outputs are known, before onnxruntime loads the graph's copy of them."""
        import torch

        path = self.tmp / f"{component}.onnx"
        step = lambda phase, what, fraction=0.0: self.progress(part, phase, what, fraction)  # noqa: E731
        step("trace", "tracing and converting to ONNX")
        _export(holder[0], args, path, names, output_names, dynamic_shapes, step)
        expected = None
        if self.check:
            step("check", "running PyTorch on the example inputs")
            with torch.no_grad():
                out = holder[0](*args)
            expected = [e.float().numpy() for e in (out if isinstance(out, tuple) else (out,))]
            del out
        holder.clear()
        _release_memory()
        _drop_file_pages(self.model_dir / part)
        if self.check:
            step("check", "running onnxruntime on the example inputs", 0.5)
            _check(path, expected, args, names, atol)
        _release_memory()
        self.files[component] = path.name
        self.progress.finished(part)


def _slot_names(slots: list[Slot]) -> list[str]:
    return [n for s in slots for n in (s.input_a, s.input_b)]


def _export_text_encoders(run: _ExportRun, model_dir: Path, cfg: _Configs) -> list[Slot]:
    """SD: the last hidden state; SDXL: both encoders' penultimate hidden states and the second's pooled
    projection (as StableDiffusionXLPipeline reads them). One at a time. Returns their LoRA slots."""
    import torch
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    def one(component, outputs, output_names, seed):
        model = run.load(model_dir, component, run.fdt)
        feed = run.SlotFeed()
        slots = insert_slots(model, component, CLIPEncoderLayer, feed, run.SlottedLayer)
        holder = [run.SlottedTextEncoder(model, feed, outputs).eval()]
        ids = torch.randint(0, model.config.vocab_size, (2, run.max_len), dtype=torch.int64)
        del model
        run.log(f"exporting {component} ({len(slots)} LoRA slots)")
        run.write(component, component, holder, [ids, *run.slot_args(slots, seed)],
                  ["input_ids", *_slot_names(slots)], output_names,
                  ({0: run.batch}, slot_dynamic_shapes(slots)), run.atol)
        return slots

    if not cfg.xl:
        return one("text_encoder", "last", ["last_hidden_state"], 1)
    return (one("text_encoder", "penultimate", ["penultimate_hidden_state"], 1)
            + one("text_encoder_2", "penultimate+pooled", ["penultimate_hidden_state", "text_embeds"], 3))


def _example_side(unet_cfg: dict) -> int:
    """Latent side of the example inputs: a multiple of the UNet's downsampling, at most 4 of them (a 512 px
    model traces at 256 px: the graph's spatial axes are dynamic anyway, and the check's attention maps at full
    size would cost gigabytes)."""
    factor = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    sample_size = int(unet_cfg["sample_size"])
    return max(2 * factor, min(sample_size - sample_size % factor, 4 * factor))


def _export_unet(run: _ExportRun, model_dir: Path, cfg: _Configs) -> list[Slot]:
    """The UNet with its LoRA slots, latent height and width dynamic (multiples of its downsampling); SDXL's
    also takes the pooled text embeds and the size/crop time ids. Returns its slots."""
    import torch
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from torch.export import Dim

    fdt = run.fdt
    unet = run.load(model_dir, "unet", fdt)
    feed = run.SlotFeed()
    slots = insert_slots(unet, "unet", Transformer2DModel, feed, run.SlottedLayer, unet.config.layers_per_block)
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    lat_h = Dim("latent_h_div", min=1, max=4096 // factor)
    lat_w = Dim("latent_w_div", min=1, max=4096 // factor)
    ex_side = _example_side(cfg.unet)
    # The timestep (and SDXL's time ids) stay float32 in fp16 exports: the UNet turns them into sinusoidal
    # embeddings in float32 and casts those.
    args = [torch.randn(2, unet.config.in_channels, ex_side, ex_side).to(fdt),
            torch.tensor([500.0, 500.0]),
            torch.randn(2, run.max_len, unet.config.cross_attention_dim).to(fdt)]
    names = ["sample", "timestep", "encoder_hidden_states"]
    shapes = [{0: run.batch, 2: factor * lat_h, 3: factor * lat_w}, {0: run.batch}, {0: run.batch}]
    if cfg.xl:
        pooled_dim = int(cfg.text_encoder_2["projection_dim"])
        n_time_ids = (unet.add_embedding.linear_1.in_features - pooled_dim) // unet.config.addition_time_embed_dim
        args += [torch.randn(2, pooled_dim).to(fdt),
                 torch.tensor([[float(ex_side * 8), ex_side * 8.0, 0.0, 0.0, ex_side * 8.0, ex_side * 8.0]] * 2)
                 if n_time_ids == 6 else torch.rand(2, n_time_ids) * 1024]
        names += ["text_embeds", "time_ids"]
        shapes += [{0: run.batch}, {0: run.batch}]
    args += run.slot_args(slots, 2)
    names += _slot_names(slots)
    holder = [(run.SlottedUNetXL if cfg.xl else run.SlottedUNet)(unet, feed).eval()]
    del unet
    run.log(f"exporting the UNet ({len(slots)} LoRA slots)")
    run.write("unet", "unet", holder, args, names, ["noise_pred"], (*shapes, slot_dynamic_shapes(slots)), run.atol)
    return slots


def _export_vae_decoder(run: _ExportRun, model_dir: Path, cfg: _Configs):
    """The VAE decoder: float32 in fp16 exports when the config asks for upcasting (SDXL's VAE overflows in half
    precision), as the diffusers pipelines do. Returns the dtype it was exported in."""
    import torch
    from torch.export import Dim

    force_upcast = bool(cfg.vae.get("force_upcast", False))
    vae_dt = torch.float32 if (not run.half or force_upcast) else torch.float16
    vae = run.load(model_dir, "vae", vae_dt)
    vae.encoder = None  # only the decoder is exported: the encoder's weights go now
    holder = [run.VaeDecoder(vae).eval()]
    ex_side = _example_side(cfg.unet)
    args = [torch.randn(2, vae.config.latent_channels, ex_side, ex_side).to(vae_dt)]
    del vae
    run.log("exporting the VAE decoder")
    run.write("vae_decoder", "vae", holder, args, ["latent"], ["image"],
              ({0: run.batch, 2: Dim("vae_h", min=1, max=4096), 3: Dim("vae_w", min=1, max=4096)},),
              run.atol if vae_dt == torch.float16 else 1e-4)
    return vae_dt


def _copy_tokenizer(run: _ExportRun, model_dir: Path, sub: str) -> dict:
    """Copy a CLIP tokenizer's files beside the graphs (the runtime tokenizes in TypeScript)."""
    (run.tmp / sub).mkdir()
    copied = []
    for name in TOKENIZER_FILES:
        src = model_dir / sub / name
        if src.is_file():
            shutil.copyfile(src, run.tmp / sub / name)
            copied.append(name)
    if "vocab.json" not in copied or "merges.txt" not in copied:
        raise FileNotFoundError(f"{model_dir}/{sub} lacks vocab.json or merges.txt (CLIP BPE files)")
    return {"dir": sub, "files": copied, "max_length": run.max_len}


def _write_manifest(run: _ExportRun, cfg: _Configs, model_dir: Path, digest: str, slots: list[Slot], vae_dt,
                    source: str) -> None:
    """manifest.json: what the runtime needs besides the graphs (shapes, scheduler, VAE scaling, tokenizers,
    every LoRA slot); `complete: true` marks a finished export."""
    import torch

    unet, vae, text_encoder = cfg.unet, cfg.vae, cfg.text_encoder
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    io = "float16" if run.half else "float32"
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_hash": digest,
        "source": source,
        "complete": True,
        "opset": OPSET,
        "arch": "sdxl" if cfg.xl else "sd",
        "dtype": run.dtype,
        # Element type of each graph's float inputs/outputs (timestep and time_ids are always float32).
        "io_dtype": {**{k: io for k in run.files},
                     "vae_decoder": "float32" if vae_dt == torch.float32 else "float16"},
        "files": run.files,
        # Each graph's weights, in <file>.data beside it (onnxruntime finds them by the graph's own reference).
        "external_data": {k: f"{f}.data" for k, f in run.files.items()},
        "tokenizer": _copy_tokenizer(run, model_dir, "tokenizer"),
        "scheduler_config": scheduler_config,
        "vae": {"scaling_factor": vae["scaling_factor"], "latent_channels": vae["latent_channels"],
                "shift_factor": vae.get("shift_factor"),
                "latents_mean": vae.get("latents_mean"),
                "latents_std": vae.get("latents_std"),
                "force_upcast": bool(vae.get("force_upcast", False))},
        "unet": {"in_channels": unet["in_channels"], "sample_size": int(unet["sample_size"]),
                 "cross_attention_dim": unet["cross_attention_dim"],
                 "latent_multiple": 2 ** (len(unet["block_out_channels"]) - 1),
                 "vae_factor": 2 ** (len(vae["block_out_channels"]) - 1), "max_batch": MAX_BATCH,
                 "time_cond_proj_dim": unet["time_cond_proj_dim"],
                 "addition_embed_type": unet["addition_embed_type"]},
        "text_encoder": {"hidden_size": text_encoder["hidden_size"], "max_length": run.max_len},
        "slots": [s.manifest() for s in slots],
    }
    if cfg.xl:
        manifest["tokenizer_2"] = _copy_tokenizer(run, model_dir, "tokenizer_2")
        manifest["text_encoder_2"] = {"hidden_size": cfg.text_encoder_2["hidden_size"], "max_length": run.max_len,
                                      "projection_dim": int(cfg.text_encoder_2["projection_dim"])}
        manifest["unet"]["addition_time_embed_dim"] = unet["addition_time_embed_dim"]
        # StableDiffusionXLPipeline: an absent negative prompt gives zero negative embeddings (and zero
        # negative pooled embeddings) when the model says so, instead of encoding "".
        manifest["force_zeros_for_empty_prompt"] = bool(cfg.model_index.get("force_zeros_for_empty_prompt", True))
    (run.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _publish(tmp: Path, final: Path, out_root: Path) -> None:
    """Rename the finished export into place. An incomplete one there (interrupted, or an older format) is set
    aside and removed first; a concurrent exporter that finished first wins."""
    os.chmod(tmp, 0o755)
    if final.exists() and not is_complete(final):
        stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=out_root))
        try:
            os.rename(final, stale / "old")
        except OSError:
            pass  # a concurrent exporter moved it first
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_complete(final):  # not a concurrent exporter that finished first
            raise


def is_complete(export_dir: Path) -> bool:
    m = export_dir / "manifest.json"
    if not m.is_file():
        return False
    try:
        manifest = json.loads(m.read_text())
    except ValueError:
        return False
    return (manifest.get("format") == MANIFEST_FORMAT and manifest.get("complete") is True
            and all((export_dir / f).is_file() for f in manifest.get("files", {}).values()))


def cmd_export_onnx(args) -> int:
    from .__main__ import _quiet_libraries

    from .confined import pinned_model
    from .data import DataError

    try:
        # With data roots (LORAFORGE_BASE_MODEL_ROOTS): a view of the folder's files, each found inside them.
        model_dir, _ = pinned_model(str(Path(args.model_dir).absolute()))
        check_inputs(Path(model_dir))  # a bad folder is refused in a second, before torch loads
    except (FileNotFoundError, ValueError, DataError) as e:
        print(f"export-onnx: {e}", file=sys.stderr, flush=True)
        return 2
    _quiet_libraries()
    import torch

    # Tracing is single-threaded anyway; the check's forward passes on tiny tensors run faster on one
    # thread than on a pool that waits for descheduled threads on a busy machine.
    torch.set_num_threads(1)
    try:
        path, digest, exported = export_model(model_dir, args.out, check=not args.no_check, dtype=args.dtype,
                                              source=str(Path(args.model_dir).absolute()))
    except (FileNotFoundError, ValueError) as e:
        print(f"export-onnx: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"dir": str(path), "model_hash": digest, "exported": exported}), flush=True)
    return 0


def add_subcommand(sub) -> None:
    """Registers `export-onnx` on the engine's argparse subparsers."""
    p = sub.add_parser("export-onnx", help="export a base model to ONNX with LoRA slots (cached by content hash)")
    p.add_argument("model_dir", help="diffusers-layout model folder (safetensors weights)")
    p.add_argument("--out", required=True, help="cache root; the export goes to OUT/<model hash>/")
    p.add_argument("--no-check", action="store_true", help="skip comparing each graph with PyTorch after export")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="fp32 (CPU; the default) or fp16 (for the CUDA execution provider; written to <hash>-fp16/)")
    p.set_defaults(func=cmd_export_onnx)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loraforge_engine.onnx_export")
    subs = parser.add_subparsers(dest="command", required=True)
    add_subcommand(subs)
    a = parser.parse_args(["export-onnx", *sys.argv[1:]])
    sys.exit(a.func(a))
