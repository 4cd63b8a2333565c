// Host paths a client may name (a base model folder, a data set folder, a LoRA file): absolute,
// inside the server's data roots when it has any, and still inside them once every symbolic
// link is followed. The rules in proto/ bound their length; only the host can check the rest.
import { readdirSync, realpathSync, statSync } from "node:fs";
import path from "node:path";

/** The real path of `p`, or `p` resolved when it does not exist. */
export const realOr = (p: string) => {
  try {
    return realpathSync(p);
  } catch {
    return path.resolve(p);
  }
};

/** Whether absolute path `p` lies inside one of `roots` (or equals one), as written. Empty roots: anywhere. */
export function withinRoots(p: string, roots: string[]): boolean {
  return roots.length === 0 || roots.some((r) => p === r || p.startsWith(r + path.sep));
}

/**
 * Where `p` really is: its real path (every symlink followed) when it exists, with `inside` telling
 * whether that lies inside one of the roots' own real paths; null when `p` does not exist. A path
 * inside a root that is (or passes through) a link leading out of every root is not inside.
 */
export function realPathIn(p: string, roots: string[]): { real: string; inside: boolean } | null {
  let real: string;
  try {
    real = realpathSync(p);
  } catch {
    return null;
  }
  return { real, inside: withinRoots(real, roots.map(realOr)) };
}

/**
 * Checks a client-named host path: the real path when it is an existing `kind` inside the roots,
 * else why not (a sentence for a FieldViolation; `missing` when it is merely not there).
 */
export function hostPath(p: string, roots: string[], kind: "folder" | "file"): { real: string } | { problem: string; missing?: true } {
  if (!path.isAbsolute(p)) return { problem: `must be an absolute path, got ${JSON.stringify(p)}` };
  const resolved = path.resolve(p);
  if (!withinRoots(resolved, roots)) return { problem: `must lie inside one of the server's data roots (${roots.join(", ")})` };
  const real = realPathIn(resolved, roots);
  const st = real && statSync(real.real, { throwIfNoEntry: false });
  if (!real || !st || (kind === "folder" ? !st.isDirectory() : !st.isFile())) return { problem: `${kind} ${JSON.stringify(p)} does not exist`, missing: true };
  // Checked on the real path too: a symlink inside a root must not lead out of them.
  if (!real.inside) return { problem: `leads outside the server's data roots through a symbolic link (${roots.join(", ")})` };
  return { real: real.real };
}

/** The environment variable that tells the engine the roots a client-named base model must lie in (engine/loraforge_engine/confined.py). */
export const BASE_MODEL_ROOTS_ENV = "LORAFORGE_BASE_MODEL_ROOTS";

/**
 * The engine refused a base model because one of its files leads outside the data roots (swapped for a
 * link after the server's check); `message` is the engine's sentence, which names the file relative to the model.
 */
export class ModelOutsideRoots extends Error {
  /** The engine's refusal in `stderr`, if it is one. */
  static from(stderr: string): ModelOutsideRoots | null {
    const line = stderr.split("\n").find((l) => l.includes("leads outside the server's data roots"));
    return line ? new ModelOutsideRoots(line.replace(/^[a-z-]+: /, "").trim()) : null;
  }
}

/** A model folder holds a few dozen entries; a walk past this many is not one. */
const MAX_MODEL_ENTRIES = 10_000;

/**
 * Why model folder `real` (a real path inside the roots) may not be read, or null: an entry that leads
 * outside the roots through a symbolic link (named relative to the folder, as
 * "unet/diffusion_pytorch_model.safetensors"), or more entries than a model has. Links that stay inside
 * the roots are fine (a Hugging Face cache snapshot links into its blobs folder); names starting with
 * "." are not part of the model and are not looked at. The engine checks again on the files it opens,
 * so a swap after this check is caught there (ModelOutsideRoots).
 */
export function modelFolderProblem(real: string, roots: string[]): string | null {
  if (roots.length === 0) return null;
  const realRoots = roots.map(realOr);
  const seen = new Set<string>([real]);
  let entries = 0;
  const walk = (dir: string, rel: string): string | null => {
    let names: string[];
    try {
      names = readdirSync(dir).filter((n) => !n.startsWith(".")).sort();
    } catch {
      return null;
    }
    for (const name of names) {
      if (++entries > MAX_MODEL_ENTRIES) return `holds more than ${MAX_MODEL_ENTRIES} files and folders: not a diffusers model folder`;
      let target: string;
      try {
        target = realpathSync(path.join(dir, name));
      } catch {
        continue; // a dangling link: nothing is read through it
      }
      if (!withinRoots(target, realRoots)) return `${rel}${name} leads outside the server's data roots through a symbolic link (${roots.join(", ")})`;
      const st = statSync(target, { throwIfNoEntry: false });
      if (st?.isDirectory() && !seen.has(target)) {
        seen.add(target);
        const out = walk(target, `${rel}${name}/`);
        if (out) return out;
      }
    }
    return null;
  };
  return walk(real, "");
}
