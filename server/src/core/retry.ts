// One retry loop for NATS operations that fail for a few seconds and then work again: a managed
// nats-server restarting, a reconnect, a cluster electing a new leader after losing a node.

export interface RetryOptions {
  /** Give up (rethrow the last error) once this long has passed. Default one minute. */
  forMs?: number;
  /** Pause between attempts. Default 500 ms. */
  pauseMs?: number;
  /** Errors that retrying cannot mend are rethrown at once (default: every error is retried). */
  retryable?: (err: unknown) => boolean;
  /** Called before each pause, e.g. to log the failed attempt. */
  onRetry?: (err: unknown, attempt: number) => void;
}

/** Runs `fn` until it succeeds, for up to `forMs`. */
export async function retryFor<T>(fn: () => Promise<T>, opts: RetryOptions = {}): Promise<T> {
  const deadline = Date.now() + (opts.forMs ?? 60_000);
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if ((opts.retryable && !opts.retryable(err)) || Date.now() >= deadline) throw err;
      opts.onRetry?.(err, attempt);
      await new Promise((r) => setTimeout(r, opts.pauseMs ?? 500));
    }
  }
}
