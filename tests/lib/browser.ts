// Helpers for the dashboard tests: a real headless Chromium (Debian's `chromium`
// driven by playwright-core), and a loraforge stack run inside the test process
// (managed nats-server, the stores, Jobs, a worker running the real engine, the
// dashboard) so the test holds `jobs` and the dashboard's address directly.
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { chromium, type Browser } from "playwright-core";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import { createClient, type LoraforgeClient } from "@loraforge/sdk";
import { TrainerServiceService } from "@loraforge/sdk/gen/loraforge/v1/trainer_service";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { ArtifactStore } from "@loraforge/server/jobs/artifacts";
import { DatasetStore } from "@loraforge/server/jobs/datasets";
import { startDashboard } from "@loraforge/server/dashboard/index";
import { Jobs } from "@loraforge/server/jobs/jobs";
import { ManagedNats } from "@loraforge/server/core/nats-managed";
import { trainerService } from "@loraforge/server/api/trainer-service";
import { JobStore } from "@loraforge/server/jobs/store";
import { Worker } from "@loraforge/server/jobs/worker";
import { PYTHON, REPO, tmpDir } from "./harness.js";

export const CHROMIUM = process.env.LORAFORGE_CHROMIUM ?? "/usr/bin/chromium";
/** Where tests leave files for people to look at (screenshots). */
export const TEST_ARTIFACTS = path.join(REPO, "tests", "artifacts");

/** Headless Chromium; --no-sandbox because tests may run as root in containers. */
export async function launchBrowser(): Promise<Browser> {
  if (!existsSync(CHROMIUM)) throw new Error(`Chromium not found at ${CHROMIUM} (scripts/setup.sh installs it; LORAFORGE_CHROMIUM overrides)`);
  return chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-dev-shm-usage"], headless: true });
}

export function artifactPath(name: string): string {
  mkdirSync(TEST_ARTIFACTS, { recursive: true });
  return path.join(TEST_ARTIFACTS, name);
}

export interface DashboardStack {
  jobs: Jobs;
  /** The SDK, connected to this stack's gRPC API. */
  client: LoraforgeClient;
  /** The dashboard's address, ending in "/". */
  url: string;
  natsUrl: string;
  close(): Promise<void>;
}

/** nats-server + stores (jobs, artifacts, data sets) + Jobs + the gRPC API + a worker (the real engine) + the dashboard, in this process. */
export async function startDashboardStack(opts: { token?: string } = {}): Promise<DashboardStack> {
  const stateDir = tmpDir("dashboard");
  const nats = await ManagedNats.start(stateDir);
  let nc: NatsConnection | null = null;
  try {
    nc = await connect({ servers: nats.url, name: "loraforge-dashboard-test" });
    const store = await JobStore.open(nc, 60_000);
    const artifacts = await ArtifactStore.open(nc);
    const datasets = new DatasetStore(artifacts, path.join(stateDir, "datasets"));
    const jobs = new Jobs(store, artifacts, datasets, []);
    const worker = new Worker(store, artifacts, datasets, { engine: { python: PYTHON, engineDir: path.join(REPO, "engine") }, stateDir });
    worker.start();
    const grpc = new Server();
    grpc.addService(TrainerServiceService, trainerService(jobs, { version: "test", natsUrls: [nats.url], eventsStream: "", eventSubjectPattern: "" }));
    const port = await new Promise<number>((resolve, reject) =>
      grpc.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const client = createClient({ address: `127.0.0.1:${port}` });
    const dashboard = await startDashboard(jobs, { address: "127.0.0.1:0", token: opts.token });
    const conn = nc;
    return {
      jobs,
      client,
      url: dashboard.url,
      natsUrl: nats.url,
      async close() {
        client.close();
        await dashboard.close();
        await worker.stop();
        grpc.forceShutdown();
        await conn.drain();
        await nats.stop();
      },
    };
  } catch (err) {
    await nc?.close();
    await nats.stop();
    throw err;
  }
}
