// The walking skeleton end to end: a real `loraforge serve` (managed nats-server,
// JetStream KV and streams), the real engine on the tiny model, the real SDK.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { credentials, makeGenericClientConstructor } from "@grpc/grpc-js";
import { service as healthService } from "grpc-health-check";
import {
  ArtifactKind,
  CaptionSource,
  errorMessage,
  InvalidSpecError,
  Job,
  JobAlreadyFinalError,
  JobEvent,
  JobNotFoundError,
  JobState,
  LrScheduler,
  SkipReason,
  stateName,
} from "@loraforge/sdk";
import {
  assertNoHostPaths,
  collect,
  download,
  fixtures,
  processesMatching,
  python,
  quickSpec,
  sha256File,
  startServer,
  tmpDir,
  type Fixtures,
  type ServerProcess,
} from "./lib/harness.js";

const states = (evs: JobEvent[]) => evs.flatMap((e) => (e.payload?.$case === "state" ? [stateName(e.payload.state.state)] : []));

describe("TrainerService", () => {
  let f: Fixtures;
  let srv: ServerProcess;

  before(async () => {
    f = fixtures();
    srv = await startServer();
  });
  after(async () => {
    await srv?.stop();
  });

  it("serves grpc.health.v1.Health", async () => {
    const Health = makeGenericClientConstructor(healthService, "Health");
    const health = new Health(srv.address, credentials.createInsecure()) as unknown as {
      check(req: { service: string }, cb: (err: Error | null, res: { status: string }) => void): void;
      close(): void;
    };
    const res = await new Promise<{ status: string }>((resolve, reject) =>
      health.check({ service: "loraforge.v1.TrainerService" }, (err, r) => (err ? reject(err) : resolve(r))),
    );
    health.close();
    assert.equal(res.status, "SERVING");
  });

  it("serves the dashboard page next to the API", async () => {
    assert.match(srv.dashboardUrl, /^http:\/\/127\.0\.0\.1:\d+/);
    const res = await fetch(srv.dashboardUrl);
    assert.equal(res.status, 200);
    assert.match(await res.text(), /<html/i);
  });

  it("refuses bad specs with INVALID_ARGUMENT naming the field, creating no job", async () => {
    const empty = mkdtempSync(path.join(os.tmpdir(), "loraforge-empty-"));
    const cases: [Record<string, unknown>, string][] = [
      [{ datasetDir: path.join(f.root, "no-such-folder") }, "spec.dataset_dir"],
      [{ datasetDir: empty }, "spec.dataset_dir"],
      [{ rank: 0 }, "spec.rank"],
      [{ resolution: 100 }, "spec.resolution"],
      [{ learningRate: -1e-4 }, "spec.learning_rate"],
      // An enum value the contract does not define (a newer client's, or a typo'd number).
      [{ lrScheduler: 99 }, "spec.lr_scheduler"],
      [{ baseModel: "relative/model" }, "spec.base_model"],
      // A host path is no checkpoint: resume takes "latest" or an artifact name.
      [{ resumeFromCheckpoint: f.dataset }, "spec.resume_from_checkpoint"],
      [{ lrScheduler: LrScheduler.LR_SCHEDULER_COSINE, snrGamma: -1 }, "spec.snr_gamma"],
      // No data set at all: the oneof is required.
      [{ dataset: undefined }, "spec.dataset"],
      [{ datasetId: "ds-nosuchset" }, "spec.dataset_id"],
    ];
    const before = (await srv.client.listJobs({ pageSize: 1000 })).jobs.length;
    for (const [patch, field] of cases) {
      await assert.rejects(
        srv.client.train(quickSpec(f, patch) as never),
        (err: unknown) => {
          assert.ok(err instanceof InvalidSpecError, `expected InvalidSpecError for ${JSON.stringify(patch)}, got ${err}`);
          assert.equal(err.code, 3, "INVALID_ARGUMENT");
          assert.equal(err.reason, "INVALID_SPEC");
          assert.deepEqual(err.violations.map((v) => v.field), [field]);
          assert.match(err.message, new RegExp(field.replace(".", "\\.")));
          return true;
        },
      );
    }
    assert.equal((await srv.client.listJobs({ pageSize: 1000 })).jobs.length, before);
  });

  it("reports the data set before the first step and trains past corrupt, tiny and uncaptioned images, in aspect-ratio buckets", async () => {
    // A real user's folder: portrait, landscape and square images, a tiny one, a corrupt one, one without a caption.
    const mixed = path.join(tmpDir("mixed"), "set");
    python(["-m", "loraforge_engine", "make-dataset", mixed, "--count", "10", "--format", "txt", "--mixed"]);
    const job = await srv.client.train(
      quickSpec(f, { datasetDir: mixed, maxTrainSteps: 4, aspectRatioBuckets: true, bucketStep: 16, minImageSide: 16, centerCrop: true }),
    );
    const events = await collect(job.progress());
    assert.deepEqual(states(events), ["QUEUED", "RUNNING", "SUCCEEDED"]);
    const kinds = events.map((e) => e.payload?.$case);
    const reports = events.flatMap((e) => (e.payload?.$case === "dataset" ? [e.payload.dataset] : []));
    assert.equal(reports.length, 1);
    assert.ok(kinds.indexOf("dataset") < kinds.indexOf("metrics"), "the report comes before the first step");
    const r = reports[0];
    assert.deepEqual([r.imagesFound, r.imagesUsed, r.skippedTotal], [13, 10, 3]);
    assert.deepEqual(
      r.skipped.map((s) => [s.name, SkipReason[s.reason]]).sort(),
      [["corrupt.png", "SKIP_REASON_CORRUPT"], ["tiny.png", "SKIP_REASON_TOO_SMALL"], ["uncaptioned.png", "SKIP_REASON_NO_CAPTION"]],
    );
    assert.equal(r.captionSource, CaptionSource.CAPTION_SOURCE_SIDECAR_TXT);
    // 64 px shapes of 1:1, 3:2, 2:3, 2:1 and 1:2 (two each): five sizes, and buckets of other aspect ratios.
    assert.deepEqual(r.sizes.map((x) => [x.width, x.height, x.images]).sort(), [[128, 64, 2], [64, 128, 2], [64, 64, 2], [64, 96, 2], [96, 64, 2]].sort());
    assert.equal(r.buckets.reduce((n, b) => n + b.images, 0), 10);
    assert.ok(r.buckets.length > 1 && r.buckets.some((b) => b.width > b.height) && r.buckets.some((b) => b.width < b.height), JSON.stringify(r.buckets));
    assert.equal(r.latentsCached, 10, "centre crops: every image's latents are cached");
    assertNoHostPaths(events.map((e) => JobEvent.toJSON(e)), [f.model, mixed], "the job's events");
  });

  it("ends a job FAILED_PRECONDITION naming why when no image is usable, after its data set report, and keeps serving", async () => {
    const bad = tmpDir("corrupt");
    for (const name of readdirSync(f.dataset)) copyFileSync(path.join(f.dataset, name), path.join(bad, name));
    for (const name of readdirSync(bad).filter((n) => n.endsWith(".png"))) writeFileSync(path.join(bad, name), Buffer.from("this is not a png at all"));
    const job = await srv.client.train(quickSpec(f, { datasetDir: bad }));
    const events = await collect(job.progress());
    const done = await job.result();
    assert.equal(stateName(done.state), "FAILED");
    const message = errorMessage(done);
    assert.match(message, /holds no captioned images: every image was skipped: 8 corrupt \(0000\.png/, message);
    assert.doesNotMatch(message, /Traceback/);
    // Job.error is a google.rpc.Status; bad data is FAILED_PRECONDITION (google.rpc.Code 9).
    assert.equal(done.error?.code, 9, JSON.stringify(done.error));
    const report = events.flatMap((e) => (e.payload?.$case === "dataset" ? [e.payload.dataset] : []));
    assert.deepEqual(report.map((r) => [r.imagesUsed, r.skippedTotal]), [[0, 8]]);
    assert.ok(!events.some((e) => e.payload?.$case === "metrics"));
    assertNoHostPaths(Job.toJSON(done), [f.model, bad], "the failed job");
  });

  it("trains a LoRA: QUEUED, RUNNING, every step in order without gaps, checkpoints, SUCCEEDED", async () => {
    const job = await srv.client.train(quickSpec(f, { validationPrompt: "a red circle", numValidationImages: 1, validationInferenceSteps: 3 }));
    assert.equal(stateName(job.job.state), "QUEUED");
    const events = await collect(job.progress());

    assert.deepEqual(events.map((e) => e.sequence), events.map((_, i) => i + 1), "sequences are 1..n");
    assert.ok(events.every((e) => e.jobId === job.id));
    assert.deepEqual(states(events), ["QUEUED", "RUNNING", "SUCCEEDED"]);
    const steps = events.flatMap((e) => (e.payload?.$case === "metrics" ? [e.payload.metrics] : []));
    assert.deepEqual(steps.map((m) => m.step), [1, 2, 3, 4, 5, 6]);
    assert.ok(steps.every((m) => m.totalSteps === 6 && Number.isFinite(m.loss) && m.loss > 0 && m.imagesPerSecond > 0));
    // Artifacts are named resources of the server, fetched through the API.
    const ckpts = events.flatMap((e) => (e.payload?.$case === "checkpoint" ? [e.payload.checkpoint] : []));
    assert.deepEqual(ckpts.map((c) => c.step), [3, 6]);
    assert.deepEqual(ckpts.map((c) => c.artifact?.name), [`jobs/${job.id}/checkpoint-3/`, `jobs/${job.id}/checkpoint-6/`]);
    const ckptTar = await download(srv.client, ckpts[1].artifact!);
    const tar = spawnSync("tar", ["-tf", ckptTar], { encoding: "utf8" });
    assert.equal(tar.status, 0, tar.stderr);
    assert.ok(tar.stdout.split("\n").some((n) => n.endsWith(".safetensors")), `the checkpoint holds its files: ${tar.stdout}`);
    const validation = events.flatMap((e) => (e.payload?.$case === "validation" ? [e.payload.validation] : []));
    assert.equal(validation.length, 1);
    const image = validation[0].images[0];
    assert.match(image.name, new RegExp(`^jobs/${job.id}/validation/[^/]+\\.png$`));
    const png = readFileSync(await download(srv.client, image));
    assert.equal(png.subarray(1, 4).toString("latin1"), "PNG", "the validation image is a PNG");
    assert.equal(png.length, image.sizeBytes);

    const final = events.at(-1)!;
    assert.equal(final.payload?.$case, "state");
    const lora = final.payload?.$case === "state" ? final.payload.state.lora : undefined;
    assert.ok(lora && lora.kind === ArtifactKind.ARTIFACT_KIND_LORA);
    assert.equal(lora.name, `jobs/${job.id}/lora/pytorch_lora_weights.safetensors`);
    const loraFile = await download(srv.client, lora);
    assert.equal(sha256File(loraFile), lora.sha256);

    const rec = await srv.client.getJob(job.id);
    assert.equal(stateName(rec.state), "SUCCEEDED");
    assert.equal(rec.currentStep, 6);
    assert.equal(rec.lastSequence, events.length);
    assert.ok(rec.startTime && rec.endTime && rec.createTime);
    assert.ok(rec.artifacts.some((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA && a.name === lora.name));
    // Neither the record nor any event names a place on the server host (beyond the folders the spec gave).
    assertNoHostPaths(Job.toJSON(rec), [f.model, f.dataset], "the job record");
    assertNoHostPaths(events.map((e) => JobEvent.toJSON(e)), [f.model, f.dataset], "the job's events");
    assert.ok((await srv.client.listJobs()).jobs.some((j) => j.id === job.id));
    const succeeded = await srv.client.listJobs({ state: JobState.JOB_STATE_SUCCEEDED });
    assert.ok(succeeded.jobs.every((j) => j.state === JobState.JOB_STATE_SUCCEEDED) && succeeded.jobs.some((j) => j.id === job.id));

    // A client that reconnects after sequence k gets exactly k+1..n.
    const k = 5;
    const rest = await collect(job.progress({ afterSequence: k }));
    assert.deepEqual(rest.map((e) => e.sequence), events.slice(k).map((e) => e.sequence));

    // Stock diffusers loads the file, and the LoRA changes the image.
    const effect = JSON.parse(python([path.join(import.meta.dirname, "..", "py", "lora_effect.py"), f.model, loraFile]));
    assert.ok(effect.max_diff > 1e-4, `LoRA changed nothing: ${JSON.stringify(effect)}`);
    assert.ok(effect.scale0_diff < 1e-5, `scale 0 should give the base image: ${JSON.stringify(effect)}`);
  });

  it("pages ListJobs newest first", async () => {
    const all = (await srv.client.listJobs({ pageSize: 1000 })).jobs;
    assert.ok(all.length >= 2);
    const first = await srv.client.listJobs({ pageSize: 1 });
    assert.equal(first.jobs[0].id, all[0].id);
    assert.ok(first.nextPageToken);
    const second = await srv.client.listJobs({ pageSize: 1, pageToken: first.nextPageToken });
    assert.equal(second.jobs[0].id, all[1].id);
    const ids = all.map((j) => j.id);
    assert.deepEqual(ids, [...ids].sort().reverse());
  });

  it("returns the same job for a repeated request_id", async () => {
    const spec = quickSpec(f, { maxTrainSteps: 100000 });
    const a = await srv.client.train(spec, { requestId: "retry-me-1" });
    const b = await srv.client.train(spec, { requestId: "retry-me-1" });
    assert.equal(a.id, b.id);
    await a.cancel();
    assert.equal(stateName((await a.result()).state), "CANCELLED");
  });

  it("cancels a running job: CANCELLING, a checkpoint, CANCELLED, the engine process gone; a queued one at once", async () => {
    const running = await srv.client.train(quickSpec(f, { maxTrainSteps: 100000, checkpointingSteps: 100000 }));
    const queued = await srv.client.train(quickSpec(f));
    const seen: JobEvent[] = [];
    for await (const ev of running.progress()) {
      seen.push(ev);
      if (ev.payload?.$case === "metrics" && ev.payload.metrics.step === 2) break;
    }
    assert.ok(processesMatching(running.id).length > 0, "engine runs while training");

    const q = await queued.cancel();
    assert.equal(stateName(q.state), "CANCELLED");
    await assert.rejects(queued.cancel(), JobAlreadyFinalError);

    const c = await running.cancel();
    assert.ok(["CANCELLING", "CANCELLED"].includes(stateName(c.state)));
    await running.cancel(); // twice is harmless
    const events = await collect(running.progress());
    assert.deepEqual(states(events), ["QUEUED", "RUNNING", "CANCELLING", "CANCELLED"]);
    assert.ok(events.some((e) => e.payload?.$case === "checkpoint"), "a checkpoint is saved on cancel");
    const done = await running.refresh();
    assert.equal(stateName(done.state), "CANCELLED");
    assert.match(errorMessage(done), /cancelled/);
    assert.deepEqual(processesMatching(running.id), [], "engine process is gone");
    assert.deepEqual(states(await collect(queued.progress())), ["QUEUED", "CANCELLED"]);
  });

  it("maps unknown jobs to JobNotFoundError", async () => {
    await assert.rejects(srv.client.getJob("job-0000000000000000zz"), JobNotFoundError);
    await assert.rejects(srv.client.cancelJob("not an id"), JobNotFoundError);
    await assert.rejects(collect(srv.client.progress("job-0000000000000000zz")), JobNotFoundError);
  });
});
