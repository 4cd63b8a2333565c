// float32 ↔ float16 (server/src/infer/half.ts, for fp16 graphs) against numpy's float16, as stored by
// fixtures/make_fixtures.py: toHalf on edge values (zeros, the largest half and just past it, infinities,
// subnormals and their rounding ties, ties to even between normals, values that round up into the next
// binade), log-uniform values of both signs across the half range and any float32 bit patterns; fromHalf on
// a spread of half bit patterns. Exact: the bits must be numpy's.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { fromHalf, toHalf } from "@loraforge/server/infer/half";
import { loadFixture } from "./helpers.js";

interface Fixture {
  to_half: [number, number][];
  from_half: [number, number | "inf" | "-inf"][];
  nan_patterns: number[];
}
const fx = loadFixture<Fixture>("half.json");
const hex = (v: number, digits: number) => "0x" + v.toString(16).padStart(digits, "0");

describe("half precision equals numpy's float16", () => {
  it(`toHalf: ${fx.to_half.length} float32 values round to numpy's half bits`, () => {
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    const bad: string[] = [];
    for (const [bits, half] of fx.to_half) {
      u[0] = bits;
      const got = toHalf(f[0]);
      if (got !== half) bad.push(`${f[0]} (${hex(bits, 8)}): ${hex(got, 4)}, numpy ${hex(half, 4)}`);
    }
    assert.equal(bad.length, 0, bad.slice(0, 10).join("\n"));
  });

  it(`fromHalf: ${fx.from_half.length} half bit patterns give numpy's values`, () => {
    for (const [bits, stored] of fx.from_half) {
      const value = stored === "inf" ? Infinity : stored === "-inf" ? -Infinity : stored;
      assert.ok(Object.is(fromHalf(bits), value), `${hex(bits, 4)}: ${fromHalf(bits)}, numpy ${value}`);
    }
    for (const bits of fx.nan_patterns) assert.ok(Number.isNaN(fromHalf(bits)), `${hex(bits, 4)} is NaN`);
    assert.ok(Number.isNaN(fromHalf(toHalf(NaN))), "NaN stays NaN");
  });

  it("every half value survives fromHalf then toHalf unchanged (all 65 536 bit patterns but NaNs)", () => {
    for (let h = 0; h < 0x10000; h++) {
      const v = fromHalf(h);
      if (!Number.isNaN(v)) assert.equal(toHalf(v), h, hex(h, 4));
    }
  });
});
