// TrainerService over gRPC: validates and queues jobs, reads job records, streams
// job events from JetStream, and asks running jobs to cancel.
import { status, type Metadata, type sendUnaryData, type ServerUnaryCall, type ServerWritableStream } from "@grpc/grpc-js";
import { SpanKind } from "@opentelemetry/api";
import { Job, JobEvent, JobState } from "@loraforge/sdk/gen/loraforge/v1/job";
import type {
  DownloadArtifactRequest,
  DownloadArtifactResponse,
  CancelJobRequest,
  CancelJobResponse,
  GetJobRequest,
  GetJobResponse,
  ListJobsRequest,
  ListJobsResponse,
  StreamProgressRequest,
  StreamProgressResponse,
  TrainerServiceServer,
  TrainRequest,
  TrainResponse,
} from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { ApiError, invalidSpec, jobNotFound, toServiceError } from "./errors.js";
import { JOB_ID_PATTERN, newJobId } from "./ids.js";
import { log } from "./log.js";
import { ArtifactStore } from "./artifacts.js";
import { EVENTS_STREAM, isFinal, JobStore } from "./store.js";
import { telemetry } from "./telemetry.js";
import { validateSpec, type PathPolicy } from "./validate.js";

const MAX_PAGE_SIZE = 1000;
const DEFAULT_PAGE_SIZE = 50;

/** Runs an RPC handler inside a server span continuing the caller's trace. */
function traced<T>(method: string, metadata: Metadata, fn: () => Promise<T>): Promise<T> {
  const carrier: Record<string, string> = {};
  for (const [k, v] of Object.entries(metadata.getMap())) if (typeof v === "string") carrier[k] = v;
  return telemetry.span(
    `loraforge.v1.TrainerService/${method}`,
    { "rpc.system": "grpc", "rpc.service": "loraforge.v1.TrainerService", "rpc.method": method },
    fn,
    telemetry.extract(carrier),
    SpanKind.SERVER,
  );
}

function unary<Req, Res>(method: string, fn: (req: Req) => Promise<Res>) {
  return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
    traced(method, call.metadata, () => fn(call.request)).then(
      (res) => callback(null, res),
      (err) => {
        if (!(err instanceof ApiError)) log("error", "RPC failed", { err: String(err?.stack ?? err) });
        callback(toServiceError(err));
      },
    );
  };
}

export interface ServiceState {
  /** Set when the server is shutting down: Train refuses new work. */
  shuttingDown: boolean;
}

export function trainerService(store: JobStore, artifacts: ArtifactStore, paths: PathPolicy, state: ServiceState): TrainerServiceServer {
  async function getOrThrow(jobId: string) {
    const cur = JOB_ID_PATTERN.test(jobId) ? await store.get(jobId) : null;
    if (!cur) throw jobNotFound(jobId);
    return cur;
  }

  async function train(req: TrainRequest): Promise<TrainResponse> {
    if (state.shuttingDown) throw new ApiError(status.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server");
    const violations = validateSpec(req.spec, paths);
    if (req.requestId.length > 128)
      violations.push({ field: "request_id", description: `must be at most 128 characters, got ${req.requestId.length}` });
    if (violations.length > 0) throw invalidSpec(violations);

    const id = newJobId();
    if (req.requestId) {
      const owner = await store.reserveRequest(req.requestId, id);
      if (owner !== id) return { job: await waitForRecord(owner) };
    }
    const job = Job.fromPartial({
      id,
      state: JobState.JOB_STATE_QUEUED,
      spec: req.spec,
      requestId: req.requestId,
      createTime: new Date(),
      lastSequence: 1,
    });
    await store.create(job);
    await store.publishEvent(
      JobEvent.fromPartial({
        jobId: id,
        sequence: 1,
        time: job.createTime,
        payload: { $case: "state", state: { state: JobState.JOB_STATE_QUEUED, error: "" } },
      }),
    );
    await store.enqueue(id, telemetry.inject());
    log("info", "job queued", { job: id });
    return { job };
  }

  /** The job a concurrent Train with the same request_id is creating. */
  async function waitForRecord(jobId: string): Promise<Job> {
    for (let i = 0; i < 100; i++) {
      const cur = await store.get(jobId);
      if (cur) return cur.job;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new ApiError(status.UNAVAILABLE, "REQUEST_IN_FLIGHT", `the job for this request_id (${jobId}) is still being created; retry`);
  }

  async function listJobs(req: ListJobsRequest): Promise<ListJobsResponse> {
    if (req.pageSize < 0 || req.pageSize > MAX_PAGE_SIZE)
      throw new ApiError(status.INVALID_ARGUMENT, "INVALID_PAGE_SIZE", `page_size must be in 0..${MAX_PAGE_SIZE}`, [
        { field: "page_size", description: `must be in 0..${MAX_PAGE_SIZE}, got ${req.pageSize}` },
      ]);
    if (req.pageToken && !JOB_ID_PATTERN.test(req.pageToken))
      throw new ApiError(status.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token is not one this server issued", [
        { field: "page_token", description: "is not a token from a previous ListJobs response" },
      ]);
    const size = req.pageSize || DEFAULT_PAGE_SIZE;
    const ids = (await store.jobIds()).filter((id) => !req.pageToken || id < req.pageToken);
    const jobs: Job[] = [];
    let nextPageToken = "";
    for (const id of ids) {
      const cur = await store.get(id);
      if (!cur || (req.state !== JobState.JOB_STATE_UNSPECIFIED && cur.job.state !== req.state)) continue;
      if (jobs.length === size) {
        nextPageToken = jobs[jobs.length - 1].id;
        break;
      }
      jobs.push(cur.job);
    }
    return { jobs, nextPageToken };
  }

  async function cancelJob(req: CancelJobRequest): Promise<CancelJobResponse> {
    await getOrThrow(req.jobId);
    let cancelledWhileQueued = false;
    const updated = await store.update(req.jobId, (job) => {
      cancelledWhileQueued = false;
      if (isFinal(job.state))
        throw new ApiError(
          status.FAILED_PRECONDITION,
          "JOB_ALREADY_FINAL",
          `job ${job.id} is already ${JobState[job.state].replace("JOB_STATE_", "")}`,
          [],
          { job_id: job.id },
        );
      if (job.state === JobState.JOB_STATE_CANCELLING) return null;
      job.error = "cancelled by a client";
      if (job.state === JobState.JOB_STATE_QUEUED) {
        cancelledWhileQueued = true;
        job.state = JobState.JOB_STATE_CANCELLED;
        job.endTime = new Date();
        job.lastSequence += 1;
      } else {
        // The worker running it sees this change, publishes CANCELLING and stops the engine.
        job.state = JobState.JOB_STATE_CANCELLING;
      }
      return job;
    });
    if (!updated) return { job: (await getOrThrow(req.jobId)).job };
    if (cancelledWhileQueued) {
      await store.publishEvent(
        JobEvent.fromPartial({
          jobId: req.jobId,
          sequence: updated.job.lastSequence,
          time: updated.job.endTime,
          payload: { $case: "state", state: { state: JobState.JOB_STATE_CANCELLED, error: updated.job.error } },
        }),
      );
    }
    log("info", "job cancel requested", { job: req.jobId, state: JobState[updated.job.state] });
    return { job: updated.job };
  }

  async function streamProgress(call: ServerWritableStream<StreamProgressRequest, StreamProgressResponse>) {
    const { jobId, afterSequence } = call.request;
    await getOrThrow(jobId);
    const consumer = await store.js.consumers.get(EVENTS_STREAM, { filter_subjects: `loraforge.v1.jobs.${jobId}.>` });
    const messages = await consumer.consume();
    const stop = () => messages.stop();
    call.on("cancelled", stop);
    call.on("close", stop);
    // The ordered consumer re-creates itself after a NATS restart; `delivered`
    // guarantees nothing reaches the client twice even if the stream replays.
    let delivered = afterSequence;
    try {
      for await (const m of messages) {
        const ev = JobEvent.decode(m.data);
        if (ev.sequence === delivered + 1) {
          delivered = ev.sequence;
          if (!call.write({ event: ev })) await new Promise((r) => call.once("drain", r));
        }
        if (ev.payload?.$case === "state" && isFinal(ev.payload.state.state)) break;
      }
    } finally {
      stop();
      call.off("cancelled", stop);
      // Ordered consumers otherwise linger on the server for minutes after the client left.
      await consumer.delete().catch(() => {});
    }
  }

  async function downloadArtifact(call: ServerWritableStream<DownloadArtifactRequest, DownloadArtifactResponse>) {
    const { job } = await getOrThrow(call.request.jobId);
    const artifact = job.artifacts.find((a) => a.objectName && a.objectName === call.request.objectName);
    if (!artifact)
      throw new ApiError(
        status.NOT_FOUND,
        "ARTIFACT_NOT_FOUND",
        `job ${job.id} has no artifact ${JSON.stringify(call.request.objectName)} (see Job.artifacts[].object_name)`,
        [],
        { job_id: job.id, object_name: call.request.objectName },
      );
    let cancelled = false;
    call.on("cancelled", () => (cancelled = true));
    call.write({ artifact, chunk: Buffer.alloc(0) });
    const CHUNK = 256 * 1024;
    for await (const data of artifacts.read(artifact.objectName)) {
      for (let off = 0; off < data.length && !cancelled; off += CHUNK) {
        if (!call.write({ artifact: undefined, chunk: Buffer.from(data.subarray(off, off + CHUNK)) }))
          await new Promise((r) => call.once("drain", r));
      }
      if (cancelled) return;
    }
  }

  /** Server-streaming handlers end the call on success and send the mapped status on failure. */
  const streaming =
    <Req, Res>(method: string, fn: (call: ServerWritableStream<Req, Res>) => Promise<void>) =>
    (call: ServerWritableStream<Req, Res>) => {
      traced(method, call.metadata, () => fn(call)).then(
        () => call.end(),
        (err) => {
          if (!(err instanceof ApiError)) log("error", `${method} failed`, { err: String(err?.stack ?? err) });
          call.emit("error", toServiceError(err));
        },
      );
    };

  return {
    train: unary("Train", train),
    getJob: unary("GetJob", async (req: GetJobRequest): Promise<GetJobResponse> => ({ job: (await getOrThrow(req.jobId)).job })),
    listJobs: unary("ListJobs", listJobs),
    cancelJob: unary("CancelJob", cancelJob),
    downloadArtifact: streaming("DownloadArtifact", downloadArtifact),
    streamProgress: streaming("StreamProgress", streamProgress),
  };
}
