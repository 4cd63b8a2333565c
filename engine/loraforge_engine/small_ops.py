"""Two cuts of host-side work per call in diffusers' UNet and VAE blocks, at every model size and on every device
(not under torch.compile, which traces the Python away). Each is applied to a model's modules in place (parameters,
names and state dicts untouched) and falls back to the module's own forward outside its plain case.

* diffusers' Attention.forward reads its processor's signature with inspect on every call, to filter extra
  keyword arguments; when there are none, direct_attention_calls calls the processor as that forward then does,
  without the inspection. The processor, and so the arithmetic, is the same.
* diffusers' SDPA attention processor and ResnetBlock2D divide their output by an output factor that is 1 in every
  SD and SDXL UNet: an elementwise operator and its backward for nothing. For their plain configurations
  _plain_sdpa_attention and _plain_resnet_forward compute the same operators on the same values without it
  (outputs and gradients equal bit for bit).

* peft's LoRA Linear computes base(x) + lora_B(lora_A(dropout(x))) * scaling as a dozen autograd operators per
  layer and as many again backwards; fused_lora_calls computes the same products (no full weight gradient: grad_A
  and grad_B only) in one autograd node of three matrix products forward and five backward, for the plain case
  (one vanilla adapter, no dropout, no autocast, one dtype); any other call takes peft's own forward.

And one on a CPU (route_few_pixel_convs): each convolution's weight turns channels_last on its first call, so only
the layers training runs pay for that copy (not the VAE's decoder), and the pages of the safetensors file under the
old layout are given back (drop_file_pages): the weights are never held twice. Convolutions whose output has at
most FEW_PIXELS pixels per image (the UNet's lowest levels when training at low resolution) run torch's im2col +
GEMM kernel (thnn_conv2d) instead of oneDNN's, whose cost per call grows with the weight rather than the pixels
(in float32 and in bfloat16, autocast included).
"""

from __future__ import annotations

import ctypes
import functools
import os
import types
from pathlib import Path

import torch
import torch.nn.functional as F

# The cuts; switched off in tests to compare against diffusers' own forwards.
DIRECT_ATTENTION = True
PLAIN_BLOCKS = True
FUSED_LORA = True
# Convolutions whose output has at most this many pixels per image run thnn_conv2d on a CPU (see
# route_few_pixel_convs); 0 turns the routing off.
FEW_PIXELS = 16
# Routed convolutions' weights turn channels_last on first use; False keeps them as loaded.
CHANNELS_LAST = True


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


def _few_pixel_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Conv2d forward on a CPU, its weight made channels_last the first time (CHANNELS_LAST): through thnn_conv2d
    (im2col + GEMM) when its output has at most FEW_PIXELS pixels per image and it computes in float32 or
    bfloat16, otherwise the module's own. Under bf16 autocast the operands are cast as autocast casts a Conv2d's
    (thnn_conv2d is not on its list, so it would not)."""
    if x.device.type != "cpu" or x.dim() != 4:
        return self._torch_forward(x)
    if CHANNELS_LAST and not self.__dict__.get("_channels_last"):
        _weight_to_channels_last(self)
    (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
    pixels = ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)
    if pixels > FEW_PIXELS:
        return self._torch_forward(x)
    weight, bias = self.weight, self.bias
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16:
            return self._torch_forward(x)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif x.dtype not in (torch.float32, torch.bfloat16) or x.dtype != weight.dtype:
        return self._torch_forward(x)
    return torch._C._nn.thnn_conv2d(x, weight, self.kernel_size, bias, self.stride, self.padding)


def _weight_to_channels_last(conv: torch.nn.Conv2d) -> None:
    """conv.weight with channels_last strides, in place of the plain one. A 1x1 kernel's bytes are already in that
    order: it gets the strides alone (oneDNN picks its kernels by them). Any other is copied, and the source's
    pages are given back to the OS where they are a private mapping of a safetensors file (a frozen weight as
    diffusers loads it); the source is read in order first, as the layout copy's strided reads fault a mapped file
    in page by page, twice as slowly."""
    old = conv.weight.data
    # The mappings read when the convolution was routed serve while its weight is the one it had then (held since,
    # so no other tensor can have its address); else they are read now.
    routed, mappings = conv.__dict__.pop("_routed_weight", None), conv.__dict__.pop("_routed_mappings", None)
    if routed is None or routed.data_ptr() != old.data_ptr():
        mappings = None
    with torch.no_grad():
        if old.is_contiguous(memory_format=torch.channels_last):  # same bytes in the same order
            strides = torch.empty(old.shape, device="meta", memory_format=torch.channels_last).stride()
            conv.weight.data = old.as_strided(old.shape, strides)
        else:
            if old.is_contiguous():
                old.view(-1)[::1024].sum()  # one read per page (4 KiB of float32), in order
            conv.weight.data = torch.empty_like(old, memory_format=torch.channels_last).copy_(old)
            drop_file_pages(old.data_ptr(), old.nbytes, mappings)
    conv._channels_last = True


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Every floating-point parameter and buffer of `model` in `dtype`, one tensor at a time, each source's pages
    given back where it is a private mapping of a safetensors file (drop_file_pages): the model is never resident
    in both precisions, as it is when from_pretrained casts while loading. Returns the bytes given back."""
    freed = 0
    # Read once: every source below was alive (so mapped where it was) when the list was made.
    mappings = file_mappings()
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, t in tensors.items():
                    if t is None or not t.is_floating_point() or t.dtype == dtype:
                        continue
                    old = t.data
                    if isinstance(t, torch.nn.Parameter):
                        t.data = old.to(dtype)
                    else:
                        tensors[name] = old.to(dtype)
                    freed += drop_file_pages(old.data_ptr(), old.nbytes, mappings)
    return freed


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of each private mapping of a .safetensors file in this process (as safetensors maps weights)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors") and fields[1].endswith("p"):
            start, end = (int(v, 16) for v in fields[0].split("-"))
            out.append((start, end))
    return out


def drop_file_pages(address: int, nbytes: int, mappings: list[tuple[int, int]] | None = None) -> int:
    """Give back the resident pages wholly inside [address, address + nbytes) where that range lies in a private
    mapping of a .safetensors file, for a tensor no longer used: MADV_DONTNEED makes a later read fault the file's
    bytes back in, so this loses nothing that was not written since. Returns the bytes advised; 0 elsewhere
    (anonymous memory would lose its contents, so it is never touched). `mappings`: file_mappings() read while the
    tensor at `address` was already alive (reading /proc/self/maps costs ~0.5 ms); default: read now."""
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = -(-address // page) * page, (address + nbytes) // page * page
    if hi <= lo or _libc() is None:
        return 0
    for start, end in file_mappings() if mappings is None else mappings:
        if start <= lo and hi <= end:
            return hi - lo if _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0 else 0
    return 0


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None  # not glibc: the pages stay resident, which costs memory, not correctness


def route_few_pixel_convs(model: torch.nn.Module) -> int:
    """Route every Conv2d of `model` that thnn_conv2d computes as Conv2d does (zero padding given as numbers, no
    dilation, one group) through _few_pixel_conv_forward; returns how many. oneDNN's convolution pays a cost per
    call that grows with the weight, not the pixels: at SD-1.5's widths on 2x2 and 1x1 feature maps it took 3-10x
    thnn_conv2d's time (bench/RESULTS.md), and those layers carry the UNet's largest weights."""
    mappings = file_mappings()  # one read of /proc/self/maps for every weight's first call, not one each

    def wanted(m: torch.nn.Module) -> bool:
        if not (type(m) is torch.nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and m.dilation == (1, 1) and m.groups == 1) or hasattr(m, "_torch_forward"):
            return False
        m._routed_weight, m._routed_mappings = m.weight.detach(), mappings
        return True

    return _reroute(model, wanted, "_torch_forward", _few_pixel_conv_forward)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W, b frozen: forward keeps x and xa = x A^T; backward gives
    grad_x = g W + s (g B) A, grad_A = s (g B)^T x and grad_B = s g^T xa, as peft's modules compute them."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.shape = scaling, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ lora_b
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gb, lora_a, alpha=s).view(ctx.shape)
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ x2).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ xa).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft lora.Linear's forward through _LoraLinear in its plain case (see _plain_lora_case), else its own."""
    if args or kwargs or not FUSED_LORA or not _plain_lora_case(self, x):
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return self._peft_forward(x)  # a trained base layer needs its own gradients
    return _LoraLinear.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[name])


def _plain_lora_case(layer, x: torch.Tensor) -> bool:
    """One active vanilla adapter on an unmerged nn.Linear, without dropout in effect, every weight in x's dtype
    and no autocast: what peft then computes is exactly _LoraLinear's products."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    dropout, base = layer.lora_dropout[name], layer.base_layer
    if not (isinstance(dropout, torch.nn.Identity) or not (dropout.p and dropout.training)):
        return False
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    return (type(base) is torch.nn.Linear and lora_a.bias is None and lora_b.bias is None
            and x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype
            and not torch.is_autocast_enabled(x.device.type))


def fused_lora_calls(model: torch.nn.Module) -> int:
    """Route every peft LoRA Linear of `model` through _fused_lora_forward; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return _reroute(model, lambda m: type(m) is LoraLinear, "_peft_forward", _fused_lora_forward)
