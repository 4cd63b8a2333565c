// A data-parallel job through the real server (engine/loraforge_engine/distributed.py): num_devices 2 on CPU
// trains to SUCCEEDED with two gloo ranks, and a rank killed with -9 mid-run makes the worker retry the job,
// which resumes from its checkpoint and finishes.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { stateName, type JobEvent } from "@loraforge/sdk";
import { DeviceKind } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import { collect, fixtures, processesMatching, quickSpec, startServer, until, type Fixtures, type ServerProcess } from "./lib/harness.js";

const states = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "state" ? [stateName(e.payload.state.state)] : []));
const metricSteps = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "metrics" ? [e.payload.metrics.step] : []));
const logs = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "log" ? [e.payload.log.message] : []));

/** The pid of rank `rank` of the job whose output folder is `dir` (ranks read their spec from stdin). */
function rankPid(dir: string, rank: number): number | undefined {
  return processesMatching(`--spec - --output-dir ${dir}`).find((pid) => {
    try {
      return readFileSync(`/proc/${pid}/environ`, "latin1").split("\0").includes(`LORAFORGE_RANK=${rank}`);
    } catch {
      return false;
    }
  });
}

describe("data-parallel jobs (num_devices 2, CPU)", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  before(async () => {
    f = fixtures();
    srv = await startServer();
  });
  after(async () => {
    await srv?.stop();
  });

  it("trains to SUCCEEDED on two ranks and reports the effective batch", async () => {
    const job = await srv.client.train(quickSpec(f, { numDevices: 2, deviceKind: DeviceKind.DEVICE_KIND_CPU, maxTrainSteps: 3 }));
    const events = await collect(job.progress());
    assert.deepEqual(states(events), ["QUEUED", "RUNNING", "SUCCEEDED"]);
    assert.deepEqual(metricSteps(events), [1, 2, 3]); // rank 0's, once each
    assert.ok(logs(events).some((m) => m.startsWith("data parallel: 2 ranks") && m.endsWith("effective batch 2 per device x 2 devices x 1 accumulation = 4")), logs(events).join("\n"));
  });

  it("a rank killed with -9 mid-run: the job is retried from its checkpoint and finishes", async () => {
    const job = await srv.client.train(quickSpec(f, { numDevices: 2, deviceKind: DeviceKind.DEVICE_KIND_CPU, maxTrainSteps: 60, checkpointingSteps: 2 }));
    const dir = path.join(srv.stateDir, "jobs", job.id);
    for await (const ev of job.progress()) if (ev.payload?.$case === "checkpoint") break;
    let victim: number | undefined;
    await until(() => (victim = rankPid(dir, 1)) !== undefined, 30_000, "rank 1 of the job");
    process.kill(victim!, "SIGKILL");
    const events = await collect(job.progress());
    const s = states(events);
    assert.equal(s.at(-1), "SUCCEEDED", JSON.stringify(s));
    assert.equal(s.filter((x) => x === "RUNNING").length, 2, "started twice");
    assert.ok(logs(events).some((m) => /rank 1 of 2 \(pid \d+\) was killed by SIGKILL/.test(m)), logs(events).join("\n"));
    assert.equal(metricSteps(events).at(-1), 60);
  });
});
