// The client commands of `loraforge`: train, jobs, watch, cancel, download, infer,
// datasets, export-onnx. They talk to a server through @loraforge/sdk, exactly as
// other services do.
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { parse as parseYaml } from "yaml";
import {
  ArtifactKind,
  createClient,
  InvalidSpecError,
  Job,
  JobEvent,
  JobNotFoundError,
  JobState,
  LoraforgeError,
  stateName,
  TrainingSpec,
  UnavailableError,
  type LoraforgeClient,
} from "@loraforge/sdk";
import { InferResponse, type DeepPartial, type SizeConditioning } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { childEnv } from "./child-env.js";
import { configFromEnv } from "./server.js";

/** Exit codes, documented in the README and `loraforge --help`. */
export const EXIT = { OK: 0, FAILED: 1, USAGE: 2, INVALID: 3, NOT_FOUND: 4, CANCELLED: 5, UNAVAILABLE: 69 } as const;

export const CLIENT_USAGE = `usage: loraforge <command> [options]     (every command takes --help)

  train [SPEC.yaml|SPEC.json] [--<spec-field> VALUE]... [--request-id ID] [--follow]
                         submit a training job; flags override the file (--max-train-steps 500)
  jobs [--state STATE] [--limit N]       list jobs, newest first
  watch JOB [--after SEQ]                follow a job's events until it ends
  cancel JOB                             cancel a job
  download JOB [OBJECT_NAME] [-o FILE]   download an artifact (default: the final LoRA)
  infer --base-model DIR --prompt TEXT [--lora JOB[:SCALE]]... [--lora-file FILE[:SCALE]]...
        [--steps N] [--guidance G] [--seed S] [--width W] [--height H] [--num-images N]
        [--scheduler euler|ddim|dpmpp_2m] [--negative-prompt TEXT] [-o OUT.png]
        SDXL: [--prompt-2 TEXT] [--negative-prompt-2 TEXT] [--original-size WxH] [--crop TOP,LEFT]
        [--target-size WxH] [--negative-original-size WxH] [--negative-crop TOP,LEFT] [--negative-target-size WxH]
  datasets upload FOLDER|ZIP [--name NAME]   upload a captioned image set; prints its id (train --dataset-id ID)
  export-onnx MODEL_DIR [--out DIR]      export a base model to ONNX (runs the engine locally)

Common options:
  --address HOST:PORT   the server (LORAFORGE_ADDRESS, default 127.0.0.1:50051)
  --token TOKEN         bearer token (LORAFORGE_API_TOKEN)
  --json                machine-readable output: one proto3-JSON object per line

Exit codes: 0 ok · 1 the job failed (or another error) · 2 usage · 3 invalid spec or request
            · 4 not found · 5 the job was cancelled · 69 server unavailable`;

type Args = { positional: string[]; flags: Map<string, string[]>; bool: Set<string> };

const BOOLEAN_FLAGS = new Set(["json", "follow", "help", "h"]);

function parseArgs(argv: string[]): Args {
  const a: Args = { positional: [], flags: new Map(), bool: new Set() };
  for (let i = 0; i < argv.length; i++) {
    const t = argv[i];
    if (t === "--") {
      a.positional.push(...argv.slice(i + 1));
      break;
    }
    if (!t.startsWith("-") || t === "-") {
      a.positional.push(t);
      continue;
    }
    const eq = t.indexOf("=");
    const key = t.replace(/^--?/, "").slice(0, eq > 0 ? eq - (t.startsWith("--") ? 2 : 1) : undefined);
    if (BOOLEAN_FLAGS.has(key) && eq < 0) {
      a.bool.add(key);
      continue;
    }
    const value = eq > 0 ? t.slice(eq + 1) : argv[++i];
    if (value === undefined) throw new UsageError(`${t} needs a value`);
    a.flags.set(key, [...(a.flags.get(key) ?? []), value]);
  }
  return a;
}

class UsageError extends Error {}

const one = (a: Args, key: string): string | undefined => a.flags.get(key)?.at(-1);
const kebabToCamel = (k: string) => k.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

/** A spec from an optional YAML/JSON file plus `--field value` flags (flags win). */
export function specFromArgs(a: Args, cwd = process.cwd()): TrainingSpec {
  const raw: Record<string, unknown> = {};
  if (a.positional[0]) {
    const text = readFileSync(a.positional[0], "utf8");
    Object.assign(raw, a.positional[0].endsWith(".json") ? JSON.parse(text) : parseYaml(text));
  }
  for (const [key, values] of a.flags) {
    if (["address", "token", "request-id"].includes(key)) continue;
    const field = kebabToCamel(key);
    const v = values.at(-1)!;
    let parsed: unknown = v;
    try {
      parsed = JSON.parse(v);
    } catch {
      // a plain string
    }
    const value = typeof parsed === "number" || typeof parsed === "boolean" ? parsed : v;
    // A field the contract knows survives a round trip through the generated codec.
    const probe = TrainingSpec.toJSON(TrainingSpec.fromJSON({ [field]: value })) as Record<string, unknown>;
    if (!(field in probe))
      throw new UsageError(`unknown option --${key}: not a TrainingSpec field (see proto/loraforge/v1/training_spec.proto; e.g. --max-train-steps 500)`);
    raw[field] = value;
  }
  // snake_case keys from a file become camelCase, which fromJSON accepts too.
  const spec = TrainingSpec.fromJSON(raw);
  // Paths typed on a command line are relative to where it was typed.
  if (spec.baseModel) spec.baseModel = path.resolve(cwd, spec.baseModel);
  if (spec.datasetDir) spec.datasetDir = path.resolve(cwd, spec.datasetDir);
  return spec;
}

function fmtDuration(s: number): string {
  if (!Number.isFinite(s) || s < 0) return "?";
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = Math.floor(s % 60);
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}` : `${m}:${String(sec).padStart(2, "0")}`;
}

/** One progress line: a bar, step, loss, throughput, ETA. */
export function progressLine(ev: JobEvent, width = 24): string | null {
  if (ev.payload?.$case !== "metrics") return null;
  const m = ev.payload.metrics;
  const frac = m.totalSteps > 0 ? Math.min(1, m.step / m.totalSteps) : 0;
  const filled = Math.round(frac * width);
  return (
    `[${"#".repeat(filled)}${".".repeat(width - filled)}] ${m.step}/${m.totalSteps} ` +
    `loss ${m.loss.toFixed(4)}  ${m.imagesPerSecond.toFixed(2)} img/s  eta ${fmtDuration(m.etaSeconds)}`
  );
}

/** Follows a job, printing a live line on a terminal (or a line per event otherwise); returns its exit code. */
async function follow(client: LoraforgeClient, jobId: string, after: number, json: boolean): Promise<number> {
  const tty = process.stdout.isTTY && !json;
  let lastPrinted = 0;
  let final: JobState = JobState.JOB_STATE_UNSPECIFIED;
  for await (const ev of client.progress(jobId, { afterSequence: after })) {
    const p = ev.payload;
    if (json) {
      process.stdout.write(JSON.stringify(JobEvent.toJSON(ev)) + "\n");
    } else if (p?.$case === "metrics") {
      const line = progressLine(ev)!;
      if (tty) process.stdout.write(`\r${line}\x1b[K`);
      else if (Date.now() - lastPrinted > 2000 || p.metrics.step === p.metrics.totalSteps) {
        process.stdout.write(line + "\n");
        lastPrinted = Date.now();
      }
    } else {
      const text =
        p?.$case === "state"
          ? `${stateName(p.state.state)}${p.state.error ? `: ${p.state.error}` : ""}${p.state.lora ? ` — LoRA ${p.state.lora.path}` : ""}`
          : p?.$case === "checkpoint"
            ? `checkpoint at step ${p.checkpoint.step}`
            : p?.$case === "validation"
              ? `validation images at step ${p.validation.step}: ${p.validation.images.map((i) => i.path).join(", ")}`
              : p?.$case === "log"
                ? p.log.message
                : "";
      if (text) process.stdout.write(`${tty ? "\r\x1b[K" : ""}${text}\n`);
    }
    if (p?.$case === "state") final = p.state.state;
  }
  return final === JobState.JOB_STATE_SUCCEEDED ? EXIT.OK : final === JobState.JOB_STATE_CANCELLED ? EXIT.CANCELLED : EXIT.FAILED;
}

function printJob(job: Job, json: boolean) {
  if (json) return void process.stdout.write(JSON.stringify(Job.toJSON(job)) + "\n");
  const steps = job.totalSteps ? `${job.currentStep}/${job.totalSteps}` : "-";
  process.stdout.write(`${job.id}  ${stateName(job.state).padEnd(10)} ${steps.padEnd(11)} ${job.createTime?.toISOString() ?? ""}${job.error ? "  " + job.error : ""}\n`);
}

function parseLoraRef(v: string, kind: "jobId" | "path") {
  const m = v.match(/^(.*?)(?::(-?[\d.]+))?$/)!;
  const scale = m[2] !== undefined ? Number(m[2]) : undefined;
  const source = kind === "jobId" ? { $case: "jobId" as const, jobId: m[1] } : { $case: "path" as const, path: path.resolve(m[1]) };
  return { source, scale };
}

export async function runClient(command: string, argv: string[]): Promise<number> {
  let a: Args;
  try {
    a = parseArgs(argv);
  } catch (err) {
    process.stderr.write(`loraforge ${command}: ${(err as Error).message}\n`);
    return EXIT.USAGE;
  }
  if (a.bool.has("help") || a.bool.has("h")) {
    process.stdout.write(CLIENT_USAGE + "\n");
    return EXIT.OK;
  }
  const json = a.bool.has("json");
  if (command === "export-onnx") return exportOnnx(a);
  const client = createClient({
    address: one(a, "address") ?? process.env.LORAFORGE_ADDRESS ?? "127.0.0.1:50051",
    token: one(a, "token") ?? process.env.LORAFORGE_API_TOKEN,
  });
  try {
    switch (command) {
      case "train": {
        const job = await client.train(specFromArgs(a), { requestId: one(a, "request-id") });
        if (!a.bool.has("follow")) {
          printJob(job.job, json);
          return EXIT.OK;
        }
        if (!json) process.stdout.write(`job ${job.id} queued\n`);
        return await follow(client, job.id, 0, json);
      }
      case "jobs": {
        const stateArg = one(a, "state")?.toUpperCase();
        const state = stateArg ? (JobState as unknown as Record<string, JobState>)[`JOB_STATE_${stateArg}`] : JobState.JOB_STATE_UNSPECIFIED;
        if (state === undefined) throw new UsageError(`unknown --state ${stateArg} (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)`);
        const limit = Number(one(a, "limit") ?? 50);
        let n = 0;
        for await (const job of client.jobs.list({ state, pageSize: Math.min(limit, 1000) })) {
          if (n++ >= limit) break;
          printJob(job, json);
        }
        return EXIT.OK;
      }
      case "watch": {
        const id = a.positional[0];
        if (!id) throw new UsageError("watch needs a JOB id");
        return await follow(client, id, Number(one(a, "after") ?? 0), json);
      }
      case "cancel": {
        const id = a.positional[0];
        if (!id) throw new UsageError("cancel needs a JOB id");
        printJob(await client.cancelJob(id), json);
        return EXIT.OK;
      }
      case "download": {
        const id = a.positional[0];
        if (!id) throw new UsageError("download needs a JOB id");
        const job = await client.getJob(id);
        const name = a.positional[1] ?? job.artifacts.find((x) => x.kind === ArtifactKind.ARTIFACT_KIND_LORA && x.objectName)?.objectName;
        if (!name) throw new UsageError(`job ${id} has no final LoRA yet (state ${stateName(job.state)}); name an artifact: ${job.artifacts.map((x) => x.objectName).join(" ")}`);
        const out = one(a, "o") ?? one(a, "output") ?? (name.endsWith("/") ? `${path.basename(name.slice(0, -1))}.tar` : path.basename(name));
        const info = await client.artifacts.download(id, name, { file: out });
        if (json) process.stdout.write(JSON.stringify({ file: path.resolve(out), artifact: info }) + "\n");
        else process.stdout.write(`${path.resolve(out)}\n`);
        return EXIT.OK;
      }
      case "infer": {
        const baseModel = one(a, "base-model");
        if (!baseModel) throw new UsageError("infer needs --base-model DIR");
        const num = (k: string) => (one(a, k) !== undefined ? Number(one(a, k)) : undefined);
        const res = await client.infer({
          prompt: one(a, "prompt") ?? "",
          negativePrompt: one(a, "negative-prompt") ?? "",
          baseModel: path.resolve(baseModel),
          loras: [...(a.flags.get("lora") ?? []).map((v) => parseLoraRef(v, "jobId")), ...(a.flags.get("lora-file") ?? []).map((v) => parseLoraRef(v, "path"))],
          numInferenceSteps: num("steps"),
          guidanceScale: num("guidance"),
          seed: num("seed"),
          width: num("width"),
          height: num("height"),
          numImages: num("num-images"),
          scheduler: one(a, "scheduler") ?? "",
          prompt2: one(a, "prompt-2"),
          negativePrompt2: one(a, "negative-prompt-2"),
          sizeConditioning: sizeConditioning(a, ""),
          negativeSizeConditioning: sizeConditioning(a, "negative-"),
        });
        const out = one(a, "o") ?? one(a, "output") ?? "out.png";
        const files = res.images.map((img, i) => {
          const f = res.images.length === 1 ? out : out.replace(/(\.png)?$/i, `-${i}.png`);
          writeFileSync(f, img.png);
          return path.resolve(f);
        });
        if (json) process.stdout.write(JSON.stringify({ files, ...InferResponse.toJSON({ ...res, images: [] }) as object }) + "\n");
        else process.stdout.write(files.join("\n") + "\n");
        return EXIT.OK;
      }
      case "datasets": {
        if (a.positional[0] !== "upload" || !a.positional[1]) throw new UsageError("usage: loraforge datasets upload FOLDER|ZIP [--name NAME]");
        const ds = await client.datasets.upload(path.resolve(a.positional[1]), { name: one(a, "name") });
        if (json) process.stdout.write(JSON.stringify(ds) + "\n");
        else process.stdout.write(`${ds.id}  ${ds.imageCount} images  ${ds.path}\n`);
        return EXIT.OK;
      }
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (err) {
    return report(command, err);
  } finally {
    client.close();
  }
}

/** --[prefix]original-size WxH, --[prefix]crop TOP,LEFT, --[prefix]target-size WxH → SDXL's size conditioning
 * (undefined when none is given). */
function sizeConditioning(a: Args, prefix: string): DeepPartial<SizeConditioning> | undefined {
  const pair = (key: string, sep: string, what: string): [number, number] | undefined => {
    const v = one(a, key);
    if (v === undefined) return undefined;
    const m = v.split(sep).map(Number);
    if (m.length !== 2 || !m.every(Number.isInteger)) throw new UsageError(`--${key} takes ${what}, got ${JSON.stringify(v)}`);
    return [m[0], m[1]];
  };
  const orig = pair(`${prefix}original-size`, "x", "WIDTHxHEIGHT");
  const crop = pair(`${prefix}crop`, ",", "TOP,LEFT");
  const target = pair(`${prefix}target-size`, "x", "WIDTHxHEIGHT");
  if (!orig && !crop && !target) return undefined;
  return {
    originalWidth: orig?.[0],
    originalHeight: orig?.[1],
    cropTop: crop?.[0] ?? 0,
    cropLeft: crop?.[1] ?? 0,
    targetWidth: target?.[0],
    targetHeight: target?.[1],
  };
}

function report(command: string, err: unknown): number {
  if (err instanceof UsageError) {
    process.stderr.write(`loraforge ${command}: ${err.message}\n(see loraforge --help)\n`);
    return EXIT.USAGE;
  }
  if (err instanceof InvalidSpecError || (err instanceof LoraforgeError && err.code === 3)) {
    process.stderr.write(`loraforge ${command}: ${err.message}\n`);
    for (const v of err.violations) process.stderr.write(`  ${v.field}: ${v.description}\n`);
    return EXIT.INVALID;
  }
  if (err instanceof JobNotFoundError || (err instanceof LoraforgeError && err.code === 5)) {
    process.stderr.write(`loraforge ${command}: ${err.message}\n`);
    return EXIT.NOT_FOUND;
  }
  if (err instanceof UnavailableError) {
    process.stderr.write(`loraforge ${command}: server unavailable (${err.message}); is \`loraforge serve\` running at that address?\n`);
    return EXIT.UNAVAILABLE;
  }
  process.stderr.write(`loraforge ${command}: ${err instanceof Error ? err.message : String(err)}\n`);
  return EXIT.FAILED;
}

/** Runs the engine's exporter locally, with the server's configured Python. */
function exportOnnx(a: Args): Promise<number> {
  const model = a.positional[0];
  if (!model) {
    process.stderr.write("usage: loraforge export-onnx MODEL_DIR [--out DIR]\n");
    return Promise.resolve(EXIT.USAGE);
  }
  const cfg = configFromEnv();
  const out = one(a, "out") ?? path.join(cfg.stateDir, "onnx");
  return new Promise((resolve) => {
    const child = spawn(cfg.python, ["-m", "loraforge_engine", "export-onnx", path.resolve(model), "--out", path.resolve(out)], {
      env: childEnv({ PYTHONPATH: cfg.engineDir }),
      stdio: "inherit",
    });
    child.on("error", (err) => {
      process.stderr.write(`loraforge export-onnx: cannot run ${cfg.python}: ${err.message}\n`);
      resolve(EXIT.FAILED);
    });
    child.on("exit", (code) => resolve(code === 0 ? EXIT.OK : EXIT.FAILED));
  });
}
