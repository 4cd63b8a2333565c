// Helpers shared by the Infer parity tests: the diffusers reference renderer
// (tests/py/infer_reference.py), its request files, and image comparison.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import sharp from "sharp";
import { Sampler, type InferRequest } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { initialLatents } from "@loraforge/server/infer/rng";
import { PYTHON, REPO } from "./harness.js";

export const REFERENCE = path.join(REPO, "tests", "py", "infer_reference.py");
export const PROMPT = "a red circle on a blue background";
/** Mean |ONNX − diffusers| per channel value, 0–255, that parity allows. */
export const TOLERANCE = 2;

/** The reference script's name for a sampler (diffusers' scheduler it stands for); unspecified means euler. */
export function samplerName(s: Sampler | undefined): string {
  switch (s ?? Sampler.SAMPLER_UNSPECIFIED) {
    case Sampler.SAMPLER_UNSPECIFIED:
    case Sampler.SAMPLER_EULER:
      return "euler";
    case Sampler.SAMPLER_DDIM:
      return "ddim";
    case Sampler.SAMPLER_DPMPP_2M:
      return "dpmpp_2m";
    default:
      throw new Error(`no reference for sampler ${s}`);
  }
}

/** Runs the reference script on a batch of jobs without blocking the event loop; resolves with stdout. */
export function reference(model: string, jobs: string[][], dir: string): Promise<string> {
  const file = path.join(dir, `jobs-${Date.now()}.json`);
  writeFileSync(file, JSON.stringify(jobs));
  return new Promise((resolve, reject) => {
    const child = spawn(PYTHON, [REFERENCE, "batch", model, file], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d));
    child.stderr.on("data", (d: Buffer) => (err += d));
    child.on("close", (code) => (code === 0 ? resolve(out) : reject(new Error(`infer_reference.py failed (${code}):\n${err.slice(-4000)}`))));
  });
}

/** RGB bytes of a PNG (buffer or file). */
export const rgb = (png: Buffer | string): Promise<Buffer> => sharp(png).removeAlpha().raw().toBuffer();

export function meanAbsDiff(a: Buffer, b: Buffer): number {
  assert.equal(a.length, b.length);
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i] - b[i]);
  return s / a.length;
}

/** A size conditioning as StableDiffusionXLPipeline's keyword arguments (prefix "" or "negative_"); none when unset. */
function sizeKwargs(prefix: string, sc: InferRequest["sizeConditioning"]): Record<string, number[]> {
  if (!sc) return {};
  return {
    [`${prefix}original_size`]: [sc.originalHeight ?? 64, sc.originalWidth ?? 64],
    [`${prefix}crops_coords_top_left`]: [sc.cropTop ?? 0, sc.cropLeft ?? 0],
    [`${prefix}target_size`]: [sc.targetHeight ?? 64, sc.targetWidth ?? 64],
  };
}

/**
 * Writes the reference's request for one parity case into `caseDir` — the same
 * initial latents the server drew for `req.seed` (so the two RNGs need not match)
 * — and returns the reference job that renders it into `caseDir/ref_<i>.png`.
 */
export function referenceJob(caseDir: string, req: Partial<InferRequest>, loras: { path: string; scale: number }[], n: number): string[] {
  mkdirSync(caseDir, { recursive: true });
  writeFileSync(path.join(caseDir, "latents.f32"), Buffer.from(initialLatents(req.seed!, n, 4, 8, 8).buffer));
  const request = {
    prompt: PROMPT,
    negative_prompt: req.negativePrompt ?? "",
    steps: req.numInferenceSteps,
    guidance_scale: req.guidanceScale,
    width: 64,
    height: 64,
    num_images: n,
    scheduler: samplerName(req.sampler),
    loras,
    latents: path.join(caseDir, "latents.f32"),
    out_dir: caseDir,
    // SDXL's second prompts and size conditioning, as the pipeline takes them ((h, w) sizes, (top, left) crop).
    ...(req.prompt2 !== undefined ? { prompt_2: req.prompt2 } : {}),
    ...(req.negativePrompt2 !== undefined ? { negative_prompt_2: req.negativePrompt2 } : {}),
    ...sizeKwargs("", req.sizeConditioning),
    ...sizeKwargs("negative_", req.negativeSizeConditioning),
  };
  writeFileSync(path.join(caseDir, "request.json"), JSON.stringify(request));
  return ["render", path.join(caseDir, "request.json")];
}

/** The tensor names and shapes of a safetensors file (its JSON header). */
export function safetensorsHeader(file: string): Record<string, { shape: number[] }> {
  const buf = readFileSync(file);
  const len = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + len).toString("utf8")) as Record<string, { shape: number[] }>;
  delete header.__metadata__;
  return header;
}

/** The tensor names of a safetensors file. */
export const safetensorsKeys = (file: string): string[] => Object.keys(safetensorsHeader(file));
