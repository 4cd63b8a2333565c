// The dashboard's HTTP API over Jobs:
//   GET  /api/jobs                         the newest jobs (JSON)
//   GET  /api/jobs/events                  the same list as server-sent events, pushed when it changes
//   GET  /api/jobs/:id                     one job (proto3 JSON of Job)
//   GET  /api/jobs/:id/events?after=N      the job's events as server-sent events: `id: <sequence>`,
//                                          `data: <proto3 JSON of JobEvent>`; history, then live; ends
//                                          with `event: end` after the final state. Last-Event-ID wins
//                                          over ?after= (that is how EventSource resumes).
//   GET  /api/artifacts?name=NAME          an artifact's bytes by its name, as Job.artifacts lists it
//                                          ("jobs/<id>/lora/<file>", …; a checkpoint as a .tar)
//   POST /api/jobs/:id/cancel              cancels the job (needs the header X-Loraforge-Dashboard: 1)
import { artifactFileName, artifactJobId, errorMessage, stateName } from "@loraforge/sdk";
import { status } from "@grpc/grpc-js";
import type { IncomingMessage, ServerResponse } from "node:http";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { ArtifactKind, Job, JobEvent, JobState } from "@loraforge/sdk/gen/loraforge/v1/job";
import { protoJson } from "../api/contract.js";
import { ApiError } from "../core/errors.js";
import type { Jobs } from "../jobs/jobs.js";
import { log } from "../core/log.js";
import { isFinal } from "../jobs/store.js";

/** How many jobs the list shows (newest first). */
export const LIST_SIZE = 100;
/** How often the shared job-list poller reads the job records while someone watches. */
export const LIST_POLL_MS = 1000;
/** A comment line this often keeps idle event streams open through proxies. */
const HEARTBEAT_MS = 15_000;


/** What the job list shows of a job. */
export interface JobSummary {
  id: string;
  state: string;
  currentStep: number;
  totalSteps: number;
  createTime: string | null;
  endTime: string | null;
  /** Why it failed or was cancelled (Job.error's message); "" otherwise. */
  error: string;
  /** Why it waits for a worker (Job.queued_reason); "" otherwise. */
  queuedReason: string;
  validationPrompt: string;
}

export function summarize(job: Job): JobSummary {
  return {
    id: job.id,
    state: stateName(job.state),
    currentStep: job.currentStep,
    totalSteps: job.totalSteps,
    createTime: job.createTime?.toISOString() ?? null,
    endTime: job.endTime?.toISOString() ?? null,
    error: errorMessage(job),
    queuedReason: job.queuedReason,
    validationPrompt: job.spec?.validationPrompt ?? "",
  };
}

export function sendJson(res: ServerResponse, code: number, body: unknown): void {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(code, { "content-type": "application/json; charset=utf-8", "content-length": data.length, "cache-control": "no-store" });
  res.end(data);
}

const HTTP_STATUS: Partial<Record<status, number>> = {
  [status.INVALID_ARGUMENT]: 400,
  [status.NOT_FOUND]: 404,
  [status.FAILED_PRECONDITION]: 409,
  [status.ALREADY_EXISTS]: 409,
  [status.PERMISSION_DENIED]: 403,
  [status.UNAUTHENTICATED]: 401,
  [status.UNAVAILABLE]: 503,
};

function sendError(res: ServerResponse, err: unknown): void {
  if (err instanceof ApiError) return sendJson(res, HTTP_STATUS[err.code] ?? 500, { error: err.reason, message: err.message });
  throw err;
}

/**
 * One poller for every open job-list stream: reads the list every LIST_POLL_MS
 * while anyone listens and tells the listeners when it changed.
 */
export class JobListFeed {
  private readonly listeners = new Set<(json: string) => void>();
  private last: string | null = null;
  private timer: NodeJS.Timeout | null = null;
  private polling = false;

  constructor(private readonly jobs: Jobs) {}

  /** Calls `fn` with the current list (as JSON) now, if known, and on every change; returns the unsubscribe. */
  subscribe(fn: (json: string) => void): () => void {
    this.listeners.add(fn);
    if (this.last !== null) fn(this.last);
    if (!this.timer) {
      void this.poll();
      this.timer = setInterval(() => void this.poll(), LIST_POLL_MS);
    }
    return () => {
      this.listeners.delete(fn);
      if (this.listeners.size === 0) this.stop();
    };
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.last = null;
  }

  private async poll(): Promise<void> {
    if (this.polling) return; // a slow read is still going: skip this tick
    this.polling = true;
    try {
      const { jobs } = await this.jobs.list({ state: JobState.JOB_STATE_UNSPECIFIED, pageSize: LIST_SIZE, pageToken: "" });
      const json = JSON.stringify(jobs.map(summarize));
      if (json !== this.last && this.timer) {
        this.last = json;
        for (const fn of this.listeners) fn(json);
      }
    } catch (err) {
      log("warn", "dashboard: listing jobs failed", { error: err instanceof Error ? err.message : String(err) });
    } finally {
      this.polling = false;
    }
  }
}

function startEventStream(res: ServerResponse): void {
  res.writeHead(200, {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-store, no-transform",
    connection: "keep-alive",
    "x-accel-buffering": "no", // nginx: do not buffer the stream
  });
  // How long EventSource waits before reconnecting after the connection drops.
  res.write("retry: 2000\n\n");
}

/** Resolves when the client has gone (or `signal` aborts); returns the AbortSignal for both. */
function streamSignal(res: ServerResponse, closing: AbortSignal): AbortSignal {
  const ac = new AbortController();
  res.on("close", () => ac.abort());
  closing.addEventListener("abort", () => ac.abort(), { once: true });
  return ac.signal;
}

function heartbeat(res: ServerResponse): () => void {
  const t = setInterval(() => res.write(": keep-alive\n\n"), HEARTBEAT_MS);
  return () => clearInterval(t);
}

async function jobListStream(feed: JobListFeed, res: ServerResponse, closing: AbortSignal): Promise<void> {
  startEventStream(res);
  const signal = streamSignal(res, closing);
  const stopBeat = heartbeat(res);
  const unsubscribe = feed.subscribe((json) => res.write(`event: jobs\ndata: ${json}\n\n`));
  await new Promise<void>((resolve) => (signal.aborted ? resolve() : signal.addEventListener("abort", () => resolve(), { once: true })));
  unsubscribe();
  stopBeat();
  res.end();
}

async function jobEventStream(jobs: Jobs, jobId: string, req: IncomingMessage, res: ServerResponse, url: URL, closing: AbortSignal): Promise<void> {
  const raw = (req.headers["last-event-id"] as string | undefined) ?? url.searchParams.get("after") ?? "0";
  const after = Number(raw || "0");
  if (!Number.isSafeInteger(after) || after < 0)
    return sendJson(res, 400, { error: "INVALID_AFTER", message: `after / Last-Event-ID must be a sequence number ≥ 0, got ${JSON.stringify(raw)}` });
  const job = await jobs.get(jobId);
  if (isFinal(job.state) && after >= job.lastSequence) {
    // Nothing more will ever come; 204 tells EventSource not to reconnect.
    res.writeHead(204);
    res.end();
    return;
  }
  startEventStream(res);
  const signal = streamSignal(res, closing);
  const stopBeat = heartbeat(res);
  try {
    for await (const ev of jobs.follow(jobId, after, signal)) {
      res.write(`id: ${ev.sequence}\ndata: ${JSON.stringify(protoJson(JobEvent, "loraforge.v1.JobEvent", ev))}\n\n`);
    }
    if (!signal.aborted) res.write("event: end\ndata: {}\n\n");
  } catch (err) {
    // The browser reconnects with Last-Event-ID and misses nothing.
    log("warn", "dashboard: event stream broke off", { job: jobId, error: err instanceof Error ? err.message : String(err) });
  } finally {
    stopBeat();
    res.end();
  }
}

/** A file name safe for Content-Disposition. */
const safeName = (s: string) => s.replace(/[^A-Za-z0-9._-]+/g, "_");

async function artifactDownload(jobs: Jobs, res: ServerResponse, url: URL): Promise<void> {
  const name = url.searchParams.get("name") ?? "";
  const { artifact, bytes } = await jobs.artifact(name);
  // Saved as "<job id>-<file>": a LoRA or checkpoint from two jobs do not collide in one folder.
  const fileName = safeName(`${artifactJobId(name)}-${artifactFileName(name)}`);
  const headers: Record<string, string | number> = { "cache-control": "private, max-age=86400, immutable" };
  if (artifact.kind === ArtifactKind.ARTIFACT_KIND_VALIDATION_IMAGE) {
    headers["content-type"] = "image/png";
    headers["content-length"] = artifact.sizeBytes;
  } else if (artifact.kind === ArtifactKind.ARTIFACT_KIND_CHECKPOINT) {
    headers["content-type"] = "application/x-tar";
    headers["content-disposition"] = `attachment; filename="${fileName}"`;
  } else {
    headers["content-type"] = "application/octet-stream";
    headers["content-length"] = artifact.sizeBytes;
    headers["content-disposition"] = `attachment; filename="${fileName}"`;
  }
  res.writeHead(200, headers);
  try {
    await pipeline(Readable.from(bytes), res);
  } catch (err) {
    log("warn", "dashboard: artifact download broke off", { artifact: name, error: err instanceof Error ? err.message : String(err) });
    res.destroy();
  }
}

export async function handleApi(jobs: Jobs, feed: JobListFeed, req: IncomingMessage, res: ServerResponse, url: URL, closing: AbortSignal): Promise<void> {
  // "/api/jobs/ID/events" → ["jobs", "ID", "events"]
  const parts = url.pathname.split("/").slice(2).map((p) => {
    try {
      return decodeURIComponent(p);
    } catch {
      return "\0"; // matches no job id
    }
  });
  const [root, jobId = "", sub, ...rest] = parts;
  const method = req.method ?? "GET";
  let path = "?";
  if (root === "artifacts" && parts.length === 1) path = "artifacts";
  else if (root === "jobs" && rest.length === 0) {
    if (parts.length === 1) path = "jobs";
    else if (jobId === "events" && sub === undefined) path = "jobs/events";
    else path = sub === undefined ? "jobs/:id" : `jobs/:id/${sub}`;
  }
  const route = `${method} ${path}`;
  try {
    switch (route) {
      case "GET jobs": {
        const { jobs: list } = await jobs.list({ state: JobState.JOB_STATE_UNSPECIFIED, pageSize: LIST_SIZE, pageToken: "" });
        return sendJson(res, 200, { jobs: list.map(summarize) });
      }
      case "GET jobs/events":
        return await jobListStream(feed, res, closing);
      case "GET jobs/:id":
        return sendJson(res, 200, protoJson(Job, "loraforge.v1.Job", await jobs.get(jobId)));
      case "GET jobs/:id/events":
        return await jobEventStream(jobs, jobId, req, res, url, closing);
      case "GET artifacts":
        return await artifactDownload(jobs, res, url);
      case "POST jobs/:id/cancel": {
        // A custom header cannot be sent cross-site without a CORS preflight, which
        // this server never grants: another web page cannot cancel jobs.
        if (req.headers["x-loraforge-dashboard"] !== "1")
          return sendJson(res, 403, { error: "MISSING_HEADER", message: "POST needs the header X-Loraforge-Dashboard: 1" });
        req.resume();
        const job = await jobs.cancel(jobId, "cancelled from the dashboard");
        log("info", "dashboard: job cancel requested", { job: jobId });
        return sendJson(res, 200, summarize(job));
      }
      default:
        return sendJson(res, method === "GET" || method === "POST" ? 404 : 405, {
          error: "NOT_FOUND",
          message: `no such API route: ${method} ${url.pathname}`,
        });
    }
  } catch (err) {
    if (res.headersSent) throw err;
    sendError(res, err);
  }
}
