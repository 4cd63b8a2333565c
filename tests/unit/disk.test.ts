// The bound on what a host keeps on its own disk (finished jobs' outputs, data set copies): the least
// recently used folders go first, never a protected one or a fetch in progress, and only down to the bound.
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, utimesSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { diskBounds, pruneFolders, touch, treeBytes } from "@loraforge/server/jobs/disk";

const KiB = 1024;

/** A folder `name` under `root` holding `kib` KiB in two files (one a level down), last used `ageS` seconds ago. */
function folder(root: string, name: string, kib: number, ageS: number): void {
  const dir = path.join(root, name);
  mkdirSync(path.join(dir, "sub"), { recursive: true });
  writeFileSync(path.join(dir, "a.bin"), Buffer.alloc((kib / 2) * KiB));
  writeFileSync(path.join(dir, "sub", "b.bin"), Buffer.alloc((kib / 2) * KiB));
  const t = new Date(Date.now() - ageS * 1000);
  utimesSync(dir, t, t);
}

describe("the disk bound on local copies", () => {
  it("treeBytes counts every file below a folder", () => {
    const root = mkdtempSync(path.join(os.tmpdir(), "disk-"));
    folder(root, "x", 64, 0);
    assert.equal(treeBytes(path.join(root, "x")), 64 * KiB);
    assert.equal(treeBytes(path.join(root, "missing")), 0);
  });

  it("removes the least recently used folders until the rest fit, skipping protected ones and fetches in progress", async () => {
    const root = mkdtempSync(path.join(os.tmpdir(), "disk-"));
    folder(root, "oldest", 100, 400);
    folder(root, "old-in-use", 100, 300);
    folder(root, "middle", 100, 200);
    folder(root, "newest", 100, 100);
    folder(root, ".fetch-x", 100, 500);
    // 400 KiB in the named folders, bound 250 KiB: the two oldest unprotected ones go, in age order.
    const removed = await pruneFolders(root, 250 * KiB, (name) => name === "old-in-use");
    assert.deepEqual(removed, ["oldest", "middle"]);
    assert.deepEqual(readdirSync(root).sort(), [".fetch-x", "newest", "old-in-use"]);
  });

  it("removes nothing while the folders fit, and takes a touched folder as just used", async () => {
    const root = mkdtempSync(path.join(os.tmpdir(), "disk-"));
    folder(root, "a", 100, 300);
    folder(root, "b", 100, 200);
    assert.deepEqual(await pruneFolders(root, 200 * KiB, () => false), []);
    touch(path.join(root, "a")); // now the most recent
    assert.deepEqual(await pruneFolders(root, 100 * KiB, () => false), ["b"]);
    assert.ok(existsSync(path.join(root, "a")));
    // Bound 0 keeps only what is protected; a missing root is no error.
    assert.deepEqual(await pruneFolders(root, 0, async () => true), []);
    assert.deepEqual(await pruneFolders(path.join(root, "nope"), 0, () => false), []);
  });

  it("reads its bounds from the environment, refusing values that are not whole MiB", () => {
    assert.deepEqual(diskBounds({}), { jobOutputsBytes: 20480 * 2 ** 20, datasetCopiesBytes: 20480 * 2 ** 20, classImagesBytes: 10240 * 2 ** 20 });
    assert.deepEqual(diskBounds({ LORAFORGE_JOB_OUTPUTS_MAX_MB: "0", LORAFORGE_DATASET_COPIES_MAX_MB: "5", LORAFORGE_CLASS_IMAGES_MAX_MB: "7" }), {
      jobOutputsBytes: 0,
      datasetCopiesBytes: 5 * 2 ** 20,
      classImagesBytes: 7 * 2 ** 20,
    });
    assert.throws(() => diskBounds({ LORAFORGE_JOB_OUTPUTS_MAX_MB: "-1" }), /LORAFORGE_JOB_OUTPUTS_MAX_MB/);
    assert.throws(() => diskBounds({ LORAFORGE_DATASET_COPIES_MAX_MB: "1.5" }), /whole number/);
  });
});
