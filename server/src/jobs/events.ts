// A job's event stream as one writer sees it: events numbered 1, 2, 3, … without gaps, each
// published after everything emitted before it (and after the work it announces, such as an
// artifact's upload), retried until stored.
import { JobEvent } from "@loraforge/sdk/gen/loraforge/v1/job";
import { log } from "../core/log.js";
import type { JobStore } from "./store.js";

type Payload = NonNullable<JobEvent["payload"]>;

/** Publishes one job's events in order, numbering them without gaps. */
export class JobEventPublisher {
  private chain: Promise<void> = Promise.resolve();

  constructor(
    private readonly store: JobStore,
    readonly jobId: string,
    private seq: number,
  ) {}

  get lastSequence(): number {
    return this.seq;
  }

  /**
   * Numbers and publishes an event after everything emitted before it; `before`
   * (e.g. uploading the artifact the event announces) runs first, in that order.
   */
  emit(payload: Payload, time = new Date(), before?: () => Promise<Payload>): JobEvent {
    const ev = JobEvent.fromPartial({ jobId: this.jobId, sequence: ++this.seq, time, payload });
    this.chain = this.chain.then(async () => {
      if (before) {
        try {
          ev.payload = await before();
        } catch (err) {
          // The event still goes out (without the stored copy) so the sequence has no gap.
          log("error", "preparing an event failed", { job: this.jobId, seq: ev.sequence, err: String(err) });
        }
      }
      // Events are the job's history: retry until stored (e.g. while NATS restarts);
      // the message id makes a retry that did reach the stream a no-op.
      for (let attempt = 0; ; attempt++) {
        try {
          await this.store.publishEvent(ev);
          return;
        } catch (err) {
          if (attempt % 10 === 0) log("warn", "publishing an event failed; retrying", { job: this.jobId, seq: ev.sequence, err: String(err) });
          await new Promise((r) => setTimeout(r, 500));
        }
      }
    });
    return ev;
  }

  /** Resolves when every event emitted so far is stored. */
  async flush(): Promise<void> {
    await this.chain;
  }
}
