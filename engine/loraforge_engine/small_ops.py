"""CPU kernel choices for small layers, where a fixed cost per operator, not arithmetic, is what a step spends.

Two routings, each applied to a model's modules in place (their parameters, names and state dicts are
untouched) and each falling back to the module's own forward outside its size range:

* peft LoRA Linear layers below SMALL_LORA_MACS fold the adapter into the weight, x (W + s B A)^T + b: two
  operators instead of five, the same gradients for A and B (to rounding). The model's small LoRA layers of one
  shape get their folded weights W + s B A together, from one batched product per shape computed as the model's
  forward starts (48 products become 3 in the tiny UNet, and their 48 backward nodes 3).
* Conv2d layers below SMALL_CONV_MACS run torch's im2col + GEMM convolution (thnn_conv2d) instead of oneDNN's.
  oneDNN pays a set-up cost on every call that dominates small convolutions. Forward + input gradient,
  channels_last, on the 2-core x86 development machine (bench/small_ops, bench/RESULTS.md), thnn_conv2d took
  0.54-0.65x oneDNN's time at 2.4 M multiply-adds (most of the tiny test model's convolutions at 64 px, batch
  4), 0.63-0.91x at 4.7 M, 0.68-1.31x at 9.4 M (0.68-0.93x at 8 x 8 pixels, the tiny UNet's two largest; slower
  only at 16 x 16 on one thread), and mostly longer above (0.85-2.3x from 38 M). Both compute the same
  convolution (largest difference ~1e-6 at these sizes). With the limit at 10 M instead of 5 M, which moves
  those two to thnn, the tiny model's whole step took 0.976x the time on 2 threads and 0.986x on 1 (paired
  A/B, scratch script, 200 steps each).

The engine uses both on CPU only, and the convolution routing not under torch.compile, which picks its own
kernels.

One more cut, on every device (not under torch.compile, which traces the Python away): diffusers'
Attention.forward reads its processor's signature with inspect on every call, to filter extra keyword arguments;
when there are none, direct_attention_calls calls the processor as that forward then does, without the
inspection (3.5-4.7% of a tiny-model CPU step, bench/RESULTS.md). The processor, and so the arithmetic, is the
same.

Likewise on every device, not under torch.compile: diffusers' SDPA attention processor and ResnetBlock2D divide
their output by an output factor that is 1 in every SD and SDXL UNet, an elementwise operator and its backward for
nothing, 24 of each per step in the tiny UNet. For their plain configurations _plain_sdpa_attention and
_plain_resnet_forward compute the same operators on the same values without it (and without calling dropout
layers of p = 0, and with a text mask broadcast over the heads rather than repeated): outputs and gradients equal
bit for bit, 3.2% of a tiny-model CPU step in a paired A/B (scratch script, 150 steps each, 2 threads).

And one for cross-attention on a CPU: torch's flash-attention kernel there is slower when the key count (77 CLIP
tokens) is not a multiple of 16 than with a few more keys that are. pad_text_tokens appends zero tokens up to a
multiple of KEY_MULTIPLE and gives the UNet an encoder_attention_mask that excludes them; diffusers turns it into a
-10000 bias on their scores, whose exp is exactly 0 in float32, so the padding gets zero attention weight and zero
gradient, and the result is that of the 77 keys (to rounding). Forward + gradients, 80 masked keys against 77
(bench/small_ops, 2 threads): 0.65-0.92x the time at head sizes 4-40, 1.44x at 80, where the mask's own cost wins;
so the engine pads only when every cross-attention head has at most SMALL_HEAD_DIM channels. Compiled graphs call
the same kernel, so it pads under torch.compile too.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Below this many multiply-adds a LoRA layer's extra weight-gradient matmul costs less on a CPU than the four
# extra operators (and their backward) of peft's separate LoRA branch: at the tiny model's sizes each operator
# costs ~10-20 us of dispatch, the arithmetic next to nothing.
SMALL_LORA_MACS = 1_000_000
# LoRA layers whose frozen weight has at most this many elements get their folded weights in groups
# (_LoraGroups): at most 256 x 256, so the stacked copy of their weights each forward stays small.
GROUP_LORA_WEIGHTS = 1 << 16
# _LoraGroups' batched products; bench/small_ops switches them off to measure them.
GROUP_LORA = True
# Below this many multiply-adds per call thnn_conv2d was the faster kernel in the measurements above.
SMALL_CONV_MACS = 10_000_000
# direct_attention_calls' shortcut; bench/small_ops switches it off to measure it.
DIRECT_ATTENTION = True
# _plain_sdpa_attention and _plain_resnet_forward; bench/small_ops switches them off to measure them.
PLAIN_BLOCKS = True
# pad_text_tokens pads the text tokens (cross-attention keys) to a multiple of this.
KEY_MULTIPLE = 16
# Up to this head size the padded, masked cross-attention was the faster one in the measurements above.
SMALL_HEAD_DIM = 32
# pad_text_tokens' padding; bench/small_ops switches it off to measure it.
PAD_TEXT_KEYS = True


def _small_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft LoRA Linear forward with the adapter folded into the weight, for small layers: the weight its
    group computed for this forward of the model (_LoraGroups), else its own product."""
    base = self.base_layer
    if (args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != ["default"]
            or (x.numel() // base.in_features) * base.in_features * base.out_features > SMALL_LORA_MACS):
        return self._peft_forward(x, *args, **kwargs)
    weight = group_weight(self)
    if weight is None:
        weight = torch.addmm(base.weight, self.lora_B["default"].weight, self.lora_A["default"].weight,
                             alpha=self.scaling["default"])
    return F.linear(x, weight, base.bias)


def group_weight(layer) -> torch.Tensor | None:
    """The folded weight W + s B A that `layer`'s group computed for the model's current forward, if any."""
    slot = getattr(layer, "_lora_group_slot", None)
    if slot is None or slot[0][0] is None:
        return None
    return slot[0][0][slot[1]]


class _LoraGroups:
    """The folded weights W + s B A of a model's small LoRA layers, one batched product (baddbmm) per group of
    layers of the same shapes, computed when the model's forward starts and dropped when it ends, so a layer
    never sees weights older than the current forward (a layer called outside it computes its own). Under
    gradient checkpointing the groups stand aside: a checkpointed block's recomputation, in the backward, must
    save the tensors its first forward saved, and would find no group weights then. Gradients reach every A and
    B through the stacks. Each layer keeps a slot (its group's holder, its index); the holder has the group's
    weights during a forward. The groups hold the layers' parameter objects: the optimizer and checkpoint
    restores update those in place. A layer that runs peft's forward instead (adapter disabled, merged, too
    large an input) ignores its weight."""

    def __init__(self, layers):
        self.checkpointing = None  # the model's modules with a gradient_checkpointing flag, found on first use
        groups: dict[tuple, list] = {}
        for m in layers:
            w, a = m.base_layer.weight, m.lora_A["default"].weight
            if w.numel() <= GROUP_LORA_WEIGHTS and w.dtype == a.dtype:
                groups.setdefault((tuple(w.shape), tuple(a.shape), w.dtype, w.device), []).append(m)
        self.groups = []
        for members in groups.values():
            if len(members) < 2:
                continue
            holder = [None]
            for i, m in enumerate(members):
                m._lora_group_slot = (holder, i)
            self.groups.append((holder, members, [m.base_layer.weight for m in members],
                                [m.lora_B["default"].weight for m in members],
                                [m.lora_A["default"].weight for m in members]))

    def before(self, model, args, kwargs) -> None:
        if self.checkpointing is None:  # diffusers' blocks that can checkpoint carry the flag from __init__
            self.checkpointing = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        if not GROUP_LORA or any(m.gradient_checkpointing for m in self.checkpointing):
            return
        for holder, members, w, b, a in self.groups:
            scales = [m.scaling["default"] for m in members]
            bs = torch.stack(b)
            if len(set(scales)) == 1:
                folded = torch.baddbmm(torch.stack(w), bs, torch.stack(a), alpha=scales[0])
            else:  # peft's per-layer scales (set_scale) differ
                folded = torch.baddbmm(torch.stack(w), bs * torch.tensor(scales, dtype=bs.dtype).view(-1, 1, 1),
                                       torch.stack(a))
            holder[0] = folded.unbind(0)

    def after(self, model, args, kwargs, output) -> None:
        for holder, *_ in self.groups:
            holder[0] = None


def _reroute(model: torch.nn.Module, wanted, saved_as: str, forward) -> int:
    """Give each module of `model` for which wanted(module) holds `forward` as its forward, keeping its own as
    attribute `saved_as` (which also marks it done: a second call skips it); returns how many it rerouted."""
    n = 0
    for m in model.modules():
        if wanted(m) and not hasattr(m, saved_as):
            setattr(m, saved_as, m.forward)
            m.forward = types.MethodType(forward, m)
            n += 1
    return n


def fold_small_lora_layers(model: torch.nn.Module) -> int:
    """Route every peft LoRA Linear of `model` through _small_lora_forward, and have `model`'s forward compute
    their folded weights in groups (_LoraGroups); returns how many layers it routed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    before = {id(m) for m in model.modules() if hasattr(m, "_peft_forward")}
    n = _reroute(model, lambda m: isinstance(m, LoraLinear), "_peft_forward", _small_lora_forward)
    if n:
        groups = _LoraGroups([m for m in model.modules() if hasattr(m, "_peft_forward") and id(m) not in before])
        model.register_forward_pre_hook(groups.before, with_kwargs=True)
        model.register_forward_hook(groups.after, with_kwargs=True, always_call=True)
    return n


def conv_macs(conv: torch.nn.Conv2d, x: torch.Tensor) -> int:
    """Multiply-adds of conv(x) for a 4-D input (groups 1, no dilation)."""
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    oh = (x.shape[2] + 2 * ph - kh) // sh + 1
    ow = (x.shape[3] + 2 * pw - kw) // sw + 1
    return x.shape[0] * conv.out_channels * oh * ow * conv.in_channels * kh * kw


def _small_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Conv2d forward through thnn_conv2d (im2col + GEMM) for small float32 CPU convolutions. Under autocast
    the module's own forward runs, so the convolution keeps autocast's dtype (thnn_conv2d is not on its list)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or torch.is_autocast_enabled("cpu")
            or conv_macs(self, x) >= SMALL_CONV_MACS):
        return self._torch_forward(x)
    return torch._C._nn.thnn_conv2d(x, self.weight, self.kernel_size, self.bias, self.stride, self.padding)


def route_small_convs(model: torch.nn.Module) -> int:
    """Route every Conv2d of `model` that thnn_conv2d computes exactly as Conv2d does (zero padding given as
    numbers, no dilation, one group) through _small_conv_forward; returns how many."""
    return _reroute(model, lambda m: (type(m) is torch.nn.Conv2d and m.padding_mode == "zeros"
                                      and not isinstance(m.padding, str) and m.dilation == (1, 1) and m.groups == 1),
                    "_torch_forward", _small_conv_forward)


def _direct_attention_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                              attention_mask: torch.Tensor | None = None, **cross_attention_kwargs) -> torch.Tensor:
    """diffusers Attention.forward without its per-call signature inspection when there are no extra keyword
    arguments (then it passes exactly these three to the processor); with any, the module's own forward. For the
    plain case of diffusers' SDPA processor, _plain_sdpa_attention."""
    if cross_attention_kwargs or not DIRECT_ATTENTION:
        return self._diffusers_forward(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    if PLAIN_BLOCKS and _plain_sdpa_case(self, hidden_states, attention_mask):
        return _plain_sdpa_attention(self, hidden_states, encoder_hidden_states, attention_mask)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)


def _plain_sdpa_case(attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether diffusers' AttnProcessor2_0 would take none of its optional steps for this module and call: 3-D
    input, no spatial/group/q/k/cross norms, no residual, output factor 1, and no mask or a (batch, 1, keys)
    bias (which it repeats per head, and SDPA broadcasts alike)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return (type(attn.processor) is AttnProcessor2_0 and hidden_states.dim() == 3 and attn.spatial_norm is None
            and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None and attn.norm_cross is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and (attention_mask is None or (attention_mask.dim() == 3 and attention_mask.shape[1] == 1
                                            and attention_mask.shape[0] == hidden_states.shape[0])))


def _plain_sdpa_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                          attention_mask: torch.Tensor | None) -> torch.Tensor:
    """What AttnProcessor2_0 computes in the case _plain_sdpa_case describes, without its division by the output
    factor 1 (an operator and its backward for nothing) and with the mask broadcast over the heads instead of
    repeated: the same operators on the same values otherwise."""
    batch = hidden_states.shape[0]
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attention_mask is not None:
        attention_mask = attention_mask.unsqueeze(1)  # (batch, 1, 1, keys)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[0](out)
    dropout = attn.to_out[1]
    return dropout(out) if dropout.p and dropout.training else out


def _plain_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
    """diffusers ResnetBlock2D.forward for its plain configuration (no up/down sampling, time embedding added
    before norm2, output factor 1, no dropout in effect), without the division by 1 and the dropout call: the same
    operators on the same values otherwise. Any other configuration or call takes the module's own forward."""
    if (args or kwargs or not PLAIN_BLOCKS or self.upsample is not None or self.downsample is not None
            or self.time_embedding_norm != "default" or self.output_scale_factor != 1.0 or self.skip_time_act
            or (self.dropout.p and self.dropout.training) or (temb is None) != (self.time_emb_proj is None)):
        return self._diffusers_forward(input_tensor, temb, *args, **kwargs)
    hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
    if self.time_emb_proj is not None:
        hidden = hidden + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
    hidden = self.conv2(self.nonlinearity(self.norm2(hidden)))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return input_tensor + hidden


def plain_resnet_calls(model: torch.nn.Module) -> int:
    """Route every diffusers ResnetBlock2D of `model` through _plain_resnet_forward; returns how many."""
    from diffusers.models.resnet import ResnetBlock2D

    return _reroute(model, lambda m: type(m) is ResnetBlock2D, "_diffusers_forward", _plain_resnet_forward)


def direct_attention_calls(model: torch.nn.Module) -> int:
    """Route every diffusers Attention module of `model` through _direct_attention_forward; returns how many."""
    from diffusers.models.attention_processor import Attention

    return _reroute(model, lambda m: isinstance(m, Attention), "_diffusers_forward", _direct_attention_forward)


def small_cross_attention(unet: torch.nn.Module) -> bool:
    """Whether `unet` has cross-attention and every cross-attention head has at most SMALL_HEAD_DIM channels."""
    from diffusers.models.attention_processor import Attention

    sizes = [m.inner_dim // m.heads for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    return bool(sizes) and max(sizes) <= SMALL_HEAD_DIM


def pad_text_tokens(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text encoder hidden states (batch, tokens, channels) with zero tokens appended up to a multiple of
    KEY_MULTIPLE, and the encoder_attention_mask (1: a real token, 0: padding) under which diffusers' UNet gives
    the padding zero attention weight. Unchanged, with no mask, when the count already is one (or PAD_TEXT_KEYS
    is off)."""
    tokens = hidden.shape[1]
    pad = -tokens % KEY_MULTIPLE
    if not pad or not PAD_TEXT_KEYS:
        return hidden, None
    mask = torch.ones(hidden.shape[0], tokens + pad, dtype=hidden.dtype, device=hidden.device)
    mask[:, tokens:] = 0
    return F.pad(hidden, (0, 0, 0, pad)), mask
