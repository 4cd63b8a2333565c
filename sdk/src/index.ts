// @loraforge/sdk: train LoRAs on a loraforge server, follow their progress, manage jobs.
export { createClient, LoraforgeClient, JobHandle, FINAL_STATES, stateName } from "./client.js";
export type { ClientOptions, TrainOptions, ProgressOptions, ListJobsOptions } from "./client.js";
export {
  LoraforgeError,
  InvalidSpecError,
  JobNotFoundError,
  JobAlreadyFinalError,
  UnavailableError,
  fromGrpcError,
} from "./errors.js";
export type { FieldViolation } from "./errors.js";
export {
  Job,
  JobEvent,
  JobState,
  Artifact,
  ArtifactKind,
  LogLevel,
  StepMetrics,
  StateChanged,
  CheckpointSaved,
  ValidationImages,
  LogLine,
} from "./gen/loraforge/v1/job.js";
export { TrainingSpec } from "./gen/loraforge/v1/training_spec.js";
