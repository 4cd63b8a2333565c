// TrainerService and DatasetService over gRPC: thin adapters from RPCs to the job and
// data set operations in jobs/, with a server span per call, every request checked
// against the contract's rules first, and the one error mapping of errors.ts.
import {
  type Metadata,
  type sendUnaryData,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
} from "@grpc/grpc-js";
import { DeleteDatasetRequest, UploadDatasetRequest, type DatasetServiceServer, type UploadDatasetResponse } from "@loraforge/sdk/gen/loraforge/v1/dataset_service";
import { invalidDataset, receiveUpload, type DatasetLimits, type DatasetStore } from "../jobs/datasets.js";
import { SpanKind } from "@opentelemetry/api";
import {
  CancelJobRequest,
  DownloadArtifactRequest,
  GetJobRequest,
  GetServerInfoRequest,
  ListJobsRequest,
  StreamProgressRequest,
  type DownloadArtifactResponse,
  type GetServerInfoResponse,
  type StreamProgressResponse,
  type TrainerServiceServer,
} from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { ApiError, datasetInUse, invalidRequest, toServiceError, type FieldViolation } from "../core/errors.js";
import type { Encoder } from "../core/contract.js";
import { ruleViolations } from "../core/rules.js";
import type { Jobs } from "../jobs/jobs.js";
import { log } from "../core/log.js";
import { telemetry } from "../core/telemetry.js";

/** Runs an RPC handler inside a server span continuing the caller's trace. */
function traced<T>(method: string, metadata: Metadata, fn: () => Promise<T>, service = "loraforge.v1.TrainerService"): Promise<T> {
  const carrier: Record<string, string> = {};
  for (const [k, v] of Object.entries(metadata.getMap())) if (typeof v === "string") carrier[k] = v;
  return telemetry.span(
    `${service}/${method}`,
    { "rpc.system": "grpc", "rpc.service": service, "rpc.method": method },
    fn,
    telemetry.extract(carrier),
    SpanKind.SERVER,
  );
}

/** A request message's type: its ts-proto codec, full name, and the error reason for breaking its rules. */
interface RequestType<Req> {
  codec: Encoder<Req>;
  name: string;
  /** ErrorInfo reason of the INVALID_ARGUMENT: the field's own where one exists (INVALID_PAGE_SIZE), else INVALID_REQUEST. */
  reason?: (violations: FieldViolation[]) => string;
}

/** Throws INVALID_ARGUMENT naming every field of `req` that breaks a rule of its type. */
function checkRules<Req>(type: RequestType<Req>, req: Req): void {
  const violations = ruleViolations(type.codec, type.name, req);
  if (violations.length > 0) throw invalidRequest(type.reason?.(violations) ?? "INVALID_REQUEST", `invalid ${type.name.split(".").pop()}`, violations);
}

/**
 * A unary handler: the request's rules, then `fn`. Without a type the handler checks the rules
 * itself (Train, whose spec is checked together with what only the host can see).
 */
function unary<Req, Res>(method: string, type: RequestType<Req> | null, fn: (req: Req) => Promise<Res>, service?: string) {
  return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
    traced(
      method,
      call.metadata,
      async () => {
        if (type) checkRules(type, call.request);
        return fn(call.request);
      },
      service,
    ).then(
      (res) => callback(null, res),
      (err) => {
        if (!(err instanceof ApiError)) log("error", `${method} failed`, { err: String(err?.stack ?? err) });
        callback(toServiceError(err));
      },
    );
  };
}

/** Server-streaming handlers check the request's rules, end the call on success and send the mapped status on failure. */
function streaming<Req, Res>(method: string, type: RequestType<Req>, fn: (call: ServerWritableStream<Req, Res>, signal: AbortSignal) => Promise<void>) {
  return (call: ServerWritableStream<Req, Res>) => {
    const ac = new AbortController();
    call.on("cancelled", () => ac.abort());
    call.on("close", () => ac.abort());
    traced(method, call.metadata, async () => {
      checkRules(type, call.request);
      await fn(call, ac.signal);
    }).then(
      () => call.end(),
      (err) => {
        if (!(err instanceof ApiError)) log("error", `${method} failed`, { err: String(err?.stack ?? err) });
        call.emit("error", toServiceError(err));
      },
    );
  };
}

/** Writes one message, waiting for the client to drain when its buffer is full. */
async function write<Res>(call: ServerWritableStream<unknown, Res>, msg: Res): Promise<void> {
  if (!call.write(msg)) await new Promise((r) => call.once("drain", r));
}

const onlyPageSize = (v: FieldViolation[]) => (v.every((x) => x.field === "page_size") ? "INVALID_PAGE_SIZE" : "INVALID_REQUEST");

export function trainerService(jobs: Jobs, info: GetServerInfoResponse): TrainerServiceServer {
  return {
    getServerInfo: unary("GetServerInfo", { codec: GetServerInfoRequest, name: "loraforge.v1.GetServerInfoRequest" }, async () => info),
    train: unary("Train", null, async (req) => ({ job: await jobs.submit(req.spec, req.requestId) })),
    getJob: unary("GetJob", { codec: GetJobRequest, name: "loraforge.v1.GetJobRequest" }, async (req) => ({ job: await jobs.get(req.jobId) })),
    listJobs: unary("ListJobs", { codec: ListJobsRequest, name: "loraforge.v1.ListJobsRequest", reason: onlyPageSize }, (req) => jobs.list(req)),
    cancelJob: unary("CancelJob", { codec: CancelJobRequest, name: "loraforge.v1.CancelJobRequest" }, async (req) => ({ job: await jobs.cancel(req.jobId) })),
    streamProgress: streaming(
      "StreamProgress",
      { codec: StreamProgressRequest, name: "loraforge.v1.StreamProgressRequest" },
      async (call: ServerWritableStream<StreamProgressRequest, StreamProgressResponse>, signal) => {
        for await (const event of jobs.follow(call.request.jobId, call.request.afterSequence, signal)) await write(call, { event });
      },
    ),
    downloadArtifact: streaming(
      "DownloadArtifact",
      { codec: DownloadArtifactRequest, name: "loraforge.v1.DownloadArtifactRequest" },
      async (call: ServerWritableStream<DownloadArtifactRequest, DownloadArtifactResponse>, signal) => {
        const { artifact, bytes } = await jobs.artifact(call.request.name);
        await write(call, { artifact, chunk: Buffer.alloc(0) });
        const CHUNK = 256 * 1024;
        for await (const data of bytes) {
          for (let off = 0; off < data.length; off += CHUNK) {
            if (signal.aborted) return;
            await write(call, { artifact: undefined, chunk: Buffer.from(data.subarray(off, off + CHUNK)) });
          }
        }
      },
    ),
  };
}

/** The upload stream with each message checked against the contract's rules (INVALID_DATASET names the bad part). */
async function* checkedParts(parts: AsyncIterable<UploadDatasetRequest>): AsyncGenerator<UploadDatasetRequest> {
  for await (const msg of parts) {
    const violations = ruleViolations(UploadDatasetRequest, "loraforge.v1.UploadDatasetRequest", msg);
    if (violations.length > 0) throw invalidDataset(violations);
    yield msg;
  }
}

/** DatasetService: uploads checked and stored in `datasets`; a set no unfinished job of `jobs` uses can be deleted. */
export function datasetService(datasets: DatasetStore, jobs: Jobs, limits?: DatasetLimits): DatasetServiceServer {
  return {
    deleteDataset: unary(
      "DeleteDataset",
      { codec: DeleteDatasetRequest, name: "loraforge.v1.DeleteDatasetRequest" },
      async (req) => {
        const user = await jobs.datasetUser(req.datasetId);
        if (user) throw datasetInUse(req.datasetId, user);
        return { dataset: await datasets.delete(req.datasetId) };
      },
      "loraforge.v1.DatasetService",
    ),
    uploadDataset: (call: ServerReadableStream<UploadDatasetRequest, UploadDatasetResponse>, callback: sendUnaryData<UploadDatasetResponse>) => {
      traced("UploadDataset", call.metadata, () => receiveUpload(checkedParts(call), datasets, limits), "loraforge.v1.DatasetService").then(
        (dataset) => callback(null, { dataset }),
        (err) => {
          if (!(err instanceof ApiError)) log("error", "UploadDataset failed", { err: String(err?.stack ?? err) });
          callback(toServiceError(err));
        },
      );
    },
  };
}
