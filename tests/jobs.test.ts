// Jobs on JetStream across processes: an external nats-server, an API server without
// a worker, and separate `loraforge worker` processes, each with its own state folder
// (so a resumed job really comes back through the artifact store).
import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { connect } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { ManagedNats, freePort } from "@loraforge/server/core/nats-managed";
import { stateName, type JobEvent } from "@loraforge/sdk";
import {
  collect,
  download,
  fixtures,
  processesMatching,
  python,
  quickSpec,
  startServer,
  startWorker,
  tmpDir,
  until,
  type Fixtures,
  type ServerProcess,
  type WorkerProcess,
} from "./lib/harness.js";

const ACK_WAIT = { LORAFORGE_ACK_WAIT_MS: "3000" };
const states = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "state" ? [stateName(e.payload.state.state)] : []));
const metricSteps = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "metrics" ? [e.payload.metrics.step] : []));
const assertGapless = (evs: JobEvent[]) => assert.deepEqual(evs.map((e) => e.sequence), evs.map((_, i) => i + 1));

describe("jobs across workers", () => {
  let f: Fixtures;
  let nats: ManagedNats;
  let monitorPort: number;
  let natsDir: string;
  let natsPort: number;
  let api: ServerProcess;
  const workers: WorkerProcess[] = [];

  before(async () => {
    f = fixtures();
    natsDir = tmpDir("nats");
    natsPort = await freePort();
    monitorPort = await freePort();
    nats = await ManagedNats.start(natsDir, natsPort, ["-m", String(monitorPort)]);
    api = await startServer({ args: ["--no-worker", "--nats", nats.url], env: ACK_WAIT });
    workers.push(await startWorker(nats.url, { env: ACK_WAIT }), await startWorker(nats.url, { env: ACK_WAIT }));
  });
  after(async () => {
    for (const w of workers) await w.stop("SIGKILL");
    await api?.stop();
    await nats?.stop();
  });

  it("two workers racing for one job: exactly one runs it", async () => {
    const job = await api.client.train(quickSpec(f, { maxTrainSteps: 3, checkpointingSteps: 100 }));
    const events = await collect(job.progress());
    assertGapless(events);
    assert.deepEqual(states(events), ["QUEUED", "RUNNING", "SUCCEEDED"]);
    assert.deepEqual(metricSteps(events), [1, 2, 3]);
    // Started exactly once: one RUNNING (above), and only one worker ever made the job's output folder.
    const ran = workers.filter((w) => existsSync(path.join(w.stateDir, "jobs", job.id)));
    assert.equal(ran.length, 1, `the job ran on ${ran.length} workers`);
  });

  it("kill -9 of the worker mid-job: another worker resumes from the checkpoint and finishes", async () => {
    const job = await api.client.train(quickSpec(f, { maxTrainSteps: 14, checkpointingSteps: 4 }));
    let ckptStep = 0;
    for await (const ev of job.progress()) {
      if (ev.payload?.$case === "checkpoint") ckptStep = ev.payload.checkpoint.step;
      if (ev.payload?.$case === "metrics" && ckptStep > 0 && ev.payload.metrics.step >= ckptStep + 2) break;
    }
    // The worker running it is the one whose state folder the engine writes to (who runs a job is
    // the server's business, not part of the Job).
    const victim = workers.find((w) => processesMatching(path.join(w.stateDir, "jobs", job.id)).length > 0);
    assert.ok(victim, "the job's engine runs under one of our workers");
    await victim.stop("SIGKILL");
    workers.splice(workers.indexOf(victim), 1);
    workers.push(await startWorker(nats.url, { env: ACK_WAIT }));
    // The orphaned engine notices its parent died and stops.
    await until(() => processesMatching(path.join(victim.stateDir, "jobs", job.id)).length === 0, 60_000, "orphaned engine to exit");

    const events = await collect(job.progress());
    assertGapless(events);
    const s = states(events);
    assert.equal(s[0], "QUEUED");
    assert.equal(s.at(-1), "SUCCEEDED");
    assert.equal(s.filter((x) => x === "RUNNING").length, 2, "started twice");
    const steps = metricSteps(events);
    const resumedAt = steps.findIndex((st, i) => i > 0 && st <= steps[i - 1]);
    assert.ok(resumedAt > 0, `steps restart after the kill: ${steps}`);
    const lastBefore = steps[resumedAt - 1];
    const firstAfter = steps[resumedAt];
    assert.ok(lastBefore - (firstAfter - 1) <= 4, `lost ${lastBefore - firstAfter + 1} steps, more than the checkpoint interval`);
    assert.equal((firstAfter - 1) % 4, 0, `resumed right after a checkpoint, not at step ${firstAfter}`);
    assert.equal(steps.at(-1), 14);
    const rec = await job.refresh();
    // Started twice: the killed worker's run and the one that finished it, on another worker.
    const finisher = workers.filter((w) => existsSync(path.join(w.stateDir, "jobs", job.id)));
    assert.equal(finisher.length, 1, "one live worker finished it");
    assert.notEqual(finisher[0], victim);
    const lora = rec.artifacts.find((a) => a.name === `jobs/${job.id}/lora/pytorch_lora_weights.safetensors`)!;
    assert.ok(lora, JSON.stringify(rec.artifacts.map((a) => a.name)));
    const effect = JSON.parse(python([path.join(import.meta.dirname, "..", "py", "lora_effect.py"), f.model, await download(api.client, lora)]));
    assert.ok(effect.max_diff > 1e-4);
  });

  it("100 concurrent Train calls with one request_id make one job", async () => {
    const spec = quickSpec(f, { maxTrainSteps: 1 });
    const handles = await Promise.all(Array.from({ length: 100 }, () => api.client.train(spec, { requestId: "burst-42" })));
    assert.equal(new Set(handles.map((h) => h.id)).size, 1);
    const all = (await api.client.listJobs({ pageSize: 1000 })).jobs.filter((j) => j.requestId === "burst-42");
    assert.equal(all.length, 1);
    assert.equal(stateName((await handles[0].result()).state), "SUCCEEDED");
  });

  it("50 concurrent progress streams each get the full ordered history; 1000 opened and cancelled leak nothing", async () => {
    const job = await api.client.train(quickSpec(f, { maxTrainSteps: 4 }));
    const streams = await Promise.all(Array.from({ length: 50 }, () => collect(job.progress())));
    for (const evs of streams) {
      assertGapless(evs);
      assert.equal(states(evs).at(-1), "SUCCEEDED");
      assert.equal(evs.length, streams[0].length);
    }

    const nc = await connect({ servers: nats.url });
    const jsm = await jetstreamManager(nc);
    const consumers = async () => (await jsm.streams.info("LORAFORGE_EVENTS")).state.consumer_count;
    const subs = async () => {
      const res = await fetch(`http://127.0.0.1:${monitorPort}/connz?subs=1`);
      const body = (await res.json()) as { connections: { name?: string; subscriptions: number }[] };
      return body.connections.filter((c) => c.name === "loraforge").reduce((a, c) => a + c.subscriptions, 0);
    };
    const baseConsumers = await consumers();
    const baseSubs = await subs();
    assert.equal(baseConsumers, 0, "finished streams leave no consumer behind");
    for (let batch = 0; batch < 10; batch++) {
      await Promise.all(
        Array.from({ length: 100 }, async () => {
          const ac = new AbortController();
          const it = job.progress({ signal: ac.signal });
          await it.next(); // the stream is open and has delivered
          ac.abort();
          await it.return(undefined);
        }),
      );
    }
    await until(async () => (await consumers()) <= baseConsumers && (await subs()) <= baseSubs, 30_000, "consumers and subscriptions to go back");
    await nc.close();
  });

  it("a nats-server restart mid-job: every progress client gets every event exactly once, in order", async () => {
    const job = await api.client.train(quickSpec(f, { maxTrainSteps: 10, checkpointingSteps: 5 }));
    const clients = [0, 1, 2].map(() => collect(job.progress()));
    for await (const ev of job.progress()) if (ev.payload?.$case === "metrics" && ev.payload.metrics.step >= 2) break;
    await nats.stop();
    await new Promise((r) => setTimeout(r, 1500));
    nats = await ManagedNats.start(natsDir, natsPort, ["-m", String(monitorPort)]);
    const results = await Promise.all(clients);
    for (const evs of results) {
      assertGapless(evs);
      assert.equal(states(evs).at(-1), "SUCCEEDED");
      assert.deepEqual(evs.map((e) => e.sequence), results[0].map((e) => e.sequence));
    }
    assert.deepEqual(metricSteps(results[0]), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  });
  // Last: it leaves one worker, the restarted one.
  it("kill -9 between a checkpoint's save and its upload: the next attempt on that host announces it before resuming from it", async () => {
    const job = await api.client.train(quickSpec(f, { maxTrainSteps: 200, checkpointingSteps: 4 }));
    for await (const ev of job.progress()) if (ev.payload?.$case === "checkpoint") break;
    const victim = workers.find((w) => processesMatching(path.join(w.stateDir, "jobs", job.id)).length > 0)!;
    assert.ok(victim, "the job's engine runs under one of our workers");
    // Only the victim's host may take the job up again: its left-behind checkpoints are what is tested.
    for (const w of workers.filter((x) => x !== victim)) await w.stop();
    workers.splice(0, workers.length);
    // Frozen, the worker uploads nothing while its engine goes on saving checkpoints.
    victim.proc.kill("SIGSTOP");
    const ckpts = path.join(victim.stateDir, "jobs", job.id, "checkpoints");
    const onDisk = () => readdirSync(ckpts).flatMap((n) => (/^checkpoint-(\d+)$/.exec(n) ? [Number(n.slice(11))] : []));
    const announced = (await job.refresh()).artifacts.filter((a) => a.name.includes("/checkpoint-")).map((a) => a.step);
    await until(() => onDisk().some((s) => s > Math.max(...announced)), 60_000, "a checkpoint saved while the worker is frozen");
    await victim.stop("SIGKILL");
    await until(() => processesMatching(path.join(victim.stateDir, "jobs", job.id)).length === 0, 60_000, "orphaned engine to exit");
    const left = onDisk().filter((s) => s > Math.max(...announced));
    assert.ok(left.length > 0);

    workers.push(await startWorker(nats.url, { stateDir: victim.stateDir, env: ACK_WAIT }));
    const events = await collect(job.progress());
    assertGapless(events);
    assert.equal(states(events).at(-1), "SUCCEEDED");
    // The second attempt: its checkpoint events before its first step name every left-behind checkpoint.
    const running = events.flatMap((e, i) => (e.payload?.$case === "state" && stateName(e.payload.state.state) === "RUNNING" ? [i] : []));
    assert.equal(running.length, 2, "started twice");
    const second = running[1];
    const firstStep = events.findIndex((e, i) => i > second && e.payload?.$case === "metrics");
    const early = events.slice(second, firstStep).flatMap((e) => (e.payload?.$case === "checkpoint" ? [e.payload.checkpoint.step] : []));
    assert.deepEqual(early, left.sort((a, b) => a - b));
    const resumed = events[firstStep].payload?.$case === "metrics" ? events[firstStep].payload.metrics.step : -1;
    assert.equal(resumed, Math.max(...left) + 1, "resumed right after the newest checkpoint, which the job now lists");
    const rec = await job.refresh();
    for (const step of left) assert.ok(rec.artifacts.some((a) => a.name === `jobs/${job.id}/checkpoint-${step}/`), `checkpoint-${step} is stored`);
  });
});
