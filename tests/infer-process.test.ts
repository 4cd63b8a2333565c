// Infer in its own supervised process (issue 17): onnxruntime runs in a child of `loraforge serve`,
// so that a kill -9 or an out-of-memory there fails only the requests it was rendering (UNAVAILABLE
// INFER_PROCESS_LOST) and leaves the API, the worker and a training job alone; a large request has
// the process retired once idle (its memory back to the system); and the process dies with serve.
import assert from "node:assert/strict";
import { cpSync, readFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { status } from "@grpc/grpc-js";
import { JobState, LoraforgeError, UnavailableError, type InferInput } from "@loraforge/sdk";
import { fixtures, inferProcess, onnxExport, procStatusBytes, quickSpec, startServer, tmpDir, until, type Fixtures, type ServerProcess } from "./lib/harness.js";

const alive = (pid: number) => {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
};

/** User + system CPU ticks of `pid` so far. */
const cpuTicks = (pid: number) => {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return Number(fields[11]) + Number(fields[12]);
};


describe("the Infer process", () => {
  // Tiny-model estimates (memory.ts, guidance on): 64 px ≈ 195 MiB, 128 px ≈ 217 MiB, 256 px ≈ 483 MiB;
  // only 256 px is above the recycling threshold.
  const RECYCLE_MB = 300;
  let f: Fixtures;
  let srv: ServerProcess;

  before(async () => {
    f = fixtures();
    const stateDir = tmpDir("infer-process");
    cpSync(onnxExport(f), path.join(stateDir, "onnx"), { recursive: true });
    srv = await startServer({
      stateDir,
      args: ["--data-root", f.root],
      env: { LORAFORGE_INFER_RECYCLE_MB: String(RECYCLE_MB), LORAFORGE_DASHBOARD_ADDRESS: "off" },
    });
  });

  after(async () => {
    await srv?.stop();
  });

  const infer = (req: Partial<InferInput>) => srv.client.infer({ baseModel: f.model, prompt: "a red circle", numInferenceSteps: 1, width: 64, height: 64, ...req } as InferInput);

  it("kill -9 of it mid-request: that request is UNAVAILABLE INFER_PROCESS_LOST, the next one renders, a training job succeeds", async () => {
    const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 40, checkpointingSteps: 20 }));
    for await (const ev of job.progress()) if (ev.payload?.$case === "metrics") break; // the engine is training

    await infer({}); // starts the Infer process and opens the model
    const victim = inferProcess(srv.proc.pid!);
    assert.ok(victim, "an Infer process runs, as a child of serve");
    assert.notEqual(victim, srv.proc.pid);
    const mapsOnnxruntime = (pid: number) => /onnxruntime/.test(readFileSync(`/proc/${pid}/maps`, "utf8"));
    assert.ok(mapsOnnxruntime(victim), "onnxruntime runs in the Infer process");
    assert.ok(!mapsOnnxruntime(srv.proc.pid!), "and is not even loaded in serve");
    // When memory runs out anyway, the kernel's OOM killer picks it before serve or a training engine.
    assert.equal(readFileSync(`/proc/${victim}/oom_score_adj`, "utf8").trim(), "500");
    const idle = cpuTicks(victim);
    let caught: unknown;
    const long = infer({ width: 128, height: 128, numInferenceSteps: 150 }).catch((e) => (caught = e));
    await until(() => cpuTicks(victim) > idle + 5, 60_000, "the Infer process to render");
    process.kill(victim, "SIGKILL");
    await long;
    assert.ok(caught instanceof UnavailableError, `expected UNAVAILABLE, got ${caught}`);
    assert.equal(caught.code, status.UNAVAILABLE);
    assert.equal(caught.reason, "INFER_PROCESS_LOST", caught.message);
    assert.match(caught.message, /SIGKILL/);
    assert.notEqual((await job.refresh()).state, JobState.JOB_STATE_FAILED, "the training job is unharmed");

    // A new process serves the next request, and the API answers as before.
    const res = await infer({ seed: 3 });
    assert.equal(res.images.length, 1);
    const next = inferProcess(srv.proc.pid!);
    assert.ok(next && next !== victim, "a new Infer process");
    assert.ok((await srv.client.listModels()).baseModels.length > 0);
    assert.equal((await job.result()).state, JobState.JOB_STATE_SUCCEEDED);
    assert.ok(srv.stderr.join("").includes("the Infer process died"), "the log says it died");
  });

  it("retires the process after a request above LORAFORGE_INFER_RECYCLE_MB, returning its memory", async () => {
    await infer({});
    const small = inferProcess(srv.proc.pid!)!;
    await infer({ seed: 2 });
    assert.equal(inferProcess(srv.proc.pid!), small, "a request below the threshold keeps the process");

    await infer({ width: 256, height: 256, seed: 4 });
    await until(() => !alive(small), 30_000, "the retired Infer process to exit");
    const logged = /retiring the Infer process after a large request.* pid=(\d+) rssMiB=(\d+)/.exec(srv.stderr.join(""));
    assert.ok(logged, "the log says it was retired");
    assert.equal(Number(logged[1]), small);
    const retiredRss = Number(logged[2]) * 2 ** 20;

    // A fresh process, with the model open again, serves the next request with far less memory held.
    const res = await infer({ seed: 5 });
    assert.equal(res.images.length, 1);
    const fresh = inferProcess(srv.proc.pid!)!;
    assert.ok(fresh && fresh !== small, "a fresh Infer process");
    const freshRss = procStatusBytes(fresh, "VmRSS");
    assert.ok(freshRss + 100 * 2 ** 20 < retiredRss, `fresh ${(freshRss / 2 ** 20).toFixed(0)} MiB, retired ${(retiredRss / 2 ** 20).toFixed(0)} MiB`);
  });

  it("stops with serve: SIGTERM while it renders exits cleanly, and kill -9 of serve leaves no Infer process", async () => {
    await infer({});
    const child = inferProcess(srv.proc.pid!)!;
    const idle = cpuTicks(child);
    // Longer than serve's 5 s grace for calls in flight: it is cut short, not waited for.
    const long = infer({ width: 256, height: 256, numInferenceSteps: 150 }).then(() => null, (e: unknown) => e);
    await until(() => cpuTicks(child) > idle + 5, 60_000, "the Infer process to render");
    assert.equal(await srv.stop(), 0, "serve exits 0");
    await until(() => !alive(child), 30_000, "the Infer process to exit with serve");
    const outcome = await long;
    // Rendered within the grace on a fast host, else cut short with an error: either way it ends.
    assert.ok(outcome === null || outcome instanceof LoraforgeError, `the request in flight ends cleanly: ${outcome}`);

    const stateDir = tmpDir("infer-process-kill");
    cpSync(onnxExport(f), path.join(stateDir, "onnx"), { recursive: true });
    const second = await startServer({ stateDir, args: ["--data-root", f.root], env: { LORAFORGE_DASHBOARD_ADDRESS: "off" } });
    try {
      await second.client.infer({ baseModel: f.model, prompt: "a red circle", numInferenceSteps: 1, width: 64, height: 64 });
      const orphan = inferProcess(second.proc.pid!)!;
      assert.ok(orphan);
      second.proc.kill("SIGKILL");
      await until(() => !alive(orphan), 30_000, "the Infer process to exit after its parent was killed");
    } finally {
      await second.stop();
    }
  });
});
