// The worker: pulls jobs from the LORAFORGE_QUEUE work queue one at a time, runs each
// (job-run.ts: inputs, engine, events, artifacts, outcome), and acks the queue message
// only when the job is final.
//
// Ownership: the worker that last moved the record to RUNNING (its id in the record's
// `worker`, `attempts` counted up; both server-internal, beside the public Job) owns the
// job. Every later write is a compare-and-set that checks ownership, so a worker that was
// presumed dead (its message redelivered to another) notices, stops its engine, and never
// acks — a late ack cannot remove the message from under the new owner.
//
// Capabilities: before pulling, the worker finds out what devices it has (capabilities.ts) and
// announces them in the worker registry, with whether it is busy, every WORKER_HEARTBEAT_MS. A
// job it cannot run is declined: its message goes back to the queue with a delay (nak), untouched
// by this worker, for one that can; the queue keeps offering it, so it waits, never fails, while
// nobody fits.
import { hostname } from "node:os";
import { randomBytes } from "node:crypto";
import { status } from "@grpc/grpc-js";
import { type JsMsg, type Consumer } from "@nats-io/jetstream";
import { Job, JobState, LogLevel } from "@loraforge/sdk/gen/loraforge/v1/job";
import { jobError } from "../core/errors.js";
import { ArtifactStore } from "./artifacts.js";
import type { DatasetStore } from "./datasets.js";
import { type EngineOptions } from "./engine.js";
import { JobEventPublisher } from "./events.js";
import { JobRun, LostOwnership, type RunHost, type Settle, type StopRequest } from "./job-run.js";
import { log } from "../core/log.js";
import { isFinal, JobStore, QUEUE_STREAM, WORKER_HEARTBEAT_MS, WORKERS_CONSUMER, type JobRecord } from "./store.js";
import {
  declineDelayMs,
  describeRequirement,
  detectDevices,
  fits,
  hostCpu,
  requirementOf,
  resolveCapabilities,
  type Capabilities,
  type DeviceOverrides,
} from "./capabilities.js";
import { telemetry } from "../core/telemetry.js";

export interface WorkerOptions {
  engine: EngineOptions;
  /** Job output folders go under `<stateDir>/jobs/<id>`, fetched data sets and checkpoints under `<stateDir>/datasets` and `<stateDir>/cache`. */
  stateDir: string;
  /** How long a stopping engine may take to save its checkpoint before it is killed. Default 60 s. */
  stopGraceMs?: number;
  /** Starts of a job before a retryable failure becomes final. Default 3. */
  maxAttempts?: number;
  /** Delay before the first retry; doubles each time. Default 2 s. */
  retryBackoffMs?: number;
  /**
   * What stopping the worker does to its running job: "cancel" ends it CANCELLED
   * (what `loraforge serve` does), "requeue" hands it back to the queue to be
   * resumed from its checkpoint by another worker (what `loraforge worker` does).
   */
  onStop?: "cancel" | "requeue";
  /** In-progress acks are sent this often. Default 10 s (the consumer's ack wait is 60 s). */
  heartbeatMs?: number;
  /** The operator's device overrides (LORAFORGE_WORKER_DEVICE_*); the rest is detected. Default none. */
  devices?: DeviceOverrides;
}

export class Worker {
  readonly id = `${hostname()}/${process.pid}/${randomBytes(3).toString("hex")}`;
  private stopping = false;
  /** Set by stop(): what stopping does to the running job. */
  private stopRequest: StopRequest | null = null;
  private current: JobRun | null = null;
  private loop: Promise<void> | null = null;
  private readonly opts: Required<WorkerOptions>;
  /** What this worker advertises and runs; set before the first pull. */
  capabilities: Capabilities | null = null;
  /** The job this worker runs, "" while idle (announced in the registry). */
  private busy = "";
  private announcer: NodeJS.Timeout | null = null;
  /** Stops a device detection still running when the worker is stopped. */
  private readonly detecting = new AbortController();
  /** The latest registry write; stop() waits for it so that a late write cannot outlive the withdrawal. */
  private announcing: Promise<void> = Promise.resolve();

  constructor(
    private readonly store: JobStore,
    private readonly artifacts: ArtifactStore,
    private readonly datasets: DatasetStore,
    opts: WorkerOptions,
  ) {
    this.opts = { stopGraceMs: 60_000, maxAttempts: 3, retryBackoffMs: 2000, onStop: "cancel", heartbeatMs: 10_000, devices: {}, ...opts };
  }

  /**
   * Works out the devices to advertise: the engine is asked unless the operator's overrides already
   * say everything (kind cpu, or kind, count and memory); a failed answer falls back to the CPU.
   */
  private async findCapabilities(): Promise<Capabilities> {
    const o = this.opts.devices;
    const ask = !(o.kind === "cpu" || (o.kind && o.devices !== undefined && o.memoryMb !== undefined));
    const detected = ask ? await detectDevices(this.opts.engine, this.detecting.signal).catch((err: Error) => err) : hostCpu();
    const { caps, warnings } = resolveCapabilities(detected, o, hostCpu());
    if (this.stopping) return caps; // stopped while asking: nothing to report
    for (const w of warnings) log("warn", `worker: ${w}`, { worker: this.id });
    log("info", "worker devices", { worker: this.id, kind: caps.kind, devices: caps.devices, memory_mb: caps.memoryMb, overridden: Object.keys(o).join(",") });
    return caps;
  }

  /** Puts this worker's entry in the registry; a failure is retried by the next heartbeat. */
  private announce(): Promise<void> {
    if (!this.capabilities || this.stopping) return this.announcing;
    const entry = { id: this.id, ...this.capabilities, busy: this.busy };
    this.announcing = this.announcing.then(() =>
      this.store.announceWorker(entry).catch((err) => {
        log("debug", "worker: announcing to the registry failed; retried at the next heartbeat", { err: String(err) });
      }),
    );
    return this.announcing;
  }

  private setBusy(jobId: string): void {
    this.busy = jobId;
    void this.announce();
  }

  start(): void {
    this.loop = this.run();
  }

  /** Stops pulling jobs; the running job is stopped (checkpoint saved) and cancelled or requeued. */
  async stop(reason = "cancelled: the server shut down"): Promise<void> {
    this.stopping = true;
    const kind = this.opts.onStop;
    this.stopRequest = { kind, error: jobError(status.CANCELLED, kind === "cancel" ? "SERVER_SHUTDOWN" : "WORKER_STOPPED", reason) };
    this.current?.requestStop(this.stopRequest);
    this.detecting.abort();
    await this.loop;
    if (this.announcer) clearInterval(this.announcer);
    // Gone from the registry at once, so jobs only it could run show why they wait.
    const withdraw = this.announcing.then(() => this.store.withdrawWorker(this.id)).catch(() => {});
    await Promise.race([withdraw, new Promise((r) => setTimeout(r, 2000).unref())]);
  }

  private async run(): Promise<void> {
    const caps = await this.findCapabilities();
    if (this.stopping) return;
    this.capabilities = caps;
    await this.announce();
    this.announcer = setInterval(() => void this.announce(), WORKER_HEARTBEAT_MS);
    let consumer: Consumer | null = null;
    while (!this.stopping) {
      try {
        consumer ??= await this.store.js.consumers.get(QUEUE_STREAM, WORKERS_CONSUMER);
        const m = await consumer.next({ expires: 1000 });
        if (m && !this.stopping) await this.handle(m);
        else if (m) m.nak();
      } catch (err) {
        if (this.stopping) break;
        log("warn", "worker: pulling from the queue failed; retrying", { err: String(err) });
        consumer = null;
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  /** Compare-and-set that also checks this worker still owns the job. */
  private async updateOwned(jobId: string, attempt: number, change: (job: Job, rec: JobRecord) => Job | null) {
    return this.store.update(jobId, (rec) => {
      if (this.takenOver(rec.worker, rec.attempts, attempt)) throw new LostOwnership(`job ${jobId} was taken over by ${rec.worker || "another worker"}`);
      const job = change(rec.job, rec);
      return job ? { ...rec, job } : null;
    });
  }

  private takenOver(worker: string, attempts: number, attempt: number): boolean {
    return worker !== this.id || attempts !== attempt;
  }

  private async handle(m: JsMsg): Promise<void> {
    const jobId = m.string();
    const cur = await this.store.get(jobId);
    if (!cur || isFinal(cur.job.state) || cur.job.state === JobState.JOB_STATE_CANCELLING) {
      // Cancelled while queued, or finished by a worker whose ack was lost: nothing to run.
      m.ack();
      return;
    }
    const need = requirementOf(cur.job.spec);
    if (!fits(need, this.capabilities!)) {
      // Not for this worker: back to the queue, after a delay, for one that can run it. The record
      // (state, attempts) stays as it is; API servers explain the wait from the registry.
      const delay = declineDelayMs(m.info.deliveryCount);
      log("debug", "declined a job this worker cannot run", { job: jobId, needs: describeRequirement(need), retry_in_ms: delay });
      m.nak(delay);
      return;
    }
    // RUNNING here means an earlier worker died or its engine failed in a retryable way.
    const retry = cur.job.state === JobState.JOB_STATE_RUNNING;
    const lastSeq = retry ? await this.store.storedEventCount(jobId) : cur.job.lastSequence;
    const attempt = cur.attempts + 1;
    const started = await this.store.update(jobId, (rec) => {
      if (rec.job.state !== cur.job.state || rec.attempts !== cur.attempts) return null;
      rec.job.state = JobState.JOB_STATE_RUNNING;
      rec.job.startTime ??= new Date();
      rec.job.lastSequence = lastSeq + 1;
      rec.attempts = attempt;
      rec.worker = this.id;
      return rec;
    });
    if (!started) {
      // Someone else moved it first; their delivery decides its fate.
      m.ack();
      return;
    }
    const events = new JobEventPublisher(this.store, jobId, lastSeq);
    events.emit({ $case: "state", state: { state: JobState.JOB_STATE_RUNNING, error: undefined, lora: undefined } });
    if (retry) events.emit({ $case: "log", log: { level: LogLevel.LOG_LEVEL_INFO, message: `attempt ${attempt}: resuming on worker ${this.id}` } });
    log("info", "job started", { job: jobId, attempt, worker: this.id });

    // Continue the trace of the Train call that queued the job.
    const carrier: Record<string, string> = {};
    for (const k of ["traceparent", "tracestate"]) {
      const v = m.headers?.get(k);
      if (v) carrier[k] = v;
    }
    const parent = telemetry.extract(carrier);
    const attrs = { "loraforge.job_id": jobId, "loraforge.attempt": attempt, "loraforge.worker": this.id };
    if (!retry && started.job.createTime) telemetry.recordSpan("queue wait", started.job.createTime, new Date(), attrs, parent);

    const host: RunHost = {
      store: this.store,
      artifacts: this.artifacts,
      datasets: this.datasets,
      engine: this.opts.engine,
      stateDir: this.opts.stateDir,
      maxAttempts: this.opts.maxAttempts,
      updateOwned: (id, a, change) => this.updateOwned(id, a, change),
      takenOver: (w, attempts, a) => this.takenOver(w, attempts, a),
    };
    this.setBusy(jobId);
    const run = (this.current = new JobRun(started.job, attempt, events, host));
    // A shutdown that began while this job was being claimed.
    if (this.stopRequest) run.requestStop(this.stopRequest);
    const heartbeat = setInterval(() => m.working(), this.opts.heartbeatMs);
    let settle: Settle = "ack";
    try {
      settle = await telemetry.span("job run", attrs, () => run.execute(retry), parent);
    } catch (err) {
      if (err instanceof LostOwnership) {
        log("warn", "lost the job to another worker; stopped", { job: jobId, err: err.message });
        settle = "none";
      } else {
        log("error", "worker failed while running a job; leaving it for redelivery", { job: jobId, err: String((err as Error)?.stack ?? err) });
        settle = "retry";
      }
    } finally {
      clearInterval(heartbeat);
      this.current = null;
      this.setBusy("");
    }
    if (settle === "ack") m.ack();
    else if (settle === "retry") m.nak(Math.min(this.opts.retryBackoffMs * 2 ** (attempt - 1), 5 * 60_000));
    // "none": the new owner's delivery settles the message.
  }
}
