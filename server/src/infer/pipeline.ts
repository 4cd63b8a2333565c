// One text-to-image run on a loaded model, step for step what diffusers' StableDiffusionPipeline
// does: tokenize, encode the prompt (and the negative prompt for classifier-free guidance), scale
// the initial latents, denoise with the sampler, decode with the VAE, encode PNGs.
import ort from "onnxruntime-node";
import sharp from "sharp";
import type { LoadedModel } from "./model.js";
import { slotFeeds, type MappedLora } from "./lora.js";
import { initialLatents } from "./rng.js";
import { makeScheduler, type SchedulerName } from "./schedulers.js";

export interface RenderParams {
  prompt: string;
  negativePrompt: string;
  steps: number;
  guidanceScale: number;
  seed: number;
  width: number;
  height: number;
  numImages: number;
  scheduler: SchedulerName;
  loras: { lora: MappedLora; scale: number }[];
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

/** Rows [i] of a [rows, ...] float tensor, repeated: out = rows[pick[0]], rows[pick[1]], … */
function gatherRows(data: Float32Array, rowSize: number, pick: number[]): Float32Array {
  const out = new Float32Array(pick.length * rowSize);
  pick.forEach((r, i) => out.set(data.subarray(r * rowSize, (r + 1) * rowSize), i * rowSize));
  return out;
}

export async function render(model: LoadedModel, p: RenderParams): Promise<{ pngs: Buffer[]; timings: RenderTimings }> {
  const m = model.manifest;
  const cfg = p.guidanceScale > 1 && m.unet.time_cond_proj_dim === null;
  const n = p.numImages;
  const seqLen = m.text_encoder.max_length;
  const hidden = m.text_encoder.hidden_size;

  // --- text: [negative, prompt] in one batch, then each repeated per image.
  let t0 = now();
  const texts = cfg ? [p.negativePrompt, p.prompt] : [p.prompt];
  const ids = new BigInt64Array(texts.length * seqLen);
  texts.forEach((t, i) => model.tokenizer.encode(t).forEach((id, j) => (ids[i * seqLen + j] = BigInt(id))));
  const te = await model.textEncoder.run({
    input_ids: new ort.Tensor("int64", ids, [texts.length, seqLen]),
    ...slotFeeds(model.slots, "text_encoder", p.loras),
  });
  const embeds = te[model.textEncoder.outputNames[0]].data as Float32Array;
  const pick = cfg ? [...Array(n).fill(0), ...Array(n).fill(1)] : Array(n).fill(0);
  const ehs = new ort.Tensor("float32", gatherRows(embeds, seqLen * hidden, pick), [pick.length, seqLen, hidden]);
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
  const unetSlots = slotFeeds(model.slots, "unet", p.loras);
  const batch = pick.length;
  for (let i = 0; i < sched.timesteps.length; i++) {
    if (p.cancelled?.()) throw new RenderCancelled(i, sched.timesteps.length);
    const input = cfg ? new Float32Array(2 * n * per) : new Float32Array(n * per);
    input.set(latents);
    if (cfg) input.set(latents, n * per);
    const scaled = sched.scaleModelInput(input, i);
    const out = await model.unet.run({
      sample: new ort.Tensor("float32", scaled, [batch, c, lh, lw]),
      timestep: new ort.Tensor("float32", new Float32Array(batch).fill(sched.timesteps[i]), [batch]),
      encoder_hidden_states: ehs,
      ...unetSlots,
    });
    const pred = out[model.unet.outputNames[0]].data as Float32Array;
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
  const dec = await model.vaeDecoder.run({
    latent: new ort.Tensor(
      "float32",
      latents.map((v) => v / sf + shift),
      [n, m.vae.latent_channels, lh, lw],
    ),
  });
  const img = dec[model.vaeDecoder.outputNames[0]].data as Float32Array;
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
