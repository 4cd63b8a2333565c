// A local nats-server (JetStream on, data under the state directory) started and
// stopped by `loraforge serve` when no NATS URL is configured. One per storage directory:
// pid files there name the process that owns it and its nats-server, so a start after
// `kill -9` of the owner stops the orphaned nats-server first, and a second owner is refused.
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
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

/** The pid in `file`, when that process is alive and its command line contains `needle`; else null. */
function livePid(file: string, needle: string): number | null {
  let pid: number;
  try {
    pid = Number(readFileSync(file, "utf8").trim());
  } catch {
    return null;
  }
  if (!Number.isSafeInteger(pid) || pid <= 1 || pid === process.pid) return null;
  try {
    // Pids are reused: only a process that is what the file says counts.
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").join(" ").includes(needle) ? pid : null;
  } catch {
    return null;
  }
}

/** Whether `pid` runs (a zombie waiting for its new parent to reap it does not). */
const alive = (pid: number) => {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
};

/**
 * Claims the storage directory for this process: refuses when a live process already owns it,
 * and stops a nats-server left there by an owner that died (SIGTERM, SIGKILL after 10 s).
 */
async function claim(dataDir: string): Promise<void> {
  const owner = livePid(path.join(dataDir, "owner.pid"), "node");
  if (owner !== null) throw new Error(`the NATS storage ${dataDir} is in use by process ${owner}; stop it or use another --state-dir`);
  const orphan = livePid(path.join(dataDir, "nats-server.pid"), `-sd ${dataDir}`);
  if (orphan !== null) {
    log("warn", "stopping the nats-server a previous loraforge left running", { pid: orphan, data: dataDir });
    process.kill(orphan, "SIGTERM");
    for (let waited = 0; alive(orphan); waited += 100) {
      if (waited === 10_000) process.kill(orphan, "SIGKILL");
      if (waited === 20_000) throw new Error(`the nats-server ${orphan} left on ${dataDir} does not stop`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  writeFileSync(path.join(dataDir, "owner.pid"), String(process.pid));
}

/** User name and password of a managed nats-server, as nats.js's connect() takes them. */
export interface NatsCredentials {
  user: string;
  pass: string;
}

/**
 * The storage directory's credentials: generated on first use into `credentials.json` (mode 0600),
 * and the nats-server config that requires them (`auth.conf`, mode 0600: never on a command line,
 * which every local user can read).
 */
function credentials(dataDir: string): { creds: NatsCredentials; conf: string } {
  const file = path.join(dataDir, "credentials.json");
  let creds: NatsCredentials;
  try {
    creds = JSON.parse(readFileSync(file, "utf8")) as NatsCredentials;
    // Both go into auth.conf: only the shapes written here are accepted.
    if (creds.user !== "loraforge" || !/^[0-9a-f]{64}$/.test(creds.pass)) throw new Error("malformed");
  } catch {
    creds = { user: "loraforge", pass: randomBytes(32).toString("hex") };
    writeFileSync(file, JSON.stringify(creds) + "\n", { mode: 0o600 });
  }
  chmodSync(file, 0o600);
  const conf = path.join(dataDir, "auth.conf");
  writeFileSync(conf, `authorization {\n  user: "${creds.user}"\n  password: "${creds.pass}"\n}\n`, { mode: 0o600 });
  chmodSync(conf, 0o600);
  return { creds, conf };
}

export class ManagedNats {
  private constructor(
    private readonly child: ChildProcess,
    readonly url: string,
    private readonly dataDir: string,
    /** What clients must present; undefined when started without auth. */
    readonly credentials?: NatsCredentials,
  ) {}

  /**
   * Starts nats-server on a free loopback port (or `port`) with its store in `<stateDir>/nats`. With
   * `auth`, it accepts only clients with the directory's credentials (see `credentials`).
   */
  static async start(stateDir: string, port?: number, extraArgs: string[] = [], opts: { auth?: boolean } = {}): Promise<ManagedNats> {
    const dataDir = path.join(stateDir, "nats");
    mkdirSync(dataDir, { recursive: true });
    await claim(dataDir);
    const auth = opts.auth ? credentials(dataDir) : null;
    if (auth) extraArgs = ["-c", auth.conf, ...extraArgs];
    const pidFile = path.join(dataDir, "nats-server.pid");
    const p = port ?? (await freePort());
    const bin = findNatsServer();
    const child = spawn(bin, ["-a", "127.0.0.1", "-p", String(p), "-js", "-sd", dataDir, "-P", pidFile, ...extraArgs], {
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
    return new ManagedNats(child, `nats://127.0.0.1:${p}`, dataDir, auth?.creds);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((r) => this.child.once("exit", r));
      this.child.kill("SIGTERM");
      const timer = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(path.join(this.dataDir, "owner.pid"), { force: true });
  }
}
