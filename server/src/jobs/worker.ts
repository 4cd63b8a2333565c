// The worker: pulls jobs from the LORAFORGE_QUEUE work queue one at a time, runs the
// engine for each, turns the engine's lines into numbered events on the event stream,
// uploads artifacts to the object store, keeps the job record current, and acks the
// queue message only when the job is final.
//
// Ownership: the worker that last moved the record to RUNNING (its id in `worker`,
// `attempts` counted up) owns the job. Every later write is a compare-and-set that
// checks ownership, so a worker that was presumed dead (its message redelivered to
// another) notices, stops its engine, and never acks — a late ack cannot remove the
// message from under the new owner.
import { hostname } from "node:os";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import path from "node:path";
import { type JsMsg, type Consumer } from "@nats-io/jetstream";
import { Artifact, ArtifactKind, Job, JobEvent, JobState, LogLevel } from "@loraforge/sdk/gen/loraforge/v1/job";
import { ArtifactStore } from "./artifacts.js";
import { ENGINE_EXIT, EngineRun, type EngineExit, type EngineOptions } from "./engine.js";
import { log } from "../core/log.js";
import { isFinal, JobStore, QUEUE_STREAM, WORKERS_CONSUMER } from "./store.js";
import { telemetry } from "../core/telemetry.js";

export interface WorkerOptions {
  engine: EngineOptions;
  /** Job output folders go under `<stateDir>/jobs/<id>`. */
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

type Payload = NonNullable<JobEvent["payload"]>;

/** Publishes one job's events in order, numbering them without gaps. */
export class JobEventPublisher {
  private chain: Promise<void> = Promise.resolve();

  constructor(
    private readonly store: JobStore,
    readonly jobId: string,
    private seq: number,
  ) {}

  get lastSequence(): number {
    return this.seq;
  }

  /**
   * Numbers and publishes an event after everything emitted before it; `before`
   * (e.g. uploading the artifact the event announces) runs first, in that order.
   */
  emit(payload: Payload, time = new Date(), before?: () => Promise<Payload>): JobEvent {
    const ev = JobEvent.fromPartial({ jobId: this.jobId, sequence: ++this.seq, time, payload });
    this.chain = this.chain.then(async () => {
      if (before) {
        try {
          ev.payload = await before();
        } catch (err) {
          // The event still goes out (without the stored copy) so the sequence has no gap.
          log("error", "preparing an event failed", { job: this.jobId, seq: ev.sequence, err: String(err) });
        }
      }
      // Events are the job's history: retry until stored (e.g. while NATS restarts);
      // the message id makes a retry that did reach the stream a no-op.
      for (let attempt = 0; ; attempt++) {
        try {
          await this.store.publishEvent(ev);
          return;
        } catch (err) {
          if (attempt % 10 === 0) log("warn", "publishing an event failed; retrying", { job: this.jobId, seq: ev.sequence, err: String(err) });
          await new Promise((r) => setTimeout(r, 500));
        }
      }
    });
    return ev;
  }

  /** Resolves when every event emitted so far is stored. */
  async flush(): Promise<void> {
    await this.chain;
  }
}

/** Thrown inside a compare-and-set when this worker no longer owns the job. */
class LostOwnership extends Error {}

interface Running {
  jobId: string;
  engine: EngineRun | null;
  /** Why the engine is being stopped: a cancel, a shutdown, or a lost job. */
  stop: { reason: string; kind: "cancel" | "requeue" | "lost" } | null;
}

export class Worker {
  readonly id = `${hostname()}/${process.pid}/${randomBytes(3).toString("hex")}`;
  private stopping = false;
  private current: Running | null = null;
  private loop: Promise<void> | null = null;
  private readonly opts: Required<WorkerOptions>;

  constructor(
    private readonly store: JobStore,
    private readonly artifacts: ArtifactStore,
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
    if (this.current) {
      this.current.stop ??= { reason, kind: this.opts.onStop };
      this.current.engine?.stop();
    }
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
  private async updateOwned(jobId: string, attempt: number, change: (job: Job) => Job | null) {
    return this.store.update(jobId, (job) => {
      if (job.worker !== this.id || job.attempts !== attempt) throw new LostOwnership(`job ${jobId} was taken over by ${job.worker}`);
      return change(job);
    });
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
    const resume = cur.job.state === JobState.JOB_STATE_RUNNING;
    const lastSeq = resume ? await this.store.storedEventCount(jobId) : cur.job.lastSequence;
    const attempt = cur.job.attempts + 1;
    const started = await this.store.update(jobId, (job) => {
      if (job.state !== cur.job.state || job.attempts !== cur.job.attempts) return null;
      job.state = JobState.JOB_STATE_RUNNING;
      job.startTime ??= new Date();
      job.attempts = attempt;
      job.worker = this.id;
      job.lastSequence = lastSeq + 1;
      return job;
    });
    if (!started) {
      // Someone else moved it first; their delivery decides its fate.
      m.ack();
      return;
    }
    const events = new JobEventPublisher(this.store, jobId, lastSeq);
    events.emit({ $case: "state", state: { state: JobState.JOB_STATE_RUNNING, error: "", lora: undefined } });
    if (resume) events.emit({ $case: "log", log: { level: LogLevel.LOG_LEVEL_INFO, message: `attempt ${attempt}: resuming on worker ${this.id}` } });
    log("info", "job started", { job: jobId, attempt, worker: this.id });

    // Continue the trace of the Train call that queued the job.
    const carrier: Record<string, string> = {};
    for (const k of ["traceparent", "tracestate"]) {
      const v = m.headers?.get(k);
      if (v) carrier[k] = v;
    }
    const parent = telemetry.extract(carrier);
    const attrs = { "loraforge.job_id": jobId, "loraforge.attempt": attempt, "loraforge.worker": this.id };
    if (!resume && started.job.createTime) telemetry.recordSpan("queue wait", started.job.createTime, new Date(), attrs, parent);

    const heartbeat = setInterval(() => m.working(), this.opts.heartbeatMs);
    let settle: "ack" | "retry" | "none" = "ack";
    try {
      settle = await telemetry.span("job run", attrs, () => this.runEngine(started.job, attempt, events, resume), parent);
    } catch (err) {
      if (err instanceof LostOwnership) {
        log("warn", "lost the job to another worker; stopped", { job: jobId, err: err.message });
        settle = "none";
      } else {
        log("error", "worker failed while running a job; leaving it for redelivery", { job: jobId, err: String(err) });
        settle = "retry";
      }
    } finally {
      clearInterval(heartbeat);
    }
    if (settle === "ack") m.ack();
    else if (settle === "retry") m.nak(Math.min(this.opts.retryBackoffMs * 2 ** (attempt - 1), 5 * 60_000));
    // "none": the new owner's delivery settles the message.
  }

  /** Runs the engine once; returns how to settle the queue message. */
  private async runEngine(job: Job, attempt: number, events: JobEventPublisher, resume: boolean): Promise<"ack" | "retry" | "none"> {
    const running: Running = (this.current = { jobId: job.id, engine: null, stop: null });
    const artifacts: Artifact[] = [...job.artifacts];
    let lora: Artifact | undefined;
    let lastError = "";
    let step = job.currentStep;
    let totalSteps = job.totalSteps;
    let lastProgressWrite = 0;
    const outputDir = path.join(this.opts.stateDir, "jobs", job.id);

    // Resuming a job another worker started: fetch its latest checkpoint first.
    const latest = artifacts.filter((a) => a.kind === ArtifactKind.ARTIFACT_KIND_CHECKPOINT && a.objectName).sort((a, b) => b.step - a.step)[0];
    if (resume && latest && !existsSync(path.join(outputDir, "checkpoints", `checkpoint-${latest.step}`))) {
      const n = await this.artifacts.restoreCheckpoint(latest.objectName, path.join(outputDir, "checkpoints", `checkpoint-${latest.step}`));
      events.emit({ $case: "log", log: { level: LogLevel.LOG_LEVEL_INFO, message: `restored checkpoint-${latest.step} (${n} files) from the artifact store` } });
    }

    // Cancellation is a record change (CANCELLING) made by the API; a takeover is a
    // change of `worker`. Watch the record for both.
    const watch = await this.store.kv.watch({ key: `jobs.${job.id}` });
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== "PUT") continue;
        const rec = Job.decode(e.value);
        if (rec.worker !== this.id || rec.attempts !== attempt) {
          running.stop = { reason: "taken over", kind: "lost" };
          running.engine?.stop();
        } else if (rec.state === JobState.JOB_STATE_CANCELLING && running.stop?.kind !== "cancel") {
          running.stop = { reason: rec.error || "cancelled by a client", kind: "cancel" };
          events.emit({ $case: "state", state: { state: JobState.JOB_STATE_CANCELLING, error: running.stop.reason, lora: undefined } });
          running.engine?.stop();
        }
      }
    })();

    const writeProgress = async () => {
      lastProgressWrite = Date.now();
      await this.updateOwned(job.id, attempt, (j) => {
        if (isFinal(j.state)) return null;
        j.currentStep = step;
        j.totalSteps = totalSteps;
        j.artifacts = [...artifacts];
        j.lastSequence = events.lastSequence;
        return j;
      });
    };
    const uploaded = (a: Artifact) => async () => {
      const stored = await telemetry.span("artifact upload", { "loraforge.job_id": job.id, "loraforge.artifact": a.path }, () =>
        this.artifacts.upload(job.id, a),
      );
      const i = artifacts.findIndex((x) => x.kind === a.kind && x.path === a.path);
      if (i >= 0) artifacts[i] = stored;
      return stored;
    };

    const onEvent = (ev: JobEvent) => {
      const p = ev.payload;
      if (!p || running.stop?.kind === "lost") return;
      switch (p.$case) {
        case "state":
          // The engine reports only its own success; the worker owns the job's state.
          if (p.state.state === JobState.JOB_STATE_SUCCEEDED && p.state.lora) lora = p.state.lora;
          return;
        case "metrics":
          step = p.metrics.step;
          totalSteps = p.metrics.totalSteps;
          telemetry.recordStep(p.metrics);
          events.emit(p, ev.time);
          break;
        case "checkpoint": {
          const a = p.checkpoint.artifact!;
          artifacts.push(a);
          const up = uploaded(a);
          events.emit(p, ev.time, async () => ({ ...p, checkpoint: { ...p.checkpoint, artifact: await up() } }));
          break;
        }
        case "validation": {
          artifacts.push(...p.validation.images);
          const ups = p.validation.images.map(uploaded);
          events.emit(p, ev.time, async () => {
            const images: Artifact[] = [];
            for (const up of ups) images.push(await up());
            return { ...p, validation: { ...p.validation, images } };
          });
          break;
        }
        case "log":
          if (p.log.level === LogLevel.LOG_LEVEL_ERROR) lastError = p.log.message;
          events.emit(p, ev.time);
          break;
      }
      if (p.$case !== "metrics" || Date.now() - lastProgressWrite > 1000)
        void events.flush().then(writeProgress).catch((err) => {
          if (err instanceof LostOwnership) {
            running.stop = { reason: "taken over", kind: "lost" };
            running.engine?.stop();
          }
        });
    };

    const engine = new EngineRun(
      this.opts.engine,
      job.spec!,
      outputDir,
      onEvent,
      (line) => log("debug", `[engine ${job.id}] ${line}`),
      {
        ...telemetry.traceEnv(),
        // torch.compile's kernels and graphs outlive the job here, so that only the first compiling job on a
        // machine pays the full compile (measured on the tiny model: 81 s cold, 7.6 s from this cache).
        ...(process.env.TORCHINDUCTOR_CACHE_DIR ? {} : { TORCHINDUCTOR_CACHE_DIR: path.join(this.opts.stateDir, "cache", "torch-compile") }),
      },
      resume,
    );
    running.engine = engine;
    if (running.stop !== null) engine.stop();
    const exit = await telemetry.span("engine", { "loraforge.job_id": job.id, "process.pid": engine.pid ?? -1 }, async () => {
      const e = await engine.exited;
      if (e.code !== 0) throw new Error(`engine ${e.signal ? `killed by ${e.signal}` : `exited with code ${e.code}`}`);
      return e;
    }).catch(() => engine.exited);
    watch.stop();
    this.current = null;
    await events.flush();
    if (running.stop?.kind === "lost") return "none";

    const outcome = decideOutcome(exit, lora, lastError, running.stop, attempt, this.opts.maxAttempts);
    if (outcome.state === JobState.JOB_STATE_RUNNING) {
      // Retryable: leave it RUNNING for the next delivery, which resumes from the checkpoint.
      events.emit({ $case: "log", log: { level: LogLevel.LOG_LEVEL_WARNING, message: `attempt ${attempt} failed (${outcome.error}); it will be retried` } });
      await events.flush();
      await this.updateOwned(job.id, attempt, (j) => {
        j.currentStep = step;
        j.artifacts = artifacts;
        j.lastSequence = events.lastSequence;
        j.worker = "";
        return j;
      });
      return "retry";
    }
    if (lora) {
      artifacts.push(lora);
      lora = await uploaded(lora)();
    }
    // The record turns final before the final event goes out (as a cancel of a queued job does), so a client
    // that reads the job when it sees that event finds the finished record with the LoRA among its artifacts.
    const endTime = new Date();
    await this.updateOwned(job.id, attempt, (j) => {
      j.state = outcome.state;
      j.error = outcome.error;
      j.endTime = endTime;
      j.currentStep = step;
      j.totalSteps = totalSteps;
      j.artifacts = artifacts;
      j.lastSequence = events.lastSequence + 1; // the sequence of the event emitted next
      return j;
    });
    events.emit(
      {
        $case: "state",
        state: { state: outcome.state, error: outcome.error, lora: outcome.state === JobState.JOB_STATE_SUCCEEDED ? lora : undefined },
      },
      endTime,
    );
    await events.flush();
    telemetry.jobFinished(outcome.state);
    log("info", "job finished", { job: job.id, state: JobState[outcome.state], error: outcome.error });
    return "ack";
  }
}

/**
 * Maps how the engine ended to the job's next state and reason. RUNNING means
 * "retry": the engine was killed by a signal nobody here sent, or the worker was
 * asked to hand the job back, and attempts remain.
 */
export function decideOutcome(
  exit: EngineExit,
  lora: Artifact | undefined,
  lastError: string,
  stop: Running["stop"],
  attempt: number,
  maxAttempts: number,
): { state: JobState; error: string } {
  if (exit.code === ENGINE_EXIT.OK && lora) return { state: JobState.JOB_STATE_SUCCEEDED, error: "" };
  const stoppedByUs = stop !== null && (exit.code === ENGINE_EXIT.STOPPED || exit.signal !== null || exit.code === ENGINE_EXIT.OK);
  if (stoppedByUs && stop.kind === "requeue") return { state: JobState.JOB_STATE_RUNNING, error: stop.reason };
  if (stoppedByUs) return { state: JobState.JOB_STATE_CANCELLED, error: stop.reason };
  if (lastError && exit.signal === null) return { state: JobState.JOB_STATE_FAILED, error: lastError };
  const how = exit.signal ? `was killed by ${exit.signal}` : exit.code === null ? "could not start" : `exited with code ${exit.code}`;
  const tail = exit.stderrTail.slice(-5).join("\n");
  const error = `the engine ${how}${tail ? `: ${tail}` : ""}`;
  const retryable = exit.signal !== null || exit.code === null;
  if (retryable && attempt < maxAttempts) return { state: JobState.JOB_STATE_RUNNING, error };
  return { state: JobState.JOB_STATE_FAILED, error: retryable ? `${error} (gave up after ${attempt} attempts)` : error };
}
