// Workers that say what they can run: `loraforge serve` whose worker advertises 1000 MiB per device
// (LORAFORGE_WORKER_DEVICE_MEMORY_MB; kind and count detected by the engine), and a `loraforge
// worker` with more memory started later. A job no live worker can run stays QUEUED with the reason
// in GetJob, ListJobs, the CLI and the dashboard's API; jobs that fit run meanwhile; a job that fits
// a busy worker says so; the job runs once a worker that fits appears, and its reason is gone.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { DeviceKind, errorMessage, JobState, stateName, type JobEvent } from "@loraforge/sdk";
import {
  CLI,
  collect,
  fixtures,
  natsCredentials,
  quickSpec,
  startServer,
  startWorker,
  until,
  type Fixtures,
  type ServerProcess,
  type WorkerProcess,
} from "./lib/harness.js";

const states = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "state" ? [stateName(e.payload.state.state)] : []));
const NO_WORKER = /^no worker can run this job: /;

describe("worker capabilities", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  let worker: WorkerProcess | undefined;

  before(async () => {
    f = fixtures();
    // Kind and count detected by the engine (the harness's default of a CPU worker taken off).
    srv = await startServer({ env: { LORAFORGE_WORKER_DEVICE_KIND: "", LORAFORGE_WORKER_DEVICE_MEMORY_MB: "1000" } });
  });
  after(async () => {
    await worker?.stop();
    await srv?.stop();
  });

  it("a job no worker can run waits with the reason, fitting jobs are not held up, and a worker that fits runs it", async (t) => {
    const c = srv.client;
    const big = await c.train(quickSpec(f, { minDeviceMemoryMb: 4000, maxTrainSteps: 2, checkpointingSteps: 100 }));
    // Once serve's worker has announced itself (the engine tells it the kind and count):
    await until(async () => /live workers: 1 \(cpu × \d+, 1000 MiB\)$/.test((await c.getJob(big.id)).queuedReason), 120_000, "serve's worker in the reason");
    const reason = (await c.getJob(big.id)).queuedReason;
    assert.match(reason, /^no worker can run this job: it needs 1 device with ≥ 4000 MiB; live workers: 1 \(cpu × \d+, 1000 MiB\)$/);
    const cuda = await c.train(quickSpec(f, { deviceKind: DeviceKind.DEVICE_KIND_CUDA, maxTrainSteps: 1 }));
    assert.match(cuda.job.queuedReason, /^no worker can run this job: it needs 1 CUDA device; live workers: 1 \(cpu × \d+, 1000 MiB\)$/, "Train's answer says why");

    // Submitted behind both, a job that fits runs on serve's worker.
    const small = await c.train(quickSpec(f, { maxTrainSteps: 3, checkpointingSteps: 100 }));
    await until(async () => (await c.getJob(small.id)).state !== JobState.JOB_STATE_QUEUED, 120_000, "the fitting job to start");
    // While it runs, another job that fits waits for a free worker, not for one that can run it.
    const next = await c.train(quickSpec(f, { maxTrainSteps: 1 }));
    const seen = new Set<string>();
    await until(async () => {
      const j = await c.getJob(next.id);
      seen.add(j.queuedReason);
      return j.state !== JobState.JOB_STATE_QUEUED || j.queuedReason !== "";
    }, 60_000, "the second fitting job's reason");
    t.diagnostic(`reasons seen while the first fitting job ran: ${JSON.stringify([...seen])}`);
    assert.ok(![...seen].some((r) => NO_WORKER.test(r)), [...seen].join(" | "));
    if ((await c.getJob(small.id)).state === JobState.JOB_STATE_RUNNING)
      assert.ok(seen.has("waiting for a free worker: the one live worker that can run it is busy"), [...seen].join(" | "));
    for (const h of [small, next]) {
      const done = await h.result();
      assert.equal(done.state, JobState.JOB_STATE_SUCCEEDED, errorMessage(done));
      assert.equal(done.queuedReason, "");
    }

    // Still waiting, in ListJobs, the CLI and the dashboard too.
    assert.equal((await c.getJob(big.id)).state, JobState.JOB_STATE_QUEUED);
    const listed = (await c.listJobs({ state: JobState.JOB_STATE_QUEUED })).jobs;
    assert.deepEqual(listed.map((j) => j.id).sort(), [big.id, cuda.id].sort());
    assert.ok(listed.every((j) => NO_WORKER.test(j.queuedReason)), JSON.stringify(listed.map((j) => j.queuedReason)));
    const cli = spawnSync(process.execPath, [CLI, "jobs", "--state", "queued", "--address", srv.address], { encoding: "utf8" });
    assert.equal(cli.status, 0, cli.stderr);
    assert.match(cli.stdout, new RegExp(`^${big.id} .*  no worker can run this job: it needs 1 device with ≥ 4000 MiB;`, "m"));
    const dash = (p: string) => fetch(new URL(p, srv.dashboardUrl)).then((r) => r.json());
    const summary = ((await dash("api/jobs")) as { jobs: { id: string; queuedReason: string }[] }).jobs.find((j) => j.id === big.id);
    assert.match(summary?.queuedReason ?? "", /needs 1 device with ≥ 4000 MiB/);
    assert.match(((await dash(`api/jobs/${big.id}`)) as { queuedReason: string }).queuedReason, /needs 1 device with ≥ 4000 MiB/);

    // A worker with enough memory appears: the job runs there, started once (its many declines
    // by serve's worker changed nothing), and no longer has a reason.
    const c2 = natsCredentials(srv.stateDir);
    worker = await startWorker(srv.natsUrl, {
      env: { LORAFORGE_NATS_USER: c2.user, LORAFORGE_NATS_PASSWORD: c2.pass, LORAFORGE_WORKER_DEVICE_KIND: "cpu", LORAFORGE_WORKER_DEVICES: "1", LORAFORGE_WORKER_DEVICE_MEMORY_MB: "8000" },
    });
    const events = await collect(big.progress());
    assert.deepEqual(states(events), ["QUEUED", "RUNNING", "SUCCEEDED"]);
    assert.ok(!events.some((e) => e.payload?.$case === "log" && /attempt \d+/.test(e.payload.log.message)), "started once");
    const done = await c.getJob(big.id);
    assert.equal(done.state, JobState.JOB_STATE_SUCCEEDED, errorMessage(done));
    assert.equal(done.queuedReason, "");
    assert.ok(existsSync(path.join(worker.stateDir, "jobs", big.id)), "it ran on the worker that fits");

    // The CUDA job still waits, now with both workers named; cancelled, it stops waiting.
    await until(async () => /live workers: 2 \(/.test((await c.getJob(cuda.id)).queuedReason), 30_000, "both workers in the reason");
    assert.match((await c.getJob(cuda.id)).queuedReason, /^no worker can run this job: it needs 1 CUDA device; live workers: 2 \(/);
    const cancelled = await c.cancelJob(cuda.id);
    assert.equal(cancelled.state, JobState.JOB_STATE_CANCELLED);
    assert.equal((await c.getJob(cuda.id)).queuedReason, "");
  });

  it("a worker with a malformed override refuses to start and says why", async () => {
    const r = spawnSync(process.execPath, [CLI, "worker", "--nats", srv.natsUrl], { encoding: "utf8", env: { ...process.env, LORAFORGE_WORKER_DEVICES: "two" } });
    assert.equal(r.status, 1);
    assert.match(r.stderr, /LORAFORGE_WORKER_DEVICES must be a whole number ≥ 1, got "two"/);
  });
});
