// One text-to-image run on a loaded model, step for step what diffusers' StableDiffusionPipeline
// (StableDiffusionXLPipeline for SDXL exports) does: tokenize, encode the prompt (and the negative
// prompt for classifier-free guidance), scale the initial latents, denoise with the sampler, decode
// with the VAE, encode PNGs.
import ort from "onnxruntime-node";
import sharp from "sharp";
import type { LoadedModel, Manifest } from "./model.js";
import { floatData, floatTensor } from "./half.js";
import { slotFeeds, type Component, type FeedDtype, type MappedLora } from "./lora.js";
import { initialLatents } from "./rng.js";
import { makeScheduler, type SchedulerName } from "./schedulers.js";

export interface RenderParams {
  prompt: string;
  negativePrompt: string;
  /** SDXL: the second text encoder's prompt and negative prompt (unset: the first ones). */
  prompt2?: string;
  negativePrompt2?: string;
  /** SDXL: original size (h, w), crop top-left (y, x), target size (h, w); unset: the requested size, no crop. */
  timeIds?: number[];
  /** SDXL: the same for the negative rows of classifier-free guidance; unset: timeIds. */
  negativeTimeIds?: number[];
  steps: number;
  guidanceScale: number;
  seed: number;
  width: number;
  height: number;
  numImages: number;
  scheduler: SchedulerName;
  loras: { lora: MappedLora; scale: number }[];
  /** The slot inputs of `loras` per component, when the caller keeps them built (LoraCombo.feeds); unset: built here. */
  feeds?: (component: Component, dtype: FeedDtype) => Record<string, ort.Tensor>;
  /** Checked before every denoising step; when it returns true the run stops with RenderCancelled. */
  cancelled?: () => boolean;
  /** Initial latents (unit Gaussian, [n, c, h/8, w/8]) instead of the seeded ones. */
  latents?: Float32Array;
}

export interface RenderTimings {
  textEncodeMs: number;
  denoiseMs: number;
  decodeMs: number;
  pngMs: number;
}

export class RenderCancelled extends Error {
  constructor(
    readonly step: number,
    readonly steps: number,
  ) {
    super(`the request was cancelled before denoising step ${step + 1} of ${steps}`);
  }
}

const now = () => performance.now();

/** The request's LoRA inputs for one component: the caller's built ones, else built from its LoRAs now. */
const loraFeeds = (model: LoadedModel, p: RenderParams, component: Component, dtype: FeedDtype) =>
  p.feeds ? p.feeds(component, dtype) : slotFeeds(model.slots, component, p.loras, dtype);

/** Rows [i] of a [rows, ...] float tensor, repeated: out = rows[pick[0]], rows[pick[1]], … */
function gatherRows(data: Float32Array, rowSize: number, pick: number[]): Float32Array {
  const out = new Float32Array(pick.length * rowSize);
  pick.forEach((r, i) => out.set(data.subarray(r * rowSize, (r + 1) * rowSize), i * rowSize));
  return out;
}

function idsTensor(tok: LoadedModel["tokenizer"], texts: string[], seqLen: number): ort.Tensor {
  const ids = new BigInt64Array(texts.length * seqLen);
  texts.forEach((t, i) => tok.encode(t).forEach((id, j) => (ids[i * seqLen + j] = BigInt(id))));
  return new ort.Tensor("int64", ids, [texts.length, seqLen]);
}

interface TextConditioning {
  /** encoder_hidden_states [batch, seq, dim] (batch = n, or 2n with guidance: n negative rows first). */
  ehs: Float32Array;
  dims: number[];
  /** SDXL: the pooled text embeddings [batch, projection_dim]. */
  pooled?: Float32Array;
  pooledDim?: number;
}

/**
 * The prompt (and negative prompt) through the text encoder(s), each row repeated per image.
 * SD: last_hidden_state. SDXL: both encoders' penultimate hidden states concatenated along the
 * feature axis, and text_encoder_2's projected pooled output; with guidance and no negative prompt,
 * zeros for the negative rows when the model's force_zeros_for_empty_prompt says so.
 */
async function encodeText(model: LoadedModel, p: RenderParams, cfg: boolean): Promise<TextConditioning> {
  const m = model.manifest;
  const n = p.numImages;
  const seqLen = m.text_encoder.max_length;
  const pick = cfg ? [...Array(n).fill(0), ...Array(n).fill(1)] : Array(n).fill(0);
  const io = (f: keyof Manifest["files"]) => m.io_dtype?.[f] ?? "float32";
  if (!model.isXL) {
    const texts = cfg ? [p.negativePrompt, p.prompt] : [p.prompt];
    const hidden = m.text_encoder.hidden_size;
    const te = await model.textEncoder.run({
      input_ids: idsTensor(model.tokenizer, texts, seqLen),
      ...loraFeeds(model, p, "text_encoder", io("text_encoder")),
    });
    const embeds = floatData(te[model.textEncoder.outputNames[0]]);
    return { ehs: gatherRows(embeds, seqLen * hidden, pick), dims: [pick.length, seqLen, hidden] };
  }

  const te2 = model.textEncoder2!;
  const negative2 = p.negativePrompt2 ?? p.negativePrompt;
  // No negative prompt for either encoder: zeros (the pipeline's negative_prompt=None).
  const zeroNegative = cfg && p.negativePrompt === "" && negative2 === "" && m.force_zeros_for_empty_prompt !== false;
  const texts = cfg && !zeroNegative ? [p.negativePrompt, p.prompt] : [p.prompt];
  const texts2 = cfg && !zeroNegative ? [negative2, p.prompt2 ?? p.prompt] : [p.prompt2 ?? p.prompt];
  const h1 = m.text_encoder.hidden_size;
  const h2 = m.text_encoder_2!.hidden_size;
  const pooledDim = m.text_encoder_2!.projection_dim;
  const [o1, o2] = await Promise.all([
    model.textEncoder.run({
      input_ids: idsTensor(model.tokenizer, texts, seqLen),
      ...loraFeeds(model, p, "text_encoder", io("text_encoder")),
    }),
    te2.run({
      input_ids: idsTensor(model.tokenizer2!, texts2, m.text_encoder_2!.max_length),
      ...loraFeeds(model, p, "text_encoder_2", io("text_encoder_2")),
    }),
  ]);
  const e1 = floatData(o1.penultimate_hidden_state);
  const e2 = floatData(o2.penultimate_hidden_state);
  const pooled = floatData(o2.text_embeds);
  // Rows of the encoded texts, plus a zero row in front when the negative is zeros.
  const rows = texts.length + (zeroNegative ? 1 : 0);
  const first = zeroNegative ? 1 : 0;
  const dim = h1 + h2;
  const ehsRows = new Float32Array(rows * seqLen * dim);
  const pooledRows = new Float32Array(rows * pooledDim);
  for (let t = 0; t < texts.length; t++) {
    const r = t + first;
    for (let j = 0; j < seqLen; j++) {
      const dst = (r * seqLen + j) * dim;
      ehsRows.set(e1.subarray((t * seqLen + j) * h1, (t * seqLen + j + 1) * h1), dst);
      ehsRows.set(e2.subarray((t * seqLen + j) * h2, (t * seqLen + j + 1) * h2), dst + h1);
    }
    pooledRows.set(pooled.subarray(t * pooledDim, (t + 1) * pooledDim), r * pooledDim);
  }
  return {
    ehs: gatherRows(ehsRows, seqLen * dim, pick),
    dims: [pick.length, seqLen, dim],
    pooled: gatherRows(pooledRows, pooledDim, pick),
    pooledDim,
  };
}

export async function render(model: LoadedModel, p: RenderParams): Promise<{ pngs: Buffer[]; timings: RenderTimings }> {
  const m = model.manifest;
  const cfg = p.guidanceScale > 1 && m.unet.time_cond_proj_dim === null;
  const n = p.numImages;
  const unetIo = m.io_dtype?.unet ?? "float32";

  // --- text: [negative, prompt] in one batch, then each repeated per image.
  let t0 = now();
  const text = await encodeText(model, p, cfg);
  const batch = text.dims[0];
  const ehs = floatTensor(text.ehs, text.dims, unetIo);
  const added: Record<string, ort.Tensor> = {};
  if (model.isXL) {
    // SDXL's size conditioning: original size, crop top-left, target size (all (h, w)); the
    // pipeline's defaults: the requested size, no crop, the requested size. With guidance the first
    // n rows are the negative branch (its own values when given, else the same).
    const ids = p.timeIds ?? [p.height, p.width, 0, 0, p.height, p.width];
    const negIds = p.negativeTimeIds ?? ids;
    const timeIds = new Float32Array(batch * ids.length);
    for (let b = 0; b < batch; b++) timeIds.set(cfg && b < n ? negIds : ids, b * ids.length);
    added.text_embeds = floatTensor(text.pooled!, [batch, text.pooledDim!], unetIo);
    added.time_ids = new ort.Tensor("float32", timeIds, [batch, ids.length]);
  }
  const textEncodeMs = now() - t0;

  // --- denoise
  t0 = now();
  const c = m.unet.in_channels;
  const lh = p.height / m.unet.vae_factor;
  const lw = p.width / m.unet.vae_factor;
  const per = c * lh * lw;
  const sched = makeScheduler(p.scheduler, m.scheduler_config, p.steps);
  const noise = p.latents ?? initialLatents(p.seed, n, c, lh, lw);
  let latents: Float32Array = noise.map((v) => v * sched.initNoiseSigma);
  const unetSlots = loraFeeds(model, p, "unet", unetIo);
  for (let i = 0; i < sched.timesteps.length; i++) {
    if (p.cancelled?.()) throw new RenderCancelled(i, sched.timesteps.length);
    const input = cfg ? new Float32Array(2 * n * per) : new Float32Array(n * per);
    input.set(latents);
    if (cfg) input.set(latents, n * per);
    const scaled = sched.scaleModelInput(input, i);
    const out = await model.unet.run({
      sample: floatTensor(scaled, [batch, c, lh, lw], unetIo),
      timestep: new ort.Tensor("float32", new Float32Array(batch).fill(sched.timesteps[i]), [batch]),
      encoder_hidden_states: ehs,
      ...added,
      ...unetSlots,
    });
    const pred = floatData(out[model.unet.outputNames[0]]);
    let guided: Float32Array;
    if (cfg) {
      guided = new Float32Array(n * per);
      const g = p.guidanceScale;
      for (let j = 0; j < guided.length; j++) {
        const u = pred[j];
        guided[j] = u + g * (pred[n * per + j] - u);
      }
    } else guided = pred;
    latents = sched.step(guided, i, latents);
  }
  const denoiseMs = now() - t0;

  // --- decode
  t0 = now();
  const sf = m.vae.scaling_factor;
  const shift = m.vae.shift_factor ?? 0;
  const lc = m.vae.latent_channels;
  const mean = m.vae.latents_mean;
  const std = m.vae.latents_std;
  // SDXL's pipeline denormalizes with latents_mean/std when the VAE config has them, else divides by
  // scaling_factor (it ignores shift_factor).
  const unscaled =
    model.isXL && mean && std
      ? latents.map((v, j) => {
          const ch = Math.floor(j / (lh * lw)) % lc;
          return (v * std[ch]) / sf + mean[ch];
        })
      : model.isXL
        ? latents.map((v) => v / sf)
        : latents.map((v) => v / sf + shift);
  const dec = await model.vaeDecoder.run({
    latent: floatTensor(unscaled, [n, lc, lh, lw], m.io_dtype?.vae_decoder ?? "float32"),
  });
  const img = floatData(dec[model.vaeDecoder.outputNames[0]]);
  const decodeMs = now() - t0;

  // --- PNG: (x / 2 + 0.5) clamped to [0, 1], × 255, rounded (diffusers' postprocess), CHW → HWC.
  t0 = now();
  const hw = p.width * p.height;
  const pngs: Buffer[] = [];
  for (let k = 0; k < n; k++) {
    const rgb = Buffer.alloc(hw * 3);
    const base = k * 3 * hw;
    for (let ch = 0; ch < 3; ch++)
      for (let j = 0; j < hw; j++) {
        const v = Math.min(1, Math.max(0, Math.fround(img[base + ch * hw + j] / 2 + 0.5)));
        rgb[j * 3 + ch] = Math.round(Math.fround(v * 255));
      }
    pngs.push(await sharp(rgb, { raw: { width: p.width, height: p.height, channels: 3 } }).png().toBuffer());
  }
  const pngMs = now() - t0;
  return { pngs, timings: { textEncodeMs, denoiseMs, decodeMs, pngMs } };
}
