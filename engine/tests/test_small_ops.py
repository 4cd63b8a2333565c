"""small_ops' routings compute what the forwards they replace compute: same outputs, same gradients, bit for bit,
and diffusers' own forward outside their plain case."""

from __future__ import annotations

import copy

import pytest
import torch

from loraforge_engine import small_ops


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
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
    mask = torch.ones(2, 77)
    mask[:, 70:] = 0  # a text mask, which the plain path broadcasts over the heads
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


@pytest.mark.parametrize("size,routed", [(1, True), (2, True), (4, True), (5, False), (8, False)])
def test_few_pixel_convolutions_take_thnn_and_match_conv2d(size, routed, monkeypatch):
    calls = []
    real = torch._C._nn.thnn_conv2d
    monkeypatch.setattr(torch._C._nn, "thnn_conv2d", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(64, 48, 3, padding=1).requires_grad_(False)
    rerouted = copy.deepcopy(plain)
    assert small_ops.route_few_pixel_convs(rerouted) == 1 and small_ops.route_few_pixel_convs(rerouted) == 0
    x = torch.randn(3, 64, size, size).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), rerouted(xb)
    assert len(calls) == (1 if routed else 0)  # 4x4 = 16 pixels is the limit
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["bf16 weights", "bf16 autocast", "fp16 autocast"])
def test_few_pixel_convolutions_in_bfloat16_take_thnn_as_autocast_would_cast(mode, monkeypatch):
    """bf16 training on a CPU (frozen weights stored in bf16, run under autocast): few-pixel convolutions take
    thnn_conv2d too, in the dtype Conv2d would compute in, with the output dtype and, to bf16 rounding, the values
    and input gradient of the module's own forward. fp16 autocast keeps the module's forward."""
    calls = []
    real = torch._C._nn.thnn_conv2d
    monkeypatch.setattr(torch._C._nn, "thnn_conv2d", lambda *a: calls.append([t.dtype for t in a if torch.is_tensor(t)])
                        or real(*a))
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(64, 48, 3, padding=1).requires_grad_(False)
    if mode == "bf16 weights":
        plain = plain.to(torch.bfloat16)
    rerouted = copy.deepcopy(plain)
    small_ops.route_few_pixel_convs(rerouted)
    x = torch.randn(3, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    if mode == "bf16 weights":
        x = x.to(torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dtype = torch.float16 if mode == "fp16 autocast" else torch.bfloat16
    with torch.autocast("cpu", dtype=dtype, enabled=mode != "bf16 weights"):
        ya, yb = plain(xa), rerouted(xb)
    if mode == "fp16 autocast":
        assert calls == []
        return
    assert calls == [[torch.bfloat16] * 3]  # input, weight and bias, as autocast casts them for Conv2d
    assert yb.dtype == ya.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ya.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert xb.grad.dtype == xa.grad.dtype
    torch.testing.assert_close(xb.grad.float(), xa.grad.float(), rtol=2e-2, atol=2e-2)


def test_convolutions_thnn_does_not_compute_alike_keep_their_forward():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding="same"), torch.nn.Conv2d(8, 8, 3, groups=2),
                                torch.nn.Conv2d(8, 8, 3, dilation=2), torch.nn.Conv2d(8, 8, 3, padding_mode="reflect"),
                                torch.nn.Conv2d(8, 8, 1))
    assert small_ops.route_few_pixel_convs(model) == 1
    assert hasattr(model[4], "_torch_forward")


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_fused_lora_calls_give_peft_outputs_and_gradients(arch, tiny_model, tiny_sdxl):
    """The whole UNet with every LoRA projection fused against peft's own modules: outputs, the input's gradient and
    every LoRA gradient agree (to rounding: the scaling is applied inside a matrix product), through one
    _LoraLinear node per adapted layer."""
    plain = _tiny_unet_with_lora(tiny_model if arch == "sd" else tiny_sdxl)
    fused = copy.deepcopy(plain)
    n = small_ops.fused_lora_calls(fused)
    assert n == sum(1 for name, _ in plain.named_parameters() if "lora_A" in name) and n > 0
    assert small_ops.fused_lora_calls(fused) == 0  # once per module
    torch.manual_seed(1)
    cond = _sdxl_conditioning(plain) if arch == "sdxl" else {}
    x = torch.randn(2, plain.config.in_channels, 8, 8)
    enc = torch.randn(2, 7, plain.config.cross_attention_dim)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = plain(xa, torch.tensor([10, 500]), enc, **cond).sample
    yb = fused(xb, torch.tensor([10, 500]), enc, **cond).sample
    assert _grad_fn_names(yb).count("_LoraLinearBackward") == n
    assert "_LoraLinearBackward" not in _grad_fn_names(ya)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    grads = {name: p.grad for name, p in fused.named_parameters() if p.requires_grad}
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_layers_outside_the_plain_case_keep_peft_forward():
    from peft import LoraConfig, inject_adapter_in_model

    def model(dropout: float):
        m = torch.nn.Sequential(torch.nn.Linear(8, 8))
        m = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, lora_dropout=dropout, target_modules=["0"]), m)
        assert small_ops.fused_lora_calls(m) == 1
        return m

    def fused(m, x) -> bool:
        return "_LoraLinearBackward" in _grad_fn_names(m(x))

    x = torch.randn(3, 8, requires_grad=True)
    assert fused(model(0.0), x)
    assert not fused(model(0.5).train(), x)  # dropout in effect
    assert fused(model(0.5).eval(), x)  # dropout not in effect
    m = model(0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused(m, x)  # autocast picks its own dtypes: peft's modules
    m[0].base_layer.weight.requires_grad_(True)
    assert not fused(m, x)  # a trained base layer needs its own gradient
    m[0].base_layer.weight.requires_grad_(False)
    m[0].enable_adapters(False)  # peft's switch: the base layer alone
    assert not fused(m, x)


def test_routed_convolutions_turn_channels_last_on_first_use_and_give_back_mapped_pages(tmp_path):
    """A convolution loaded from safetensors (a private mapping of the file, as diffusers loads weights) gets a
    channels_last weight with the same values at its first call, and the mapping's pages under the old weight are
    given back; a 1x1 kernel only gets channels_last strides over the same bytes."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    save_file({"w3": torch.randn(256, 128, 3, 3), "w1": torch.randn(64, 128, 1, 1)}, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    conv3, conv1 = torch.nn.Conv2d(128, 256, 3, padding=1, bias=False), torch.nn.Conv2d(128, 64, 1, bias=False)
    conv3.weight.data, conv1.weight.data = loaded["w3"], loaded["w1"]
    conv3.requires_grad_(False)
    conv1.requires_grad_(False)
    expect3, expect1 = loaded["w3"].clone(), loaded["w1"].clone()
    old1 = conv1.weight.data_ptr()
    x = torch.randn(2, 128, 8, 8)
    ref3 = torch.nn.functional.conv2d(x, expect3, padding=1)
    assert small_ops.route_few_pixel_convs(torch.nn.Sequential(conv3, conv1)) == 2
    assert not conv3.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv3(x), ref3, rtol=1e-4, atol=1e-4)
    conv1(x)
    assert conv3.weight.is_contiguous(memory_format=torch.channels_last) and torch.equal(conv3.weight, expect3)
    assert conv1.weight.stride() == torch.empty_like(expect1, memory_format=torch.channels_last).stride()
    assert conv1.weight.data_ptr() == old1 and torch.equal(conv1.weight, expect1)  # no copy of a 1x1 kernel
    # The pages: a mapped range of the file is given back (and reads back the file's bytes), anonymous memory never.
    w1 = loaded["w1"]
    page = 4096
    assert small_ops.drop_file_pages(loaded["w3"].data_ptr(), loaded["w3"].nbytes) >= loaded["w3"].nbytes - 2 * page
    assert torch.equal(loaded["w3"], expect3)
    assert small_ops.drop_file_pages(expect3.data_ptr(), expect3.nbytes) == 0
    assert torch.equal(w1, expect1)


def test_cast_frozen_casts_each_tensor_and_gives_back_its_mapped_pages(tmp_path):
    """Weights loaded from safetensors (mapped) are cast to bf16 one tensor at a time, parameters and buffers, with
    the values `.to(bf16)` gives, and the file's pages under each fp32 source are given back; integer buffers and
    tensors already in the dtype are left as they are."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    save_file({"w": torch.randn(512, 256), "b": torch.randn(512), "m": torch.randn(512)}, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    model = torch.nn.Linear(256, 512).requires_grad_(False)
    model.weight.data, model.bias.data = loaded["w"], loaded["b"]
    model.register_buffer("mean", loaded["m"])
    model.register_buffer("count", torch.arange(3))
    expect = {k: v.to(torch.bfloat16) for k, v in loaded.items()}
    weight = model.weight
    freed = small_ops.cast_frozen(model, torch.bfloat16)
    assert model.weight is weight and not weight.requires_grad  # the same Parameter, its data replaced
    assert model.weight.dtype == model.bias.dtype == model.mean.dtype == torch.bfloat16
    assert torch.equal(model.weight, expect["w"]) and torch.equal(model.bias, expect["b"])
    assert torch.equal(model.mean, expect["m"])
    assert model.count.dtype == torch.int64
    # The weight's 512 KiB lie on whole pages of the mapping: nearly all of them come back.
    assert freed >= loaded["w"].nbytes - 2 * 4096
    assert small_ops.cast_frozen(model, torch.bfloat16) == 0  # nothing left to cast


def test_first_use_gives_back_pages_with_the_mappings_read_when_routed(tmp_path, monkeypatch):
    """/proc/self/maps is read once when convolutions are routed, and each weight's first call uses that reading
    while the weight is still the one routed; a weight replaced since (anonymous here) is judged on a fresh reading
    and nothing of it is given back."""
    from safetensors.torch import load_file, save_file

    save_file({"a": torch.randn(256, 128, 3, 3), "b": torch.randn(256, 128, 3, 3)}, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    convs = [torch.nn.Conv2d(128, 256, 3, padding=1, bias=False).requires_grad_(False) for _ in range(2)]
    convs[0].weight.data, convs[1].weight.data = loaded["a"], loaded["b"]
    calls = []
    real = small_ops.drop_file_pages
    monkeypatch.setattr(small_ops, "drop_file_pages",
                        lambda a, n, m=None: calls.append((m is not None, real(a, n, m))) or calls[-1][1])
    small_ops.route_few_pixel_convs(torch.nn.Sequential(*convs))
    convs[1].weight.data = loaded["b"].clone()  # replaced after routing
    x = torch.randn(1, 128, 8, 8)
    convs[0](x)
    convs[1](x)
    page = 4096
    assert calls[0][0] and calls[0][1] >= loaded["a"].nbytes - 2 * page
    assert calls[1] == (False, 0)
    assert not any(k in c.__dict__ for c in convs for k in ("_routed_weight", "_routed_mappings"))
