// Base models by name through a real server and real workers: the tiny model linked into a models
// folder as "models/tiny" trains, renders the same images as its folder, is listed by ListModels
// without any host path, and a worker that lacks it (or holds another model under that name)
// fails the job with a reason instead of training on something else.
import assert from "node:assert/strict";
import { appendFileSync, cpSync, symlinkSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { errorFromStatus, errorMessage, JobState, LoraforgeError, type InferInput } from "@loraforge/sdk";
import { ListModelsResponse } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { Job } from "@loraforge/sdk/gen/loraforge/v1/job";
import { protoJson } from "@loraforge/server/api/contract";
import {
  assertNoHostPaths,
  fixtures,
  natsCredentials,
  onnxExport,
  quickSpec,
  startServer,
  startWorker,
  tmpDir,
  type Fixtures,
  type ServerProcess,
  type WorkerProcess,
} from "./lib/harness.js";
import { meanAbsDiff, PROMPT, rgb, TOLERANCE } from "./lib/parity.js";

describe("named base models", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  let modelsDir: string;
  let worker: WorkerProcess | null = null;

  before(async () => {
    f = fixtures();
    modelsDir = tmpDir("models");
    symlinkSync(f.model, path.join(modelsDir, "tiny"));
    // A warm export: rendering starts at once instead of exporting for a minute.
    const stateDir = tmpDir("state");
    cpSync(onnxExport(f), path.join(stateDir, "onnx"), { recursive: true });
    // The API server runs no worker: each job runs on a worker with its own models folder.
    srv = await startServer({ stateDir, args: ["--models-dir", modelsDir, "--no-worker"], env: { LORAFORGE_DASHBOARD_ADDRESS: "off" } });
  });

  after(async () => {
    await worker?.stop();
    await srv?.stop();
  });

  const natsEnv = () => {
    const c = natsCredentials(srv.stateDir);
    return { LORAFORGE_NATS_USER: c.user, LORAFORGE_NATS_PASSWORD: c.pass };
  };

  /** Trains `models/tiny` on a fresh worker whose models folder is `dir` (none: its state dir's empty one). */
  async function trainOn(dir: string | undefined) {
    await worker?.stop();
    worker = await startWorker(srv.natsUrl, { env: { ...natsEnv(), ...(dir ? { LORAFORGE_MODELS_DIR: dir } : {}) } });
    const job = await srv.client.train(quickSpec(f, { baseModel: "models/tiny" }));
    return job.result();
  }

  it("trains models/tiny on a worker that has it; one without it, or with another model of that name, fails the job", async () => {
    const missing = await trainOn(undefined);
    assert.equal(missing.state, JobState.JOB_STATE_FAILED);
    const e1 = errorFromStatus(missing.error!);
    assert.equal(e1.reason, "MODEL_NOT_FOUND", errorMessage(missing));
    assert.match(errorMessage(missing), /models\/tiny is not in the models folder of worker host/);

    const other = tmpDir("other-models");
    cpSync(f.model, path.join(other, "tiny"), { recursive: true, dereference: true });
    appendFileSync(path.join(other, "tiny", "scheduler", "scheduler_config.json"), "\n"); // same shape, other content
    const changed = await trainOn(other);
    assert.equal(changed.state, JobState.JOB_STATE_FAILED);
    assert.equal(errorFromStatus(changed.error!).reason, "MODEL_CHANGED", errorMessage(changed));
    assert.match(errorMessage(changed), /is not the model the job was submitted with/);

    const done = await trainOn(modelsDir);
    assert.equal(done.state, JobState.JOB_STATE_SUCCEEDED, errorMessage(done));
    assert.equal(done.spec?.baseModel, "models/tiny", "the job keeps the name");
    assert.match(done.baseModelHash, /^[0-9a-f]{32}$/);
    assertNoHostPaths(protoJson(Job, "loraforge.v1.Job", await srv.client.jobs.get(done.id)), [f.dataset], "GetJob (the data set folder is the client's own)");

    const models = await srv.client.listModels();
    assertNoHostPaths(protoJson(ListModelsResponse, "loraforge.v1.ListModelsResponse", models), [], "ListModels");
    const tiny = models.baseModels.find((m) => m.name === "models/tiny");
    assert.ok(tiny, `ListModels lists models/tiny: ${JSON.stringify(models.baseModels)}`);
    assert.equal(tiny.modelHash, done.baseModelHash, "the hash recorded at submit is the listed model's");
    assert.equal(tiny.path, "", "the deprecated path stays empty");
    assert.equal(tiny.exported, true);
    assert.ok(tiny.nativeSize > 0 && tiny.loraSlots > 0);
    assert.equal(models.baseModels.filter((m) => m.modelHash === tiny.modelHash).length, 1, "one entry per model");
    const lora = models.loras.find((l) => l.jobId === done.id);
    assert.deepEqual([lora?.baseModel, lora?.baseModelHash], ["models/tiny", done.baseModelHash]);
  });

  it("renders the same image by name as by folder", async () => {
    const req = { prompt: PROMPT, numInferenceSteps: 3, seed: 11, width: 64, height: 64 };
    const byPath = await srv.client.infer({ ...req, baseModel: f.model } as InferInput);
    const byName = await srv.client.infer({ ...req, baseModel: "models/tiny" } as InferInput);
    assert.equal(byName.modelHash, byPath.modelHash);
    const diff = meanAbsDiff(await rgb(Buffer.from(byName.images[0].png)), await rgb(Buffer.from(byPath.images[0].png)));
    assert.ok(diff <= TOLERANCE, `mean abs diff ${diff}`);
  });

  it("refuses an unknown or malformed name with a reason", async () => {
    await assert.rejects(srv.client.train(quickSpec(f, { baseModel: "models/nope" })), (e: LoraforgeError) => {
      assert.equal(e.reason, "INVALID_SPEC");
      assert.deepEqual(e.violations.map((v) => v.field), ["spec.base_model"]);
      assert.match(e.violations[0].description, /no model named "models\/nope" in the server's models folder/);
      return true;
    });
    await assert.rejects(srv.client.infer({ prompt: "x", baseModel: "models/nope" } as InferInput), (e: LoraforgeError) => {
      assert.equal(e.reason, "MODEL_NOT_FOUND");
      assertNoHostPaths({ message: e.message, metadata: e.metadata }, [], "the error");
      return true;
    });
    for (const bad of ["models/../tiny", "models/Tiny", "models/"]) {
      await assert.rejects(srv.client.infer({ prompt: "x", baseModel: bad } as InferInput), (e: LoraforgeError) => {
        assert.deepEqual(e.violations.map((v) => v.field), ["base_model"], bad);
        assert.match(e.violations[0].description, /a model name is models\/<name>/);
        return true;
      });
    }
  });
});
