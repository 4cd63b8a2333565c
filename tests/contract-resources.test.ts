// Named resources instead of host paths: an uploaded data set and a checkpoint are named in a spec
// (dataset_id, resume_from_checkpoint "jobs/<id>/checkpoint-<step>/") and a worker on another host
// — here, `loraforge worker` processes with their own state folders, sharing nothing with the API
// server but NATS — fetches them from the object store into its own cache before it runs the
// engine. The records it writes name artifacts only by their public names.
import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { ArtifactKind, JobState, errorMessage, type JobEvent } from "@loraforge/sdk";
import { protoJson } from "@loraforge/server/api/contract";
import { Job } from "@loraforge/sdk/gen/loraforge/v1/job";
import {
  assertNoHostPaths,
  collect,
  download,
  fixtures,
  natsCredentials,
  quickSpec,
  sha256File,
  startServer,
  startWorker,
  type Fixtures,
  type ServerProcess,
  type WorkerProcess,
} from "./lib/harness.js";

describe("data sets and checkpoints by name, on workers of other hosts", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  let worker: WorkerProcess | null = null;

  before(async () => {
    f = fixtures();
    // The API server runs no worker: every job runs on a worker with a state folder of its own.
    srv = await startServer({ env: { LORAFORGE_WORKER: "0", LORAFORGE_DASHBOARD_ADDRESS: "off" } });
  });

  /** The managed nats-server's credentials, as a worker on another host is given them. */
  const natsEnv = () => {
    const c = natsCredentials(srv.stateDir);
    return { LORAFORGE_NATS_USER: c.user, LORAFORGE_NATS_PASSWORD: c.pass };
  };

  after(async () => {
    await worker?.stop();
    await srv?.stop();
  });

  it("trains an uploaded set on another host, then resumes another job from its checkpoint on a third", async () => {
    const ds = await srv.client.datasets.upload(f.dataset, { name: "shapes" });
    assert.ok(existsSync(path.join(srv.stateDir, "datasets", ds.id)), "the API server keeps its copy as a cache");

    worker = await startWorker(srv.natsUrl, { env: natsEnv() });
    const first = await srv.client.train(quickSpec(f, { datasetId: ds.id }));
    const done = await first.result();
    assert.equal(done.state, JobState.JOB_STATE_SUCCEEDED, errorMessage(done));
    // The worker fetched the set from the object store into its own cache.
    const fetched = path.join(worker.stateDir, "datasets", ds.id);
    assert.deepEqual(readdirSync(fetched).sort(), readdirSync(path.join(srv.stateDir, "datasets", ds.id)).sort());
    assert.deepEqual(done.spec?.dataset, { $case: "datasetId", datasetId: ds.id });
    assertNoHostPaths(protoJson(Job, "loraforge.v1.Job", done), [f.model], "the job");
    assert.deepEqual(
      done.artifacts.map((a) => a.name).sort(),
      [`jobs/${done.id}/checkpoint-3/`, `jobs/${done.id}/checkpoint-6/`, `jobs/${done.id}/lora/pytorch_lora_weights.safetensors`],
    );
    const lora = done.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA)!;
    assert.equal(sha256File(await download(srv.client, lora.name)), lora.sha256);
    const models = await srv.client.listModels();
    assert.deepEqual(
      models.loras.filter((l) => l.jobId === done.id).map((l) => l.artifactName),
      [lora.name],
      "ListModels names the LoRA artifact, not a file",
    );

    // A third host: it has neither the set nor the first job's checkpoint.
    await worker.stop();
    worker = await startWorker(srv.natsUrl, { env: natsEnv() });
    const checkpoint = `jobs/${done.id}/checkpoint-3/`;
    const second = await srv.client.train(quickSpec(f, { datasetId: ds.id, resumeFromCheckpoint: checkpoint }));
    const events: JobEvent[] = await collect(second.progress());
    const resumed = await second.refresh();
    assert.equal(resumed.state, JobState.JOB_STATE_SUCCEEDED, errorMessage(resumed));
    assert.equal(resumed.spec?.resumeFromCheckpoint, checkpoint, "the job keeps the name it was given");
    const steps = events.flatMap((e) => (e.payload?.$case === "metrics" ? [e.payload.metrics.step] : []));
    assert.deepEqual(steps, [4, 5, 6], "training went on from the checkpoint's step");
    assert.ok(existsSync(path.join(worker.stateDir, "datasets", ds.id, "metadata.jsonl")), "the third host fetched the set");
    assert.ok(
      existsSync(path.join(worker.stateDir, "cache", "checkpoints", done.id, "checkpoint-3")),
      "the third host restored the checkpoint from the object store",
    );
    assertNoHostPaths(protoJson(Job, "loraforge.v1.Job", resumed), [f.model], "the resumed job");
  });

  it("refuses a Train whose checkpoint name no job has", async () => {
    await assert.rejects(
      srv.client.train(quickSpec(f, { resumeFromCheckpoint: "jobs/job-nosuchjob/checkpoint-3/" })),
      (e: Error & { violations?: { field: string }[] }) => {
        assert.deepEqual(e.violations?.map((v) => v.field), ["spec.resume_from_checkpoint"]);
        return true;
      },
    );
  });
});
