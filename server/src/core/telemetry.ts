// Telemetry through @opentelemetry/api only: without an SDK registered every call
// here is a no-op; `otel.ts` registers the SDK when the server starts.
import { stateName } from "@loraforge/sdk";
import {
  context,
  metrics,
  propagation,
  SpanKind,
  SpanStatusCode,
  trace,
  type Attributes,
  type Context,
} from "@opentelemetry/api";
import { JobState, type StepMetrics } from "@loraforge/sdk/gen/loraforge/v1/job";

const tracer = trace.getTracer("loraforge");
const meter = metrics.getMeter("loraforge");
const jobsFinished = meter.createCounter("loraforge.jobs.finished", { description: "Jobs that reached a final state, by state" });
const stepLoss = meter.createHistogram("loraforge.train.loss", { description: "Diffusion loss per optimizer step" });
const imagesPerSecond = meter.createHistogram("loraforge.train.images_per_second", { description: "Training throughput", unit: "{image}/s" });
const stepSeconds = meter.createHistogram("loraforge.train.step_time", { description: "Seconds per optimizer step", unit: "s" });
const peakMemory = meter.createGauge("loraforge.train.peak_memory", { description: "Peak accelerator memory of the running job", unit: "By" });

export const telemetry = {
  /** Runs `fn` inside a span (child of the active one, or of `parent`); records errors. */
  async span<T>(name: string, attributes: Attributes, fn: () => Promise<T>, parent?: Context, kind = SpanKind.INTERNAL): Promise<T> {
    return tracer.startActiveSpan(name, { attributes, kind }, parent ?? context.active(), async (span) => {
      try {
        return await fn();
      } catch (err) {
        span.recordException(err as Error);
        span.setStatus({ code: SpanStatusCode.ERROR, message: String((err as Error)?.message ?? err) });
        throw err;
      } finally {
        span.end();
      }
    });
  },

  /** Records a span that already happened (e.g. the time a job waited in the queue). */
  recordSpan(name: string, start: Date, end: Date, attributes: Attributes, parent: Context): void {
    tracer.startSpan(name, { startTime: start, attributes }, parent).end(end);
  },

  /** The active trace context as carrier entries (W3C `traceparent`, …) for NATS headers. */
  inject(): Record<string, string> {
    const carrier: Record<string, string> = {};
    propagation.inject(context.active(), carrier);
    return carrier;
  },

  /** A context continuing the trace described by carrier entries. */
  extract(carrier: Record<string, string>): Context {
    return propagation.extract(context.active(), carrier);
  },

  /** TRACEPARENT (and TRACESTATE) for the engine's environment. */
  traceEnv(): Record<string, string> {
    const c = telemetry.inject();
    const env: Record<string, string> = {};
    if (c.traceparent) env.TRACEPARENT = c.traceparent;
    if (c.tracestate) env.TRACESTATE = c.tracestate;
    return env;
  },

  recordStep(m: StepMetrics): void {
    stepLoss.record(m.loss);
    if (m.imagesPerSecond > 0) imagesPerSecond.record(m.imagesPerSecond);
    if (m.imagesPerSecond > 0 && m.totalSteps > 0 && m.etaSeconds > 0 && m.totalSteps > m.step)
      stepSeconds.record(m.etaSeconds / (m.totalSteps - m.step));
    if (m.peakMemoryBytes > 0) peakMemory.record(m.peakMemoryBytes);
  },

  /**
   * Observable gauges read when metrics are collected: jobs by state and the
   * number of jobs waiting in (or being worked from) the queue.
   */
  observeJobs(countByState: () => Promise<Record<string, number>>, queueDepth: () => Promise<number>): void {
    meter.createObservableGauge("loraforge.jobs", { description: "Jobs by state" }).addCallback(async (r) => {
      for (const [state, n] of Object.entries(await countByState())) r.observe(n, { state });
    });
    meter.createObservableGauge("loraforge.queue.depth", { description: "Jobs queued or in progress on the work queue" }).addCallback(async (r) => {
      r.observe(await queueDepth());
    });
  },

  jobFinished(state: JobState): void {
    jobsFinished.add(1, { state: stateName(state) });
  },
};
