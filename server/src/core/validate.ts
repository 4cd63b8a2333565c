// Validation of a TrainingSpec at the API boundary. A bad spec is refused before any
// job exists, with every bad field named (the engine validates again, as a second line).
import { existsSync, readdirSync, readFileSync, realpathSync, statSync } from "node:fs";
import path from "node:path";
import type { TrainingSpec } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import type { FieldViolation } from "./errors.js";

export const LR_SCHEDULERS = [
  "linear",
  "cosine",
  "cosine_with_restarts",
  "polynomial",
  "constant",
  "constant_with_warmup",
] as const;
export const MIXED_PRECISIONS = ["no", "fp16", "bf16"] as const;
export const IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"];
export const INTERPOLATIONS = ["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"] as const;
export const PREDICTION_TYPES = ["epsilon", "v_prediction"] as const;
export const LORA_FORMATS = ["diffusers", "kohya"] as const;
const MODULE_NAME = /^[A-Za-z_][A-Za-z0-9_.]*$/;

/** Where user-supplied paths may point. Empty: anywhere on the host. */
export interface PathPolicy {
  roots: string[];
}

const realOr = (p: string) => {
  try {
    return realpathSync(p);
  } catch {
    return path.resolve(p);
  }
};

/** Whether absolute path `p` lies inside one of `roots` (or equals one), as written. Empty roots: anywhere. */
export function withinRoots(p: string, roots: string[]): boolean {
  return roots.length === 0 || roots.some((r) => p === r || p.startsWith(r + path.sep));
}

/**
 * Where `p` really is: its real path (every symlink followed) when it exists, with `inside` telling
 * whether that lies inside one of the roots' own real paths; null when `p` does not exist. A path
 * inside a root that is (or passes through) a link leading out of every root is not inside.
 */
export function realPathIn(p: string, roots: string[]): { real: string; inside: boolean } | null {
  let real: string;
  try {
    real = realpathSync(p);
  } catch {
    return null;
  }
  return { real, inside: withinRoots(real, roots.map(realOr)) };
}

type Check = (spec: TrainingSpec, bad: (field: string, description: string) => void) => void;

function intRange(field: keyof TrainingSpec, min: number, max: number): Check {
  return (spec, bad) => {
    const v = spec[field] as number | undefined;
    if (v === undefined) return;
    if (!Number.isInteger(v) || v < min || v > max) bad(field, `must be an integer in ${min}..${max}, got ${v}`);
  };
}

function positive(field: keyof TrainingSpec, max = Infinity): Check {
  return (spec, bad) => {
    const v = spec[field] as number | undefined;
    if (v === undefined) return;
    if (!Number.isFinite(v) || v <= 0 || v > max)
      bad(field, `must be a number > 0${max < Infinity ? ` and ≤ ${max}` : ""}, got ${v}`);
  };
}

/** A finite number in a range; `open` makes an end exclusive. */
function between(field: keyof TrainingSpec, lo: number, hi: number, open: { lo?: boolean; hi?: boolean } = {}): Check {
  return (spec, bad) => {
    const v = spec[field] as number | undefined;
    if (v === undefined) return;
    const ok = Number.isFinite(v) && (open.lo ? v > lo : v >= lo) && (open.hi ? v < hi : v <= hi);
    if (!ok) bad(field, `must be in ${open.lo ? "(" : "["}${lo}, ${hi}${open.hi ? ")" : "]"}, got ${v}`);
  };
}

function text(field: keyof TrainingSpec, max: number): Check {
  return (spec, bad) => {
    const v = spec[field] as string | undefined;
    if (v === undefined) return;
    if (!v.trim() || v.length > max) bad(field, `must be non-empty and at most ${max} characters, got ${JSON.stringify(v)}`);
  };
}

function oneOf(field: keyof TrainingSpec, allowed: readonly string[]): Check {
  return (spec, bad) => {
    const v = spec[field] as string | undefined;
    if (v === undefined) return;
    if (!allowed.includes(v)) bad(field, `must be one of ${allowed.join(", ")}, got ${JSON.stringify(v)}`);
  };
}

const RULES: Check[] = [
  intRange("resolution", 8, 4096),
  (spec, bad) => {
    if (spec.resolution !== undefined && spec.resolution % 8 !== 0)
      bad("resolution", `must be a multiple of 8 (the VAE downsamples by 8), got ${spec.resolution}`);
  },
  intRange("trainBatchSize", 1, 1024),
  intRange("gradientAccumulationSteps", 1, 1024),
  intRange("maxTrainSteps", 1, 10_000_000),
  intRange("numTrainEpochs", 1, 100_000),
  positive("learningRate", 1),
  oneOf("lrScheduler", LR_SCHEDULERS),
  intRange("lrWarmupSteps", 0, 10_000_000),
  positive("maxGradNorm"),
  intRange("rank", 1, 1024),
  positive("loraAlpha"),
  oneOf("mixedPrecision", MIXED_PRECISIONS),
  intRange("checkpointingSteps", 1, 10_000_000),
  intRange("seed", 0, 2 ** 32 - 1),
  intRange("numValidationImages", 1, 16),
  intRange("validationSteps", 0, 10_000_000),
  intRange("validationInferenceSteps", 1, 1000),
  (spec, bad) => {
    if (spec.validationPrompt !== undefined && spec.validationPrompt.length > 2000)
      bad("validationPrompt", "must be at most 2000 characters");
  },
  // The rest of the reference recipe's knobs (engine/loraforge_engine/config.py checks the same).
  text("datasetName", 200),
  text("imageColumn", 200),
  text("captionColumn", 200),
  intRange("maxTrainSamples", 1, 2 ** 31 - 1),
  between("captionDropout", 0, 1),
  oneOf("interpolation", INTERPOLATIONS),
  intRange("lrNumCycles", 1, 10_000),
  between("lrPower", 0, 100, { lo: true }),
  between("adamBeta1", 0, 1, { hi: true }),
  between("adamBeta2", 0, 1, { hi: true }),
  between("adamWeightDecay", 0, 1),
  between("adamEpsilon", 0, 1, { lo: true }),
  between("snrGamma", 0, 1000, { lo: true }),
  between("noiseOffset", 0, 1),
  oneOf("predictionType", PREDICTION_TYPES),
  between("loraDropout", 0, 1, { hi: true }),
  (spec, bad) => {
    const names = spec.targetModules ?? [];
    if (names.length > 64) bad("targetModules", `must name at most 64 modules, got ${names.length}`);
    const wrong = names.filter((n) => !MODULE_NAME.test(n));
    if (wrong.length) bad("targetModules", `must be module names such as to_q or to_out.0, got ${JSON.stringify(wrong)}`);
  },
  intRange("checkpointsTotalLimit", 1, 2 ** 31 - 1),
  (spec, bad) => {
    const prompts = spec.validationPrompts ?? [];
    if (prompts.length > 16) bad("validationPrompts", `must hold at most 16 prompts, got ${prompts.length}`);
    if (prompts.some((p) => !p.trim() || p.length > 2000))
      bad("validationPrompts", "must be non-blank prompts of at most 2000 characters");
  },
  intRange("validationEpochs", 0, 10_000_000),
  oneOf("loraFormat", LORA_FORMATS),
];

/** proto field path as clients see it: "spec.train_batch_size". */
const fieldPath = (camel: string) => "spec." + camel.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase());

/** Every problem with a spec, each naming its field; empty when the spec is good. */
export function validateSpec(spec: TrainingSpec | undefined, policy: PathPolicy): FieldViolation[] {
  const violations: FieldViolation[] = [];
  if (!spec) return [{ field: "spec", description: "is required" }];
  const bad = (field: string, description: string) => violations.push({ field: fieldPath(field), description });
  for (const rule of RULES) rule(spec, bad);
  checkBaseModel(spec.baseModel, policy, bad);
  if (spec.datasetName !== undefined && spec.datasetDir)
    bad("datasetName", "must not be set together with datasetDir (give one data source)");
  else if (spec.datasetName === undefined) checkDataset(spec.datasetDir, spec.imageColumn ?? "file_name", policy, bad);
  // A checkpoint to start from is a user-supplied path like the others: confined to the data roots.
  const resume = spec.resumeFromCheckpoint;
  if (resume !== undefined && resume !== "latest" && checkPath("resumeFromCheckpoint", resume, policy, bad) && !existsSync(path.join(resume, "training_state.json")))
    bad("resumeFromCheckpoint", `folder ${JSON.stringify(resume)} is not a loraforge checkpoint (no training_state.json); use "latest" or a checkpoints/checkpoint-<step> folder`);
  return violations;
}

function checkPath(field: string, p: string, policy: PathPolicy, bad: (f: string, d: string) => void): boolean {
  if (!p) {
    bad(field, "is required");
    return false;
  }
  if (!path.isAbsolute(p)) {
    bad(field, `must be an absolute path, got ${JSON.stringify(p)}`);
    return false;
  }
  const resolved = path.resolve(p);
  if (!withinRoots(resolved, policy.roots)) {
    bad(field, `must lie inside one of the server's data roots (${policy.roots.join(", ")})`);
    return false;
  }
  const real = realPathIn(resolved, policy.roots);
  if (!real || !statSync(real.real).isDirectory()) {
    bad(field, `folder ${JSON.stringify(p)} does not exist`);
    return false;
  }
  // Checked on the real path too: a symlink inside a root must not lead out of them.
  if (!real.inside) {
    bad(field, `leads outside the server's data roots through a symbolic link (${policy.roots.join(", ")})`);
    return false;
  }
  return true;
}

function checkBaseModel(p: string, policy: PathPolicy, bad: (f: string, d: string) => void) {
  if (!checkPath("baseModel", p, policy, bad)) return;
  if (!existsSync(path.join(p, "model_index.json")))
    bad("baseModel", `folder ${JSON.stringify(p)} is not a diffusers model (no model_index.json)`);
}

/**
 * Counts captioned images the way the engine reads them: metadata.jsonl, else .txt sidecars.
 * Like the engine, it counts no file whose real path leaves the set's folder (a symlink out).
 */
export function countCaptionedImages(dir: string, imageColumn = "file_name"): number {
  const inSet = (p: string) => realPathIn(p, [dir])?.inside === true;
  const meta = path.join(dir, "metadata.jsonl");
  if (existsSync(meta)) {
    if (!inSet(meta)) return 0;
    let n = 0;
    for (const line of readFileSync(meta, "utf8").split("\n")) {
      if (!line.trim()) continue;
      try {
        const row = JSON.parse(line) as Record<string, unknown>;
        const name = row[imageColumn];
        if (typeof name === "string" && inSet(path.join(dir, name))) n++;
      } catch {
        // a malformed line is the engine's to report, with its line number
      }
    }
    return n;
  }
  const names = new Set(readdirSync(dir));
  return [...names].filter((f) => {
    const ext = path.extname(f).toLowerCase();
    const caption = f.slice(0, -ext.length) + ".txt";
    return IMAGE_EXTENSIONS.includes(ext) && names.has(caption) && inSet(path.join(dir, f)) && inSet(path.join(dir, caption));
  }).length;
}

function checkDataset(p: string, imageColumn: string, policy: PathPolicy, bad: (f: string, d: string) => void) {
  if (!checkPath("datasetDir", p, policy, bad)) return;
  if (countCaptionedImages(p, imageColumn) === 0)
    bad(
      "datasetDir",
      `folder ${JSON.stringify(p)} holds no captioned images (expected metadata.jsonl with ${imageColumn} and a caption, or images with same-named .txt captions)`,
    );
}
