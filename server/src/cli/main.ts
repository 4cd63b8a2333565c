#!/usr/bin/env node
// The `loraforge` command line: `serve` and `worker` run the service; the other
// commands are clients of it (through @loraforge/sdk).
const [command, ...rest] = process.argv.slice(2);

async function main(): Promise<number> {
  if (command === "serve" || command === "worker") {
    const { runDaemon } = await import("./daemon.js");
    return runDaemon(command, rest);
  }
  const { CLIENT_USAGE, runClient } = await import("./client.js");
  const { DAEMON_USAGE } = await import("./daemon.js");
  if (!command || command === "--help" || command === "-h" || command === "help") {
    console.log(`${DAEMON_USAGE}\n\n${CLIENT_USAGE}`);
    return command ? 0 : 2;
  }
  return runClient(command, rest);
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`loraforge: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
