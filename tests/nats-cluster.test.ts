// loraforge on a three-node NATS JetStream cluster (issue 22): three real nats-server processes
// with routes between them, a `loraforge serve` (API + worker) that knows all three URLs and keeps
// 3 copies of everything. Mid-job, the node the server is connected to — made the JetStream meta
// leader and the leader of every loraforge stream and of the queue consumer first — is killed with
// SIGKILL. Nothing may be lost: the job succeeds, its events replay 1..N, its LoRA is intact; the
// node, restarted on its old store, catches up.
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { findNatsServer, freePort } from "@loraforge/server/core/nats-managed";
import { stateName, type JobEvent } from "@loraforge/sdk";
import { collect, download, fixtures, quickSpec, sha256File, startServer, tmpDir, until, type Fixtures, type ServerProcess } from "./lib/harness.js";

const USER = "loraforge";
const PASS = randomBytes(16).toString("hex");
const SYS_PASS = randomBytes(16).toString("hex");
// Every stream loraforge creates (the job bucket and the object store are streams too).
const STREAMS = ["LORAFORGE_EVENTS", "LORAFORGE_QUEUE", "KV_loraforge_jobs", "KV_loraforge_workers", "OBJ_loraforge_artifacts"];

interface Node {
  name: string;
  port: number;
  monitor: number;
  conf: string;
  proc: ChildProcess | null;
  log: string[];
}

const url = (n: Node) => `nats://127.0.0.1:${n.port}`;

/** GET of a node's monitoring endpoint (/jsz, /connz, /healthz …) as JSON. */
async function monitor<T>(n: Node, endpoint: string): Promise<T> {
  const res = await fetch(`http://127.0.0.1:${n.monitor}${endpoint}`);
  return (await res.json()) as T;
}

/** Starts (or restarts: same config, same store) one node; resolves once it listens. */
async function startNode(n: Node): Promise<void> {
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

async function killNode(n: Node, signal: NodeJS.Signals): Promise<void> {
  const proc = n.proc;
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((r) => proc.once("exit", r));
  proc.kill(signal);
  await exited;
}

/** The three nodes' configurations: routes to each other, JetStream, an account for loraforge and the system account. */
async function makeCluster(dir: string): Promise<Node[]> {
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

interface Jsz {
  meta_cluster?: { leader?: string; cluster_size?: number };
  account_details?: { name: string; stream_detail?: { name: string; state: { last_seq: number; messages: number } }[] }[];
}

const metaLeader = async (n: Node) => (await monitor<Jsz>(n, "/jsz")).meta_cluster?.leader ?? "";

/** This node's own copy of a stream (its /jsz), or null when it has none yet. */
async function localStream(n: Node, stream: string) {
  const jsz = await monitor<Jsz>(n, "/jsz?accounts=true&streams=true");
  return jsz.account_details?.find((a) => a.name === "LORAFORGE")?.stream_detail?.find((s) => s.name === stream)?.state ?? null;
}

/** The node holding the connection named `name` (the loraforge server names its connection "loraforge"). */
async function nodeOfConnection(nodes: Node[], name: string): Promise<Node | null> {
  for (const n of nodes) {
    if (!n.proc || n.proc.exitCode !== null || n.proc.signalCode !== null) continue;
    const connz = await monitor<{ connections?: { name?: string }[] }>(n, "/connz");
    if (connz.connections?.some((c) => c.name === name)) return n;
  }
  return null;
}

/**
 * Steps a leader down (a raft group of the cluster) until `want` leads it. `leader` reads the current
 * leader ("" while an election runs); the next one is chosen by the cluster, hence the loop.
 */
async function moveLeader(nc: NatsConnection, subject: string, leader: () => Promise<string>, want: string, what: string) {
  for (let tries = 0; tries < 30; tries++) {
    let cur = "";
    await until(async () => (cur = await leader().catch(() => "")) !== "", 30_000, `a leader of ${what}`);
    if (cur === want) return;
    await nc.request(subject, undefined, { timeout: 10_000 }).catch(() => undefined);
    await until(async () => (await leader().catch(() => "")) !== cur, 30_000, `${what}'s leader ${cur} to step down`);
  }
  throw new Error(`could not move the leader of ${what} to ${want}`);
}

const streamLeader = (jsm: JetStreamManager, s: string) => async () => (await jsm.streams.info(s)).cluster?.leader ?? "";
const assertGapless = (evs: JobEvent[]) => assert.deepEqual(evs.map((e) => e.sequence), evs.map((_, i) => i + 1));

describe("a three-node NATS cluster", () => {
  let f: Fixtures;
  let dir: string;
  let nodes: Node[] = [];
  let srv: ServerProcess;
  let nc: NatsConnection;
  let sys: NatsConnection;
  let jsm: JetStreamManager;

  before(async () => {
    f = fixtures();
    dir = tmpDir("nats-cluster");
    nodes = await makeCluster(dir);
    await Promise.all(nodes.map(startNode));
    // JetStream is up once the three agree on a meta leader.
    await until(async () => (await Promise.all(nodes.map(metaLeader))).every((l, _, all) => l !== "" && l === all[0]), 60_000, "a JetStream meta leader");
    srv = await startServer({
      args: ["--nats", nodes.map(url).join(",")],
      env: { LORAFORGE_NATS_USER: USER, LORAFORGE_NATS_PASSWORD: PASS, LORAFORGE_NATS_REPLICAS: "3", LORAFORGE_DASHBOARD_ADDRESS: "off" },
    });
    nc = await connect({ servers: nodes.map(url), user: USER, pass: PASS, name: "cluster-test", maxReconnectAttempts: -1 });
    sys = await connect({ servers: nodes.map(url), user: "sys", pass: SYS_PASS, name: "cluster-test-sys", maxReconnectAttempts: -1 });
    jsm = await jetstreamManager(nc);
  });

  after(async () => {
    await srv?.stop();
    await nc?.close();
    await sys?.close();
    for (const n of nodes) await killNode(n, "SIGTERM");
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("keeps 3 copies of the job bucket, the queue and its consumer, the events and the object store", async () => {
    for (const s of STREAMS) {
      const info = await jsm.streams.info(s);
      assert.equal(info.config.num_replicas, 3, s);
      assert.equal((info.cluster?.replicas ?? []).length, 2, `${s} has a leader and two followers`);
    }
    const consumer = await jsm.consumers.info("LORAFORGE_QUEUE", "workers");
    assert.equal(consumer.config.num_replicas ?? 3, 3);
    assert.equal((consumer.cluster?.replicas ?? []).length, 2, "the queue consumer has a leader and two followers");
  });

  it("kill -9 of the server's node, leader of everything, mid-job: nothing is lost; restarted, the node catches up", async () => {
    // The worst node to lose: the one the server talks to, made the leader of every raft group loraforge uses.
    const victim = await nodeOfConnection(nodes, "loraforge");
    assert.ok(victim, "the server has a connection on one of the nodes");
    await moveLeader(sys, "$JS.API.META.LEADER.STEPDOWN", () => metaLeader(victim), victim.name, "the JetStream meta group");
    for (const s of STREAMS) await moveLeader(nc, `$JS.API.STREAM.LEADER.STEPDOWN.${s}`, streamLeader(jsm, s), victim.name, s);
    await moveLeader(
      nc,
      "$JS.API.CONSUMER.LEADER.STEPDOWN.LORAFORGE_QUEUE.workers",
      async () => (await jsm.consumers.info("LORAFORGE_QUEUE", "workers")).cluster?.leader ?? "",
      victim.name,
      "the queue consumer",
    );

    const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 12, checkpointingSteps: 4 }));
    const live: JobEvent[] = [];
    let killed = false;
    // A stream that stalls for good (a NATS consumer never replaced) fails the test instead of hanging it.
    for await (const ev of job.progress({ signal: AbortSignal.timeout(180_000) })) {
      live.push(ev);
      if (!killed && ev.payload?.$case === "metrics") {
        await killNode(victim, "SIGKILL");
        killed = true;
      }
    }
    assert.ok(killed, "the job reported a step before it ended");
    const last = live.at(-1)?.payload;
    assert.equal(last?.$case === "state" ? stateName(last.state.state) : last?.$case, "SUCCEEDED", "the live stream ran to the final event");
    // The server's connection moved to a surviving node.
    await until(async () => {
      const n = await nodeOfConnection(nodes, "loraforge");
      return n !== null && n !== victim;
    }, 60_000, "the server to reconnect to another node");

    const rec = await job.refresh();
    assert.equal(stateName(rec.state), "SUCCEEDED", JSON.stringify(rec.error));
    // The history, streamed live across the failover and replayed afterwards: 1..N, each once.
    const replay = await collect(job.progress());
    assertGapless(replay);
    assertGapless(live);
    assert.deepEqual(replay, live);
    assert.equal(replay.length, rec.lastSequence);
    const states = replay.flatMap((e) => (e.payload?.$case === "state" ? [stateName(e.payload.state.state)] : []));
    assert.deepEqual(states, ["QUEUED", "RUNNING", "SUCCEEDED"]);
    const steps = replay.flatMap((e) => (e.payload?.$case === "metrics" ? [e.payload.metrics.step] : []));
    assert.deepEqual(steps, Array.from({ length: 12 }, (_, i) => i + 1));

    // The LoRA by name: the bytes the engine wrote on the worker's disk.
    const lora = rec.artifacts.find((a) => a.name === `jobs/${job.id}/lora/pytorch_lora_weights.safetensors`);
    assert.ok(lora, JSON.stringify(rec.artifacts.map((a) => a.name)));
    const final = replay.at(-1)!.payload;
    assert.equal(final?.$case === "state" ? final.state.lora?.sha256 : undefined, lora.sha256, "the final event names the same LoRA");
    const written = path.join(srv.stateDir, "jobs", job.id, "pytorch_lora_weights.safetensors");
    assert.ok(existsSync(written), `the worker wrote ${written}`);
    assert.equal(sha256File(written), lora.sha256);
    assert.equal(sha256File(await download(srv.client, lora.name)), lora.sha256);
    // The checkpoints made around the failover were stored (an upload that failed would leave them out).
    const checkpointSteps = rec.artifacts.filter((a) => a.name.includes("/checkpoint-")).map((a) => a.step);
    for (const step of [4, 8]) assert.ok(checkpointSteps.includes(step), `checkpoint-${step} in ${checkpointSteps}`);

    // Restarted on its old store, the node catches up: its own copy of every stream ends where the leader's does.
    await startNode(victim);
    for (const s of STREAMS) {
      const leader = (await jsm.streams.info(s)).state;
      await until(async () => {
        const mine = await localStream(victim, s).catch(() => null);
        return mine !== null && mine.last_seq === leader.last_seq && mine.messages === leader.messages;
      }, 120_000, `${victim.name}'s copy of ${s} to reach sequence ${leader.last_seq}`);
    }
    // And the leader counts it as a current replica again.
    await until(async () => {
      const info = await jsm.streams.info("LORAFORGE_EVENTS");
      return info.cluster?.replicas?.some((r) => r.name === victim.name && r.current && !r.offline) ?? false;
    }, 120_000, `${victim.name} to be a current replica of LORAFORGE_EVENTS`);
  });
});
