"""The engine's CPU kernel choices for small layers (loraforge_engine/small_ops.py), measured in one run.

    PYTHONPATH=engine engine/.venv/bin/python bench/small_ops/run.py [--threads 0] [--steps 150] [--max-calls 300]
        [--work DIR]

1. Convolution kernels: for a range of sizes, forward + input gradient (channels_last, frozen weights, as in the
   UNet) through oneDNN (Conv2d's default on CPU) and through thnn_conv2d (im2col + GEMM), median of repeated
   calls, and their ratio. small_ops.SMALL_CONV_MACS should sit where the ratio crosses 1.
2. Cross-attention over 77 text tokens: forward + gradients of q, k and v through torch's SDPA (flash kernel on
   CPU) for a range of query counts and head sizes, with the 77 keys as they come and padded to 80 under a
   -10000 bias mask (small_ops.pad_text_tokens), and their ratio. small_ops.SMALL_HEAD_DIM should sit where the
   ratio crosses 1.
3. The engine's training step on the tiny model (64 px, batch 4, the bench/train_throughput spec), rotating
   every step through seven settings so that all see the same machine load: all (the default: both routings,
   the LoRA layers' grouped products, direct_attention_calls' shortcut, the plain attention and resnet blocks
   and the text-token padding), all but the plain blocks (diffusers' own processor and resnet forward), all but
   the grouped products (each LoRA layer folds its own weight), all but the padding, both routings (no
   shortcut, no plain blocks, no padding), the LoRA fold only (convolutions on oneDNN), none (every layer on its
   module's own forward: size limits set to 0, groups, shortcut, plain blocks and padding off). Median step
   time of each and the median of its ratios to the adjacent "none" step. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train_throughput"))  # before this folder

from loraforge_engine.openmp import set_wait_policy  # noqa: E402

set_wait_policy()  # as the engine runs, before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (batch, channels, height = width, kernel): the tiny UNet's sizes at 64 px first, then larger ones.
CONV_SIZES = [(4, 32, 8, 3), (4, 64, 4, 3), (4, 32, 8, 1), (8, 32, 8, 3), (4, 64, 8, 3), (4, 32, 16, 3),
              (4, 64, 16, 3), (4, 128, 16, 3), (4, 128, 32, 3)]


def median_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def conv_kernels(max_calls: int) -> list[dict]:
    rows = []
    for b, c, h, k in CONV_SIZES:
        conv = torch.nn.Conv2d(c, c, k, padding=k // 2).requires_grad_(False).to(memory_format=torch.channels_last)
        x = torch.randn(b, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        macs = b * c * h * h * c * k * k
        calls = max(min(10, max_calls), min(max_calls, int(3e9 / macs)))

        def onednn():
            y = conv(x)
            y.backward(torch.ones_like(y))

        def thnn():
            y = torch._C._nn.thnn_conv2d(x, conv.weight, conv.kernel_size, conv.bias, conv.stride, conv.padding)
            y.backward(torch.ones_like(y))

        a, t = median_us(onednn, calls), median_us(thnn, calls)
        rows.append({"shape": [b, c, h, h], "kernel": k, "macs": macs, "onednn_us": a, "thnn_us": t,
                     "ratio": t / a})
        print(f"conv {b}x{c}x{h}x{h} k{k}: {macs / 1e6:7.2f} M multiply-adds   oneDNN {a:8.0f} us   "
              f"thnn {t:8.0f} us   thnn/oneDNN {t / a:.2f}", flush=True)
    return rows


# (queries, head size) with 8 heads and batch 4: the tiny UNet's (64 px: 64 and 16 queries), then larger ones up
# to SD-1.5's head sizes.
ATTENTION_SIZES = [(64, 4), (16, 8), (64, 8), (64, 16), (256, 16), (64, 32), (256, 40), (256, 80)]


def attention_kernels(max_calls: int) -> list[dict]:
    from loraforge_engine.small_ops import pad_text_tokens

    rows = []
    batch, heads, tokens = 4, 8, 77
    for queries, dim in ATTENTION_SIZES:
        q = torch.randn(batch, queries, heads, dim).transpose(1, 2).requires_grad_(True)  # as diffusers lays it out
        text = torch.randn(batch, tokens, heads * dim)
        padded, mask = pad_text_tokens(text)
        bias = ((1 - mask) * -10000.0)[:, None, None, :]  # what diffusers' UNet makes of the mask
        grad = torch.randn(batch, heads, queries, dim)
        calls = max(min(10, max_calls), min(max_calls, int(2e8 / (batch * heads * queries * 80 * dim))))

        def attend(t: torch.Tensor, attn_mask=None):
            kv = t.view(batch, -1, heads, dim).transpose(1, 2).detach().requires_grad_(True)
            k, v = kv, kv.clone().detach().requires_grad_(True)
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).backward(grad)

        plain, masked = median_us(attend(text), calls), median_us(attend(padded, bias), calls)
        rows.append({"queries": queries, "head_dim": dim, "plain_us": plain, "padded_us": masked,
                     "ratio": masked / plain})
        print(f"cross-attention {batch}x{heads} heads, {queries:4d} queries, head size {dim:3d}: 77 keys "
              f"{plain:7.0f} us   80 keys + mask {masked:7.0f} us   padded/plain {masked / plain:.2f}", flush=True)
    return rows


def engine_steps(work: Path, steps: int) -> dict:
    import run as throughput  # bench/train_throughput/run.py: the same spec and step

    from loraforge_engine import small_ops

    model, data = throughput.tiny_model_and_data(work)
    t = throughput.engine_trainer(str(model), str(data), 10_000, 4, 64, work, {})
    conv, lora = small_ops.SMALL_CONV_MACS, small_ops.SMALL_LORA_MACS
    # (SMALL_CONV_MACS, SMALL_LORA_MACS, DIRECT_ATTENTION, PAD_TEXT_KEYS, GROUP_LORA, PLAIN_BLOCKS)
    settings = {"all": (conv, lora, True, True, True, True),
                "no_plain_blocks": (conv, lora, True, True, True, False),
                "no_lora_groups": (conv, lora, True, True, False, True),
                "no_key_padding": (conv, lora, True, False, True, True),
                "both": (conv, lora, False, False, True, False),
                "lora_fold_only": (0, lora, False, False, True, False),
                "none": (0, 0, False, False, False, False)}

    def apply(limits: tuple) -> None:
        (small_ops.SMALL_CONV_MACS, small_ops.SMALL_LORA_MACS, small_ops.DIRECT_ATTENTION,
         small_ops.PAD_TEXT_KEYS, small_ops.GROUP_LORA, small_ops.PLAIN_BLOCKS) = limits

    def step(i: int, limits: tuple) -> float:
        apply(limits)
        return throughput.timed_engine_step(t, i)

    times: dict[str, list[float]] = {name: [] for name in settings}
    i = 0
    for rep in range(steps + 5):
        for name, limits in settings.items():
            dt = step(i, limits)
            i += 1
            if rep >= 5:  # warm-up
                times[name].append(dt)
    apply(settings["all"])
    none = np.array(times["none"])
    r = {}
    for name, v in times.items():
        r[name] = {"median_ms": float(np.median(v)) * 1e3, "paired_ratio_to_none": float(np.median(np.array(v) / none))}
        print(f"engine step, {name:>15}: {r[name]['median_ms']:6.2f} ms (median of {steps})   "
              f"/ none, median of paired steps: {r[name]['paired_ratio_to_none']:.3f}")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=150, help="engine steps per setting")
    p.add_argument("--max-calls", type=int, default=300, help="timed calls per convolution size, at most")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraforge-bench-train"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}", flush=True)
    convs = conv_kernels(a.max_calls)
    attention = attention_kernels(a.max_calls)
    steps = engine_steps(Path(a.work), a.steps)
    print(json.dumps({"threads": torch.get_num_threads(), "convolutions": convs, "cross_attention": attention,
                      "engine_step": steps}))


if __name__ == "__main__":
    main()
