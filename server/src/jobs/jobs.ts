// The job operations behind every front door (gRPC, the dashboard): submit,
// read, list, cancel, follow events, read artifacts. Transport-free: errors are
// ApiErrors, which each front door maps to its own status.
import { stateName } from "@loraforge/sdk";
import { status } from "@grpc/grpc-js";
import { Artifact, ArtifactKind, Job, JobEvent, JobState } from "@loraforge/sdk/gen/loraforge/v1/job";
import { TrainingSpec } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import { TrainRequest } from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { ArtifactStore, jobOfArtifact } from "./artifacts.js";
import type { DatasetStore } from "./datasets.js";
import { ApiError, invalidSpec, jobError, jobNotFound, requestIdReused } from "../core/errors.js";
import { JOB_ID_PATTERN, newJobId } from "../core/ids.js";
import { log } from "../core/log.js";
import { isModelName, modelFolder, type ModelHasher } from "../core/models.js";
import { retryFor } from "../core/retry.js";
import { ruleViolations } from "../core/rules.js";
import { hostViolations } from "./spec-checks.js";
import { DeliverPolicy } from "@nats-io/jetstream";
import { EVENTS_STREAM, isFinal, JobStore, type JobRecord } from "./store.js";
import { queuedReason, requirementOf, type LiveWorker } from "./capabilities.js";
import { telemetry } from "../core/telemetry.js";

/** This server's models folder and the hasher of base models (core/models.ts). */
export interface NamedModels {
  dir: string;
  hasher: ModelHasher;
}

export const MAX_PAGE_SIZE = 1000;
export const DEFAULT_PAGE_SIZE = 50;
/** How long one read of the worker registry serves queued reasons (a job list reads it once). */
const WORKERS_CACHE_MS = 1000;
/** A registry slower than this (NATS in trouble) leaves reasons out rather than holding up GetJob. */
const WORKERS_DEADLINE_MS = 2000;

export interface ListOptions {
  /** Only jobs in this state; UNSPECIFIED for all. */
  state: JobState;
  /** 0 means DEFAULT_PAGE_SIZE. */
  pageSize: number;
  pageToken: string;
}

/** Two specs are the same request when their encodings are (fields in number order, no maps). */
function sameSpec(a: TrainingSpec | undefined, b: TrainingSpec | undefined): boolean {
  const enc = (s: TrainingSpec | undefined) => Buffer.from(TrainingSpec.encode(s ?? TrainingSpec.fromPartial({})).finish());
  return enc(a).equals(enc(b));
}

export class Jobs {
  /** Set when the server is shutting down: submit refuses new work. */
  shuttingDown = false;

  constructor(
    readonly store: JobStore,
    readonly artifacts: ArtifactStore,
    /** Uploaded data sets, which a spec's dataset_id names. */
    private readonly datasets: DatasetStore,
    /** Client-named host folders must lie inside these; empty allows any path. */
    private readonly roots: string[] = [],
    /** Named base models ("models/<name>") and the hasher that records a job's model identity; unset: names are refused. */
    private readonly models?: NamedModels,
  ) {}

  private workersRead: { at: number; workers: Promise<LiveWorker[] | null> } | null = null;

  /**
   * The content hash of the spec's base model on this host (cached per folder; the first time it
   * reads the weights, ~1.3 s per GiB), recorded in the job so that a worker can tell that its copy
   * of a named model is the same model. Empty, with a warning in the log, when it cannot be hashed.
   */
  private async baseModelHash(baseModel: string): Promise<string> {
    if (!this.models) return "";
    const dir = isModelName(baseModel) ? modelFolder(this.models.dir, baseModel) : baseModel;
    if (!dir) return "";
    try {
      return await this.models.hasher.hashOf(dir);
    } catch (err) {
      log("warn", "could not hash the base model; the job records no model hash", { model: baseModel, err: String(err) });
      return "";
    }
  }

  async get(jobId: string): Promise<Job> {
    return this.withReason(await this.find(jobId), await this.liveWorkers());
  }

  /** The job's record, or NOT_FOUND (for calls that need no queued reason). */
  private async find(jobId: string): Promise<JobRecord> {
    const cur = JOB_ID_PATTERN.test(jobId) ? await this.store.get(jobId) : null;
    if (!cur) throw jobNotFound(jobId);
    return cur;
  }

  /** The live workers, read at most once per WORKERS_CACHE_MS; null when the registry cannot be read. */
  private liveWorkers(): Promise<LiveWorker[] | null> {
    const now = Date.now();
    if (!this.workersRead || now - this.workersRead.at > WORKERS_CACHE_MS)
      this.workersRead = {
        at: now,
        workers: this.store.liveWorkers(WORKERS_DEADLINE_MS).catch((err) => {
          log("debug", "reading the worker registry failed; queued reasons left out", { err: String(err) });
          return null;
        }),
      };
    return this.workersRead.workers;
  }

  /**
   * The job as clients see it: a job no worker runs (QUEUED, or RUNNING handed back to the queue)
   * carries why it waits, worked out from the live workers now, so it is never stale.
   */
  private withReason(rec: JobRecord, workers: LiveWorker[] | null): Job {
    const waiting = rec.job.state === JobState.JOB_STATE_QUEUED || (rec.job.state === JobState.JOB_STATE_RUNNING && rec.worker === "");
    if (!waiting || !workers) return rec.job;
    return { ...rec.job, queuedReason: queuedReason(requirementOf(rec.job.spec), workers) };
  }

  /**
   * Validates and queues a job. With a request id seen before, returns that job when the spec is
   * the same, and refuses the call (ALREADY_EXISTS, REQUEST_ID_REUSED) when it differs (AIP-155).
   * The spec is kept as submitted: a dataset_id stays an id, which the worker resolves.
   */
  async submit(spec: TrainingSpec | undefined, requestId: string): Promise<Job> {
    if (this.shuttingDown) throw new ApiError(status.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server");
    // The contract's rules and the host's checks together, so that one answer names every bad field.
    const violations = ruleViolations(TrainRequest, "loraforge.v1.TrainRequest", { spec, requestId });
    if (spec) {
      const flagged = new Set(violations.map((v) => v.field));
      violations.push(...(await hostViolations(spec, { roots: this.roots, modelsDir: this.models?.dir, datasets: this.datasets, store: this.store }, flagged)));
    }
    if (violations.length > 0) throw invalidSpec(violations);
    await this.checkCaptions(spec!);

    const baseModelHash = await this.baseModelHash(spec!.baseModel);
    const id = newJobId();
    if (requestId) {
      const owner = await this.store.reserveRequest(requestId, id);
      if (owner !== id) {
        const job = await this.waitForRecord(owner);
        if (!sameSpec(job.spec, spec)) throw requestIdReused(requestId, owner);
        return job;
      }
    }
    const job = Job.fromPartial({
      id,
      state: JobState.JOB_STATE_QUEUED,
      spec,
      requestId,
      createTime: new Date(),
      lastSequence: 1,
      baseModelHash,
    });
    await this.store.create(job);
    await this.store.publishEvent(
      JobEvent.fromPartial({
        jobId: id,
        sequence: 1,
        time: job.createTime,
        payload: { $case: "state", state: { state: JobState.JOB_STATE_QUEUED, error: undefined, lora: undefined } },
      }),
    );
    await this.store.enqueue(id, telemetry.inject());
    const answer = this.withReason({ job, attempts: 0, worker: "" }, await this.liveWorkers());
    log("info", "job queued", { job: id, ...(answer.queuedReason ? { waiting: answer.queuedReason } : {}) });
    return answer;
  }

  /**
   * An uploaded set without captions trains only with instance_prompt: without one the job could
   * only fail, so Train refuses it (FAILED_PRECONDITION, DATASET_UNCAPTIONED) saying what to do.
   */
  private async checkCaptions(spec: TrainingSpec): Promise<void> {
    const ds = spec.dataset;
    if (ds?.$case !== "datasetId" || spec.instancePrompt !== undefined) return;
    if (!(await this.datasets.uncaptioned(ds.datasetId))) return;
    throw new ApiError(
      status.FAILED_PRECONDITION,
      "DATASET_UNCAPTIONED",
      `data set ${ds.datasetId} has no captions (it was uploaded without .txt files or metadata.jsonl); set instance_prompt to caption every image, or upload it with captions`,
      [],
      { dataset_id: ds.datasetId },
    );
  }

  /** The job a concurrent submit with the same request_id is creating. */
  private async waitForRecord(jobId: string): Promise<Job> {
    for (let i = 0; i < 100; i++) {
      const cur = await this.store.get(jobId);
      if (cur) return this.withReason(cur, await this.liveWorkers());
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new ApiError(status.UNAVAILABLE, "REQUEST_IN_FLIGHT", `the job for this request_id (${jobId}) is still being created; retry`);
  }

  /** One page of jobs, newest first; the token is the last id of the previous page. */
  async list(opts: ListOptions): Promise<{ jobs: Job[]; nextPageToken: string }> {
    // page_size's range is the contract's rule (checked by the API); a token is ours to judge.
    if (opts.pageToken && !JOB_ID_PATTERN.test(opts.pageToken))
      throw new ApiError(status.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token is not one this server issued", [
        { field: "page_token", description: "is not a token from a previous ListJobs response" },
      ]);
    const size = opts.pageSize || DEFAULT_PAGE_SIZE;
    const ids = (await this.store.jobIds()).filter((id) => !opts.pageToken || id < opts.pageToken);
    const workers = await this.liveWorkers();
    const jobs: Job[] = [];
    let nextPageToken = "";
    for (const id of ids) {
      const cur = await this.store.get(id);
      if (!cur || (opts.state !== JobState.JOB_STATE_UNSPECIFIED && cur.job.state !== opts.state)) continue;
      if (jobs.length === size) {
        nextPageToken = jobs[jobs.length - 1].id;
        break;
      }
      jobs.push(this.withReason(cur, workers));
    }
    return { jobs, nextPageToken };
  }

  /** A job that is not final and trains on uploaded set `datasetId`, or null when there is none. */
  async datasetUser(datasetId: string): Promise<string | null> {
    for (const id of await this.store.jobIds()) {
      const cur = await this.store.get(id);
      const spec = cur?.job.spec;
      if (!cur || isFinal(cur.job.state) || !spec) continue;
      if (spec.dataset?.$case === "datasetId" && spec.dataset.datasetId === datasetId) return id;
      if (spec.classData?.$case === "classDatasetId" && spec.classData.classDatasetId === datasetId) return id;
    }
    return null;
  }

  /** Cancels a queued job at once, or asks the worker of a running one to stop. */
  async cancel(jobId: string, reason = "cancelled by a client"): Promise<Job> {
    await this.find(jobId);
    let cancelledWhileQueued = false;
    const updated = await this.store.update(jobId, (rec) => {
      const job = rec.job;
      cancelledWhileQueued = false;
      if (isFinal(job.state))
        throw new ApiError(
          status.FAILED_PRECONDITION,
          "JOB_ALREADY_FINAL",
          `job ${job.id} is already ${stateName(job.state)}`,
          [],
          { job_id: job.id },
        );
      if (job.state === JobState.JOB_STATE_CANCELLING) return null;
      job.error = jobError(status.CANCELLED, "CANCELLED", reason);
      if (job.state === JobState.JOB_STATE_QUEUED) {
        cancelledWhileQueued = true;
        job.state = JobState.JOB_STATE_CANCELLED;
        job.endTime = new Date();
        job.lastSequence += 1;
      } else {
        // The worker running it sees this change, publishes CANCELLING and stops the engine.
        job.state = JobState.JOB_STATE_CANCELLING;
      }
      return rec;
    });
    if (!updated) return (await this.find(jobId)).job;
    if (cancelledWhileQueued) {
      await this.store.publishEvent(
        JobEvent.fromPartial({
          jobId,
          sequence: updated.job.lastSequence,
          time: updated.job.endTime,
          payload: { $case: "state", state: { state: JobState.JOB_STATE_CANCELLED, error: updated.job.error, lora: undefined } },
        }),
      );
    }
    log("info", "job cancel requested", { job: jobId, state: JobState[updated.job.state] });
    return updated.job;
  }

  /**
   * A job's events after `afterSequence`: the stored history, then live ones,
   * ending after the final state event (or when `signal` aborts). Each sequence
   * is yielded once and in order, also across a NATS restart.
   */
  async *follow(jobId: string, afterSequence: number, signal?: AbortSignal): AsyncGenerator<JobEvent> {
    await this.find(jobId);
    // `delivered` guarantees nothing is yielded twice even if the stream replays.
    let delivered = afterSequence;
    // The stream sequence of the last message seen: a replacement consumer starts after it.
    let streamSeq = 0;
    for (;;) {
      // An ordered consumer is a single copy on one NATS node. If that node dies (a cluster losing
      // one server), nats.js keeps asking it for its state and never re-creates it, so the stream
      // would stall for good. On a reconnect or missed heartbeats this one is replaced by a new
      // consumer that starts where the last one left off. Creating one is retried: while a node is
      // down the cluster may place the new consumer on it, and that request times out.
      const consumer = await retryFor(() =>
        this.store.js.consumers.get(EVENTS_STREAM, {
          filter_subjects: `loraforge.v1.jobs.${jobId}.>`,
          ...(streamSeq > 0 ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: streamSeq + 1 } : {}),
        }),
      );
      const messages = await consumer.consume();
      let stalled = false;
      const stop = () => messages.stop();
      const replace = () => {
        stalled = true;
        messages.stop();
      };
      // (nats.js returns a queued iterator that stop() detaches; the type only says AsyncIterable.)
      const connection = this.store.nc.status() as AsyncIterable<{ type: string }> & { stop(): void };
      void (async () => {
        for await (const s of connection) if (s.type === "reconnect") replace();
      })();
      void (async () => {
        for await (const s of messages.status()) if (s.type === "heartbeats_missed") replace();
      })();
      signal?.addEventListener("abort", stop);
      let done = false;
      try {
        if (signal?.aborted) return;
        for await (const m of messages) {
          streamSeq = m.seq;
          const ev = JobEvent.decode(m.data);
          if (ev.sequence === delivered + 1) {
            delivered = ev.sequence;
            yield ev;
          }
          if (ev.payload?.$case === "state" && isFinal(ev.payload.state.state)) {
            done = true;
            break;
          }
        }
      } finally {
        stop();
        connection.stop();
        signal?.removeEventListener("abort", stop);
        // Ordered consumers otherwise linger on the server for minutes after the client left.
        await consumer.delete().catch(() => {});
      }
      if (done || !stalled || signal?.aborted) return;
      log("info", "progress stream: replacing its NATS consumer", { job: jobId, after_sequence: delivered });
    }
  }

  /**
   * An artifact by its name ("jobs/<job id>/...", as Job.artifacts lists it; a checkpoint's
   * last "/" may be left out) and its bytes (a checkpoint as a tar archive).
   */
  async artifact(name: string): Promise<{ artifact: Artifact; bytes: AsyncGenerator<Uint8Array> }> {
    const jobId = jobOfArtifact(name);
    if (!jobId) throw jobNotFound(name);
    const { job } = await this.find(jobId);
    const artifact = job.artifacts.find(
      (a) => a.name === name || (a.kind === ArtifactKind.ARTIFACT_KIND_CHECKPOINT && a.name === name + "/"),
    );
    if (!artifact)
      throw new ApiError(
        status.NOT_FOUND,
        "ARTIFACT_NOT_FOUND",
        `job ${job.id} has no artifact ${JSON.stringify(name)} (see Job.artifacts[].name)`,
        [],
        { job_id: job.id, name },
      );
    return { artifact, bytes: this.artifacts.read(artifact.name) };
  }
}
