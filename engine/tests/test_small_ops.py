"""The CPU routings for small layers compute what the layers they replace compute: same outputs, same
gradients, and the layers' own forward outside the size range."""

from __future__ import annotations

import copy

import pytest
import torch

from loraforge_engine import small_ops


def _conv_pair(cin, cout, k, stride=1, padding=0, trainable=False, **kw):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, **kw).requires_grad_(trainable)
    routed = copy.deepcopy(plain)
    return plain, routed


@pytest.mark.parametrize("cin,cout,k,stride,padding,channels_last,trainable", [
    (32, 32, 3, 1, 1, True, False),   # the tiny UNet's resnet convolution
    (64, 64, 3, 2, 1, True, False),   # a downsampler
    (32, 4, 1, 1, 0, False, True),    # a 1x1 projection, trainable (a LoCon LoRA layer's own weights)
    (4, 32, 3, 1, 1, False, True),
])
def test_small_convolutions_take_thnn_and_match_conv2d(cin, cout, k, stride, padding, channels_last, trainable):
    plain, routed = _conv_pair(cin, cout, k, stride, padding, trainable)
    assert small_ops.route_small_convs(routed) == 1
    x = torch.randn(4, cin, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        plain.to(memory_format=torch.channels_last)
        routed.to(memory_format=torch.channels_last)
    assert small_ops.conv_macs(routed, x) < small_ops.SMALL_CONV_MACS
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), routed(xb)
    assert type(yb.grad_fn).__name__ == "SlowConv2DBackward0"  # the routed kernel ran, not oneDNN's
    assert ya.shape == yb.shape
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    if trainable:
        torch.testing.assert_close(routed.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(routed.bias.grad, plain.bias.grad, rtol=1e-4, atol=1e-4)


def test_large_convolutions_and_other_inputs_keep_the_module_forward():
    plain, routed = _conv_pair(64, 64, 3, padding=1)
    small_ops.route_small_convs(routed)
    big = torch.randn(4, 64, 32, 32)  # 37.7 M multiply-adds
    assert small_ops.conv_macs(routed, big) >= small_ops.SMALL_CONV_MACS
    y = routed(big.requires_grad_(True))
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    assert torch.equal(y, plain(big))
    small = torch.randn(1, 64, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # small, but autocast picks the dtype
        y = routed(small)
    assert y.dtype == torch.bfloat16  # thnn_conv2d would have computed (and returned) float32
    small = small.double()  # small, but not float32
    assert torch.equal(routed.double()(small), plain.double()(small))


def test_only_convolutions_thnn_computes_alike_are_routed():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.Conv2d(8, 8, 3, padding="same"),
        torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=2),
        torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        torch.nn.Conv1d(8, 8, 3),
    )
    assert small_ops.route_small_convs(model) == 1
    assert small_ops.route_small_convs(model) == 0  # idempotent
    assert hasattr(model[0], "_torch_forward") and not any(hasattr(m, "_torch_forward") for m in model[1:])


def test_folded_lora_gives_peft_outputs_and_gradients():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16))
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["0", "1"])
    plain = inject_adapter_in_model(config, copy.deepcopy(base))
    for name, p in plain.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at zero; a non-zero B exercises the product
    folded = copy.deepcopy(plain)
    assert small_ops.fold_small_lora_layers(folded) == 2
    x = torch.randn(4, 8, 32)
    ya, yb = plain(x), folded(x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    ya.square().mean().backward()
    yb.square().mean().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert len(grads) == 4
    for n, p in folded.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
    # Above the size limit the layer runs peft's own forward (its sum of branches, not one linear).
    wide = torch.randn(small_ops.SMALL_LORA_MACS // (32 * 32) + 1, 32)
    assert type(folded[0](wide[:4]).grad_fn).__name__ == "AddmmBackward0"
    out = folded[0](wide)
    assert type(out.grad_fn).__name__ == "AddBackward0"
    torch.testing.assert_close(out, plain[0](wide), rtol=1e-5, atol=1e-5)


def test_lora_layers_of_one_shape_get_their_folded_weights_from_one_batched_product(monkeypatch):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(3)), torch.nn.Linear(32, 16))
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["0", "1", "2", "3"])
    plain = inject_adapter_in_model(config, copy.deepcopy(base))
    for name, p in plain.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    grouped = copy.deepcopy(plain)
    assert small_ops.fold_small_lora_layers(grouped) == 4
    seen = {}  # per layer: whether it found a weight from the group's product when called
    for i in range(4):
        grouped[i].register_forward_pre_hook(lambda m, _, i=i: seen.__setitem__(
            i, small_ops.group_weight(m) is not None))

    def outputs_and_grads(model, x):
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.square().mean().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    x = torch.randn(4, 8, 32)
    ya, ga = outputs_and_grads(plain, x)
    for scales in ((2.0, 2.0, 2.0), (2.0, 0.5, 3.0)):  # peft's scale, then per-layer scales that differ
        for i, s in enumerate(scales):
            plain[i].scaling["default"] = grouped[i].scaling["default"] = s
        ya, ga = outputs_and_grads(plain, x)
        yb, gb = outputs_and_grads(grouped, x)
        assert seen == {0: True, 1: True, 2: True, 3: False}  # the 32 -> 16 layer is alone in its shape
        assert all(small_ops.group_weight(m) is None for m in grouped)  # dropped when the forward ends
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        assert ga.keys() == gb.keys() and len(ga) == 8
        for n, g in ga.items():
            torch.testing.assert_close(gb[n], g, rtol=1e-4, atol=1e-6, msg=n)
    # A layer called on its own (outside its model's forward) computes its own folded weight.
    torch.testing.assert_close(grouped[1](x), plain[1](x), rtol=1e-5, atol=1e-5)
    assert seen[1] is False
    # Switched off, every layer computes its own; the results are the same.
    monkeypatch.setattr(small_ops, "GROUP_LORA", False)
    yc, gc = outputs_and_grads(grouped, x)
    assert not any(seen.values())
    torch.testing.assert_close(yc, yb, rtol=1e-5, atol=1e-6)
    # Under gradient checkpointing (diffusers' blocks carry the flag) the groups stand aside: a recomputation in
    # the backward must save what the first forward saved.
    monkeypatch.setattr(small_ops, "GROUP_LORA", True)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = False  # as diffusers' blocks have it from __init__
    small_ops.fold_small_lora_layers(checkpointed)
    for i in range(4):
        checkpointed[i].register_forward_pre_hook(lambda m, _, i=i: seen.__setitem__(
            i, small_ops.group_weight(m) is not None))
    checkpointed(x)
    assert seen == {0: True, 1: True, 2: True, 3: False}
    checkpointed.gradient_checkpointing = True
    torch.testing.assert_close(checkpointed(x), yc, rtol=1e-5, atol=1e-6)
    assert not any(seen.values())
    # A layer with its adapter disabled runs peft's forward, and ignores its group's weight.
    grouped[0].enable_adapters(False)
    plain[0].enable_adapters(False)
    torch.testing.assert_close(grouped(x), plain(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(grouped[0](x), grouped[0].base_layer(x))  # peft's forward: the base layer alone


def test_direct_attention_calls_skip_the_signature_inspection_and_change_nothing(monkeypatch):
    from diffusers.models import attention_processor
    from diffusers.models.attention_processor import Attention

    inspected = []
    real_signature = attention_processor.inspect.signature
    monkeypatch.setattr(attention_processor.inspect, "signature",
                        lambda f: inspected.append(f) or real_signature(f))
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32)
    for cross_dim, enc in ((None, None), (16, torch.randn(2, 7, 16))):  # self- and cross-attention
        plain = Attention(query_dim=32, cross_attention_dim=cross_dim, heads=4, dim_head=8)
        routed = copy.deepcopy(plain)
        assert small_ops.direct_attention_calls(routed) == 1
        assert small_ops.direct_attention_calls(routed) == 0  # once per module
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya = plain(xa, encoder_hidden_states=enc)
        n = len(inspected)
        yb = routed(xb, encoder_hidden_states=enc)
        assert len(inspected) == n  # the routed call did not inspect
        assert torch.equal(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(xa.grad, xb.grad)
    # Extra keyword arguments take diffusers' own forward, which inspects and filters them.
    n = len(inspected)
    assert torch.equal(routed(x, enc, temb=None), plain(x, enc, temb=None)) and len(inspected) == n + 2


def test_the_trainer_routes_every_unet_attention_unless_compiled(tiny_model, dataset, tmp_path):
    import io

    from diffusers.models.attention_processor import Attention

    from loraforge_engine.config import parse_spec
    from loraforge_engine.events import EventWriter
    from loraforge_engine.train import Trainer

    def attentions(compile_: bool):
        spec = parse_spec({"baseModel": str(tiny_model), "datasetDir": str(dataset), "resolution": 64,
                           "maxTrainSteps": 1, "torchCompile": compile_})
        t = Trainer(spec, str(tmp_path / f"o{compile_}"), EventWriter(io.StringIO()))
        return [m for m in t.c.unet.modules() if isinstance(m, Attention)]

    eager = attentions(False)
    assert eager and all(hasattr(m, "_diffusers_forward") for m in eager)
    assert not any(hasattr(m, "_diffusers_forward") for m in attentions(True))


def _tiny_unet_with_lora(path):
    """The tiny UNet at `path` with LoRA on its attention projections, B drawn nonzero (peft starts it at zero)
    so that every LoRA gradient is nonzero."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return unet


def _sdxl_conditioning(unet) -> dict:
    """added_cond_kwargs for a batch of 2 on an SDXL UNet: pooled text embeddings and size/crop ids."""
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}}


def _grad_fn_names(t: torch.Tensor) -> list[str]:
    """The names of every autograd node behind `t`."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_plain_attention_and_resnet_blocks_give_diffusers_outputs_and_gradients_bit_for_bit(
        arch, tiny_model, tiny_sdxl, monkeypatch):
    unet = _tiny_unet_with_lora(tiny_model if arch == "sd" else tiny_sdxl)
    assert small_ops.direct_attention_calls(unet) > 0
    resnets = small_ops.plain_resnet_calls(unet)
    assert resnets > 0 and small_ops.plain_resnet_calls(unet) == 0  # once per module
    plain_calls = []
    real = small_ops._plain_sdpa_attention
    monkeypatch.setattr(small_ops, "_plain_sdpa_attention", lambda *a: plain_calls.append(1) or real(*a))
    sample = torch.randn(2, unet.config.in_channels, 8, 8)
    hidden, mask = small_ops.pad_text_tokens(torch.randn(2, 77, unet.config.cross_attention_dim))
    extra = _sdxl_conditioning(unet) if arch == "sdxl" else {}
    runs = {}
    for plain in (False, True):
        monkeypatch.setattr(small_ops, "PLAIN_BLOCKS", plain)
        unet.zero_grad(set_to_none=True)
        out = unet(sample, torch.tensor([10, 600]), hidden, encoder_attention_mask=mask, return_dict=False,
                   **extra)[0]
        divisions = _grad_fn_names(out).count("DivBackward0")
        out.square().mean().backward()
        runs[plain] = (out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad},
                       divisions)
    attentions = len([m for m in unet.modules() if hasattr(m, "processor")])
    assert len(plain_calls) == attentions  # every attention call took the plain path (with the mask, too)
    assert runs[False][2] >= resnets and runs[True][2] == 0  # diffusers' divisions by 1, then none
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1].keys() == runs[False][1].keys() and runs[False][1]
    for name, g in runs[False][1].items():
        assert torch.equal(runs[True][1][name], g), name


def test_other_attention_and_resnet_configurations_keep_diffusers_forward(monkeypatch):
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    temb = torch.randn(2, 16)
    for kwargs in ({"up": True}, {"down": True}, {"output_scale_factor": 2.0},
                   {"time_embedding_norm": "scale_shift"}, {"dropout": 0.5}):
        plain = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4, **kwargs)
        routed = copy.deepcopy(plain)
        assert small_ops.plain_resnet_calls(routed) == 1
        torch.manual_seed(1)
        ya = plain(x, temb)
        torch.manual_seed(1)
        assert torch.equal(routed(x, temb), ya), kwargs
    routed.eval()  # dropout 0.5 has no effect in eval: the plain path, same result as diffusers' own
    plain.eval()
    assert torch.equal(routed(x, temb), plain(x, temb))
    # The VAE's blocks: no time embedding, a shortcut convolution; the plain path, diffusers' numbers.
    plain = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=None, groups=4)
    routed = copy.deepcopy(plain)
    small_ops.plain_resnet_calls(routed)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa, None), routed(xb, None)
    assert torch.equal(yb, ya) and "DivBackward0" not in _grad_fn_names(yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(xb.grad, xa.grad)
    calls = []
    real = small_ops._plain_sdpa_attention
    monkeypatch.setattr(small_ops, "_plain_sdpa_attention", lambda *a: calls.append(1) or real(*a))
    tokens = torch.randn(2, 10, 32)
    for kwargs in ({"residual_connection": True}, {"rescale_output_factor": 2.0}, {"norm_num_groups": 4}):
        plain = Attention(query_dim=32, heads=4, dim_head=8, **kwargs)
        routed = copy.deepcopy(plain)
        small_ops.direct_attention_calls(routed)
        assert torch.equal(routed(tokens), plain(tokens)), kwargs
    assert not calls
    # A mask repeated per head already (batch x heads rows) is left to the processor too.
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    small_ops.direct_attention_calls(attn)
    assert torch.equal(attn(tokens, attention_mask=torch.zeros(8, 1, 10)), attn(tokens)) and len(calls) == 1


def test_pad_text_tokens_appends_masked_zero_tokens_up_to_a_multiple_of_16(monkeypatch):
    hidden = torch.randn(3, 77, 8)
    padded, mask = small_ops.pad_text_tokens(hidden)
    assert padded.shape == (3, 80, 8) and mask.shape == (3, 80)
    assert torch.equal(padded[:, :77], hidden) and not padded[:, 77:].any()
    assert mask[:, :77].eq(1).all() and mask[:, 77:].eq(0).all()
    even = torch.randn(2, 64, 8)
    same, none = small_ops.pad_text_tokens(even)
    assert same is even and none is None  # already a multiple: nothing to pad
    monkeypatch.setattr(small_ops, "PAD_TEXT_KEYS", False)
    assert small_ops.pad_text_tokens(hidden) == (hidden, None)


def _padded_and_plain_unet_runs(unet, hidden, extra):
    """Output and LoRA gradients of `unet` on 77 text tokens, plain and padded under pad_text_tokens' mask."""
    torch.manual_seed(1)
    sample = torch.randn(2, unet.config.in_channels, 8, 8)
    t = torch.tensor([10, 600])
    runs = []
    for pad in (False, True):
        unet.zero_grad(set_to_none=True)
        h, mask = small_ops.pad_text_tokens(hidden) if pad else (hidden, None)
        out = unet(sample, t, h, encoder_attention_mask=mask, return_dict=False, **extra)[0]
        out.square().mean().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}))
    return runs


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_padded_masked_text_tokens_give_the_unpadded_output_and_lora_gradients(arch, tiny_model, tiny_sdxl):
    unet = _tiny_unet_with_lora(tiny_model if arch == "sd" else tiny_sdxl)
    assert small_ops.small_cross_attention(unet)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
    extra = _sdxl_conditioning(unet) if arch == "sdxl" else {}
    (plain, plain_grads), (padded, padded_grads) = _padded_and_plain_unet_runs(unet, hidden, extra)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == padded_grads.keys() and len(plain_grads) > 0
    for name, g in plain_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(padded_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_trainer_pads_text_tokens_on_a_cpu_in_float32(tiny_model, dataset, tmp_path, monkeypatch):
    import io

    from loraforge_engine.config import parse_spec
    from loraforge_engine.events import EventWriter
    from loraforge_engine.train import Trainer

    def trainer(**extra) -> Trainer:
        spec = parse_spec({"baseModel": str(tiny_model), "datasetDir": str(dataset), "resolution": 64,
                           "maxTrainSteps": 1, **extra})
        return Trainer(spec, str(tmp_path / f"o{len(list(tmp_path.iterdir()))}"), EventWriter(io.StringIO()))

    t = trainer()
    assert t.pad_text
    assert trainer(torchCompile=True).pad_text  # compiled graphs call the same flash-attention kernel
    assert not trainer(mixedPrecision="bf16").pad_text  # measured in float32 only

    # What the UNet receives from the Trainer's loss: 80 tokens and the mask that hides the last 3.
    seen = []
    forward = t.c.unet.forward

    def recording(sample, timestep, hidden, *args, encoder_attention_mask=None, **kwargs):
        seen.append((hidden.shape[1], encoder_attention_mask))
        return forward(sample, timestep, hidden, *args, encoder_attention_mask=encoder_attention_mask, **kwargs)

    t.c.unet.forward = recording
    t.loss(t.micro_batch(0, 0, 0), 0)
    tokens, mask = seen[-1]
    assert tokens == 80 and mask.shape[1] == 80
    assert mask[:, :77].eq(1).all() and mask[:, 77:].eq(0).all()
    monkeypatch.setattr(small_ops, "PAD_TEXT_KEYS", False)
    t.loss(t.micro_batch(0, 0, 0), 0)
    assert seen[-1] == (77, None)


def test_large_cross_attention_heads_are_not_padded():
    from diffusers.models.attention_processor import Attention

    small = torch.nn.ModuleList([Attention(query_dim=64, cross_attention_dim=32, heads=8, dim_head=8)])
    large = torch.nn.ModuleList([Attention(query_dim=320, cross_attention_dim=32, heads=8, dim_head=40)])
    self_only = torch.nn.ModuleList([Attention(query_dim=64, heads=8, dim_head=8)])
    assert small_ops.small_cross_attention(small)
    assert not small_ops.small_cross_attention(large)
    assert not small_ops.small_cross_attention(self_only)
