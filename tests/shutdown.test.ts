// SIGTERM: the server stops accepting work, stops the running job (engine gone),
// flushes NATS, stops its managed nats-server and exits 0; the record survives.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ArtifactKind, errorMessage, stateName } from "@loraforge/sdk";
import { fixtures, processesMatching, quickSpec, startServer } from "./lib/harness.js";

describe("loraforge serve on SIGTERM", () => {
  it("cancels running jobs cleanly, exits 0, and the job's record is kept", async () => {
    const f = fixtures();
    const srv = await startServer();
    const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 100000, checkpointingSteps: 100000 }));
    for await (const ev of job.progress()) if (ev.payload?.$case === "metrics") break;
    assert.ok(processesMatching(job.id).length > 0);
    assert.ok(processesMatching(`${srv.stateDir}/nats`).length > 0, "managed nats-server runs");

    const code = await srv.stop();
    assert.equal(code, 0);
    assert.deepEqual(processesMatching(job.id), [], "engine process is gone");
    assert.deepEqual(processesMatching(`${srv.stateDir}/nats`), [], "managed nats-server is gone");

    const again = await startServer({ stateDir: srv.stateDir });
    try {
      const rec = await again.client.getJob(job.id);
      assert.equal(stateName(rec.state), "CANCELLED");
      assert.match(errorMessage(rec), /shut down/);
      assert.ok(
        rec.artifacts.some((a) => a.kind === ArtifactKind.ARTIFACT_KIND_CHECKPOINT && a.name.startsWith(`jobs/${job.id}/checkpoint-`)),
        "a checkpoint was saved before stopping",
      );
    } finally {
      assert.equal(await again.stop(), 0);
    }
  });
});
