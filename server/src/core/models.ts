// Base models by name: the operator puts (or links) diffusers folders into a models folder
// (LORAFORGE_MODELS_DIR, default <state dir>/models), and clients name them "models/<folder>".
// Each host resolves a name against its own models folder — the server to validate a spec and to
// render, a worker again before it trains — so no host path crosses the API. A name's identity
// across hosts is the model's content hash (engine/loraforge_engine/fingerprint.py), cached here
// per folder while its files' sizes and times stay the same.
import { spawn } from "node:child_process";
import { existsSync, readdirSync, statSync } from "node:fs";
import { readdir, realpath, stat } from "node:fs/promises";
import path from "node:path";
import { childEnv } from "./child-env.js";
import { BASE_MODEL_ROOTS_ENV, ModelOutsideRoots } from "./paths.js";

/** A base model's name: "models/" and a folder name of lower-case letters, digits, ".", "_", "-" (first a letter or digit). Also a rule in training_spec.proto and inference_service.proto. */
export const MODEL_NAME_PATTERN = /^models\/[a-z0-9][a-z0-9._-]{0,62}$/;

export const isModelName = (s: string) => MODEL_NAME_PATTERN.test(s);

/**
 * The folder on this host that model `name` denotes: `<modelsDir>/<folder>` when it holds a
 * diffusers model (model_index.json; symbolic links followed), else null.
 */
export function modelFolder(modelsDir: string | undefined, name: string): string | null {
  if (!modelsDir || !isModelName(name)) return null;
  const dir = path.join(modelsDir, name.slice("models/".length));
  return existsSync(path.join(dir, "model_index.json")) ? dir : null;
}

/** Every model in `modelsDir` as { name, dir }, by name; a missing folder has none. Subfolders whose names are not valid model names are skipped. */
export function listModelFolders(modelsDir: string | undefined): { name: string; dir: string }[] {
  if (!modelsDir || !existsSync(modelsDir)) return [];
  const out: { name: string; dir: string }[] = [];
  for (const e of readdirSync(modelsDir).sort()) {
    const name = `models/${e}`;
    const dir = path.join(modelsDir, e);
    if (isModelName(name) && statSync(dir, { throwIfNoEntry: false })?.isDirectory() && existsSync(path.join(dir, "model_index.json")))
      out.push({ name, dir });
  }
  return out;
}

/**
 * The entries of a model folder its content hash covers (HASHED_ENTRIES in
 * engine/loraforge_engine/fingerprint.py; a test keeps the two lists equal).
 */
export const HASHED_ENTRIES = ["model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"];

/**
 * A cheap signature of the files the model's hash covers (names, sizes, mtimes, ctimes and inode
 * numbers; symbolic links followed, as in a Hugging Face cache snapshot): the hash is computed again
 * only when it changes. A file replaced in place or by a rename changes its ctime or inode even when
 * size and mtime are kept. Asynchronous: a request's stats do not block the event loop, and only the
 * few dozen files that feed the hash are looked at, not the whole folder.
 */
export async function statSignature(root: string): Promise<string> {
  const parts: string[] = [];
  const seen = new Set<string>();
  const sig = (rel: string, st: { size: number; mtimeMs: number; ctimeMs: number; ino: number }) =>
    `${rel}:${st.size}:${st.mtimeMs}:${st.ctimeMs}:${st.ino}`;
  const walk = async (dir: string, rel: string): Promise<void> => {
    const real = await realpath(dir);
    if (seen.has(real)) return;
    seen.add(real);
    // Names starting with "." are not hashed (fingerprint.hashed_files skips them).
    const names = (await readdir(dir)).filter((n) => !n.startsWith(".")).sort();
    const stats = await Promise.all(names.map((n) => stat(path.join(dir, n)).catch(() => null)));
    for (let i = 0; i < names.length; i++) {
      const st = stats[i];
      if (!st) continue;
      if (st.isDirectory()) await walk(path.join(dir, names[i]), `${rel}${names[i]}/`);
      else parts.push(sig(`${rel}${names[i]}`, st));
    }
  };
  for (const entry of HASHED_ENTRIES) {
    const p = path.join(root, entry);
    const st = await stat(p).catch(() => null);
    if (!st) continue;
    if (st.isDirectory()) await walk(p, `${entry}/`);
    else parts.push(sig(entry, st));
  }
  return parts.join("|");
}

/** How to run the engine's `model-hash` command. */
export interface HashEngine {
  python: string;
  engineDir: string;
}

/**
 * The base model's identity: the engine's content hash (`python -m loraforge_engine model-hash <dir>`), one
 * definition for every part. With `roots`, only files inside them are read (a model a client named by path).
 */
export function engineModelHash(engine: HashEngine, modelDir: string, roots: string[] = []): Promise<string> {
  // Run as the worker runs the engine (same python, PYTHONPATH the engine's folder), so that the
  // hash is the one the engine writes into the LoRAs it trains.
  return new Promise((resolve, reject) => {
    const child = spawn(engine.python, ["-m", "loraforge_engine", "model-hash", modelDir], {
      env: childEnv({ PYTHONPATH: engine.engineDir, [BASE_MODEL_ROOTS_ENV]: roots.join(path.delimiter) }),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-4096)));
    child.on("error", reject);
    child.on("close", (code) => {
      const hash = out.trim();
      if (code === 0 && /^[0-9a-f]{16,64}$/.test(hash)) return resolve(hash);
      reject(ModelOutsideRoots.from(err) ?? new Error(`hashing ${modelDir} failed (exit ${code}): ${(err.trim().split("\n").pop() ?? "") || JSON.stringify(hash.slice(0, 100))}`));
    });
  });
}

/** Content hashes of model folders, each computed once and kept while its statSignature stays the same. */
export class ModelHasher {
  private readonly byPath = new Map<string, { signature: string; hash: Promise<string> }>();
  private readonly signatures = new Map<string, { at: number; signature: Promise<string> }>();

  /**
   * `reuseSignatureMs`: a folder's signature (~0.6 ms of stats for the tiny model) is reused this long,
   * so that a burst of Train calls stats it once (0: every call stats; a change is then seen at once).
   */
  constructor(
    private readonly engine: HashEngine,
    private readonly reuseSignatureMs = 0,
  ) {}

  private signatureOf(modelDir: string): Promise<string> {
    if (this.reuseSignatureMs <= 0) return statSignature(modelDir);
    const now = performance.now();
    const hit = this.signatures.get(modelDir);
    if (hit && now - hit.at < this.reuseSignatureMs) return hit.signature;
    const signature = statSignature(modelDir);
    this.signatures.set(modelDir, { at: now, signature });
    signature.catch(() => this.signatures.delete(modelDir));
    return signature;
  }

  /** `roots`: read only files inside them (a model a client named by path), as engineModelHash. */
  async hashOf(modelDir: string, roots: string[] = []): Promise<string> {
    const signature = await this.signatureOf(modelDir);
    const key = `${modelDir}\0${roots.join("\0")}`;
    let known = this.byPath.get(key);
    if (!known || known.signature !== signature) {
      const hash = engineModelHash(this.engine, modelDir, roots);
      known = { signature, hash };
      this.byPath.set(key, known);
      // A failed hash is not kept: the next call tries again.
      hash.catch(() => {
        if (this.byPath.get(key) === known) this.byPath.delete(key);
      });
    }
    return known.hash;
  }
}
