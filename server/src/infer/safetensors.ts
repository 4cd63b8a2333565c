// A minimal safetensors reader: an 8-byte little-endian header length, a JSON header
// ({name: {dtype, shape, data_offsets}} plus optional "__metadata__" of strings), then
// the raw little-endian tensor bytes. Tensors come back as float32, whatever they were stored as.
import { readFile } from "node:fs/promises";

export interface Tensor {
  shape: number[];
  data: Float32Array;
}

export interface SafetensorsFile {
  tensors: Map<string, Tensor>;
  metadata: Record<string, string>;
}

interface HeaderEntry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

const MAX_HEADER_BYTES = 100 * 1024 * 1024;

/** fp16 bits → number (IEEE 754 binary16). */
function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

function decode(dtype: string, bytes: Buffer, name: string): Float32Array {
  const n = (bytesPer: number) => bytes.length / bytesPer;
  const out = (count: number) => new Float32Array(count);
  switch (dtype) {
    case "F32": {
      const o = out(n(4));
      for (let i = 0; i < o.length; i++) o[i] = bytes.readFloatLE(i * 4);
      return o;
    }
    case "F64": {
      const o = out(n(8));
      for (let i = 0; i < o.length; i++) o[i] = bytes.readDoubleLE(i * 8);
      return o;
    }
    case "F16": {
      const o = out(n(2));
      for (let i = 0; i < o.length; i++) o[i] = halfToFloat(bytes.readUInt16LE(i * 2));
      return o;
    }
    case "BF16": {
      const o = out(n(2));
      const u = new Uint32Array(o.buffer);
      for (let i = 0; i < o.length; i++) u[i] = bytes.readUInt16LE(i * 2) << 16;
      return o;
    }
    default:
      throw new Error(`tensor ${name}: unsupported dtype ${dtype} (float32, float64, float16 and bfloat16 are read)`);
  }
}

/** Reads every tensor of a safetensors file as float32. Throws a readable Error on a malformed file. */
export async function readSafetensors(file: string): Promise<SafetensorsFile> {
  const buf = await readFile(file);
  if (buf.length < 8) throw new Error(`${file} is not a safetensors file (too short)`);
  const headerLen = Number(buf.readBigUInt64LE(0));
  if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > buf.length)
    throw new Error(`${file} is not a safetensors file (header length ${headerLen})`);
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(buf.subarray(8, 8 + headerLen).toString("utf8"));
  } catch {
    throw new Error(`${file} is not a safetensors file (header is not JSON)`);
  }
  const dataStart = 8 + headerLen;
  const tensors = new Map<string, Tensor>();
  let metadata: Record<string, string> = {};
  for (const [name, value] of Object.entries(header)) {
    if (name === "__metadata__") {
      metadata = (value ?? {}) as Record<string, string>;
      continue;
    }
    const e = value as HeaderEntry;
    const [begin, end] = e.data_offsets;
    if (!(begin >= 0 && end >= begin && dataStart + end <= buf.length))
      throw new Error(`${file}: tensor ${name} lies outside the file`);
    const data = decode(e.dtype, buf.subarray(dataStart + begin, dataStart + end), name);
    const count = e.shape.reduce((a, b) => a * b, 1);
    if (data.length !== count) throw new Error(`${file}: tensor ${name} has ${data.length} values for shape [${e.shape}]`);
    tensors.set(name, { shape: e.shape, data });
  }
  return { tensors, metadata };
}
