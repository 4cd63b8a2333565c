// Infer's memory planning (server/src/infer/memory.ts): the shape read from diffusers configs, the
// estimate's growth with size and images, image groups within a budget, and the shared budget's
// first-come-first-served waiting. How close the estimate is to real peak RSS is measured by
// bench/infer/memory.js, not here.
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { estimateBytes, MemoryBudget, planRequest, readMemoryShape, REQUEST_BASE_BYTES } from "@loraforge/server/infer/memory";

/** A model folder holding only the two configs the planner reads. */
function modelDir(unet: object, vae: object): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), "loraforge-memory-"));
  for (const [sub, cfg] of [["unet", unet], ["vae", vae]] as const) {
    mkdirSync(path.join(dir, sub));
    writeFileSync(path.join(dir, sub, "config.json"), JSON.stringify(cfg));
  }
  return dir;
}

// The public SD-1.5 and SDXL configs' architecture keys.
const SD15 = modelDir(
  {
    sample_size: 64,
    in_channels: 4,
    block_out_channels: [320, 640, 1280, 1280],
    down_block_types: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    attention_head_dim: 8,
    layers_per_block: 2,
  },
  { block_out_channels: [128, 256, 512, 512] },
);
const SDXL = modelDir(
  {
    sample_size: 128,
    in_channels: 4,
    block_out_channels: [320, 640, 1280],
    down_block_types: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    attention_head_dim: [5, 10, 20],
    transformer_layers_per_block: [1, 2, 10],
    layers_per_block: 2,
  },
  { block_out_channels: [128, 256, 512, 512] },
);
const fp32 = (side: number) => ({ width: side, height: side, rowsPerImage: 2, unetBytes: 4, vaeBytes: 4, arena: false });
const GiB = 2 ** 30;

describe("memory shape", () => {
  it("reads heads per level the way diffusers does (attention_head_dim is the head count without num_attention_heads)", () => {
    const sd = readMemoryShape(SD15);
    assert.deepEqual(sd.unetLevels.map((l) => l.heads), [8, 8, 8, 0]);
    assert.equal(sd.nativeSize, 512);
    assert.equal(sd.vaeLevels, 3);
    const xl = readMemoryShape(SDXL);
    assert.deepEqual(xl.unetLevels.map((l) => [l.heads, l.layers]), [[0, 1], [10, 2], [20, 10]]);
    assert.equal(xl.nativeSize, 1024);
  });

  it("refuses a folder without the configs", () => {
    assert.throws(() => readMemoryShape(mkdtempSync(path.join(os.tmpdir(), "loraforge-memory-empty-"))), /ENOENT/);
  });
});

describe("estimate", () => {
  const sd = readMemoryShape(SD15);

  it("grows with images and, through self-attention, with the fourth power of the side", () => {
    const one = estimateBytes(sd, fp32(512), 1) - REQUEST_BASE_BYTES;
    const four = estimateBytes(sd, fp32(512), 4) - REQUEST_BASE_BYTES;
    assert.equal(four, 4 * one);
    const big = estimateBytes(sd, fp32(1024), 1) - REQUEST_BASE_BYTES;
    assert.ok(big > 12 * one && big <= 16 * one, `1024 px / 512 px = ${big / one}`);
    // SD 1.5's first-level attention at 512 px: 2 rows × 8 heads × 4096² scores in fp32 is 1 GiB per copy.
    assert.ok(one > 2 * GiB && one < 6 * GiB, `${one / GiB} GiB`);
  });

  it("halves the UNet's share for fp16 activations", () => {
    const full = estimateBytes(sd, fp32(512), 1);
    const half = estimateBytes(sd, { ...fp32(512), unetBytes: 2 }, 1);
    assert.ok(half < full && half > full / 2 - REQUEST_BASE_BYTES, `${half} vs ${full}`);
  });

  it("adds the UNet's and the VAE decoder's peaks when the sessions keep their arenas", () => {
    const apart = estimateBytes(sd, fp32(512), 1) - REQUEST_BASE_BYTES;
    const kept = estimateBytes(sd, { ...fp32(512), arena: true }, 1) - REQUEST_BASE_BYTES;
    const vaeOnly = estimateBytes({ ...sd, unetLevels: [] }, fp32(512), 1) - REQUEST_BASE_BYTES;
    assert.ok(vaeOnly > 0 && vaeOnly < apart);
    assert.ok(kept >= apart + vaeOnly, `${kept} < ${apart} + ${vaeOnly}`);
  });

  it("counts no attention at levels without transformers (SDXL's first level)", () => {
    const xl = readMemoryShape(SDXL);
    const withFirst = { ...xl, unetLevels: xl.unetLevels.map((l, i) => (i === 0 ? { ...l, heads: 5 } : l)) };
    assert.ok(estimateBytes(withFirst, fp32(1024), 1) > 3 * estimateBytes(xl, fp32(1024), 1));
  });
});

describe("plan", () => {
  const sd = readMemoryShape(SD15);
  const one = estimateBytes(sd, fp32(512), 1);
  const two = estimateBytes(sd, fp32(512), 2);

  it("renders all images at once when they fit, in the largest groups that fit otherwise", () => {
    assert.deepEqual(planRequest(sd, fp32(512), 4, 100 * GiB), { perGroup: 4, bytes: estimateBytes(sd, fp32(512), 4) });
    assert.deepEqual(planRequest(sd, fp32(512), 4, two), { perGroup: 2, bytes: two });
    assert.deepEqual(planRequest(sd, fp32(512), 4, two - 1), { perGroup: 1, bytes: one });
  });

  it("has no plan when one image does not fit", () => {
    assert.equal(planRequest(sd, fp32(512), 1, one - 1), null);
    assert.equal(planRequest(sd, fp32(2048), 1, 64 * GiB), null);
  });
});

describe("budget", () => {
  it("lets requests run together while they fit and makes the next wait, first come first served", async () => {
    const budget = new MemoryBudget(100);
    const order: string[] = [];
    const a = await budget.acquire(60);
    const b = budget.acquire(60).then((r) => (order.push("b"), r));
    const c = budget.acquire(10).then((r) => (order.push("c"), r)); // fits now, but b came first
    await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(order, []);
    assert.equal(budget.inUse, 60);
    a();
    a(); // a second release counts once
    const [rb, rc] = await Promise.all([b, c]);
    assert.deepEqual(order, ["b", "c"]);
    assert.equal(budget.inUse, 70);
    rb();
    rc();
    assert.equal(budget.inUse, 0);
  });

  it("gives back a cancelled waiter's share at once", async () => {
    const budget = new MemoryBudget(100);
    const a = await budget.acquire(80);
    let gone = false;
    const b = budget.acquire(50, () => gone);
    gone = true;
    a();
    await assert.rejects(b, /cancelled/);
    assert.equal(budget.inUse, 0);
  });

  it("refuses more than the whole budget", async () => {
    await assert.rejects(new MemoryBudget(100).acquire(101), RangeError);
  });
});
