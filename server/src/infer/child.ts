// The Infer process: a child of `loraforge serve` (forked by infer/process.ts) that holds the
// onnxruntime sessions and the LoRA cache and renders what the serve process sends it over IPC.
// An out-of-memory or a crash here ends this process and its requests, not the API, the worker or
// the training jobs. It exits when its parent goes away, however that happens (the IPC channel
// closes), and when asked to (a retirement that returns its memory to the system).
import { writeFileSync } from "node:fs";
import type { InferRequest } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { ApiError, inferCancelled, invalidInferRequest, invalidLora, loraMismatch, loraTooLarge, rethrowModelOutsideRoots, type FieldViolation } from "../core/errors.js";
import { log } from "../core/log.js";
import { realOr, withinRoots } from "../core/paths.js";
import { DEFAULT_LORA_CACHE_BYTES, LoraCache, LoraInvalid, LoraMismatch, type LoraFile, type MappedLora } from "./lora.js";
import { ModelRegistry, type LoadedModel } from "./model.js";
import { render, RenderCancelled } from "./pipeline.js";
import type { ChildInit, ToChild, ToParent, RenderJob, RenderResult, SerializedError } from "./process.js";
import { OutsideRoots, SafetensorsError, SafetensorsTooLarge } from "./safetensors.js";

if (!process.send) {
  process.stderr.write("infer/child.js runs only as the Infer process of `loraforge serve`\n");
  process.exit(2);
}
const send = (m: ToParent) => process.send!(m);

// Added to this process's OOM score (raising one's own needs no privilege): when memory runs out
// anyway, the kernel's OOM killer ends a render before serve or a training engine.
if (process.platform === "linux") {
  try {
    writeFileSync("/proc/self/oom_score_adj", "500");
  } catch (err) {
    log("warn", "Infer process: could not raise its OOM score", { err: String(err) });
  }
}

let registry: ModelRegistry;
let loras: LoraCache;
let roots: string[] = [];
/** Requests the parent has cancelled (their renders stop before the next denoising step). */
const cancelledIds = new Set<number>();
let exiting = false;

function setup(init: ChildInit) {
  registry = new ModelRegistry({ python: init.python, engineDir: init.engineDir, cacheRoot: init.cacheRoot }, init.runtime);
  loras = new LoraCache(init.loraCacheBytes ?? DEFAULT_LORA_CACHE_BYTES);
  roots = init.dataRoots;
}

/** Whether a real path (not resolved again) lies inside the data roots' own real paths (always, without roots). */
const insideRoots = (real: string) => withinRoots(real, roots.map(realOr));

async function renderJob(job: RenderJob): Promise<RenderResult> {
  const { req, width, height } = job;
  const cancelled = () => exiting || cancelledIds.has(job.id);
  // LoRA files are read and checked before the model loads: a bad one costs no export.
  let t = performance.now();
  const parsed: LoraFile[] = [];
  for (const l of job.loras) {
    try {
      parsed.push(await loras.file(l.file, l.confined ? insideRoots : undefined));
    } catch (err) {
      if (err instanceof OutsideRoots)
        throw invalidInferRequest([{ field: l.field, description: `leads outside the server's data roots through a symbolic link (${roots.join(", ")})` }]);
      if (err instanceof SafetensorsError) throw invalidLora(l.field, err.message);
      if (err instanceof SafetensorsTooLarge) throw loraTooLarge(l.field, err.bytes, err.limit);
      throw err;
    }
  }
  let loraMs = performance.now() - t;
  t = performance.now();
  const model: LoadedModel = await registry.get(job.base.dir, job.base.hash, job.base.confined ? roots : []).catch(rethrowModelOutsideRoots);
  const loadModelMs = performance.now() - t;

  const multiple = model.manifest.unet.latent_multiple * model.manifest.unet.vae_factor;
  const modelBad: FieldViolation[] = [];
  if (width % multiple !== 0) modelBad.push({ field: "width", description: `must be a multiple of ${multiple} for this base model, got ${width}` });
  if (height % multiple !== 0) modelBad.push({ field: "height", description: `must be a multiple of ${multiple} for this base model, got ${height}` });
  if (!model.isXL) {
    // Fields only a second text encoder and SDXL's added conditioning can honour: refused, not ignored.
    if (req.prompt2 !== undefined) modelBad.push({ field: "prompt_2", description: "only SDXL base models have a second text encoder" });
    if (req.negativePrompt2 !== undefined) modelBad.push({ field: "negative_prompt_2", description: "only SDXL base models have a second text encoder" });
    if (req.sizeConditioning) modelBad.push({ field: "size_conditioning", description: "only SDXL base models take size conditioning" });
    if (req.negativeSizeConditioning) modelBad.push({ field: "negative_size_conditioning", description: "only SDXL base models take size conditioning" });
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
      mapped.push({ lora: loras.map(f, model.manifest.model_hash, model.slots), scale: job.loras[i].scale });
    } catch (err) {
      if (err instanceof LoraMismatch) throw loraMismatch(`loras[${i}]`, err.layer, err.message);
      if (err instanceof LoraInvalid) throw invalidLora(`loras[${i}]`, err.message);
      throw err;
    }
  }
  // The session inputs of this combination of files and scales: built by the first request that uses it, then reused.
  const combo = loras.combination(model.manifest.model_hash, model.slots, parsed.map((file, i) => ({ file, scale: mapped[i].scale })));
  loraMs += performance.now() - t;
  if (cancelled()) throw inferCancelled();

  // Image i's noise comes from seed + i, so groups render exactly the images one batch would.
  const pngs: Buffer[] = [];
  const timings = { textEncodeMs: 0, denoiseMs: 0, decodeMs: 0, pngMs: 0 };
  for (let start = 0; start < job.numImages; start += job.perGroup) {
    const group = await render(model, {
      prompt: req.prompt,
      negativePrompt: req.negativePrompt,
      prompt2: req.prompt2,
      negativePrompt2: req.negativePrompt2,
      timeIds,
      negativeTimeIds,
      steps: job.steps,
      guidanceScale: job.guidance,
      seed: job.seed + start,
      width,
      height,
      numImages: Math.min(job.perGroup, job.numImages - start),
      scheduler: job.scheduler,
      loras: mapped,
      feeds: combo.feeds,
      cancelled,
    });
    pngs.push(...group.pngs);
    for (const k of Object.keys(timings) as (keyof typeof timings)[]) timings[k] += group.timings[k];
  }
  return { pngs, modelHash: model.manifest.model_hash, timings: { loadModelMs, loraMs, ...timings } };
}

/** An error as the parent rebuilds it: ApiErrors whole, anything else as its stack (for the log, never the client). */
function serialize(err: unknown): SerializedError {
  if (err instanceof RenderCancelled) {
    log("info", "inference cancelled", { step: err.step, steps: err.steps });
    err = inferCancelled();
  }
  if (err instanceof ApiError) return { api: { code: err.code, reason: err.reason, message: err.message, violations: err.violations, metadata: err.metadata } };
  return { internal: String((err as Error)?.stack ?? err) };
}

process.on("message", (m: ToChild) => {
  switch (m.type) {
    case "init":
      setup(m.init);
      send({ type: "ready" });
      break;
    case "render":
      renderJob(m.job).then(
        (result) => send({ type: "done", id: m.job.id, result }),
        (err) => send({ type: "failed", id: m.job.id, error: serialize(err) }),
      ).finally(() => cancelledIds.delete(m.job.id));
      break;
    case "cancel":
      cancelledIds.add(m.id);
      break;
    case "warm":
      // A fresh process after a retirement opens the models its predecessor had open, before anyone waits for them.
      registry.get(m.dir, m.hash, m.confined ? roots : []).catch((err) => log("warn", "Infer process: reopening a model failed", { model: m.dir, err: String(err) }));
      break;
    case "exit":
      exiting = true;
      process.exit(0);
  }
});

// The parent is gone (it exited, or was killed): nobody is left to answer.
process.on("disconnect", () => {
  exiting = true;
  process.exit(0);
});
