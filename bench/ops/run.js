// bench/ops: the numbers an operator sizes an installation by, measured against a real `loraforge serve
// --no-worker` (the API alone) and its NATS, once on a single node (the managed nats-server, 1 replica) and once
// on a three-node JetStream cluster on loopback (LORAFORGE_NATS_REPLICAS=3, every write on a majority):
//   - Train submissions per second the API sustains: C concurrent SDK clients each submitting jobs back to back
//     (validation, the job record, the idempotency key and the queue message), with p50/p99 latency;
//   - events per second of one job: the worker's own publisher (JobEventPublisher: numbered, each stored before
//     the next) writing log events of one job, then the same with J jobs at once (the aggregate), and
//     StreamProgress replaying one job's events to an SDK client;
//   - artifact upload and download rate: ArtifactStore.putFile / getFile of a random file, as workers upload
//     checkpoints and LoRAs and the API serves downloads.
//
//   npx tsc -b sdk server tests && node bench/ops/run.js [--nats single,cluster] [--seconds 5]
//       [--concurrency 1,8,32] [--events 2000] [--jobs 8] [--artifact-mib 128]
import { randomBytes } from "node:crypto";
import { createWriteStream, rmSync, statSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { once } from "node:events";
import { connect } from "@nats-io/transport-node";
import { JobStore } from "../../server/dist/jobs/store.js";
import { ArtifactStore } from "../../server/dist/jobs/artifacts.js";
import { JobEventPublisher } from "../../server/dist/jobs/events.js";
import { LogLevel } from "../../sdk/dist/gen/loraforge/v1/job.js";
import { fixtures, natsCredentials, quickSpec, startServer, tmpDir, until } from "../../tests/dist/lib/harness.js";
import { makeCluster, metaLeader, startNode, killNode, url, USER, PASS } from "../../tests/dist/lib/nats-cluster.js";

function arg(name, def) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}
const topologies = arg("nats", "single,cluster").split(",");
const seconds = Number(arg("seconds", "5"));
const concurrency = arg("concurrency", "1,8,32").split(",").map(Number);
const eventCount = Number(arg("events", "2000"));
const parallelJobs = Number(arg("jobs", "8"));
const artifactMiB = Number(arg("artifact-mib", "128"));
for (const t of topologies) if (!["single", "cluster"].includes(t)) throw new Error(`--nats takes single and/or cluster, got ${t}`);

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((xs.length * p) / 100))];
const round = (x, d = 1) => Math.round(x * 10 ** d) / 10 ** d;

/** C clients submitting back to back for `seconds`: jobs/s and latency percentiles. */
async function submissions(client, f, c) {
  const latencies = [];
  const until = Date.now() + seconds * 1000;
  await Promise.all(
    Array.from({ length: c }, async () => {
      while (Date.now() < until) {
        const t0 = performance.now();
        await client.train(quickSpec(f));
        latencies.push(performance.now() - t0);
      }
    }),
  );
  return { concurrency: c, jobs: latencies.length, jobsPerSec: round(latencies.length / seconds), p50Ms: round(median(latencies)), p99Ms: round(pct(latencies, 99)) };
}

/** One job's events through the worker's publisher: events/s until all are stored. */
async function publish(store, jobId, n) {
  const pub = new JobEventPublisher(store, jobId, 0);
  const t0 = performance.now();
  for (let i = 0; i < n; i++) pub.emit({ $case: "log", log: { level: LogLevel.LOG_LEVEL_INFO, message: `step ${i}: loss 0.1234, 1.9 it/s` } });
  await pub.flush();
  return n / ((performance.now() - t0) / 1000);
}

/** StreamProgress of a job's first n events, from the start: events/s as the SDK client receives them. */
async function replay(client, jobId, n) {
  const ac = new AbortController();
  let got = 0;
  const t0 = performance.now();
  for await (const ev of client.progress(jobId, { signal: ac.signal })) {
    if (ev.sequence !== ++got) throw new Error(`replay out of order: ${ev.sequence} at ${got}`);
    if (got === n) break;
  }
  ac.abort();
  return n / ((performance.now() - t0) / 1000);
}

async function randomFile(file, mib) {
  const out = createWriteStream(file);
  for (let i = 0; i < mib; i++) if (!out.write(randomBytes(1 << 20))) await once(out, "drain");
  out.end();
  await once(out, "finish");
}

async function artifactRates(store, dir) {
  const file = path.join(dir, "artifact.bin");
  await randomFile(file, artifactMiB);
  const up = [];
  const down = [];
  for (let i = 0; i < 3; i++) {
    const name = `bench/ops/${i}.bin`;
    let t0 = performance.now();
    await store.putFile(name, file);
    up.push(artifactMiB / ((performance.now() - t0) / 1000));
    const dest = path.join(dir, `back-${i}.bin`);
    t0 = performance.now();
    await store.getFile(name, dest);
    down.push(artifactMiB / ((performance.now() - t0) / 1000));
    if (statSync(dest).size !== artifactMiB << 20) throw new Error("download came back short");
    rmSync(dest);
  }
  rmSync(file);
  return { uploadMiBs: round(median(up)), downloadMiBs: round(median(down)) };
}

async function measure(topology, f) {
  const dir = tmpDir(`bench-ops-${topology}`);
  let nodes = [];
  let srv;
  let nc;
  try {
    let natsOpts;
    let replicas = 1;
    if (topology === "cluster") {
      nodes = await makeCluster(dir);
      await Promise.all(nodes.map(startNode));
      await until(async () => (await Promise.all(nodes.map(metaLeader))).every((l, _, all) => l !== "" && l === all[0]), 60_000, "a JetStream meta leader");
      replicas = 3;
      srv = await startServer({
        args: ["--no-worker", "--nats", nodes.map(url).join(",")],
        env: { LORAFORGE_NATS_USER: USER, LORAFORGE_NATS_PASSWORD: PASS, LORAFORGE_NATS_REPLICAS: "3", LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_LOG_LEVEL: "warn" },
      });
      natsOpts = { servers: nodes.map(url), user: USER, pass: PASS };
    } else {
      srv = await startServer({ args: ["--no-worker"], env: { LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_LOG_LEVEL: "warn" } });
      const { user, pass } = natsCredentials(srv.stateDir);
      natsOpts = { servers: srv.natsUrl, user, pass };
    }
    nc = await connect({ ...natsOpts, name: "bench-ops" });
    const store = await JobStore.open(nc, undefined, replicas);
    const artifacts = await ArtifactStore.open(nc, replicas);

    await warmUp(srv.client, f);
    const submit = [];
    for (const c of concurrency) submit.push(await submissions(srv.client, f, c));

    // Events go to real (queued) jobs, so that StreamProgress serves them.
    const one = await srv.client.train(quickSpec(f));
    const perJob = await publish(store, one.id, eventCount);
    const replayed = await replay(srv.client, one.id, eventCount);
    const many = await Promise.all(Array.from({ length: parallelJobs }, () => srv.client.train(quickSpec(f))));
    const t0 = performance.now();
    const perJobParallel = await Promise.all(many.map((j) => publish(store, j.id, eventCount)));
    const aggregate = (parallelJobs * eventCount) / ((performance.now() - t0) / 1000);

    const rates = await artifactRates(artifacts, dir);
    return {
      topology,
      replicas,
      submit,
      events: {
        perJob: round(perJob),
        replay: round(replayed),
        parallelJobs,
        perJobWhileParallel: round(median(perJobParallel)),
        aggregate: round(aggregate),
      },
      artifacts: { mib: artifactMiB, ...rates },
    };
  } finally {
    await nc?.close();
    await srv?.stop();
    for (const n of nodes) await killNode(n, "SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A few submissions first: the gRPC channel, the server's first compare-and-sets and the JIT warm up. */
async function warmUp(client, f) {
  for (let i = 0; i < 5; i++) await client.train(quickSpec(f));
}

const f = fixtures();
const results = [];
for (const t of topologies) {
  const r = await measure(t, f);
  results.push(r);
  console.log(`\n== ${t} (${r.replicas} replica${r.replicas > 1 ? "s" : ""}) ==`);
  for (const s of r.submit) console.log(`Train: ${s.concurrency} client(s): ${s.jobsPerSec} jobs/s (${s.jobs} in ${seconds} s), p50 ${s.p50Ms} ms, p99 ${s.p99Ms} ms`);
  console.log(`events, one job: ${r.events.perJob} events/s stored; replayed by StreamProgress at ${r.events.replay} events/s`);
  console.log(`events, ${r.events.parallelJobs} jobs at once: ${r.events.perJobWhileParallel} events/s per job, ${r.events.aggregate} events/s in all`);
  console.log(`artifacts (${r.artifacts.mib} MiB): upload ${r.artifacts.uploadMiBs} MiB/s, download ${r.artifacts.downloadMiBs} MiB/s`);
}
console.log(JSON.stringify({ date: new Date().toISOString(), cores: os.availableParallelism(), seconds, results }));
