// The inference model registry on the real engine: the model-change check that runs on every Infer
// (statSignature, then the engine's content hash) and the first export's progress in the server log.
import assert from "node:assert/strict";
import { cpSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync, renameSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { HASHED_ENTRIES, ModelRegistry, statSignature } from "@loraforge/server/infer/model";
import { fixtures, python, PYTHON, REPO, tmpDir, type Fixtures } from "./lib/harness.js";

describe("ModelRegistry", () => {
  let f: Fixtures;
  let dir: string;

  before(() => {
    f = fixtures();
    dir = tmpDir("infer-model");
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const registry = (cacheRoot: string) =>
    new ModelRegistry({ python: PYTHON, engineDir: path.join(REPO, "engine"), cacheRoot }, { intraOpThreads: 1 });

  it("lists the same hashed entries as the engine's fingerprint", () => {
    const src = readFileSync(path.join(REPO, "engine", "loraforge_engine", "fingerprint.py"), "utf8");
    const m = /HASHED_ENTRIES = \(([^)]*)\)/.exec(src);
    assert.ok(m, "HASHED_ENTRIES not found in fingerprint.py");
    const engine = [...m[1].matchAll(/"([^"]+)"/g)].map((x) => x[1]);
    assert.deepEqual(HASHED_ENTRIES, engine);
  });

  it("sees a model file replaced with the same size and mtime, and ignores files the hash does not cover", async () => {
    const model = path.join(dir, "model");
    cpSync(f.model, model, { recursive: true });
    const weights = path.join(model, "unet", "diffusion_pytorch_model.safetensors");
    // A whole-second mtime, which the replacement below can carry exactly (utimes rounds sub-millisecond parts).
    const mtime = new Date(1_700_000_000_000);
    utimesSync(weights, mtime, mtime);
    const reg = registry(path.join(dir, "cache-unused"));
    const first = await reg.hashOf(model);
    assert.equal(first, python(["-m", "loraforge_engine", "model-hash", model]).trim());

    // A file outside the hashed entries (and a dot file inside one) leaves the signature alone.
    const before = await statSignature(model);
    writeFileSync(path.join(model, "README.md"), "notes\n");
    writeFileSync(path.join(model, "unet", ".lock"), "");
    assert.equal(await statSignature(model), before);

    // Replace the UNet's weights by a rename, with one byte changed, the same size and the old mtime
    // (as `cp -p` or a sync tool would leave them): the hash must follow.
    const old = statSync(weights);
    const bytes = readFileSync(weights);
    bytes[bytes.length - 1] ^= 0xff;
    const staged = path.join(model, "unet", "staged.tmp");
    writeFileSync(staged, bytes);
    utimesSync(staged, mtime, mtime);
    renameSync(staged, weights);
    assert.equal(statSync(weights).size, old.size);
    assert.equal(statSync(weights).mtimeMs, old.mtimeMs);
    const second = await reg.hashOf(model);
    assert.notEqual(second, first);
    assert.equal(second, python(["-m", "loraforge_engine", "model-hash", model]).trim());
    // Unchanged since: the same hash again.
    assert.equal(await reg.hashOf(model), second);
    await reg.close();
  });

  it("forwards the exporter's progress to the server log on a first export", async () => {
    const reg = registry(path.join(dir, "cache"));
    const lines: string[] = [];
    const write = process.stderr.write.bind(process.stderr);
    // The server logs to stderr (core/log.ts): keep a copy of what it writes during the export.
    process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
      lines.push(chunk.toString());
      return (write as (...a: unknown[]) => boolean)(chunk, ...rest);
    }) as typeof process.stderr.write;
    let model;
    try {
      model = await reg.get(f.model);
    } finally {
      process.stderr.write = write;
    }
    const progress = lines
      .join("")
      .split("\n")
      .map((l) => /INFO ONNX export (\d+)%: (.*?) model=/.exec(l))
      .filter((m) => m !== null)
      .map((m) => ({ pct: Number(m[1]), step: m[2] }));
    assert.ok(progress.length > 5, `progress lines: ${JSON.stringify(progress)}`);
    // Every component appears, the percentage never goes back, and it ends at 100.
    for (const c of ["text_encoder:", "unet:", "vae:"]) assert.ok(progress.some((p) => p.step.startsWith(c)), c);
    assert.ok(progress.some((p) => /^unet: writing weights \d+\/\d+$/.test(p.step)), "per-tensor progress inside the UNet");
    for (let i = 1; i < progress.length; i++) assert.ok(progress[i].pct >= progress[i - 1].pct, JSON.stringify(progress.slice(i - 1, i + 1)));
    assert.deepEqual(progress.at(-1), { pct: 100, step: "done" });
    // The export it made is the one that opens (weights in external data files beside the graphs).
    assert.ok(model.manifest.complete);
    assert.equal(model.manifest.files.unet, "unet.onnx");
    assert.ok(statSync(path.join(model.dir, "unet.onnx.data")).size > statSync(path.join(model.dir, "unet.onnx")).size);
    await reg.close();
  });
});
