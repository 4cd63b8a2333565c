// The Infer process, seen from `loraforge serve`: onnxruntime runs in a child process (infer/child.ts)
// so that its memory is its own. An out-of-memory kill or a crash there fails the requests it was
// rendering with UNAVAILABLE INFER_PROCESS_LOST and nothing else; the next request starts a new one
// (after a back-off when they die in a row). After a large request the process is retired once
// nothing runs or waits, which returns onnxruntime's arenas to the system (reopening sessions in
// the same process does not: bench/RESULTS.md), and a fresh one reopens the models it had open.
import { fork, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { status } from "@grpc/grpc-js";
import type { InferRequest } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { childEnv } from "../core/child-env.js";
import { ApiError, inferCancelled, type FieldViolation } from "../core/errors.js";
import { log } from "../core/log.js";
import type { RuntimeOptions } from "./model.js";
import type { SchedulerName } from "./schedulers.js";

/** What the child needs to set itself up (sent once, before anything else). */
export interface ChildInit {
  python: string;
  engineDir: string;
  /** ONNX exports live under <cacheRoot>/<hash>/. */
  cacheRoot: string;
  dataRoots: string[];
  runtime: RuntimeOptions;
  loraCacheBytes?: number;
}

/** One render, validated and sized by the serve process. */
export interface RenderJob {
  id: number;
  /** The base model's folder and content hash; `confined` (named by path): only files inside the data roots are read. */
  base: { dir: string; hash: string; confined: boolean };
  /** The request's text and conditioning fields (the rest is resolved below). */
  req: Pick<InferRequest, "prompt" | "negativePrompt" | "prompt2" | "negativePrompt2" | "sizeConditioning" | "negativeSizeConditioning">;
  /** LoRA files on this host; `confined` ones (given by path) must stay inside the data roots; `field` names them in errors. */
  loras: { file: string; confined: boolean; field: string; scale: number }[];
  steps: number;
  guidance: number;
  seed: number;
  numImages: number;
  /** Images rendered together (the memory plan's group). */
  perGroup: number;
  scheduler: SchedulerName;
  width: number;
  height: number;
}

export interface RenderResult {
  pngs: Uint8Array[];
  modelHash: string;
  timings: { loadModelMs: number; loraMs: number; textEncodeMs: number; denoiseMs: number; decodeMs: number; pngMs: number };
}

export type SerializedError =
  | { api: { code: status; reason: string; message: string; violations: FieldViolation[]; metadata: Record<string, string> } }
  | { internal: string };

export type ToChild =
  | { type: "init"; init: ChildInit }
  | { type: "render"; job: RenderJob }
  | { type: "cancel"; id: number }
  | { type: "warm"; dir: string; hash: string; confined: boolean }
  | { type: "exit" };

export type ToParent = { type: "ready" } | { type: "done"; id: number; result: RenderResult } | { type: "failed"; id: number; error: SerializedError };

/** The requests in flight died with the Infer process (killed, out of memory, crashed): safe to retry. */
export const inferProcessLost = (how: string) =>
  new ApiError(status.UNAVAILABLE, "INFER_PROCESS_LOST", `the inference process ended (${how}) while rendering this request; retry`, [], { exit: how });

/** A child's unexpected error, rebuilt in the serve process (the stack is for the log). */
export class ChildInternalError extends Error {}

/** Deaths in a row (each within STABLE_MS of its start) before the next start waits 0.5 s, doubling to 10 s. */
const STABLE_MS = 30_000;
const startDelay = (deaths: number) => (deaths === 0 ? 0 : Math.min(500 * 2 ** (deaths - 1), 10_000));
/** How long a child has to come up, and to exit when asked before it is killed. */
const READY_MS = 60_000;
const EXIT_GRACE_MS = 10_000;

interface Pending {
  child: ChildProcess;
  resolve: (r: RenderResult) => void;
  reject: (e: unknown) => void;
}

const ENTRY = fileURLToPath(new URL("./child.js", import.meta.url));

/** The resident memory of process `pid` in bytes (VmRSS), or 0 when it is gone. */
export function rssOf(pid: number | undefined): number {
  if (pid === undefined) return 0;
  try {
    return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) * 1024;
  } catch {
    return 0;
  }
}

export class InferProcess {
  private child: ChildProcess | null = null;
  private starting: Promise<ChildProcess> | null = null;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  /** Unexpected deaths in a row, for the start back-off. */
  private deaths = 0;
  /** The exit of a child being retired or stopped: the next one starts after it, so the two never hold memory at once. */
  private leaving: Promise<void> = Promise.resolve();
  /** Children that were asked to go: their exit is not a death. */
  private readonly dismissed = new WeakSet<ChildProcess>();
  private retireAfter = false;
  /** The models the current child has used, most recent last (a successor reopens them). */
  private models = new Map<string, { hash: string; confined: boolean }>();
  private closed = false;
  /** Retirements so far (for logs and tests). */
  retirements = 0;

  constructor(
    private readonly init: ChildInit,
    /** Models kept open per process (the child's ModelRegistry keeps 2). */
    private readonly maxModels = 2,
  ) {}

  /** The pid of the running Infer process, if one runs. */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Renders `job` (its id is assigned here) in the Infer process, starting one if none runs. */
  async render(job: Omit<RenderJob, "id">, signal?: AbortSignal): Promise<RenderResult> {
    if (signal?.aborted) throw inferCancelled();
    const child = await this.ready();
    if (signal?.aborted) throw inferCancelled();
    const id = this.nextId++;
    this.models.delete(job.base.dir);
    this.models.set(job.base.dir, { hash: job.base.hash, confined: job.base.confined });
    while (this.models.size > this.maxModels) this.models.delete(this.models.keys().next().value!);
    const onAbort = () => this.pending.has(id) && child.connected && child.send({ type: "cancel", id } satisfies ToChild);
    signal?.addEventListener("abort", onAbort);
    try {
      return await new Promise<RenderResult>((resolve, reject) => {
        this.pending.set(id, { child, resolve, reject });
        child.send({ type: "render", job: { ...job, id } } satisfies ToChild, (err) => {
          if (err && this.pending.delete(id)) reject(inferProcessLost(`unreachable: ${err.message}`));
        });
      });
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /** Marks the current process for retirement; `retireIfMarked` ends it once nothing runs. */
  markForRetirement(): void {
    if (this.child) this.retireAfter = true;
  }

  /**
   * Retires the process when marked and nothing is in flight in it (the caller knows that nothing
   * waits either): it exits, its memory goes back, and a fresh one reopens the same models.
   */
  retireIfMarked(): void {
    const child = this.child;
    if (!this.retireAfter || !child || this.pending.size > 0 || this.closed) return;
    this.retireAfter = false;
    this.retirements++;
    log("info", "retiring the Infer process after a large request, to return its memory", {
      pid: child.pid,
      rssMiB: Math.round(rssOf(child.pid) / 2 ** 20),
      threshold: "LORAFORGE_INFER_RECYCLE_MB",
    });
    const models = [...this.models];
    this.dismiss(child);
    // Its successor starts once it has exited, and reopens its models before anyone waits for them.
    void this.ready()
      .then((next) => {
        for (const [dir, { hash, confined }] of models) next.send({ type: "warm", dir, hash, confined } satisfies ToChild);
      })
      .catch((err) => {
        if (!this.closed) log("warn", "starting a fresh Infer process failed; the next request tries again", { err: String(err?.message ?? err) });
      });
  }

  /** Asks `child` to exit (killed after EXIT_GRACE_MS); the next start waits for it. */
  private dismiss(child: ChildProcess): void {
    this.dismissed.add(child);
    if (this.child === child) this.child = null;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((r) => child.once("exit", () => r()));
    if (child.connected) child.send({ type: "exit" } satisfies ToChild, () => undefined);
    else child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), EXIT_GRACE_MS);
    const previous = this.leaving;
    this.leaving = Promise.all([previous, exited]).then(() => clearTimeout(timer));
  }

  /** The running child, or a new one once it is ready. */
  private ready(): Promise<ChildProcess> {
    if (this.closed) return Promise.reject(new ApiError(status.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server"));
    if (this.child?.connected) return Promise.resolve(this.child);
    this.starting ??= this.start().finally(() => (this.starting = null));
    return this.starting;
  }

  private async start(): Promise<ChildProcess> {
    await this.leaving;
    const delay = startDelay(this.deaths);
    if (delay > 0) {
      log("warn", "the Infer process died in a row; waiting before starting it again", { deaths: this.deaths, delayMs: delay });
      await new Promise((r) => setTimeout(r, delay));
    }
    if (this.closed) throw new ApiError(status.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server");
    // Its own V8 flags only (not a test runner's), the server's environment less its secrets, and
    // structured-clone messages so that PNG bytes travel as bytes.
    const child = fork(ENTRY, [], {
      execArgv: [],
      env: childEnv(),
      serialization: "advanced",
      stdio: ["ignore", "inherit", "inherit", "ipc"],
    });
    const startedAt = Date.now();
    child.on("message", (m: ToParent) => this.onMessage(child, m));
    child.once("exit", (code, signal) => this.onExit(child, code, signal, startedAt));
    await new Promise<void>((resolve, reject) => {
      const fail = (how: string) => {
        clearTimeout(timer);
        reject(inferProcessLost(how));
      };
      const timer = setTimeout(() => {
        fail(`not ready after ${READY_MS / 1000} s`);
        child.kill("SIGKILL");
      }, READY_MS);
      child.once("error", (err) => fail(`could not start: ${err.message}`));
      child.once("exit", (code, signal) => fail(signal ? `signal ${signal}` : `exit code ${code}`));
      child.once("message", (m: ToParent) => {
        if (m.type !== "ready") return;
        clearTimeout(timer);
        resolve();
      });
      child.send({ type: "init", init: this.init } satisfies ToChild);
    });
    if (this.closed) {
      this.dismiss(child);
      throw new ApiError(status.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server");
    }
    this.child = child;
    log("info", "Infer process started", { pid: child.pid });
    return child;
  }

  private onMessage(child: ChildProcess, m: ToParent): void {
    if (m.type === "ready") return;
    const p = this.pending.get(m.id);
    if (!p || p.child !== child) return;
    this.pending.delete(m.id);
    if (m.type === "done") {
      this.deaths = 0;
      // Structured clone hands bytes back as Uint8Array views: make them Buffers without copying.
      const pngs = m.result.pngs.map((u) => Buffer.from(u.buffer, u.byteOffset, u.byteLength));
      p.resolve({ ...m.result, pngs });
    } else if ("api" in m.error) {
      const e = m.error.api;
      p.reject(new ApiError(e.code, e.reason, e.message, e.violations, e.metadata));
    } else {
      p.reject(new ChildInternalError(m.error.internal));
    }
  }

  private onExit(child: ChildProcess, code: number | null, signal: NodeJS.Signals | null, startedAt: number): void {
    if (this.child === child) this.child = null;
    const how = signal ? `signal ${signal}` : `exit code ${code}`;
    const lost = [...this.pending].filter(([, p]) => p.child === child);
    for (const [id, p] of lost) {
      this.pending.delete(id);
      p.reject(inferProcessLost(how));
    }
    if (this.dismissed.has(child)) return;
    // Killed from outside (the kernel's OOM killer sends SIGKILL) or crashed: the API and the jobs carry on.
    this.deaths = Date.now() - startedAt >= STABLE_MS ? 1 : this.deaths + 1;
    this.retireAfter = false;
    this.models.clear();
    log("error", "the Infer process died; the next request starts a new one", { pid: child.pid, exit: how, requestsLost: lost.length });
  }

  /** Stops the Infer process (killed if it has not exited after EXIT_GRACE_MS); requests still in it fail INFER_PROCESS_LOST. */
  async close(): Promise<void> {
    this.closed = true;
    await this.starting?.catch(() => undefined);
    const child = this.child;
    if (child) this.dismiss(child);
    await this.leaving;
  }
}
