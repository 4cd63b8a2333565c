// The managed nats-server that `loraforge serve` starts is supervised: kill -9 of it mid-job is
// survived (restarted on the same port and store, the job completes, events replay without gaps,
// health goes NOT_SERVING and back); when it cannot be restarted serve exits non-zero; and it
// never outlives a serve that was kill -9'd.
import assert from "node:assert/strict";
import { chmodSync, copyFileSync, rmSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { credentials, makeClientConstructor, status, type ClientReadableStream } from "@grpc/grpc-js";
import { service as healthService } from "grpc-health-check";
import { LoraforgeError, stateName, UnavailableError, type JobEvent } from "@loraforge/sdk";
import { findNatsServer } from "@loraforge/server/core/nats-managed";
import { collect, fixtures, processesMatching, quickSpec, startServer, tmpDir, until } from "./lib/harness.js";

const states = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "state" ? [stateName(e.payload.state.state)] : []));
const metricSteps = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "metrics" ? [e.payload.metrics.step] : []));
const natsOf = (stateDir: string) => processesMatching(`-sd ${path.join(stateDir, "nats")}`);
const watchdogOf = (natsPid: number) => processesMatching(`loraforge-nats-watchdog ${natsPid}$`);

/** Every overall status grpc.health.v1.Health/Watch reports, in order, until `stop()`. */
function watchHealth(address: string): { seen: string[]; stop(): void } {
  const Health = makeClientConstructor(healthService as never, "grpc.health.v1.Health");
  const client = new Health(address, credentials.createInsecure()) as unknown as {
    watch(req: { service: string }): ClientReadableStream<{ status: string }>;
    close(): void;
  };
  const seen: string[] = [];
  const call = client.watch({ service: "" });
  call.on("data", (r: { status: string }) => seen.push(r.status));
  call.on("error", () => {});
  return {
    seen,
    stop() {
      call.cancel();
      client.close();
    },
  };
}

describe("the managed nats-server is supervised", () => {
  it("kill -9 of it mid-job: restarted, the job succeeds, events replay gap-free, health dips and recovers", async () => {
    const f = fixtures();
    const srv = await startServer({ env: { LORAFORGE_DASHBOARD_ADDRESS: "off" } });
    const health = watchHealth(srv.address);
    try {
      await until(() => health.seen.at(-1) === "SERVING", 10_000, "health SERVING");
      const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 12, checkpointingSteps: 4 }));
      for await (const ev of job.progress()) if (ev.payload?.$case === "metrics" && ev.payload.metrics.step >= 2) break;

      const [first] = natsOf(srv.stateDir);
      assert.ok(first, "the managed nats-server runs");
      assert.equal(watchdogOf(first).length, 1, "a watchdog guards it");
      process.kill(first, "SIGKILL");

      await until(() => natsOf(srv.stateDir).some((p) => p !== first), 30_000, "a new nats-server");
      const [second] = natsOf(srv.stateDir);
      assert.notEqual(second, first);
      await until(() => srv.stderr.join("").includes("managed nats-server restarted"), 10_000, "the restart's log line");
      assert.match(srv.stderr.join(""), /the managed nats-server died; restarting it/);
      await until(() => watchdogOf(second).length === 1, 10_000, "a watchdog for the new nats-server");
      assert.deepEqual(watchdogOf(first), [], "the old watchdog is gone");

      // The whole history, read after the outage from the restarted server's store.
      const events = await collect(job.progress());
      assert.deepEqual(events.map((e) => e.sequence), events.map((_, i) => i + 1), "sequences 1..n without gaps");
      assert.equal(states(events).at(-1), "SUCCEEDED");
      assert.deepEqual(metricSteps(events), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
      assert.equal(stateName((await srv.client.getJob(job.id)).state), "SUCCEEDED");

      await until(() => health.seen.at(-1) === "SERVING", 30_000, "health SERVING again");
      const down = health.seen.indexOf("NOT_SERVING");
      assert.ok(down > 0, `health went NOT_SERVING during the outage: ${health.seen.join(", ")}`);
      assert.ok(health.seen.slice(down).includes("SERVING"), `and back to SERVING: ${health.seen.join(", ")}`);
      assert.ok((await srv.client.listJobs({})).jobs.some((j) => j.id === job.id));
    } finally {
      health.stop();
      assert.equal(await srv.stop(), 0);
    }
    assert.deepEqual(natsOf(srv.stateDir), [], "SIGTERM stops the restarted nats-server");
  });

  it("while it does not answer, RPCs that need it fail UNAVAILABLE STORE_UNAVAILABLE (which clients retry), not INTERNAL", async () => {
    const srv = await startServer({ env: { LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_WORKER: "0" } });
    const [pid] = natsOf(srv.stateDir);
    assert.ok(pid, "the managed nats-server runs");
    const job = await srv.client.train(quickSpec(fixtures()));
    // Frozen, not dead: the connection stays up and the store's requests time out.
    process.kill(pid, "SIGSTOP");
    try {
      for (const call of [() => srv.client.listJobs({}), () => srv.client.getJob(job.id)]) {
        const err = await call().then(
          () => assert.fail("answered while the store is frozen"),
          (e: unknown) => e,
        );
        assert.ok(err instanceof LoraforgeError, `a LoraforgeError, got ${err}`);
        assert.equal(status[err.code], "UNAVAILABLE", err.message);
        assert.equal(err.reason, "STORE_UNAVAILABLE", err.message);
        assert.ok(err instanceof UnavailableError, "the SDK's class for errors worth retrying");
        assert.doesNotMatch(err.message, /\n\s+at /, "no stack trace in the answer");
      }
    } finally {
      process.kill(pid, "SIGCONT");
    }
    assert.equal((await srv.client.getJob(job.id)).id, job.id, "answers again once it does");
    assert.equal(await srv.stop(), 0);
  });

  it("when it cannot be restarted, serve exits non-zero with a clear error instead of running headless", async () => {
    // A copy of nats-server that can be taken away.
    const bin = path.join(tmpDir("nats-bin"), "nats-server");
    copyFileSync(findNatsServer(), bin);
    chmodSync(bin, 0o755);
    const srv = await startServer({ env: { LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_WORKER: "0", LORAFORGE_NATS_SERVER: bin } });
    const [pid] = natsOf(srv.stateDir);
    assert.ok(pid);
    rmSync(bin);
    process.kill(pid, "SIGKILL");
    const code = await new Promise<number | null>((resolve) => srv.proc.once("exit", (c) => resolve(c)));
    srv.client.close();
    assert.notEqual(code, 0);
    assert.match(srv.stderr.join(""), /could not be restarted/);
    assert.deepEqual(natsOf(srv.stateDir), []);
  });

  it("kill -9 of serve: its nats-server exits on its own within seconds", async () => {
    const srv = await startServer({ env: { LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_WORKER: "0" } });
    const [nats] = natsOf(srv.stateDir);
    assert.ok(nats, "the managed nats-server runs");
    srv.client.close();
    srv.proc.kill("SIGKILL");
    await new Promise((r) => srv.proc.once("exit", r));
    await until(() => natsOf(srv.stateDir).length === 0, 15_000, "the orphaned nats-server to exit");
    await until(() => watchdogOf(nats).length === 0, 5_000, "its watchdog to exit");
  });
});
