// Seeded latent noise (server/src/infer/rng.ts) against fixtures/make_fixtures.py's Python implementation
// of the generator it documents, written from the published reference code (splitmix64.c seeding
// xoshiro128starstar.c, 53-bit doubles, Box–Muller) with Python's integers and math library: the same seed
// must give the same numbers on every server. Tolerance: 1e-6 relative + 1e-7 absolute (float32 values; the
// two math libraries' log/cos/sin may differ in the last bit of a double).
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { gaussian, initialLatents } from "@loraforge/server/infer/rng";
import { assertClose, loadFixture } from "./helpers.js";

interface Fixture {
  gaussian: { seed: number; count: number; values: number[] }[];
  latents: { seed: number; n: number; c: number; h: number; w: number; values: number[] };
}
const fx = loadFixture<Fixture>("rng.json");
const TOL = { rel: 1e-6, abs: 1e-7 };

describe("gaussian(seed, count) equals the reference generator", () => {
  for (const g of fx.gaussian) {
    it(`seed ${g.seed}`, () => {
      assertClose(gaussian(g.seed, g.count), g.values, TOL, `seed ${g.seed}`);
      // A shorter draw is a prefix of a longer one (an odd count keeps the pair's first value).
      assertClose(gaussian(g.seed, 5), g.values.slice(0, 5), TOL, `seed ${g.seed}, 5 values`);
    });
  }
});

describe("initialLatents", () => {
  it("image i of a batch uses seed + i, laid out [n, c, h, w]", () => {
    const l = fx.latents;
    assertClose(initialLatents(l.seed, l.n, l.c, l.h, l.w), l.values, TOL, "latents");
  });

  it("the same seed gives the same bits twice; another seed other numbers", () => {
    const a = initialLatents(1234, 2, 4, 8, 8);
    assert.deepEqual(initialLatents(1234, 2, 4, 8, 8), a);
    const b = initialLatents(1235, 2, 4, 8, 8);
    assert.notDeepEqual(b, a);
    // …and image 1 of seed 1234 is image 0 of seed 1235.
    assert.deepEqual(b.subarray(0, 256), a.subarray(256));
  });

  it("looks like unit Gaussian noise (100 000 draws: mean, variance, tails)", () => {
    const x = gaussian(99, 100_000);
    const n = x.length;
    const mean = x.reduce((s, v) => s + v, 0) / n;
    const variance = x.reduce((s, v) => s + (v - mean) ** 2, 0) / n;
    const beyond2 = x.filter((v) => Math.abs(v) > 2).length / n;
    // Standard errors: mean 0.0032, variance 0.0045, P(|x| > 2) = 0.0455 ± 0.0007; bounds at ~5 of them.
    assert.ok(Math.abs(mean) < 0.016, `mean ${mean}`);
    assert.ok(Math.abs(variance - 1) < 0.023, `variance ${variance}`);
    assert.ok(Math.abs(beyond2 - 0.0455) < 0.0035, `P(|x| > 2) ${beyond2}`);
  });
});
