"""Loads a LoRA file into stock diffusers and reports how it changes a fixed-seed image.

Usage: python lora_effect.py MODEL_DIR LORA_FILE
Prints JSON: {"max_diff": <max |with LoRA - base|>, "scale0_diff": <max |scale 0 - base|>}.
"""
import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline


def render(pipe, **kwargs):
    generator = torch.Generator("cpu").manual_seed(1234)
    return pipe("a red circle on a blue background", num_inference_steps=4, height=64, width=64,
                generator=generator, output_type="np", **kwargs).images[0]


def main(model_dir, lora_file):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    pipe.load_lora_weights(os.path.dirname(lora_file), weight_name=os.path.basename(lora_file))
    with_lora = render(pipe)
    scale0 = render(pipe, cross_attention_kwargs={"scale": 0.0})
    print(json.dumps({"max_diff": float(abs(with_lora - base).max()),
                      "scale0_diff": float(abs(scale0 - base).max())}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
