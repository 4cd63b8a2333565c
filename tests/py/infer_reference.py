"""The diffusers side of the inference parity tests and the bench.

    python infer_reference.py make-lora MODEL OUT.safetensors --seed S [--rank R] [--alpha A] [--text-encoder]
            [--kohya] [--wide]
        A LoRA as diffusers writes it (peft adapter with random non-zero up weights, save_lora_weights, alpha in
        the metadata). --kohya writes the same weights as kohya's sd-scripts names them, with .alpha tensors
        instead: lora_unet_ + diffusers module names for SD-1.x, + the original (SGM) UNet's names for SDXL
        (input_blocks_4_1_…). For an SDXL model --text-encoder adapts both text encoders (keys text_encoder. and
        text_encoder_2., as a LoRA trained with train_text_encoder carries them; kohya: lora_te1_ and lora_te2_).
        --wide adapts what sd-scripts adapts by default: also the feed-forward layers and proj_in/proj_out (1x1
        convolutions in SD-1.x) of every transformer, and the text encoders' MLP (fc1, fc2).
    python infer_reference.py render MODEL REQUEST.json
        Renders with StableDiffusionPipeline, or StableDiffusionXLPipeline for an SDXL model (model_index.json
        says which; no watermark): REQUEST has prompt, negative_prompt, steps, guidance_scale, width,
        height, num_images, scheduler, loras [{path, scale}], latents (a raw little-endian float32 file with the
        unscaled initial latents [n, 4, h/8, w/8]) and out_dir, for SDXL optionally prompt_2, negative_prompt_2,
        original_size, crops_coords_top_left, target_size and their negative_ forms; writes out_dir/ref_<i>.png.
    python infer_reference.py tokenize MODEL TEXT...
        Prints transformers' CLIPTokenizer ids (padded to 77) as JSON, one list per text.
    python infer_reference.py batch MODEL JOBS.json
        Runs several of the above in one process (Python start-up costs seconds): JOBS is a list of argument
        lists without MODEL, e.g. [["make-lora", "/x/a.safetensors", "--seed", "1"], ["render", "/x/req.json"]].
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_WIDE = UNET_TARGETS + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TE_WIDE = TE_TARGETS + ["fc1", "fc2"]
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def is_xl(model_dir: str) -> bool:
    with open(os.path.join(model_dir, "model_index.json")) as f:
        return json.load(f)["_class_name"] == "StableDiffusionXLPipeline"


def pipeline(model_dir: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if is_xl(model_dir):
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_lora(model_dir: str, out_file: str, seed: int, rank: int, alpha: float, text_encoder: bool,
              kohya: bool, wide: bool = False) -> None:
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "engine"))
    from loraforge_engine.lora_files import diffusers_keys, sgm_module_name

    pipe = pipeline(model_dir)
    torch.manual_seed(seed)
    unet_targets, te_targets = (UNET_WIDE, TE_WIDE) if wide else (UNET_TARGETS, TE_TARGETS)
    parts = [("unet", pipe.unet, unet_targets)]
    if text_encoder:
        parts.append(("text_encoder", pipe.text_encoder, te_targets))
        if getattr(pipe, "text_encoder_2", None) is not None:
            parts.append(("text_encoder_2", pipe.text_encoder_2, te_targets))
    layers, meta = {}, {}
    for name, model, targets in parts:
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.3)
        layers[name] = get_peft_model_state_dict(model)
        cfg = model.peft_config["default"].to_dict()
        meta[name] = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in cfg.items()}
    out_dir, weight_name = os.path.dirname(out_file), os.path.basename(out_file)
    if kohya:
        from safetensors.torch import save_file

        sd = {}
        for name, state in layers.items():
            # kohya's SDXL files number the text encoders (lora_te1_, lora_te2_); SD-1.x ones say lora_te_.
            te1 = "lora_te1_text_model_" if "text_encoder_2" in layers else "lora_te_text_model_"
            prefix = {"unet": "lora_unet_", "text_encoder": te1, "text_encoder_2": "lora_te2_text_model_"}[name]
            for k, v in state.items():
                stem, kind = k.rsplit(".lora_", 1)  # "<module>", "A.weight"
                if name == "unet" and is_xl(model_dir):
                    stem = sgm_module_name(stem, pipe.unet.config.layers_per_block)
                elif name != "unet" and stem.startswith("text_model."):
                    stem = stem[len("text_model."):]  # CLIPTextModelWithProjection keeps it; the prefix has it
                key = prefix + stem.replace(".", "_")
                sd[f"{key}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v.contiguous()
                sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        os.makedirs(out_dir, exist_ok=True)
        save_file(sd, out_file)
        return
    type(pipe).save_lora_weights(
        save_directory=out_dir, weight_name=weight_name, safe_serialization=True,
        **{f"{n}_lora_layers": diffusers_keys(s, convert_state_dict_to_diffusers) for n, s in layers.items()},
        **{f"{n}_lora_adapter_metadata": m for n, m in meta.items()})


def render(model_dir: str, request_file: str) -> None:
    import diffusers
    import numpy as np
    import torch

    req = json.load(open(request_file))
    pipe = pipeline(model_dir)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[req["scheduler"]]).from_config(pipe.scheduler.config)
    names = []
    for i, lora in enumerate(req.get("loras", [])):
        name = f"lora{i}"
        pipe.load_lora_weights(os.path.dirname(lora["path"]), weight_name=os.path.basename(lora["path"]),
                               adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(lora["scale"]) for lora in req["loras"]])
    n, h, w = req["num_images"], req["height"], req["width"]
    latents = torch.from_numpy(np.fromfile(req["latents"], dtype="<f4").reshape(n, 4, h // 8, w // 8).copy())
    # An empty negative prompt is passed as None: SDXL then zeroes the negative embeddings when the model's
    # force_zeros_for_empty_prompt says so (loraforge's empty negative_prompt means "none given").
    # SDXL extras, named as the pipeline names them (sizes are (height, width), the crop (top, left)).
    extra = {k: req[k] for k in ("prompt_2", "negative_prompt_2") if k in req}
    extra.update({k: tuple(req[k]) for k in ("original_size", "crops_coords_top_left", "target_size",
                                             "negative_original_size", "negative_crops_coords_top_left",
                                             "negative_target_size") if k in req})
    negative = req.get("negative_prompt") or None
    if negative is None and extra.get("negative_prompt_2"):
        negative = ""  # a second negative prompt alone: the first encoder encodes "" (no zeroing)
    images = pipe(req["prompt"], negative_prompt=negative,
                  num_inference_steps=req["steps"], guidance_scale=req["guidance_scale"], height=h, width=w,
                  num_images_per_prompt=n, latents=latents, **extra).images
    os.makedirs(req["out_dir"], exist_ok=True)
    for i, img in enumerate(images):
        img.save(os.path.join(req["out_dir"], f"ref_{i}.png"))


def tokenize(model_dir: str, texts: list[str]) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    assert len(tok) > 256, f"tokenizer loaded with {len(tok)} tokens"
    print(json.dumps([tok(t, padding="max_length", max_length=77, truncation=True).input_ids for t in texts]))


def main(argv: list[str]) -> None:
    import torch

    # One thread: on a small shared CPU, torch's thread pool waits on descheduled threads (an 8-step
    # render of the tiny model took ~20 s with 2 threads under load, ~0.6 s with 1).
    torch.set_num_threads(int(os.environ.get("LORAFORGE_REFERENCE_THREADS", "1")))
    cmd, model, *rest = argv
    if cmd == "make-lora":
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("out")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--rank", type=int, default=4)
        p.add_argument("--alpha", type=float, default=4.0)
        p.add_argument("--text-encoder", action="store_true")
        p.add_argument("--kohya", action="store_true")
        p.add_argument("--wide", action="store_true")
        a = p.parse_args(rest)
        make_lora(model, a.out, a.seed, a.rank, a.alpha, a.text_encoder, a.kohya, a.wide)
    elif cmd == "render":
        render(model, rest[0])
    elif cmd == "tokenize":
        tokenize(model, rest)
    elif cmd == "batch":
        for job in json.load(open(rest[0])):
            main([job[0], model, *job[1:]])
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
