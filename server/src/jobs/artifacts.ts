// Job artifacts in the JetStream object store `loraforge_artifacts`, so that any
// worker can resume any job and any API server can hand out any file:
//   jobs/<id>/lora/pytorch_lora_weights.safetensors
//   jobs/<id>/checkpoint-<step>/<files of the checkpoint folder>   (object_name ends in "/")
//   jobs/<id>/validation/<png>
import { createReadStream, createWriteStream, mkdirSync, readdirSync, statSync } from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { NatsConnection } from "@nats-io/transport-node";
import { Objm, type ObjectStore } from "@nats-io/obj";
import { StorageType } from "@nats-io/jetstream";
import { Artifact, ArtifactKind } from "@loraforge/sdk/gen/loraforge/v1/job";

export const ARTIFACTS_BUCKET = "loraforge_artifacts";

/** Every file below `dir`, as paths relative to it (sorted, so archives are deterministic). */
function filesBelow(dir: string, prefix = ""): string[] {
  return readdirSync(path.join(dir, prefix), { withFileTypes: true })
    .sort((a, b) => a.name.localeCompare(b.name))
    .flatMap((e) => (e.isDirectory() ? filesBelow(dir, path.join(prefix, e.name)) : e.isFile() ? [path.join(prefix, e.name)] : []));
}

export class ArtifactStore {
  private constructor(readonly os: ObjectStore) {}

  /** `replicas`: copies a NATS cluster keeps of every object (used when the bucket is created). */
  static async open(nc: NatsConnection, replicas = 1): Promise<ArtifactStore> {
    return new ArtifactStore(await new Objm(nc).create(ARTIFACTS_BUCKET, { storage: StorageType.File, replicas }));
  }

  /** The object name an artifact of `jobId` is stored under. */
  static objectName(jobId: string, a: Artifact): string {
    switch (a.kind) {
      case ArtifactKind.ARTIFACT_KIND_CHECKPOINT:
        return `jobs/${jobId}/checkpoint-${a.step}/`;
      case ArtifactKind.ARTIFACT_KIND_LORA:
        return `jobs/${jobId}/lora/${path.basename(a.path)}`;
      default:
        return `jobs/${jobId}/validation/${path.basename(a.path)}`;
    }
  }

  /** Uploads an artifact's file (or a checkpoint's files); returns it with object_name set. */
  async upload(jobId: string, a: Artifact): Promise<Artifact> {
    const objectName = ArtifactStore.objectName(jobId, a);
    if (a.kind === ArtifactKind.ARTIFACT_KIND_CHECKPOINT) {
      for (const rel of filesBelow(a.path)) await this.putFile(objectName + rel.split(path.sep).join("/"), path.join(a.path, rel));
    } else {
      await this.putFile(objectName, a.path);
    }
    return { ...a, objectName };
  }

  private async putFile(name: string, file: string): Promise<void> {
    const rs = Readable.toWeb(createReadStream(file)) as ReadableStream<Uint8Array>;
    await this.os.put({ name }, rs);
  }

  /** Names of the objects that make up an artifact (one, or a checkpoint's files). */
  async objectsOf(objectName: string): Promise<{ name: string; size: number }[]> {
    if (!objectName.endsWith("/")) {
      const info = await this.os.info(objectName);
      return info && !info.deleted ? [{ name: info.name, size: info.size }] : [];
    }
    return (await this.os.list())
      .filter((i) => !i.deleted && i.name.startsWith(objectName))
      .map((i) => ({ name: i.name, size: i.size }))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Downloads a checkpoint's files into `dir` (for a worker resuming a job it did not start). */
  async restoreCheckpoint(objectName: string, dir: string): Promise<number> {
    const objects = await this.objectsOf(objectName);
    for (const o of objects) {
      const rel = o.name.slice(objectName.length);
      if (!rel || rel.split("/").some((s) => s === ".." || s === "")) throw new Error(`refusing object name ${o.name}`);
      const dest = path.join(dir, ...rel.split("/"));
      mkdirSync(path.dirname(dest), { recursive: true });
      const res = await this.os.get(o.name);
      if (!res) throw new Error(`object ${o.name} vanished`);
      await pipeline(Readable.fromWeb(res.data as never), createWriteStream(dest));
      const err = await res.error;
      if (err) throw err;
      if (statSync(dest).size !== o.size) throw new Error(`object ${o.name} came back truncated`);
    }
    return objects.length;
  }

  /**
   * The bytes of an artifact: a single object as stored, or a checkpoint as an
   * uncompressed ustar archive of its files.
   */
  async *read(objectName: string): AsyncGenerator<Uint8Array> {
    const objects = await this.objectsOf(objectName);
    const isArchive = objectName.endsWith("/");
    for (const o of objects) {
      const res = await this.os.get(o.name);
      if (!res) throw new Error(`object ${o.name} vanished`);
      if (isArchive) yield tarHeader(o.name.slice(objectName.length), o.size);
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
