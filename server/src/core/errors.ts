// The one mapping from loraforge errors to gRPC statuses. Every RPC failure is an
// ApiError: a standard gRPC code, a machine-readable reason (google.rpc.ErrorInfo)
// and, for bad requests, the bad fields (google.rpc.BadRequest), all carried in the
// `grpc-status-details-bin` trailer that any gRPC client can decode.
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { Status } from "@loraforge/sdk/gen/google/rpc/status";
import { BadRequest, ErrorInfo } from "@loraforge/sdk/gen/google/rpc/error_details";
import type { Any } from "@loraforge/sdk/gen/google/protobuf/any";
import { ModelOutsideRoots } from "./paths.js";

export const ERROR_DOMAIN = "loraforge.dev";

/** One bad field of a request: its path (e.g. "spec.rank") and what is wrong. */
export interface FieldViolation {
  field: string;
  description: string;
}

export class ApiError extends Error {
  constructor(
    readonly code: status,
    readonly reason: string,
    message: string,
    readonly violations: FieldViolation[] = [],
    readonly metadata: Record<string, string> = {},
  ) {
    super(message);
    this.name = "ApiError";
  }
}

/** INVALID_ARGUMENT naming every bad field; `what` opens the message ("invalid training spec"). */
export const invalidRequest = (reason: string, what: string, violations: FieldViolation[]) =>
  new ApiError(status.INVALID_ARGUMENT, reason, `${what}: ` + violations.map((v) => `${v.field}: ${v.description}`).join("; "), violations);

export const invalidSpec = (violations: FieldViolation[]) => invalidRequest("INVALID_SPEC", "invalid training spec", violations);

export const jobNotFound = (jobId: string) =>
  new ApiError(status.NOT_FOUND, "JOB_NOT_FOUND", `job ${JSON.stringify(jobId)} does not exist`, [], {
    job_id: jobId,
  });

/** A google.rpc.ErrorInfo of our domain, packed for google.rpc.Status.details. */
const errorInfo = (reason: string, metadata: Record<string, string> = {}): Any => ({
  typeUrl: "type.googleapis.com/google.rpc.ErrorInfo",
  value: Buffer.from(ErrorInfo.encode({ reason, domain: ERROR_DOMAIN, metadata }).finish()),
});

/**
 * Why a job failed or was cancelled, as Job.error and StateChanged.error carry it: a google.rpc.Code,
 * the readable message and an ErrorInfo whose reason names the case (e.g. ENGINE_KILLED).
 */
export function jobError(code: status, reason: string, message: string, metadata: Record<string, string> = {}): Status {
  return { code, message, details: [errorInfo(reason, metadata)] };
}

/** The ErrorInfo reason of a Status, or "" when it has none. */
export function errorReason(s: Status | undefined): string {
  const info = s?.details.find((d) => d.typeUrl === "type.googleapis.com/google.rpc.ErrorInfo");
  return info ? ErrorInfo.decode(info.value).reason : "";
}

/** nats.js errors (by name) that mean the store is out of reach for now, not that the request is wrong. */
const NATS_UNREACHABLE = new Set(["TimeoutError", "NoResponders", "RequestError", "ConnectionError", "ClosedConnectionError", "DrainingConnectionError"]);

/** Whether `err` is nats.js saying the store is out of reach (toServiceError makes it UNAVAILABLE). */
export const isStoreUnreachable = (err: unknown) => err instanceof Error && NATS_UNREACHABLE.has(err.name);

/**
 * Turns any thrown value into the ServiceError grpc-js sends: NATS out of reach (e.g. while a managed
 * nats-server restarts) becomes UNAVAILABLE, which clients retry; other unknown errors become INTERNAL.
 */
export function toServiceError(err: unknown): Partial<ServiceError> {
  const e =
    err instanceof ApiError
      ? err
      : err instanceof Error && NATS_UNREACHABLE.has(err.name)
        ? new ApiError(status.UNAVAILABLE, "STORE_UNAVAILABLE", `the job store (NATS) is unreachable; retry: ${err.message}`)
        : new ApiError(status.INTERNAL, "INTERNAL", `internal error: ${err instanceof Error ? err.message : String(err)}`);
  const details = [errorInfo(e.reason, e.metadata)];
  if (e.violations.length > 0) {
    details.push({
      typeUrl: "type.googleapis.com/google.rpc.BadRequest",
      value: Buffer.from(BadRequest.encode(BadRequest.fromPartial({ fieldViolations: e.violations })).finish()),
    });
  }
  const metadata = new Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(Status.encode({ code: e.code, message: e.message, details }).finish()));
  return { code: e.code, details: e.message, metadata };
}

// ---- InferenceService errors (server/src/infer) -------------------------------------------------

export const invalidInferRequest = (violations: FieldViolation[]) =>
  invalidRequest("INVALID_INFER_REQUEST", "invalid inference request", violations);

/** Rethrows `err`, as INVALID_ARGUMENT on base_model when the engine refused a base model file leading out of the data roots. */
export function rethrowModelOutsideRoots(err: unknown): never {
  if (err instanceof ModelOutsideRoots) throw invalidInferRequest([{ field: "base_model", description: err.message }]);
  throw err;
}

export const loraNotFound = (field: string, message: string) =>
  new ApiError(status.NOT_FOUND, "LORA_NOT_FOUND", `${field}: ${message}`, [], { field });

/** An Infer base model that is not there: a path the client gave, or a name (with its own message). */
export const modelNotFound = (baseModel: string, message = `base_model: no diffusers model (model_index.json) at ${baseModel}`) =>
  new ApiError(status.NOT_FOUND, "MODEL_NOT_FOUND", message, [], { base_model: baseModel });

/** A LoRA that does not fit the base model (made for another one); `layer` names the first bad layer. */
export const loraMismatch = (field: string, layer: string, message: string) =>
  new ApiError(status.FAILED_PRECONDITION, "LORA_MISMATCH", `${field}: ${message}`, [], { field, layer });

export const inferQueueFull = (maxQueued: number) =>
  new ApiError(status.RESOURCE_EXHAUSTED, "INFER_QUEUE_FULL", `${maxQueued} inference requests are already waiting; retry later`);

/** An Infer request whose single image needs more working memory than the server's budget. */
export const inferTooLarge = (what: string, bytes: number, budget: number) =>
  new ApiError(
    status.RESOURCE_EXHAUSTED,
    "INFER_TOO_LARGE",
    `${what} needs about ${Math.ceil(bytes / 2 ** 20)} MiB of working memory for one image, more than this server allows a request ` +
      `(${Math.floor(budget / 2 ** 20)} MiB, LORAFORGE_INFER_MEMORY_MB); ask for a smaller width and height`,
    [],
    { bytes: String(bytes), limit: String(budget) },
  );

export const inferCancelled = () => new ApiError(status.CANCELLED, "CANCELLED", "the request was cancelled");

/** A LoRA file that is not well-formed safetensors, or not a usable LoRA. */
export const invalidLora = (field: string, message: string) =>
  new ApiError(status.INVALID_ARGUMENT, "INVALID_LORA", `${field}: ${message}`, [{ field, description: message }], { field });

/** A LoRA file larger than the LoRA cache's whole byte budget. */
export const loraTooLarge = (field: string, bytes: number, limit: number) =>
  new ApiError(
    status.RESOURCE_EXHAUSTED,
    "LORA_TOO_LARGE",
    `${field}: the LoRA needs ${bytes} bytes (as float32), more than this server's LoRA cache holds (${limit} bytes, LORAFORGE_INFER_LORA_CACHE_MB)`,
    [],
    { field, bytes: String(bytes), limit: String(limit) },
  );

// ---- TrainerService: request ids ---------------------------------------------------------------

/** AIP-155: a request id already used by a Train with a different spec. */
export const requestIdReused = (requestId: string, jobId: string) =>
  new ApiError(
    status.ALREADY_EXISTS,
    "REQUEST_ID_REUSED",
    `request_id ${JSON.stringify(requestId.slice(0, 128))} was already used for a different spec (job ${jobId}); use a new request_id for a new job`,
    [],
    { request_id: requestId.slice(0, 128), job_id: jobId },
  );

// ---- DatasetService errors (server/src/jobs/datasets.ts) ----------------------------------------

export const datasetQuotaExceeded = (usedBytes: number, wanted: number, limit: number) =>
  new ApiError(
    status.RESOURCE_EXHAUSTED,
    "DATASET_QUOTA_EXCEEDED",
    `stored data sets take ${usedBytes} bytes and this upload ${wanted} more, over the server's quota of ${limit} bytes ` +
      "(LORAFORGE_DATASETS_MAX_MB); DeleteDataset frees space",
    [],
    { used_bytes: String(usedBytes), limit_bytes: String(limit) },
  );

export const datasetNotFound = (id: string) =>
  new ApiError(status.NOT_FOUND, "DATASET_NOT_FOUND", `no uploaded data set has id ${JSON.stringify(id)}`, [], { dataset_id: id });

export const datasetInUse = (id: string, jobId: string) =>
  new ApiError(status.FAILED_PRECONDITION, "DATASET_IN_USE", `data set ${id} is used by job ${jobId}, which is not finished; cancel it or wait`, [], {
    dataset_id: id,
    job_id: jobId,
  });
