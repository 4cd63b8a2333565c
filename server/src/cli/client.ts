// The client commands of `loraforge`: train, jobs, watch, cancel, download, infer,
// datasets, export-onnx. They talk to a server through @loraforge/sdk, exactly as
// other services do.
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { parse as parseYaml } from "yaml";
import { fromJson, toBinary, type DescEnum, type DescField, type JsonValue } from "@bufbuild/protobuf";
import {
  Artifact,
  artifactFileName,
  ArtifactKind,
  createClient,
  ClassImageProgress,
  DatasetReport,
  SkipReason,
  errorMessage,
  InvalidSpecError,
  Job,
  JobEvent,
  JobNotFoundError,
  JobState,
  LoraforgeError,
  stateName,
  TrainingSpec,
  UnavailableError,
  FINAL_STATES,
  type LoraforgeClient,
  type Status,
} from "@loraforge/sdk";
import { BaseModel, InferResponse, Sampler, TrainedLora, type DeepPartial, type SizeConditioning } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { Dataset } from "@loraforge/sdk/gen/loraforge/v1/dataset_service";
import { childEnv } from "../core/child-env.js";
import { isModelName } from "../core/models.js";
import { contractMessage, protoJson } from "../api/contract.js";
import { configFromEnv } from "../server.js";

/** Exit codes, documented in the README and `loraforge --help`. */
export const EXIT = { OK: 0, FAILED: 1, USAGE: 2, INVALID: 3, NOT_FOUND: 4, CANCELLED: 5, UNAVAILABLE: 69 } as const;

/** One option of a command: `arg` names its value; without one it is a switch. */
interface Option {
  name: string;
  arg?: string;
  help: string;
  /** Another spelling, e.g. "o" for "output". */
  alias?: string;
}

interface Command {
  args: string;
  about: string;
  options: Option[];
  /** Takes every TrainingSpec field as an option too. */
  spec?: boolean;
}

const COMMON: Option[] = [
  { name: "address", arg: "HOST:PORT", help: "the server (LORAFORGE_ADDRESS, default 127.0.0.1:50051)" },
  { name: "token", arg: "TOKEN", help: "bearer token (LORAFORGE_API_TOKEN)" },
  { name: "json", help: "machine-readable output, one JSON object per line: messages in proto3 JSON (enum names, 64-bit integers as strings)" },
  { name: "help", alias: "h", help: "this help" },
];

const WxH = (what: string) => `${what} size conditioning (SDXL), WIDTHxHEIGHT`;

/** Every client command and its options: the parser accepts exactly these, and --help prints them. */
const COMMANDS: Record<string, Command> = {
  train: {
    args: "[SPEC.yaml|SPEC.json] [--<spec-field> VALUE]...",
    about: "submit a training job; spec flags override the file (--max-train-steps 500)",
    options: [
      { name: "request-id", arg: "ID", help: "idempotency key: a retry with the same key returns the same job" },
      { name: "follow", help: "follow the job until it ends; the exit code is then the job's (0, 1 or 5)" },
    ],
    spec: true,
  },
  jobs: {
    args: "",
    about: "list jobs, newest first",
    options: [
      { name: "state", arg: "STATE", help: "only jobs in this state: QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED" },
      { name: "limit", arg: "N", help: "at most N jobs (default 50)" },
    ],
  },
  watch: {
    args: "JOB",
    about: "follow a job's events until it ends; exits with the job's code (0 succeeded, 1 failed, 5 cancelled)",
    options: [{ name: "after", arg: "SEQ", help: "only events after this sequence number (default 0: the whole history)" }],
  },
  cancel: { args: "JOB", about: "cancel a job", options: [] },
  download: {
    args: "ARTIFACT_NAME|JOB",
    about:
      "download an artifact by its name, as a job lists it (jobs/<job id>/lora/<file>, jobs/<job id>/validation/<file>, " +
      "jobs/<job id>/checkpoint-<step>/ — a checkpoint arrives as a .tar), or a job's final LoRA by the job's id",
    options: [{ name: "output", alias: "o", arg: "FILE", help: "where to write it (default: the artifact's file name, checkpoint-<step>.tar for a checkpoint)" }],
  },
  infer: {
    args: "--base-model models/NAME|DIR --prompt TEXT [options]",
    about: "draw images with a base model and any LoRAs",
    options: [
      { name: "base-model", arg: "models/NAME|DIR", help: "a model of the server's models folder (loraforge models lists them), or a diffusers folder on the server host" },
      { name: "prompt", arg: "TEXT", help: "what to draw" },
      { name: "negative-prompt", arg: "TEXT", help: "what to steer away from" },
      { name: "lora", arg: "JOB[:SCALE]", help: "a job's final LoRA at a scale (default 1); repeatable" },
      { name: "lora-file", arg: "FILE[:SCALE]", help: "a LoRA file on the server host at a scale; repeatable" },
      { name: "steps", arg: "N", help: "denoising steps" },
      { name: "guidance", arg: "G", help: "classifier-free guidance scale" },
      { name: "seed", arg: "S", help: "random seed" },
      { name: "width", arg: "W", help: "image width in pixels" },
      { name: "height", arg: "H", help: "image height in pixels" },
      { name: "num-images", arg: "N", help: "images per prompt" },
      { name: "sampler", arg: "NAME", help: "" /* filled in from the contract's Sampler enum below */ },
      { name: "output", alias: "o", arg: "OUT.png", help: "where to write the image (default out.png; several get -0, -1, …)" },
      { name: "prompt-2", arg: "TEXT", help: "SDXL: the second text encoder's prompt" },
      { name: "negative-prompt-2", arg: "TEXT", help: "SDXL: the second text encoder's negative prompt" },
      { name: "original-size", arg: "WxH", help: WxH("original") },
      { name: "crop", arg: "TOP,LEFT", help: "crop-origin size conditioning (SDXL)" },
      { name: "target-size", arg: "WxH", help: WxH("target") },
      { name: "negative-original-size", arg: "WxH", help: WxH("negative original") },
      { name: "negative-crop", arg: "TOP,LEFT", help: "negative crop-origin size conditioning (SDXL)" },
      { name: "negative-target-size", arg: "WxH", help: WxH("negative target") },
    ],
  },
  models: {
    args: "",
    about: "list the server's base models (their names for --base-model, content hash, native size, LoRA slots once exported) and the LoRAs of succeeded jobs",
    options: [],
  },
  datasets: {
    args: "upload FOLDER|ZIP | rm ID",
    about: "upload a captioned image set (prints its id for train --dataset-id ID, image count and bytes), or delete one (prints what was deleted)",
    options: [{ name: "name", arg: "NAME", help: "the set's name (default: the folder's or zip's name)" }],
  },
  "export-onnx": {
    args: "MODEL_DIR",
    about: "export a base model to ONNX (runs the engine locally)",
    options: [{ name: "out", arg: "DIR", help: "where to write it (default <state dir>/onnx)" }],
  },
};

const EXIT_CODES = `Exit codes: 0 ok · 1 the job failed (or another error) · 2 usage · 3 invalid spec or request
            · 4 not found · 5 the job was cancelled · 69 server unavailable`;

/** `left` then `text` wrapped in a column from `col` on (on the next line when `left` is too wide). */
function twoColumns(left: string, text: string, col: number): string[] {
  const lines = wrap(text, col);
  if (left.length < col - 1) lines[0] = left.padEnd(col) + lines[0].slice(col);
  else lines.unshift(left);
  return lines;
}

const optionLines = (options: Option[]) =>
  options.flatMap((o) => twoColumns(`  ${o.alias ? `-${o.alias}, ` : ""}--${o.name}${o.arg ? ` ${o.arg}` : ""}`, o.help, 30));

export const CLIENT_USAGE = [
  "usage: loraforge <command> [options]     (every command takes --help)",
  "",
  ...Object.entries(COMMANDS).flatMap(([name, c]) => twoColumns(`  ${name} ${c.args}`, c.about, 40)),
  "",
  "Common options:",
  ...optionLines(COMMON),
  "",
  EXIT_CODES,
].join("\n");

/** A TrainingSpec field as a `train` option: `--max-train-steps 500` sets maxTrainSteps. */
interface SpecOption {
  flag: string;
  /** The field's proto3 JSON name, e.g. "maxTrainSteps". */
  field: string;
  /** The field's name in the .proto, e.g. "max_train_steps" (spec files may use either). */
  protoName: string;
  kind: "string" | "integer" | "number" | "boolean" | "enum";
  repeated: boolean;
  /** The field's comment in training_spec.proto. */
  doc: string;
  /** The oneof the field is a member of ("dataset"), if any. */
  oneof?: string;
  /** For an enum field: its values. */
  values?: EnumChoice[];
}

/** One value of an enum as the CLI takes it: the short name ("cosine") or the full one ("LR_SCHEDULER_COSINE"). */
interface EnumChoice {
  short: string;
  full: string;
}

/**
 * The values of an enum, with their short names: the value name without the enum's shared prefix,
 * in lower case (LR_SCHEDULER_COSINE → "cosine", SAMPLER_DPMPP_2M → "dpmpp_2m"). The zero value
 * (…_UNSPECIFIED, "the documented default") is what leaving the option out means, so it is not offered.
 */
export function enumChoices(e: DescEnum): EnumChoice[] {
  const zero = e.values.find((v) => v.number === 0)?.name ?? "";
  const prefix = zero.endsWith("UNSPECIFIED") ? zero.slice(0, -"UNSPECIFIED".length) : "";
  return e.values.filter((v) => v.number !== 0).map((v) => ({ short: v.name.startsWith(prefix) ? v.name.slice(prefix.length).toLowerCase() : v.name, full: v.name }));
}

const choiceList = (values: EnumChoice[]) => values.map((v) => v.short).join("|");

/** An enum value from its short or full name (any case); throws a UsageError listing the allowed values. */
function enumValue(values: EnumChoice[], given: string, what: string): string {
  const g = given.trim();
  const hit = values.find((v) => v.short === g.toLowerCase() || v.full === g.toUpperCase());
  if (!hit) throw new UsageError(`${what} takes one of ${values.map((v) => v.short).join(", ")} (or the full name, e.g. ${values[0].full}), got ${JSON.stringify(given)}`);
  return hit.full;
}

let specOptionsCache: SpecOption[] | undefined;

/** Every TrainingSpec field, read from the contract's descriptors: the parser and `train --help` both use it. */
export function specOptions(): SpecOption[] {
  if (specOptionsCache) return specOptionsCache;
  const { message, comment } = contractMessage("loraforge.v1.TrainingSpec");
  specOptionsCache = message.fields.map((f: DescField) => {
    const scalar = f.fieldKind === "scalar" || (f.fieldKind === "list" && f.listKind === "scalar") ? f.scalar : undefined;
    const en = f.fieldKind === "enum" ? f.enum : f.fieldKind === "list" && f.listKind === "enum" ? f.enum : undefined;
    // ScalarType: 1 double, 2 float, 9 string, 8 bool; the rest are integers.
    const kind = en ? "enum" : scalar === 9 ? "string" : scalar === 8 ? "boolean" : scalar === 1 || scalar === 2 ? "number" : scalar !== undefined ? "integer" : "string";
    return {
      flag: f.name.replace(/_/g, "-"),
      field: f.jsonName,
      protoName: f.name,
      kind,
      repeated: f.fieldKind === "list",
      doc: comment(f),
      oneof: f.oneof?.name,
      values: en ? enumChoices(en) : undefined,
    };
  });
  return specOptionsCache;
}

/** The choices of an enum field of a top-level contract message, e.g. InferRequest.sampler. */
function fieldChoices(typeName: string, field: string): EnumChoice[] {
  const f = contractMessage(typeName).message.fields.find((x) => x.name === field);
  if (f?.fieldKind !== "enum") throw new Error(`${typeName}.${field} is not an enum field of the contract`);
  return enumChoices(f.enum);
}

let samplerChoicesCache: EnumChoice[] | undefined;
const samplerChoices = () => (samplerChoicesCache ??= fieldChoices("loraforge.v1.InferRequest", "sampler"));

function wrap(text: string, indent: number, width = 100): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(/\s+/).filter(Boolean)) {
    if (line && indent + line.length + 1 + word.length > width) {
      lines.push(" ".repeat(indent) + line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) lines.push(" ".repeat(indent) + line);
  return lines;
}

/** `loraforge COMMAND --help`: the command's arguments and every option it takes. */
export function commandUsage(name: string): string {
  const c = name === "infer" ? inferCommand() : COMMANDS[name];
  const out = [`usage: loraforge ${name} ${c.args}`.trimEnd(), "", ...wrap(c.about, 0), ""];
  if (c.options.length) out.push("Options:", ...optionLines(c.options), "");
  out.push("Common options:", ...optionLines(COMMON), "");
  if (c.spec) {
    out.push(
      ...wrap(
        "Spec options: every TrainingSpec field (proto/loraforge/v1/training_spec.proto); repeatable ones add an item each time. " +
          "An enum field takes one of the short names listed or the full value name (--lr-scheduler cosine or LR_SCHEDULER_COSINE); " +
          "left out, it takes its documented default. The data set is exactly one of --dataset-id, --dataset-dir and --dataset-name:",
        0,
      ),
    );
    for (const o of specOptions()) {
      const arg = o.kind === "boolean" ? "true|false" : o.kind === "integer" ? "INT" : o.kind === "number" ? "NUMBER" : o.kind === "enum" ? choiceList(o.values!) : "TEXT";
      const note = o.repeated ? " (repeatable)" : o.oneof ? ` (one of the ${o.oneof} options)` : "";
      out.push(`  --${o.flag} ${arg}${note}`, ...wrap(o.doc, 6));
    }
    out.push("");
  }
  out.push(EXIT_CODES);
  return out.join("\n");
}

/** The infer command with its --sampler values read from the contract. */
function inferCommand(): Command {
  const c = COMMANDS.infer;
  const help = `the sampler: ${samplerChoices().map((v) => v.short).join(", ")} (or the full name, ${samplerChoices()[0].full}); default euler`;
  return { ...c, options: c.options.map((o) => (o.name === "sampler" ? { ...o, help } : o)) };
}

type Args = { positional: string[]; flags: Map<string, string[]>; bool: Set<string> };

/** Parses argv against the command's options (and, for train, the spec's); anything else is a usage error. */
function parseArgs(command: Command, argv: string[]): Args {
  const byName = new Map<string, Option>();
  for (const o of [...COMMON, ...command.options]) {
    byName.set(o.name, o);
    if (o.alias) byName.set(o.alias, o);
  }
  const spec = command.spec ? new Set(specOptions().map((o) => o.flag)) : new Set<string>();
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
    const body = t.replace(/^--?/, "");
    const eq = body.indexOf("=");
    const key = eq >= 0 ? body.slice(0, eq) : body;
    const option = byName.get(key);
    if (!option && !spec.has(key)) {
      const hint = command.spec ? " (spec fields too: see loraforge train --help)" : "";
      throw new UsageError(`unknown option ${t.slice(0, t.length - (eq >= 0 ? body.length - eq : 0))}${hint}`);
    }
    const name = option?.name ?? key;
    if (option && !option.arg) {
      if (eq >= 0) throw new UsageError(`--${name} takes no value`);
      a.bool.add(name);
      continue;
    }
    const value = eq >= 0 ? body.slice(eq + 1) : argv[++i];
    if (value === undefined) throw new UsageError(`${t} needs a value`);
    a.flags.set(name, [...(a.flags.get(name) ?? []), value]);
  }
  return a;
}

class UsageError extends Error {}

const one = (a: Args, key: string): string | undefined => a.flags.get(key)?.at(-1);

/** A spec file that does not decode into a TrainingSpec: an invalid spec (exit 3), not a usage error. */
class SpecFileError extends Error {}

/**
 * A spec from an optional YAML/JSON file plus `--field value` flags (flags win; a data set flag
 * replaces the file's data set). The result is decoded by the contract's own descriptor, so an
 * unknown key, a value of the wrong type or two data sets in one file are named before anything
 * is sent. Enum values may be short ("cosine") or full ("LR_SCHEDULER_COSINE").
 */
export function specFromArgs(a: Args, cwd = process.cwd()): TrainingSpec {
  const options = specOptions();
  const byKey = new Map<string, SpecOption>();
  for (const o of options) byKey.set(o.field, o).set(o.protoName, o);
  const json: Record<string, JsonValue> = {};

  const file = a.positional[0];
  if (file) {
    const text = readFileSync(file, "utf8");
    const raw: unknown = file.endsWith(".json") ? JSON.parse(text) : parseYaml(text);
    if (raw !== null && raw !== undefined && (typeof raw !== "object" || Array.isArray(raw))) throw new SpecFileError(`${file}: a spec file holds one mapping of TrainingSpec fields`);
    for (const [key, value] of Object.entries((raw ?? {}) as Record<string, JsonValue>)) {
      const o = byKey.get(key);
      if (!o) throw new SpecFileError(`${file}: ${JSON.stringify(key)} is not a TrainingSpec field (see loraforge train --help)`);
      const toEnum = (v: JsonValue) => (typeof v === "string" ? enumValue(o.values!, v, `${file}: ${key}`) : v);
      json[o.field] = o.kind === "enum" ? (Array.isArray(value) ? value.map(toEnum) : toEnum(value)) : value;
    }
  }

  const datasetFlags = options.filter((o) => o.oneof === "dataset" && a.flags.has(o.flag));
  if (datasetFlags.length > 1) throw new UsageError(`give one data set: ${datasetFlags.map((o) => `--${o.flag}`).join(" or ")}, not both`);
  if (datasetFlags.length === 1) for (const o of options) if (o.oneof === "dataset") delete json[o.field];

  for (const o of options) {
    const values = a.flags.get(o.flag);
    if (!values) continue;
    const parse = (v: string): JsonValue => {
      if (o.kind === "string") return v;
      if (o.kind === "enum") return enumValue(o.values!, v, `--${o.flag}`);
      if (o.kind === "boolean") {
        if (v !== "true" && v !== "false") throw new UsageError(`--${o.flag} takes true or false, got ${JSON.stringify(v)}`);
        return v === "true";
      }
      const n = Number(v);
      if (v.trim() === "" || !Number.isFinite(n) || (o.kind === "integer" && !Number.isInteger(n)))
        throw new UsageError(`--${o.flag} takes ${o.kind === "integer" ? "an integer" : "a number"}, got ${JSON.stringify(v)}`);
      return n;
    };
    json[o.field] = o.repeated ? values.map(parse) : parse(values.at(-1)!);
  }

  const { message } = contractMessage("loraforge.v1.TrainingSpec");
  let spec: TrainingSpec;
  try {
    spec = TrainingSpec.decode(toBinary(message, fromJson(message, json)));
  } catch (err) {
    // e.g. `cannot decode field loraforge.v1.TrainingSpec.rank from JSON: expected number (int32), got "x"`
    throw new SpecFileError(`${file ? `${file}: ` : ""}${(err as Error).message}`);
  }
  // Paths typed on a command line (or in a file there) are relative to where it was typed; a
  // model name ("models/<name>") is the server's (a folder of that name here: ./models/<name>).
  if (spec.baseModel && !isModelName(spec.baseModel)) spec.baseModel = path.resolve(cwd, spec.baseModel);
  if (spec.dataset?.$case === "datasetDir" && spec.dataset.datasetDir) spec.dataset.datasetDir = path.resolve(cwd, spec.dataset.datasetDir);
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

/** The data set report as one line: images used and skipped (with reasons), training sizes, caches. */
export function datasetLine(r: DatasetReport): string {
  const reasons = new Map<string, string[]>();
  for (const s of r.skipped) {
    const why = SkipReason[s.reason].replace("SKIP_REASON_", "").toLowerCase();
    reasons.set(why, [...(reasons.get(why) ?? []), s.name]);
  }
  const skipped = r.skippedTotal
    ? `, ${r.skippedTotal} skipped (${[...reasons].map(([why, names]) => `${why}: ${names.slice(0, 3).join(", ")}${names.length > 3 ? ", …" : ""}`).join("; ")})`
    : "";
  const buckets = r.buckets.map((b) => `${b.width}x${b.height}: ${b.images}`).join(", ");
  const caches = [r.latentsCached ? `latents of ${r.latentsCached}${r.latentsCachedFlipped ? " (both orientations)" : ""}` : "", r.textEmbeddingsCached ? "text embeddings" : ""].filter(Boolean);
  return `data set: ${r.imagesUsed} of ${r.imagesFound} images used${skipped}; sizes ${buckets || "–"}; cached: ${caches.join(", ") || "nothing"}`;
}

/** Prior preservation's class images: given, cached, generated so far. */
export function classImagesLine(c: ClassImageProgress): string {
  return `class images (${JSON.stringify(c.classPrompt)}): ${c.given} given, ${c.cached} cached, ${c.generated} of ${c.toGenerate} generated${c.done ? "; ready" : ""}`;
}

/** One line of --json output. */
const printJson = (value: unknown) => void process.stdout.write(JSON.stringify(value) + "\n");

const stateLine = (state: JobState, error: Status | undefined, lora?: Artifact) =>
  `${stateName(state)}${error ? `: ${errorMessage(error)}` : ""}${lora ? ` — LoRA ${lora.name}` : ""}`;

const finalLora = (job: Job) => job.artifacts.find((x) => x.kind === ArtifactKind.ARTIFACT_KIND_LORA && x.name);

const exitCodeOf = (state: JobState) =>
  state === JobState.JOB_STATE_SUCCEEDED ? EXIT.OK : state === JobState.JOB_STATE_CANCELLED ? EXIT.CANCELLED : EXIT.FAILED;

/** Follows a job, printing a live line on a terminal (or a line per event otherwise); returns the job's exit code. */
async function follow(client: LoraforgeClient, jobId: string, after: number, json: boolean): Promise<number> {
  const tty = process.stdout.isTTY && !json;
  let lastPrinted = 0;
  let final: JobState = JobState.JOB_STATE_UNSPECIFIED;
  for await (const ev of client.progress(jobId, { afterSequence: after })) {
    const p = ev.payload;
    if (json) {
      printJson(protoJson(JobEvent, "loraforge.v1.JobEvent", ev));
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
          ? stateLine(p.state.state, p.state.error, p.state.lora)
          : p?.$case === "checkpoint"
            ? `checkpoint at step ${p.checkpoint.step}: ${p.checkpoint.artifact?.name ?? ""}`
            : p?.$case === "validation"
              ? `validation images at step ${p.validation.step}: ${p.validation.images.map((i) => i.name).join(", ")}`
              : p?.$case === "log"
                ? p.log.message
                : p?.$case === "dataset"
                  ? datasetLine(p.dataset)
                  : p?.$case === "classImages"
                    ? classImagesLine(p.classImages)
                    : "";
      if (text) process.stdout.write(`${tty ? "\r\x1b[K" : ""}${text}\n`);
    }
    if (p?.$case === "state") final = p.state.state;
  }
  if (!FINAL_STATES.includes(final)) {
    // The stream ends only after the final event; started past it (--after N), it
    // delivered none, so the record says how the job ended.
    const job = await client.getJob(jobId);
    final = job.state;
    if (!json) process.stdout.write(`${tty ? "\r\x1b[K" : ""}${stateLine(job.state, job.error, finalLora(job))}\n`);
  }
  return exitCodeOf(final);
}

function printJob(job: Job, json: boolean) {
  if (json) return printJson(protoJson(Job, "loraforge.v1.Job", job));
  const steps = job.totalSteps ? `${job.currentStep}/${job.totalSteps}` : "-";
  // Last: why it failed, or why it is still waiting for a worker (Job.queued_reason).
  const why = job.error ? errorMessage(job) : job.queuedReason;
  process.stdout.write(`${job.id}  ${stateName(job.state).padEnd(10)} ${steps.padEnd(11)} ${job.createTime?.toISOString() ?? ""}${why ? "  " + why : ""}\n`);
}

function parseLoraRef(v: string, kind: "jobId" | "path") {
  const m = v.match(/^(.*?)(?::(-?[\d.]+))?$/)!;
  const scale = m[2] !== undefined ? Number(m[2]) : undefined;
  const source = kind === "jobId" ? { $case: "jobId" as const, jobId: m[1] } : { $case: "path" as const, path: path.resolve(m[1]) };
  return { source, scale };
}

export async function runClient(command: string, argv: string[]): Promise<number> {
  const spec = COMMANDS[command];
  if (!spec) return report(command, new UsageError(`unknown command ${JSON.stringify(command)}`));
  let a: Args;
  try {
    a = parseArgs(spec, argv);
  } catch (err) {
    process.stderr.write(`loraforge ${command}: ${(err as Error).message}\n(see loraforge ${command} --help)\n`);
    return EXIT.USAGE;
  }
  if (a.bool.has("help")) {
    process.stdout.write(commandUsage(command) + "\n");
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
        if (!json) process.stdout.write(`job ${job.id} queued${job.job.queuedReason ? ` (${job.job.queuedReason})` : ""}\n`);
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
      case "models": {
        const res = await client.listModels();
        if (json) {
          for (const m of res.baseModels) printJson({ baseModel: protoJson(BaseModel, "loraforge.v1.BaseModel", m) });
          for (const l of res.loras) printJson({ lora: protoJson(TrainedLora, "loraforge.v1.TrainedLora", l) });
          return EXIT.OK;
        }
        for (const m of res.baseModels) {
          const slots = m.exported ? `${m.loraSlots} LoRA slots` : "not exported yet";
          process.stdout.write(`${m.name || "(by path)"}  ${m.modelHash}  ${m.nativeSize}px  ${slots}\n`);
        }
        for (const l of res.loras) process.stdout.write(`lora ${l.jobId}  rank ${l.rank}  on ${l.baseModel || l.baseModelHash || "?"}\n`);
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
        const target = a.positional[0];
        if (!target) throw new UsageError("download needs an ARTIFACT_NAME (jobs/<job id>/…, as the job lists it) or a JOB id");
        let name = target;
        if (!target.startsWith("jobs/")) {
          // A job id: its final LoRA.
          const job = await client.getJob(target);
          const lora = finalLora(job);
          if (!lora)
            throw new UsageError(
              `job ${target} has no final LoRA (state ${stateName(job.state)}); name an artifact instead: ${job.artifacts.map((x) => x.name).join(" ") || "(none yet)"}`,
            );
          name = lora.name;
        }
        const out = one(a, "output") ?? artifactFileName(name);
        const info = await client.artifacts.download(name, { file: out });
        if (json) printJson({ file: path.resolve(out), artifact: protoJson(Artifact, "loraforge.v1.Artifact", info) });
        else process.stdout.write(`${path.resolve(out)}\n`);
        return EXIT.OK;
      }
      case "infer": {
        const baseModel = one(a, "base-model");
        if (!baseModel) throw new UsageError("infer needs --base-model models/NAME or DIR");
        const num = (k: string) => (one(a, k) !== undefined ? Number(one(a, k)) : undefined);
        const res = await client.infer({
          prompt: one(a, "prompt") ?? "",
          negativePrompt: one(a, "negative-prompt") ?? "",
          baseModel: isModelName(baseModel) ? baseModel : path.resolve(baseModel),
          loras: [...(a.flags.get("lora") ?? []).map((v) => parseLoraRef(v, "jobId")), ...(a.flags.get("lora-file") ?? []).map((v) => parseLoraRef(v, "path"))],
          numInferenceSteps: num("steps"),
          guidanceScale: num("guidance"),
          seed: num("seed"),
          width: num("width"),
          height: num("height"),
          numImages: num("num-images"),
          sampler: one(a, "sampler") !== undefined ? samplerFromName(one(a, "sampler")!) : Sampler.SAMPLER_UNSPECIFIED,
          prompt2: one(a, "prompt-2"),
          negativePrompt2: one(a, "negative-prompt-2"),
          sizeConditioning: sizeConditioning(a, ""),
          negativeSizeConditioning: sizeConditioning(a, "negative-"),
        });
        const out = one(a, "output") ?? "out.png";
        const files = res.images.map((img, i) => {
          const f = res.images.length === 1 ? out : out.replace(/(\.png)?$/i, `-${i}.png`);
          writeFileSync(f, img.png);
          return path.resolve(f);
        });
        if (json) printJson({ files, ...(protoJson(InferResponse, "loraforge.v1.InferResponse", { ...res, images: [] }) as object) });
        else process.stdout.write(files.join("\n") + "\n");
        return EXIT.OK;
      }
      case "datasets": {
        const usage = "usage: loraforge datasets upload FOLDER|ZIP [--name NAME] | loraforge datasets rm ID";
        if (!["upload", "rm"].includes(a.positional[0]) || !a.positional[1]) throw new UsageError(usage);
        const ds =
          a.positional[0] === "rm"
            ? await client.datasets.delete(a.positional[1])
            : await client.datasets.upload(path.resolve(a.positional[1]), { name: one(a, "name") });
        if (json) printJson(protoJson(Dataset, "loraforge.v1.Dataset", ds));
        else process.stdout.write(`${ds.id}  ${ds.imageCount} images${ds.uncaptioned ? " (uncaptioned: train with --instance-prompt)" : ""}  ${ds.sizeBytes} bytes\n`);
        return EXIT.OK;
      }
      default:
        throw new UsageError(`no such command ${JSON.stringify(command)}`);
    }
  } catch (err) {
    return report(command, err);
  } finally {
    client.close();
  }
}

/** --sampler's value (short or full name) as the Sampler enum. */
function samplerFromName(v: string): Sampler {
  const full = enumValue(samplerChoices(), v, "--sampler");
  return Sampler[full as keyof typeof Sampler];
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
    process.stderr.write(`loraforge ${command}: ${err.message}\n(see loraforge ${COMMANDS[command] ? `${command} ` : ""}--help)\n`);
    return EXIT.USAGE;
  }
  if (err instanceof SpecFileError) {
    process.stderr.write(`loraforge ${command}: invalid spec: ${err.message}\n`);
    return EXIT.INVALID;
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
