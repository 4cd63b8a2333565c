// InferenceService over gRPC: validates a request, sizes it against the memory budget, resolves its
// LoRAs (jobs or files), waits for a slot in a small queue, and has the Infer process (process.ts,
// child.ts) render it on the base model's warm onnxruntime sessions, exporting the model first when
// this content has never been exported. onnxruntime never runs in this process.
import { createHash, randomInt } from "node:crypto";
import { existsSync, mkdirSync, renameSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { status, type Server, type sendUnaryData, type ServerUnaryCall } from "@grpc/grpc-js";
import { ArtifactKind, JobState } from "@loraforge/sdk/gen/loraforge/v1/job";
import {
  InferenceServiceService,
  InferRequest,
  ListModelsRequest,
  Sampler,
  type BaseModel,
  type InferenceServiceServer,
  type InferResponse,
  type ListModelsResponse,
} from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import {
  ApiError,
  inferCancelled,
  inferTooLarge,
  invalidInferRequest,
  rethrowModelOutsideRoots,
  isStoreUnreachable,
  invalidRequest,
  loraNotFound,
  modelNotFound,
  toServiceError,
  type FieldViolation,
} from "../core/errors.js";
import { ArtifactStore } from "../jobs/artifacts.js";
import { JOB_ID_PATTERN } from "../core/ids.js";
import { log } from "../core/log.js";
import type { JobStore } from "../jobs/store.js";
import { isModelName, listModelFolders, modelFolder } from "../core/models.js";
import { hostPath, modelFolderProblem, realOr } from "../core/paths.js";
import { ruleViolations } from "../core/rules.js";
import { defaultMemoryBudget, MemoryBudget, planRequest, readMemoryShape, type MemoryShape } from "./memory.js";
import { ModelRegistry, type RuntimeOptions } from "./model.js";
import { InferProcess } from "./process.js";
import type { SchedulerName } from "./schedulers.js";
import { Semaphore } from "./queue.js";

/** Defaults of unset fields (the ranges are the contract's rules, proto/loraforge/v1/inference_service.proto). */
export const DEFAULTS = {
  steps: 25,
  guidance: 7.5,
  numImages: 1,
  /** Characters of each prompt (LORAFORGE_INFER_MAX_PROMPT_CHARS); CLIP reads only the first 77 tokens anyway. */
  promptChars: 4096,
};

export interface InferenceOptions extends RuntimeOptions {
  /** Requests rendering at once (default 1: one request already uses every core). */
  concurrency?: number;
  /** Requests allowed to wait; more are refused with RESOURCE_EXHAUSTED (default 16). */
  maxQueued?: number;
  /** Characters allowed in each prompt (default DEFAULTS.promptChars). */
  maxPromptChars?: number;
  /** Bytes of decoded LoRA tensors and built LoRA combinations kept between requests; a bigger LoRA is refused (default 2 GiB). */
  loraCacheBytes?: number;
  /**
   * Working memory all running requests may use together, by the estimate of memory.ts (default: a
   * third of the machine's memory). A request is rendered in image groups that fit; one whose
   * single image does not fit is refused with RESOURCE_EXHAUSTED INFER_TOO_LARGE.
   */
  memoryBytes?: number;
  /**
   * A request whose estimated working memory is above this many bytes has the Infer process retired
   * once nothing runs or waits, so that its memory goes back to the system; a fresh process reopens
   * the models (default 2 GiB, LORAFORGE_INFER_RECYCLE_MB; Infinity: never).
   */
  recycleBytes?: number;
}

/** Default of InferenceOptions.recycleBytes: above the tiny model's and SD-1.5's 256 px requests, below SD-1.5's 512 px one. */
export const DEFAULT_RECYCLE_BYTES = 2048 * 1024 * 1024;

interface Validated {
  steps: number;
  guidance: number;
  seed: number;
  numImages: number;
  scheduler: SchedulerName;
  width?: number;
  height?: number;
}

const SAMPLERS: Record<number, SchedulerName> = {
  [Sampler.SAMPLER_UNSPECIFIED]: "euler",
  [Sampler.SAMPLER_EULER]: "euler",
  [Sampler.SAMPLER_DDIM]: "ddim",
  [Sampler.SAMPLER_DPMPP_2M]: "dpmpp_2m",
};

/**
 * Every bad field of a request, each named (INVALID_ARGUMENT lists them all at once): the
 * contract's rules, then what only this server can judge — the prompt cap it is configured with,
 * and host paths (absolute, inside the data roots, not leading out through a link).
 */
export function validateInfer(
  req: InferRequest,
  roots: string[],
  maxPromptChars = DEFAULTS.promptChars,
): { v: Validated; violations: FieldViolation[] } {
  const bad = ruleViolations(InferRequest, "loraforge.v1.InferRequest", req);
  const flagged = new Set(bad.map((v) => v.field));
  const add = (field: string, description: string) => {
    if (!flagged.has(field)) bad.push({ field, description });
  };
  // Only the path's place is judged here; a missing folder or file is NOT_FOUND, later.
  const placed = (field: string, p: string, kind: "folder" | "file") => {
    const where = hostPath(p, roots, kind);
    if ("problem" in where && !where.missing) add(field, where.problem);
    return where;
  };
  // A model name is looked up later (an unknown one is NOT_FOUND); a path is placed here, with its files.
  if (!isModelName(req.baseModel)) {
    const where = placed("base_model", req.baseModel, "folder");
    const inside = "real" in where ? modelFolderProblem(where.real, roots) : null;
    if (inside) add("base_model", `folder ${JSON.stringify(req.baseModel)}: ${inside}`);
  }
  // Bounded before anything tokenizes them.
  for (const [field, text] of [
    ["prompt", req.prompt],
    ["negative_prompt", req.negativePrompt],
    ["prompt_2", req.prompt2],
    ["negative_prompt_2", req.negativePrompt2],
  ] as const) {
    if (text !== undefined && text.length > maxPromptChars)
      add(field, `must be at most ${maxPromptChars} characters, got ${text.length} (LORAFORGE_INFER_MAX_PROMPT_CHARS)`);
  }
  req.loras.forEach((l, i) => {
    if (l.source?.$case !== "path") return;
    const field = `loras[${i}].path`;
    if (!l.source.path.endsWith(".safetensors")) add(field, "must be a .safetensors file (pickle files are refused)");
    else placed(field, l.source.path, "file");
  });
  const seed = req.seed ?? randomInt(0, 2 ** 47);
  if (!Number.isSafeInteger(seed)) add("seed", `must be an integer of at most 53 bits, got ${seed}`);
  const v = {
    steps: req.numInferenceSteps ?? DEFAULTS.steps,
    guidance: req.guidanceScale ?? DEFAULTS.guidance,
    seed,
    numImages: req.numImages ?? DEFAULTS.numImages,
    scheduler: SAMPLERS[req.sampler] ?? "euler",
    width: req.width,
    height: req.height,
  };
  return { v, violations: bad };
}

/** What Infer needs from the server it runs in (a slice of ServerConfig, passed down by server.ts). */
export interface InferHost {
  python: string;
  engineDir: string;
  stateDir: string;
  dataRoots: string[];
  /** Where "models/<name>" base models live (core/models.ts); unset: no names. */
  modelsDir?: string;
}

export function addInferenceService(
  server: Server,
  deps: { store: JobStore; config: InferHost; options?: InferenceOptions },
): { close(): Promise<void>; readonly inferPid: number | undefined } {
  const { store, config } = deps;
  const opts = deps.options ?? {};
  const memArena = opts.memArena ?? process.env.LORAFORGE_INFER_MEM_ARENA !== "0";
  const exporter = { python: config.python, engineDir: config.engineDir, cacheRoot: path.join(config.stateDir, "onnx") };
  const runtime: RuntimeOptions = { intraOpThreads: opts.intraOpThreads ?? envInt("LORAFORGE_INFER_THREADS"), providers: opts.providers, dtype: opts.dtype, memArena };
  // Here only for hashes, the export precision and ListModels; the sessions live in the Infer process.
  const registry = new ModelRegistry(exporter, runtime);
  const proc = new InferProcess({
    ...exporter,
    dataRoots: config.dataRoots,
    runtime,
    loraCacheBytes: opts.loraCacheBytes ?? mib(envInt("LORAFORGE_INFER_LORA_CACHE_MB")),
  });
  const recycleBytes = opts.recycleBytes ?? recycleFromEnv();
  const shutdown = new AbortController();
  const maxPromptChars = opts.maxPromptChars ?? envInt("LORAFORGE_INFER_MAX_PROMPT_CHARS") ?? DEFAULTS.promptChars;
  const queue = new Semaphore(opts.concurrency ?? envInt("LORAFORGE_INFER_CONCURRENCY") ?? 1, opts.maxQueued ?? 16);
  const memory = new MemoryBudget(opts.memoryBytes ?? mib(envInt("LORAFORGE_INFER_MEMORY_MB")) ?? defaultMemoryBudget());
  const shapes = new Map<string, { signature: string; shape: MemoryShape }>();

  /** The memory-relevant shape of the model folder `dir`, re-read when its configs change. */
  function shapeOf(dir: string): MemoryShape {
    const files = [path.join(dir, "unet", "config.json"), path.join(dir, "vae", "config.json")];
    try {
      const signature = files
        .map((f) => {
          const st = statSync(f);
          return `${st.size}:${st.mtimeMs}`;
        })
        .join("/");
      const hit = shapes.get(dir);
      if (hit?.signature === signature) return hit.shape;
      const shape = readMemoryShape(dir);
      shapes.set(dir, { signature, shape });
      return shape;
    } catch (err) {
      // The detail names host files: it goes to the log, not to the client.
      log("warn", "Infer: unreadable model configs", { model: dir, err: String(err) });
      throw invalidInferRequest([{ field: "base_model", description: "not a diffusers model folder: unet/config.json or vae/config.json is missing or unreadable" }]);
    }
  }
  let closed = false;
  let artifacts: Promise<ArtifactStore> | null = null;

  /** A LoRA reference as a file on this host (a job's LoRA is fetched from the artifact store once). */
  async function loraFile(ref: InferRequest["loras"][number], i: number): Promise<string> {
    const src = ref.source!;
    if (src.$case === "path") {
      // The real path: checked against the roots again (the link may have changed) and the cache's key.
      const where = hostPath(src.path, config.dataRoots, "file");
      if ("real" in where) return where.real;
      if (where.missing) throw loraNotFound(`loras[${i}].path`, `no LoRA file at ${src.path}`);
      throw invalidInferRequest([{ field: `loras[${i}].path`, description: where.problem }]);
    }
    const cur = JOB_ID_PATTERN.test(src.jobId) ? await store.get(src.jobId) : null;
    if (!cur) throw loraNotFound(`loras[${i}].job_id`, `job ${JSON.stringify(src.jobId)} does not exist`);
    const art = cur.job.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA);
    if (cur.job.state !== JobState.JOB_STATE_SUCCEEDED || !art)
      throw loraNotFound(`loras[${i}].job_id`, `job ${src.jobId} has no final LoRA (it has not succeeded)`);
    const local = path.join(config.stateDir, "infer-loras", src.jobId, path.posix.basename(art.name));
    if (existsSync(local)) return local;
    artifacts ??= ArtifactStore.open(store.nc);
    const chunks: Uint8Array[] = [];
    for await (const c of (await artifacts).read(art.name)) chunks.push(c);
    const bytes = Buffer.concat(chunks);
    if (bytes.length === 0 || (art.sha256 && createHash("sha256").update(bytes).digest("hex") !== art.sha256))
      throw loraNotFound(`loras[${i}].job_id`, `the stored LoRA of job ${src.jobId} (${art.name}) is missing or does not match its checksum`);
    mkdirSync(path.dirname(local), { recursive: true });
    writeFileSync(local + ".tmp", bytes);
    renameSync(local + ".tmp", local);
    return local;
  }

  /**
   * The folder of a base model: a name in the models folder, or a path inside the data roots (its real
   * path; `roots` are those its files must stay in when read, none for the admin's named models).
   */
  function baseFolder(baseModel: string): { real: string; roots: string[] } {
    if (isModelName(baseModel)) {
      const dir = modelFolder(config.modelsDir, baseModel);
      if (!dir) throw modelNotFound(baseModel, `base_model: no model named ${baseModel} in the server's models folder (ListModels lists them)`);
      return { real: realOr(dir), roots: [] };
    }
    const base = hostPath(baseModel, config.dataRoots, "folder");
    if (!("real" in base) || !existsSync(path.join(base.real, "model_index.json"))) throw modelNotFound(baseModel);
    return { real: base.real, roots: config.dataRoots };
  }

  async function infer(req: InferRequest, callSignal: AbortSignal): Promise<InferResponse> {
    const tStart = performance.now();
    if (closed) throw new ApiError(status.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server");
    // Cancelled by the client, or by shutdown: either stops the render before its next denoising step.
    const signal = AbortSignal.any([callSignal, shutdown.signal]);
    const cancelled = () => signal.aborted;
    const { v, violations } = validateInfer(req, config.dataRoots, maxPromptChars);
    if (violations.length > 0) throw invalidInferRequest(violations);
    const base = baseFolder(req.baseModel);
    // Sized before anything loads: a request that cannot fit costs no export and no queue slot.
    const shape = shapeOf(base.real);
    const width = v.width ?? shape.nativeSize;
    const height = v.height ?? shape.nativeSize;
    const cfgRows = v.guidance > 1 ? 2 : 1;
    const elem = registry.dtype() === "fp16" ? 2 : 4;
    const sizing = { width, height, rowsPerImage: cfgRows, unetBytes: elem, vaeBytes: 4, arena: memArena };
    const plan = planRequest(shape, sizing, v.numImages, memory.total);
    if (!plan) {
      const one = planRequest(shape, sizing, 1, Number.MAX_SAFE_INTEGER)!;
      throw inferTooLarge(`a ${width}×${height} image on this base model`, one.bytes, memory.total);
    }
    const files = await Promise.all(req.loras.map((l, i) => loraFile(l, i)));

    const release = await queue.acquire(cancelled);
    let releaseMemory = () => {};
    let rendered = false; // whether the Infer process rendered (its arenas may have grown), fully or not
    try {
      const queueMs = performance.now() - tStart;
      if (cancelled()) throw inferCancelled();
      const t = performance.now();
      const hash = await registry.hashOf(base.real, base.roots).catch(rethrowModelOutsideRoots);
      const hashMs = performance.now() - t;
      releaseMemory = await memory.acquire(plan.bytes, cancelled);
      if (cancelled()) throw inferCancelled();
      if (plan.perGroup < v.numImages)
        log("info", "Infer renders in image groups to stay within its memory budget", {
          images: v.numImages,
          perGroup: plan.perGroup,
          estimateMiB: Math.ceil(plan.bytes / 2 ** 20),
          budgetMiB: Math.floor(memory.total / 2 ** 20),
        });
      const r = await proc.render(
        {
          base: { dir: base.real, hash, confined: base.roots.length > 0 },
          req: {
            prompt: req.prompt,
            negativePrompt: req.negativePrompt,
            prompt2: req.prompt2,
            negativePrompt2: req.negativePrompt2,
            sizeConditioning: req.sizeConditioning,
            negativeSizeConditioning: req.negativeSizeConditioning,
          },
          loras: req.loras.map((l, i) => {
            const byPath = l.source!.$case === "path";
            return { file: files[i], confined: byPath, field: byPath ? `loras[${i}].path` : `loras[${i}].job_id`, scale: l.scale ?? 1 };
          }),
          steps: v.steps,
          guidance: v.guidance,
          seed: v.seed,
          numImages: v.numImages,
          perGroup: plan.perGroup,
          scheduler: v.scheduler,
          width,
          height,
        },
        signal,
      ).catch((err) => {
        // Refusals (a bad LoRA, a size this model cannot take) come before any rendering.
        rendered = !(err instanceof ApiError && err.code !== status.CANCELLED);
        throw err;
      });
      rendered = true;
      return {
        images: r.pngs.map((png, i) => ({ png: png as Buffer, seed: v.seed + i, width, height })),
        timings: {
          queueMs,
          loadModelMs: hashMs + r.timings.loadModelMs,
          loraMs: r.timings.loraMs,
          textEncodeMs: r.timings.textEncodeMs,
          denoiseMs: r.timings.denoiseMs,
          decodeMs: r.timings.decodeMs,
          pngMs: r.timings.pngMs,
          totalMs: performance.now() - tStart,
        },
        modelHash: r.modelHash,
      };
    } finally {
      // A large request leaves onnxruntime's arenas grown, finished or not: the process goes once idle.
      if (rendered && plan.bytes > recycleBytes) proc.markForRetirement();
      releaseMemory();
      release();
      if (queue.busy === 0) proc.retireIfMarked();
    }
  }

  async function listModels(req: ListModelsRequest): Promise<ListModelsResponse> {
    const violations = ruleViolations(ListModelsRequest, "loraforge.v1.ListModelsRequest", req);
    if (violations.length > 0) throw invalidRequest("INVALID_REQUEST", "invalid ListModelsRequest", violations);
    // Named models first (hashed once per folder while its files stay the same), with their
    // export's numbers when one exists; then exports of folders given by path, by hash alone.
    const exports = new Map(registry.listExports().map(({ manifest }) => [manifest.model_hash, manifest]));
    const baseModels: BaseModel[] = [];
    const nameOf = new Map<string, string>();
    for (const { name, dir } of listModelFolders(config.modelsDir)) {
      let hash: string;
      try {
        hash = await registry.hashOf(dir);
      } catch (err) {
        log("warn", "ListModels: a named model could not be hashed; left out", { model: name, err: String(err) });
        continue;
      }
      if (!nameOf.has(hash)) nameOf.set(hash, name);
      const m = exports.get(hash);
      let nativeSize = m ? m.unet.sample_size * m.unet.vae_factor : 0;
      if (!m) {
        try {
          nativeSize = shapeOf(dir).nativeSize;
        } catch {
          // Left 0: the configs are unreadable, which Infer will report.
        }
      }
      baseModels.push({ path: "", name, modelHash: hash, nativeSize, loraSlots: m?.slots.length ?? 0, exported: !!m });
    }
    for (const [hash, m] of exports) {
      if (nameOf.has(hash)) continue;
      baseModels.push({ path: "", name: "", modelHash: hash, nativeSize: m.unet.sample_size * m.unet.vae_factor, loraSlots: m.slots.length, exported: true });
    }
    const trained: ListModelsResponse["loras"] = [];
    for (const id of await store.jobIds()) {
      const cur = await store.get(id);
      if (!cur || cur.job.state !== JobState.JOB_STATE_SUCCEEDED) continue;
      const art = cur.job.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA);
      if (!art) continue;
      // Never the folder a client gave: its name, or the name of a model with the same content.
      const given = cur.job.spec?.baseModel ?? "";
      const hash = cur.job.baseModelHash;
      const baseModel = isModelName(given) ? given : (nameOf.get(hash) ?? "");
      trained.push({ jobId: id, artifactName: art.name, baseModel, baseModelHash: hash, rank: cur.job.spec?.rank ?? 4 });
    }
    return { baseModels, loras: trained };
  }

  const impl: InferenceServiceServer = {
    infer: (call: ServerUnaryCall<InferRequest, InferResponse>, callback: sendUnaryData<InferResponse>) => {
      const gone = new AbortController();
      call.on("cancelled", () => gone.abort());
      if (call.cancelled) gone.abort();
      infer(call.request, gone.signal).then(
        (res) => callback(null, res),
        (err) => {
          if (!(err instanceof ApiError)) log("error", "Infer failed", { err: String(err?.stack ?? err) });
          callback(toServiceError(hideInternals(err)));
        },
      );
    },
    listModels: (call: ServerUnaryCall<ListModelsRequest, ListModelsResponse>, callback: sendUnaryData<ListModelsResponse>) => {
      listModels(call.request).then(
        (res) => callback(null, res),
        (err) => {
          if (!(err instanceof ApiError)) log("error", "ListModels failed", { err: String(err?.stack ?? err) });
          callback(toServiceError(hideInternals(err)));
        },
      );
    },
  };
  server.addService(InferenceServiceService, impl);
  return {
    /** Cancels what renders (each stops before its next step), waits up to 10 s, then stops the Infer process. */
    async close() {
      closed = true;
      shutdown.abort();
      queue.close();
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([queue.idle(), new Promise((r) => (timer = setTimeout(r, 10_000)))]);
      clearTimeout(timer);
      // A render still running (an export, a long operator) fails INFER_PROCESS_LOST when the process is stopped.
      await proc.close();
      await queue.idle();
    },
    /** The Infer process's pid, if one runs. */
    get inferPid() {
      return proc.pid;
    },
  };
}

/**
 * An unexpected error as the client sees it: INTERNAL without the detail (an ONNX export's failure
 * quotes host paths and the exporter's output), which the server log has. ApiErrors and NATS errors
 * pass unchanged.
 */
function hideInternals(err: unknown): unknown {
  if (err instanceof ApiError || isStoreUnreachable(err)) return err;
  return new ApiError(status.INTERNAL, "INTERNAL", "internal error while rendering; the server log has the details");
}

const mib = (n: number | undefined) => (n === undefined ? undefined : n * 1024 * 1024);

/** LORAFORGE_INFER_RECYCLE_MB: MiB (0: after every request), "off": never; unset or invalid: the default. */
function recycleFromEnv(): number {
  const v = process.env.LORAFORGE_INFER_RECYCLE_MB?.trim();
  if (v === "off") return Infinity;
  const n = Number(v);
  if (!v || !Number.isInteger(n) || n < 0) return DEFAULT_RECYCLE_BYTES;
  return n * 1024 * 1024;
}

function envInt(name: string): number | undefined {
  const v = process.env[name];
  if (!v) return undefined;
  const n = Number(v);
  return Number.isInteger(n) && n > 0 ? n : undefined;
}
