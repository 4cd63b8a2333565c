#!/usr/bin/env node
// The `loraforge` command line. `serve` runs the API, a worker and (without
// LORAFORGE_NATS_URL) a managed nats-server until SIGTERM or SIGINT.
import { configFromEnv, startServer } from "./server.js";
import { log } from "./log.js";

const USAGE = `usage: loraforge serve [--address HOST:PORT] [--state-dir DIR] [--nats URL] [--no-worker]

Runs the loraforge gRPC API, a training worker and, unless a NATS URL is given, a
managed local nats-server whose data lives under the state directory.

Options (each also settable by environment variable):
  --address HOST:PORT   gRPC listen address; port 0 picks one   LORAFORGE_ADDRESS   (127.0.0.1:50051)
  --state-dir DIR       job outputs and managed NATS data        LORAFORGE_STATE_DIR (./.state)
  --nats URL            use this NATS server                     LORAFORGE_NATS_URL  (managed)
  --data-root DIR       confine dataset/model paths (repeatable) LORAFORGE_DATA_ROOTS (anywhere)
  --no-worker           API only, no training worker             LORAFORGE_WORKER=0
Engine: LORAFORGE_PYTHON (engine/.venv/bin/python), LORAFORGE_ENGINE_DIR (engine/).

On SIGTERM or SIGINT it stops accepting work, stops running jobs (they end CANCELLED
after a checkpoint), flushes NATS and exits 0.`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === "--help" || command === "-h" || command === "help") {
    console.log(USAGE);
    return command ? 0 : 2;
  }
  if (command !== "serve") {
    console.error(`loraforge: unknown command ${JSON.stringify(command)}\n\n${USAGE}`);
    return 2;
  }
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
    else if (flag === "--no-worker") env.LORAFORGE_WORKER = "0";
    else if (flag === "--help" || flag === "-h") {
      console.log(USAGE);
      return 0;
    } else {
      console.error(`loraforge serve: unknown option ${JSON.stringify(flag)}\n\n${USAGE}`);
      return 2;
    }
  }
  if (roots.length) env.LORAFORGE_DATA_ROOTS = roots.join(":");
  const server = await startServer(configFromEnv(env));
  // One line on stdout that scripts (and the tests) wait for.
  console.log(`loraforge: listening on ${server.address} (nats ${server.natsUrl})`);
  await new Promise<void>((resolve) => {
    const onSignal = (sig: string) => {
      log("info", `received ${sig}`);
      resolve();
    };
    process.once("SIGTERM", () => onSignal("SIGTERM"));
    process.once("SIGINT", () => onSignal("SIGINT"));
  });
  await server.close();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`loraforge: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
