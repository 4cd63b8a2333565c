// InferenceService over gRPC: validates a request, resolves its LoRAs (jobs or files), waits for
// a slot in a small queue, and renders on the base model's warm onnxruntime sessions (exporting
// the model first when this content has never been exported).
import { createHash, randomInt } from "node:crypto";
import { existsSync, mkdirSync, renameSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { status, type Server, type sendUnaryData, type ServerUnaryCall } from "@grpc/grpc-js";
import { ArtifactKind, JobState } from "@loraforge/sdk/gen/loraforge/v1/job";
import {
  InferenceServiceService,
  type InferenceServiceServer,
  type InferRequest,
  type InferResponse,
  type ListModelsRequest,
  type ListModelsResponse,
} from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import {
  ApiError,
  inferCancelled,
  invalidInferRequest,
  invalidLora,
  loraMismatch,
  loraNotFound,
  loraTooLarge,
  modelNotFound,
  toServiceError,
  type FieldViolation,
} from "../core/errors.js";
import { ArtifactStore } from "../jobs/artifacts.js";
import { JOB_ID_PATTERN } from "../core/ids.js";
import { log } from "../core/log.js";
import type { JobStore } from "../jobs/store.js";
import { realPathIn, withinRoots } from "../core/validate.js";
import { DEFAULT_LORA_CACHE_BYTES, LoraCache, LoraInvalid, LoraMismatch, type LoraFile, type MappedLora } from "./lora.js";
import { ModelRegistry, type LoadedModel, type RuntimeOptions } from "./model.js";
import { render, RenderCancelled } from "./pipeline.js";
import { SafetensorsError, SafetensorsTooLarge } from "./safetensors.js";
import { SCHEDULERS, type SchedulerName } from "./schedulers.js";
import { Semaphore } from "./queue.js";

export const LIMITS = {
  steps: { min: 1, max: 150, default: 25 },
  guidance: { min: 0, max: 30, default: 7.5 },
  size: { min: 64, max: 2048 },
  numImages: { min: 1, max: 8, default: 1 },
  loras: 16,
  scale: 10,
  /** Characters of each prompt (LORAFORGE_INFER_MAX_PROMPT_CHARS); CLIP reads only the first 77 tokens anyway. */
  promptChars: 4096,
};

export interface InferenceOptions extends RuntimeOptions {
  /** Requests rendering at once (default 1: one request already uses every core). */
  concurrency?: number;
  /** Requests allowed to wait; more are refused with RESOURCE_EXHAUSTED (default 16). */
  maxQueued?: number;
  /** Characters allowed in each prompt (default LIMITS.promptChars). */
  maxPromptChars?: number;
  /** Bytes of decoded LoRA tensors kept between requests; a bigger LoRA is refused (default 2 GiB). */
  loraCacheBytes?: number;
}

/** SDXL's size-conditioning values: 1..16384 pixels (crop 0..16384). */
const COND_MAX = 16384;

interface Validated {
  steps: number;
  guidance: number;
  seed: number;
  numImages: number;
  scheduler: SchedulerName;
  width?: number;
  height?: number;
}

/** Why a path inside the roots as written is not inside them really (a symlink out), or null. */
function linkOut(p: string, roots: string[]): string | null {
  const real = realPathIn(path.resolve(p), roots);
  return real && !real.inside ? `leads outside the server's data roots through a symbolic link (${roots.join(", ")})` : null;
}

/** Every bad field of a request, each named (INVALID_ARGUMENT lists them all at once). */
export function validateInfer(
  req: InferRequest,
  roots: string[],
  maxPromptChars = LIMITS.promptChars,
): { v: Validated; violations: FieldViolation[] } {
  const bad: FieldViolation[] = [];
  const add = (field: string, description: string) => bad.push({ field, description });
  const int = (field: string, v: number | undefined, min: number, max: number, def: number) => {
    if (v === undefined) return def;
    if (!Number.isInteger(v) || v < min || v > max) add(field, `must be an integer in ${min}..${max}, got ${v}`);
    return v;
  };
  const steps = int("num_inference_steps", req.numInferenceSteps, LIMITS.steps.min, LIMITS.steps.max, LIMITS.steps.default);
  const numImages = int("num_images", req.numImages, LIMITS.numImages.min, LIMITS.numImages.max, LIMITS.numImages.default);
  const guidance = req.guidanceScale ?? LIMITS.guidance.default;
  if (!Number.isFinite(guidance) || guidance < LIMITS.guidance.min || guidance > LIMITS.guidance.max)
    add("guidance_scale", `must be a number in ${LIMITS.guidance.min}..${LIMITS.guidance.max}, got ${guidance}`);
  for (const [field, v] of [["width", req.width], ["height", req.height]] as const) {
    if (v === undefined) continue;
    if (!Number.isInteger(v) || v < LIMITS.size.min || v > LIMITS.size.max || v % 8 !== 0)
      add(field, `must be a multiple of 8 in ${LIMITS.size.min}..${LIMITS.size.max}, got ${v}`);
  }
  const scheduler = (req.scheduler || "euler") as SchedulerName;
  if (!SCHEDULERS.includes(scheduler)) add("scheduler", `must be one of ${SCHEDULERS.join(", ")}, got ${JSON.stringify(req.scheduler)}`);
  if (!req.baseModel) add("base_model", "is required");
  else if (!path.isAbsolute(req.baseModel)) add("base_model", `must be an absolute path, got ${JSON.stringify(req.baseModel)}`);
  else if (!withinRoots(path.resolve(req.baseModel), roots)) add("base_model", `must lie inside one of the server's data roots (${roots.join(", ")})`);
  else if (roots.length > 0 && linkOut(req.baseModel, roots)) add("base_model", linkOut(req.baseModel, roots)!);
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
  if (req.loras.length > LIMITS.loras) add("loras", `at most ${LIMITS.loras} LoRAs, got ${req.loras.length}`);
  req.loras.forEach((l, i) => {
    const f = `loras[${i}]`;
    if (!l.source) add(`${f}.source`, "is required (job_id or path)");
    else if (l.source.$case === "path") {
      if (!path.isAbsolute(l.source.path)) add(`${f}.path`, `must be an absolute path, got ${JSON.stringify(l.source.path)}`);
      else if (!l.source.path.endsWith(".safetensors")) add(`${f}.path`, "must be a .safetensors file (pickle files are refused)");
      else if (!withinRoots(path.resolve(l.source.path), roots)) add(`${f}.path`, `must lie inside one of the server's data roots (${roots.join(", ")})`);
      else if (roots.length > 0 && linkOut(l.source.path, roots)) add(`${f}.path`, linkOut(l.source.path, roots)!);
    }
    if (l.scale !== undefined && !(Number.isFinite(l.scale) && Math.abs(l.scale) <= LIMITS.scale))
      add(`${f}.scale`, `must be a number in -${LIMITS.scale}..${LIMITS.scale}, got ${l.scale}`);
  });
  for (const [name, sc] of [
    ["size_conditioning", req.sizeConditioning],
    ["negative_size_conditioning", req.negativeSizeConditioning],
  ] as const) {
    if (!sc) continue;
    for (const [field, v, min] of [
      ["original_width", sc.originalWidth, 1],
      ["original_height", sc.originalHeight, 1],
      ["crop_top", sc.cropTop, 0],
      ["crop_left", sc.cropLeft, 0],
      ["target_width", sc.targetWidth, 1],
      ["target_height", sc.targetHeight, 1],
    ] as const) {
      if (v !== undefined && (!Number.isInteger(v) || v < min || v > COND_MAX))
        add(`${name}.${field}`, `must be an integer in ${min}..${COND_MAX}, got ${v}`);
    }
  }
  const seed = req.seed ?? randomInt(0, 2 ** 47);
  if (!Number.isSafeInteger(seed)) add("seed", `must be an integer of at most 53 bits, got ${seed}`);
  return { v: { steps, guidance, seed, numImages, scheduler, width: req.width, height: req.height }, violations: bad };
}

/** What Infer needs from the server it runs in (a slice of ServerConfig, passed down by server.ts). */
export interface InferHost {
  python: string;
  engineDir: string;
  stateDir: string;
  dataRoots: string[];
}

export function addInferenceService(server: Server, deps: { store: JobStore; config: InferHost; options?: InferenceOptions }): { close(): Promise<void> } {
  const { store, config } = deps;
  const opts = deps.options ?? {};
  const registry = new ModelRegistry(
    { python: config.python, engineDir: config.engineDir, cacheRoot: path.join(config.stateDir, "onnx") },
    { intraOpThreads: opts.intraOpThreads ?? envInt("LORAFORGE_INFER_THREADS"), providers: opts.providers },
  );
  const loras = new LoraCache(opts.loraCacheBytes ?? mib(envInt("LORAFORGE_INFER_LORA_CACHE_MB")) ?? DEFAULT_LORA_CACHE_BYTES);
  const maxPromptChars = opts.maxPromptChars ?? envInt("LORAFORGE_INFER_MAX_PROMPT_CHARS") ?? LIMITS.promptChars;
  const queue = new Semaphore(opts.concurrency ?? envInt("LORAFORGE_INFER_CONCURRENCY") ?? 1, opts.maxQueued ?? 16);
  let closed = false;
  let artifacts: Promise<ArtifactStore> | null = null;

  async function loraFile(ref: InferRequest["loras"][number], i: number): Promise<string> {
    const src = ref.source!;
    if (src.$case === "path") {
      // The real path: checked against the roots again (the link may have changed) and the cache's key.
      const real = realPathIn(path.resolve(src.path), config.dataRoots);
      if (!real || !statSync(real.real).isFile()) throw loraNotFound(`loras[${i}].path`, `no LoRA file at ${src.path}`);
      if (!real.inside) throw invalidInferRequest([{ field: `loras[${i}].path`, description: linkOut(src.path, config.dataRoots) ?? "leaves the data roots" }]);
      return real.real;
    }
    const cur = JOB_ID_PATTERN.test(src.jobId) ? await store.get(src.jobId) : null;
    if (!cur) throw loraNotFound(`loras[${i}].job_id`, `job ${JSON.stringify(src.jobId)} does not exist`);
    const art = cur.job.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA);
    if (cur.job.state !== JobState.JOB_STATE_SUCCEEDED || !art)
      throw loraNotFound(`loras[${i}].job_id`, `job ${src.jobId} has no final LoRA (it has not succeeded)`);
    if (existsSync(art.path)) return art.path;
    // Trained by a worker on another host: fetch it from the artifact store once.
    const local = path.join(config.stateDir, "infer-loras", src.jobId, path.basename(art.path));
    if (existsSync(local)) return local;
    if (!art.objectName) throw loraNotFound(`loras[${i}].job_id`, `the LoRA of job ${src.jobId} (${art.path}) is not on this host`);
    artifacts ??= ArtifactStore.open(store.nc);
    const chunks: Uint8Array[] = [];
    for await (const c of (await artifacts).read(art.objectName)) chunks.push(c);
    const bytes = Buffer.concat(chunks);
    if (art.sha256 && createHash("sha256").update(bytes).digest("hex") !== art.sha256)
      throw loraNotFound(`loras[${i}].job_id`, `the stored LoRA of job ${src.jobId} does not match its checksum`);
    mkdirSync(path.dirname(local), { recursive: true });
    writeFileSync(local + ".tmp", bytes);
    renameSync(local + ".tmp", local);
    return local;
  }

  async function infer(req: InferRequest, cancelled: () => boolean): Promise<InferResponse> {
    const tStart = performance.now();
    if (closed) throw new ApiError(status.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server");
    const { v, violations } = validateInfer(req, config.dataRoots, maxPromptChars);
    if (violations.length > 0) throw invalidInferRequest(violations);
    if (!existsSync(path.join(req.baseModel, "model_index.json")))
      throw modelNotFound(req.baseModel);
    const files = await Promise.all(req.loras.map((l, i) => loraFile(l, i)));

    const release = await queue.acquire(cancelled);
    try {
      const queueMs = performance.now() - tStart;
      if (cancelled()) throw inferCancelled();
      // LoRA files are read and checked before the model loads: a bad one costs no export.
      let t = performance.now();
      const parsed: LoraFile[] = [];
      for (const [i, f] of files.entries()) {
        const field = req.loras[i].source!.$case === "path" ? `loras[${i}].path` : `loras[${i}].job_id`;
        try {
          parsed.push(await loras.file(f));
        } catch (err) {
          if (err instanceof SafetensorsError) throw invalidLora(field, err.message);
          if (err instanceof SafetensorsTooLarge) throw loraTooLarge(field, err.bytes, err.limit);
          throw err;
        }
      }
      let loraMs = performance.now() - t;
      t = performance.now();
      const model: LoadedModel = await registry.get(realPathIn(path.resolve(req.baseModel), config.dataRoots)?.real ?? path.resolve(req.baseModel));
      const loadModelMs = performance.now() - t;

      const native = model.manifest.unet.sample_size * model.manifest.unet.vae_factor;
      const width = v.width ?? native;
      const height = v.height ?? native;
      const multiple = model.manifest.unet.latent_multiple * model.manifest.unet.vae_factor;
      const modelBad: FieldViolation[] = [];
      if (width % multiple !== 0) modelBad.push({ field: "width", description: `must be a multiple of ${multiple} for this base model, got ${width}` });
      if (height % multiple !== 0) modelBad.push({ field: "height", description: `must be a multiple of ${multiple} for this base model, got ${height}` });
      if (!model.isXL) {
        // Fields only a second text encoder and SDXL's added conditioning can honour: refused, not ignored.
        if (req.prompt2 !== undefined) modelBad.push({ field: "prompt_2", description: "only SDXL base models have a second text encoder" });
        if (req.negativePrompt2 !== undefined)
          modelBad.push({ field: "negative_prompt_2", description: "only SDXL base models have a second text encoder" });
        if (req.sizeConditioning) modelBad.push({ field: "size_conditioning", description: "only SDXL base models take size conditioning" });
        if (req.negativeSizeConditioning)
          modelBad.push({ field: "negative_size_conditioning", description: "only SDXL base models take size conditioning" });
      }
      if (modelBad.length > 0) throw invalidInferRequest(modelBad);
      // SDXL's time ids: original (h, w), crop (top, left), target (h, w); unset sizes are the requested size.
      const ids = (sc: InferRequest["sizeConditioning"]) => [
        sc?.originalHeight ?? height,
        sc?.originalWidth ?? width,
        sc?.cropTop ?? 0,
        sc?.cropLeft ?? 0,
        sc?.targetHeight ?? height,
        sc?.targetWidth ?? width,
      ];
      const timeIds = ids(req.sizeConditioning);
      const negativeTimeIds = req.negativeSizeConditioning ? ids(req.negativeSizeConditioning) : timeIds;

      t = performance.now();
      const mapped: { lora: MappedLora; scale: number }[] = [];
      for (const [i, f] of parsed.entries()) {
        try {
          mapped.push({ lora: loras.map(f, model.manifest.model_hash, model.slots), scale: req.loras[i].scale ?? 1 });
        } catch (err) {
          if (err instanceof LoraMismatch) throw loraMismatch(`loras[${i}]`, err.layer, err.message);
          if (err instanceof LoraInvalid) throw invalidLora(`loras[${i}]`, err.message);
          throw err;
        }
      }
      loraMs += performance.now() - t;

      const { pngs, timings } = await render(model, {
        prompt: req.prompt,
        negativePrompt: req.negativePrompt,
        prompt2: req.prompt2,
        negativePrompt2: req.negativePrompt2,
        timeIds,
        negativeTimeIds,
        steps: v.steps,
        guidanceScale: v.guidance,
        seed: v.seed,
        width,
        height,
        numImages: v.numImages,
        scheduler: v.scheduler,
        loras: mapped,
        cancelled: () => cancelled() || closed,
      });
      return {
        images: pngs.map((png, i) => ({ png, seed: v.seed + i, width, height })),
        timings: {
          queueMs,
          loadModelMs,
          loraMs,
          textEncodeMs: timings.textEncodeMs,
          denoiseMs: timings.denoiseMs,
          decodeMs: timings.decodeMs,
          pngMs: timings.pngMs,
          totalMs: performance.now() - tStart,
        },
        modelHash: model.manifest.model_hash,
      };
    } catch (err) {
      if (err instanceof RenderCancelled) {
        log("info", "inference cancelled", { step: err.step, steps: err.steps });
        throw inferCancelled();
      }
      throw err;
    } finally {
      release();
    }
  }

  async function listModels(_req: ListModelsRequest): Promise<ListModelsResponse> {
    const baseModels = registry.listExports().map(({ manifest }) => ({
      path: manifest.source,
      modelHash: manifest.model_hash,
      nativeSize: manifest.unet.sample_size * manifest.unet.vae_factor,
      loraSlots: manifest.slots.length,
    }));
    const trained: ListModelsResponse["loras"] = [];
    for (const id of await store.jobIds()) {
      const cur = await store.get(id);
      if (!cur || cur.job.state !== JobState.JOB_STATE_SUCCEEDED) continue;
      const art = cur.job.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA);
      if (!art) continue;
      trained.push({ jobId: id, path: art.path, baseModel: cur.job.spec?.baseModel ?? "", rank: cur.job.spec?.rank ?? 4 });
    }
    return { baseModels, loras: trained };
  }

  const impl: InferenceServiceServer = {
    infer: (call: ServerUnaryCall<InferRequest, InferResponse>, callback: sendUnaryData<InferResponse>) => {
      let gone = false;
      call.on("cancelled", () => (gone = true));
      infer(call.request, () => gone || call.cancelled).then(
        (res) => callback(null, res),
        (err) => {
          if (!(err instanceof ApiError)) log("error", "Infer failed", { err: String(err?.stack ?? err) });
          callback(toServiceError(err));
        },
      );
    },
    listModels: (call: ServerUnaryCall<ListModelsRequest, ListModelsResponse>, callback: sendUnaryData<ListModelsResponse>) => {
      listModels(call.request).then(
        (res) => callback(null, res),
        (err) => callback(toServiceError(err)),
      );
    },
  };
  server.addService(InferenceServiceService, impl);
  return {
    async close() {
      closed = true;
      queue.close();
      await queue.idle();
      await registry.close();
    },
  };
}

const mib = (n: number | undefined) => (n === undefined ? undefined : n * 1024 * 1024);

function envInt(name: string): number | undefined {
  const v = process.env[name];
  if (!v) return undefined;
  const n = Number(v);
  return Number.isInteger(n) && n > 0 ? n : undefined;
}
