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
  InferRequest,
  ListModelsRequest,
  Sampler,
  type InferenceServiceServer,
  type InferResponse,
  type ListModelsResponse,
} from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import {
  ApiError,
  inferCancelled,
  inferTooLarge,
  invalidInferRequest,
  invalidRequest,
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
import { hostPath, realOr, withinRoots } from "../core/paths.js";
import { ruleViolations } from "../core/rules.js";
import { DEFAULT_LORA_CACHE_BYTES, LoraCache, LoraInvalid, LoraMismatch, type LoraFile, type MappedLora } from "./lora.js";
import { defaultMemoryBudget, MemoryBudget, planRequest, readMemoryShape, type MemoryShape } from "./memory.js";
import { ModelRegistry, type LoadedModel, type RuntimeOptions } from "./model.js";
import { render, RenderCancelled } from "./pipeline.js";
import { OutsideRoots, SafetensorsError, SafetensorsTooLarge } from "./safetensors.js";
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
}

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
  };
  placed("base_model", req.baseModel, "folder");
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
}

export function addInferenceService(server: Server, deps: { store: JobStore; config: InferHost; options?: InferenceOptions }): { close(): Promise<void> } {
  const { store, config } = deps;
  const opts = deps.options ?? {};
  const memArena = opts.memArena ?? process.env.LORAFORGE_INFER_MEM_ARENA !== "0";
  const registry = new ModelRegistry(
    { python: config.python, engineDir: config.engineDir, cacheRoot: path.join(config.stateDir, "onnx") },
    { intraOpThreads: opts.intraOpThreads ?? envInt("LORAFORGE_INFER_THREADS"), providers: opts.providers, memArena },
  );
  const loras = new LoraCache(opts.loraCacheBytes ?? mib(envInt("LORAFORGE_INFER_LORA_CACHE_MB")) ?? DEFAULT_LORA_CACHE_BYTES);
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
      throw invalidInferRequest([
        { field: "base_model", description: `not a diffusers model folder: unet/config.json or vae/config.json is missing or unreadable (${(err as Error).message.split("\n")[0].slice(0, 200)})` },
      ]);
    }
  }
  let closed = false;
  let artifacts: Promise<ArtifactStore> | null = null;

  /** Whether a real path (not resolved again) lies inside the data roots' own real paths (always, without roots). */
  const insideRoots = (real: string) => withinRoots(real, config.dataRoots.map(realOr));

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

  async function infer(req: InferRequest, cancelled: () => boolean): Promise<InferResponse> {
    const tStart = performance.now();
    if (closed) throw new ApiError(status.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server");
    const { v, violations } = validateInfer(req, config.dataRoots, maxPromptChars);
    if (violations.length > 0) throw invalidInferRequest(violations);
    const base = hostPath(req.baseModel, config.dataRoots, "folder");
    if (!("real" in base) || !existsSync(path.join(base.real, "model_index.json"))) throw modelNotFound(req.baseModel);
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
    try {
      const queueMs = performance.now() - tStart;
      if (cancelled()) throw inferCancelled();
      // LoRA files are read and checked before the model loads: a bad one costs no export.
      let t = performance.now();
      const parsed: LoraFile[] = [];
      for (const [i, f] of files.entries()) {
        const field = req.loras[i].source!.$case === "path" ? `loras[${i}].path` : `loras[${i}].job_id`;
        try {
          parsed.push(await loras.file(f, req.loras[i].source!.$case === "path" ? insideRoots : undefined));
        } catch (err) {
          if (err instanceof OutsideRoots)
            throw invalidInferRequest([{ field, description: `leads outside the server's data roots through a symbolic link (${config.dataRoots.join(", ")})` }]);
          if (err instanceof SafetensorsError) throw invalidLora(field, err.message);
          if (err instanceof SafetensorsTooLarge) throw loraTooLarge(field, err.bytes, err.limit);
          throw err;
        }
      }
      let loraMs = performance.now() - t;
      t = performance.now();
      const model: LoadedModel = await registry.get(base.real);
      const loadModelMs = performance.now() - t;

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
      // The session inputs of this combination of files and scales: built by the first request that uses it, then reused.
      const combo = loras.combination(model.manifest.model_hash, model.slots, parsed.map((file, i) => ({ file, scale: mapped[i].scale })));
      loraMs += performance.now() - t;

      releaseMemory = await memory.acquire(plan.bytes, cancelled);
      if (cancelled()) throw inferCancelled();
      if (plan.perGroup < v.numImages)
        log("info", "Infer renders in image groups to stay within its memory budget", {
          images: v.numImages,
          perGroup: plan.perGroup,
          estimateMiB: Math.ceil(plan.bytes / 2 ** 20),
          budgetMiB: Math.floor(memory.total / 2 ** 20),
        });
      // Image i's noise comes from seed + i, so groups render exactly the images one batch would.
      const pngs: Buffer[] = [];
      const timings = { textEncodeMs: 0, denoiseMs: 0, decodeMs: 0, pngMs: 0 };
      for (let start = 0; start < v.numImages; start += plan.perGroup) {
        const group = await render(model, {
          prompt: req.prompt,
          negativePrompt: req.negativePrompt,
          prompt2: req.prompt2,
          negativePrompt2: req.negativePrompt2,
          timeIds,
          negativeTimeIds,
          steps: v.steps,
          guidanceScale: v.guidance,
          seed: v.seed + start,
          width,
          height,
          numImages: Math.min(plan.perGroup, v.numImages - start),
          scheduler: v.scheduler,
          loras: mapped,
          feeds: combo.feeds,
          cancelled: () => cancelled() || closed,
        });
        pngs.push(...group.pngs);
        for (const k of Object.keys(timings) as (keyof typeof timings)[]) timings[k] += group.timings[k];
      }
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
      releaseMemory();
      release();
    }
  }

  async function listModels(req: ListModelsRequest): Promise<ListModelsResponse> {
    const violations = ruleViolations(ListModelsRequest, "loraforge.v1.ListModelsRequest", req);
    if (violations.length > 0) throw invalidRequest("INVALID_REQUEST", "invalid ListModelsRequest", violations);
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
      trained.push({ jobId: id, artifactName: art.name, baseModel: cur.job.spec?.baseModel ?? "", rank: cur.job.spec?.rank ?? 4 });
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
