// Base model names: the pattern (the server's and the contract's rule agree), and how a host
// resolves a name in its models folder (symbolic links followed; folders without a model skipped).
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { status } from "@grpc/grpc-js";
import { InferRequest } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { TrainRequest } from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { TrainingSpec } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import { errorReason } from "@loraforge/server/core/errors";
import { isModelName, listModelFolders, modelFolder } from "@loraforge/server/core/models";
import { ruleViolations } from "@loraforge/server/core/rules";
import { resolveNamedModel } from "@loraforge/server/jobs/job-run";

const GOOD = ["models/tiny", "models/sd15", "models/sd-1.5_fp16", "models/0", "models/" + "a".repeat(63)];
const BAD = ["models/", "models/Tiny", "models/.hidden", "models/-x", "models/a/b", "models/../etc", "models/" + "a".repeat(64), "models/sp ace", "model/tiny"];

/** A minimal diffusers folder: only model_index.json, which is what marks a model. */
function fakeModel(dir: string): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(path.join(dir, "model_index.json"), "{}");
  return dir;
}

describe("model names", () => {
  it("accepts models/<name> with 1..63 of a-z 0-9 . _ - (first a letter or digit), nothing else", () => {
    for (const n of GOOD) assert.ok(isModelName(n), n);
    for (const n of BAD) assert.ok(!isModelName(n), n);
  });

  it("agrees with the contract's rule on InferRequest and TrainingSpec (paths are not names)", () => {
    for (const n of [...GOOD, ...BAD.filter((b) => b.startsWith("models/"))]) {
      const infer = ruleViolations(InferRequest, "loraforge.v1.InferRequest", InferRequest.fromPartial({ baseModel: n })).filter((v) => v.field === "base_model");
      assert.equal(infer.length === 0, isModelName(n), `InferRequest ${n}: ${JSON.stringify(infer)}`);
      const spec = TrainingSpec.fromPartial({ baseModel: n, dataset: { $case: "datasetDir", datasetDir: "/d" } });
      const train = ruleViolations(TrainRequest, "loraforge.v1.TrainRequest", TrainRequest.fromPartial({ spec })).filter((v) => v.field === "spec.base_model");
      assert.equal(train.length === 0, isModelName(n), `TrainingSpec ${n}: ${JSON.stringify(train)}`);
    }
    // A folder (absolute for the server, relative for the engine run by hand) is not judged as a name.
    for (const p of ["/srv/models/sd15", "model/tiny", "./models/Tiny"])
      assert.deepEqual(ruleViolations(InferRequest, "loraforge.v1.InferRequest", InferRequest.fromPartial({ baseModel: p })).filter((v) => v.field === "base_model"), [], p);
  });
});

describe("models folder", () => {
  const root = mkdtempSync(path.join(os.tmpdir(), "loraforge-models-unit-"));
  const models = path.join(root, "models");
  const elsewhere = fakeModel(path.join(root, "elsewhere", "sd"));
  fakeModel(path.join(models, "tiny"));
  symlinkSync(elsewhere, path.join(models, "linked"));
  mkdirSync(path.join(models, "empty")); // no model_index.json
  fakeModel(path.join(models, "Upper")); // not a valid name
  writeFileSync(path.join(models, "file"), "");

  it("resolves a name to its folder, following links; unknown names and missing folders give null", () => {
    assert.equal(modelFolder(models, "models/tiny"), path.join(models, "tiny"));
    assert.equal(modelFolder(models, "models/linked"), path.join(models, "linked"));
    assert.equal(modelFolder(models, "models/empty"), null);
    assert.equal(modelFolder(models, "models/nope"), null);
    assert.equal(modelFolder(models, "models/Upper"), null, "not a name");
    assert.equal(modelFolder(undefined, "models/tiny"), null);
    assert.equal(modelFolder(path.join(root, "none"), "models/tiny"), null);
  });

  it("lists the folders that hold a model under a valid name, by name", () => {
    assert.deepEqual(
      listModelFolders(models).map((m) => m.name),
      ["models/linked", "models/tiny"],
    );
    assert.deepEqual(listModelFolders(path.join(root, "none")), []);
  });

  it("a worker resolves a name in its own folder, and fails the job with MODEL_NOT_FOUND without it", async () => {
    const engine = { python: "/nonexistent/python", engineDir: "/nonexistent" };
    // No hash recorded at submit: nothing to compare, so no hashing (the python above is never run).
    assert.deepEqual(await resolveNamedModel("models/tiny", "", { ...engine, modelsDir: models }), { dir: path.join(models, "tiny") });
    const missing = await resolveNamedModel("models/nope", "", { ...engine, modelsDir: models });
    assert.ok("error" in missing);
    assert.equal(missing.error.code, status.FAILED_PRECONDITION);
    assert.equal(errorReason(missing.error), "MODEL_NOT_FOUND");
    assert.match(missing.error.message, /models\/nope is not in the models folder of worker host/);
    const none = await resolveNamedModel("models/tiny", "", engine);
    assert.ok("error" in none, "a worker without a models folder has no named models");
  });
});
