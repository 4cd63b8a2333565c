// A minimal safetensors reader: an 8-byte little-endian header length, a JSON header
// ({name: {dtype, shape, data_offsets}} plus optional "__metadata__" of strings), then
// the raw little-endian tensor bytes. Tensors come back as float32, whatever they were stored as.
// Every field of the header is checked before anything is allocated for it; errors never quote the
// file's bytes (only tensor names, shortened, and the format's own words).
import { open } from "node:fs/promises";

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

/** Largest JSON header read (a LoRA with 10 000 tensors has about 1.5 MB). */
export const MAX_HEADER_BYTES = 16 * 1024 * 1024;
const MAX_DIMS = 8;
const ELEMENT_BYTES: Record<string, number> = { F32: 4, F64: 8, F16: 2, BF16: 2 };

/** A file that is not a well-formed safetensors file of float tensors. */
export class SafetensorsError extends Error {}

/** A file whose size, or size once decoded to float32, is over the caller's limit. */
export class SafetensorsTooLarge extends Error {
  constructor(
    readonly bytes: number,
    readonly limit: number,
  ) {
    super(`needs ${bytes} bytes, over the limit of ${limit}`);
  }
}

/** A tensor name as errors show it: quoted, at most 120 characters. */
export const shownName = (name: string) => JSON.stringify(name.length > 120 ? name.slice(0, 120) + "…" : name);

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
      throw new SafetensorsError(`tensor ${shownName(name)}: unsupported dtype`);
  }
}

/** One header entry checked: dtype, shape and offsets that agree with each other and with the file. */
function checkEntry(name: string, value: unknown, dataBytes: number): HeaderEntry {
  const bad = (what: string) => new SafetensorsError(`tensor ${shownName(name)}: ${what}`);
  if (!value || typeof value !== "object" || Array.isArray(value)) throw bad("its header entry is not an object");
  const { dtype, shape, data_offsets: offsets } = value as Record<string, unknown>;
  if (typeof dtype !== "string" || !(dtype in ELEMENT_BYTES)) {
    const shown = typeof dtype === "string" && /^[A-Za-z0-9_]{1,16}$/.test(dtype) ? ` ${dtype}` : "";
    throw bad(`dtype${shown} is not supported (F32, F64, F16 and BF16 are read)`);
  }
  if (!Array.isArray(shape) || shape.length > MAX_DIMS || !shape.every((d) => Number.isSafeInteger(d) && d >= 0))
    throw bad(`shape must be a list of at most ${MAX_DIMS} non-negative integers`);
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0))
    throw bad("data_offsets must be two non-negative integers");
  const [begin, end] = offsets as [number, number];
  if (end < begin || end > dataBytes) throw bad("its data lies outside the file");
  // The element count, compared with the bytes it would need; stopping early keeps it finite.
  let count = 1;
  for (const d of shape as number[]) {
    count *= d;
    if (count * ELEMENT_BYTES[dtype] > dataBytes) throw bad("its shape needs more bytes than the file holds");
  }
  if (count * ELEMENT_BYTES[dtype] !== end - begin) throw bad("its shape does not match its data_offsets");
  return { dtype, shape: shape as number[], data_offsets: [begin, end] };
}

/**
 * Reads every tensor of a safetensors file as float32. Throws SafetensorsError on a malformed file,
 * and SafetensorsTooLarge when the file, or its tensors as float32, take more than `maxBytes`.
 */
export async function readSafetensors(file: string, maxBytes = Number.MAX_SAFE_INTEGER): Promise<SafetensorsFile> {
  const fh = await open(file, "r");
  try {
    const { size } = await fh.stat();
    if (size > maxBytes) throw new SafetensorsTooLarge(size, maxBytes);
    const notSafetensors = (why: string) => new SafetensorsError(`is not a safetensors file (${why})`);
    if (size < 8) throw notSafetensors("shorter than 8 bytes");
    const prefix = Buffer.alloc(8);
    await fh.read(prefix, 0, 8, 0);
    const headerLen = prefix.readBigUInt64LE(0);
    if (headerLen > BigInt(Math.min(MAX_HEADER_BYTES, size - 8)))
      throw notSafetensors(`its first 8 bytes do not give a header length of at most ${MAX_HEADER_BYTES} bytes within the file`);
    const buf = await fh.readFile();
    const dataStart = 8 + Number(headerLen);
    if (buf.length < dataStart) throw notSafetensors("it changed while being read");
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(buf.subarray(8, dataStart)));
    } catch {
      throw notSafetensors("its header is not UTF-8 JSON");
    }
    if (!header || typeof header !== "object" || Array.isArray(header)) throw notSafetensors("its header is not a JSON object");
    const entries: [string, HeaderEntry][] = [];
    let metadata: Record<string, string> = {};
    let decodedBytes = 0;
    for (const [name, value] of Object.entries(header)) {
      if (name === "__metadata__") {
        if (value && typeof value === "object" && !Array.isArray(value))
          metadata = Object.fromEntries(Object.entries(value).filter(([, v]) => typeof v === "string")) as Record<string, string>;
        continue;
      }
      const e = checkEntry(name, value, buf.length - dataStart);
      decodedBytes += ((e.data_offsets[1] - e.data_offsets[0]) / ELEMENT_BYTES[e.dtype]) * 4;
      entries.push([name, e]);
    }
    if (decodedBytes > maxBytes) throw new SafetensorsTooLarge(decodedBytes, maxBytes);
    const tensors = new Map<string, Tensor>();
    for (const [name, e] of entries) {
      const [begin, end] = e.data_offsets;
      tensors.set(name, { shape: e.shape, data: decode(e.dtype, buf.subarray(dataStart + begin, dataStart + end), name) });
    }
    return { tensors, metadata };
  } finally {
    await fh.close();
  }
}
