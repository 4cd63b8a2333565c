// One trace from Train to completion: the server runs in this process with an
// in-memory span exporter; the trace crosses NATS (queue message headers) to the
// worker and reaches the engine as TRACEPARENT.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { context, propagation, trace } from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { createClient, stateName } from "@loraforge/sdk";
import { fixtures, processesMatching, PYTHON, quickSpec, REPO, tmpDir } from "./lib/harness.js";

describe("telemetry", () => {
  it("one trace spans Train → queue → worker → engine → artifact uploads → completion", async () => {
    const exporter = new InMemorySpanExporter();
    trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }));
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
    propagation.setGlobalPropagator(new W3CTraceContextPropagator());
    const { configFromEnv, startServer } = await import("@loraforge/server/server");

    const f = fixtures();
    const server = await startServer({
      ...configFromEnv({}),
      address: "127.0.0.1:0",
      stateDir: tmpDir("otel"),
      python: process.env.LORAFORGE_PYTHON ?? PYTHON,
      engineDir: process.env.LORAFORGE_ENGINE_DIR ?? `${REPO}/engine`,
      dashboardAddress: undefined,
    });
    const client = createClient({ address: server.address });
    try {
      const job = await client.train(quickSpec(f, { maxTrainSteps: 4, checkpointingSteps: 2 }));
      let traceparent = "";
      for await (const ev of job.progress()) {
        if (!traceparent && ev.payload?.$case === "metrics") {
          const pid = processesMatching(job.id)[0];
          if (pid) traceparent = readFileSync(`/proc/${pid}/environ`, "utf8").split("\0").find((v) => v.startsWith("TRACEPARENT=")) ?? "";
        }
      }
      assert.equal(stateName((await job.refresh()).state), "SUCCEEDED");

      const spans = exporter.getFinishedSpans();
      const train = spans.find((s) => s.name === "loraforge.v1.TrainerService/Train");
      assert.ok(train, `a Train span among ${spans.map((s) => s.name).join(", ")}`);
      const traceId = train.spanContext().traceId;
      const inTrace = spans.filter((s) => s.spanContext().traceId === traceId);
      const names = new Set(inTrace.map((s) => s.name));
      for (const n of ["queue wait", "job run", "engine", "artifact upload"]) assert.ok(names.has(n), `${n} is in the Train trace: ${[...names].join(", ")}`);
      const byId = new Map(inTrace.map((s) => [s.spanContext().spanId, s]));
      const parentOf = (name: string) => byId.get(inTrace.find((s) => s.name === name)!.parentSpanContext?.spanId ?? "")?.name;
      assert.equal(parentOf("job run"), "loraforge.v1.TrainerService/Train");
      assert.equal(parentOf("queue wait"), "loraforge.v1.TrainerService/Train");
      assert.equal(parentOf("engine"), "job run");
      assert.match(traceparent, new RegExp(`^TRACEPARENT=00-${traceId}-[0-9a-f]{16}-0[01]$`), "the engine runs inside the trace");
    } finally {
      client.close();
      await server.close();
    }
  });
});
