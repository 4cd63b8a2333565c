// Typed errors: every failed call becomes a LoraforgeError (or a subclass named after
// the server's machine-readable reason), with the original gRPC error as `cause`. A
// job's own `error` is the same google.rpc.Status, so it converts the same way.
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { BadRequest, ErrorInfo } from "./gen/google/rpc/error_details.js";
import { Status } from "./gen/google/rpc/status.js";

/** One bad field of a request, as reported by the server. */
export interface FieldViolation {
  /** Path of the field, e.g. "spec.rank". */
  field: string;
  /** What is wrong with it. */
  description: string;
}

/** Any error from a loraforge server. */
export class LoraforgeError extends Error {
  /** The gRPC status code, e.g. `status.NOT_FOUND` (5). */
  readonly code: status;
  /** The machine-readable reason from google.rpc.ErrorInfo, e.g. "JOB_NOT_FOUND"; "" if the server sent none. */
  readonly reason: string;
  /** ErrorInfo metadata, e.g. `{ job_id: "job-…" }`. */
  readonly metadata: Record<string, string>;
  /** Bad request fields (google.rpc.BadRequest); empty when none. */
  readonly violations: FieldViolation[];

  constructor(message: string, init: { code: status; reason: string; metadata: Record<string, string>; violations: FieldViolation[]; cause?: unknown }) {
    super(message, { cause: init.cause });
    this.name = new.target.name;
    this.code = init.code;
    this.reason = init.reason;
    this.metadata = init.metadata;
    this.violations = init.violations;
  }
}

/** The training spec was refused (INVALID_ARGUMENT, reason INVALID_SPEC); `violations` names every bad field. */
export class InvalidSpecError extends LoraforgeError {}
/** The job does not exist (NOT_FOUND, reason JOB_NOT_FOUND). */
export class JobNotFoundError extends LoraforgeError {}
/** The job is already final and cannot be cancelled (FAILED_PRECONDITION, reason JOB_ALREADY_FINAL). */
export class JobAlreadyFinalError extends LoraforgeError {}
/** The server cannot be reached or is shutting down (UNAVAILABLE); safe to retry. */
export class UnavailableError extends LoraforgeError {}

const BY_REASON: Record<string, typeof LoraforgeError> = {
  INVALID_SPEC: InvalidSpecError,
  JOB_NOT_FOUND: JobNotFoundError,
  JOB_ALREADY_FINAL: JobAlreadyFinalError,
};

/** The reason, metadata and field violations carried in a Status's details. */
function decodeDetails(s: Status): { reason: string; metadata: Record<string, string>; violations: FieldViolation[] } {
  let reason = "";
  let metadata: Record<string, string> = {};
  const violations: FieldViolation[] = [];
  for (const any of s.details) {
    try {
      if (any.typeUrl.endsWith("/google.rpc.ErrorInfo")) {
        const info = ErrorInfo.decode(any.value);
        reason = info.reason;
        metadata = info.metadata;
      } else if (any.typeUrl.endsWith("/google.rpc.BadRequest")) {
        violations.push(...BadRequest.decode(any.value).fieldViolations.map((v) => ({ field: v.field, description: v.description })));
      }
    } catch {
      // an undecodable detail: skip it, keep the rest
    }
  }
  return { reason, metadata, violations };
}

/**
 * A google.rpc.Status — a job's `error`, a StateChanged's `error` — as a LoraforgeError (the
 * subclass its reason names), with the reason, metadata and violations from its details.
 */
export function errorFromStatus(s: Status, cause?: unknown): LoraforgeError {
  const d = decodeDetails(s);
  const Cls = BY_REASON[d.reason] ?? (s.code === status.UNAVAILABLE ? UnavailableError : LoraforgeError);
  return new Cls(s.message || status[s.code] || `error ${s.code}`, { code: s.code, ...d, cause });
}

/**
 * Why a job failed or was cancelled, in readable words: the message of its `error` (a
 * google.rpc.Status), or of a Status itself; "" when there is none.
 *
 * @example
 * const done = await job.result();
 * if (done.state === JobState.JOB_STATE_FAILED) console.error(errorMessage(done));
 */
export function errorMessage(from: { error?: Status | undefined } | Status | undefined | null): string {
  const s = from && "code" in from && "details" in from ? from : (from as { error?: Status } | undefined | null)?.error;
  if (!s) return "";
  return s.message || (s.code ? status[s.code] ?? `error ${s.code}` : "");
}

/** Converts a grpc-js error into the matching LoraforgeError; other values pass through. */
export function fromGrpcError(err: unknown): unknown {
  if (!err || typeof err !== "object" || !("code" in err) || err instanceof LoraforgeError) return err;
  const e = err as ServiceError;
  let details: Status = { code: e.code, message: e.details || e.message, details: [] };
  const raw = e.metadata instanceof Metadata ? e.metadata.get("grpc-status-details-bin")[0] : undefined;
  if (raw instanceof Buffer) {
    try {
      details = { ...details, details: Status.decode(raw).details };
    } catch {
      // undecodable details: keep code and message
    }
  }
  return errorFromStatus(details, err);
}
