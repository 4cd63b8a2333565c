// JetStream is loraforge's queue, state store and event log:
//   - KV bucket `loraforge_jobs`: job records (`jobs.<id>`: the public Job plus the worker-internal
//     attempts and owner, see JobRecord) and idempotency keys (`requests.<sha256 of request_id>`),
//     changed only by compare-and-set;
//   - stream LORAFORGE_QUEUE (work queue): one message per job to run, id = job id; a worker that
//     cannot run a job (capabilities.ts) hands its message back with a delay (nak), so nothing
//     counts deliveries against it (no max_deliver) and the job's record is not touched;
//   - KV bucket `loraforge_workers`: the live workers and their devices (`w.<worker id>`), refreshed
//     every WORKER_HEARTBEAT_MS; an entry not refreshed for WORKER_TTL_MS (a dead worker's) expires;
//   - stream LORAFORGE_EVENTS: every JobEvent on `loraforge.v1.jobs.<id>.<kind>`.
import { createHash } from "node:crypto";
import type { NatsConnection } from "@nats-io/transport-node";
import { headers } from "@nats-io/transport-node";
import {
  AckPolicy,
  DeliverPolicy,
  jetstream,
  jetstreamManager,
  RetentionPolicy,
  StorageType,
  type JetStreamClient,
  type JetStreamManager,
} from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";
import { ApiError } from "../core/errors.js";
import { retryFor } from "../core/retry.js";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { status } from "@grpc/grpc-js";
import { Job, JobEvent, JobState } from "@loraforge/sdk/gen/loraforge/v1/job";
import type { LiveWorker } from "./capabilities.js";

export const JOBS_BUCKET = "loraforge_jobs";
export const EVENTS_STREAM = "LORAFORGE_EVENTS";
export const QUEUE_STREAM = "LORAFORGE_QUEUE";
export const QUEUE_SUBJECT = "loraforge.v1.queue.train";
export const WORKERS_CONSUMER = "workers";
export const WORKERS_BUCKET = "loraforge_workers";
/** How often a worker refreshes its registry entry, and how long an entry lives without that. */
export const WORKER_HEARTBEAT_MS = 10_000;
export const WORKER_TTL_MS = 30_000;
/**
 * Unacked messages the queue consumer may have out at once. Declined jobs (nobody can run them)
 * count here while they wait for redelivery; when the limit is reached the consumer hands out no new
 * message, so it is far above any real backlog (NATS's default is 1000).
 */
export const QUEUE_MAX_ACK_PENDING = 100_000;
export const eventSubject = (jobId: string, kind: string) => `loraforge.v1.jobs.${jobId}.${kind}`;

/** How long a store read that has no timeout of its own may take before the call answers UNAVAILABLE. */
export const STORE_DEADLINE_MS = 10_000;

/** `work`, or UNAVAILABLE STORE_UNAVAILABLE once `ms` have passed (then `abandon` stops the work). */
async function withDeadline<T>(work: Promise<T>, ms: number, abandon: () => void): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      abandon();
      reject(new ApiError(status.UNAVAILABLE, "STORE_UNAVAILABLE", `the job store (NATS) did not answer within ${ms / 1000} s; retry`));
    }, ms);
  });
  work.catch(() => {}); // a failure after the deadline has no one left to hear it
  try {
    return await Promise.race([work, late]);
  } finally {
    clearTimeout(timer);
  }
}

export const FINAL_STATES = new Set([JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED, JobState.JOB_STATE_CANCELLED]);
export const isFinal = (s: JobState) => FINAL_STATES.has(s);

/** States only move forward: QUEUED → RUNNING → CANCELLING → a final state. */
const STATE_RANK: Record<number, number> = {
  [JobState.JOB_STATE_UNSPECIFIED]: 0,
  [JobState.JOB_STATE_QUEUED]: 1,
  [JobState.JOB_STATE_RUNNING]: 2,
  [JobState.JOB_STATE_CANCELLING]: 3,
  [JobState.JOB_STATE_SUCCEEDED]: 4,
  [JobState.JOB_STATE_FAILED]: 4,
  [JobState.JOB_STATE_CANCELLED]: 4,
};

/**
 * What the server keeps about a job: the Job clients see, and beside it what only workers use
 * (fencing): how many times a worker has started the job, and which worker runs it (or ran it
 * last). Only that worker may change a RUNNING job's record; one that finds another owner here
 * has lost the job and stops.
 */
export interface JobRecord {
  job: Job;
  /** Starts so far: 1 on the first run; a job whose worker died, or whose engine was killed, is retried. */
  attempts: number;
  /** The owning worker's id (hostname/pid/random); "" while nobody runs it. */
  worker: string;
}

/** A job record together with the KV revision it was read at (for compare-and-set). */
export interface Versioned extends JobRecord {
  revision: number;
}

/** The stored form: JSON with the Job's wire bytes in base64, so the public message stays the contract's. */
function encodeRecord(rec: JobRecord): Uint8Array {
  const job = Buffer.from(Job.encode(rec.job).finish()).toString("base64");
  return new TextEncoder().encode(JSON.stringify({ job, attempts: rec.attempts, worker: rec.worker }));
}

function decodeRecord(value: Uint8Array): JobRecord {
  // "{" is never the first byte of a Job's encoding (it would be field 15 with wire type 3).
  if (value[0] === 0x7b) {
    const r = JSON.parse(new TextDecoder().decode(value)) as { job: string; attempts: number; worker: string };
    return { job: Job.decode(Buffer.from(r.job, "base64")), attempts: r.attempts, worker: r.worker };
  }
  return legacyRecord(value);
}

/**
 * A record written before the contract moved attempts and the worker out of Job: the bare Job, with
 * attempts (13), worker (14) and the error as text (8) in fields the contract now reserves.
 */
function legacyRecord(value: Uint8Array): JobRecord {
  const rec: JobRecord = { job: Job.decode(value), attempts: 0, worker: "" };
  const r = new BinaryReader(value);
  while (r.pos < r.len) {
    const [field, wireType] = r.tag();
    if (field === 13 && wireType === WireType.Varint) rec.attempts = r.int32();
    else if (field === 14 && wireType === WireType.LengthDelimited) rec.worker = r.string();
    else if (field === 8 && wireType === WireType.LengthDelimited) {
      const message = r.string();
      if (message) rec.job.error ??= { code: status.UNKNOWN, message, details: [] };
    } else r.skip(wireType);
  }
  return rec;
}

/** The kind segment of an event's subject: state, metrics, checkpoint, validation, log or dataset. */
export function eventKind(ev: JobEvent): string {
  return ev.payload?.$case ?? "unknown";
}

export class JobStore {
  private constructor(
    readonly nc: NatsConnection,
    readonly js: JetStreamClient,
    readonly jsm: JetStreamManager,
    readonly kv: KV,
    /** The worker registry (WORKERS_BUCKET). */
    readonly workers: KV,
  ) {}

  /**
   * Connects to (and, first time, creates) the bucket, streams and consumer.
   * `ackWaitMs`: how long a worker may go without an in-progress ack before its
   * job is redelivered to another worker (default 60 s). Workers pass it (and set
   * it on the shared consumer); API servers leave it undefined. `replicas`: copies
   * of every stream, bucket and the queue consumer kept by a NATS cluster (1, or 3
   * in production); used when they are first created.
   */
  static async open(nc: NatsConnection, ackWaitMs?: number, replicas = 1): Promise<JobStore> {
    const jsm = await jetstreamManager(nc);
    await ensureStream(jsm, {
      name: EVENTS_STREAM,
      subjects: ["loraforge.v1.jobs.>"],
      retention: RetentionPolicy.Limits,
      storage: StorageType.File,
      duplicate_window: 120 * 1e9,
      num_replicas: replicas,
    });
    await ensureStream(jsm, {
      name: QUEUE_STREAM,
      subjects: [QUEUE_SUBJECT],
      retention: RetentionPolicy.Workqueue,
      storage: StorageType.File,
      duplicate_window: 120 * 1e9,
      num_replicas: replicas,
    });
    const ackWait = (ackWaitMs ?? 60_000) * 1e6;
    const existing = await jsm.consumers.info(QUEUE_STREAM, WORKERS_CONSUMER).catch(() => null);
    if (!existing) {
      await jsm.consumers.add(QUEUE_STREAM, {
        durable_name: WORKERS_CONSUMER,
        ack_policy: AckPolicy.Explicit,
        deliver_policy: DeliverPolicy.All,
        // A worker that stops sending in-progress acks for this long is presumed dead.
        ack_wait: ackWait,
        max_ack_pending: QUEUE_MAX_ACK_PENDING,
        // Unlimited deliveries: a job declined by workers that cannot run it must never be dropped;
        // retries of a failing job are counted in its record (attempts), not here.
        max_deliver: -1,
        num_replicas: replicas,
      });
    } else if (ackWaitMs !== undefined && (existing.config.ack_wait !== ackWait || (existing.config.max_ack_pending ?? 0) < QUEUE_MAX_ACK_PENDING)) {
      // A queue made by an older version had NATS's default limit of 1000.
      await jsm.consumers.update(QUEUE_STREAM, WORKERS_CONSUMER, { ack_wait: ackWait, max_ack_pending: QUEUE_MAX_ACK_PENDING });
    }
    const kvm = new Kvm(nc);
    const kv = await kvm.create(JOBS_BUCKET, { history: 1, storage: StorageType.File, replicas });
    const workers = await kvm.create(WORKERS_BUCKET, { history: 1, ttl: WORKER_TTL_MS, storage: StorageType.File, replicas });
    return new JobStore(nc, jetstream(nc), jsm, kv, workers);
  }

  /** Puts (or refreshes) a worker's registry entry. */
  async announceWorker(w: LiveWorker): Promise<void> {
    await this.workers.put(workerKey(w.id), new TextEncoder().encode(JSON.stringify(w)));
  }

  /** Removes a stopping worker's entry at once (a dead one's expires after WORKER_TTL_MS). */
  async withdrawWorker(id: string): Promise<void> {
    await this.workers.delete(workerKey(id));
  }

  /** The live workers: those whose entry was refreshed within WORKER_TTL_MS. UNAVAILABLE after `deadlineMs`. */
  async liveWorkers(deadlineMs = STORE_DEADLINE_MS): Promise<LiveWorker[]> {
    const out: LiveWorker[] = [];
    let keys: { stop(): void } | undefined;
    await withDeadline(
      (async () => {
        const iter = await this.workers.keys("w.>");
        keys = iter;
        const names: string[] = [];
        for await (const k of iter) names.push(k);
        for (const k of names) {
          const e = await this.workers.get(k);
          if (e?.operation === "PUT" && e.value.length > 0) out.push(JSON.parse(e.string()) as LiveWorker);
        }
      })(),
      deadlineMs,
      () => keys?.stop(),
    );
    return out;
  }

  async get(jobId: string): Promise<Versioned | null> {
    const e = await this.kv.get(`jobs.${jobId}`);
    if (!e || e.operation !== "PUT") return null;
    return { ...decodeRecord(e.value), revision: e.revision };
  }

  /** A record as a watch delivers it (null for a delete). */
  static decode(value: Uint8Array): JobRecord | null {
    return value.length > 0 ? decodeRecord(value) : null;
  }

  /** Stores a new job (not yet started by any worker); fails if the id exists. */
  async create(job: Job): Promise<Versioned> {
    const rec: JobRecord = { job, attempts: 0, worker: "" };
    const revision = await this.kv.create(`jobs.${job.id}`, encodeRecord(rec));
    return { ...rec, revision };
  }

  /**
   * Compare-and-set: applies `change` to (a copy of) the latest record and writes it only if
   * nobody wrote in between; retries on conflict. `change` returns null to abort.
   */
  async update(jobId: string, change: (rec: JobRecord) => JobRecord | null): Promise<Versioned | null> {
    for (let attempt = 0; ; attempt++) {
      const cur = await retryFor(() => this.get(jobId));
      if (!cur) return null;
      const next = change({ job: Job.fromPartial(cur.job), attempts: cur.attempts, worker: cur.worker });
      if (!next) return null;
      if (STATE_RANK[next.job.state] < STATE_RANK[cur.job.state] || (isFinal(cur.job.state) && next.job.state !== cur.job.state))
        throw new Error(`job ${jobId}: state may not move back from ${JobState[cur.job.state]} to ${JobState[next.job.state]}`);
      try {
        const revision = await this.kv.update(`jobs.${jobId}`, encodeRecord(next), cur.revision);
        return { ...next, revision };
      } catch (err) {
        // A conflict (someone wrote in between) or a connection error: read again.
        if (attempt >= 200) throw err;
        if (attempt >= 3) await new Promise((r) => setTimeout(r, Math.min(50 * attempt, 1000)));
      }
    }
  }

  /** All job ids, newest first (ids sort by creation time). */
  async jobIds(): Promise<string[]> {
    const ids: string[] = [];
    let keys: { stop(): void } | undefined;
    // Listing keys runs a consumer that waits, without a timeout of its own, while the server does
    // not answer; a deadline turns that into UNAVAILABLE, which clients retry.
    await withDeadline(
      (async () => {
        const iter = await this.kv.keys("jobs.*");
        keys = iter;
        for await (const k of iter) ids.push(k.slice("jobs.".length));
      })(),
      STORE_DEADLINE_MS,
      () => keys?.stop(),
    );
    return ids.sort().reverse();
  }

  /**
   * Reserves an idempotency key for `jobId`. Returns the id of the job that holds
   * the key: `jobId` when this call reserved it, an earlier job's id otherwise.
   */
  async reserveRequest(requestId: string, jobId: string): Promise<string> {
    const key = `requests.${createHash("sha256").update(requestId).digest("hex")}`;
    try {
      await this.kv.create(key, new TextEncoder().encode(jobId));
      return jobId;
    } catch {
      const e = await this.kv.get(key);
      if (!e) throw new Error(`idempotency key for request ${requestId} vanished`);
      return e.string();
    }
  }

  /** Publishes one event into the event stream; its id de-duplicates retries. */
  async publishEvent(ev: JobEvent): Promise<void> {
    const h = headers();
    h.set("Loraforge-Job-Id", ev.jobId);
    h.set("Loraforge-Sequence", String(ev.sequence));
    await this.js.publish(eventSubject(ev.jobId, eventKind(ev)), JobEvent.encode(ev).finish(), {
      msgID: `${ev.jobId}.${ev.sequence}`,
      headers: h,
    });
  }

  /**
   * Puts a job on the work queue (message id = job id, so a duplicate is dropped);
   * `trace` entries (W3C traceparent) travel as headers to the worker.
   */
  async enqueue(jobId: string, trace: Record<string, string> = {}): Promise<void> {
    const h = headers();
    for (const [k, v] of Object.entries(trace)) h.set(k, v);
    await this.js.publish(QUEUE_SUBJECT, new TextEncoder().encode(jobId), { msgID: jobId, headers: h });
  }

  /** The number of events stored for a job, which is its last sequence (they are 1..n). */
  async storedEventCount(jobId: string): Promise<number> {
    const info = await this.jsm.streams.info(EVENTS_STREAM, { subjects_filter: `loraforge.v1.jobs.${jobId}.>` });
    return Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
  }
}

/** A worker's registry key: its id with anything a NATS subject token may not hold replaced. */
const workerKey = (id: string) => `w.${id.replace(/[^-/_=a-zA-Z0-9]/g, "_")}`;

async function ensureStream(jsm: JetStreamManager, cfg: Parameters<JetStreamManager["streams"]["add"]>[0]) {
  try {
    await jsm.streams.info(cfg.name);
  } catch {
    await jsm.streams.add(cfg);
  }
}
