// Infer's LoRA reads judge the file they opened, not the name checked earlier: a path inside the
// data roots that became a link to a file outside them is refused when it is opened. A base model
// folder's files are judged the same way when a job or an Infer request names it.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, realpathSync, symlinkSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { modelFolderProblem, withinRoots } from "@loraforge/server/core/paths";
import { OutsideRoots, readSafetensors } from "@loraforge/server/infer/safetensors";

/** A one-tensor safetensors file. */
function tiny(file: string): void {
  const header = Buffer.from(JSON.stringify({ x: { dtype: "F32", shape: [1], data_offsets: [0, 4] } }));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(header.length));
  writeFileSync(file, Buffer.concat([len, header, Buffer.from(new Float32Array([1.5]).buffer)]));
}

describe("readSafetensors confinement", () => {
  const base = realpathSync(mkdtempSync(path.join(os.tmpdir(), "loraforge-confine-")));
  const root = path.join(base, "root");
  const outside = path.join(base, "outside");
  mkdirSync(root);
  mkdirSync(outside);
  tiny(path.join(root, "in.safetensors"));
  tiny(path.join(outside, "secret.safetensors"));
  const inside = (real: string) => withinRoots(real, [root]);

  it("reads a file inside the roots", async () => {
    const f = await readSafetensors(path.join(root, "in.safetensors"), undefined, inside);
    assert.deepEqual([...f.tensors.get("x")!.data], [1.5]);
  });

  it("refuses a name inside the roots whose link leads out, judged on the opened file", async () => {
    // The name as a caller checked it earlier; by the time it is opened it is a link to a file outside.
    const swapped = path.join(root, "swapped.safetensors");
    symlinkSync(path.join(outside, "secret.safetensors"), swapped);
    await assert.rejects(readSafetensors(swapped, undefined, inside), OutsideRoots);
    // A folder on the way swapped for a link is caught the same way.
    const dir = path.join(root, "sub");
    symlinkSync(outside, dir);
    await assert.rejects(readSafetensors(path.join(dir, "secret.safetensors"), undefined, inside), OutsideRoots);
    // Without a judge (a job's own LoRA in the state directory) nothing is refused.
    assert.equal((await readSafetensors(swapped)).tensors.size, 1);
  });
});

describe("modelFolderProblem", () => {
  const base = realpathSync(mkdtempSync(path.join(os.tmpdir(), "loraforge-model-confine-")));
  const root = path.join(base, "root");
  const outside = path.join(base, "outside");
  const model = path.join(root, "model");
  mkdirSync(path.join(model, "unet"), { recursive: true });
  mkdirSync(path.join(outside, "vae"), { recursive: true });
  writeFileSync(path.join(model, "model_index.json"), "{}");
  writeFileSync(path.join(model, "unet", "config.json"), "{}");
  writeFileSync(path.join(outside, "weights"), "private");

  it("finds nothing in a plain folder, or without roots", () => {
    assert.equal(modelFolderProblem(model, [root]), null);
    assert.equal(modelFolderProblem(model, []), null);
  });

  it("follows links that stay inside the roots (a Hugging Face cache snapshot's blobs)", () => {
    const blobs = path.join(root, "blobs");
    mkdirSync(blobs);
    writeFileSync(path.join(blobs, "1234"), "weights");
    symlinkSync(path.join("..", "..", "blobs", "1234"), path.join(model, "unet", "weights.safetensors"));
    symlinkSync("..", path.join(model, "unet", "up")); // a loop is walked once
    symlinkSync(path.join(root, "gone"), path.join(model, "dangling")); // reads nothing
    assert.equal(modelFolderProblem(model, [root]), null);
  });

  it("names the first file or folder that leads out, relative to the model", () => {
    const leaky = path.join(root, "leaky");
    mkdirSync(path.join(leaky, "unet"), { recursive: true });
    symlinkSync(path.join(outside, "weights"), path.join(leaky, "unet", "diffusion_pytorch_model.safetensors"));
    assert.equal(
      modelFolderProblem(leaky, [root]),
      `unet/diffusion_pytorch_model.safetensors leads outside the server's data roots through a symbolic link (${root})`,
    );
    const leakyDir = path.join(root, "leaky-dir");
    mkdirSync(leakyDir);
    symlinkSync(path.join(outside, "vae"), path.join(leakyDir, "vae"));
    assert.match(modelFolderProblem(leakyDir, [root])!, /^vae leads outside/);
    // Hidden entries are not part of the model (nor of its hash) and are not read.
    const hidden = path.join(root, "hidden");
    mkdirSync(hidden);
    symlinkSync(path.join(outside, "weights"), path.join(hidden, ".cache"));
    assert.equal(modelFolderProblem(hidden, [root]), null);
  });

  it("does not open a FIFO in the folder", () => {
    const withFifo = path.join(root, "fifo");
    mkdirSync(withFifo);
    execFileSync("mkfifo", [path.join(withFifo, "pipe")]);
    assert.equal(modelFolderProblem(withFifo, [root]), null);
  });
});
