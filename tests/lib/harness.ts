// Shared test helpers: the tiny model and data set made by the real engine, a real
// `loraforge serve` process (with its managed nats-server), and the real SDK.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { artifactFileName, createClient, type Artifact, type JobEvent, type LoraforgeClient, type SpecInput } from "@loraforge/sdk";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.LORAFORGE_PYTHON ?? path.join(REPO, "engine", ".venv", "bin", "python");
export const CLI = path.join(REPO, "server", "dist", "cli", "main.js");

/** Runs `python -m loraforge_engine ...` (or a script) and returns stdout; throws with stderr on failure. */
export function python(args: string[]): string {
  const r = spawnSync(PYTHON, args, {
    env: { ...process.env, PYTHONPATH: path.join(REPO, "engine") },
    encoding: "utf8",
    maxBuffer: 64 * 1024 * 1024,
  });
  if (r.status !== 0) throw new Error(`python ${args.join(" ")} failed (${r.status}):\n${r.stderr}`);
  return r.stdout;
}

export interface Fixtures {
  root: string;
  model: string;
  dataset: string;
}

let cached: Fixtures | null = null;

/** The tiny model and data set, generated once per test run (LORAFORGE_TEST_FIXTURES shares them across files). */
export function fixtures(): Fixtures {
  if (cached) return cached;
  const root = process.env.LORAFORGE_TEST_FIXTURES ?? mkdtempSync(path.join(os.tmpdir(), "loraforge-fixtures-"));
  const f = { root, model: path.join(root, "tiny-sd"), dataset: path.join(root, "shapes") };
  if (!existsSync(path.join(f.model, "model_index.json"))) python(["-m", "loraforge_engine", "make-tiny-model", f.model]);
  if (!existsSync(path.join(f.dataset, "metadata.jsonl"))) python(["-m", "loraforge_engine", "make-dataset", f.dataset, "--count", "8"]);
  cached = f;
  return f;
}

/**
 * The tiny model's ONNX export, made once per fixtures folder: a server whose state dir gets a copy
 * under onnx/ starts with it warm instead of exporting for a minute.
 */
export function onnxExport(f: Fixtures): string {
  const out = path.join(f.root, "onnx");
  const done = existsSync(out) && readdirSync(out).some((d) => existsSync(path.join(out, d, "manifest.json")));
  if (!done) python(["-m", "loraforge_engine", "export-onnx", f.model, "--out", out]);
  return out;
}

export const tmpDir = (prefix: string) => mkdtempSync(path.join(os.tmpdir(), `loraforge-${prefix}-`));

export interface ServerProcess {
  address: string;
  natsUrl: string;
  /** The dashboard's URL ("" when started with LORAFORGE_DASHBOARD_ADDRESS=off). */
  dashboardUrl: string;
  stateDir: string;
  proc: ChildProcess;
  client: LoraforgeClient;
  stderr: string[];
  /** Sends SIGTERM and resolves with the exit code. */
  stop(): Promise<number | null>;
}

/**
 * Spawns `node cli/main.js ARGS`, collects its stderr, and resolves with its stdout so far
 * once `ready(stdout)` holds; rejects if it exits first.
 */
async function spawnCli(args: string[], env: Record<string, string>, ready: (out: string) => boolean) {
  // Workers advertise the host's CPU without asking the engine (a torch import per start, seconds of CPU on a
  // 2-core machine); tests/capabilities.test.ts and engine/tests/test_devices.py exercise the detection.
  const defaults = { LORAFORGE_LOG_LEVEL: "info", LORAFORGE_WORKER_DEVICE_KIND: process.env.LORAFORGE_WORKER_DEVICE_KIND ?? "cpu" };
  const proc = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...defaults, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  const stderr: string[] = [];
  proc.stderr!.on("data", (d: Buffer) => {
    stderr.push(d.toString());
    if (process.env.LORAFORGE_TEST_VERBOSE) process.stderr.write(d);
  });
  const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
  const out = await new Promise<string>((resolve, reject) => {
    let text = "";
    proc.stdout!.on("data", (d: Buffer) => {
      text += d.toString();
      if (ready(text)) resolve(text);
    });
    void exited.then((code) => reject(new Error(`loraforge ${args[0]} exited (${code}) before it was ready:\n${stderr.join("")}`)));
  });
  return { proc, stderr, exited, out };
}

/** Starts `loraforge serve` as a child process on a free port and connects the SDK to it. */
export async function startServer(opts: { stateDir?: string; args?: string[]; env?: Record<string, string> } = {}): Promise<ServerProcess> {
  const stateDir = opts.stateDir ?? tmpDir("state");
  mkdirSync(stateDir, { recursive: true });
  const env = { LORAFORGE_DASHBOARD_ADDRESS: "127.0.0.1:0", ...opts.env };
  const dashboardOn = env.LORAFORGE_DASHBOARD_ADDRESS !== "off";
  const { proc, stderr, exited, out } = await spawnCli(
    ["serve", "--address", "127.0.0.1:0", "--state-dir", stateDir, ...(opts.args ?? [])],
    env,
    (text) => /listening on .*\n/.test(text) && (!dashboardOn || /dashboard on \S+\n/.test(text)),
  );
  const m = out.match(/listening on (\S+) \(nats (\S+)\)/)!;
  const client = createClient({ address: m[1] });
  return {
    address: m[1],
    natsUrl: m[2],
    dashboardUrl: out.match(/dashboard on (\S+)/)?.[1] ?? "",
    stateDir,
    proc,
    client,
    stderr,
    async stop() {
      client.close();
      if (proc.exitCode === null) proc.kill("SIGTERM");
      return exited;
    },
  };
}

export interface WorkerProcess {
  proc: ChildProcess;
  stateDir: string;
  stderr: string[];
  /** Sends `signal` (default SIGTERM) and resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Starts `loraforge worker` against an existing NATS server. */
export async function startWorker(natsUrl: string, opts: { stateDir?: string; env?: Record<string, string> } = {}): Promise<WorkerProcess> {
  const stateDir = opts.stateDir ?? tmpDir("worker");
  const { proc, stderr, exited } = await spawnCli(["worker", "--nats", natsUrl, "--state-dir", stateDir], opts.env ?? {}, (text) =>
    text.includes("worker ready"),
  );
  return {
    proc,
    stateDir,
    stderr,
    async stop(signal: NodeJS.Signals = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
}

/** Resolves when `pred` holds, polling every 100 ms; rejects after `ms`. */
export async function until(pred: () => boolean | Promise<boolean>, ms = 60_000, what = "condition"): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Every event until the iterator ends. */
export async function collect(it: AsyncIterable<JobEvent>): Promise<JobEvent[]> {
  const out: JobEvent[] = [];
  for await (const ev of it) out.push(ev);
  return out;
}

/** Pids of live processes whose command line contains `needle`. */
export function processesMatching(needle: string): number[] {
  const r = spawnSync("pgrep", ["-f", "--", needle], { encoding: "utf8" });
  return r.stdout
    .split("\n")
    .filter(Boolean)
    .map(Number)
    .filter((pid) => pid !== process.pid);
}

/** The Infer process of the serve process `servePid` (its child running infer/child.js); undefined when none runs. */
export function inferProcess(servePid: number): number | undefined {
  const r = spawnSync("pgrep", ["-P", String(servePid), "-f", "infer/child.js"], { encoding: "utf8" });
  const pids = r.stdout.split("\n").filter(Boolean).map(Number);
  if (pids.length > 1) throw new Error(`serve ${servePid} runs ${pids.length} Infer processes: ${pids.join(", ")}`);
  return pids[0];
}

/** A kB field of /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes; throws when the process or the field is gone. */
export function procStatusBytes(pid: number, key: string): number {
  return Number(new RegExp(`${key}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]) * 1024;
}

/** The credentials a `serve` generated for its managed nats-server (what a local admin would read). */
export function natsCredentials(stateDir: string): { user: string; pass: string } {
  return JSON.parse(readFileSync(path.join(stateDir, "nats", "credentials.json"), "utf8")) as { user: string; pass: string };
}

export const sha256File = (p: string) => createHash("sha256").update(readFileSync(p)).digest("hex");

/**
 * A short run on the tiny model: seconds, not minutes, on a 2-core CPU. It trains on the fixture
 * folder (datasetDir) unless `extra` names another source (datasetId, datasetName, dataset).
 */
export function quickSpec(f: Fixtures, extra: Record<string, unknown> = {}): SpecInput {
  const ownSource = ["datasetId", "datasetName", "dataset"].some((k) => k in extra);
  return {
    baseModel: f.model,
    ...(ownSource ? {} : { datasetDir: f.dataset }),
    resolution: 64,
    trainBatchSize: 2,
    maxTrainSteps: 6,
    checkpointingSteps: 3,
    learningRate: 1e-3,
    lrWarmupSteps: 0,
    seed: 7,
    ...extra,
  } as SpecInput;
}

/** Downloads an artifact through the API into a fresh temporary folder; returns the local file. */
export async function download(client: LoraforgeClient, artifact: Artifact | string): Promise<string> {
  const file = path.join(tmpDir("artifact"), artifactFileName(artifact));
  await client.artifacts.download(artifact, { file });
  return file;
}

/**
 * Every string in a response (a message's JSON, or several) that names a place on a host: an
 * absolute path, a `file:` URL, or anything under the system's temporary folder. `allowed` are the
 * paths the client itself sent (a spec's base model and data set folder are echoed back as given,
 * and an error may name them). An Any's bytes (`value`, base64) are not text, and a LogLine's
 * message is the engine's free-form log (not a field a client reads a location from): both are skipped.
 */
export function hostPaths(value: unknown, allowed: string[] = []): string[] {
  const found: string[] = [];
  const tmp = os.tmpdir();
  const walk = (v: unknown, at: string) => {
    if (typeof v === "string") {
      if (allowed.includes(v)) return;
      const rest = allowed.reduce((text, a) => text.split(a).join(""), v);
      if (v.startsWith("/") || /^file:/i.test(v) || rest.includes(tmp + "/") || /^[A-Za-z]:\\/.test(v)) found.push(`${at}: ${v}`);
    } else if (Array.isArray(v)) v.forEach((x, i) => walk(x, `${at}[${i}]`));
    else if (v && typeof v === "object")
      for (const [k, x] of Object.entries(v)) {
        const where = at ? `${at}.${k}` : k;
        if ((k === "value" && "typeUrl" in v) || /(^|\.)log\.message$/.test(where)) continue;
        walk(x, where);
      }
  };
  walk(value, "");
  return found;
}

/** Asserts that no response carries a host path (other than the `allowed` ones the client sent). */
export function assertNoHostPaths(value: unknown, allowed: string[] = [], what = "the response"): void {
  assert.deepEqual(hostPaths(value, allowed), [], `${what} names places on the server host`);
}
