// Infer's memory, bounded by design: each request's memory is estimated from the base model's
// architecture and the requested size before it runs; a request is split into image groups that
// fit the server's budget, waits while other requests hold that budget, and is refused when even
// one image would not fit.
//
// The estimate counts what dominates at every size: the UNet's self-attention scores (batch ×
// heads × tokens², which grows with the fourth power of the side), its activations and skip
// connections, and the VAE decoder's full-resolution activations and mid-block attention. Its
// constant factors were calibrated against measured peak RSS (bench/infer/memory.js) and err
// high. With onnxruntime's arena on (the default) the sessions keep their peaks after a request,
// so what the budget bounds is also what Infer holds between requests, until a request above
// LORAFORGE_INFER_RECYCLE_MB has the Infer process retired (process.ts). The model's weights are
// not counted: they are resident whether or not a request runs.
import { readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { inferCancelled } from "../core/errors.js";

/** The parts of a diffusers UNet and VAE config that decide a request's working memory. */
export interface MemoryShape {
  /** Per UNet level: channels, attention heads (0 where the level has no transformer) and transformer layers. */
  unetLevels: { channels: number; heads: number; layers: number }[];
  unetLayersPerBlock: number;
  latentChannels: number;
  /** VAE decoder channels per level, from full resolution (index 0) down. */
  vaeChannels: number[];
  vaeMidAttention: boolean;
  /** log2 of the VAE's downsampling factor. */
  vaeLevels: number;
  /** The model's native image side in pixels (UNet sample_size × VAE factor). */
  nativeSize: number;
}

const asList = <T>(v: T | T[] | null | undefined, n: number, fallback: T): T[] =>
  Array.isArray(v) ? v : Array.from({ length: n }, () => (v ?? fallback) as T);

/** Reads the memory-relevant shape of the diffusers model folder `modelDir` (unet/ and vae/ configs). */
export function readMemoryShape(modelDir: string): MemoryShape {
  const unet = JSON.parse(readFileSync(path.join(modelDir, "unet", "config.json"), "utf8"));
  const vae = JSON.parse(readFileSync(path.join(modelDir, "vae", "config.json"), "utf8"));
  const channels: number[] = unet.block_out_channels;
  const n = channels.length;
  const types: string[] = unet.down_block_types ?? [];
  // diffusers' legacy naming: without num_attention_heads, attention_head_dim is the head count.
  const heads = asList<number>(unet.num_attention_heads ?? unet.attention_head_dim, n, 8);
  const layers = asList<number | number[]>(unet.transformer_layers_per_block, n, 1).map((l) => (Array.isArray(l) ? Math.max(...l) : l));
  const vaeChannels: number[] = vae.block_out_channels;
  return {
    unetLevels: channels.map((c, i) => ({
      channels: c,
      heads: /CrossAttn/.test(types[i] ?? "") ? heads[i] : 0,
      layers: layers[i],
    })),
    unetLayersPerBlock: Number(unet.layers_per_block ?? 2),
    latentChannels: Number(unet.in_channels ?? 4),
    vaeChannels,
    vaeMidAttention: vae.mid_block_add_attention !== false,
    vaeLevels: vaeChannels.length - 1,
    nativeSize: Number(unet.sample_size ?? 64) * 2 ** (vaeChannels.length - 1),
  };
}

export interface MemoryRequest {
  width: number;
  height: number;
  /** UNet rows per image: 2 with classifier-free guidance, else 1. */
  rowsPerImage: number;
  /** Bytes per element of the UNet's activations (4 for fp32 exports, 2 for fp16). */
  unetBytes: number;
  /** Bytes per element of the VAE decoder's activations. */
  vaeBytes: number;
  /**
   * Whether the sessions keep onnxruntime's memory arena: each then holds its own peak after the
   * request, so the UNet's and the VAE decoder's add up instead of following one another.
   */
  arena: boolean;
}

// Calibration (bench/infer/memory.js): live copies of the largest attention-score tensor (scores,
// softmax), and of the largest activation at any level (a block's input, output, norm and residual).
const ATTENTION_COPIES = 3;
const ACTIVATION_COPIES = 6;
const VAE_ACTIVATION_COPIES = 4;
/** The arena grows in doubling chunks: it may hold more than a request's peak (measured up to 2× at small sizes). */
const ARENA_SLACK = 1.25;
/** Fixed working memory per request (tensors handed to and from onnxruntime, PNG encoding, allocator slack). */
export const REQUEST_BASE_BYTES = 192 * 1024 * 1024;

/**
 * Estimated bytes a request of `images` images takes: the UNet's peak, then the VAE decoder's
 * (the larger of the two without the arena; their sum with it, as each session keeps its own).
 */
export function estimateBytes(shape: MemoryShape, req: MemoryRequest, images: number): number {
  const lh = req.height >> shape.vaeLevels;
  const lw = req.width >> shape.vaeLevels;
  const rows = req.rowsPerImage * images;
  let attention = 0;
  let activation = 0;
  let skips = 0;
  shape.unetLevels.forEach((lvl, i) => {
    const tokens = Math.ceil(lh / 2 ** i) * Math.ceil(lw / 2 ** i);
    if (lvl.heads > 0) attention = Math.max(attention, lvl.heads * tokens * tokens);
    // A transformer's feed-forward widens to 8× channels (GEGLU's projection).
    const widest = lvl.heads > 0 ? 8 * lvl.channels : lvl.channels;
    activation = Math.max(activation, widest * tokens);
    skips += (shape.unetLayersPerBlock + 1) * lvl.channels * tokens;
  });
  const unet = rows * req.unetBytes * (ATTENTION_COPIES * attention + ACTIVATION_COPIES * activation + skips);

  // The decoder widens from the latent to full resolution; the widest tensor is an upsampler's
  // input at the next level up (channels of the level below, pixels of the level above).
  let vaeAct = 0;
  const vc = shape.vaeChannels;
  for (let level = 0; level <= shape.vaeLevels; level++) {
    const pixels = Math.ceil(req.height / 2 ** level) * Math.ceil(req.width / 2 ** level);
    const ch = Math.max(vc[level], vc[Math.min(level + 1, vc.length - 1)]);
    vaeAct = Math.max(vaeAct, ch * pixels);
  }
  const midTokens = lh * lw;
  const vaeAttention = shape.vaeMidAttention ? midTokens * midTokens : 0;
  const vae = images * req.vaeBytes * (VAE_ACTIVATION_COPIES * vaeAct + ATTENTION_COPIES * vaeAttention);
  return REQUEST_BASE_BYTES + (req.arena ? ARENA_SLACK * (unet + vae) : Math.max(unet, vae));
}

/** Default budget for Infer's working memory: a third of the machine's memory (LORAFORGE_INFER_MEMORY_MB). */
export const defaultMemoryBudget = () => Math.floor(os.totalmem() / 3);

/**
 * How a request runs within `budget`: images per group (rendered one group after another) and the
 * bytes one group reserves; null when a single image needs more than the budget.
 */
export function planRequest(shape: MemoryShape, req: MemoryRequest, images: number, budget: number): { perGroup: number; bytes: number } | null {
  for (let k = images; k >= 1; k--) {
    const bytes = estimateBytes(shape, req, k);
    if (bytes <= budget) return { perGroup: k, bytes };
  }
  return null;
}

/**
 * A byte budget shared by all requests: acquire(bytes) waits until that many bytes are free
 * (first come, first served, so a large request is not starved by small ones).
 */
export class MemoryBudget {
  private used = 0;
  private readonly waiting: { bytes: number; grant: () => void }[] = [];
  constructor(readonly total: number) {}

  get inUse(): number {
    return this.used;
  }

  async acquire(bytes: number, cancelled: () => boolean = () => false): Promise<() => void> {
    if (bytes > this.total) throw new RangeError(`${bytes} bytes exceed the budget of ${this.total}`);
    if (this.waiting.length > 0 || this.used + bytes > this.total) {
      await new Promise<void>((grant) => this.waiting.push({ bytes, grant }));
      if (cancelled()) {
        this.release(bytes);
        throw inferCancelled();
      }
    } else {
      this.used += bytes;
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.release(bytes);
    };
  }

  private release(bytes: number) {
    this.used -= bytes;
    while (this.waiting.length > 0 && this.used + this.waiting[0].bytes <= this.total) {
      const next = this.waiting.shift()!;
      this.used += next.bytes;
      next.grant();
    }
  }
}
