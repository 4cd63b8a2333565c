// Float tensors for graphs exported in half precision (fp16 exports for the CUDA execution
// provider): float32 ↔ IEEE 754 binary16 (round to nearest, ties to even), since Node 20 has no
// Float16Array and onnxruntime-node takes float16 tensors as Uint16Array bits.
import ort from "onnxruntime-node";

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
export function toHalf(v: number): number {
  f32[0] = v;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf, NaN
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow → inf
  if (e <= 0) {
    if (e < -10) return sign; // underflow → ±0
    mant |= 0x800000;
    const shift = 14 - e;
    let h = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rest > half || (rest === half && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && h & 1)) h++; // may carry into the exponent: still correct
  return sign | h;
}
export function fromHalf(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 0x1f) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

// fp16 bits → float32 for all 65 536 bit patterns (fromHalf of each), built on first use (256 KiB):
// one table lookup per element wherever half-precision data is read.
let halfTable: Float32Array | null = null;

/** Half-precision bits as float32 values. */
export function halfsToFloats(h: Uint16Array): Float32Array {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) halfTable[i] = fromHalf(i);
  }
  const out = new Float32Array(h.length);
  for (let i = 0; i < h.length; i++) out[i] = halfTable[h[i]];
  return out;
}

/** A float tensor in the element type the graph takes (`float16` for fp16 exports). */
export function floatTensor(data: Float32Array, dims: number[], dtype: "float32" | "float16" = "float32"): ort.Tensor {
  if (dtype === "float32") return new ort.Tensor("float32", data, dims);
  const h = new Uint16Array(data.length);
  for (let i = 0; i < data.length; i++) h[i] = toHalf(data[i]);
  return new ort.Tensor("float16", h, dims);
}

/** A graph's float output as float32. */
export function floatData(t: ort.Tensor): Float32Array {
  if (t.type === "float32") return t.data as Float32Array;
  return halfsToFloats(t.data as Uint16Array);
}

