// The hand-written layer over the generated gRPC client: a client with promise
// methods, and job handles whose progress is an async iterable.
import { credentials as grpcCredentials, type ChannelCredentials, type ClientReadableStream } from "@grpc/grpc-js";
import { Job, JobEvent, JobState } from "./gen/loraforge/v1/job.js";
import { TrainerServiceClient, type StreamProgressResponse } from "./gen/loraforge/v1/trainer_service.js";
import { TrainingSpec } from "./gen/loraforge/v1/training_spec.js";
import { fromGrpcError } from "./errors.js";

/** Options of {@link createClient}. */
export interface ClientOptions {
  /** Server address, `host:port`, e.g. "127.0.0.1:50051". Required. */
  address: string;
  /** Channel credentials. Default: insecure (plaintext), for loopback and private networks. */
  credentials?: ChannelCredentials;
}

/** Options of {@link LoraforgeClient.train}. */
export interface TrainOptions {
  /** Idempotency key (≤ 128 characters): retrying with the same key returns the same job. Default: none. */
  requestId?: string;
}

/** Options of {@link JobHandle.progress}. */
export interface ProgressOptions {
  /** Deliver only events after this sequence number. Default 0: the whole history. */
  afterSequence?: number;
  /** Stops the iteration (the loop ends quietly) when aborted. Default: none. */
  signal?: AbortSignal;
}

/** Options of {@link LoraforgeClient.listJobs}. */
export interface ListJobsOptions {
  /** Only jobs in this state. Default: every state. */
  state?: JobState;
  /** Jobs per page, 1..1000. Default 50. */
  pageSize?: number;
  /** `nextPageToken` of the previous page. Default: first page. */
  pageToken?: string;
}

/** The final states: once a job is in one, it never changes again. */
export const FINAL_STATES: readonly JobState[] = [JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED, JobState.JOB_STATE_CANCELLED];

/** Short name of a state: "QUEUED", "RUNNING", … */
export const stateName = (s: JobState): string => (JobState[s] ?? String(s)).replace("JOB_STATE_", "");

function call<Res>(fn: (cb: (err: unknown, res: Res) => void) => void): Promise<Res> {
  return new Promise((resolve, reject) => fn((err, res) => (err ? reject(fromGrpcError(err)) : resolve(res))));
}

/** A connection to a loraforge server. Create with {@link createClient}; `close()` when done. */
export class LoraforgeClient {
  /** The generated gRPC client, for calls this layer does not wrap. */
  readonly raw: TrainerServiceClient;

  constructor(opts: ClientOptions) {
    if (!opts?.address) throw new TypeError("createClient: `address` (host:port) is required");
    this.raw = new TrainerServiceClient(opts.address, opts.credentials ?? grpcCredentials.createInsecure());
  }

  /**
   * Submits a training job and returns its handle at once (the job is QUEUED).
   * Throws {@link InvalidSpecError} naming every bad field when the spec is refused.
   *
   * @example
   * const job = await client.train({ baseModel: "/models/sd15", datasetDir: "/data/pets", maxTrainSteps: 500 });
   * for await (const ev of job.progress()) console.log(ev);
   * const done = await job.result();
   */
  async train(spec: Partial<TrainingSpec> & Pick<TrainingSpec, "baseModel" | "datasetDir">, opts: TrainOptions = {}): Promise<JobHandle> {
    const res = await call<{ job?: Job }>((cb) =>
      this.raw.train({ spec: TrainingSpec.fromPartial(spec), requestId: opts.requestId ?? "" }, cb),
    );
    return new JobHandle(this, res.job!);
  }

  /** A handle for an existing job id (no call is made). */
  job(jobId: string): JobHandle {
    return new JobHandle(this, Job.fromPartial({ id: jobId }));
  }

  /** The job's current record. Throws {@link JobNotFoundError}. */
  async getJob(jobId: string): Promise<Job> {
    return (await call<{ job?: Job }>((cb) => this.raw.getJob({ jobId }, cb))).job!;
  }

  /** One page of jobs, newest first. */
  async listJobs(opts: ListJobsOptions = {}): Promise<{ jobs: Job[]; nextPageToken: string }> {
    return call((cb) =>
      this.raw.listJobs({ state: opts.state ?? JobState.JOB_STATE_UNSPECIFIED, pageSize: opts.pageSize ?? 0, pageToken: opts.pageToken ?? "" }, cb),
    );
  }

  /**
   * Cancels a job: a queued one becomes CANCELLED at once, a running one CANCELLING
   * (then CANCELLED once the engine has saved a checkpoint). Throws
   * {@link JobAlreadyFinalError} for a finished job.
   */
  async cancelJob(jobId: string): Promise<Job> {
    return (await call<{ job?: Job }>((cb) => this.raw.cancelJob({ jobId }, cb))).job!;
  }

  /** The job's events after `afterSequence`, then live ones; ends after the final state event. */
  async *progress(jobId: string, opts: ProgressOptions = {}): AsyncGenerator<JobEvent> {
    const stream: ClientReadableStream<StreamProgressResponse> = this.raw.streamProgress({
      jobId,
      afterSequence: opts.afterSequence ?? 0,
    });
    const onAbort = () => stream.cancel();
    opts.signal?.addEventListener("abort", onAbort);
    try {
      for await (const res of stream as AsyncIterable<StreamProgressResponse>) {
        if (res.event) yield res.event;
      }
    } catch (err) {
      if (opts.signal?.aborted) return;
      throw fromGrpcError(err);
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
      stream.cancel();
    }
  }

  /** Closes the connection. */
  close(): void {
    this.raw.close();
  }
}

/** A training job: its id, the record it was created with, and ways to follow it. */
export class JobHandle {
  constructor(
    private readonly client: LoraforgeClient,
    /** The record as of creation (or as of the last {@link refresh}). */
    public job: Job,
  ) {}

  get id(): string {
    return this.job.id;
  }

  /** Follows the job's events: the history after `afterSequence`, then live ones, until it is final. */
  progress(opts: ProgressOptions = {}): AsyncGenerator<JobEvent> {
    return this.client.progress(this.id, opts);
  }

  /** Waits until the job is final and returns its record (SUCCEEDED, FAILED or CANCELLED — check `state`). */
  async result(): Promise<Job> {
    for await (const ev of this.progress({ afterSequence: Math.max(0, this.job.lastSequence - 1) })) void ev;
    return this.refresh();
  }

  /** Re-reads the job's record. */
  async refresh(): Promise<Job> {
    this.job = await this.client.getJob(this.id);
    return this.job;
  }

  /** Cancels the job; see {@link LoraforgeClient.cancelJob}. */
  async cancel(): Promise<Job> {
    this.job = await this.client.cancelJob(this.id);
    return this.job;
  }
}

/** Connects to a loraforge server. */
export function createClient(opts: ClientOptions): LoraforgeClient {
  return new LoraforgeClient(opts);
}
