// The hand-written layer over the generated gRPC clients: a client with promise
// methods, job handles whose progress is a reconnecting async iterable, and
// helpers for downloads, uploads and inference.
import { createReadStream, createWriteStream, readdirSync, renameSync, rmSync, statSync } from "node:fs";
import path from "node:path";
import { Readable, type Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import {
  credentials as grpcCredentials,
  Metadata,
  status,
  type CallOptions,
  type ChannelCredentials,
  type ClientReadableStream,
  type ClientUnaryCall,
} from "@grpc/grpc-js";
import { createHash, randomBytes } from "node:crypto";
import { Artifact, ArtifactKind, Job, JobEvent, JobState } from "./gen/loraforge/v1/job.js";
import { TrainerServiceClient, type DownloadArtifactResponse, type GetServerInfoResponse, type StreamProgressResponse } from "./gen/loraforge/v1/trainer_service.js";
import { InferenceServiceClient, InferRequest, type DeepPartial, type InferResponse, type ListModelsResponse } from "./gen/loraforge/v1/inference_service.js";
import { DatasetServiceClient, type Dataset, type UploadDatasetRequest } from "./gen/loraforge/v1/dataset_service.js";
import { TrainingSpec } from "./gen/loraforge/v1/training_spec.js";
import { fromGrpcError, LoraforgeError } from "./errors.js";

/** Options of {@link createClient}. */
export interface ClientOptions {
  /** Server address, `host:port`, e.g. "127.0.0.1:50051". Required. */
  address: string;
  /** Channel credentials. Default: insecure (plaintext), for loopback and private networks. */
  credentials?: ChannelCredentials;
  /** Sent as `authorization: Bearer <token>` on every call. Default: none. */
  token?: string;
  /** Deadline applied to every unary call that has none of its own, in ms. Default: 60 000. */
  defaultTimeoutMs?: number;
}

/** Per-call options accepted by every method. */
export interface CallOpts {
  /** Aborts the call; the promise rejects with the signal's reason (iterators just end). Default: none. */
  signal?: AbortSignal;
  /** Deadline for this call in ms (unary calls only). Default: the client's `defaultTimeoutMs`. */
  timeoutMs?: number;
}

/** Options of {@link LoraforgeClient.train}. */
export interface TrainOptions extends CallOpts {
  /**
   * Idempotency key (≤ 128 characters): retrying with the same key returns the same job; the same key
   * with a different spec is refused (ALREADY_EXISTS, reason REQUEST_ID_REUSED). With one set, `train`
   * itself retries on UNAVAILABLE. Default: none (no retry).
   */
  requestId?: string;
}

/** Options of {@link JobHandle.progress}. */
export interface ProgressOptions {
  /** Deliver only events after this sequence number. Default 0: the whole history. */
  afterSequence?: number;
  /** Stops the iteration (the loop ends quietly) when aborted. Default: none. */
  signal?: AbortSignal;
  /**
   * Reconnect when the server becomes unreachable (UNAVAILABLE), resuming after the last
   * delivered sequence, for at most this long without success, in ms. Default: 300 000; 0 never reconnects.
   */
  reconnectForMs?: number;
}

/** Options of {@link Jobs.list}. */
export interface ListJobsOptions extends CallOpts {
  /** Only jobs in this state. Default: every state. */
  state?: JobState;
  /** Jobs fetched per page, 1..1000. Default 50. */
  pageSize?: number;
}

/** Where {@link Artifacts.download} writes. */
export type DownloadTarget = { file: string } | { stream: Writable };

/**
 * Where a job's training data comes from — exactly one of (TrainingSpec's `dataset` oneof):
 * `datasetId`, a set uploaded with {@link Datasets.upload} (its `id`, "ds-…"); `datasetDir`, a folder
 * on the server host (absolute, inside its data roots); `datasetName`, a Hugging Face hub data set,
 * where the server allows the hub; or the oneof itself, `dataset: { $case: "datasetId", datasetId }`.
 */
export type DatasetSource =
  | { datasetId: string; datasetDir?: never; datasetName?: never; dataset?: never }
  | { datasetDir: string; datasetId?: never; datasetName?: never; dataset?: never }
  | { datasetName: string; datasetId?: never; datasetDir?: never; dataset?: never }
  | { dataset: TrainingSpec["dataset"]; datasetId?: never; datasetDir?: never; datasetName?: never };

/**
 * A TrainingSpec as the SDK accepts it: `baseModel`, one {@link DatasetSource}, and any other field
 * (unset: the server's documented default). Enum fields take the generated enums, e.g.
 * `lrScheduler: LrScheduler.LR_SCHEDULER_COSINE`. A whole `TrainingSpec` message fits too.
 */
export type SpecInput = Omit<Partial<TrainingSpec>, "baseModel" | "dataset" | "classData"> & { baseModel: string } & DatasetSource & ClassDataSource;

/**
 * DreamBooth's class images you already have (optional, with `withPriorPreservation`; TrainingSpec's
 * `class_data` oneof): `classDatasetId`, an uploaded set; `classDataDir`, a folder on the server host;
 * or the oneof itself, `classData: { $case: "classDataDir", classDataDir }`. Missing ones are generated.
 */
export type ClassDataSource =
  | { classDatasetId?: string; classDataDir?: never; classData?: never }
  | { classDataDir?: string; classDatasetId?: never; classData?: never }
  | { classData?: TrainingSpec["classData"]; classDatasetId?: never; classDataDir?: never };

/** An Infer request as the SDK accepts it: only the prompt and base model are required. */
export type InferInput = DeepPartial<InferRequest> & Pick<InferRequest, "prompt" | "baseModel">;

const DATASET_KEYS = ["datasetId", "datasetDir", "datasetName"] as const;

/**
 * The TrainingSpec message for a {@link SpecInput}: the flat data source becomes the `dataset` oneof.
 * Throws a TypeError when more than one source is given; with none, the server refuses the spec
 * (`spec.dataset`).
 */
export function trainingSpec(input: SpecInput): TrainingSpec {
  const { datasetId, datasetDir, datasetName, dataset, classDatasetId, classDataDir, classData, ...rest } = input as Partial<
    Record<(typeof DATASET_KEYS)[number] | "classDatasetId" | "classDataDir", string>
  > &
    Omit<SpecInput, (typeof DATASET_KEYS)[number] | "dataset" | "classDatasetId" | "classDataDir" | "classData"> & {
      dataset?: TrainingSpec["dataset"];
      classData?: TrainingSpec["classData"];
    };
  const flat = { datasetId, datasetDir, datasetName };
  const given = DATASET_KEYS.filter((k) => flat[k] !== undefined);
  if (given.length + (dataset ? 1 : 0) > 1)
    throw new TypeError(`a spec takes one data set source, got ${[...given, ...(dataset ? ["dataset"] : [])].join(" and ")}`);
  const k = given[0];
  const source = dataset ?? (k === "datasetId" ? { $case: k, datasetId: flat[k]! } : k === "datasetDir" ? { $case: k, datasetDir: flat[k]! } : k === "datasetName" ? { $case: k, datasetName: flat[k]! } : undefined);
  const classGiven = [classDatasetId !== undefined, classDataDir !== undefined, classData !== undefined].filter(Boolean).length;
  if (classGiven > 1) throw new TypeError("a spec takes one class image source (classDatasetId, classDataDir or classData)");
  const classSource: TrainingSpec["classData"] =
    classData ??
    (classDatasetId !== undefined
      ? { $case: "classDatasetId", classDatasetId }
      : classDataDir !== undefined
        ? { $case: "classDataDir", classDataDir }
        : undefined);
  return TrainingSpec.fromPartial({ ...rest, dataset: source, classData: classSource });
}

/** The job id in an artifact name ("jobs/<job id>/…"); "" when the name has none. */
export const artifactJobId = (name: string): string => /^jobs\/([^/]+)\//.exec(name)?.[1] ?? "";

/**
 * A local file name for an artifact: the file's own name ("pytorch_lora_weights.safetensors",
 * "<prompt>-0.png"), or "checkpoint-<step>.tar" for a checkpoint folder (it downloads as a tar).
 */
export function artifactFileName(artifact: string | Artifact): string {
  const name = typeof artifact === "string" ? artifact : artifact.name;
  const trimmed = name.replace(/\/+$/, "");
  const base = trimmed.slice(trimmed.lastIndexOf("/") + 1);
  return name.endsWith("/") ? `${base}.tar` : base;
}

/** The final states: once a job is in one, it never changes again. */
export const FINAL_STATES: readonly JobState[] = [JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED, JobState.JOB_STATE_CANCELLED];

/** Short name of a state: "QUEUED", "RUNNING", … */
export const stateName = (s: JobState): string => (JobState[s] ?? String(s)).replace("JOB_STATE_", "");

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => (clearTimeout(t), resolve()), { once: true });
  });

/** A connection to a loraforge server. Create with {@link createClient}; `close()` when done. */
export class LoraforgeClient {
  /** The generated gRPC clients, for calls this layer does not wrap. */
  readonly raw: { trainer: TrainerServiceClient; inference: InferenceServiceClient; datasets: DatasetServiceClient };
  /** Read and list jobs. */
  readonly jobs: Jobs;
  /** Download job artifacts. */
  readonly artifacts: Artifacts;
  /** Upload data sets. */
  readonly datasets: Datasets;
  private readonly opts: Required<Omit<ClientOptions, "credentials" | "token">> & Pick<ClientOptions, "token">;

  constructor(opts: ClientOptions) {
    if (!opts?.address) throw new TypeError("createClient: `address` (host:port) is required");
    const creds = opts.credentials ?? grpcCredentials.createInsecure();
    this.raw = {
      trainer: new TrainerServiceClient(opts.address, creds),
      inference: new InferenceServiceClient(opts.address, creds),
      datasets: new DatasetServiceClient(opts.address, creds),
    };
    this.opts = { address: opts.address, token: opts.token, defaultTimeoutMs: opts.defaultTimeoutMs ?? 60_000 };
    this.jobs = new Jobs(this);
    this.artifacts = new Artifacts(this);
    this.datasets = new Datasets(this);
  }

  /** @internal Metadata carrying the token. */
  metadata(): Metadata {
    const md = new Metadata();
    if (this.opts.token) md.set("authorization", `Bearer ${this.opts.token}`);
    return md;
  }

  /** @internal Runs one unary call with deadline, abort signal, typed errors, and retries when `retry`. */
  async unary<Res>(
    fn: (md: Metadata, options: Partial<CallOptions>, cb: (err: unknown, res: Res) => void) => ClientUnaryCall,
    opts: CallOpts = {},
    retry = false,
  ): Promise<Res> {
    for (let attempt = 0; ; attempt++) {
      opts.signal?.throwIfAborted();
      try {
        return await new Promise<Res>((resolve, reject) => {
          const deadline = new Date(Date.now() + (opts.timeoutMs ?? this.opts.defaultTimeoutMs));
          const call = fn(this.metadata(), { deadline }, (err, res) => (err ? reject(fromGrpcError(err)) : resolve(res)));
          const onAbort = () => call.cancel();
          opts.signal?.addEventListener("abort", onAbort, { once: true });
          call.on("status", () => opts.signal?.removeEventListener("abort", onAbort));
        });
      } catch (err) {
        if (opts.signal?.aborted) throw opts.signal.reason;
        const transient = err instanceof LoraforgeError && err.code === status.UNAVAILABLE;
        if (!retry || !transient || attempt >= 5) throw err;
        await sleep(Math.min(200 * 2 ** attempt, 3000), opts.signal);
      }
    }
  }

  /**
   * Submits a training job and returns its handle at once (the job is QUEUED).
   * Throws {@link InvalidSpecError} naming every bad field when the spec is refused.
   *
   * @example
   * const job = await client.train({ baseModel: "/models/sd15", datasetDir: "/data/pets", maxTrainSteps: 500 });
   * // or an uploaded set: { baseModel, datasetId: (await client.datasets.upload("./pets")).id }
   * for await (const ev of job.progress()) console.log(ev);
   * const done = await job.result();
   */
  async train(spec: SpecInput, opts: TrainOptions = {}): Promise<JobHandle> {
    const req = { spec: trainingSpec(spec), requestId: opts.requestId ?? "" };
    const res = await this.unary<{ job?: Job }>((md, o, cb) => this.raw.trainer.train(req, md, o, cb), opts, !!opts.requestId);
    return new JobHandle(this, res.job!);
  }

  /** A handle for an existing job id (no call is made). */
  job(jobId: string): JobHandle {
    return new JobHandle(this, Job.fromPartial({ id: jobId }));
  }

  /** The job's current record. Throws {@link JobNotFoundError}. Same as `jobs.get`. */
  getJob(jobId: string, opts?: CallOpts): Promise<Job> {
    return this.jobs.get(jobId, opts);
  }

  /** One page of jobs, newest first. See {@link Jobs.list} for an iterable over all pages. */
  async listJobs(opts: ListJobsOptions & { pageToken?: string } = {}): Promise<{ jobs: Job[]; nextPageToken: string }> {
    const req = { state: opts.state ?? JobState.JOB_STATE_UNSPECIFIED, pageSize: opts.pageSize ?? 0, pageToken: opts.pageToken ?? "" };
    return this.unary((md, o, cb) => this.raw.trainer.listJobs(req, md, o, cb), opts, true);
  }

  /**
   * Cancels a job: a queued one becomes CANCELLED at once, a running one CANCELLING
   * (then CANCELLED once the engine has saved a checkpoint). Cancelling twice is
   * harmless. Throws {@link JobAlreadyFinalError} for a finished job.
   */
  async cancelJob(jobId: string, opts?: CallOpts): Promise<Job> {
    return (await this.unary<{ job?: Job }>((md, o, cb) => this.raw.trainer.cancelJob({ jobId }, md, o, cb), opts, true)).job!;
  }

  /**
   * The job's events after `afterSequence`, then live ones; ends after the final state
   * event. When the server becomes unreachable it reconnects and resumes after the last
   * event it delivered, so nothing is missed or repeated.
   */
  async *progress(jobId: string, opts: ProgressOptions = {}): AsyncGenerator<JobEvent> {
    let after = opts.afterSequence ?? 0;
    const reconnectFor = opts.reconnectForMs ?? 300_000;
    let failingSince = 0;
    for (let attempt = 0; ; attempt++) {
      if (opts.signal?.aborted) return;
      const stream: ClientReadableStream<StreamProgressResponse> = this.raw.trainer.streamProgress({ jobId, afterSequence: after }, this.metadata());
      const onAbort = () => stream.cancel();
      opts.signal?.addEventListener("abort", onAbort);
      try {
        for await (const res of stream as AsyncIterable<StreamProgressResponse>) {
          if (!res.event) continue;
          failingSince = 0;
          attempt = 0;
          after = res.event.sequence;
          yield res.event;
        }
        return;
      } catch (err) {
        if (opts.signal?.aborted) return;
        const e = fromGrpcError(err);
        const transient = e instanceof LoraforgeError && e.code === status.UNAVAILABLE;
        failingSince ||= Date.now();
        if (!transient || reconnectFor === 0 || Date.now() - failingSince > reconnectFor) throw e;
        await sleep(Math.min(250 * 2 ** attempt, 5000), opts.signal);
      } finally {
        opts.signal?.removeEventListener("abort", onAbort);
        stream.cancel();
      }
    }
  }

  /**
   * Renders images with a base model and any LoRAs. Returns PNG buffers and timings.
   *
   * @example
   * const res = await client.infer({ prompt: "a red circle", baseModel: "/models/sd15", sampler: Sampler.SAMPLER_DPMPP_2M,
   *   loras: [{ source: { $case: "jobId", jobId: job.id }, scale: 0.8 }] });
   * await fs.writeFile("out.png", res.images[0].png);
   */
  infer(req: InferInput, opts: CallOpts = {}): Promise<InferResponse> {
    const full = InferRequest.fromPartial(req);
    return this.unary((md, o, cb) => this.raw.inference.infer(full, md, { ...o, deadline: new Date(Date.now() + (opts.timeoutMs ?? 600_000)) }, cb), opts, false);
  }

  /**
   * Describes the server for event consumers: its version, the NATS URLs it publishes events on
   * (credentials are never sent), the JetStream stream keeping them and their subject pattern.
   */
  serverInfo(opts: CallOpts = {}): Promise<GetServerInfoResponse> {
    return this.unary((md, o, cb) => this.raw.trainer.getServerInfo({}, md, o, cb), opts, true);
  }

  /** The server's base models (named ones of its models folder, exported ones by hash) and the LoRAs of its succeeded jobs. */
  listModels(opts: CallOpts = {}): Promise<ListModelsResponse> {
    return this.unary((md, o, cb) => this.raw.inference.listModels({}, md, o, cb), opts, true);
  }

  /** Closes the connection. */
  close(): void {
    this.raw.trainer.close();
    this.raw.inference.close();
    this.raw.datasets.close();
  }
}

/** Reading jobs: `client.jobs`. */
export class Jobs {
  constructor(private readonly client: LoraforgeClient) {}

  /** The job's current record. Throws {@link JobNotFoundError}. */
  async get(jobId: string, opts: CallOpts = {}): Promise<Job> {
    return (await this.client.unary<{ job?: Job }>((md, o, cb) => this.client.raw.trainer.getJob({ jobId }, md, o, cb), opts, true)).job!;
  }

  /**
   * Every job (optionally in one state), newest first, fetching pages as you iterate.
   *
   * @example
   * for await (const job of client.jobs.list({ state: JobState.JOB_STATE_RUNNING })) console.log(job.id);
   */
  async *list(opts: ListJobsOptions = {}): AsyncGenerator<Job> {
    let pageToken = "";
    do {
      const page = await this.client.listJobs({ ...opts, pageToken });
      yield* page.jobs;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }
}

/** Downloading artifacts: `client.artifacts`. */
export class Artifacts {
  constructor(private readonly client: LoraforgeClient) {}

  /**
   * Streams an artifact — by its name from `job.artifacts` ("jobs/<job id>/lora/…",
   * "jobs/<job id>/checkpoint-<step>/", …), or the Artifact itself — to a file or a writable
   * stream. A checkpoint arrives as a tar archive of its files. Resolves with the artifact's
   * description; verifies the SHA-256 when the artifact has one. Unknown names throw a
   * LoraforgeError with reason ARTIFACT_NOT_FOUND (or JOB_NOT_FOUND). A file target is written
   * beside itself and renamed into place once complete and verified: a failed download leaves
   * no file (and an existing one as it was).
   *
   * @example
   * await client.artifacts.download(job.lora!, { file: "lora.safetensors" });
   */
  async download(artifact: string | Artifact, to: DownloadTarget, opts: CallOpts = {}): Promise<Artifact> {
    const name = typeof artifact === "string" ? artifact : artifact.name;
    const stream: ClientReadableStream<DownloadArtifactResponse> = this.client.raw.trainer.downloadArtifact({ name }, this.client.metadata());
    const onAbort = () => stream.cancel();
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    let info: Artifact | undefined;
    const hash = createHash("sha256");
    const body = Readable.from(
      (async function* () {
        for await (const msg of stream as AsyncIterable<DownloadArtifactResponse>) {
          if (msg.artifact) info = msg.artifact;
          if (msg.chunk.length > 0) {
            hash.update(msg.chunk);
            yield msg.chunk;
          }
        }
      })(),
    );
    const partial = "file" in to ? `${to.file}.partial-${randomBytes(4).toString("hex")}` : null;
    try {
      try {
        await pipeline(body, partial ? createWriteStream(partial) : (to as { stream: Writable }).stream);
      } catch (err) {
        if (opts.signal?.aborted) throw opts.signal.reason;
        throw fromGrpcError(err);
      } finally {
        opts.signal?.removeEventListener("abort", onAbort);
      }
      if (!info) throw new LoraforgeError("download ended without the artifact's description", { code: status.INTERNAL, reason: "", metadata: {}, violations: [] });
      if (info.sha256 && !name.endsWith("/") && hash.digest("hex") !== info.sha256)
        throw new LoraforgeError(`download of ${name} is corrupt: SHA-256 mismatch`, { code: status.DATA_LOSS, reason: "CHECKSUM_MISMATCH", metadata: {}, violations: [] });
      if (partial) renameSync(partial, (to as { file: string }).file);
      return info;
    } finally {
      if (partial) rmSync(partial, { force: true });
    }
  }
}

/** Uploading data sets: `client.datasets`. */
export class Datasets {
  constructor(private readonly client: LoraforgeClient) {}

  /**
   * Uploads a captioned image set — a folder (images with .txt captions or a
   * metadata.jsonl; sub-folders are not allowed) or a .zip of one — and returns the
   * stored set (its id, name, image count and size; where the server keeps it is its own
   * business). Train on it with `{ datasetId: dataset.id }` in the spec. Throws a
   * {@link LoraforgeError} with reason INVALID_DATASET (and `violations` naming each
   * bad file), DATASET_TOO_LARGE, or DATASET_QUOTA_EXCEEDED when the server's stored sets
   * would pass its quota (delete sets you no longer need with {@link delete}).
   */
  async upload(folderOrZip: string, opts: CallOpts & { name?: string } = {}): Promise<Dataset> {
    const name = opts.name ?? path.basename(folderOrZip).replace(/\.zip$/i, "");
    const CHUNK = 1024 * 1024;
    async function* parts(): AsyncGenerator<UploadDatasetRequest> {
      yield { part: { $case: "header", header: { name } } };
      if (statSync(folderOrZip).isDirectory()) {
        for (const entry of readdirSync(folderOrZip, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
          if (entry.isDirectory()) throw new TypeError(`datasets.upload: sub-folders are not supported (${entry.name})`);
          if (!entry.isFile()) continue;
          let sent = false;
          for await (const chunk of createReadStream(path.join(folderOrZip, entry.name), { highWaterMark: CHUNK })) {
            sent = true;
            yield { part: { $case: "file", file: { name: entry.name, data: chunk as Buffer } } };
          }
          if (!sent) yield { part: { $case: "file", file: { name: entry.name, data: Buffer.alloc(0) } } };
        }
      } else {
        for await (const chunk of createReadStream(folderOrZip, { highWaterMark: CHUNK }))
          yield { part: { $case: "zipChunk", zipChunk: chunk as Buffer } };
      }
    }
    return new Promise<Dataset>((resolve, reject) => {
      const call = this.client.raw.datasets.uploadDataset(this.client.metadata(), (err, res) =>
        err ? reject(opts.signal?.aborted ? opts.signal.reason : fromGrpcError(err)) : resolve(res.dataset!),
      );
      opts.signal?.addEventListener("abort", () => call.cancel(), { once: true });
      (async () => {
        try {
          for await (const msg of parts()) {
            if (!call.write(msg)) await new Promise((r) => call.once("drain", r));
          }
          call.end();
        } catch (err) {
          call.cancel();
          reject(err);
        }
      })();
    });
  }

  /**
   * Deletes a stored set, freeing its bytes of the server's data set quota, and returns it as it
   * was stored. Throws a {@link LoraforgeError} with reason DATASET_NOT_FOUND, or DATASET_IN_USE
   * (metadata `job_id`) while a queued or running job trains on it.
   */
  async delete(datasetId: string, opts: CallOpts = {}): Promise<Dataset> {
    return (await this.client.unary<{ dataset?: Dataset }>((md, o, cb) => this.client.raw.datasets.deleteDataset({ datasetId }, md, o, cb), opts, false)).dataset!;
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

  /**
   * Waits until the job is final and returns its record (SUCCEEDED, FAILED or
   * CANCELLED — check `state`; a failed job is not an exception: its `error` says why,
   * {@link errorMessage} in words).
   */
  async result(opts: { signal?: AbortSignal } = {}): Promise<Job> {
    for await (const ev of this.progress({ afterSequence: Math.max(0, this.job.lastSequence - 1), signal: opts.signal })) void ev;
    opts.signal?.throwIfAborted();
    return this.refresh();
  }

  /** Re-reads the job's record. */
  async refresh(opts?: CallOpts): Promise<Job> {
    this.job = await this.client.jobs.get(this.id, opts);
    return this.job;
  }

  /** Cancels the job; see {@link LoraforgeClient.cancelJob}. */
  async cancel(opts?: CallOpts): Promise<Job> {
    this.job = await this.client.cancelJob(this.id, opts);
    return this.job;
  }

  /** The final LoRA artifact, once the job SUCCEEDED; undefined before. */
  get lora(): Artifact | undefined {
    return this.job.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA && a.name);
  }
}

/** Connects to a loraforge server. */
export function createClient(opts: ClientOptions): LoraforgeClient {
  return new LoraforgeClient(opts);
}
