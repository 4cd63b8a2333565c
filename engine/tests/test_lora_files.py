"""kohya names for SDXL: the original (SGM) UNet's module names, checked against diffusers' own reader."""

from __future__ import annotations

import torch

from loraforge_engine.lora_files import sgm_module_name, to_kohya


def sdxl_layout_unet():
    """SDXL's block layout (3 levels, 2 layers per block, transformers in levels 2 and 3, the deepest with
    several transformer layers) at toy width: the names are what matters here."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16, 32), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
        cross_attention_dim=16, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16)


def test_sgm_names_are_what_diffusers_maps_back():
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    unet = sdxl_layout_unet()
    lpb = unet.config.layers_per_block
    names = {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ("attentions" in name or "resnets" in name):
            sgm = sgm_module_name(name, lpb)
            assert sgm is not None, name
            names[name] = sgm
    assert len(names) > 100
    # Known anchors of SDXL's layout: level 2's first transformer is input block 4, the deepest up level's
    # first transformer is output block 0, the middle transformer is middle_block 1.
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert names["down_blocks.2.attentions.1.proj_out"] == "input_blocks.8.1.proj_out"
    assert names["mid_block.attentions.0.transformer_blocks.1.ff.net.2"] == \
        "middle_block.1.transformer_blocks.1.ff.net.2"
    assert names["up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0"] == \
        "output_blocks.2.1.transformer_blocks.0.attn2.to_out.0"
    assert names["up_blocks.2.resnets.1.conv1"] == "output_blocks.7.0.in_layers.2"
    assert names["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    assert sgm_module_name("down_blocks.1.downsamplers.0.conv", lpb) == "input_blocks.6.0.op"

    # diffusers' reader turns SGM block indices back into diffusers blocks (inner resnet names are renamed by
    # a later step of its reader, so compare those in SGM form).
    resnet_inner = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                    "conv_shortcut": "skip_connection"}
    sd = {f"lora_unet_{sgm.replace('.', '_')}.lora_down.weight": torch.zeros(1) for sgm in names.values()}
    # It keeps the SGM block words (a later step renames them); so does this comparison.
    words = {"lora_unet_input_blocks_": "lora_unet_down_blocks_", "lora_unet_middle_block_": "lora_unet_mid_block_",
             "lora_unet_output_blocks_": "lora_unet_up_blocks_"}
    mapped = set()
    for key in _maybe_map_sgm_blocks_to_diffusers(sd, unet.config):
        for sgm_word, word in words.items():
            key = key.replace(sgm_word, word)
        mapped.add(key)
    expected = set()
    for name in names:
        key = name.replace(".", "_")
        for d, s in resnet_inner.items():
            if "resnets" in name and key.endswith("_" + d):
                key = key[: -len(d)] + s
        expected.add(f"lora_unet_{key}.lora_down.weight")
    assert mapped == expected


def test_modules_without_an_sgm_name():
    assert sgm_module_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2) is not None
    assert sgm_module_name("conv_norm_out", 2) is None
    assert sgm_module_name("up_blocks.1.upsamplers.0.conv", 2) is None  # layout of the block unknown
    assert sgm_module_name("up_blocks.1.upsamplers.0.conv", 2, {0, 1}) == "output_blocks.5.2.conv"
    assert sgm_module_name("time_embedding.linear_1", 2) == "time_embed.0"


def test_kohya_names_by_architecture():
    a, b = torch.ones(2, 8), torch.ones(8, 2)
    peft = {"unet": {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
                     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b},
            "text_encoder": {"encoder.layers.0.self_attn.q_proj.lora_A.weight": a,
                             "encoder.layers.0.self_attn.q_proj.lora_B.weight": b}}
    sd = to_kohya("sd", peft, 4.0)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd
    xl = to_kohya("sdxl", peft, 4.0, layers_per_block=2)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in xl
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in xl
    assert xl["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"].item() == 4.0
