// What a host keeps on its own disk beside the object store — finished jobs' output folders
// (<state dir>/jobs/<id>), its copies of uploaded data sets (<state dir>/datasets/<id>) and DreamBooth's
// generated class images (<state dir>/cache/class-images/<key>) — bounded in bytes: past the bound the
// least recently used folders go, never one still needed. Outputs and data sets are also in the object
// store and are fetched again when a job needs them; class images are generated again.
import { lstatSync, readdirSync, rmSync, utimesSync } from "node:fs";
import path from "node:path";
import { log } from "../core/log.js";

const MiB = 1024 * 1024;

/** The bounds, from the environment (MiB; 0 keeps nothing that is not in use). */
export function diskBounds(env: NodeJS.ProcessEnv = process.env): { jobOutputsBytes: number; datasetCopiesBytes: number; classImagesBytes: number } {
  const mb = (name: string, fallback: number) => {
    const v = env[name];
    if (v === undefined || v === "") return fallback * MiB;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a whole number of MiB (0 or more), got ${JSON.stringify(v)}`);
    return n * MiB;
  };
  return {
    jobOutputsBytes: mb("LORAFORGE_JOB_OUTPUTS_MAX_MB", 20480),
    datasetCopiesBytes: mb("LORAFORGE_DATASET_COPIES_MAX_MB", 20480),
    classImagesBytes: mb("LORAFORGE_CLASS_IMAGES_MAX_MB", 10240),
  };
}

/** Bytes of everything under `p` (files as they are on disk; links not followed). */
export function treeBytes(p: string): number {
  const st = lstatSync(p, { throwIfNoEntry: false });
  if (!st) return 0;
  if (!st.isDirectory()) return st.size;
  let n = 0;
  for (const e of readdirSync(p)) n += treeBytes(path.join(p, e));
  return n;
}

/** Marks folder `dir` as just used (its mtime), so that pruning takes others first. */
export function touch(dir: string): void {
  const now = new Date();
  try {
    utimesSync(dir, now, now);
  } catch {
    // Gone already: nothing to keep fresh.
  }
}

/**
 * Removes folders directly under `root`, least recently used first (by mtime), until what is left
 * takes at most `maxBytes`. `keep(name)` protects a folder (one in use, one a job may resume from);
 * names starting with "." (a fetch in progress) are never touched. Returns the names removed.
 */
export async function pruneFolders(root: string, maxBytes: number, keep: (name: string) => boolean | Promise<boolean>): Promise<string[]> {
  let entries: { name: string; bytes: number; used: number }[];
  try {
    entries = readdirSync(root, { withFileTypes: true })
      .filter((e) => e.isDirectory() && !e.name.startsWith("."))
      .map((e) => {
        const dir = path.join(root, e.name);
        return { name: e.name, bytes: treeBytes(dir), used: lstatSync(dir).mtimeMs };
      });
  } catch {
    return []; // no such folder yet
  }
  let total = entries.reduce((a, e) => a + e.bytes, 0);
  const removed: string[] = [];
  for (const e of entries.sort((a, b) => a.used - b.used)) {
    if (total <= maxBytes) break;
    if (await keep(e.name)) continue;
    rmSync(path.join(root, e.name), { recursive: true, force: true });
    total -= e.bytes;
    removed.push(e.name);
  }
  if (removed.length > 0) log("info", "removed local copies to stay within the disk bound", { root, removed: removed.length, leftMiB: Math.ceil(total / MiB), boundMiB: Math.floor(maxBytes / MiB) });
  return removed;
}
