// A JetStream cluster of real nats-server processes on loopback, for tests and benches: three nodes
// with routes between them, an account for loraforge and the system account.
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { findNatsServer, freePort } from "@loraforge/server/core/nats-managed";

export const USER = "loraforge";
export const PASS = randomBytes(16).toString("hex");
export const SYS_PASS = randomBytes(16).toString("hex");
// Every stream loraforge creates (the job bucket and the object store are streams too).
export const STREAMS = ["LORAFORGE_EVENTS", "LORAFORGE_QUEUE", "KV_loraforge_jobs", "KV_loraforge_workers", "OBJ_loraforge_artifacts"];

export interface Node {
  name: string;
  port: number;
  monitor: number;
  conf: string;
  proc: ChildProcess | null;
  log: string[];
}

export const url = (n: Node) => `nats://127.0.0.1:${n.port}`;

/** GET of a node's monitoring endpoint (/jsz, /connz, /healthz …) as JSON. */
export async function monitor<T>(n: Node, endpoint: string): Promise<T> {
  const res = await fetch(`http://127.0.0.1:${n.monitor}${endpoint}`);
  return (await res.json()) as T;
}

/** Starts (or restarts: same config, same store) one node; resolves once it listens. */
export async function startNode(n: Node): Promise<void> {
  const proc = spawn(findNatsServer(), ["-c", n.conf], { stdio: ["ignore", "ignore", "pipe"] });
  n.proc = proc;
  n.log = [];
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${n.name} did not start:\n${n.log.join("")}`)), 20_000);
    proc.stderr!.on("data", (d: Buffer) => {
      n.log.push(d.toString());
      if (n.log.join("").includes("Server is ready")) {
        clearTimeout(timer);
        resolve();
      }
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${n.name} exited (${code}):\n${n.log.join("")}`));
    });
  });
  proc.removeAllListeners("exit");
}

export async function killNode(n: Node, signal: NodeJS.Signals): Promise<void> {
  const proc = n.proc;
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((r) => proc.once("exit", r));
  proc.kill(signal);
  await exited;
}

/** The three nodes' configurations: routes to each other, JetStream, an account for loraforge and the system account. */
export async function makeCluster(dir: string): Promise<Node[]> {
  const ports = await Promise.all(Array.from({ length: 9 }, () => freePort()));
  const nodes = [0, 1, 2].map((i) => ({ name: `n${i}`, port: ports[i], monitor: ports[3 + i], route: ports[6 + i] }));
  return nodes.map((n) => {
    const store = path.join(dir, n.name);
    mkdirSync(store, { recursive: true });
    const conf = path.join(dir, `${n.name}.conf`);
    writeFileSync(
      conf,
      `server_name: ${n.name}
listen: 127.0.0.1:${n.port}
http: 127.0.0.1:${n.monitor}
jetstream { store_dir: "${store}" }
cluster {
  name: loraforge-test
  listen: 127.0.0.1:${n.route}
  routes: [${nodes.map((m) => `nats://127.0.0.1:${m.route}`).join(", ")}]
}
accounts {
  LORAFORGE { jetstream: enabled, users: [{ user: ${USER}, password: "${PASS}" }] }
  SYS { users: [{ user: sys, password: "${SYS_PASS}" }] }
}
system_account: SYS
max_payload: 8MB
`,
      { mode: 0o600 },
    );
    return { name: n.name, port: n.port, monitor: n.monitor, conf, proc: null, log: [] };
  });
}

export interface Jsz {
  meta_cluster?: { leader?: string; cluster_size?: number };
  account_details?: { name: string; stream_detail?: { name: string; state: { last_seq: number; messages: number } }[] }[];
}

export const metaLeader = async (n: Node) => (await monitor<Jsz>(n, "/jsz")).meta_cluster?.leader ?? "";
