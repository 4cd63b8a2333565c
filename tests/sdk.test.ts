// @loraforge/sdk against real servers: auth, paging, downloads, uploads (and their
// refusals), abort signals, the progress iterator across a server restart, the NATS
// subscription, an outside NATS client decoding events with the .proto files alone,
// and the examples.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { zipSync } from "fflate";
import protobuf from "protobufjs";
import descriptor from "protobufjs/ext/descriptor/index.js";
import { connect as connectV2 } from "nats";
import { freePort, ManagedNats } from "@loraforge/server/core/nats-managed";
import { ArtifactKind, createClient, Job, JobNotFoundError, LoraforgeError, stateName, subscribe, trainingSpec, type JobEvent } from "@loraforge/sdk";
import {
  assertNoHostPaths,
  collect,
  fixtures,
  natsCredentials,
  quickSpec,
  REPO,
  sha256File,
  startServer,
  startWorker,
  tmpDir,
  type Fixtures,
  type ServerProcess,
  type WorkerProcess,
} from "./lib/harness.js";

/** A PNG whose header claims the given size (the body is garbage): a decompression-bomb probe. */
function pngHeader(width: number, height: number): Buffer {
  const b = Buffer.alloc(33);
  Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]).copy(b, 0);
  b.writeUInt32BE(13, 8);
  b.write("IHDR", 12, "latin1");
  b.writeUInt32BE(width, 16);
  b.writeUInt32BE(height, 20);
  b[24] = 8;
  b[25] = 2;
  return b;
}

describe("SDK", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  before(async () => {
    f = fixtures();
    srv = await startServer({ env: { LORAFORGE_API_TOKEN: "s3cret" } });
    srv.client.close();
    srv.client = createClient({ address: srv.address, token: "s3cret" });
  });
  after(async () => {
    await srv?.stop();
  });

  it("needs the token when the server has one", async () => {
    const anon = createClient({ address: srv.address });
    await assert.rejects(anon.listJobs(), (e: unknown) => e instanceof LoraforgeError && e.code === 16 && e.reason === "UNAUTHENTICATED");
    const wrong = createClient({ address: srv.address, token: "nope" });
    await assert.rejects(wrong.getJob("job-0000000000000000zz"), (e: unknown) => e instanceof LoraforgeError && e.code === 16);
    anon.close();
    wrong.close();
    await assert.rejects(srv.client.getJob("job-0000000000000000zz"), JobNotFoundError);
  });

  it("trains, pages with jobs.list, downloads the LoRA and a checkpoint", async () => {
    const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 4, checkpointingSteps: 2 }));
    const second = await srv.client.train(quickSpec(f, { maxTrainSteps: 1 }));
    const done = await job.result();
    await second.result();
    assert.equal(stateName(done.state), "SUCCEEDED");

    const ids: string[] = [];
    for await (const j of srv.client.jobs.list({ pageSize: 1 })) ids.push(j.id);
    assert.deepEqual(ids.slice(0, 2), [second.id, job.id]);

    const dir = tmpDir("download");
    const lora = done.artifacts.find((a) => a.name.endsWith("/pytorch_lora_weights.safetensors"))!;
    assert.equal(lora.kind, ArtifactKind.ARTIFACT_KIND_LORA);
    const info = await srv.client.artifacts.download(lora, { file: path.join(dir, "lora.safetensors") });
    assert.equal(sha256File(path.join(dir, "lora.safetensors")), lora.sha256);
    assert.equal(info.name, lora.name);
    const ckpt = done.artifacts.find((a) => a.name === `jobs/${job.id}/checkpoint-2/`)!;
    assert.equal(ckpt.kind, ArtifactKind.ARTIFACT_KIND_CHECKPOINT);
    await srv.client.artifacts.download(ckpt.name, { file: path.join(dir, "ckpt.tar") });
    const tar = spawnSync("tar", ["-tf", path.join(dir, "ckpt.tar")], { encoding: "utf8" });
    assert.equal(tar.status, 0, tar.stderr);
    assert.ok(tar.stdout.split("\n").some((n) => n.endsWith(".safetensors")), tar.stdout);
    await assert.rejects(
      srv.client.artifacts.download(`jobs/${job.id}/lora/nope.safetensors`, { file: path.join(dir, "x") }),
      (e: unknown) => e instanceof LoraforgeError && e.reason === "ARTIFACT_NOT_FOUND",
    );
    // A failed download leaves nothing behind, not even a partial file; one over an existing file keeps it.
    assert.deepEqual(readdirSync(dir).sort(), ["ckpt.tar", "lora.safetensors"]);
    await assert.rejects(srv.client.artifacts.download(`jobs/${job.id}/lora/nope.safetensors`, { file: path.join(dir, "lora.safetensors") }));
    assert.equal(sha256File(path.join(dir, "lora.safetensors")), lora.sha256);
    await assert.rejects(srv.client.artifacts.download("jobs/job-0000000000000000zz/lora/pytorch_lora_weights.safetensors", { file: path.join(dir, "y") }), (e: unknown) => {
      assert.ok(e instanceof LoraforgeError && e.code === 5, String(e));
      return true;
    });
    // A host path is no artifact name: refused by the contract's own rule, naming the field.
    await assert.rejects(srv.client.artifacts.download(path.join(srv.stateDir, "jobs", job.id), { file: path.join(dir, "z") }), (e: unknown) => {
      assert.ok(e instanceof LoraforgeError && e.code === 3 && e.violations.some((v) => v.field === "name"), String(e));
      return true;
    });
  });

  it("subscribe() yields the job's typed events from NATS, the same as progress(), at the URLs serverInfo() names", async () => {
    // An event consumer finds the bus through the API (and, on the server's host, <state dir>/server.json).
    const info = await srv.client.serverInfo();
    assert.deepEqual(info.natsUrls, [srv.natsUrl]);
    assert.equal(info.eventsStream, "LORAFORGE_EVENTS");
    assert.equal(info.eventSubjectPattern, "loraforge.v1.jobs.<job_id>.<kind>");
    assert.match(info.version, /^\d+\.\d+\.\d+/);
    const file = JSON.parse(readFileSync(path.join(srv.stateDir, "server.json"), "utf8"));
    assert.equal(file.address, srv.address);
    assert.deepEqual(file.natsUrls, info.natsUrls);
    assert.equal(file.pid, srv.proc.pid);

    const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 2 }));
    const viaGrpc = await collect(job.progress());
    const ac = new AbortController();
    const viaNats: JobEvent[] = [];
    const connection = natsCredentials(srv.stateDir);
    for await (const ev of subscribe({ nats: info.natsUrls, connection, jobId: job.id, from: "all", signal: ac.signal })) {
      viaNats.push(ev);
      if (viaNats.length === viaGrpc.length) ac.abort();
    }
    assert.deepEqual(viaNats.map((e) => e.sequence), viaGrpc.map((e) => e.sequence));
    assert.deepEqual(viaNats.map((e) => e.payload?.$case), viaGrpc.map((e) => e.payload?.$case));
    const onlyMetrics: JobEvent[] = [];
    const ac2 = new AbortController();
    for await (const ev of subscribe({ nats: srv.natsUrl, connection, jobId: job.id, kinds: ["metrics"], from: "all", signal: ac2.signal })) {
      onlyMetrics.push(ev);
      if (onlyMetrics.length === 2) ac2.abort();
    }
    assert.ok(onlyMetrics.every((e) => e.payload?.$case === "metrics"));
  });

  it("an outside NATS client decodes every event with the contract's descriptor set alone", async () => {
    // proto/loraforge.binpb holds every .proto of the contract and its imports (google/rpc, google/api,
    // buf/validate): another protobuf library reads it without our generated code or the buf deps.
    // (protobufjs/ext/descriptor adds Root.fromDescriptor at run time; its typings do not declare it.)
    const fromDescriptor = (protobuf.Root as unknown as { fromDescriptor(set: unknown): protobuf.Root }).fromDescriptor;
    const root = fromDescriptor(descriptor.FileDescriptorSet.decode(readFileSync(path.join(REPO, "proto", "loraforge.binpb"))));
    const JobEventType = root.lookupType("loraforge.v1.JobEvent");
    const nc = await connectV2({ servers: srv.natsUrl, ...natsCredentials(srv.stateDir) });
    const decoded: Record<string, unknown>[] = [];
    const sub = nc.subscribe("loraforge.v1.jobs.*.*");
    const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 2 }));
    const reading = (async () => {
      for await (const m of sub) {
        const ev = JobEventType.toObject(JobEventType.decode(m.data), { longs: Number, enums: String, defaults: false }) as Record<string, unknown>;
        // Names as in the .proto (snake_case): the descriptor set carries them.
        if (ev.job_id !== job.id) continue;
        assert.equal(m.subject.split(".").at(-1), Object.keys(ev).find((k) => ["state", "metrics", "checkpoint", "validation", "log", "dataset"].includes(k)));
        decoded.push(ev);
        const st = ev.state as { state?: string } | undefined;
        if (st?.state === "JOB_STATE_SUCCEEDED") break;
      }
    })();
    await job.result();
    await reading;
    await nc.close();
    const all = await collect(job.progress());
    // Live subscribers join after QUEUED may have passed; from there on they see everything.
    assert.deepEqual(decoded.map((e) => e.sequence), all.slice(all.length - decoded.length).map((e) => e.sequence));
    assert.ok(decoded.some((e) => (e.metrics as { loss?: number } | undefined)?.loss! > 0));
    // The data set report, decoded from the descriptor set too: every image of the fixture set used.
    const report = decoded.find((e) => e.dataset)?.dataset as { images_used?: number; caption_source?: string } | undefined;
    assert.deepEqual([report?.images_used, report?.caption_source], [8, "CAPTION_SOURCE_METADATA_JSONL"]);
  });

  it("uploads a data set (folder and zip) that trains; refuses bad files and writes nothing outside the data root", async () => {
    const ds = await srv.client.datasets.upload(f.dataset, { name: "shapes" });
    assert.equal(ds.imageCount, readdirSync(f.dataset).filter((n) => n.endsWith(".png")).length);
    assert.match(ds.id, /^ds-[a-z0-9]+$/);
    assert.equal(ds.name, "shapes");
    assert.ok(ds.sizeBytes > 0);
    // Where the server keeps the set is its own business: the answer names no place on its host.
    assertNoHostPaths(ds, [], "the uploaded Dataset");
    const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 1, datasetId: ds.id }));
    const trained = await job.result();
    assert.equal(stateName(trained.state), "SUCCEEDED");
    assert.deepEqual(trained.spec?.dataset, { $case: "datasetId", datasetId: ds.id }, "the job keeps the data set's id");
    assertNoHostPaths(Job.toJSON(trained), [f.model], "a job trained on an uploaded set");
    await assert.rejects(srv.client.train(quickSpec(f, { datasetId: "ds-nosuchset" })), (e: unknown) => {
      assert.ok(e instanceof LoraforgeError && e.violations.some((v) => v.field === "spec.dataset_id"), String(e));
      return true;
    });
    // One data set per spec: the SDK says so before sending anything.
    assert.throws(() => trainingSpec({ baseModel: f.model, datasetDir: f.dataset, datasetId: ds.id } as never), /one data set source, got datasetId and datasetDir/);

    const files: Record<string, Uint8Array> = {};
    for (const n of readdirSync(f.dataset)) files[n] = readFileSync(path.join(f.dataset, n));
    const zipPath = path.join(tmpDir("zip"), "shapes.zip");
    writeFileSync(zipPath, zipSync(files));
    assert.equal((await srv.client.datasets.upload(zipPath)).imageCount, ds.imageCount);

    const png = readdirSync(f.dataset).find((n) => n.endsWith(".png"))!;
    const good = readFileSync(path.join(f.dataset, png));
    const bad = async (make: (dir: string) => string, field: RegExp) => {
      const dir = tmpDir("bad");
      const target = make(dir);
      await assert.rejects(srv.client.datasets.upload(target), (e: unknown) => {
        assert.ok(e instanceof LoraforgeError, String(e));
        assert.equal(e.code, 3, `${e.code} ${e.message}`);
        assert.equal(e.reason, "INVALID_DATASET");
        assert.ok(e.violations.some((v) => field.test(v.field)), `${JSON.stringify(e.violations)} should name ${field}`);
        return true;
      });
    };
    const folderWith = (name: string, data: Buffer) => (dir: string) => {
      const d = path.join(dir, "set");
      mkdirSync(d);
      writeFileSync(path.join(d, name), data);
      writeFileSync(path.join(d, name.replace(/\.\w+$/, ".txt")), "a caption");
      return d;
    };
    await bad(folderWith("notes.png", Buffer.from("just some text, not an image")), /^notes\.png$/);
    await bad(folderWith("cut.png", good.subarray(0, Math.floor(good.length / 2))), /^cut\.png$/);
    await bad(folderWith("huge.png", pngHeader(50_000, 50_000)), /^huge\.png$/);
    // A set with no captions at all is an uncaptioned set (for instance_prompt); one with some is a mistake.
    await bad((dir) => {
      const d = path.join(dir, "partly");
      mkdirSync(d);
      writeFileSync(path.join(d, "a.png"), good);
      writeFileSync(path.join(d, "a.txt"), "a caption");
      writeFileSync(path.join(d, "b.png"), good);
      return d;
    }, /^b\.png$/);
    const zipWith = (entries: Record<string, Uint8Array>) => (dir: string) => {
      const z = path.join(dir, "evil.zip");
      writeFileSync(z, zipSync(entries));
      return z;
    };
    await bad(zipWith({ "../../x.png": good, "../../x.txt": Buffer.from("x") }), /x\.(png|txt)|zip/);
    await bad(zipWith({ "..%5cx.png": good, "..%5cx.txt": Buffer.from("x") }), /x\.(png|txt)|zip/);
    await bad(zipWith({ "a\\b.png": good }), /b\.png|zip/);
    for (const p of [path.join(srv.stateDir, "x.png"), path.join(srv.stateDir, "..", "x.png"), path.join(srv.stateDir, "datasets", "..", "x.png")])
      assert.equal(existsSync(p), false, `${p} must not exist`);
    // Uploads are unpacked into a scratch folder (if the server uses one) before they go to the object store.
    const scratch = path.join(srv.stateDir, "datasets");
    const leftovers = existsSync(scratch) ? readdirSync(scratch).filter((n) => n.startsWith(".upload-")) : [];
    assert.deepEqual(leftovers, [], "no half-written uploads remain");
  });

  it("honours AbortSignal on unary calls and progress iterators", async () => {
    const ac = new AbortController();
    ac.abort(new Error("changed my mind"));
    await assert.rejects(srv.client.listJobs({ signal: ac.signal }), /changed my mind/);
    const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 100000 }));
    const stop = new AbortController();
    let n = 0;
    for await (const ev of job.progress({ signal: stop.signal })) {
      void ev;
      if (++n === 2) stop.abort();
    }
    assert.equal(n, 2);
    await job.cancel();
    assert.equal(stateName((await job.result()).state), "CANCELLED");
  });

  it("the example trains through the SDK against a local server, on an uploaded set and on a server folder", () => {
    const example = path.join(REPO, "examples", "dist", "train.js");
    const lora = path.join(tmpDir("example"), "lora.safetensors");
    // As the demo runs it: upload the set, train on its id, download the LoRA by its artifact name.
    const r = spawnSync(process.execPath, [example, "--address", srv.address, "--model", f.model, "--upload", f.dataset, "--steps", "3", "--lora", lora], {
      encoding: "utf8",
      env: { ...process.env, LORAFORGE_API_TOKEN: "s3cret" },
    });
    assert.equal(r.status, 0, r.stderr + r.stdout);
    assert.match(r.stdout, /uploaded data set ds-\w+: 8 images/);
    assert.match(r.stdout, /SUCCEEDED/);
    const m = r.stdout.match(/LoRA: (jobs\/job-\w+\/lora\/pytorch_lora_weights\.safetensors) \(sha256 ([0-9a-f]{64}),/);
    assert.ok(m, r.stdout);
    assert.equal(sha256File(lora), m[2], "the downloaded LoRA is the artifact");
    const dir = spawnSync(process.execPath, [example, "--address", srv.address, "--model", f.model, "--data", f.dataset, "--steps", "2"], {
      encoding: "utf8",
      env: { ...process.env, LORAFORGE_API_TOKEN: "s3cret" },
    });
    assert.equal(dir.status, 0, dir.stderr + dir.stdout);
    assert.match(dir.stdout, /LoRA: jobs\/job-\w+\/lora\/pytorch_lora_weights\.safetensors/);
  });
});

describe("SDK progress across an API server restart", () => {
  let nats: ManagedNats;
  let worker: WorkerProcess;
  after(async () => {
    await worker?.stop("SIGKILL");
    await nats?.stop();
  });

  it("delivers every event exactly once while the API server restarts mid-job", async () => {
    const f = fixtures();
    nats = await ManagedNats.start(tmpDir("nats"));
    worker = await startWorker(nats.url);
    const port = await freePort();
    const args = ["--no-worker", "--nats", nats.url];
    let api = await startServer({ args: [...args, "--address", `127.0.0.1:${port}`] });
    const client = createClient({ address: `127.0.0.1:${port}` });
    const job = await client.train(quickSpec(f, { maxTrainSteps: 12, checkpointingSteps: 100 }));
    const events: JobEvent[] = [];
    let restarted = false;
    for await (const ev of job.progress()) {
      events.push(ev);
      if (!restarted && ev.payload?.$case === "metrics" && ev.payload.metrics.step === 2) {
        restarted = true;
        await api.stop();
        await new Promise((r) => setTimeout(r, 1000));
        api = await startServer({ args: [...args, "--address", `127.0.0.1:${port}`] });
      }
    }
    assert.ok(restarted);
    assert.deepEqual(events.map((e) => e.sequence), events.map((_, i) => i + 1));
    assert.equal(stateName((events.at(-1)!.payload as { state: { state: number } }).state.state), "SUCCEEDED");
    client.close();
    await api.stop();
  });
});
