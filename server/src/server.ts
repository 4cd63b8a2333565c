// Assembles one loraforge process: NATS (configured or managed), the job and
// artifact stores, and — for `serve` — the gRPC API with health checking and
// server reflection plus an in-process worker, or — for `worker` — a worker
// alone. Takes it apart in the right order on shutdown.
import { stateName } from "@loraforge/sdk";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import { HealthImplementation } from "grpc-health-check";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { TrainerServiceService } from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { ArtifactStore } from "./jobs/artifacts.js";
import { DatasetStore, limitsFromEnv, type DatasetLimits } from "./jobs/datasets.js";
import { diskBounds } from "./jobs/disk.js";
import { tokenInterceptor } from "./api/auth.js";
import { addReflection } from "./api/contract.js";
import { addInferenceService } from "./infer/index.js";
import { startDashboard } from "./dashboard/index.js";
import { log } from "./core/log.js";
import { ModelHasher } from "./core/models.js";
import { ManagedNats } from "./core/nats-managed.js";
import { Jobs } from "./jobs/jobs.js";
import { datasetService, trainerService } from "./api/trainer-service.js";
import { DatasetServiceService } from "@loraforge/sdk/gen/loraforge/v1/dataset_service";
import { EVENTS_STREAM, eventSubject, JobStore, QUEUE_STREAM, WORKERS_CONSUMER } from "./jobs/store.js";
import { telemetry } from "./core/telemetry.js";

import { Worker } from "./jobs/worker.js";
import { overridesFromEnv, type DeviceOverrides } from "./jobs/capabilities.js";

/** The server package's version, as GetServerInfo reports it. */
const VERSION: string = JSON.parse(readFileSync(fileURLToPath(new URL("../package.json", import.meta.url)), "utf8")).version;

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

export interface ServerConfig {
  /** host:port for gRPC; port 0 picks a free one. Default 127.0.0.1:50051. */
  address: string;
  /** Job outputs and the managed nats-server's data live here. */
  stateDir: string;
  /** An existing NATS server; unset starts a managed local nats-server (with generated credentials). */
  natsUrl?: string;
  /** User and password for `natsUrl` (LORAFORGE_NATS_USER, LORAFORGE_NATS_PASSWORD). */
  natsUser?: string;
  natsPassword?: string;
  /** Python interpreter with the engine's dependencies. */
  python: string;
  /** Folder holding the loraforge_engine package. */
  engineDir: string;
  /** User-supplied paths must lie inside these; empty allows any path. */
  dataRoots: string[];
  /** Base models by name: each subfolder holding a diffusers model is "models/<subfolder>" (LORAFORGE_MODELS_DIR, default <stateDir>/models). */
  modelsDir: string;
  /** Run a worker inside this server (default true). */
  worker: boolean;
  /** A worker silent this long (no in-progress ack) is presumed dead; its job is redelivered. Default 60 s. */
  ackWaitMs: number;
  /** Starts of a job before a retryable failure (engine killed, worker died) is final. Default 3. */
  maxAttempts: number;
  /** When set, every RPC but health checks needs `authorization: Bearer <apiToken>`. */
  apiToken?: string;
  /** Copies of each JetStream stream and bucket in a NATS cluster (set when they are created). Default 1. */
  natsReplicas: number;
  /** The dashboard's HTTP host:port; undefined turns it off. Default 127.0.0.1:8080. */
  dashboardAddress?: string;
  /** When set, every dashboard request needs this token (default: the API token). */
  dashboardToken?: string;
  /** Limits of one data set upload (LORAFORGE_UPLOAD_*). */
  uploadLimits?: DatasetLimits;
  /** The worker's device overrides (LORAFORGE_WORKER_DEVICE_KIND, _DEVICES, _DEVICE_MEMORY_MB); unset ones are detected. */
  workerDevices?: DeviceOverrides;
}

/** Configuration from LORAFORGE_* environment variables, with defaults. */
export function configFromEnv(env = process.env): ServerConfig {
  const venvPython = path.join(REPO_ROOT, "engine", ".venv", "bin", "python");
  const num = (v: string | undefined, d: number) => (v && Number.isFinite(Number(v)) ? Number(v) : d);
  diskBounds(env); // a bad LORAFORGE_*_MAX_MB bound is refused at start, not when a job ends
  const stateDir = path.resolve(env.LORAFORGE_STATE_DIR ?? ".state");
  return {
    address: env.LORAFORGE_ADDRESS ?? "127.0.0.1:50051",
    stateDir,
    natsUrl: env.LORAFORGE_NATS_URL || undefined,
    natsUser: env.LORAFORGE_NATS_USER || undefined,
    natsPassword: env.LORAFORGE_NATS_PASSWORD || undefined,
    python: env.LORAFORGE_PYTHON ?? (existsSync(venvPython) ? venvPython : "python3"),
    engineDir: env.LORAFORGE_ENGINE_DIR ?? path.join(REPO_ROOT, "engine"),
    dataRoots: (env.LORAFORGE_DATA_ROOTS ?? "").split(":").filter(Boolean).map((p) => path.resolve(p)),
    modelsDir: path.resolve(env.LORAFORGE_MODELS_DIR || path.join(stateDir, "models")),
    worker: env.LORAFORGE_WORKER !== "0",
    ackWaitMs: num(env.LORAFORGE_ACK_WAIT_MS, 60_000),
    maxAttempts: num(env.LORAFORGE_MAX_ATTEMPTS, 3),
    apiToken: env.LORAFORGE_API_TOKEN || undefined,
    natsReplicas: num(env.LORAFORGE_NATS_REPLICAS, 1),
    dashboardAddress: (env.LORAFORGE_DASHBOARD_ADDRESS ?? "127.0.0.1:8080") === "off" ? undefined : (env.LORAFORGE_DASHBOARD_ADDRESS ?? "127.0.0.1:8080"),
    dashboardToken: env.LORAFORGE_DASHBOARD_TOKEN || env.LORAFORGE_API_TOKEN || undefined,
    uploadLimits: limitsFromEnv(env),
    workerDevices: overridesFromEnv(env),
  };
}

export interface Running {
  /** The bound gRPC address, host:port ("" for a worker alone). */
  address: string;
  natsUrl: string;
  /** The dashboard's URL; "" when off. */
  dashboardUrl: string;
  /** Graceful stop: refuse new work, stop the running job, flush NATS, stop a managed nats-server. */
  close(): Promise<void>;
  /** Settles when the managed nats-server could not be restarted: the caller should close and exit non-zero. */
  failed: Promise<Error>;
}

/**
 * Health follows NATS: NOT_SERVING from the moment the connection drops (or the managed nats-server
 * exits) until the client has reconnected, while `closing()` is false.
 */
function followNats(stores: Awaited<ReturnType<typeof openStores>>, setServing: (serving: boolean) => void, closing: () => boolean) {
  const set = (serving: boolean) => {
    if (closing()) return;
    log(serving ? "info" : "warn", serving ? "NATS is back; health SERVING" : "NATS is unreachable; health NOT_SERVING");
    setServing(serving);
  };
  stores.managed?.on("down", () => set(false));
  void (async () => {
    for await (const s of stores.nc.status()) {
      if (s.type === "disconnect") set(false);
      else if (s.type === "reconnect") set(true);
    }
  })();
}

/** NATS (managed when no URL is configured), the stores, and how to close them. */
async function openStores(cfg: ServerConfig) {
  const managed = cfg.natsUrl ? null : await ManagedNats.start(cfg.stateDir, undefined, [], { auth: true });
  const natsUrl = cfg.natsUrl ?? managed!.url;
  const creds = managed ? managed.credentials : cfg.natsUser ? { user: cfg.natsUser, pass: cfg.natsPassword ?? "" } : {};
  let nc: NatsConnection | null = null;
  try {
    // Reconnect for as long as it takes: a managed nats-server that died is restarted on the same
    // port, usually within a second, so retry that one often; a cluster's other nodes take over.
    nc = await connect({
      servers: natsUrl.split(",").map((u) => u.trim()).filter(Boolean),
      name: "loraforge",
      reconnect: true,
      maxReconnectAttempts: -1,
      ...(managed ? { reconnectTimeWait: 250 } : {}),
      ...creds,
    });
    const store = await JobStore.open(nc, cfg.worker ? cfg.ackWaitMs : undefined, cfg.natsReplicas);
    const artifacts = await ArtifactStore.open(nc, cfg.natsReplicas);
    // Uploaded sets live in the object store; this host keeps copies under <state dir>/datasets.
    const datasets = new DatasetStore(artifacts, path.join(cfg.stateDir, "datasets"));
    const close = async () => {
      await nc!.drain();
      await managed?.stop();
    };
    // Settles only when the managed nats-server is down for good (see ManagedNats): the process must stop.
    const failed = new Promise<Error>((resolve) => managed?.once("fatal", resolve));
    return { natsUrl, nc, managed, store, artifacts, datasets, close, failed };
  } catch (err) {
    await nc?.close();
    await managed?.stop();
    throw err;
  }
}

function newWorker(cfg: ServerConfig, stores: Awaited<ReturnType<typeof openStores>>, onStop: "cancel" | "requeue") {
  return new Worker(stores.store, stores.artifacts, stores.datasets, {
    engine: { python: cfg.python, engineDir: cfg.engineDir, modelsDir: cfg.modelsDir, dataRoots: cfg.dataRoots },
    stateDir: cfg.stateDir,
    maxAttempts: cfg.maxAttempts,
    heartbeatMs: Math.max(200, Math.floor(cfg.ackWaitMs / 4)),
    onStop,
    devices: cfg.workerDevices,
  });
}

/** `loraforge serve`: the API, health checking and (unless disabled) a worker. */
export async function startServer(cfg: ServerConfig): Promise<Running> {
  const stores = await openStores(cfg);
  try {
    const jobs = new Jobs(stores.store, stores.artifacts, stores.datasets, cfg.dataRoots, {
      dir: cfg.modelsDir,
      // A model changed in the last second may be recorded with its old hash; a worker then refuses
      // the job (MODEL_CHANGED) rather than train on another model.
      hasher: new ModelHasher({ python: cfg.python, engineDir: cfg.engineDir }, 1000),
    });
    const dashboard = cfg.dashboardAddress ? await startDashboard(jobs, { address: cfg.dashboardAddress, token: cfg.dashboardToken }) : null;
    const grpcServer = new Server({ interceptors: cfg.apiToken ? [tokenInterceptor(cfg.apiToken)] : [] });
    const info = {
      version: VERSION,
      natsUrls: stores.natsUrl.split(",").map((u) => u.trim()).filter(Boolean),
      eventsStream: EVENTS_STREAM,
      eventSubjectPattern: eventSubject("<job_id>", "<kind>"),
    };
    grpcServer.addService(TrainerServiceService, trainerService(jobs, info));
    grpcServer.addService(DatasetServiceService, datasetService(stores.datasets, jobs, cfg.uploadLimits));
    const inference = addInferenceService(grpcServer, { store: stores.store, config: cfg });
    const health = new HealthImplementation({
      "": "SERVING",
      "loraforge.v1.TrainerService": "SERVING",
      "loraforge.v1.InferenceService": "SERVING",
      "loraforge.v1.DatasetService": "SERVING",
    });
    health.addToServer(grpcServer);
    const services = ["", "loraforge.v1.TrainerService", "loraforge.v1.InferenceService", "loraforge.v1.DatasetService"];
    const setServing = (serving: boolean) => {
      for (const s of services) health.setStatus(s, serving ? "SERVING" : "NOT_SERVING");
    };
    // Lets grpcurl and `buf curl` list and call every service without local .proto files.
    addReflection(grpcServer);
    const port = await new Promise<number>((resolve, reject) =>
      grpcServer.bindAsync(cfg.address, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const host = cfg.address.slice(0, cfg.address.lastIndexOf(":"));
    // The in-process worker ends its job CANCELLED on shutdown: with one process
    // there is no other worker to hand it to.
    const worker = cfg.worker ? newWorker(cfg, stores, "cancel") : null;
    worker?.start();
    telemetry.observeJobs(
      async () => {
        const counts: Record<string, number> = {};
        for (const id of await stores.store.jobIds()) {
          const s = (await stores.store.get(id))?.job.state;
          if (s !== undefined) counts[stateName(s)] = (counts[stateName(s)] ?? 0) + 1;
        }
        return counts;
      },
      async () => {
        const info = await stores.store.jsm.consumers.info(QUEUE_STREAM, WORKERS_CONSUMER);
        return info.num_pending + info.num_ack_pending;
      },
    );

    let closing: Promise<void> | null = null;
    const close = () =>
      (closing ??= (async () => {
        log("info", "shutting down");
        jobs.shuttingDown = true;
        setServing(false);
        await worker?.stop();
        await dashboard?.close();
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            grpcServer.forceShutdown();
            resolve();
          }, 5000);
          grpcServer.tryShutdown(() => {
            clearTimeout(timer);
            resolve();
          });
        });
        await inference.close();
        await stores.close();
        log("info", "stopped");
      })());
    followNats(stores, setServing, () => closing !== null);
    // Where this server can be reached, for scripts and event consumers on this host.
    writeFileSync(
      path.join(cfg.stateDir, "server.json"),
      JSON.stringify({ pid: process.pid, address: `${host}:${port}`, dashboard: dashboard?.url ?? "", ...info }, null, 2) + "\n",
    );
    return { address: `${host}:${port}`, natsUrl: stores.natsUrl, dashboardUrl: dashboard?.url ?? "", close, failed: stores.failed };
  } catch (err) {
    await stores.close();
    throw err;
  }
}

/**
 * `loraforge worker`: pulls and runs jobs, nothing else. On shutdown the running
 * job is checkpointed and handed back to the queue for another worker to resume.
 */
export async function startWorker(cfg: ServerConfig): Promise<Running> {
  const stores = await openStores(cfg);
  const worker = newWorker(cfg, stores, "requeue");
  worker.start();
  log("info", "worker started", { id: worker.id, nats: stores.natsUrl });
  let closing: Promise<void> | null = null;
  const close = () =>
    (closing ??= (async () => {
      await worker.stop("the worker shut down; the job goes back to the queue");
      await stores.close();
    })());
  return { address: "", natsUrl: stores.natsUrl, dashboardUrl: "", close, failed: stores.failed };
}
