// Job events straight from the NATS bus, for services that prefer it to gRPC:
// the same typed JobEvents, from the stream LORAFORGE_EVENTS on the subjects
// loraforge.v1.jobs.<job_id>.<kind>.
import { connect, type ConnectionOptions, type NatsConnection } from "@nats-io/transport-node";
import { DeliverPolicy, jetstream } from "@nats-io/jetstream";
import { JobEvent } from "./gen/loraforge/v1/job.js";

/** The kinds of event, as the last token of their subject. */
export type EventKind = "state" | "metrics" | "checkpoint" | "validation" | "log" | "dataset";

/** Options of {@link subscribe}. */
export interface SubscribeOptions {
  /** NATS server URL(s), e.g. "nats://127.0.0.1:4222", or an open connection to use. Required. */
  nats: string | string[] | NatsConnection;
  /** Extra connection options (credentials, TLS) when `nats` is a URL. Default: none. */
  connection?: Partial<ConnectionOptions>;
  /** Only this job's events. Default: every job's. */
  jobId?: string;
  /** Only these kinds. Default: all kinds. */
  kinds?: EventKind[];
  /** "new": only events published from now on; "all": the stored history first. Default "new". */
  from?: "new" | "all";
  /** Ends the iteration when aborted. Default: none. */
  signal?: AbortSignal;
}

/**
 * Typed job events from NATS JetStream, in publication order, until `signal` aborts
 * (or you `break`). Survives NATS reconnects without gaps.
 *
 * @example
 * for await (const ev of subscribe({ nats: "nats://127.0.0.1:4222", kinds: ["state"] })) {
 *   if (ev.payload?.$case === "state") console.log(ev.jobId, ev.payload.state.state);
 * }
 */
export async function* subscribe(opts: SubscribeOptions): AsyncGenerator<JobEvent> {
  const own = typeof opts.nats === "string" || Array.isArray(opts.nats);
  const nc = own ? await connect({ servers: opts.nats as string | string[], name: "loraforge-sdk", ...opts.connection }) : (opts.nats as NatsConnection);
  const kinds = opts.kinds && opts.kinds.length > 0 ? new Set(opts.kinds) : null;
  // One filter subject (NATS 2.9 takes one per consumer); other kinds are dropped here.
  const kind = kinds && kinds.size === 1 ? [...kinds][0] : ">";
  const subject = `loraforge.v1.jobs.${opts.jobId ?? "*"}.${kind}`;
  const consumer = await jetstream(nc).consumers.get("LORAFORGE_EVENTS", {
    filter_subjects: subject,
    deliver_policy: opts.from === "all" ? DeliverPolicy.All : DeliverPolicy.New,
  });
  const messages = await consumer.consume();
  const stop = () => messages.stop();
  opts.signal?.addEventListener("abort", stop, { once: true });
  try {
    if (opts.signal?.aborted) return;
    for await (const m of messages) {
      const k = m.subject.slice(m.subject.lastIndexOf(".") + 1) as EventKind;
      if (kinds && !kinds.has(k)) continue;
      yield JobEvent.decode(m.data);
    }
  } finally {
    stop();
    opts.signal?.removeEventListener("abort", stop);
    await consumer.delete().catch(() => {});
    if (own) await nc.close();
  }
}
