// The fast paths of Infer's LoRA handling (server/src/infer/safetensors.ts, lora.ts): safetensors tensors read
// as views or converted in one pass must hold the values the format defines, and the session inputs a
// LoraCache keeps per combination of files and scales must be exactly what concatenating the LoRAs gives,
// rebuilt when a scale or the file's content changes, and dropped within the cache's byte budget.
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { fromHalf } from "@loraforge/server/infer/half";
import { LoraCache, SlotIndex, slotFeeds, type SlotInfo } from "@loraforge/server/infer/lora";
import { readSafetensors } from "@loraforge/server/infer/safetensors";
import { assertClose } from "./helpers.js";

const tmp = () => mkdtempSync(path.join(os.tmpdir(), "lora-cache-"));

/** A safetensors file of the given tensors (raw little-endian bytes each), its header padded to `pad` bytes past a multiple of 8. */
function writeSafetensors(file: string, tensors: [string, string, number[], Buffer][], pad = 0): void {
  const header: Record<string, unknown> = {};
  let off = 0;
  for (const [name, dtype, shape, bytes] of tensors) {
    header[name] = { dtype, shape, data_offsets: [off, off + bytes.length] };
    off += bytes.length;
  }
  let json = JSON.stringify(header);
  while ((8 + json.length) % 8 !== pad) json += " ";
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, Buffer.from(json), ...tensors.map((t) => t[3])]));
}

const f32Bytes = (v: ArrayLike<number>) => Buffer.from(new Float32Array(v).buffer);

describe("safetensors tensors as float32", () => {
  it("reads F32 the same whether its data is aligned (a view) or not (a copy)", async () => {
    const dir = tmp();
    const values = Array.from({ length: 37 }, (_, i) => Math.fround(Math.sin(i) * 1e3));
    for (const pad of [0, 1, 2, 3, 5]) {
      const file = path.join(dir, `f32-${pad}.safetensors`);
      writeSafetensors(file, [["x", "F32", [37], f32Bytes(values)], ["y", "F32", [2], f32Bytes([1.5, -2])]], pad);
      const { tensors } = await readSafetensors(file);
      assert.deepEqual([...tensors.get("x")!.data], values, `header padded by ${pad}`);
      assert.deepEqual([...tensors.get("y")!.data], [1.5, -2]);
    }
  });

  it("converts every F16 bit pattern as IEEE 754 binary16 defines it, aligned or not", async () => {
    const dir = tmp();
    const all = new Uint16Array(65536).map((_, i) => i);
    for (const pad of [0, 1]) {
      const file = path.join(dir, `f16-${pad}.safetensors`);
      writeSafetensors(file, [["h", "F16", [65536], Buffer.from(all.buffer)]], pad);
      const got = (await readSafetensors(file)).tensors.get("h")!.data;
      // Known values first (1, -2, the largest normal, the smallest subnormal and normal, ±inf, NaN, 1/3 rounded).
      const known: [number, number][] = [
        [0x3c00, 1], [0xc000, -2], [0x7bff, 65504], [0x0001, 2 ** -24], [0x0400, 2 ** -14],
        [0x7c00, Infinity], [0xfc00, -Infinity], [0x3555, 0.333251953125], [0x8000, -0],
      ];
      for (const [h, v] of known) assert.ok(Object.is(got[h], v), `0x${h.toString(16)}: ${got[h]}, expected ${v}`);
      assert.ok(Number.isNaN(got[0x7e00]));
      // Then every pattern against half.ts's separate decoder.
      for (let h = 0; h < 65536; h++) {
        const e = fromHalf(h);
        if (!(Object.is(got[h], e) || (Number.isNaN(e) && Number.isNaN(got[h])))) assert.fail(`0x${h.toString(16)}: ${got[h]}, expected ${e}`);
      }
    }
  });

  it("reads files of several MiB whole, whether read in parts at once or in one part", async () => {
    // 9 MiB is read in two parts where two cores are available (the first on this thread); 40 MiB, past the
    // synchronous limit, in up to one part per core on the thread pool. Every value is its own index, so a
    // part read to the wrong offset, or not at all, shows.
    const dir = tmp();
    for (const mib of [9, 40]) {
      const n = (mib * 2 ** 20) / 4 - 64;
      const values = new Float32Array(n).map((_, i) => i);
      const file = path.join(dir, `big-${mib}.safetensors`);
      writeSafetensors(file, [["head", "F32", [3], f32Bytes([7, 8, 9])], ["big", "F32", [n], Buffer.from(values.buffer)]]);
      const got = (await readSafetensors(file)).tensors;
      assert.deepEqual([...got.get("head")!.data], [7, 8, 9]);
      const big = got.get("big")!.data;
      assert.equal(big.length, n);
      for (let i = 0; i < n; i++) if (big[i] !== i) assert.fail(`${mib} MiB: value ${i} is ${big[i]}`);
    }
  });

  it("converts BF16 and F64", async () => {
    const file = path.join(tmp(), "mixed.safetensors");
    const bf = Buffer.alloc(6);
    [0x3f80, 0xc000, 0x4049].forEach((v, i) => bf.writeUInt16LE(v, 2 * i));
    writeSafetensors(file, [["b", "BF16", [3], bf], ["d", "F64", [2], Buffer.from(new Float64Array([0.1, -3]).buffer)]], 3);
    const { tensors } = await readSafetensors(file);
    assert.deepEqual([...tensors.get("b")!.data], [1, -2, 3.140625]);
    assert.deepEqual([...tensors.get("d")!.data], [Math.fround(0.1), -3]);
  });
});

// Three slots of a model (two UNet, one text encoder), and LoRA files in diffusers' key form for them.
const SLOTS: SlotInfo[] = [
  ["unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 64, 48],
  ["unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 64, 40],
  ["text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 32, 32],
].map(([component, module, inF, outF], i) => ({
  component: component as SlotInfo["component"],
  module: module as string,
  diffusers_key: `${component}.${module}`,
  kohya_key: "",
  in_features: inF as number,
  out_features: outF as number,
  input_a: `lora_${i}_a`,
  input_b: `lora_${i}_b`,
}));
const index = new SlotIndex(SLOTS);

/** A LoRA file of rank `r` on the slots `on` (indices), values from `seed`; F32, or F16 with `half`. */
function loraFile(file: string, r: number, seed: number, on: number[]): void {
  const tensors: [string, string, number[], Buffer][] = [];
  for (const i of on) {
    const s = SLOTS[i];
    const stem = s.component === "unet" ? `unet.${s.module}` : `text_encoder.${s.module.replace(/^text_model\./, "")}`;
    const fill = (n: number, k: number) => f32Bytes(Array.from({ length: n }, (_, j) => Math.fround(((seed * 31 + k * 17 + j * 7) % 23) / 10 - 1)));
    tensors.push([`${stem}.lora.down.weight`, "F32", [r, s.in_features], fill(r * s.in_features, i)]);
    tensors.push([`${stem}.lora.up.weight`, "F32", [s.out_features, r], fill(s.out_features * r, i + 100)]);
  }
  writeSafetensors(file, tensors);
}

/**
 * The inputs a request with these LoRAs must feed, written out from the definition: per slot, A's rows
 * stacked along r, B's columns side by side along r, each times its scale (alpha = rank, so no other scale).
 */
async function expectedFeeds(files: [string, number][], component: SlotInfo["component"]) {
  const parsed = await Promise.all(files.map(async ([f, scale]) => ({ t: (await readSafetensors(f)).tensors, scale })));
  const out: Record<string, { data: number[]; dims: number[] }> = {};
  for (const s of SLOTS) {
    if (s.component !== component) continue;
    const stem = s.component === "unet" ? `unet.${s.module}` : `text_encoder.${s.module.replace(/^text_model\./, "")}`;
    const parts = parsed.filter((p) => p.scale !== 0 && p.t.has(`${stem}.lora.down.weight`));
    const ranks = parts.map((p) => p.t.get(`${stem}.lora.down.weight`)!.shape[0]);
    const total = ranks.reduce((a, b) => a + b, 0);
    const a: number[] = parts.flatMap((p) => [...p.t.get(`${stem}.lora.down.weight`)!.data]);
    const b: number[] = [];
    for (let o = 0; o < s.out_features; o++)
      parts.forEach((p, k) => {
        const up = p.t.get(`${stem}.lora.up.weight`)!.data;
        for (let j = 0; j < ranks[k]; j++) b.push(Math.fround(up[o * ranks[k] + j] * p.scale));
      });
    out[s.input_a] = { data: a, dims: [total, s.in_features] };
    out[s.input_b] = { data: b, dims: [s.out_features, total] };
  }
  return out;
}

describe("LoRA combinations: session inputs built once, keyed on files and scales", () => {
  const dir = tmp();
  const A = path.join(dir, "a.safetensors");
  const B = path.join(dir, "b.safetensors");
  loraFile(A, 2, 1, [0, 1, 2]);
  loraFile(B, 3, 2, [0]); // on one UNet slot only

  const combos: [string, [string, number][]][] = [
    ["A", [[A, 1]]],
    ["A at 0.5", [[A, 0.5]]],
    ["A 0.7 + B 1.3", [[A, 0.7], [B, 1.3]]],
    ["B 1.3 + A 0.7 (order kept)", [[B, 1.3], [A, 0.7]]],
    ["A 0 + B (a zero scale adds nothing)", [[A, 0], [B, 1]]],
    ["B, then B again at -1", [[B, 1], [B, -1]]],
  ];
  for (const [name, files] of combos)
    it(`${name}: the inputs the definition gives, float32 and float16`, async () => {
      const cache = new LoraCache();
      const combo = cache.combination("m", index, await Promise.all(files.map(async ([f, scale]) => ({ file: await cache.file(f), scale }))));
      for (const component of ["unet", "text_encoder"] as const) {
        const want = await expectedFeeds(files, component);
        const got = combo.feeds(component);
        assert.deepEqual(Object.keys(got).sort(), Object.keys(want).sort());
        for (const [k, w] of Object.entries(want)) {
          assert.deepEqual(got[k].dims, w.dims, `${component} ${k} dims`);
          assertClose(got[k].data as Float32Array, w.data, { rel: 0, abs: 0 }, `${component} ${k}`);
        }
        const half = combo.feeds(component, "float16");
        for (const [k, w] of Object.entries(want)) {
          assert.equal(half[k].type, "float16");
          assertClose([...(half[k].data as Uint16Array)].map(fromHalf), w.data, { rel: 2 ** -11, abs: 2 ** -24 }, `${component} ${k} as float16`);
        }
        // The same as building them afresh for this request (the path without the cache).
        const mapped = [];
        for (const [f, scale] of files) if (scale !== 0) mapped.push({ lora: cache.map(await cache.file(f), "m", index), scale });
        const fresh = slotFeeds(index, component, mapped);
        for (const k of Object.keys(fresh)) assert.deepEqual([...(got[k].data as Float32Array)], [...(fresh[k].data as Float32Array)], k);
      }
    });

  it("returns the same combination and the same tensors for the same files and scales, a new one when a scale differs", async () => {
    const cache = new LoraCache();
    const items = async (sa: number, sb: number) => [
      { file: await cache.file(A), scale: sa },
      { file: await cache.file(B), scale: sb },
    ];
    const c1 = cache.combination("m", index, await items(0.7, 1.3));
    const u1 = c1.feeds("unet");
    const c2 = cache.combination("m", index, await items(0.7, 1.3));
    assert.equal(c2, c1);
    assert.equal(c2.feeds("unet"), u1, "the built inputs are reused, not rebuilt");
    const c3 = cache.combination("m", index, await items(0.7, 1.4));
    assert.notEqual(c3, c1);
    assert.notDeepEqual([...(c3.feeds("unet").lora_0_b.data as Float32Array)], [...(u1.lora_0_b.data as Float32Array)]);
    const other = cache.combination("other-model", index, await items(0.7, 1.3));
    assert.notEqual(other, c1, "another model's combination is its own");
    assert.equal(cache.comboCount, 3);
  });

  it("rebuilds a combination when its file's content changes (same size, same path)", async () => {
    const d = tmp();
    const f = path.join(d, "x.safetensors");
    loraFile(f, 2, 5, [0]);
    const cache = new LoraCache();
    const before = cache.combination("m", index, [{ file: await cache.file(f), scale: 1 }]).feeds("unet");
    assertClose(before.lora_0_a.data as Float32Array, (await expectedFeeds([[f, 1]], "unet")).lora_0_a.data, { rel: 0, abs: 0 }, "A before");
    loraFile(f, 2, 6, [0]); // other values, same shapes and size
    const after = cache.combination("m", index, [{ file: await cache.file(f), scale: 1 }]).feeds("unet");
    const want = await expectedFeeds([[f, 1]], "unet");
    assertClose(after.lora_0_a.data as Float32Array, want.lora_0_a.data, { rel: 0, abs: 0 }, "A after the rewrite");
    assertClose(after.lora_0_b.data as Float32Array, want.lora_0_b.data, { rel: 0, abs: 0 }, "B after the rewrite");
    assert.notDeepEqual([...(after.lora_0_a.data as Float32Array)], [...(before.lora_0_a.data as Float32Array)]);
    assert.equal(cache.size, 1, "the old parse is gone");
    assert.equal(cache.comboCount, 1, "and the combination built from it");
  });

  it("accounts the combinations' copies in its bytes and evicts the least recently used within its budget", async () => {
    const probe = new LoraCache();
    const fa = await probe.file(A);
    const fb = await probe.file(B);
    const fileBytes = fa.bytes + fb.bytes;
    // A alone at scale 1 reuses A's arrays: no bytes beyond the file's.
    probe.combination("m", index, [{ file: fa, scale: 1 }]).feeds("unet");
    probe.combination("m", index, [{ file: fb, scale: 1 }]).feeds("unet");
    assert.equal(probe.bytes, fileBytes);
    // A mix copies: slot 0 holds rank 5 (A and B stacked), slot 1 A's rank 2 scaled.
    const mix = probe.combination("m", index, [{ file: fa, scale: 0.7 }, { file: fb, scale: 1.3 }]);
    mix.feeds("unet");
    const [s0, s1w] = SLOTS;
    // slot 0: A and B of rank 5 (2 + 3); slot 1: only A's B, scaled (its A is A's own array)
    const copies = (5 * s0.in_features + s0.out_features * 5) * 4 + s1w.out_features * 2 * 4;
    assert.equal(mix.bytes, copies);
    assert.equal(probe.bytes, fileBytes + copies);

    // A budget for the files and one mix: the second mix pushes the older one out, not a file.
    const cache = new LoraCache(fileBytes + copies + 8);
    const f1 = await cache.file(A);
    const f2 = await cache.file(B);
    const m1 = cache.combination("m", index, [{ file: f1, scale: 0.7 }, { file: f2, scale: 1.3 }]);
    m1.feeds("unet");
    assert.equal(cache.comboCount, 1);
    const m2 = cache.combination("m", index, [{ file: f1, scale: 0.5 }, { file: f2, scale: 2 }]);
    m2.feeds("unet");
    assert.ok(cache.bytes <= cache.maxBytes, `${cache.bytes} > ${cache.maxBytes}`);
    assert.equal(cache.size, 2, "both files stay");
    assert.equal(cache.comboCount, 1);
    assert.notEqual(cache.combination("m", index, [{ file: f1, scale: 0.7 }, { file: f2, scale: 1.3 }]), m1, "the evicted mix is built anew");
    // Files go too when they are the least recently used, and take their combinations with them.
    const small = new LoraCache(fileBytes + 16);
    const s1 = await small.file(A);
    const s2 = await small.file(B);
    small.combination("m", index, [{ file: s1, scale: 1 }]);
    small.combination("m", index, [{ file: s2, scale: 1 }]);
    const C = path.join(dir, "c.safetensors");
    loraFile(C, 1, 3, [2]); // 32 bytes: over the budget's slack, so something must go
    small.combination("m", index, [{ file: await small.file(C), scale: 1 }]);
    assert.ok(small.bytes <= small.maxBytes, `${small.bytes} > ${small.maxBytes}`);
    assert.equal(small.size, 2, "A, the least recently used file, made room");
    assert.notEqual((await small.file(A)).id, s1.id, "A is parsed again");
    assert.equal((await small.file(B)).id, s2.id, "B stayed");
    assert.equal(small.comboCount, 2, "A's combination went with it");
  });
});
