// A local nats-server (JetStream on, data under the state directory) started and
// stopped by `loraforge serve` when no NATS URL is configured. One per storage directory:
// pid files there name the process that owns it and its nats-server, so a start after
// `kill -9` of the owner stops an orphaned nats-server first (if its watchdog did not), and a
// second owner is refused. The server is supervised: restarted when it dies, and stopped when
// its owner dies.
import { spawn, type ChildProcess } from "node:child_process";
import { EventEmitter } from "node:events";
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

export interface ManagedNatsEvents {
  /** The nats-server exited without being asked to; a restart follows. */
  down: [info: { pid?: number; code: number | null; signal: NodeJS.Signals | null }];
  /** A restarted nats-server is ready (same port, store, config and credentials). */
  up: [info: { pid?: number; restarts: number }];
  /** It could not be restarted; it stays down. */
  fatal: [err: Error];
}

/** Restarts in a row (each within STABLE_MS of the last start) before supervision gives up. */
const MAX_RESTARTS = 6;
/** A nats-server that ran this long resets the restart count. */
const STABLE_MS = 30_000;
/** Delay before restart n (0-based) in a row: 0.5 s doubling, at most 10 s. */
const restartDelay = (n: number) => Math.min(500 * 2 ** n, 10_000);

/**
 * A watchdog for one nats-server pid: a shell that blocks reading a pipe whose other end only this
 * process holds. When this process dies, however it dies (kill -9 included), the kernel closes that
 * end, the read returns, and the watchdog stops the nats-server (SIGTERM, SIGKILL after 10 s). No
 * polling, no native code; pipes Node creates are close-on-exec, so the engines and other children
 * do not inherit the write end.
 */
const WATCHDOG =
  'read -r line; kill -TERM "$1" 2>/dev/null; i=0; ' +
  'while [ $i -lt 100 ] && kill -0 "$1" 2>/dev/null; do sleep 0.1; i=$((i+1)); done; kill -KILL "$1" 2>/dev/null';

function startWatchdog(pid: number): ChildProcess {
  const w = spawn("/bin/sh", ["-c", WATCHDOG, "loraforge-nats-watchdog", String(pid)], {
    stdio: ["pipe", "ignore", "ignore"],
    // Its own process group, like the nats-server: a terminal's Ctrl-C reaches only this process,
    // which then stops NATS in order (after draining its connection).
    detached: true,
    env: childEnv(),
  });
  w.on("error", (err) => log("warn", "the nats-server watchdog could not start", { err: String(err) }));
  return w;
}

/** Spawns nats-server and resolves once it is ready; rejects (the process gone) if it exits or fails first. */
async function spawnNats(bin: string, args: string[]): Promise<ChildProcess> {
  const child = spawn(bin, args, {
    stdio: ["ignore", "ignore", "pipe"],
    env: childEnv(),
    detached: true,
  });
  const output: string[] = [];
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nats-server did not become ready: ${output.join("")}`)), 20_000);
      child.stderr!.on("data", (d: Buffer) => {
        output.push(d.toString());
        if (output.join("").includes("Server is ready")) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.on("error", (err) => {
        clearTimeout(timer);
        reject(new Error(`nats-server could not start: ${err.message}`));
      });
      child.on("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`nats-server exited with ${signal ?? `code ${code}`}: ${output.join("")}`));
      });
    });
  } catch (err) {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) child.kill("SIGKILL");
    throw err;
  }
  child.removeAllListeners("exit");
  child.removeAllListeners("error");
  child.stderr!.removeAllListeners("data");
  child.stderr!.resume();
  return child;
}

/**
 * A supervised nats-server: restarted with the same arguments (port, store, config with the
 * credentials) when it dies, after 0.5 s doubling to 10 s; `fatal` once MAX_RESTARTS in a row have
 * failed. It also dies with this process (see WATCHDOG).
 */
export class ManagedNats extends EventEmitter<ManagedNatsEvents> {
  private watchdog: ChildProcess | null = null;
  private stopping = false;
  private startedAt = Date.now();
  private restarts = 0;
  private restarting: Promise<void> | null = null;
  /** Ends the wait before the next restart early (on stop). */
  private wake: (() => void) | null = null;

  private constructor(
    private child: ChildProcess,
    readonly url: string,
    private readonly dataDir: string,
    private readonly bin: string,
    private readonly args: string[],
    /** What clients must present; undefined when started without auth. */
    readonly credentials?: NatsCredentials,
  ) {
    super();
    this.watch();
  }

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
    const args = ["-a", "127.0.0.1", "-p", String(p), "-js", "-sd", dataDir, "-P", pidFile, ...extraArgs];
    const child = await spawnNats(bin, args);
    log("info", "managed nats-server started", { url: `nats://127.0.0.1:${p}`, pid: child.pid, data: dataDir });
    return new ManagedNats(child, `nats://127.0.0.1:${p}`, dataDir, bin, args, auth?.creds);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Guards the current child: a watchdog for it, and a restart when it exits unasked. */
  private watch(): void {
    const child = this.child;
    this.startedAt = Date.now();
    this.watchdog = child.pid !== undefined ? startWatchdog(child.pid) : null;
    child.once("exit", (code, signal) => {
      this.stopWatchdog();
      if (this.stopping) return;
      log("error", "the managed nats-server died; restarting it", { pid: child.pid, code, signal, data: this.dataDir });
      this.emit("down", { pid: child.pid, code, signal });
      if (Date.now() - this.startedAt >= STABLE_MS) this.restarts = 0;
      this.restarting = this.restart();
    });
  }

  private stopWatchdog(): void {
    const w = this.watchdog;
    this.watchdog = null;
    if (w && w.exitCode === null && w.signalCode === null) w.kill("SIGKILL");
    w?.stdin?.destroy();
  }

  private async restart(): Promise<void> {
    while (!this.stopping) {
      if (this.restarts >= MAX_RESTARTS) {
        const err = new Error(`the managed nats-server (${this.bin}, data ${this.dataDir}) could not be restarted: ${MAX_RESTARTS} restarts in a row failed`);
        log("error", err.message);
        this.emit("fatal", err);
        return;
      }
      const delay = restartDelay(this.restarts++);
      await new Promise<void>((r) => {
        const t = setTimeout(r, delay);
        this.wake = () => (clearTimeout(t), r());
      });
      this.wake = null;
      if (this.stopping) return;
      try {
        if (!existsSync(this.bin)) throw new Error(`${this.bin} is gone`);
        const child = await spawnNats(this.bin, this.args);
        if (this.stopping) {
          child.kill("SIGTERM");
          return;
        }
        this.child = child;
        this.watch();
        log("info", "managed nats-server restarted", { url: this.url, pid: child.pid, restarts: this.restarts });
        this.emit("up", { pid: child.pid, restarts: this.restarts });
        return;
      } catch (err) {
        log("error", "restarting the managed nats-server failed", { attempt: this.restarts, of: MAX_RESTARTS, err: String((err as Error).message ?? err) });
      }
    }
  }

  async stop(): Promise<void> {
    this.stopping = true;
    this.wake?.();
    await this.restarting;
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((r) => this.child.once("exit", r));
      this.child.kill("SIGTERM");
      const timer = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
      await exited;
      clearTimeout(timer);
    }
    this.stopWatchdog();
    rmSync(path.join(this.dataDir, "owner.pid"), { force: true });
  }
}
