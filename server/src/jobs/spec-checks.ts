// What the contract's rules cannot check about a TrainingSpec, because only this host knows:
// that a named base model is in its models folder, that its folders exist inside the data roots and hold a
// diffusers model or captioned images, that an uploaded set it names (data or class images) was stored, and that a
// checkpoint it resumes from exists.
import { existsSync } from "node:fs";
import path from "node:path";
import { ArtifactKind } from "@loraforge/sdk/gen/loraforge/v1/job";
import type { TrainingSpec } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import type { FieldViolation } from "../core/errors.js";
import { isModelName, modelFolder } from "../core/models.js";
import { hostPath, modelFolderProblem } from "../core/paths.js";
import { jobOfArtifact } from "./artifacts.js";
import { countCaptionedImages, type DatasetStore } from "./datasets.js";
import type { JobStore } from "./store.js";

export interface SpecHost {
  /** Client-named folders must lie inside these; empty allows any path. */
  roots: string[];
  /** Where "models/<name>" base models live on this host; unset: no names. */
  modelsDir?: string;
  datasets: DatasetStore;
  store: JobStore;
}

/**
 * The spec's problems only the host can see, each naming its field ("spec.base_model"). Fields in
 * `flagged` already broke a rule and are not looked at again.
 */
export async function hostViolations(spec: TrainingSpec, host: SpecHost, flagged: Set<string>): Promise<FieldViolation[]> {
  const bad: FieldViolation[] = [];
  const check = async (field: string, problem: () => string | null | Promise<string | null>) => {
    if (flagged.has(field)) return;
    const p = await problem();
    if (p) bad.push({ field, description: p });
  };
  await check("spec.base_model", () => {
    if (isModelName(spec.baseModel))
      return modelFolder(host.modelsDir, spec.baseModel) ? null : `no model named ${JSON.stringify(spec.baseModel)} in the server's models folder (ListModels lists them)`;
    const where = hostPath(spec.baseModel, host.roots, "folder");
    if ("problem" in where) return where.problem;
    if (!existsSync(path.join(where.real, "model_index.json"))) return `folder ${JSON.stringify(spec.baseModel)} is not a diffusers model (no model_index.json)`;
    // Its files too: a link inside the folder must not lead out of the roots (the engine checks again on what it opens).
    const inside = modelFolderProblem(where.real, host.roots);
    return inside ? `folder ${JSON.stringify(spec.baseModel)}: ${inside}` : null;
  });
  const ds = spec.dataset;
  if (ds?.$case === "datasetDir")
    await check("spec.dataset_dir", () => {
      const where = hostPath(ds.datasetDir, host.roots, "folder");
      if ("problem" in where) return where.problem;
      const column = spec.imageColumn ?? "file_name";
      return countCaptionedImages(where.real, column, spec.instancePrompt) > 0
        ? null
        : spec.instancePrompt
          ? `folder ${JSON.stringify(ds.datasetDir)} holds no images`
          : `folder ${JSON.stringify(ds.datasetDir)} holds no captioned images (expected metadata.jsonl or metadata.csv with ${column} and a caption, images with same-named .txt captions, or instance_prompt)`;
    });
  if (ds?.$case === "datasetId")
    await check("spec.dataset_id", async () =>
      (await host.datasets.exists(ds.datasetId)) ? null : `no uploaded data set has id ${JSON.stringify(ds.datasetId)} (DatasetService.UploadDataset returns one)`,
    );
  // DreamBooth class images: a host folder confined like dataset_dir (it may hold none: they are generated), or a stored set.
  const cd = spec.classData;
  if (cd?.$case === "classDataDir")
    await check("spec.class_data_dir", () => {
      const where = hostPath(cd.classDataDir, host.roots, "folder");
      return "problem" in where ? where.problem : null;
    });
  if (cd?.$case === "classDatasetId")
    await check("spec.class_dataset_id", async () =>
      (await host.datasets.exists(cd.classDatasetId)) ? null : `no uploaded data set has id ${JSON.stringify(cd.classDatasetId)} (DatasetService.UploadDataset returns one)`,
    );
  const resume = spec.resumeFromCheckpoint;
  if (resume !== undefined && resume !== "latest")
    await check("spec.resume_from_checkpoint", async () => ((await checkpointArtifact(resume, host.store)) ? null : `no job has a checkpoint named ${JSON.stringify(resume)} (see Job.artifacts)`));
  return bad;
}

/** The stored checkpoint artifact a resume_from_checkpoint name ("jobs/<id>/checkpoint-<step>/", the last "/" optional) denotes, or null. */
export async function checkpointArtifact(name: string, store: JobStore) {
  const full = name.endsWith("/") ? name : name + "/";
  const jobId = jobOfArtifact(full);
  const rec = jobId ? await store.get(jobId) : null;
  return rec?.job.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_CHECKPOINT && a.name === full) ?? null;
}
