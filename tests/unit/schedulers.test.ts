// The samplers (server/src/infer/schedulers.ts) against diffusers' EulerDiscreteScheduler, DDIMScheduler and
// DPMSolverMultistepScheduler, as stored by fixtures/make_fixtures.py: each model config is the raw
// scheduler_config.json a model folder carries (SD 1.5's PNDM config, SD 2.1's v-prediction DDIM config,
// SDXL's Euler config, the tiny test model's, linear / cosine / trained betas), and diffusers' values come
// from loading it the way the pipelines do (the folder's own class, then Target.from_config).
//
// Tolerances: integer timesteps exactly; Euler's float timesteps within 1e-6 relative; alphas_cumprod and
// init_noise_sigma within 1e-5 relative + 1e-6 absolute; every scale_model_input / step output within 1e-5
// of max(1, the largest magnitude among the step's input and output) (diffusers works in float32 torch
// tensors, we in doubles rounded to float32: a few float32 ulps of the numbers combined).
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { alphasCumprod, makeScheduler, type SchedulerConfig, type SchedulerName } from "@loraforge/server/infer/schedulers";
import { assertClose, loadFixture } from "./helpers.js";

interface Step {
  model_output: number[];
  scaled_input: number[];
  prev_sample: number[];
}
interface Case {
  config: string;
  scheduler: SchedulerName;
  resolved: { timestep_spacing: string; prediction_type: string; steps_offset: number };
  timesteps: Record<string, number[]>;
  init_noise_sigma: Record<string, number>;
  trajectories: { steps: number; noise: number[]; per_step: Step[] }[];
}
interface Fixture {
  configs: Record<string, SchedulerConfig>;
  alphas_cumprod: Record<string, { index: number[]; value: number[] }>;
  cases: Case[];
}

const fx = loadFixture<Fixture>("schedulers.json");
const TOL = { rel: 1e-5, abs: 1e-6 };

/**
 * A step's outputs: 1e-5 relative to the magnitude of the numbers the step combines (its input sample and
 * output, at least 1). A step subtracts terms of the input's size (Euler's first step at SD's σ ≈ 14.6, or
 * 2·10⁴ on the cosine schedule, cancels to values near 1), so float32 leaves errors of that size's ulps.
 */
function stepTolerance(input: ArrayLike<number>, output: ArrayLike<number>): { rel: number; abs: number } {
  let m = 1;
  for (const v of Array.from(input).concat(Array.from(output))) m = Math.max(m, Math.abs(v));
  return { rel: 1e-5, abs: 1e-5 * m };
}

describe("alphas_cumprod equals diffusers' for each beta schedule", () => {
  for (const [name, ref] of Object.entries(fx.alphas_cumprod)) {
    it(name, () => {
      const ac = alphasCumprod(fx.configs[name]);
      assertClose(
        ref.index.map((i) => ac[i]),
        ref.value,
        TOL,
        `${name} alphas_cumprod`,
      );
    });
  }
});

describe("timesteps and init_noise_sigma equal diffusers'", () => {
  for (const c of fx.cases) {
    it(`${c.scheduler} on ${c.config} (diffusers resolves ${c.resolved.timestep_spacing}, ${c.resolved.prediction_type})`, () => {
      const cfg = fx.configs[c.config];
      for (const [n, expected] of Object.entries(c.timesteps)) {
        const s = makeScheduler(c.scheduler, cfg, Number(n));
        if (c.scheduler === "euler") assertClose(s.timesteps, expected, { rel: 1e-6, abs: 0 }, `${n} steps: timesteps`);
        else assert.deepEqual(s.timesteps, expected, `${n} steps: timesteps`);
        assertClose([s.initNoiseSigma], [c.init_noise_sigma[n]], TOL, `${n} steps: init_noise_sigma`);
      }
    });
  }
});

describe("every scale_model_input and step output equals diffusers' from the same input", () => {
  for (const c of fx.cases) {
    for (const t of c.trajectories) {
      it(`${c.scheduler} on ${c.config}, ${t.steps} steps`, () => {
        const s = makeScheduler(c.scheduler, fx.configs[c.config], t.steps);
        assert.equal(s.timesteps.length, t.per_step.length);
        // As the pipeline does: unit noise times init_noise_sigma, then per step scale, model, step. Each step
        // starts from diffusers' previous output, so that float32 rounding in one step does not carry into the
        // next (the multistep sampler still keeps its own history of model outputs).
        let x: Float32Array = Float32Array.from(t.noise, (v) => v * s.initNoiseSigma);
        t.per_step.forEach((ref, i) => {
          const tol = stepTolerance(x, ref.prev_sample);
          assertClose(s.scaleModelInput(x, i), ref.scaled_input, tol, `step ${i}: scaled input`);
          assertClose(s.step(Float32Array.from(ref.model_output), i, x), ref.prev_sample, tol, `step ${i}: prev_sample`);
          x = Float32Array.from(ref.prev_sample);
        });
      });
    }
  }
});

describe("unsupported configs are refused, not approximated", () => {
  for (const [key, value] of [
    ["use_karras_sigmas", true],
    ["thresholding", true],
    ["rescale_betas_zero_snr", true],
    ["prediction_type", "sample"],
    ["timestep_spacing", "karras"],
    ["beta_schedule", "exp"],
  ] as const) {
    it(`${key}: ${value}`, () => {
      for (const name of ["euler", "ddim", "dpmpp_2m"] as const)
        assert.throws(() => makeScheduler(name, { ...fx.configs.sd15, [key]: value }, 10), new RegExp(key), `${name} with ${key}`);
    });
  }
});
