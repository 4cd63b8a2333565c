// Data sets. Uploads: a client streams a set's files (or a zip of them); the server
// writes them into a private temporary folder under the dataset cache, checks every
// name, size, image and caption, stores the set in the object store (so that a worker
// on any host can fetch it) and only then moves the folder into place as this host's
// cached copy. Nothing is ever written outside the dataset cache.
import { randomBytes } from "node:crypto";
import { createWriteStream, existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, statSync, type WriteStream } from "node:fs";
import path from "node:path";
import { pipeline, Transform } from "node:stream";
import { status } from "@grpc/grpc-js";
import sharp from "sharp";
import yauzl from "yauzl";
import type { Dataset, UploadDatasetRequest } from "@loraforge/sdk/gen/loraforge/v1/dataset_service";
import { ApiError, datasetNotFound, datasetQuotaExceeded, type FieldViolation } from "../core/errors.js";
import { realPathIn } from "../core/paths.js";
import type { ArtifactStore } from "./artifacts.js";
import { touch } from "./disk.js";

/** Image types the engine reads (uploads take all but .bmp). */
export const IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"];

/** Limits of one upload. */
export interface DatasetLimits {
  /** Bytes of one file (a zip entry: its uncompressed bytes, counted as they are inflated). Default 32 MiB. */
  maxFileBytes: number;
  /**
   * Bytes of the whole set: the files sent, or a zip's compressed bytes and, separately, the
   * uncompressed bytes of its entries, counted as they are inflated. Default 2 GiB.
   */
  maxTotalBytes: number;
  /** Files in the set. Default 50 000. */
  maxFiles: number;
  /** Largest width or height of an image, read from its header before decoding. Default 8192. */
  maxImageSide: number;
  /**
   * Bytes of all stored sets together, uploads in progress on this server included (what they
   * have written so far, a zip and its extracted files both). Default 20 GiB.
   */
  maxStoredBytes: number;
}

export const DEFAULT_LIMITS: DatasetLimits = {
  maxFileBytes: 32 * 1024 * 1024,
  maxTotalBytes: 2 * 1024 * 1024 * 1024,
  maxFiles: 50_000,
  maxImageSide: 8192,
  maxStoredBytes: 20 * 1024 * 1024 * 1024,
};

/** Limits from LORAFORGE_UPLOAD_* environment variables, DEFAULT_LIMITS for unset ones. */
export function limitsFromEnv(env: NodeJS.ProcessEnv = process.env): DatasetLimits {
  const int = (name: string, d: number) => {
    const v = env[name];
    if (v === undefined || v === "") return d;
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n <= 0) throw new Error(`${name} must be a positive integer, got ${JSON.stringify(v)}`);
    return n;
  };
  const MiB = 1024 * 1024;
  return {
    maxFileBytes: int("LORAFORGE_UPLOAD_MAX_FILE_MB", DEFAULT_LIMITS.maxFileBytes / MiB) * MiB,
    maxTotalBytes: int("LORAFORGE_UPLOAD_MAX_MB", DEFAULT_LIMITS.maxTotalBytes / MiB) * MiB,
    maxFiles: int("LORAFORGE_UPLOAD_MAX_FILES", DEFAULT_LIMITS.maxFiles),
    maxImageSide: int("LORAFORGE_UPLOAD_MAX_IMAGE_SIDE", DEFAULT_LIMITS.maxImageSide),
    maxStoredBytes: int("LORAFORGE_DATASETS_MAX_MB", DEFAULT_LIMITS.maxStoredBytes / MiB) * MiB,
  };
}

/** What DatasetUpload ids look like ("ds-" + base-36 time + 12 hex digits); the contract's rule is ^ds-[a-z0-9]{1,64}$. */
export const DATASET_ID_PATTERN = /^ds-[0-9a-z]{1,64}$/;

/** What the object store holds about one stored set, written after its files: its presence means the set is whole. */
interface DatasetManifest {
  id: string;
  name: string;
  imageCount: number;
  files: { name: string; size: number }[];
  /** No image has a caption (absent in manifests from before uncaptioned sets were taken: captioned). */
  uncaptioned?: boolean;
}

/**
 * Uploaded sets: files in the object store under datasets/<id>/<file>, then datasets/<id>.json
 * listing them; each host keeps a copy in <cache>/<id> (the uploading server from the upload, a
 * worker once it first trains on the set).
 */
export class DatasetStore {
  constructor(
    private readonly objects: ArtifactStore,
    /** This host's copies: <stateDir>/datasets. */
    readonly cacheRoot: string,
  ) {}

  private static manifestName = (id: string) => `datasets/${id}.json`;

  /** Stores the checked set in `dir` under `id`; the manifest goes last. */
  async put(id: string, name: string, dir: string, imageCount: number, uncaptioned = false): Promise<void> {
    const files = readdirSync(dir).sort().map((f) => ({ name: f, size: statSync(path.join(dir, f)).size }));
    try {
      for (const f of files) await this.objects.putFile(`datasets/${id}/${f.name}`, path.join(dir, f.name));
      const manifest: DatasetManifest = { id, name, imageCount, files, ...(uncaptioned ? { uncaptioned } : {}) };
      await this.objects.os.putBlob({ name: DatasetStore.manifestName(id) }, new TextEncoder().encode(JSON.stringify(manifest)));
    } catch (err) {
      for (const f of files) await this.objects.os.delete(`datasets/${id}/${f.name}`).catch(() => undefined);
      throw err;
    }
  }

  /** Bytes uploads in progress on this server have written so far, by upload id. */
  private readonly inflight = new Map<string, number>();

  /** Bytes of every stored set's files in the object store (half-stored ones too). */
  async storedBytes(): Promise<number> {
    let total = 0;
    for (const info of await this.objects.os.list()) if (!info.deleted && info.name.startsWith("datasets/")) total += info.size;
    return total;
  }

  /**
   * Records that upload `id` now holds `bytes` on this host's disk, and refuses
   * (DATASET_QUOTA_EXCEEDED) when the stored sets (`stored`, read when the upload began) and every
   * upload in progress would pass `limit`.
   */
  charge(id: string, bytes: number, stored: number, limit: number): void {
    this.inflight.set(id, bytes);
    let inflight = 0;
    for (const b of this.inflight.values()) inflight += b;
    if (stored + inflight > limit) throw datasetQuotaExceeded(stored + inflight - bytes, bytes, limit);
  }

  /** Forgets upload `id`'s bytes (stored or thrown away). */
  release(id: string): void {
    this.inflight.delete(id);
  }

  /** The stored set's manifest, or null when there is none. */
  private async manifest(id: string): Promise<DatasetManifest | null> {
    const blob = await this.objects.os.getBlob(DatasetStore.manifestName(id));
    return blob ? (JSON.parse(new TextDecoder().decode(blob)) as DatasetManifest) : null;
  }

  /**
   * Removes a stored set: the manifest first (so no worker starts fetching it), then its files,
   * then this host's copy. Other hosts' copies stay until their caches are cleared.
   */
  async delete(id: string): Promise<Dataset> {
    const manifest = DATASET_ID_PATTERN.test(id) ? await this.manifest(id) : null;
    if (!manifest) throw datasetNotFound(id);
    await this.objects.os.delete(DatasetStore.manifestName(id));
    for (const f of manifest.files) await this.objects.os.delete(`datasets/${id}/${f.name}`).catch(() => undefined);
    rmSync(path.join(this.cacheRoot, id), { recursive: true, force: true });
    return { id, name: manifest.name, imageCount: manifest.imageCount, sizeBytes: manifest.files.reduce((a, f) => a + f.size, 0), uncaptioned: !!manifest.uncaptioned };
  }

  /** Whether stored set `id` has no captions (false for an unknown set or one cached from before manifests). */
  async uncaptioned(id: string): Promise<boolean> {
    if (!DATASET_ID_PATTERN.test(id)) return false;
    return !!(await this.manifest(id))?.uncaptioned;
  }

  /** Whether a set with this id was uploaded (or, from before sets were stored, is in this host's cache). */
  async exists(id: string): Promise<boolean> {
    if (!DATASET_ID_PATTERN.test(id)) return false;
    if (existsSync(path.join(this.cacheRoot, id))) return true;
    const info = await this.objects.os.info(DatasetStore.manifestName(id));
    return !!info && !info.deleted;
  }

  /** The set as a folder on this host, fetched from the object store into the cache first when missing. */
  async localFolder(id: string): Promise<string> {
    if (!DATASET_ID_PATTERN.test(id)) throw new Error(`${JSON.stringify(id)} is not a data set id`);
    const dest = path.join(this.cacheRoot, id);
    if (existsSync(dest)) {
      touch(dest); // just used: the disk bound removes others first
      return dest;
    }
    const manifest = await this.manifest(id);
    if (!manifest) throw new DatasetMissing(id);
    // Fetched beside the cache and renamed into it, so a half-fetched set is never used.
    const tmp = path.join(this.cacheRoot, `.fetch-${id}-${randomBytes(4).toString("hex")}`);
    try {
      for (const f of manifest.files) {
        if (badName(f.name)) throw new Error(`data set ${id} lists a file named ${JSON.stringify(f.name)}`);
        await this.objects.getFile(`datasets/${id}/${f.name}`, path.join(tmp, f.name), f.size);
      }
      mkdirSync(tmp, { recursive: true });
      try {
        renameSync(tmp, dest);
      } catch (err) {
        // Another job on this host fetched it first: theirs is as good.
        if (!existsSync(dest)) throw err;
      }
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
    return dest;
  }
}

/** The set a job names is in neither the object store nor this host's cache. */
export class DatasetMissing extends Error {
  constructor(readonly id: string) {
    super(`no uploaded data set has id ${JSON.stringify(id)}`);
  }
}

/** The rows of a CSV text (RFC 4180: quoted fields may hold commas, quotes as "" and line breaks). */
export function csvRows(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') (field += '"'), i++;
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") row.push(field), (field = "");
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field), rows.push(row), (row = []), (field = "");
    } else field += c;
  }
  if (field || row.length) row.push(field), rows.push(row);
  return rows.filter((r) => r.some((f) => f !== ""));
}

/**
 * Counts captioned images the way the engine reads them: with an instance prompt every image,
 * else metadata.jsonl, else metadata.csv, else .txt sidecars. Like the engine, it counts no file
 * whose real path leaves the set's folder (a symlink out).
 */
export function countCaptionedImages(dir: string, imageColumn = "file_name", instancePrompt?: string): number {
  const inSet = (p: string) => realPathIn(p, [dir])?.inside === true;
  if (instancePrompt)
    return readdirSync(dir).filter((f) => IMAGE_EXTENSIONS.includes(path.extname(f).toLowerCase()) && inSet(path.join(dir, f))).length;
  const meta = path.join(dir, "metadata.jsonl");
  const csv = path.join(dir, "metadata.csv");
  if (!existsSync(meta) && existsSync(csv)) {
    if (!inSet(csv)) return 0;
    const [header, ...rows] = csvRows(readFileSync(csv, "utf8"));
    const col = header ? header.indexOf(imageColumn) : -1;
    return col < 0 ? 0 : rows.filter((r) => typeof r[col] === "string" && r[col] !== "" && inSet(path.join(dir, r[col]))).length;
  }
  if (existsSync(meta)) {
    if (!inSet(meta)) return 0;
    let n = 0;
    for (const line of readFileSync(meta, "utf8").split("\n")) {
      if (!line.trim()) continue;
      try {
        const row = JSON.parse(line) as Record<string, unknown>;
        const name = row[imageColumn];
        if (typeof name === "string" && inSet(path.join(dir, name))) n++;
      } catch {
        // a malformed line is the engine's to report, with its line number
      }
    }
    return n;
  }
  const names = new Set(readdirSync(dir));
  return [...names].filter((f) => {
    const ext = path.extname(f).toLowerCase();
    const caption = f.slice(0, -ext.length) + ".txt";
    return IMAGE_EXTENSIONS.includes(ext) && names.has(caption) && inSet(path.join(dir, f)) && inSet(path.join(dir, caption));
  }).length;
}

const UPLOADABLE = [...IMAGE_EXTENSIONS.filter((e) => e !== ".bmp"), ".txt"];

export const invalidDataset = (violations: FieldViolation[]) =>
  new ApiError(
    status.INVALID_ARGUMENT,
    "INVALID_DATASET",
    "dataset refused: " + violations.slice(0, 20).map((v) => `${v.field}: ${v.description}`).join("; ") +
      (violations.length > 20 ? `; and ${violations.length - 20} more` : ""),
    violations,
  );

const tooLarge = (what: string) => new ApiError(status.RESOURCE_EXHAUSTED, "DATASET_TOO_LARGE", what);

/**
 * Why `name` may not be stored, or null when it may. Only plain file names in the
 * set's own folder: no separators (either slash, raw or percent-encoded), no dot
 * segments, no control characters, a known extension.
 */
export function badName(name: string): string | null {
  if (!name) return "is empty";
  if (name.length > 255) return "is longer than 255 characters";
  if (/[\\/]/.test(name) || /%(2f|5c)/i.test(name)) return "must be a plain file name (no folders or path separators)";
  if (name === "." || name === ".." || name.startsWith(".")) return "must not start with a dot";
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(name)) return "contains control characters";
  if (name === "metadata.jsonl") return null;
  const ext = path.extname(name).toLowerCase();
  if (!UPLOADABLE.includes(ext)) return `has an unsupported type (allowed: ${UPLOADABLE.join(", ")}, metadata.jsonl)`;
  return null;
}

/** Width and height from an image's header, without decoding it; null if unrecognised. */
export function imageSize(buf: Buffer): { width: number; height: number } | null {
  if (buf.length >= 24 && buf.readUInt32BE(0) === 0x89504e47 && buf.toString("latin1", 12, 16) === "IHDR")
    return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
  if (buf.length >= 4 && buf[0] === 0xff && buf[1] === 0xd8) {
    let off = 2;
    while (off + 9 < buf.length) {
      if (buf[off] !== 0xff) return null;
      const marker = buf[off + 1];
      const len = buf.readUInt16BE(off + 2);
      // SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8) and DAC (CC).
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker))
        return { height: buf.readUInt16BE(off + 5), width: buf.readUInt16BE(off + 7) };
      off += 2 + len;
    }
    return null;
  }
  if (buf.length >= 30 && buf.toString("latin1", 0, 4) === "RIFF" && buf.toString("latin1", 8, 12) === "WEBP") {
    const chunk = buf.toString("latin1", 12, 16);
    if (chunk === "VP8 ") return { width: buf.readUInt16LE(26) & 0x3fff, height: buf.readUInt16LE(28) & 0x3fff };
    if (chunk === "VP8L") {
      const bits = buf.readUInt32LE(21);
      return { width: (bits & 0x3fff) + 1, height: ((bits >> 14) & 0x3fff) + 1 };
    }
    if (chunk === "VP8X") return { width: buf.readUIntLE(24, 3) + 1, height: buf.readUIntLE(27, 3) + 1 };
  }
  return null;
}

/**
 * Checks a finished set folder; returns the number of images (captioned, or all of an uncaptioned
 * set: one with no .txt and no metadata.jsonl) or throws INVALID_DATASET. A set where some images
 * have captions and others not is refused: that is a mistake in it.
 */
async function checkSet(dir: string, limits: DatasetLimits): Promise<{ count: number; uncaptioned: boolean }> {
  const names = readdirSync(dir).sort();
  const bad: FieldViolation[] = [];
  const images = names.filter((n) => IMAGE_EXTENSIONS.includes(path.extname(n).toLowerCase()));
  for (const name of images) {
    const fd = readFileSync(path.join(dir, name));
    const size = imageSize(fd.subarray(0, 64 * 1024));
    if (!size) {
      bad.push({ field: name, description: "is not a PNG, JPEG or WebP image" });
      continue;
    }
    if (size.width > limits.maxImageSide || size.height > limits.maxImageSide || size.width === 0 || size.height === 0) {
      bad.push({ field: name, description: `is ${size.width}×${size.height}; images may be at most ${limits.maxImageSide} px a side` });
      continue;
    }
    try {
      await sharp(fd, { failOn: "truncated", limitInputPixels: limits.maxImageSide * limits.maxImageSide }).raw().toBuffer();
    } catch (err) {
      bad.push({ field: name, description: `does not decode (${(err as Error).message.split("\n")[0]})` });
    }
  }
  if (images.length === 0) bad.push({ field: "dataset", description: "holds no images" });

  const captioned = new Set<string>();
  if (names.includes("metadata.jsonl")) {
    const lines = readFileSync(path.join(dir, "metadata.jsonl"), "utf8").split("\n");
    lines.forEach((line, i) => {
      if (!line.trim()) return;
      try {
        const row = JSON.parse(line) as { file_name?: unknown; text?: unknown };
        if (typeof row.file_name !== "string" || typeof row.text !== "string")
          bad.push({ field: `metadata.jsonl:${i + 1}`, description: 'needs string "file_name" and "text"' });
        else if (!images.includes(row.file_name))
          bad.push({ field: `metadata.jsonl:${i + 1}`, description: `names ${JSON.stringify(row.file_name)}, which is not an uploaded image` });
        else captioned.add(row.file_name);
      } catch {
        bad.push({ field: `metadata.jsonl:${i + 1}`, description: "is not valid JSON" });
      }
    });
  } else {
    for (const img of images) if (names.includes(img.slice(0, -path.extname(img).length) + ".txt")) captioned.add(img);
  }
  // No caption source at all: an uncaptioned set (DreamBooth photos, class images), for instance_prompt.
  const uncaptioned = !names.includes("metadata.jsonl") && !names.some((n) => n.endsWith(".txt")) && images.length > 0;
  if (!uncaptioned)
    for (const img of images) if (!captioned.has(img)) bad.push({ field: img, description: "has no caption (a same-named .txt, or a metadata.jsonl line)" });
  for (const n of names.filter((n) => n.endsWith(".txt"))) {
    const text = readFileSync(path.join(dir, n));
    if (!isUtf8(text)) bad.push({ field: n, description: "is not UTF-8 text" });
  }
  if (bad.length > 0) throw invalidDataset(bad);
  return uncaptioned ? { count: images.length, uncaptioned } : { count: captioned.size, uncaptioned };
}

const isUtf8 = (b: Buffer) => {
  try {
    new TextDecoder("utf-8", { fatal: true }).decode(b);
    return true;
  } catch {
    return false;
  }
};

/** One upload in progress: receives parts, then `finish()` checks and stores the set. */
export class DatasetUpload {
  readonly id = "ds-" + Date.now().toString(36) + randomBytes(6).toString("hex");
  private readonly tmp: string;
  private total = 0;
  /** Uncompressed bytes written from the zip's entries so far. */
  private extracted = 0;
  private files = new Map<string, number>();
  private current: { name: string; out: WriteStream } | null = null;
  private zip: { file: string; out: WriteStream } | null = null;

  constructor(
    private readonly store: DatasetStore,
    readonly name: string,
    private readonly limits: DatasetLimits = DEFAULT_LIMITS,
  ) {
    mkdirSync(store.cacheRoot, { recursive: true });
    this.tmp = path.join(store.cacheRoot, `.upload-${this.id}`);
    mkdirSync(this.tmp);
  }

  /** Bytes of the stored sets when the upload began, for the quota. */
  private stored = 0;

  /** Reads what the stored sets take and refuses at once when the quota is already reached. */
  async begin(): Promise<void> {
    this.stored = await this.store.storedBytes();
    this.store.charge(this.id, 0, this.stored, this.limits.maxStoredBytes);
    if (this.stored >= this.limits.maxStoredBytes) throw datasetQuotaExceeded(this.stored, 0, this.limits.maxStoredBytes);
  }

  private count(bytes: number) {
    this.total += bytes;
    if (this.total > this.limits.maxTotalBytes) throw tooLarge(`the upload exceeds ${this.limits.maxTotalBytes} bytes`);
    this.onDisk();
  }

  /** Charges what the upload holds on disk now (sent bytes, plus a zip's extracted files) against the quota. */
  private onDisk() {
    this.store.charge(this.id, this.total + this.extracted, this.stored, this.limits.maxStoredBytes);
  }

  /** A piece of a named file; a new name closes the previous file. */
  async file(name: string, data: Uint8Array): Promise<void> {
    if (this.zip) throw invalidDataset([{ field: name, description: "files and a zip cannot be mixed in one upload" }]);
    if (this.current?.name !== name) {
      await this.closeCurrent();
      const why = badName(name);
      if (why) throw invalidDataset([{ field: name, description: why }]);
      if (this.files.has(name)) throw invalidDataset([{ field: name, description: "was sent twice (a file's chunks must be consecutive)" }]);
      if (this.files.size >= this.limits.maxFiles) throw tooLarge(`more than ${this.limits.maxFiles} files`);
      this.files.set(name, 0);
    }
    const size = this.files.get(name)! + data.length;
    if (size > this.limits.maxFileBytes) throw tooLarge(`${name} is larger than ${this.limits.maxFileBytes} bytes`);
    this.files.set(name, size);
    this.count(data.length);
    this.current ??= { name, out: output(path.join(this.tmp, name)) };
    await write(this.current.out, data);
  }

  /** The next bytes of a zip archive. */
  async zipChunk(data: Uint8Array): Promise<void> {
    if (this.files.size > 0) throw invalidDataset([{ field: "zip_chunk", description: "files and a zip cannot be mixed in one upload" }]);
    this.count(data.length);
    this.zip ??= { file: path.join(this.tmp, ".archive.zip"), out: output(path.join(this.tmp, ".archive.zip")) };
    await write(this.zip.out, data);
  }

  private async closeCurrent() {
    if (!this.current) return;
    await close(this.current.out);
    this.current = null;
  }

  /** Checks everything, stores the set and moves the folder into this host's cache. */
  async finish(): Promise<Dataset> {
    try {
      await this.closeCurrent();
      if (this.zip) {
        await close(this.zip.out);
        await this.extract(this.zip.file);
        rmSync(this.zip.file);
      }
      const { count, uncaptioned } = await checkSet(this.tmp, this.limits);
      const sizeBytes = readdirSync(this.tmp).reduce((a, n) => a + statSync(path.join(this.tmp, n)).size, 0);
      // Read again: other servers may have stored sets meanwhile.
      this.stored = await this.store.storedBytes();
      this.store.charge(this.id, sizeBytes, this.stored, this.limits.maxStoredBytes);
      await this.store.put(this.id, this.name, this.tmp, count, uncaptioned);
      renameSync(this.tmp, path.join(this.store.cacheRoot, this.id));
      this.store.release(this.id);
      return { id: this.id, name: this.name, imageCount: count, sizeBytes, uncaptioned };
    } catch (err) {
      this.abort();
      throw err;
    }
  }

  /** Throws the partial upload away. */
  abort(): void {
    this.store.release(this.id);
    this.current?.out.destroy();
    this.zip?.out.destroy();
    if (existsSync(this.tmp)) rmSync(this.tmp, { recursive: true, force: true });
  }

  /**
   * Unpacks a zip into the temporary folder, applying the same name and size rules to every entry.
   * Sizes are counted on the inflated bytes before they are written (headers can lie), so no more
   * than the limits ever reaches the disk.
   */
  private extract(zipFile: string): Promise<void> {
    return new Promise((resolve, reject) => {
      // yauzl validates entry names itself too (absolute paths, "..", backslashes).
      yauzl.open(zipFile, { lazyEntries: true, decodeStrings: true, validateEntrySizes: true }, (err, zip) => {
        if (err || !zip) return reject(invalidDataset([{ field: "zip", description: `is not a readable zip archive (${err?.message})` }]));
        let failed = false;
        const fail = (e: unknown) => {
          if (failed) return;
          failed = true;
          zip.close();
          reject(e);
        };
        zip.on("error", (e: Error) => fail(invalidDataset([{ field: "zip", description: e.message }])));
        zip.on("end", () => {
          if (!failed) resolve();
        });
        zip.on("entry", (entry: yauzl.Entry) => {
          if (entry.fileName.endsWith("/")) return zip.readEntry(); // folders carry nothing
          const why = badName(entry.fileName);
          if (why) return fail(invalidDataset([{ field: entry.fileName, description: why }]));
          if (this.files.has(entry.fileName)) return fail(invalidDataset([{ field: entry.fileName, description: "appears twice in the zip" }]));
          if (this.files.size >= this.limits.maxFiles) return fail(tooLarge(`more than ${this.limits.maxFiles} files`));
          if (entry.uncompressedSize > this.limits.maxFileBytes)
            return fail(tooLarge(`${entry.fileName} is larger than ${this.limits.maxFileBytes} bytes`));
          this.files.set(entry.fileName, entry.uncompressedSize);
          zip.openReadStream(entry, (e, rs) => {
            if (e || !rs) return fail(invalidDataset([{ field: entry.fileName, description: `cannot be read (${e?.message})` }]));
            let entryBytes = 0;
            const limit = new Transform({
              transform: (chunk: Buffer, _enc, next) => {
                entryBytes += chunk.length;
                this.extracted += chunk.length;
                try {
                  this.onDisk();
                } catch (e) {
                  return next(e as Error);
                }
                if (entryBytes > this.limits.maxFileBytes)
                  return next(tooLarge(`${entry.fileName} inflates to more than ${this.limits.maxFileBytes} bytes`));
                if (this.extracted > this.limits.maxTotalBytes)
                  return next(tooLarge(`the zip's files inflate to more than ${this.limits.maxTotalBytes} bytes`));
                next(null, chunk);
              },
            });
            const out = createWriteStream(path.join(this.tmp, entry.fileName), { flags: "wx" });
            // pipeline destroys all three streams on the first error, so writing stops there.
            pipeline(rs, limit, out, (pe) => {
              if (!pe) return zip.readEntry();
              fail(pe instanceof ApiError ? pe : invalidDataset([{ field: entry.fileName, description: pe.message }]));
            });
          });
        });
        zip.readEntry();
      });
    });
  }
}

/**
 * A new file of the upload. Its errors reach the caller through write and close; the listener
 * keeps one that comes after an abort (the folder removed while the file was opening) from
 * becoming an uncaught 'error' event.
 */
function output(file: string): WriteStream {
  return createWriteStream(file, { flags: "wx" }).on("error", () => undefined);
}

function write(out: WriteStream, data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => out.write(data, (err) => (err ? reject(err) : resolve())));
}

function close(out: WriteStream): Promise<void> {
  return new Promise((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
}

/**
 * Receives one upload stream (see dataset_service.proto; each message already keeps the
 * contract's rules) and stores the set.
 */
export async function receiveUpload(
  parts: AsyncIterable<UploadDatasetRequest>,
  store: DatasetStore,
  limits: DatasetLimits = DEFAULT_LIMITS,
): Promise<Dataset> {
  let upload: DatasetUpload | null = null;
  try {
    for await (const msg of parts) {
      const part = msg.part;
      if (!part) continue;
      if (part.$case === "header") {
        if (upload) throw invalidDataset([{ field: "header", description: "must be sent once, first" }]);
        upload = new DatasetUpload(store, part.header.name, limits);
        await upload.begin();
      } else if (!upload) {
        throw invalidDataset([{ field: "header", description: "must come first" }]);
      } else if (part.$case === "file") {
        await upload.file(part.file.name, part.file.data);
      } else {
        await upload.zipChunk(part.zipChunk);
      }
    }
    if (!upload) throw invalidDataset([{ field: "header", description: "is missing: the upload was empty" }]);
    return await upload.finish();
  } catch (err) {
    upload?.abort();
    throw err;
  }
}
