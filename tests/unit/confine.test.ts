// Infer's LoRA reads judge the file they opened, not the name checked earlier: a path inside the
// data roots that became a link to a file outside them is refused when it is opened.
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, realpathSync, symlinkSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { withinRoots } from "@loraforge/server/core/paths";
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
