// Assembles one loraforge server: NATS (configured or managed), the job store, the
// gRPC API with health checking, and the in-process worker; and takes it apart in
// the right order on shutdown.
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import { HealthImplementation } from "grpc-health-check";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { TrainerServiceService } from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { log } from "./log.js";
import { ManagedNats } from "./nats-managed.js";
import { trainerService, type ServiceState } from "./service.js";
import { JobStore } from "./store.js";
import { Worker } from "./worker.js";

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

export interface ServerConfig {
  /** host:port for gRPC; port 0 picks a free one. Default 127.0.0.1:50051. */
  address: string;
  /** Job outputs and the managed nats-server's data live here. */
  stateDir: string;
  /** An existing NATS server; unset starts a managed local nats-server. */
  natsUrl?: string;
  /** Python interpreter with the engine's dependencies. */
  python: string;
  /** Folder holding the loraforge_engine package. */
  engineDir: string;
  /** User-supplied paths must lie inside these; empty allows any path. */
  dataRoots: string[];
  /** Run a worker inside this server (default true). */
  worker: boolean;
}

/** Configuration from LORAFORGE_* environment variables, with defaults. */
export function configFromEnv(env = process.env): ServerConfig {
  const venvPython = path.join(REPO_ROOT, "engine", ".venv", "bin", "python");
  return {
    address: env.LORAFORGE_ADDRESS ?? "127.0.0.1:50051",
    stateDir: path.resolve(env.LORAFORGE_STATE_DIR ?? ".state"),
    natsUrl: env.LORAFORGE_NATS_URL || undefined,
    python: env.LORAFORGE_PYTHON ?? (existsSync(venvPython) ? venvPython : "python3"),
    engineDir: env.LORAFORGE_ENGINE_DIR ?? path.join(REPO_ROOT, "engine"),
    dataRoots: (env.LORAFORGE_DATA_ROOTS ?? "").split(":").filter(Boolean).map((p) => path.resolve(p)),
    worker: env.LORAFORGE_WORKER !== "0",
  };
}

export interface RunningServer {
  /** The bound gRPC address, host:port. */
  address: string;
  natsUrl: string;
  /** Graceful stop: refuse new work, stop running jobs, flush NATS, stop a managed nats-server. */
  close(): Promise<void>;
}

export async function startServer(cfg: ServerConfig): Promise<RunningServer> {
  const managed = cfg.natsUrl ? null : await ManagedNats.start(cfg.stateDir);
  const natsUrl = cfg.natsUrl ?? managed!.url;
  let nc: NatsConnection | null = null;
  try {
    nc = await connect({ servers: natsUrl, name: "loraforge-server", maxReconnectAttempts: -1 });
    const store = await JobStore.open(nc);
    const state: ServiceState = { shuttingDown: false };

    const grpcServer = new Server();
    grpcServer.addService(TrainerServiceService, trainerService(store, { roots: cfg.dataRoots }, state));
    const health = new HealthImplementation({ "": "SERVING", "loraforge.v1.TrainerService": "SERVING" });
    health.addToServer(grpcServer);
    const port = await new Promise<number>((resolve, reject) =>
      grpcServer.bindAsync(cfg.address, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const host = cfg.address.slice(0, cfg.address.lastIndexOf(":"));

    const worker = cfg.worker
      ? new Worker(store, { engine: { python: cfg.python, engineDir: cfg.engineDir }, stateDir: cfg.stateDir })
      : null;
    worker?.start();

    let closing: Promise<void> | null = null;
    const close = () =>
      (closing ??= (async () => {
        log("info", "shutting down");
        state.shuttingDown = true;
        health.setStatus("", "NOT_SERVING");
        health.setStatus("loraforge.v1.TrainerService", "NOT_SERVING");
        await worker?.stop();
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
        await nc!.drain();
        await managed?.stop();
        log("info", "stopped");
      })());
    return { address: `${host}:${port}`, natsUrl, close };
  } catch (err) {
    await nc?.close();
    await managed?.stop();
    throw err;
  }
}
