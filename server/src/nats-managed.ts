// A local nats-server (JetStream on, data under the state directory) started and
// stopped by `loraforge serve` when no NATS URL is configured.
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { createServer } from "node:net";
import path from "node:path";
import { childEnv } from "./child-env.js";
import { log } from "./log.js";

export function findNatsServer(): string {
  const explicit = process.env.LORAFORGE_NATS_SERVER;
  if (explicit) return explicit;
  for (const dir of [...(process.env.PATH ?? "").split(":"), "/usr/sbin", "/usr/local/bin", "/usr/bin"]) {
    const p = path.join(dir, "nats-server");
    if (dir && existsSync(p)) return p;
  }
  throw new Error("nats-server not found: run scripts/setup.sh (apt-get install nats-server) or set LORAFORGE_NATS_URL");
}

/** A free TCP port on the loopback interface. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

export class ManagedNats {
  private constructor(
    private readonly child: ChildProcess,
    readonly url: string,
  ) {}

  static async start(stateDir: string, port?: number, extraArgs: string[] = []): Promise<ManagedNats> {
    const dataDir = path.join(stateDir, "nats");
    mkdirSync(dataDir, { recursive: true });
    const p = port ?? (await freePort());
    const bin = findNatsServer();
    const child = spawn(bin, ["-a", "127.0.0.1", "-p", String(p), "-js", "-sd", dataDir, ...extraArgs], {
      stdio: ["ignore", "ignore", "pipe"],
      env: childEnv(),
    });
    const output: string[] = [];
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nats-server did not become ready: ${output.join("")}`)), 20_000);
      child.stderr!.on("data", (d: Buffer) => {
        output.push(d.toString());
        if (output.join("").includes("Server is ready")) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.on("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`nats-server exited with code ${code}: ${output.join("")}`));
      });
    });
    child.removeAllListeners("exit");
    child.stderr!.removeAllListeners("data");
    child.stderr!.resume();
    log("info", "managed nats-server started", { url: `nats://127.0.0.1:${p}`, pid: child.pid, data: dataDir });
    return new ManagedNats(child, `nats://127.0.0.1:${p}`);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once("exit", r));
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  }
}
