// One run of one job on this worker, in steps:
//   1. inputs: the data set and the checkpoint to resume from as folders on this host (fetched
//      from the object store when another host produced them);
//   2. the engine: spawned on a spec naming those folders, stopped on a cancel or a takeover
//      seen in the job's record;
//   3. its events: renumbered into the job's event stream, each artifact renamed from its path in
//      the output folder to its public name and uploaded before the event announcing it;
//   4. the end: how the engine ended, classified into the job's next state and error;
//   5. the record: final (and the final event), or handed back to the queue for a retry.
import { existsSync, readdirSync, renameSync, rmSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import path from "node:path";
import { status } from "@grpc/grpc-js";
import type { Status } from "@loraforge/sdk/gen/google/rpc/status";
import { Artifact, ArtifactKind, Job, JobEvent, JobState, LogLevel } from "@loraforge/sdk/gen/loraforge/v1/job";
import type { TrainingSpec } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import { jobError } from "../core/errors.js";
import { log } from "../core/log.js";
import { BASE_MODEL_ROOTS_ENV } from "../core/paths.js";
import { telemetry } from "../core/telemetry.js";
import { ArtifactStore, jobOfArtifact } from "./artifacts.js";
import { DatasetMissing, type DatasetStore } from "./datasets.js";
import { diskBounds, pruneFolders, touch, treeBytes } from "./disk.js";
import { ENGINE_EXIT, EngineRun, type EngineExit, type EngineOptions } from "./engine.js";
import { checkpointArtifact } from "./spec-checks.js";
import { isModelName, modelFolder, ModelHasher } from "../core/models.js";
import type { JobEventPublisher } from "./events.js";
import { isFinal, JobStore, type JobRecord } from "./store.js";

/** Why the engine is being stopped: a cancel or shutdown (ends CANCELLED), a hand-back (retried elsewhere), a lost job. */
export interface StopRequest {
  kind: "cancel" | "requeue" | "lost";
  /** What the job's record and final event say about it. */
  error: Status;
}

/** What the run needs from the worker that owns it. */
export interface RunHost {
  store: JobStore;
  artifacts: ArtifactStore;
  datasets: DatasetStore;
  engine: EngineOptions;
  /** Outputs go under <stateDir>/jobs/<id>; restored checkpoints under <stateDir>/cache/checkpoints. */
  stateDir: string;
  maxAttempts: number;
  /** Compare-and-set on the job's record; throws LostOwnership when this worker no longer owns the job. */
  updateOwned(jobId: string, attempt: number, change: (job: Job, rec: JobRecord) => Job | null): Promise<unknown>;
  /** Whether a record change means another worker has taken the job over. */
  takenOver(worker: string, attempts: number, attempt: number): boolean;
}

/** How a run settles its queue message: done, redeliver later, or leave it to the job's new owner. */
export type Settle = "ack" | "retry" | "none";

/** What the engine reported about its end, for decideOutcome. */
export interface EngineReport {
  /** The final LoRA (SUCCEEDED). */
  lora?: Artifact;
  /** The error of a FAILED state event. */
  error?: Status;
  /** The last LOG_LEVEL_ERROR line. */
  lastErrorLog: string;
}

type Payload = NonNullable<JobEvent["payload"]>;

/** Thrown inside a compare-and-set when this worker no longer owns the job. */
export class LostOwnership extends Error {
  override name = "LostOwnership";
}

export class JobRun {
  readonly outputDir: string;
  engine: EngineRun | null = null;
  stop: StopRequest | null = null;
  /** The job's artifacts as its record lists them: public names, each already in the object store. */
  private readonly artifacts: Artifact[];
  private readonly report: EngineReport = { lastErrorLog: "" };
  private step: number;
  private totalSteps: number;
  private lastProgressWrite = 0;

  constructor(
    private readonly job: Job,
    private readonly attempt: number,
    private readonly events: JobEventPublisher,
    private readonly host: RunHost,
  ) {
    this.outputDir = path.resolve(host.stateDir, "jobs", job.id);
    this.artifacts = [...job.artifacts];
    this.step = job.currentStep;
    this.totalSteps = job.totalSteps;
  }

  /** Asks the run to stop (the engine saves a checkpoint first); the first request wins, but a lost job always stops as lost. */
  requestStop(req: StopRequest): void {
    if (this.stop && req.kind !== "lost") return;
    this.stop = req;
    this.engine?.stop();
  }

  /** The whole run; `retry` when an earlier attempt of this job ran (here or on another worker). */
  async execute(retry: boolean): Promise<Settle> {
    const unwatch = await this.watchRecord();
    let exit: EngineExit;
    try {
      const inputs = await this.prepareInputs(retry);
      if ("error" in inputs) return await this.finish({ state: JobState.JOB_STATE_FAILED, error: inputs.error });
      // Stopped while the inputs were fetched: the engine has nothing to save, so it does not start.
      exit = this.stop ? { code: ENGINE_EXIT.STOPPED, signal: null, stderrTail: [] } : await this.runEngine(inputs.spec, inputs.resumeFrom);
    } finally {
      unwatch();
    }
    await this.events.flush();
    if (this.stop?.kind === "lost") return "none";
    if (exit.code !== ENGINE_EXIT.OK && exit.code !== ENGINE_EXIT.STOPPED)
      log("warn", "the engine failed", { job: this.job.id, code: exit.code, signal: exit.signal, output: exit.stderrTail.slice(-10).join("\n") });
    const outcome = decideOutcome(exit, this.report, this.stop, this.attempt, this.host.maxAttempts);
    return outcome.state === JobState.JOB_STATE_RUNNING ? this.handBack(outcome.error) : this.finish(outcome);
  }

  // ---- 1. inputs ---------------------------------------------------------------------------------

  /**
   * The spec the engine gets — the data set as a local folder, a named checkpoint replaced by
   * --resume-from <its folder> — or the error that ends the job when an input is gone.
   */
  private async prepareInputs(retry: boolean): Promise<{ spec: TrainingSpec; resumeFrom?: string } | { error: Status }> {
    const spec: TrainingSpec = { ...this.job.spec! };
    if (isModelName(spec.baseModel)) {
      const model = await resolveNamedModel(spec.baseModel, this.job.baseModelHash, this.host.engine);
      if ("error" in model) return model;
      spec.baseModel = model.dir;
    }
    if (spec.dataset?.$case === "datasetId") {
      const dir = await this.localSet(spec.dataset.datasetId, "dataset_id");
      if (typeof dir !== "string") return dir;
      spec.dataset = { $case: "datasetDir", datasetDir: dir };
    }
    if (spec.classData?.$case === "classDatasetId") {
      // DreamBooth class images from an uploaded set: a folder on this host, as the data set.
      const dir = await this.localSet(spec.classData.classDatasetId, "class_dataset_id");
      if (typeof dir !== "string") return dir;
      spec.classData = { $case: "classDataDir", classDataDir: dir };
    }
    const named = spec.resumeFromCheckpoint !== undefined && spec.resumeFromCheckpoint !== "latest" ? spec.resumeFromCheckpoint : undefined;
    if (named) spec.resumeFromCheckpoint = undefined;
    // A retry continues from this job's own newest checkpoint when it has one.
    if (retry && (await this.restoreOwnCheckpoint())) return { spec, resumeFrom: "latest" };
    if (!named) return { spec, resumeFrom: retry ? "latest" : undefined };
    const folder = await this.checkpointFolder(named);
    if (!folder) return { error: jobError(status.FAILED_PRECONDITION, "CHECKPOINT_NOT_FOUND", `no job has a checkpoint named ${JSON.stringify(named)}`, { name: named }) };
    return { spec, resumeFrom: folder };
  }

  /** An uploaded set the spec names (by `field`) as a folder on this host, or the error that ends the job when it is gone. */
  private async localSet(id: string, field: string): Promise<string | { error: Status }> {
    try {
      return await this.host.datasets.localFolder(id);
    } catch (err) {
      if (!(err instanceof DatasetMissing)) throw err;
      return { error: jobError(status.FAILED_PRECONDITION, "DATASET_NOT_FOUND", err.message, { [field]: id }) };
    }
  }

  /**
   * Makes sure this job's newest stored checkpoint is in its output folder (where the engine's
   * "latest" looks: checkpoints/checkpoint-<step>), restoring it when another worker wrote it.
   * Returns whether the job has a checkpoint.
   */
  private async restoreOwnCheckpoint(): Promise<boolean> {
    const latest = this.artifacts.filter((a) => a.kind === ArtifactKind.ARTIFACT_KIND_CHECKPOINT).sort((a, b) => b.step - a.step)[0];
    const left = this.announceLeftBehind(latest?.step ?? -1);
    if (!latest) return left > 0;
    const dir = path.join(this.outputDir, "checkpoints", `checkpoint-${latest.step}`);
    if (!existsSync(dir)) await this.restore(latest.name, dir);
    return true;
  }

  /**
   * Checkpoints an earlier attempt on this host finished but never uploaded (it died between the
   * engine's rename and the upload): uploaded and announced now, before the engine resumes from the
   * newest of them, so that the job's record lists every checkpoint a run relies on and a worker
   * elsewhere would resume from the same step. Returns how many complete checkpoints are here.
   */
  private announceLeftBehind(storedStep: number): number {
    const root = path.join(this.outputDir, "checkpoints");
    if (!existsSync(root)) return 0;
    // Complete checkpoints only: the engine writes a .tmp- folder and renames it when done.
    const steps = readdirSync(root, { withFileTypes: true })
      .map((e) => (e.isDirectory() ? /^checkpoint-(\d+)$/.exec(e.name) : null))
      .filter((m) => m !== null)
      .map((m) => Number(m[1]))
      .sort((a, b) => a - b);
    for (const step of steps.filter((s) => s > storedStep)) {
      const name = `checkpoints/checkpoint-${step}`;
      const a = this.published({ kind: ArtifactKind.ARTIFACT_KIND_CHECKPOINT, name, sizeBytes: treeBytes(path.join(this.outputDir, name)), sha256: "", step });
      if (!a) continue;
      log("info", "announcing a checkpoint an earlier attempt saved but did not upload", { job: this.job.id, step });
      const payload: Payload = { $case: "checkpoint", checkpoint: { step, artifact: a.artifact } };
      this.events.emit(payload, new Date(), async () => (await a.upload(), payload));
    }
    return steps.length;
  }

  /**
   * A checkpoint artifact ("jobs/<id>/checkpoint-<step>/") as a folder on this host: the job's own
   * output when it ran here, else a copy restored from the object store into the cache.
   */
  private async checkpointFolder(name: string): Promise<string | null> {
    const artifact = await checkpointArtifact(name, this.host.store);
    if (!artifact) return null;
    const jobId = jobOfArtifact(artifact.name)!;
    const own = path.join(this.host.stateDir, "jobs", jobId, "checkpoints", `checkpoint-${artifact.step}`);
    if (existsSync(path.join(own, "training_state.json"))) return own;
    const cached = path.join(this.host.stateDir, "cache", "checkpoints", jobId, `checkpoint-${artifact.step}`);
    if (!existsSync(cached)) await this.restore(artifact.name, cached);
    return cached;
  }

  /** Restores a checkpoint artifact into `dir`: beside it first, then renamed, so a half-restored checkpoint is never used. */
  private async restore(name: string, dir: string): Promise<void> {
    const tmp = `${dir}.${randomBytes(4).toString("hex")}.tmp`;
    try {
      const n = await this.host.artifacts.restoreCheckpoint(name, tmp);
      if (n === 0) throw new Error(`the object store holds no files of ${name}`);
      try {
        renameSync(tmp, dir);
      } catch (err) {
        // Another job on this host restored it first.
        if (!existsSync(dir)) throw err;
      }
      this.logEvent(LogLevel.LOG_LEVEL_INFO, `restored ${name} (${n} files) from the artifact store`);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }

  // ---- 2. the engine -----------------------------------------------------------------------------

  /**
   * Follows the job's record: a cancel is a change to CANCELLING made by the API, a takeover a
   * change of owner or attempt. Returns the function that stops watching.
   */
  private async watchRecord(): Promise<() => void> {
    const watch = await this.host.store.kv.watch({ key: `jobs.${this.job.id}` });
    void (async () => {
      for await (const e of watch) {
        const rec = e.operation === "PUT" ? JobStore.decode(e.value) : null;
        if (!rec) continue;
        if (this.host.takenOver(rec.worker, rec.attempts, this.attempt)) {
          this.requestStop({ kind: "lost", error: jobError(status.ABORTED, "JOB_TAKEN_OVER", `taken over by ${rec.worker || "another worker"}`) });
        } else if (rec.job.state === JobState.JOB_STATE_CANCELLING && this.stop?.kind !== "cancel" && this.stop?.kind !== "lost") {
          // A client's cancel outranks a shutdown's hand-back: the job ends CANCELLED.
          const error = rec.job.error ?? jobError(status.CANCELLED, "CANCELLED", "cancelled by a client");
          this.stop = { kind: "cancel", error };
          this.engine?.stop();
          this.events.emit({ $case: "state", state: { state: JobState.JOB_STATE_CANCELLING, error, lora: undefined } });
        }
      }
    })();
    return () => watch.stop();
  }

  /** Spawns the engine and waits for it to exit. */
  private async runEngine(spec: TrainingSpec, resumeFrom: string | undefined): Promise<EngineExit> {
    const engine = new EngineRun(
      this.host.engine,
      spec,
      this.outputDir,
      resumeFrom,
      (ev) => this.onEngineEvent(ev),
      (line) => log("debug", `[engine ${this.job.id}] ${line}`),
      {
        ...telemetry.traceEnv(),
        // torch.compile's kernels and graphs outlive the job here, so that only the first compiling job on a
        // machine pays the full compile (measured on the tiny model: 81 s cold, 7.6 s from this cache).
        ...(process.env.TORCHINDUCTOR_CACHE_DIR ? {} : { TORCHINDUCTOR_CACHE_DIR: path.join(this.host.stateDir, "cache", "torch-compile") }),
        // The engine's own caches (DreamBooth class images) outlive the job here too.
        ...(process.env.LORAFORGE_CACHE_DIR ? {} : { LORAFORGE_CACHE_DIR: path.join(this.host.stateDir, "cache") }),
        // A base model the client named by path is read only from files inside the data roots; a named one is the admin's.
        [BASE_MODEL_ROOTS_ENV]: isModelName(this.job.spec!.baseModel) ? "" : (this.host.engine.dataRoots ?? []).join(path.delimiter),
      },
    );
    this.engine = engine;
    return telemetry
      .span("engine", { "loraforge.job_id": this.job.id, "process.pid": engine.pid ?? -1 }, async () => {
        const e = await engine.exited;
        if (e.code !== 0) throw new Error(`engine ${e.signal ? `killed by ${e.signal}` : `exited with code ${e.code}`}`);
        return e;
      })
      .catch(() => engine.exited);
  }

  // ---- 3. its events -----------------------------------------------------------------------------

  /** One engine event: progress and artifacts go to the job's event stream; the engine's own end is kept for step 4. */
  private onEngineEvent(ev: JobEvent): void {
    const p = ev.payload;
    if (!p || this.stop?.kind === "lost") return;
    switch (p.$case) {
      case "state":
        // The engine reports its own end; the worker decides the job's state.
        if (p.state.state === JobState.JOB_STATE_SUCCEEDED && p.state.lora) this.report.lora = p.state.lora;
        if (p.state.state === JobState.JOB_STATE_FAILED && p.state.error) this.report.error = p.state.error;
        return;
      case "metrics":
        this.step = p.metrics.step;
        this.totalSteps = p.metrics.totalSteps;
        telemetry.recordStep(p.metrics);
        this.events.emit(p, ev.time);
        break;
      case "checkpoint": {
        const a = this.published(p.checkpoint.artifact);
        const payload: Payload = { ...p, checkpoint: { ...p.checkpoint, artifact: a?.artifact } };
        this.events.emit(payload, ev.time, async () => (await a?.upload(), payload));
        break;
      }
      case "validation": {
        const images = p.validation.images.map((i) => this.published(i)).filter((a) => a !== null);
        const payload: Payload = { ...p, validation: { ...p.validation, images: images.map((a) => a.artifact) } };
        this.events.emit(payload, ev.time, async () => {
          for (const a of images) await a.upload();
          return payload;
        });
        break;
      }
      case "log":
        if (p.log.level === LogLevel.LOG_LEVEL_ERROR) this.report.lastErrorLog = p.log.message;
        this.events.emit(p, ev.time);
        break;
      case "dataset":
        // The data set report: images used and skipped (named relative to the set), sizes, buckets, caches.
        this.events.emit(p, ev.time);
        break;
      case "classImages":
        // Prior preservation: class images given, cached and generated so far.
        this.events.emit(p, ev.time);
        break;
    }
    if (p.$case !== "metrics" || Date.now() - this.lastProgressWrite > 1000)
      void this.events
        .flush()
        .then(() => this.writeProgress())
        .catch((err) => {
          if (err instanceof LostOwnership) this.requestStop({ kind: "lost", error: jobError(status.ABORTED, "JOB_TAKEN_OVER", err.message) });
        });
  }

  /**
   * An engine artifact under its public name, and how to upload it (after which the job's record
   * lists it). The engine names it by its path in the output folder; a name leading out of that
   * folder is dropped.
   */
  private published(a: Artifact | undefined): { artifact: Artifact; upload(): Promise<void> } | null {
    if (!a) return null;
    const local = path.resolve(this.outputDir, a.name);
    if (path.isAbsolute(a.name) || !local.startsWith(this.outputDir + path.sep)) {
      log("warn", "the engine named an artifact outside its output folder; dropped", { job: this.job.id, name: a.name });
      return null;
    }
    const artifact = { ...a, name: ArtifactStore.publicName(this.job.id, a.kind, a.step, a.name) };
    return {
      artifact,
      upload: async () => {
        await telemetry.span("artifact upload", { "loraforge.job_id": this.job.id, "loraforge.artifact": artifact.name }, () =>
          this.host.artifacts.upload(artifact.name, local),
        );
        const i = this.artifacts.findIndex((x) => x.name === artifact.name);
        if (i >= 0) this.artifacts[i] = artifact;
        else this.artifacts.push(artifact);
      },
    };
  }

  /** Brings the record's progress (step, artifacts, last sequence) up to date. */
  private async writeProgress(): Promise<void> {
    this.lastProgressWrite = Date.now();
    await this.host.updateOwned(this.job.id, this.attempt, (j) => {
      if (isFinal(j.state)) return null;
      j.currentStep = this.step;
      j.totalSteps = this.totalSteps;
      j.artifacts = [...this.artifacts];
      j.lastSequence = this.events.lastSequence;
      return j;
    });
  }

  private logEvent(level: LogLevel, message: string): void {
    this.events.emit({ $case: "log", log: { level, message } });
  }

  // ---- 5. the record -----------------------------------------------------------------------------

  /** Leaves the job RUNNING without an owner, for the next delivery to resume from its checkpoint. */
  private async handBack(error: Status | undefined): Promise<Settle> {
    this.logEvent(LogLevel.LOG_LEVEL_WARNING, `attempt ${this.attempt} failed (${error?.message ?? "stopped"}); it will be retried`);
    await this.events.flush();
    await this.host.updateOwned(this.job.id, this.attempt, (j, rec) => {
      j.currentStep = this.step;
      j.artifacts = [...this.artifacts];
      j.lastSequence = this.events.lastSequence;
      rec.worker = "";
      return j;
    });
    return "retry";
  }

  /**
   * Makes the job final: the LoRA uploaded, then the record, then the final event — in that order, so
   * a client that reads the job when it sees that event finds the finished record with its LoRA.
   */
  private async finish(outcome: { state: JobState; error?: Status }): Promise<Settle> {
    let lora: Artifact | undefined;
    if (outcome.state === JobState.JOB_STATE_SUCCEEDED) {
      const a = this.published(this.report.lora);
      if (!a) throw new Error("the engine's LoRA has no usable name");
      await a.upload();
      lora = a.artifact;
    }
    const endTime = new Date();
    await this.host.updateOwned(this.job.id, this.attempt, (j) => {
      j.state = outcome.state;
      j.error = outcome.error;
      j.endTime = endTime;
      j.currentStep = this.step;
      j.totalSteps = this.totalSteps;
      j.artifacts = [...this.artifacts];
      j.lastSequence = this.events.lastSequence + 1; // the sequence of the event emitted next
      return j;
    });
    this.events.emit({ $case: "state", state: { state: outcome.state, error: outcome.error, lora } }, endTime);
    await this.events.flush();
    telemetry.jobFinished(outcome.state);
    log("info", "job finished", { job: this.job.id, state: JobState[outcome.state], error: outcome.error?.message ?? "" });
    await this.pruneOutputs();
    return "ack";
  }

  /**
   * Keeps this host's local copies within their bounds once a job ends. Job output folders
   * (LORAFORGE_JOB_OUTPUTS_MAX_MB): the least recently finished go (their artifacts are in the object
   * store), never this job's nor one that has not ended (a later attempt here resumes from the
   * checkpoints it left). Data set copies (LORAFORGE_DATASET_COPIES_MAX_MB) and generated class images
   * (LORAFORGE_CLASS_IMAGES_MAX_MB): least recently used first; a host runs one job at a time, so none is
   * in use now, and a later job fetches its set again or generates its class images again.
   */
  private async pruneOutputs(): Promise<void> {
    const root = path.dirname(this.outputDir);
    touch(this.outputDir);
    const bounds = diskBounds();
    // Class images the engine generated for DreamBooth jobs (its cache under the state dir, unless the
    // operator moved it with LORAFORGE_CACHE_DIR): a later job with the same settings generates them again.
    const copies = [
      { root: this.host.datasets.cacheRoot, bytes: bounds.datasetCopiesBytes },
      { root: path.join(this.host.stateDir, "cache", "class-images"), bytes: bounds.classImagesBytes },
    ];
    for (const { root: dir, bytes } of copies) {
      try {
        await pruneFolders(dir, bytes, () => false);
      } catch (err) {
        log("warn", "could not prune a local cache", { root: dir, err: String(err) });
      }
    }
    try {
      await pruneFolders(root, bounds.jobOutputsBytes, async (id) => {
        if (id === this.job.id) return true;
        let rec: JobRecord | null;
        try {
          rec = await this.host.store.get(id);
        } catch {
          return true; // the store cannot say: keep it
        }
        return rec !== null && !isFinal(rec.job.state);
      });
    } catch (err) {
      log("warn", "could not prune finished jobs' output folders", { root, err: String(err) });
    }
  }
}

// ---- 4. the end ----------------------------------------------------------------------------------

/** A failing exit code of the engine (its contract, engine/README.md) as a google.rpc code and reason. */
const EXIT_FAILURE: Record<number, { code: status; reason: string }> = {
  [ENGINE_EXIT.BAD_SPEC]: { code: status.INVALID_ARGUMENT, reason: "INVALID_SPEC" },
  [ENGINE_EXIT.BAD_DATA]: { code: status.FAILED_PRECONDITION, reason: "INVALID_DATASET" },
};
const TRAINING_FAILED = { code: status.INTERNAL, reason: "TRAINING_FAILED" };

/**
 * Maps how the engine ended to the job's next state and error. RUNNING means "retry": the engine
 * was killed by a signal nobody here sent, or could not start, and attempts remain; or the worker
 * was asked to hand the job back.
 */
export function decideOutcome(
  exit: EngineExit,
  report: EngineReport,
  stop: StopRequest | null,
  attempt: number,
  maxAttempts: number,
): { state: JobState; error?: Status } {
  if (exit.code === ENGINE_EXIT.OK && report.lora) return { state: JobState.JOB_STATE_SUCCEEDED };
  const stoppedByUs = stop !== null && (exit.code === ENGINE_EXIT.STOPPED || exit.signal !== null || exit.code === ENGINE_EXIT.OK);
  if (stoppedByUs && stop.kind === "requeue") return { state: JobState.JOB_STATE_RUNNING, error: stop.error };
  if (stoppedByUs) return { state: JobState.JOB_STATE_CANCELLED, error: stop.error };
  const failure = (exit.code !== null && EXIT_FAILURE[exit.code]) || TRAINING_FAILED;
  const meta = { attempt: String(attempt), ...(exit.code !== null ? { exit_code: String(exit.code) } : {}) };
  // The engine said why: its code (3, 9 or 13) and message, our reason for its exit code.
  const reported = report.error?.message || report.lastErrorLog;
  // A lost rank of a data-parallel run is retried like a killed engine, with the engine's account of it.
  const rankLost = exit.code === ENGINE_EXIT.RANK_LOST;
  if (reported && exit.signal === null && !rankLost)
    return { state: JobState.JOB_STATE_FAILED, error: jobError(report.error?.code || failure.code, failure.reason, reported, meta) };
  // Its last output stays in the worker's log: it names places on the worker's host.
  const how = exit.signal ? `was killed by ${exit.signal}` : exit.code === null ? "could not start" : `exited with code ${exit.code}`;
  const message = rankLost && reported ? reported : `the engine ${how} (its last output is in the worker's log)`;
  const retryable = exit.signal !== null || exit.code === null || rankLost;
  const reason = exit.signal ? "ENGINE_KILLED" : exit.code === null ? "ENGINE_NOT_STARTED" : rankLost ? "ENGINE_RANK_LOST" : failure.reason;
  const withSignal = exit.signal ? { ...meta, signal: exit.signal } : meta;
  if (retryable && attempt < maxAttempts) return { state: JobState.JOB_STATE_RUNNING, error: jobError(status.UNAVAILABLE, reason, message, withSignal) };
  const final = retryable ? `${message} (gave up after ${attempt} attempts)` : message;
  return { state: JobState.JOB_STATE_FAILED, error: jobError(retryable ? status.INTERNAL : failure.code, reason, final, withSignal) };
}

/** One hasher per engine: a worker hashes its copy of a named model once while its files stay the same. */
const hashers = new Map<string, ModelHasher>();

/**
 * A job's "models/<name>" base model as a folder in this worker's models folder, or the error that
 * ends the job: FAILED_PRECONDITION MODEL_NOT_FOUND when this host has no such model, MODEL_CHANGED
 * when its copy's content hash is not `submittedHash` (the server's copy when the job was submitted).
 */
export async function resolveNamedModel(name: string, submittedHash: string, engine: EngineOptions): Promise<{ dir: string } | { error: Status }> {
  const dir = modelFolder(engine.modelsDir, name);
  if (!dir)
    return {
      error: jobError(
        status.FAILED_PRECONDITION,
        "MODEL_NOT_FOUND",
        `base model ${name} is not in the models folder of worker host ${hostname()}; put the same model there (LORAFORGE_MODELS_DIR) or train on a worker that has it`,
        { base_model: name, worker_host: hostname() },
      ),
    };
  if (!submittedHash) return { dir };
  const key = `${engine.python}\0${engine.engineDir}`;
  let hasher = hashers.get(key);
  if (!hasher) hashers.set(key, (hasher = new ModelHasher(engine)));
  let hash: string;
  try {
    hash = await hasher.hashOf(dir);
  } catch (err) {
    log("warn", "could not hash this worker's copy of a named base model", { model: name, err: String(err) });
    return { error: jobError(status.FAILED_PRECONDITION, "MODEL_NOT_FOUND", `base model ${name} on worker host ${hostname()} could not be read`, { base_model: name, worker_host: hostname() }) };
  }
  if (hash === submittedHash) return { dir };
  return {
    error: jobError(
      status.FAILED_PRECONDITION,
      "MODEL_CHANGED",
      `${name} on worker host ${hostname()} is not the model the job was submitted with (content hash ${hash}, submitted ${submittedHash})`,
      { base_model: name, worker_host: hostname(), model_hash: hash, submitted_hash: submittedHash },
    ),
  };
}
