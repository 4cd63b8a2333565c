// Base models for inference: the ONNX export (made once by the engine, cached by content hash
// under <stateDir>/onnx/<hash>/) and its onnxruntime sessions (text encoder, SDXL's second text
// encoder, UNet, VAE decoder), kept warm per model.
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";
// Types only: onnxruntime loads when a model opens, so the serve process, which only lists exports
// and hashes models, never maps it (its sessions live in the Infer child process, infer/child.ts).
import type * as ort from "onnxruntime-node";
import { log } from "../core/log.js";
import type { SchedulerConfig } from "./schedulers.js";
import type { SlotIndex, SlotInfo } from "./lora.js";
import { ClipTokenizer } from "./tokenizer.js";
import { childEnv } from "../core/child-env.js";
import { BASE_MODEL_ROOTS_ENV, ModelOutsideRoots } from "../core/paths.js";
import { HASHED_ENTRIES, ModelHasher, statSignature } from "../core/models.js";

export const MANIFEST_FORMAT = "loraforge-onnx/2";

export interface Manifest {
  format: string;
  model_hash: string;
  source: string;
  complete: boolean;
  /** "sd" (SD-1.x/2.x) or "sdxl"; absent in exports made before SDXL was supported (= "sd"). */
  arch?: "sd" | "sdxl";
  /** "fp32" or "fp16" (absent = fp32). */
  dtype?: "fp32" | "fp16";
  /** Element type of each graph's float inputs and outputs, except timestep and time_ids (absent = float32). */
  io_dtype?: Partial<Record<keyof Manifest["files"], "float32" | "float16">>;
  files: { text_encoder: string; text_encoder_2?: string; unet: string; vae_decoder: string };
  tokenizer: { dir: string; max_length: number };
  tokenizer_2?: { dir: string; max_length: number };
  scheduler_config: SchedulerConfig;
  vae: {
    scaling_factor: number;
    latent_channels: number;
    shift_factor: number | null;
    latents_mean?: number[] | null;
    latents_std?: number[] | null;
    force_upcast?: boolean;
  };
  unet: {
    in_channels: number;
    sample_size: number;
    cross_attention_dim: number;
    latent_multiple: number;
    vae_factor: number;
    max_batch: number;
    time_cond_proj_dim: number | null;
    addition_embed_type?: string | null;
    addition_time_embed_dim?: number;
  };
  text_encoder: { hidden_size: number; max_length: number };
  text_encoder_2?: { hidden_size: number; max_length: number; projection_dim: number };
  /** SDXL: an empty negative prompt gives zero negative embeddings instead of encoding "". */
  force_zeros_for_empty_prompt?: boolean;
  slots: SlotInfo[];
}

// The hash and its cheap signature live in core/models.ts (the job side uses them without onnxruntime).
export { HASHED_ENTRIES, statSignature };

/**
 * Runs `python -m loraforge_engine <args>`; resolves with its stdout. `pythonPath` defaults to the
 * engine's folder before any inherited PYTHONPATH (the exporter's); the worker's is the folder alone.
 */
function runEngineCommand(
  cfg: ExporterConfig,
  args: string[],
  what: string,
  pythonPath?: string,
  onLine?: (line: string) => void,
  extraEnv: Record<string, string> = {},
): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cfg.python, ["-m", "loraforge_engine", ...args], {
      env: childEnv({ ...extraEnv, PYTHONPATH: pythonPath ?? cfg.engineDir + (process.env.PYTHONPATH ? path.delimiter + process.env.PYTHONPATH : "") }),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    let partial = ""; // the stderr line not yet ended, for onLine
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => {
      const text = d.toString();
      err += text;
      if (err.length > 1 << 20) err = err.slice(-(1 << 19));
      if (!onLine) return;
      const lines = (partial + text).split("\n");
      partial = lines.pop()!.slice(-(1 << 16));
      for (const line of lines) onLine(line);
    });
    child.on("error", reject);
    child.on("close", (code) => {
      if (code === 0) return resolve(out);
      const tail = err.trim().split("\n").slice(-5).join("\n");
      reject(ModelOutsideRoots.from(err) ?? new Error(`${what} failed (exit ${code}): ${tail}`));
    });
  });
}

export function readManifest(dir: string): Manifest | null {
  try {
    const m = JSON.parse(readFileSync(path.join(dir, "manifest.json"), "utf8")) as Manifest;
    if (m.format !== MANIFEST_FORMAT || m.complete !== true) return null;
    if (!Object.values(m.files).every((f) => existsSync(path.join(dir, f)))) return null;
    return m;
  } catch {
    return null;
  }
}

export interface RuntimeOptions {
  /**
   * Threads per onnxruntime operator (default: every core the process may use, LORAFORGE_INFER_THREADS overrides):
   * at SD-1.5 widths bench/infer measured all cores well ahead of one thread (bench/RESULTS.md); only the tiny
   * test model, bound by per-operator overhead, ran faster on one.
   */
  intraOpThreads?: number;
  /** Execution providers in order of preference (default: cuda when its provider library is installed, then cpu). */
  providers?: string[];
  /**
   * Which export to run: "fp16" (half precision, for CUDA) or "fp32". Default: fp16 when the CUDA
   * provider comes first, else fp32 (`LORAFORGE_ONNX_DTYPE` overrides).
   */
  dtype?: "fp32" | "fp16";
  /**
   * onnxruntime's CPU memory arena (default on): faster (large tensors are not mapped afresh each
   * time), but each session keeps its largest request's peak for its lifetime; off returns a
   * request's memory when it ends (LORAFORGE_INFER_MEM_ARENA=0).
   */
  memArena?: boolean;
}

/** CUDA when onnxruntime-node was installed with its CUDA provider, else CPU. */
function defaultProviders(): string[] {
  const env = process.env.LORAFORGE_ORT_PROVIDERS;
  if (env) return env.split(",").map((s) => s.trim()).filter(Boolean);
  try {
    const req = createRequire(import.meta.url);
    const bin = path.join(path.dirname(req.resolve("onnxruntime-node")), "..", "bin");
    const found = (dir: string): boolean =>
      existsSync(dir) &&
      readdirSync(dir, { withFileTypes: true }).some((e) =>
        e.isDirectory() ? found(path.join(dir, e.name)) : e.name.startsWith("libonnxruntime_providers_cuda"),
      );
    if (found(bin)) return ["cuda", "cpu"];
  } catch {
    // fall through to CPU
  }
  return ["cpu"];
}

/** One exported base model with warm sessions. */
export class LoadedModel {
  private constructor(
    readonly dir: string,
    readonly manifest: Manifest,
    readonly tokenizer: ClipTokenizer,
    readonly slots: SlotIndex,
    readonly textEncoder: ort.InferenceSession,
    readonly unet: ort.InferenceSession,
    readonly vaeDecoder: ort.InferenceSession,
    readonly providers: string[],
    /** SDXL's second text encoder (CLIPTextModelWithProjection) and its tokenizer; null for SD-1.x/2.x. */
    readonly textEncoder2: ort.InferenceSession | null,
    readonly tokenizer2: ClipTokenizer | null,
  ) {}

  static async open(dir: string, manifest: Manifest, opts: RuntimeOptions): Promise<LoadedModel> {
    const threads = opts.intraOpThreads ?? Math.max(1, os.availableParallelism());
    let providers = opts.providers ?? defaultProviders();
    const options = (eps: string[]): ort.InferenceSession.SessionOptions => ({
      executionProviders: eps,
      graphOptimizationLevel: "all",
      intraOpNumThreads: threads,
      interOpNumThreads: 1,
      executionMode: "sequential",
      enableCpuMemArena: opts.memArena ?? true,
      // Spinning threads wait busily between the many small operators; on a shared CPU they cost
      // more than they save (3 sessions on 2 cores ran ~2× slower with it).
      extra: { session: { intra_op: { allow_spinning: "0" }, inter_op: { allow_spinning: "0" } } },
    });
    const files = [manifest.files.text_encoder, manifest.files.unet, manifest.files.vae_decoder];
    if (manifest.files.text_encoder_2) files.push(manifest.files.text_encoder_2);
    const { InferenceSession } = (await import("onnxruntime-node")).default;
    const { SlotIndex: Slots } = await import("./lora.js"); // lora.ts builds onnxruntime tensors
    const create = (eps: string[]) => Promise.all(files.map((f) => InferenceSession.create(path.join(dir, f), options(eps))));
    let sessions: ort.InferenceSession[];
    try {
      sessions = await create(providers);
    } catch (err) {
      if (providers.length === 1 && providers[0] === "cpu") throw err;
      log("warn", "onnxruntime: falling back to the CPU execution provider", { providers, err: String(err) });
      providers = ["cpu"];
      sessions = await create(providers);
    }
    const tokenizer = ClipTokenizer.fromDir(path.join(dir, manifest.tokenizer.dir));
    const tokenizer2 = manifest.tokenizer_2 ? ClipTokenizer.fromDir(path.join(dir, manifest.tokenizer_2.dir)) : null;
    return new LoadedModel(dir, manifest, tokenizer, new Slots(manifest.slots), sessions[0], sessions[1], sessions[2], providers, sessions[3] ?? null, tokenizer2);
  }

  get isXL(): boolean {
    return this.manifest.arch === "sdxl";
  }

  async release(): Promise<void> {
    await Promise.all([this.textEncoder.release(), this.unet.release(), this.vaeDecoder.release(), this.textEncoder2?.release()]);
  }
}

export interface ExporterConfig {
  python: string;
  engineDir: string;
  /** Exports live under <cacheRoot>/<hash>/. */
  cacheRoot: string;
}

/** The export folder name for a hash and precision (the engine's export_dir_name). */
export const exportDirName = (hash: string, dtype: "fp32" | "fp16") => (dtype === "fp32" ? hash : `${hash}-${dtype}`);

/** `progress NN% <component>: <step>`, the exporter's progress lines on stderr (onnx_export.Progress). */
const PROGRESS_LINE = /^progress +(\d{1,3})% (.*)$/;

/**
 * Runs the engine's exporter; resolves with the export folder it reports. Its progress lines go to
 * the server log as they come, so that a first Infer that exports for minutes is seen working. With
 * `roots`, the exporter reads only files inside them (a model a client named by path).
 */
async function runExporter(cfg: ExporterConfig, modelDir: string, dtype: "fp32" | "fp16", roots: string[]): Promise<string> {
  const onLine = (line: string) => {
    const m = PROGRESS_LINE.exec(line.trim());
    if (m) log("info", `ONNX export ${m[1]}%: ${m[2]}`, { model: modelDir, dtype });
  };
  const args = ["export-onnx", modelDir, "--out", cfg.cacheRoot, "--dtype", dtype];
  const out = await runEngineCommand(cfg, args, `exporting ${modelDir} to ONNX`, undefined, onLine, { [BASE_MODEL_ROOTS_ENV]: roots.join(path.delimiter) });
  try {
    const last = out.trim().split("\n").pop()!;
    return (JSON.parse(last) as { dir: string }).dir;
  } catch {
    throw new Error(`the ONNX exporter printed no result for ${modelDir}`);
  }
}

/** Base models by path: hashed, exported when needed, opened once and kept warm (at most `maxLoaded`). */
export class ModelRegistry {
  /** Each folder's hash, kept while its files' signature stays the same. */
  readonly hasher: ModelHasher;
  private readonly loaded = new Map<string, Promise<LoadedModel>>();

  constructor(
    private readonly exporter: ExporterConfig,
    private readonly runtime: RuntimeOptions = {},
    private readonly maxLoaded = 2,
  ) {
    this.hasher = new ModelHasher(exporter);
  }

  /**
   * The model at `modelDir`, exporting it first if its content has no export yet; `knownHash` is its
   * content hash when the caller has it (the serve process hashes, its Infer child loads). With `roots`,
   * only files inside them are read (a model a client named by path).
   */
  async get(modelDir: string, knownHash?: string, roots: string[] = []): Promise<LoadedModel> {
    const hash = knownHash ?? (await this.hashOf(modelDir, roots));
    let p = this.loaded.get(hash);
    if (!p) {
      p = this.openOrExport(modelDir, hash, roots);
      this.loaded.set(hash, p);
      p.catch(() => this.loaded.delete(hash));
    } else {
      this.loaded.delete(hash); // most recently used last
      this.loaded.set(hash, p);
    }
    while (this.loaded.size > this.maxLoaded) {
      const [oldHash, old] = this.loaded.entries().next().value!;
      this.loaded.delete(oldHash);
      void old.then((m) => m.release()).catch(() => undefined);
    }
    return p;
  }

  /** The model's content hash, from the engine; cached per folder until a file's size or mtime changes. */
  hashOf(modelDir: string, roots: string[] = []): Promise<string> {
    return this.hasher.hashOf(modelDir, roots);
  }

  /** fp16 exports where CUDA runs them, fp32 elsewhere (see RuntimeOptions.dtype). */
  dtype(): "fp32" | "fp16" {
    const env = process.env.LORAFORGE_ONNX_DTYPE;
    if (env === "fp16" || env === "fp32") return env;
    if (this.runtime.dtype) return this.runtime.dtype;
    return (this.runtime.providers ?? defaultProviders())[0] === "cuda" ? "fp16" : "fp32";
  }

  private async openOrExport(modelDir: string, hash: string, roots: string[]): Promise<LoadedModel> {
    const dtype = this.dtype();
    let dir = path.join(this.exporter.cacheRoot, exportDirName(hash, dtype));
    let manifest = readManifest(dir);
    if (!manifest) {
      log("info", "exporting base model to ONNX", { model: modelDir, hash, dtype });
      dir = await runExporter(this.exporter, modelDir, dtype, roots);
      manifest = readManifest(dir);
      if (!manifest) throw new Error(`the ONNX export of ${modelDir} in ${dir} is incomplete`);
    }
    return LoadedModel.open(dir, manifest, this.runtime);
  }

  /** Every complete export under the cache root. */
  listExports(): { dir: string; manifest: Manifest }[] {
    if (!existsSync(this.exporter.cacheRoot)) return [];
    const out: { dir: string; manifest: Manifest }[] = [];
    for (const e of readdirSync(this.exporter.cacheRoot, { withFileTypes: true })) {
      if (!e.isDirectory() || e.name.startsWith(".")) continue;
      const dir = path.join(this.exporter.cacheRoot, e.name);
      const manifest = readManifest(dir);
      // One entry per model: an fp16 export beside the fp32 one is the same model.
      if (manifest && !out.some((o) => o.manifest.model_hash === manifest.model_hash)) out.push({ dir, manifest });
    }
    return out;
  }

  async close(): Promise<void> {
    const all = [...this.loaded.values()];
    this.loaded.clear();
    await Promise.all(all.map((p) => p.then((m) => m.release()).catch(() => undefined)));
  }
}
