// Seeded initial latent noise. The generator is ours (splitmix64 → xoshiro128**, Box–Muller),
// not torch's: the same seed gives the same latents on every loraforge server, but not the
// latents diffusers would draw for that seed. Parity tests therefore pass these latents to
// diffusers explicitly.

/** splitmix64 on BigInt: turns one 64-bit seed into well-mixed 32-bit state words. */
function splitmix(seed: bigint): () => number {
  let s = BigInt.asUintN(64, seed);
  return () => {
    s = BigInt.asUintN(64, s + 0x9e3779b97f4a7c15n);
    let z = s;
    z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
    z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
    z = z ^ (z >> 31n);
    return Number(z & 0xffffffffn);
  };
}

/** Uniform doubles in (0, 1) from xoshiro128**. */
function uniform(seed: number): () => number {
  const mix = splitmix(BigInt(seed));
  const s = new Uint32Array([mix(), mix(), mix(), mix()]);
  const rotl = (x: number, k: number) => ((x << k) | (x >>> (32 - k))) >>> 0;
  const next = () => {
    const result = Math.imul(rotl(Math.imul(s[1], 5) >>> 0, 7), 9) >>> 0;
    const t = (s[1] << 9) >>> 0;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  };
  // 53 random bits, shifted off zero.
  return () => ((next() >>> 5) * 67108864 + (next() >>> 6) + 0.5) / 9007199254740992;
}

/** `count` standard normal float32 values for `seed` (an integer; negative ones allowed). */
export function gaussian(seed: number, count: number): Float32Array {
  const u = uniform(seed);
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const r = Math.sqrt(-2 * Math.log(u()));
    const theta = 2 * Math.PI * u();
    out[i] = r * Math.cos(theta);
    if (i + 1 < count) out[i + 1] = r * Math.sin(theta);
  }
  return out;
}

/** Initial latents [n, channels, h, w] (unscaled unit Gaussian): image i uses seed + i. */
export function initialLatents(seed: number, n: number, channels: number, h: number, w: number): Float32Array {
  const per = channels * h * w;
  const out = new Float32Array(n * per);
  for (let i = 0; i < n; i++) out.set(gaussian(seed + i, per), i * per);
  return out;
}
