// A bounded queue in front of the renderer: `concurrency` requests run, at most `maxQueued` wait
// (first come, first served), more are refused at once rather than held in memory.
import { inferCancelled, inferQueueFull } from "../core/errors.js";

export class Semaphore {
  private running = 0;
  private readonly waiting: { grant: () => boolean }[] = [];
  private idleWaiters: (() => void)[] = [];
  private closed = false;

  constructor(
    private readonly concurrency: number,
    private readonly maxQueued: number,
  ) {}

  /** Waits for a free slot; resolves with its release function. */
  acquire(cancelled: () => boolean): Promise<() => void> {
    const release = () => {
      this.running--;
      this.next();
    };
    if (this.running < this.concurrency && this.waiting.length === 0) {
      this.running++;
      return Promise.resolve(release);
    }
    if (this.waiting.length >= this.maxQueued || this.closed) return Promise.reject(inferQueueFull(this.maxQueued));
    return new Promise((resolve, reject) => {
      this.waiting.push({
        grant: () => {
          if (cancelled()) {
            reject(inferCancelled());
            return false;
          }
          this.running++;
          resolve(release);
          return true;
        },
      });
    });
  }

  private next(): void {
    while (this.running < this.concurrency && this.waiting.length > 0) {
      this.waiting.shift()!.grant();
    }
    if (this.running === 0 && this.waiting.length === 0) {
      for (const w of this.idleWaiters) w();
      this.idleWaiters = [];
    }
  }

  /** Requests running or waiting. */
  get busy(): number {
    return this.running + this.waiting.length;
  }

  /** Refuses new waiters from now on. */
  close(): void {
    this.closed = true;
  }

  /** Resolves when nothing runs or waits. */
  idle(): Promise<void> {
    if (this.running === 0 && this.waiting.length === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }
}
