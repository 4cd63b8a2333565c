// TrainerService over gRPC: a thin adapter from RPCs to the job operations in
// jobs.ts, with a server span per call and the one error mapping of errors.ts.
import {
  type Metadata,
  type sendUnaryData,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
} from "@grpc/grpc-js";
import type { DatasetServiceServer, UploadDatasetRequest, UploadDatasetResponse } from "@loraforge/sdk/gen/loraforge/v1/dataset_service";
import { receiveUpload, type DatasetLimits } from "../jobs/datasets.js";
import { SpanKind } from "@opentelemetry/api";
import type {
  DownloadArtifactRequest,
  DownloadArtifactResponse,
  StreamProgressRequest,
  StreamProgressResponse,
  TrainerServiceServer,
} from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { ApiError, toServiceError } from "../core/errors.js";
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

function unary<Req, Res>(method: string, fn: (req: Req) => Promise<Res>) {
  return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
    traced(method, call.metadata, () => fn(call.request)).then(
      (res) => callback(null, res),
      (err) => {
        if (!(err instanceof ApiError)) log("error", `${method} failed`, { err: String(err?.stack ?? err) });
        callback(toServiceError(err));
      },
    );
  };
}

/** Server-streaming handlers end the call on success and send the mapped status on failure. */
function streaming<Req, Res>(method: string, fn: (call: ServerWritableStream<Req, Res>, signal: AbortSignal) => Promise<void>) {
  return (call: ServerWritableStream<Req, Res>) => {
    const ac = new AbortController();
    call.on("cancelled", () => ac.abort());
    call.on("close", () => ac.abort());
    traced(method, call.metadata, () => fn(call, ac.signal)).then(
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

export function trainerService(jobs: Jobs): TrainerServiceServer {
  return {
    train: unary("Train", async (req) => ({ job: await jobs.submit(req.spec, req.requestId) })),
    getJob: unary("GetJob", async (req) => ({ job: await jobs.get(req.jobId) })),
    listJobs: unary("ListJobs", (req) => jobs.list(req)),
    cancelJob: unary("CancelJob", async (req) => ({ job: await jobs.cancel(req.jobId) })),
    streamProgress: streaming("StreamProgress", async (call: ServerWritableStream<StreamProgressRequest, StreamProgressResponse>, signal) => {
      for await (const event of jobs.follow(call.request.jobId, call.request.afterSequence, signal)) await write(call, { event });
    }),
    downloadArtifact: streaming(
      "DownloadArtifact",
      async (call: ServerWritableStream<DownloadArtifactRequest, DownloadArtifactResponse>, signal) => {
        const { artifact, bytes } = await jobs.artifact(call.request.jobId, call.request.objectName);
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

/** DatasetService: uploads stored under `root`. */
export function datasetService(root: string, limits?: DatasetLimits): DatasetServiceServer {
  return {
    uploadDataset: (call: ServerReadableStream<UploadDatasetRequest, UploadDatasetResponse>, callback: sendUnaryData<UploadDatasetResponse>) => {
      traced("UploadDataset", call.metadata, () => receiveUpload(call, root, limits), "loraforge.v1.DatasetService").then(
        (dataset) => callback(null, { dataset }),
        (err) => {
          if (!(err instanceof ApiError)) log("error", "UploadDataset failed", { err: String(err?.stack ?? err) });
          callback(toServiceError(err));
        },
      );
    },
  };
}
