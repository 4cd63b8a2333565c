// decideOutcome (server/src/jobs/job-run.ts): how the engine's end maps to the job's next state. Here the exit
// code of a data-parallel run whose rank died (engine/loraforge_engine/distributed.py): retried while attempts
// remain, with the engine's own account as the message, and failed after the last attempt.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { JobState } from "@loraforge/sdk/gen/loraforge/v1/job";
import { ENGINE_EXIT } from "@loraforge/server/jobs/engine";
import { decideOutcome } from "@loraforge/server/jobs/job-run";

const said = "rank 1 of 2 (pid 42) was killed by SIGKILL; the other ranks were stopped, and a retry resumes from the last checkpoint";
const report = { lastErrorLog: said, error: { code: 14, message: said, details: [] } };

describe("decideOutcome for a lost rank (engine exit 5)", () => {
  it("retries while attempts remain, saying what the engine said", () => {
    const out = decideOutcome({ code: ENGINE_EXIT.RANK_LOST, signal: null, stderrTail: [] }, report, null, 1, 3);
    assert.equal(out.state, JobState.JOB_STATE_RUNNING);
    assert.equal(out.error?.code, 14); // UNAVAILABLE
    assert.equal(out.error?.message, said);
    // The ErrorInfo detail, packed: its reason is in its bytes.
    assert.match(Buffer.from(out.error!.details[0].value).toString("latin1"), /ENGINE_RANK_LOST/);
  });
  it("fails after the last attempt", () => {
    const out = decideOutcome({ code: ENGINE_EXIT.RANK_LOST, signal: null, stderrTail: [] }, report, null, 3, 3);
    assert.equal(out.state, JobState.JOB_STATE_FAILED);
    assert.equal(out.error?.message, `${said} (gave up after 3 attempts)`);
  });
  it("leaves an ordinary failure final", () => {
    const out = decideOutcome({ code: ENGINE_EXIT.FAILED, signal: null, stderrTail: [] }, { lastErrorLog: "training failed: x" }, null, 1, 3);
    assert.equal(out.state, JobState.JOB_STATE_FAILED);
  });
});
