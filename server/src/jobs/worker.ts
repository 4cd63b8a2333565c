// The worker: pulls jobs from the LORAFORGE_QUEUE work queue one at a time, runs each
// (job-run.ts: inputs, engine, events, artifacts, outcome), and acks the queue message
// only when the job is final.
//
// Ownership: the worker that last moved the record to RUNNING (its id in the record's
// `worker`, `attempts` counted up; both server-internal, beside the public Job) owns the
// job. Every later write is a compare-and-set that checks ownership, so a worker that was
// presumed dead (its message redelivered to another) notices, stops its engine, and never
// acks — a late ack cannot remove the message from under the new owner.
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
import { isFinal, JobStore, QUEUE_STREAM, WORKERS_CONSUMER, type JobRecord } from "./store.js";
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
}

export class Worker {
  readonly id = `${hostname()}/${process.pid}/${randomBytes(3).toString("hex")}`;
  private stopping = false;
  /** Set by stop(): what stopping does to the running job. */
  private stopRequest: StopRequest | null = null;
  private current: JobRun | null = null;
  private loop: Promise<void> | null = null;
  private readonly opts: Required<WorkerOptions>;

  constructor(
    private readonly store: JobStore,
    private readonly artifacts: ArtifactStore,
    private readonly datasets: DatasetStore,
    opts: WorkerOptions,
  ) {
    this.opts = { stopGraceMs: 60_000, maxAttempts: 3, retryBackoffMs: 2000, onStop: "cancel", heartbeatMs: 10_000, ...opts };
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
    await this.loop;
  }

  private async run(): Promise<void> {
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
    }
    if (settle === "ack") m.ack();
    else if (settle === "retry") m.nak(Math.min(this.opts.retryBackoffMs * 2 ** (attempt - 1), 5 * 60_000));
    // "none": the new owner's delivery settles the message.
  }
}
