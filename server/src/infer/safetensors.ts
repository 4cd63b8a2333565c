// A minimal safetensors reader: an 8-byte little-endian header length, a JSON header
// ({name: {dtype, shape, data_offsets}} plus optional "__metadata__" of strings), then
// the raw little-endian tensor bytes. Tensors come back as float32, whatever they were stored as:
// F32 ones as views of the file's bytes (no copy), the others converted in one pass each.
// Every field of the header is checked before anything is allocated for it; errors never quote the
// file's bytes (only tensor names, shortened, and the format's own words).
import { closeSync, fstatSync, openSync, read, readlinkSync, readSync, realpathSync } from "node:fs";
import { availableParallelism } from "node:os";
import { promisify } from "node:util";
import { halfsToFloats } from "./half.js";

const readAsync = promisify(read);

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
/** Files up to this size have their first part read on the calling thread (see readInto). */
const SYNC_READ_BYTES = 32 * 1024 * 1024;
/** The smallest part of a file one thread reads when a read is split across threads. */
const MIN_PART_BYTES = 4 * 1024 * 1024;
const ELEMENT_BYTES: Record<string, number> = { F32: 4, F64: 8, F16: 2, BF16: 2 };

/** A file that is not a well-formed safetensors file of float tensors. */
export class SafetensorsError extends Error {}

/** The file opened is not where the caller allows (a path was changed into a link after it was checked). */
export class OutsideRoots extends Error {}

/** The real path of open file `fd` (Linux: /proc/self/fd); elsewhere the real path of `file` now. */
function openedPath(fd: number, file: string): string {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return realpathSync(file);
  }
}

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

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * `bytes` as a typed array of `Type`: a view of the same memory when it is aligned for it (no copy),
 * else a copy into fresh, aligned memory. The data is little-endian, as the host's must be.
 */
function view<T>(bytes: Buffer, size: number, Type: new (buf: ArrayBufferLike, offset: number, length: number) => T): T {
  if (bytes.byteOffset % size === 0) return new Type(bytes.buffer, bytes.byteOffset, bytes.length / size);
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  return new Type(copy.buffer, 0, bytes.length / size);
}

/**
 * A tensor's bytes as float32. F32 data is a view of the file's buffer where aligned (safetensors
 * pads its header to 8 bytes, so it usually is); F16, BF16 and F64 are converted in one pass.
 */
function decode(dtype: string, bytes: Buffer, name: string): Float32Array {
  if (!LITTLE_ENDIAN) throw new SafetensorsError("safetensors data is little-endian; this host is not");
  switch (dtype) {
    case "F32":
      return view(bytes, 4, Float32Array);
    case "F64":
      return Float32Array.from(view(bytes, 8, Float64Array));
    case "F16":
      return halfsToFloats(view(bytes, 2, Uint16Array));
    case "BF16": {
      // bf16 is the top half of a float32: shift the bits into place.
      const h = view(bytes, 2, Uint16Array);
      const o = new Float32Array(h.length);
      const u = new Uint32Array(o.buffer);
      for (let i = 0; i < h.length; i++) u[i] = h[i] << 16;
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

/** Reads `part` bytes of `fd` at `pos` into `buf` at the same offset, on this thread or the pool; false at end of file. */
async function readPart(fd: number, buf: Buffer, pos: number, part: number, sync: boolean): Promise<boolean> {
  for (let got = 0; got < part; ) {
    const at = pos + got;
    const n = sync ? readSync(fd, buf, at, part - got, at) : (await readAsync(fd, buf, at, part - got, at)).bytesRead;
    if (n === 0) return false;
    got += n;
  }
  return true;
}

/**
 * Fills `buf` from the start of `fd`; false if the file ended first. Copying a file out of the page cache is
 * bound by one core's memory copy (17 MiB: ~3.4 ms on the development VM), so a file of at least two
 * MIN_PART_BYTES parts is read as up to one part per core at once, each by libuv's thread pool. For files up to
 * SYNC_READ_BYTES the first part is read on this thread while the pool reads the rest (a trip through the pool
 * costs more than blocking the event loop for a part of a few MiB); larger files leave the event loop free.
 */
async function readInto(fd: number, buf: Buffer): Promise<boolean> {
  const size = buf.length;
  const parts = Math.max(1, Math.min(availableParallelism(), Math.floor(size / MIN_PART_BYTES)));
  const step = Math.ceil(size / parts);
  const sync = size <= SYNC_READ_BYTES;
  const pooled: Promise<boolean>[] = [];
  for (let p = sync ? 1 : 0; p < parts; p++) pooled.push(readPart(fd, buf, p * step, Math.min(step, size - p * step), false));
  // Every started read is settled before this returns or throws, so that none writes into the buffer later.
  const all = await Promise.allSettled([sync ? readPart(fd, buf, 0, Math.min(step, size), true) : Promise.resolve(true), ...pooled]);
  for (const r of all) if (r.status === "rejected") throw r.reason;
  return all.every((r) => r.status === "fulfilled" && r.value);
}

/**
 * Reads every tensor of a safetensors file as float32. Throws SafetensorsError on a malformed file,
 * and SafetensorsTooLarge when the file, or its tensors as float32, take more than `maxBytes`.
 */
export async function readSafetensors(file: string, maxBytes = Number.MAX_SAFE_INTEGER, confined?: (real: string) => boolean): Promise<SafetensorsFile> {
  const fd = openSync(file, "r");
  try {
    // Checked on what was opened, not on the name: a link swapped in after the caller's check is caught.
    if (confined && !confined(openedPath(fd, file))) throw new OutsideRoots();
    const { size } = fstatSync(fd);
    if (size > maxBytes) throw new SafetensorsTooLarge(size, maxBytes);
    const notSafetensors = (why: string) => new SafetensorsError(`is not a safetensors file (${why})`);
    if (size < 8) throw notSafetensors("shorter than 8 bytes");
    // The whole file in one unpooled buffer (offset 0), so that aligned F32 tensors can be views of it.
    const buf = Buffer.allocUnsafeSlow(size);
    if (!(await readInto(fd, buf))) throw notSafetensors("it changed while being read");
    const headerLen = buf.readBigUInt64LE(0);
    if (headerLen > BigInt(Math.min(MAX_HEADER_BYTES, size - 8)))
      throw notSafetensors(`its first 8 bytes do not give a header length of at most ${MAX_HEADER_BYTES} bytes within the file`);
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
    closeSync(fd);
  }
}
