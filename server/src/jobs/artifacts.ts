// Job artifacts in the JetStream object store `loraforge_artifacts`, so that any
// worker can resume any job and any API server can hand out any file. An artifact's
// public name (Artifact.name) is its object name:
//   jobs/<id>/lora/pytorch_lora_weights.safetensors
//   jobs/<id>/checkpoint-<step>/<files of the checkpoint folder>   (the name ends in "/")
//   jobs/<id>/validation/<png>
// Uploaded data sets live in the same bucket under datasets/<id>/ (see datasets.ts).
import { createReadStream, createWriteStream, mkdirSync, readdirSync, statSync } from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { NatsConnection } from "@nats-io/transport-node";
import { Objm, type ObjectStore } from "@nats-io/obj";
import { StorageType } from "@nats-io/jetstream";
import { ArtifactKind } from "@loraforge/sdk/gen/loraforge/v1/job";
import { log } from "../core/log.js";
import { retryFor } from "../core/retry.js";

export const ARTIFACTS_BUCKET = "loraforge_artifacts";

/** Every file below `dir`, as paths relative to it (sorted, so archives are deterministic). */
function filesBelow(dir: string, prefix = ""): string[] {
  return readdirSync(path.join(dir, prefix), { withFileTypes: true })
    .sort((a, b) => a.name.localeCompare(b.name))
    .flatMap((e) => (e.isDirectory() ? filesBelow(dir, path.join(prefix, e.name)) : e.isFile() ? [path.join(prefix, e.name)] : []));
}

/** The job id in an artifact name ("jobs/<id>/..."), or null when it is not one. */
export function jobOfArtifact(name: string): string | null {
  return /^jobs\/([A-Za-z0-9_-]{1,128})\//.exec(name)?.[1] ?? null;
}

export class ArtifactStore {
  private constructor(readonly os: ObjectStore) {}

  /** `replicas`: copies a NATS cluster keeps of every object (used when the bucket is created). */
  static async open(nc: NatsConnection, replicas = 1): Promise<ArtifactStore> {
    return new ArtifactStore(await new Objm(nc).create(ARTIFACTS_BUCKET, { storage: StorageType.File, replicas }));
  }

  /** The public name of an artifact of `jobId`, from its kind, step and the file's name. */
  static publicName(jobId: string, kind: ArtifactKind, step: number, fileName: string): string {
    switch (kind) {
      case ArtifactKind.ARTIFACT_KIND_CHECKPOINT:
        return `jobs/${jobId}/checkpoint-${step}/`;
      case ArtifactKind.ARTIFACT_KIND_LORA:
        return `jobs/${jobId}/lora/${path.posix.basename(fileName)}`;
      default:
        return `jobs/${jobId}/validation/${path.posix.basename(fileName)}`;
    }
  }

  /** Stores the file (or, for a name ending in "/", the folder's files) at `local` under artifact name `name`. */
  async upload(name: string, local: string): Promise<void> {
    if (name.endsWith("/")) {
      for (const rel of filesBelow(local)) await this.putFile(name + rel.split(path.sep).join("/"), path.join(local, rel));
    } else {
      await this.putFile(name, local);
    }
  }

  /**
   * Stores one file as object `name`. Retried for up to a minute: a NATS outage (a managed
   * nats-server restarting) or a cluster electing a new leader after losing a node answers nothing for
   * a few seconds, and an artifact whose upload gave up is missing for good. A put replaces the object
   * whole, so a retry after a half-done attempt is safe; a local file error is not retried.
   */
  async putFile(name: string, file: string): Promise<void> {
    await retryFor(
      async () => {
        const rs = Readable.toWeb(createReadStream(file)) as ReadableStream<Uint8Array>;
        await this.os.put({ name }, rs);
      },
      {
        pauseMs: 1000,
        retryable: (err) => !isLocalFileError(err),
        onRetry: (err, attempt) => log("warn", "storing an artifact failed; retrying", { name, attempt, err: String(err) }),
      },
    );
  }

  /** Writes object `name` to `dest`; checks it arrived whole (the client checks its digest too). */
  async getFile(name: string, dest: string, size?: number): Promise<void> {
    mkdirSync(path.dirname(dest), { recursive: true });
    const res = await this.open(name);
    if (!res) throw new Error(`object ${name} is not in the store`);
    await pipeline(Readable.fromWeb(res.data as never), createWriteStream(dest));
    const err = await res.error;
    if (err) throw err;
    const expected = size ?? res.info.size;
    if (statSync(dest).size !== expected) throw new Error(`object ${name} came back truncated`);
  }

  /**
   * Opens object `name` for reading. A read goes through a new single-copy consumer, which a NATS
   * cluster missing a node may place on that node, and then the request times out: retried for up
   * to a minute, as nothing has been read yet.
   */
  private async open(name: string) {
    return retryFor(() => this.os.get(name), {
      pauseMs: 1000,
      onRetry: (err, attempt) => log("warn", "reading an artifact failed; retrying", { name, attempt, err: String(err) }),
    });
  }

  /** Names of the objects that make up an artifact (one, or a checkpoint's files). */
  async objectsOf(name: string): Promise<{ name: string; size: number }[]> {
    if (!name.endsWith("/")) {
      const info = await this.os.info(name);
      return info && !info.deleted ? [{ name: info.name, size: info.size }] : [];
    }
    return (await this.os.list())
      .filter((i) => !i.deleted && i.name.startsWith(name))
      .map((i) => ({ name: i.name, size: i.size }))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Downloads a checkpoint's files into `dir` (to resume from it on a host that lacks it); returns how many. */
  async restoreCheckpoint(name: string, dir: string): Promise<number> {
    const objects = await this.objectsOf(name);
    for (const o of objects) {
      const rel = o.name.slice(name.length);
      if (!rel || rel.split("/").some((s) => s === ".." || s === "." || s === "")) throw new Error(`refusing object name ${o.name}`);
      await this.getFile(o.name, path.join(dir, ...rel.split("/")), o.size);
    }
    return objects.length;
  }

  /**
   * The bytes of an artifact: a single object as stored, or a checkpoint as an
   * uncompressed ustar archive of its files.
   */
  async *read(name: string): AsyncGenerator<Uint8Array> {
    const objects = await this.objectsOf(name);
    const isArchive = name.endsWith("/");
    for (const o of objects) {
      const res = await this.open(o.name);
      if (!res) throw new Error(`object ${o.name} vanished`);
      if (isArchive) yield tarHeader(o.name.slice(name.length), o.size);
      for await (const chunk of res.data as unknown as AsyncIterable<Uint8Array>) yield chunk;
      const err = await res.error;
      if (err) throw err;
      if (isArchive && o.size % 512 !== 0) yield new Uint8Array(512 - (o.size % 512));
    }
    if (isArchive) yield new Uint8Array(1024);
  }
}

/** A POSIX ustar header block for a regular file. */
function tarHeader(name: string, size: number): Uint8Array {
  const h = Buffer.alloc(512);
  const put = (s: string, off: number, len: number) => h.write(s.slice(0, len), off, len, "utf8");
  const octal = (n: number, len: number) => n.toString(8).padStart(len - 1, "0") + "\0";
  if (Buffer.byteLength(name) > 100) throw new Error(`file name too long for a tar header: ${name}`);
  put(name, 0, 100);
  put(octal(0o644, 8), 100, 8);
  put(octal(0, 8), 108, 8);
  put(octal(0, 8), 116, 8);
  put(octal(size, 12), 124, 12);
  put(octal(Math.floor(Date.now() / 1000), 12), 136, 12);
  put("        ", 148, 8); // checksum field counts as spaces while summing
  put("0", 156, 1);
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  let sum = 0;
  for (const b of h) sum += b;
  put(sum.toString(8).padStart(6, "0") + "\0 ", 148, 8);
  return h;
}

/** A failure of the local file system (ENOENT, EACCES, …): retrying the upload cannot mend it. */
function isLocalFileError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return typeof code === "string" && /^E[A-Z]+$/.test(code);
}
