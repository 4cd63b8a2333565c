// `loraforge serve` and `loraforge worker`: long-running processes. Telemetry starts
// before the rest of the server is loaded.
import { startTelemetry } from "../core/otel.js";

export const DAEMON_USAGE = `usage: loraforge serve  [--address HOST:PORT] [--state-dir DIR] [--nats URL] [--data-root DIR]... [--models-dir DIR] [--no-worker] [--dashboard HOST:PORT|off]
       loraforge worker --nats URL [--state-dir DIR] [--models-dir DIR]

serve:  the loraforge gRPC API, a training worker and, unless a NATS URL is given, a
        managed local nats-server whose data lives under the state directory.
worker: a training worker alone (one per GPU): pulls jobs from NATS and runs them.

Options (each also settable by environment variable):
  --address HOST:PORT   gRPC listen address; port 0 picks one   LORAFORGE_ADDRESS   (127.0.0.1:50051)
  --state-dir DIR       job outputs and managed NATS data        LORAFORGE_STATE_DIR (./.state)
  --nats URL            use this NATS server                     LORAFORGE_NATS_URL  (managed)
                        with LORAFORGE_NATS_USER / LORAFORGE_NATS_PASSWORD if it needs them; a
                        managed one's are in <state dir>/nats/credentials.json; for a cluster give
                        every node, comma-separated (nats://a:4222,nats://b:4222,…), and set
                        LORAFORGE_NATS_REPLICAS=3 (copies of each stream, bucket and object store)
  --data-root DIR       confine dataset/model paths (repeatable) LORAFORGE_DATA_ROOTS (anywhere)
  --models-dir DIR      base models by name: each diffusers      LORAFORGE_MODELS_DIR (<state dir>/models)
                        subfolder <name> is "models/<name>"; each worker resolves names in its own
  --no-worker           API only, no training worker             LORAFORGE_WORKER=0
  --dashboard HOST:PORT|off  live web dashboard                  LORAFORGE_DASHBOARD_ADDRESS (127.0.0.1:8080)
                        protect it with LORAFORGE_DASHBOARD_TOKEN (default: LORAFORGE_API_TOKEN)
  API token             every RPC needs Bearer <token>           LORAFORGE_API_TOKEN (none)
Engine: LORAFORGE_PYTHON (engine/.venv/bin/python), LORAFORGE_ENGINE_DIR (engine/).

Telemetry: the standard OTEL_* variables, e.g. OTEL_TRACES_EXPORTER=otlp
      OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318, OTEL_METRICS_EXPORTER=prometheus
      (scrape :9464/metrics). Unset: no telemetry is exported.
Jobs: LORAFORGE_ACK_WAIT_MS (60000) — a silent worker's job is redelivered after this;
      LORAFORGE_MAX_ATTEMPTS (3) — starts of a job before a retryable failure is final.
Devices a worker advertises (it pulls only jobs that fit): LORAFORGE_WORKER_DEVICE_KIND (cpu|cuda),
      LORAFORGE_WORKER_DEVICES (count), LORAFORGE_WORKER_DEVICE_MEMORY_MB (per device); detected when unset.
Limits (docs/security.md): LORAFORGE_UPLOAD_MAX_MB (2048), LORAFORGE_UPLOAD_MAX_FILE_MB (32),
      LORAFORGE_UPLOAD_MAX_FILES (50000), LORAFORGE_UPLOAD_MAX_IMAGE_SIDE (8192),
      LORAFORGE_INFER_MAX_PROMPT_CHARS (4096), LORAFORGE_INFER_LORA_CACHE_MB (2048).

On SIGTERM or SIGINT, serve stops accepting work, stops the running job (it ends
CANCELLED after a checkpoint), flushes NATS and exits 0; worker checkpoints its job and
hands it back to the queue for another worker to resume.`;

export async function runDaemon(command: "serve" | "worker", rest: string[]): Promise<number> {
  const stopTelemetry = await startTelemetry();
  const { configFromEnv, startServer, startWorker } = await import("../server.js");
  const { log } = await import("../core/log.js");
  const env: NodeJS.ProcessEnv = { ...process.env };
  const roots: string[] = [];
  for (let i = 0; i < rest.length; i++) {
    const flag = rest[i];
    const value = () => {
      const v = rest[++i];
      if (v === undefined) throw new Error(`${flag} needs a value`);
      return v;
    };
    if (flag === "--address") env.LORAFORGE_ADDRESS = value();
    else if (flag === "--state-dir") env.LORAFORGE_STATE_DIR = value();
    else if (flag === "--nats") env.LORAFORGE_NATS_URL = value();
    else if (flag === "--data-root") roots.push(value());
    else if (flag === "--models-dir") env.LORAFORGE_MODELS_DIR = value();
    else if (flag === "--no-worker") env.LORAFORGE_WORKER = "0";
    else if (flag === "--dashboard") env.LORAFORGE_DASHBOARD_ADDRESS = value();
    else if (flag === "--help" || flag === "-h") {
      console.log(DAEMON_USAGE);
      return 0;
    } else {
      console.error(`loraforge serve: unknown option ${JSON.stringify(flag)}\n\n${DAEMON_USAGE}`);
      return 2;
    }
  }
  if (roots.length) env.LORAFORGE_DATA_ROOTS = roots.join(":");
  if (command === "worker" && !env.LORAFORGE_NATS_URL) throw new Error("worker needs --nats URL (or LORAFORGE_NATS_URL)");
  const server = command === "serve" ? await startServer(configFromEnv(env)) : await startWorker(configFromEnv(env));
  // One line on stdout that scripts (and the tests) wait for.
  if (command === "serve") console.log(`loraforge: listening on ${server.address} (nats ${server.natsUrl})`);
  if (command === "serve" && server.dashboardUrl) console.log(`loraforge: dashboard on ${server.dashboardUrl}`);
  else if (command === "worker") console.log(`loraforge: worker ready (nats ${server.natsUrl})`);
  const fatal = await new Promise<Error | null>((resolve) => {
    const onSignal = (sig: string) => {
      log("info", `received ${sig}`);
      resolve(null);
    };
    process.once("SIGTERM", () => onSignal("SIGTERM"));
    process.once("SIGINT", () => onSignal("SIGINT"));
    void server.failed.then(resolve);
  });
  if (fatal) {
    // No NATS to flush to: stop the job and the API, but do not wait on the store for long.
    log("error", "stopping: NATS is gone", { err: fatal.message });
    await Promise.race([server.close(), new Promise((r) => setTimeout(r, 15_000).unref())]);
    await stopTelemetry();
    console.error(`loraforge ${command}: ${fatal.message}`);
    return 1;
  }
  await server.close();
  await stopTelemetry();
  return 0;
}

