// The contract's rules (buf.validate in proto/) at the server's front door: every request of every
// service is checked against them, and a refusal is INVALID_ARGUMENT with a google.rpc.BadRequest
// naming every bad field by its path as a client writes it. Checks only the host can make (folders,
// data roots, uploaded sets, the prompt cap) join the same answer. The server is the real one
// (server.ts's startServer, in this process, with its managed nats-server); the requests go through
// the generated gRPC clients, so that values the SDK would never send (an enum number no enum has)
// reach the server as a hostile client would send them.
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { credentials, Metadata, status, type ServiceError } from "@grpc/grpc-js";
import sharp from "sharp";
import { BadRequest, ErrorInfo } from "@loraforge/sdk/gen/google/rpc/error_details";
import { Status } from "@loraforge/sdk/gen/google/rpc/status";
import { DatasetServiceClient, type UploadDatasetRequest, type UploadDatasetResponse } from "@loraforge/sdk/gen/loraforge/v1/dataset_service";
import { InferenceServiceClient, type InferRequest, type Sampler } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { JobState } from "@loraforge/sdk/gen/loraforge/v1/job";
import { TrainerServiceClient, type TrainResponse } from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { TrainingSpec, type LoraFormat, type LrScheduler } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import { configFromEnv, startServer, type Running } from "@loraforge/server/server";
import { tmpDir } from "./lib/harness.js";

interface Refusal {
  code: status;
  reason: string;
  message: string;
  fields: Map<string, string>;
}

/** The status, ErrorInfo reason and BadRequest field violations of a failed call. */
function refusal(err: unknown): Refusal {
  const e = err as ServiceError;
  assert.ok(e && typeof e.code === "number", `expected a gRPC error, got ${String(err)}`);
  const bin = e.metadata?.get("grpc-status-details-bin")[0];
  assert.ok(bin instanceof Buffer, "the error carries grpc-status-details-bin");
  const st = Status.decode(bin);
  const info = st.details.find((d) => d.typeUrl === "type.googleapis.com/google.rpc.ErrorInfo");
  const bad = st.details.find((d) => d.typeUrl === "type.googleapis.com/google.rpc.BadRequest");
  const fields = new Map((bad ? BadRequest.decode(bad.value).fieldViolations : []).map((v) => [v.field, v.description] as const));
  return { code: e.code, reason: info ? ErrorInfo.decode(info.value).reason : "", message: e.details, fields };
}

/** Resolves with the refusal of a call that must fail; fails the test if it succeeds. */
async function refused(call: Promise<unknown>): Promise<Refusal> {
  return call.then(
    (v) => assert.fail(`expected a refusal, got ${JSON.stringify(v).slice(0, 300)}`),
    (err) => refusal(err),
  );
}

const unary = <Req, Res>(fn: (req: Req, md: Metadata, cb: (err: ServiceError | null, res: Res) => void) => unknown, req: Req) =>
  new Promise<Res>((resolve, reject) => fn(req, new Metadata(), (err, res) => (err ? reject(err) : resolve(res))));

describe("the contract's rules at the front door", () => {
  let srv: Running;
  let trainer: InstanceType<typeof TrainerServiceClient>;
  let infer: InstanceType<typeof InferenceServiceClient>;
  let datasets: InstanceType<typeof DatasetServiceClient>;
  let root: string; // the server's one data root
  let model: string; // a folder that looks like a diffusers model (the rules and checks read no weights)
  let images: string; // a captioned image set inside the root

  const train = (spec: Partial<TrainingSpec> | undefined, requestId = "") =>
    unary<Parameters<typeof trainer.train>[0], TrainResponse>(trainer.train.bind(trainer), {
      spec: spec ? TrainingSpec.fromPartial(spec) : undefined,
      requestId,
    });

  const upload = (parts: UploadDatasetRequest[]) =>
    new Promise<UploadDatasetResponse>((resolve, reject) => {
      const call = datasets.uploadDataset((err, res) => (err ? reject(err) : resolve(res!)));
      for (const p of parts) call.write(p);
      call.end();
    });

  /** The first message (or the error) of a server stream. */
  const firstOf = (stream: NodeJS.EventEmitter & { cancel(): void }) =>
    new Promise<unknown>((resolve, reject) => {
      stream.on("data", (d) => {
        stream.cancel();
        resolve(d);
      });
      stream.on("error", (e: ServiceError) => (e.code === status.CANCELLED ? undefined : reject(e)));
    });

  before(async () => {
    root = tmpDir("contract-root");
    model = path.join(root, "model");
    mkdirSync(model);
    writeFileSync(path.join(model, "model_index.json"), "{}");
    images = path.join(root, "images");
    mkdirSync(images);
    const png = await sharp({ create: { width: 16, height: 16, channels: 3, background: { r: 200, g: 40, b: 40 } } }).png().toBuffer();
    writeFileSync(path.join(images, "a.png"), png);
    writeFileSync(path.join(images, "a.txt"), "a red square");
    process.env.LORAFORGE_INFER_MAX_PROMPT_CHARS = "50";
    srv = await startServer({
      ...configFromEnv({}),
      address: "127.0.0.1:0",
      stateDir: tmpDir("contract-state"),
      dataRoots: [root],
      worker: false,
      dashboardAddress: undefined,
    });
    trainer = new TrainerServiceClient(srv.address, credentials.createInsecure());
    infer = new InferenceServiceClient(srv.address, credentials.createInsecure());
    datasets = new DatasetServiceClient(srv.address, credentials.createInsecure());
  });

  after(async () => {
    trainer?.close();
    infer?.close();
    datasets?.close();
    await srv?.close();
  });

  it("refuses a Train with several bad fields, naming every one from the rules", async () => {
    const r = await refused(
      train(
        {
          baseModel: model,
          resolution: 12, // 8..4096 but not a multiple of 8
          rank: 0,
          learningRate: Number.POSITIVE_INFINITY,
          targetModules: ["to_q", "to q"],
          validationPrompts: ["a cat", "   "],
          seed: 2 ** 32,
          bucketStep: 12, // 8..1024 but not a multiple of 8
          keepTags: -1,
          // no dataset: the oneof is required
        },
        "r".repeat(129),
      ),
    );
    assert.equal(r.code, status.INVALID_ARGUMENT);
    assert.equal(r.reason, "INVALID_SPEC");
    assert.deepEqual(
      [...r.fields.keys()].sort(),
      ["request_id", "spec.bucket_step", "spec.dataset", "spec.keep_tags", "spec.learning_rate", "spec.rank", "spec.resolution", "spec.seed", "spec.target_modules[1]", "spec.validation_prompts[1]"],
    );
    assert.match(r.fields.get("spec.rank")!, /greater than or equal to 1.*got 0/);
    assert.match(r.fields.get("spec.resolution")!, /multiple of 8/);
    assert.match(r.fields.get("spec.target_modules[1]")!, /"to q"/);
    for (const field of r.fields.keys()) assert.ok(r.message.includes(field), `the message names ${field}: ${r.message}`);
  });

  it("refuses an enum number that names no value", async () => {
    const r = await refused(train({ baseModel: model, dataset: { $case: "datasetDir", datasetDir: images }, lrScheduler: 99 as LrScheduler, loraFormat: -1 as LoraFormat }));
    assert.equal(r.reason, "INVALID_SPEC");
    assert.deepEqual([...r.fields.keys()].sort(), ["spec.lora_format", "spec.lr_scheduler"]);
    assert.match(r.fields.get("spec.lr_scheduler")!, /defined enum values.*got 99/);

    const list = await refused(unary(trainer.listJobs.bind(trainer), { pageSize: 0, pageToken: "", state: 42 as JobState }));
    assert.equal(list.code, status.INVALID_ARGUMENT);
    assert.equal(list.reason, "INVALID_REQUEST");
    assert.deepEqual([...list.fields.keys()], ["state"]);
  });

  it("joins what only the host can check to the rules' answer", async () => {
    const r = await refused(
      train({
        baseModel: path.join(root, "no-such-model"),
        dataset: { $case: "datasetDir", datasetDir: tmpDir("outside-the-roots") },
        rank: 2000,
        resumeFromCheckpoint: "jobs/job-0000000000000000000/checkpoint-5/",
      }),
    );
    assert.equal(r.reason, "INVALID_SPEC");
    assert.deepEqual([...r.fields.keys()].sort(), ["spec.base_model", "spec.dataset_dir", "spec.rank", "spec.resume_from_checkpoint"]);
    assert.match(r.fields.get("spec.base_model")!, /does not exist/);
    assert.match(r.fields.get("spec.dataset_dir")!, /data roots/);
    assert.match(r.fields.get("spec.resume_from_checkpoint")!, /no job has a checkpoint/);

    // A host path where the contract wants an artifact name is the rule's to refuse.
    const path_ = await refused(train({ baseModel: model, dataset: { $case: "datasetDir", datasetDir: images }, resumeFromCheckpoint: "/tmp/checkpoint-5" }));
    assert.deepEqual([...path_.fields.keys()], ["spec.resume_from_checkpoint"]);
    assert.match(path_.fields.get("spec.resume_from_checkpoint")!, /regex/);

    const ids = await refused(train({ baseModel: model, dataset: { $case: "datasetId", datasetId: "ds-unknown0" } }));
    assert.deepEqual([...ids.fields.keys()], ["spec.dataset_id"]);
    assert.match(ids.fields.get("spec.dataset_id")!, /no uploaded data set/);
    const pattern = await refused(train({ baseModel: model, dataset: { $case: "datasetId", datasetId: "../../etc" } }));
    assert.deepEqual([...pattern.fields.keys()], ["spec.dataset_id"]);
    assert.match(pattern.fields.get("spec.dataset_id")!, /regex/);
  });

  it("accepts a good spec and keeps it as submitted", async () => {
    const { job } = await train({ baseModel: model, dataset: { $case: "datasetDir", datasetDir: images }, rank: 8, lrScheduler: 2 });
    assert.equal(job!.state, JobState.JOB_STATE_QUEUED);
    assert.equal(job!.spec!.rank, 8);
    assert.deepEqual(job!.spec!.dataset, { $case: "datasetDir", datasetDir: images });
  });

  it("checks the other TrainerService requests by their rules", async () => {
    const get = await refused(unary(trainer.getJob.bind(trainer), { jobId: "" }));
    assert.equal(get.code, status.INVALID_ARGUMENT);
    assert.deepEqual([...get.fields.keys()], ["job_id"]);
    const cancel = await refused(unary(trainer.cancelJob.bind(trainer), { jobId: "j".repeat(129) }));
    assert.deepEqual([...cancel.fields.keys()], ["job_id"]);
    const page = await refused(unary(trainer.listJobs.bind(trainer), { pageSize: 5000, pageToken: "", state: JobState.JOB_STATE_UNSPECIFIED }));
    assert.equal(page.reason, "INVALID_PAGE_SIZE");
    assert.deepEqual([...page.fields.keys()], ["page_size"]);
    const follow = refusal(await firstOf(trainer.streamProgress({ jobId: "job-x", afterSequence: -1 })).catch((e) => e));
    assert.equal(follow.code, status.INVALID_ARGUMENT);
    assert.deepEqual([...follow.fields.keys()], ["after_sequence"]);
    // An artifact is named "jobs/<job id>/...": a host path is not a name.
    const download = refusal(await firstOf(trainer.downloadArtifact({ name: "/etc/passwd" })).catch((e) => e));
    assert.equal(download.code, status.INVALID_ARGUMENT);
    assert.deepEqual([...download.fields.keys()], ["name"]);
    const missing = refusal(await firstOf(trainer.downloadArtifact({ name: "jobs/job-x/lora/a.safetensors" })).catch((e) => e));
    assert.equal(missing.code, status.NOT_FOUND);
    assert.equal(missing.reason, "JOB_NOT_FOUND");
  });

  it("refuses a bad Infer request, naming each field with its path", async () => {
    const req: Partial<InferRequest> = {
      prompt: "p".repeat(51), // over this server's LORAFORGE_INFER_MAX_PROMPT_CHARS (50)
      baseModel: "relative/model",
      loras: [
        { source: undefined, scale: 1 },
        { source: { $case: "jobId", jobId: "job-x" }, scale: 11 },
        { source: { $case: "path", path: path.join(root, "lora.bin") }, scale: undefined },
      ],
      width: 100, // in range, not a multiple of 8
      numImages: 0,
      sampler: 7 as Sampler,
      guidanceScale: Number.NaN,
      sizeConditioning: { originalWidth: 0, originalHeight: undefined, cropTop: 0, cropLeft: -1, targetWidth: undefined, targetHeight: undefined },
    };
    const r = await refused(unary(infer.infer.bind(infer), { ...emptyInfer(), ...req }));
    assert.equal(r.code, status.INVALID_ARGUMENT);
    assert.equal(r.reason, "INVALID_INFER_REQUEST");
    assert.deepEqual([...r.fields.keys()].sort(), [
      "base_model",
      "guidance_scale",
      "loras[0].source",
      "loras[1].scale",
      "loras[2].path",
      "num_images",
      "prompt",
      "sampler",
      "size_conditioning.crop_left",
      "size_conditioning.original_width",
      "width",
    ]);
    assert.match(r.fields.get("prompt")!, /LORAFORGE_INFER_MAX_PROMPT_CHARS/);
    assert.match(r.fields.get("loras[2].path")!, /safetensors/);
    assert.match(r.fields.get("base_model")!, /absolute/);

    // A model folder that is merely missing is NOT_FOUND, not a bad field.
    const gone = await refused(unary(infer.infer.bind(infer), { ...emptyInfer(), baseModel: path.join(root, "no-such-model") }));
    assert.equal(gone.code, status.NOT_FOUND);
    assert.equal(gone.reason, "MODEL_NOT_FOUND");
  });

  it("checks each upload message by its rules, then stores a good set for any worker", async () => {
    const noName = await refused(upload([{ part: { $case: "header", header: { name: "" } } }]));
    assert.equal(noName.code, status.INVALID_ARGUMENT);
    assert.equal(noName.reason, "INVALID_DATASET");
    assert.deepEqual([...noName.fields.keys()], ["header.name"]);
    const slash = await refused(
      upload([
        { part: { $case: "header", header: { name: "s" } } },
        { part: { $case: "file", file: { name: "../a.png", data: Buffer.from("x") } } },
      ]),
    );
    assert.deepEqual([...slash.fields.keys()], ["file.name"]);
    const empty = await refused(upload([{ part: undefined }]));
    assert.deepEqual([...empty.fields.keys()], ["part"]);

    const png = await sharp({ create: { width: 16, height: 16, channels: 3, background: { r: 0, g: 0, b: 255 } } }).png().toBuffer();
    const { dataset } = await upload([
      { part: { $case: "header", header: { name: "blue" } } },
      { part: { $case: "file", file: { name: "b.png", data: png } } },
      { part: { $case: "file", file: { name: "b.txt", data: Buffer.from("a blue square") } } },
    ]);
    assert.match(dataset!.id, /^ds-[a-z0-9]+$/);
    assert.equal(dataset!.imageCount, 1);
    const { job } = await train({ baseModel: model, dataset: { $case: "datasetId", datasetId: dataset!.id } });
    assert.deepEqual(job!.spec!.dataset, { $case: "datasetId", datasetId: dataset!.id }, "the job keeps the id, not a folder");
  });
});

/** An InferRequest with every field at its zero value. */
function emptyInfer(): InferRequest {
  return {
    prompt: "",
    negativePrompt: "",
    baseModel: "",
    loras: [],
    numInferenceSteps: undefined,
    guidanceScale: undefined,
    seed: undefined,
    width: undefined,
    height: undefined,
    numImages: undefined,
    sampler: 0,
    prompt2: undefined,
    negativePrompt2: undefined,
    sizeConditioning: undefined,
    negativeSizeConditioning: undefined,
  };
}
