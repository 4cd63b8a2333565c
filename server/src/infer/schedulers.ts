// Samplers with diffusers' math, configured from a model's scheduler_config.json:
//   euler    — EulerDiscreteScheduler (s_churn 0, linear sigma interpolation, final sigma 0)
//   ddim     — DDIMScheduler with eta 0
//   dpmpp_2m — DPMSolverMultistepScheduler (DPM-Solver++, order 2, midpoint, lower order final)
// Timestep spacing "leading", "linspace" and "trailing" (a config without it gets the diffusers class's
// default, as from_config gives it: linspace for Euler and DPM-Solver, leading for DDIM; rounding as numpy's,
// halves to even); epsilon and v prediction.
// Karras sigmas, thresholding and zero-SNR rescaling are not implemented (refused).

export const SCHEDULERS = ["euler", "ddim", "dpmpp_2m"] as const;
export type SchedulerName = (typeof SCHEDULERS)[number];

/** The keys of a diffusers scheduler config that these samplers read. */
export interface SchedulerConfig {
  num_train_timesteps?: number;
  beta_start?: number;
  beta_end?: number;
  beta_schedule?: string;
  trained_betas?: number[] | null;
  prediction_type?: string;
  steps_offset?: number;
  timestep_spacing?: string;
  clip_sample?: boolean;
  clip_sample_range?: number;
  set_alpha_to_one?: boolean;
  thresholding?: boolean;
  rescale_betas_zero_snr?: boolean;
  use_karras_sigmas?: boolean;
}

export interface Scheduler {
  /** The UNet's timestep input for each step. */
  readonly timesteps: number[];
  /** Initial latents (unit Gaussian) are multiplied by this. */
  readonly initNoiseSigma: number;
  /** The UNet's input at step i (in place allowed on a copy; returns a new array). */
  scaleModelInput(sample: Float32Array, i: number): Float32Array;
  /** The next sample from the (guided) model output at step i. */
  step(modelOutput: Float32Array, i: number, sample: Float32Array): Float32Array;
}

const f32 = Math.fround;

/** alphas_cumprod as diffusers computes it (float32 torch tensors). */
export function alphasCumprod(cfg: SchedulerConfig): Float64Array {
  const n = cfg.num_train_timesteps ?? 1000;
  const start = cfg.beta_start ?? 0.0001;
  const end = cfg.beta_end ?? 0.02;
  const schedule = cfg.beta_schedule ?? "linear";
  const betas = new Float64Array(n);
  if (cfg.trained_betas) {
    for (let i = 0; i < n; i++) betas[i] = f32(cfg.trained_betas[i]);
  } else if (schedule === "linear") {
    for (let i = 0; i < n; i++) betas[i] = f32(start + ((end - start) * i) / (n - 1));
  } else if (schedule === "scaled_linear") {
    const a = Math.sqrt(start);
    const b = Math.sqrt(end);
    for (let i = 0; i < n; i++) betas[i] = f32(f32(a + ((b - a) * i) / (n - 1)) ** 2);
  } else if (schedule === "squaredcos_cap_v2") {
    const abar = (t: number) => Math.cos(((t + 0.008) / 1.008) * Math.PI / 2) ** 2;
    for (let i = 0; i < n; i++) betas[i] = f32(Math.min(1 - abar((i + 1) / n) / abar(i / n), 0.999));
  } else {
    throw new Error(`scheduler config: beta_schedule ${JSON.stringify(schedule)} is not supported`);
  }
  const out = new Float64Array(n);
  let acc = 1;
  for (let i = 0; i < n; i++) out[i] = acc = f32(acc * f32(1 - betas[i]));
  return out;
}

/** numpy.interp on integer grid points 0..len-1. */
function interp(x: number, ys: ArrayLike<number>): number {
  if (x <= 0) return ys[0];
  if (x >= ys.length - 1) return ys[ys.length - 1];
  const i = Math.floor(x);
  const t = x - i;
  return ys[i] + (ys[i + 1] - ys[i]) * t;
}

/** numpy's round(): halves to even (Math.round takes them up). */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** numpy.linspace(start, stop, num): start + i·step, the last value stop exactly. */
function linspace(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  const out = Array.from({ length: num }, (_, i) => i * step + start);
  out[num - 1] = stop;
  return out;
}

/** numpy.arange(start, 0, −step) for start > 0 as numpy fills it: start + i·((start − step) − start). */
function arangeDown(start: number, step: number): number[] {
  const len = Math.max(0, Math.ceil((0 - start) / -step));
  const d = start - step - start;
  return Array.from({ length: len }, (_, i) => (i === 0 ? start : i === 1 ? start - step : start + i * d));
}

/** Timesteps as diffusers' Euler ("float") and DDIM ("int") compute them; `fallback`: the class's default spacing. */
function spacedTimesteps(cfg: SchedulerConfig, steps: number, kind: "float" | "int", fallback: string): number[] {
  const n = cfg.num_train_timesteps ?? 1000;
  const spacing = cfg.timestep_spacing ?? fallback;
  const offset = cfg.steps_offset ?? 0;
  const ts: number[] = [];
  if (spacing === "leading") {
    const ratio = Math.floor(n / steps);
    for (let i = steps - 1; i >= 0; i--) ts.push(Math.round(i * ratio) + offset);
  } else if (spacing === "linspace") {
    for (const v of linspace(0, n - 1, steps).reverse()) ts.push(kind === "int" ? roundHalfEven(v) : f32(v));
  } else if (spacing === "trailing") {
    for (const v of arangeDown(n, n / steps)) ts.push(roundHalfEven(v) - 1);
  } else {
    throw new Error(`scheduler config: timestep_spacing ${JSON.stringify(spacing)} is not supported`);
  }
  return ts;
}

function checkSupported(cfg: SchedulerConfig) {
  if (cfg.thresholding) throw new Error("scheduler config: thresholding is not supported");
  if (cfg.rescale_betas_zero_snr) throw new Error("scheduler config: rescale_betas_zero_snr is not supported");
  if (cfg.use_karras_sigmas) throw new Error("scheduler config: use_karras_sigmas is not supported");
  const p = cfg.prediction_type ?? "epsilon";
  if (p !== "epsilon" && p !== "v_prediction") throw new Error(`scheduler config: prediction_type ${JSON.stringify(p)} is not supported`);
}

class Euler implements Scheduler {
  readonly timesteps: number[];
  readonly initNoiseSigma: number;
  private readonly sigmas: number[];
  constructor(private readonly cfg: SchedulerConfig, steps: number) {
    const ac = alphasCumprod(cfg);
    const base = Array.from(ac, (a) => f32(Math.sqrt(f32(f32(1 - a) / a))));
    this.timesteps = spacedTimesteps(cfg, steps, "float", "linspace");
    this.sigmas = [...this.timesteps.map((t) => f32(interp(t, base))), 0];
    const max = Math.max(...this.sigmas);
    const spacing = cfg.timestep_spacing ?? "linspace";
    this.initNoiseSigma = spacing === "linspace" || spacing === "trailing" ? max : f32(Math.sqrt(max * max + 1));
  }
  scaleModelInput(sample: Float32Array, i: number): Float32Array {
    const s = this.sigmas[i];
    const k = Math.sqrt(s * s + 1);
    return sample.map((v) => v / k);
  }
  step(eps: Float32Array, i: number, sample: Float32Array): Float32Array {
    const sigma = this.sigmas[i];
    const dt = this.sigmas[i + 1] - sigma;
    const out = new Float32Array(sample.length);
    if ((this.cfg.prediction_type ?? "epsilon") === "epsilon") {
      // x0 = x − σ ε; derivative (x − x0) / σ = ε.
      for (let j = 0; j < out.length; j++) out[j] = sample[j] + eps[j] * dt;
    } else {
      const c1 = -sigma / Math.sqrt(sigma * sigma + 1);
      const c2 = 1 / (sigma * sigma + 1);
      for (let j = 0; j < out.length; j++) {
        const x0 = eps[j] * c1 + sample[j] * c2;
        out[j] = sample[j] + ((sample[j] - x0) / sigma) * dt;
      }
    }
    return out;
  }
}

class Ddim implements Scheduler {
  readonly timesteps: number[];
  readonly initNoiseSigma = 1;
  private readonly ac: Float64Array;
  private readonly finalAlpha: number;
  private readonly stride: number;
  constructor(private readonly cfg: SchedulerConfig, steps: number) {
    this.ac = alphasCumprod(cfg);
    this.finalAlpha = (cfg.set_alpha_to_one ?? true) ? 1 : this.ac[0];
    this.timesteps = spacedTimesteps(cfg, steps, "int", "leading");
    this.stride = Math.floor((cfg.num_train_timesteps ?? 1000) / steps);
  }
  scaleModelInput(sample: Float32Array): Float32Array {
    return sample;
  }
  step(out: Float32Array, i: number, sample: Float32Array): Float32Array {
    const t = this.timesteps[i];
    const prev = t - this.stride;
    const a = this.ac[t];
    const aPrev = prev >= 0 ? this.ac[prev] : this.finalAlpha;
    const b = 1 - a;
    const sa = Math.sqrt(a);
    const sb = Math.sqrt(b);
    const clip = this.cfg.clip_sample ?? true;
    const range = this.cfg.clip_sample_range ?? 1;
    const v = (this.cfg.prediction_type ?? "epsilon") === "v_prediction";
    const res = new Float32Array(sample.length);
    for (let j = 0; j < res.length; j++) {
      let x0 = v ? sa * sample[j] - sb * out[j] : (sample[j] - sb * out[j]) / sa;
      const e = v ? sa * out[j] + sb * sample[j] : out[j];
      if (clip) x0 = Math.min(range, Math.max(-range, x0));
      res[j] = Math.sqrt(aPrev) * x0 + Math.sqrt(1 - aPrev) * e;
    }
    return res;
  }
}

class DpmSolverPP2M implements Scheduler {
  readonly timesteps: number[];
  readonly initNoiseSigma = 1;
  private readonly sigmas: number[];
  private prevX0: Float32Array | null = null;
  constructor(private readonly cfg: SchedulerConfig, steps: number) {
    const ac = alphasCumprod(cfg);
    const n = cfg.num_train_timesteps ?? 1000;
    const spacing = cfg.timestep_spacing ?? "linspace";
    const offset = cfg.steps_offset ?? 0;
    let ts: number[];
    if (spacing === "leading") {
      const ratio = Math.floor(n / (steps + 1));
      ts = [];
      for (let i = steps; i >= 1; i--) ts.push(Math.round(i * ratio) + offset);
    } else if (spacing === "linspace") {
      ts = linspace(0, n - 1, steps + 1).reverse().slice(0, steps).map(roundHalfEven);
    } else if (spacing === "trailing") {
      ts = arangeDown(n, n / steps).map((v) => roundHalfEven(v) - 1);
    } else throw new Error(`scheduler config: timestep_spacing ${JSON.stringify(spacing)} is not supported`);
    this.timesteps = ts;
    const base = Array.from(ac, (a) => Math.sqrt((1 - a) / a));
    this.sigmas = [...ts.map((t) => f32(interp(t, base))), 0];
  }
  scaleModelInput(sample: Float32Array): Float32Array {
    return sample;
  }
  private static alphaSigma(sigma: number): [number, number] {
    const alpha = 1 / Math.sqrt(sigma * sigma + 1);
    return [alpha, sigma * alpha];
  }
  step(out: Float32Array, i: number, sample: Float32Array): Float32Array {
    const [alphaS0, sigmaS0] = DpmSolverPP2M.alphaSigma(this.sigmas[i]);
    const v = (this.cfg.prediction_type ?? "epsilon") === "v_prediction";
    const x0 = new Float32Array(sample.length);
    for (let j = 0; j < x0.length; j++)
      x0[j] = v ? alphaS0 * sample[j] - sigmaS0 * out[j] : (sample[j] - sigmaS0 * out[j]) / alphaS0;
    const [alphaT, sigmaT] = DpmSolverPP2M.alphaSigma(this.sigmas[i + 1]);
    const lambdaT = Math.log(alphaT) - Math.log(sigmaT);
    const lambdaS0 = Math.log(alphaS0) - Math.log(sigmaS0);
    const h = lambdaT - lambdaS0;
    const ratio = sigmaT / sigmaS0;
    const c = alphaT * (Math.exp(-h) - 1);
    const last = i === this.timesteps.length - 1;
    const res = new Float32Array(sample.length);
    if (this.prevX0 === null || last) {
      for (let j = 0; j < res.length; j++) res[j] = ratio * sample[j] - c * x0[j];
    } else {
      const [alphaS1, sigmaS1] = DpmSolverPP2M.alphaSigma(this.sigmas[i - 1]);
      const lambdaS1 = Math.log(alphaS1) - Math.log(sigmaS1);
      const r0 = (lambdaS0 - lambdaS1) / h;
      const m1 = this.prevX0;
      for (let j = 0; j < res.length; j++) {
        const d1 = (x0[j] - m1[j]) / r0;
        res[j] = ratio * sample[j] - c * x0[j] - 0.5 * c * d1;
      }
    }
    this.prevX0 = x0;
    return res;
  }
}

/** A fresh sampler (they keep per-run state) for `steps` steps. */
export function makeScheduler(name: SchedulerName, cfg: SchedulerConfig, steps: number): Scheduler {
  checkSupported(cfg);
  if (name === "euler") return new Euler(cfg, steps);
  if (name === "ddim") return new Ddim(cfg, steps);
  return new DpmSolverPP2M(cfg, steps);
}
