// The worker: pulls jobs from the LORAFORGE_QUEUE work queue one at a time, runs the
// engine for each, turns the engine's lines into numbered events on the event stream,
// keeps the job record current, and acks the queue message only when the job is final.
import path from "node:path";
import { type JsMsg, type Consumer } from "@nats-io/jetstream";
import {
  Artifact,
  ArtifactKind,
  Job,
  JobEvent,
  JobState,
  LogLevel,
} from "@loraforge/sdk/gen/loraforge/v1/job";
import { ENGINE_EXIT, EngineRun, type EngineExit, type EngineOptions } from "./engine.js";
import { log } from "./log.js";
import { isFinal, JobStore, QUEUE_STREAM, WORKERS_CONSUMER } from "./store.js";

export interface WorkerOptions {
  engine: EngineOptions;
  /** Job output folders go under `<stateDir>/jobs/<id>`. */
  stateDir: string;
  /** How long a stopping engine may take to save its checkpoint before it is killed. */
  stopGraceMs?: number;
}

type Payload = NonNullable<JobEvent["payload"]>;

/** Publishes one job's events in order, numbering them without gaps. */
export class JobEventPublisher {
  private chain: Promise<void> = Promise.resolve();
  private failed: unknown = null;

  constructor(
    private readonly store: JobStore,
    readonly jobId: string,
    private seq: number,
  ) {}

  get lastSequence(): number {
    return this.seq;
  }

  emit(payload: Payload, time = new Date()): JobEvent {
    const ev = JobEvent.fromPartial({ jobId: this.jobId, sequence: ++this.seq, time, payload });
    this.chain = this.chain.then(() =>
      this.store.publishEvent(ev).catch((err) => {
        this.failed ??= err;
        log("error", "publishing an event failed", { job: this.jobId, seq: ev.sequence, err: String(err) });
      }),
    );
    return ev;
  }

  /** Resolves when every event emitted so far is stored. */
  async flush(): Promise<void> {
    await this.chain;
  }
}

export class Worker {
  private stopping = false;
  private current: { jobId: string; engine: EngineRun | null; stopReason: string | null } | null = null;
  private loop: Promise<void> | null = null;

  constructor(
    private readonly store: JobStore,
    private readonly opts: WorkerOptions,
  ) {}

  start(): void {
    this.loop = this.run();
  }

  /** Stops pulling jobs; a running job is stopped (checkpoint saved) and recorded CANCELLED. */
  async stop(reason = "cancelled: the server shut down"): Promise<void> {
    this.stopping = true;
    if (this.current) {
      this.current.stopReason ??= reason;
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

  private async handle(m: JsMsg): Promise<void> {
    const jobId = m.string();
    const cur = await this.store.get(jobId);
    if (!cur || isFinal(cur.job.state) || cur.job.state === JobState.JOB_STATE_CANCELLING) {
      // Cancelled while queued (or unknown): nothing to run.
      m.ack();
      return;
    }
    const resume = cur.job.state === JobState.JOB_STATE_RUNNING;
    // A redelivered job (its worker died) continues numbering after its stored events.
    const lastSeq = resume ? await this.store.storedEventCount(jobId) : cur.job.lastSequence;
    const started = await this.store.update(jobId, (job) => {
      if (job.state !== cur.job.state) return null;
      job.state = JobState.JOB_STATE_RUNNING;
      job.startTime ??= new Date();
      job.lastSequence = lastSeq + 1;
      return job;
    });
    if (!started) {
      m.ack();
      return;
    }
    const events = new JobEventPublisher(this.store, jobId, lastSeq);
    events.emit({ $case: "state", state: { state: JobState.JOB_STATE_RUNNING, error: "", lora: undefined } });
    log("info", "job started", { job: jobId, resume });

    const heartbeat = setInterval(() => m.working(), 10_000);
    try {
      await this.runEngine(started.job, events, resume);
    } finally {
      clearInterval(heartbeat);
      m.ack();
    }
  }

  private async runEngine(job: Job, events: JobEventPublisher, resume: boolean): Promise<void> {
    const state = (this.current = { jobId: job.id, engine: null as EngineRun | null, stopReason: null as string | null });
    const artifacts: Artifact[] = [...job.artifacts];
    let lora: Artifact | undefined;
    let lastError = "";
    let step = job.currentStep;
    let totalSteps = job.totalSteps;
    let lastProgressWrite = 0;

    // Cancellation is a record change (CANCELLING) made by the API; watch for it.
    const watch = await this.store.kv.watch({ key: `jobs.${job.id}` });
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== "PUT") continue;
        const rec = Job.decode(e.value);
        if (rec.state === JobState.JOB_STATE_CANCELLING && state.stopReason === null) {
          state.stopReason = rec.error || "cancelled by a client";
          events.emit({ $case: "state", state: { state: JobState.JOB_STATE_CANCELLING, error: state.stopReason, lora: undefined } });
          state.engine?.stop();
        }
      }
    })();

    const writeProgress = async () => {
      lastProgressWrite = Date.now();
      await this.store.update(job.id, (j) => {
        if (isFinal(j.state)) return null;
        j.currentStep = step;
        j.totalSteps = totalSteps;
        j.artifacts = [...artifacts];
        j.lastSequence = events.lastSequence;
        return j;
      });
    };

    const onEvent = (ev: JobEvent) => {
      const p = ev.payload;
      if (!p) return;
      switch (p.$case) {
        case "state":
          // The engine reports only its own success; the worker owns the job's state.
          if (p.state.state === JobState.JOB_STATE_SUCCEEDED && p.state.lora) lora = p.state.lora;
          return;
        case "metrics":
          step = p.metrics.step;
          totalSteps = p.metrics.totalSteps;
          break;
        case "checkpoint":
          if (p.checkpoint.artifact) artifacts.push(p.checkpoint.artifact);
          break;
        case "validation":
          artifacts.push(...p.validation.images);
          break;
        case "log":
          if (p.log.level === LogLevel.LOG_LEVEL_ERROR) lastError = p.log.message;
          break;
      }
      events.emit(p, ev.time);
      if (p.$case !== "metrics" || Date.now() - lastProgressWrite > 1000) void writeProgress().catch(() => {});
    };

    const outputDir = path.join(this.opts.stateDir, "jobs", job.id);
    const engine = new EngineRun(
      this.opts.engine,
      job.spec!,
      outputDir,
      onEvent,
      (line) => log("debug", `[engine ${job.id}] ${line}`),
      {},
      resume,
    );
    state.engine = engine;
    if (state.stopReason !== null) engine.stop();
    const exit = await engine.exited;
    watch.stop();
    this.current = null;

    const outcome = decideOutcome(exit, lora, lastError, state.stopReason);
    if (lora) artifacts.push(lora);
    await events.flush();
    const finalEvent = events.emit({
      $case: "state",
      state: { state: outcome.state, error: outcome.error, lora: outcome.state === JobState.JOB_STATE_SUCCEEDED ? lora : undefined },
    });
    await this.store.update(job.id, (j) => {
      j.state = outcome.state;
      j.error = outcome.error;
      j.endTime = finalEvent.time;
      j.currentStep = step;
      j.totalSteps = totalSteps;
      j.artifacts = artifacts;
      j.lastSequence = finalEvent.sequence;
      return j;
    });
    await events.flush();
    log("info", "job finished", { job: job.id, state: JobState[outcome.state], error: outcome.error });
  }
}

/** Maps how the engine ended to the job's final state and reason. */
export function decideOutcome(
  exit: EngineExit,
  lora: Artifact | undefined,
  lastError: string,
  stopReason: string | null,
): { state: JobState; error: string } {
  if (exit.code === ENGINE_EXIT.OK && lora) return { state: JobState.JOB_STATE_SUCCEEDED, error: "" };
  if (stopReason !== null && (exit.code === ENGINE_EXIT.STOPPED || exit.signal !== null || exit.code === ENGINE_EXIT.OK))
    return { state: JobState.JOB_STATE_CANCELLED, error: stopReason };
  if (lastError) return { state: JobState.JOB_STATE_FAILED, error: lastError };
  const how = exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`;
  const tail = exit.stderrTail.slice(-5).join("\n");
  return { state: JobState.JOB_STATE_FAILED, error: `the engine ${how}${tail ? `: ${tail}` : ""}` };
}

export { ArtifactKind };
