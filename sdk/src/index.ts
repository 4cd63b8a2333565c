// @loraforge/sdk: train LoRAs on a loraforge server, follow their progress, manage
// jobs, download artifacts, upload data sets, render images, and read job events
// from NATS.
export {
  createClient,
  LoraforgeClient,
  JobHandle,
  Jobs,
  Artifacts,
  Datasets,
  FINAL_STATES,
  stateName,
  trainingSpec,
  artifactJobId,
  artifactFileName,
} from "./client.js";
export type { ClientOptions, CallOpts, TrainOptions, ProgressOptions, ListJobsOptions, DownloadTarget, SpecInput, DatasetSource, InferInput } from "./client.js";
export { subscribe } from "./subscribe.js";
export type { SubscribeOptions, EventKind } from "./subscribe.js";
export {
  LoraforgeError,
  InvalidSpecError,
  JobNotFoundError,
  JobAlreadyFinalError,
  UnavailableError,
  fromGrpcError,
  errorFromStatus,
  errorMessage,
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
  DatasetReport,
  ClassImageProgress,
  SkippedImage,
  SkipReason,
  CaptionSource,
  ImageSizeCount,
  BucketCount,
} from "./gen/loraforge/v1/job.js";
export { TrainingSpec, LrScheduler, MixedPrecision, Interpolation, PredictionType, LoraFormat, DeviceKind } from "./gen/loraforge/v1/training_spec.js";
export { Sampler } from "./gen/loraforge/v1/inference_service.js";
export type { Status } from "./gen/google/rpc/status.js";
export type { Dataset } from "./gen/loraforge/v1/dataset_service.js";
export type { GetServerInfoResponse } from "./gen/loraforge/v1/trainer_service.js";
export type { InferRequest, InferResponse, LoraRef, ListModelsResponse, TrainedLora, BaseModel } from "./gen/loraforge/v1/inference_service.js";
