// Host paths a client may name (a base model folder, a data set folder, a LoRA file): absolute,
// inside the server's data roots when it has any, and still inside them once every symbolic
// link is followed. The rules in proto/ bound their length; only the host can check the rest.
import { realpathSync, statSync } from "node:fs";
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
