// Hostile input and faults (issue 17), against a real `loraforge serve` with an API token, data roots
// and small limits: each case a probe found open, kept shut. Bad input must get a gRPC code and reason
// a client can act on, never INTERNAL, and no stack trace or file bytes in the answer or the log.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { status } from "@grpc/grpc-js";
import sharp from "sharp";
import { connect } from "@nats-io/transport-node";
import { Objm } from "@nats-io/obj";
import { createClient, JobState, LoraforgeError, type InferInput, type LoraforgeClient } from "@loraforge/sdk";
import { LoraCache, LoraMismatch, SlotIndex, type SlotInfo } from "@loraforge/server/infer/lora";
import { ClipTokenizer } from "@loraforge/server/infer/tokenizer";
import { ApiError, rethrowModelOutsideRoots } from "@loraforge/server/core/errors";
import { engineModelHash } from "@loraforge/server/core/models";
import { ModelOutsideRoots } from "@loraforge/server/core/paths";
import { fixtures, inferProcess, natsCredentials, onnxExport, processesMatching, procStatusBytes, python, PYTHON, quickSpec, REPO, startServer, tmpDir, until, type Fixtures, type ServerProcess } from "./lib/harness.js";

const TOKEN = "probe-" + randomBytes(12).toString("hex");
const UPLOAD_MAX_MB = 8;

/** Asserts that `p` rejects with a LoraforgeError of this code and reason; returns it. */
async function refused(p: Promise<unknown>, code: status, reason: string): Promise<LoraforgeError> {
  let caught: unknown;
  await p.then(
    (v) => assert.fail(`expected ${status[code]} ${reason}, got a result: ${JSON.stringify(v).slice(0, 200)}`),
    (e) => (caught = e),
  );
  assert.ok(caught instanceof LoraforgeError, `expected a LoraforgeError, got ${caught}`);
  assert.equal(status[caught.code], status[code], `${caught.reason}: ${caught.message}`);
  assert.equal(caught.reason, reason, caught.message);
  assert.doesNotMatch(caught.message, /\n\s+at /, "no stack trace in the answer");
  return caught;
}

/** A safetensors file from a header object (written as given) and raw data bytes. */
function safetensors(file: string, header: unknown, data = Buffer.alloc(0), headerLen?: bigint) {
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(headerLen ?? BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, json, data]));
}

/** Every object the server keeps in its NATS object stores ("<bucket>/<name>"), read as a local admin would. */
async function storedObjects(srv: ServerProcess): Promise<string[]> {
  const nc = await connect({ servers: srv.natsUrl, ...natsCredentials(srv.stateDir) });
  try {
    const objm = new Objm(nc);
    const names: string[] = [];
    for await (const st of objm.list()) {
      const store = await objm.open(st.bucket);
      for (const info of await store.list()) names.push(`${st.bucket}/${info.name}`);
    }
    return names;
  } finally {
    await nc.close();
  }
}

/** Bytes the process has passed to write(2) and friends (files, pipes, sockets): /proc/<pid>/io's wchar. */
function bytesWritten(pid: number): number {
  return Number(/^wchar: (\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, "utf8"))![1]);
}

const environ = (pid: number) => readFileSync(`/proc/${pid}/environ`, "latin1").split("\0");

describe("hostile input and faults", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  let client: LoraforgeClient;
  let root: string; // a data root of the server's
  let outside: string; // a folder outside every root

  before(async () => {
    f = fixtures();
    root = tmpDir("probe-root");
    outside = tmpDir("probe-outside");
    // Warm: the tiny model's export is there, so an Infer that passes the checks renders in seconds.
    const stateDir = tmpDir("probe-state");
    cpSync(onnxExport(f), path.join(stateDir, "onnx"), { recursive: true });
    srv = await startServer({
      stateDir,
      args: ["--data-root", f.root, "--data-root", root],
      env: {
        LORAFORGE_API_TOKEN: TOKEN,
        LORAFORGE_UPLOAD_MAX_MB: String(UPLOAD_MAX_MB),
        LORAFORGE_INFER_LORA_CACHE_MB: "1",
        LORAFORGE_DASHBOARD_ADDRESS: "off",
      },
    });
    client = createClient({ address: srv.address, token: TOKEN });
  });

  after(async () => {
    client?.close();
    await srv?.stop();
  });

  const infer = (req: Partial<InferInput>) => client.infer({ baseModel: f.model, prompt: "a red circle", numInferenceSteps: 1, ...req } as InferInput);

  it("stops a zip bomb at the uncompressed limit: bytes written, not compressed bytes, are counted", async () => {
    // 40 entries of 4 MiB of zeros: 160 MiB inflated from a zip of well under 1 MiB.
    const zip = path.join(tmpDir("probe-zip"), "bomb.zip");
    python([
      "-c",
      "import sys, zipfile\n" +
        "with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n" +
        "    for i in range(40): z.writestr(f'{i:04d}.png', bytes(4 << 20))\n",
      zip,
    ]);
    const pid = srv.proc.pid!;
    const before = bytesWritten(pid);
    const err = await refused(client.datasets.upload(zip), status.RESOURCE_EXHAUSTED, "DATASET_TOO_LARGE");
    const written = bytesWritten(pid) - before;
    assert.match(err.message, /inflate to more than/);
    // The limit, plus the archive itself (kept while it is unpacked) and a little logging and NATS traffic.
    const limit = UPLOAD_MAX_MB * 1024 * 1024;
    assert.ok(written < limit + 2 * 1024 * 1024, `the server wrote ${written} bytes for an upload limited to ${limit}`);
    // Nothing of the partial upload is left: not in a scratch folder (if the server uses one), not in the object store.
    const scratch = path.join(srv.stateDir, "datasets");
    assert.deepEqual(existsSync(scratch) ? readdirSync(scratch) : [], []);
    assert.deepEqual(await storedObjects(srv), [], "no object of the refused set is kept");
  });

  it("refuses dataset and base model paths whose symlinks lead out of the data roots", async () => {
    cpSync(f.dataset, path.join(outside, "shapes"), { recursive: true });
    mkdirSync(path.join(outside, "model"));
    writeFileSync(path.join(outside, "model", "model_index.json"), "{}");
    symlinkSync(path.join(outside, "shapes"), path.join(root, "shapes-link"));
    symlinkSync(path.join(outside, "model"), path.join(root, "model-link"));
    // A set inside the root whose captions are links to a private file outside.
    const captioned = path.join(root, "captioned-by-links");
    mkdirSync(captioned);
    writeFileSync(path.join(outside, "passwd"), "root:x:0:0:root:/root:/bin/bash\n");
    for (const name of readdirSync(f.dataset).filter((n) => n.endsWith(".png"))) {
      cpSync(path.join(f.dataset, name), path.join(captioned, name));
      symlinkSync(path.join(outside, "passwd"), path.join(captioned, name.replace(/\.png$/, ".txt")));
    }
    const cases: [Record<string, string>, string][] = [
      [{ datasetDir: path.join(root, "shapes-link") }, "spec.dataset_dir"],
      [{ baseModel: path.join(root, "model-link") }, "spec.base_model"],
      [{ datasetDir: captioned }, "spec.dataset_dir"],
    ];
    for (const [patch, field] of cases) {
      const err = await refused(client.train(quickSpec(f, patch) as never), status.INVALID_ARGUMENT, "INVALID_SPEC");
      assert.deepEqual(err.violations.map((v) => v.field), [field], JSON.stringify(patch));
    }
    const viaLink = await refused(infer({ baseModel: path.join(root, "model-link") }), status.INVALID_ARGUMENT, "INVALID_INFER_REQUEST");
    assert.deepEqual(viaLink.violations.map((v) => v.field), ["base_model"]);
    assert.match(viaLink.violations[0].description, /symbolic link/);
  });

  it("refuses a base model inside the roots whose files link out, and follows links that stay inside", async () => {
    const unet = path.join("unet", "diffusion_pytorch_model.safetensors");
    // A copy of the tiny model inside the root whose UNet weights are a link to a private copy outside.
    const leaky = path.join(root, "leaky-model");
    cpSync(f.model, leaky, { recursive: true });
    cpSync(f.model, path.join(outside, "private-model"), { recursive: true });
    rmSync(path.join(leaky, unet));
    symlinkSync(path.join(outside, "private-model", unet), path.join(leaky, unet));
    const train = await refused(client.train(quickSpec(f, { baseModel: leaky }) as never), status.INVALID_ARGUMENT, "INVALID_SPEC");
    assert.deepEqual(train.violations.map((v) => v.field), ["spec.base_model"]);
    assert.match(train.violations[0].description, /unet\/diffusion_pytorch_model\.safetensors leads outside the server's data roots through a symbolic link/);
    const inf = await refused(infer({ baseModel: leaky }), status.INVALID_ARGUMENT, "INVALID_INFER_REQUEST");
    assert.deepEqual(inf.violations.map((v) => v.field), ["base_model"]);
    assert.match(inf.violations[0].description, /unet\/diffusion_pytorch_model\.safetensors leads outside/);
    for (const e of [train, inf]) assert.doesNotMatch(JSON.stringify(e.violations), new RegExp(outside), "the target is not named");
    // Past the server's check (a swap in between), the engine refuses as Infer's hash and export run it: a
    // ModelOutsideRoots, which Infer answers as INVALID_ARGUMENT on base_model.
    const engine = { python: PYTHON, engineDir: path.join(REPO, "engine") };
    const hashing = engineModelHash(engine, leaky, [root]);
    await assert.rejects(hashing, (e: unknown) => e instanceof ModelOutsideRoots && /^base_model .*: unet\/diffusion_pytorch_model\.safetensors leads outside/.test(e.message));
    const refusal: unknown = await hashing.catch((e) => e);
    assert.throws(() => rethrowModelOutsideRoots(refusal), (e: unknown) => e instanceof ApiError && e.code === status.INVALID_ARGUMENT && e.violations[0].field === "base_model");
    // Without roots (a named model, the admin's) the engine reads the folder as it is.
    assert.match(await engineModelHash(engine, leaky), /^[0-9a-f]{32}$/);

    // A Hugging Face cache snapshot inside the root: its weights link into the cache's blobs folder.
    const hub = path.join(root, "hub");
    const snapshot = path.join(hub, "snapshots", "abc");
    cpSync(f.model, snapshot, { recursive: true });
    mkdirSync(path.join(hub, "blobs"));
    renameSync(path.join(snapshot, unet), path.join(hub, "blobs", "1234"));
    symlinkSync(path.join("..", "..", "..", "blobs", "1234"), path.join(snapshot, unet));
    const res = await infer({ baseModel: snapshot });
    assert.equal(res.images.length, 1);
  });

  it("fails a job whose base model file became a link leading out after it was accepted", async () => {
    // The server's check passed; a local user then swaps the weights for a link before the engine reads them.
    const model = path.join(root, "swapped-model");
    cpSync(f.model, model, { recursive: true });
    const job = await client.train(quickSpec(f, { baseModel: model }) as never);
    const unet = path.join(model, "unet", "diffusion_pytorch_model.safetensors");
    cpSync(unet, path.join(outside, "swapped.safetensors"));
    rmSync(unet);
    symlinkSync(path.join(outside, "swapped.safetensors"), unet);
    const done = await job.result();
    assert.equal(done.state, JobState.JOB_STATE_FAILED);
    assert.match(done.error?.message ?? "", /unet\/diffusion_pytorch_model\.safetensors leads outside the server's data roots/);
    assert.equal(done.artifacts.length, 0, "no LoRA was trained from the file outside");
  });

  it("refuses a LoRA path whose symlink leads out of the data roots", async () => {
    safetensors(path.join(outside, "secret.safetensors"), {});
    symlinkSync(path.join(outside, "secret.safetensors"), path.join(root, "lora-link.safetensors"));
    const err = await refused(
      infer({ loras: [{ source: { $case: "path", path: path.join(root, "lora-link.safetensors") }, scale: 1 }] }),
      status.INVALID_ARGUMENT,
      "INVALID_INFER_REQUEST",
    );
    assert.deepEqual(err.violations.map((v) => v.field), ["loras[0].path"]);
  });

  it("answers malformed LoRA files with INVALID_ARGUMENT, quoting none of their bytes and logging no stack", async () => {
    const dir = path.join(root, "bad-loras");
    mkdirSync(dir);
    const key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight";
    const text = "hello, this is a text file and not a LoRA at all\n";
    writeFileSync(path.join(dir, "text.safetensors"), text);
    safetensors(path.join(dir, "huge-header.safetensors"), {}, Buffer.alloc(0), 1n << 62n);
    safetensors(path.join(dir, "int64.safetensors"), { [key]: { dtype: "I64", shape: [2], data_offsets: [0, 16] } }, Buffer.alloc(16));
    safetensors(path.join(dir, "entry-not-object.safetensors"), { [key]: 5 });
    safetensors(path.join(dir, "header-array.safetensors"), [1, 2, 3]);
    safetensors(path.join(dir, "absurd-shape.safetensors"), { [key]: { dtype: "F32", shape: [1e12, 1e12], data_offsets: [0, 16] } }, Buffer.alloc(16));
    safetensors(path.join(dir, "negative-shape.safetensors"), { [key]: { dtype: "F32", shape: [-4, -1], data_offsets: [0, 16] } }, Buffer.alloc(16));
    safetensors(path.join(dir, "odd-offsets.safetensors"), { [key]: { dtype: "F32", shape: [1], data_offsets: [0, 3] } }, Buffer.alloc(16));
    const logBefore = srv.stderr.join("").length;
    for (const name of readdirSync(dir).sort()) {
      const err = await refused(
        infer({ loras: [{ source: { $case: "path", path: path.join(dir, name) }, scale: 1 }] }),
        status.INVALID_ARGUMENT,
        "INVALID_LORA",
      );
      assert.deepEqual(err.violations.map((v) => v.field), ["loras[0].path"], name);
      const head = readFileSync(path.join(dir, name)).subarray(0, 8);
      assert.ok(!err.message.includes(head.readBigUInt64LE(0).toString()), `${name}: the answer quotes the header length: ${err.message}`);
      assert.ok(!err.message.includes(text.slice(0, 8)), `${name}: the answer quotes the file: ${err.message}`);
    }
    const log = srv.stderr.join("").slice(logBefore);
    assert.doesNotMatch(log, /ERROR|\n\s+at /, "bad input is not logged as an error with a stack");
  });

  it("refuses a LoRA larger than the LoRA cache's byte budget with RESOURCE_EXHAUSTED", async () => {
    // 2 MiB of float32 weights against a 1 MiB budget (LORAFORGE_INFER_LORA_CACHE_MB=1).
    const file = path.join(root, "big.safetensors");
    const down = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight";
    safetensors(file, { [down]: { dtype: "F32", shape: [512, 1024], data_offsets: [0, 2 << 20] } }, Buffer.alloc(2 << 20));
    const err = await refused(infer({ loras: [{ source: { $case: "path", path: file }, scale: 1 }] }), status.RESOURCE_EXHAUSTED, "LORA_TOO_LARGE");
    assert.equal(err.metadata.limit, String(1 << 20));
  });

  it("bounds prompt length before tokenizing", async () => {
    const word = "a".repeat(1 << 20);
    for (const req of [{ prompt: word }, { prompt: "x".repeat(4097) }, { negativePrompt: word }]) {
      const err = await refused(infer(req), status.INVALID_ARGUMENT, "INVALID_INFER_REQUEST");
      assert.deepEqual(err.violations.map((v) => v.field), [Object.keys(req)[0] === "prompt" ? "prompt" : "negative_prompt"]);
      assert.match(err.violations[0].description, /at most 4096 characters/);
    }
  });

  it("passes the API token to no child process (engine, managed nats-server, Infer process)", async () => {
    // The server itself holds it: the check below reads the right thing.
    assert.ok(environ(srv.proc.pid!).includes(`LORAFORGE_API_TOKEN=${TOKEN}`));
    const [nats] = processesMatching(`-sd ${path.join(srv.stateDir, "nats")}`);
    assert.ok(nats, "the managed nats-server runs");
    assert.ok(!environ(nats).join("\n").includes(TOKEN), "the nats-server's environment holds the token");
    // Started by the LoRA cases above, which its LoRA reader answered.
    const inferChild = inferProcess(srv.proc.pid!);
    assert.ok(inferChild, "the Infer process runs");
    assert.ok(!environ(inferChild).join("\n").includes(TOKEN), "the Infer process's environment holds the token");

    const job = await client.train(quickSpec(f, { maxTrainSteps: 100_000, checkpointingSteps: 100_000 }) as never);
    const jobs = path.join(srv.stateDir, "jobs");
    let engine = 0;
    await until(() => ([engine] = processesMatching(`--output-dir ${jobs}`)).length > 0, 120_000, "the engine to start");
    const env = environ(engine);
    assert.ok(env.some((v) => v.startsWith("LORAFORGE_SUPERVISOR_PID=")), "read the engine's environment");
    assert.ok(!env.join("\n").includes(TOKEN), "the engine's environment holds the token");
    await job.cancel();
    const done = await job.result();
    assert.equal(done.state, JobState.JOB_STATE_CANCELLED);
  });

  it("refuses a request_id already used for a different spec (AIP-155), and returns the same job for the same spec", async () => {
    const requestId = "probe-" + randomBytes(4).toString("hex");
    const spec = quickSpec(f, { maxTrainSteps: 100_000 });
    const first = await client.train(spec as never, { requestId });
    try {
      const again = await client.train(spec as never, { requestId });
      assert.equal(again.id, first.id);
      const err = await refused(client.train({ ...spec, seed: 8 } as never, { requestId }), status.ALREADY_EXISTS, "REQUEST_ID_REUSED");
      assert.equal(err.metadata.job_id, first.id);
    } finally {
      await first.cancel().catch(() => undefined);
      await first.result();
    }
  });

  it("tokenizes a one-megabyte word without overflowing the stack", () => {
    const tok = ClipTokenizer.fromDir(path.join(f.model, "tokenizer"));
    const ids = tok.encode("abcdefgh".repeat(1 << 17));
    assert.equal(ids.length, tok.maxLength);
    assert.equal(ids[0], tok.bosId);
    assert.ok(ids.slice(1).includes(tok.eosId));
  });
});

describe("the managed nats-server's credentials", () => {
  it("refuses a client without the state directory's credentials, which only the server's user can read", async () => {
    const srv = await startServer({ env: { LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_WORKER: "0" } });
    try {
      await assert.rejects(connect({ servers: srv.natsUrl, reconnect: false }), /Authorization|auth/i);
      await assert.rejects(connect({ servers: srv.natsUrl, reconnect: false, user: "loraforge", pass: "guess" }), /Authorization|auth/i);
      for (const name of ["credentials.json", "auth.conf"])
        assert.equal((statSync(path.join(srv.stateDir, "nats", name)).mode & 0o777).toString(8), "600", name);
      const nc = await connect({ servers: srv.natsUrl, ...natsCredentials(srv.stateDir) });
      await nc.close();
      // Nor does the password appear on the nats-server's command line, which every local user can read.
      const [nats] = processesMatching(`-sd ${path.join(srv.stateDir, "nats")}`);
      assert.ok(!readFileSync(`/proc/${nats}/cmdline`, "utf8").includes(natsCredentials(srv.stateDir).pass));
    } finally {
      await srv.stop();
    }
  });
});

describe("one managed nats-server per storage directory", () => {
  it("stops the nats-server a kill -9'd serve left behind before starting its own", async () => {
    const stateDir = tmpDir("probe-orphan");
    const natsArgs = `-sd ${path.join(stateDir, "nats")}`;
    const first = await startServer({ stateDir, env: { LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_WORKER: "0" } });
    const [orphan] = processesMatching(natsArgs);
    assert.ok(orphan, "the first serve's nats-server runs");
    // Its watchdog would stop it when serve dies (tests/nats-supervision.test.ts); with the watchdog
    // gone too, the next start is what stops it.
    const watchdogs = processesMatching(`loraforge-nats-watchdog ${orphan}$`);
    assert.equal(watchdogs.length, 1, "a watchdog guards the nats-server");
    process.kill(watchdogs[0], "SIGKILL");
    first.client.close();
    first.proc.kill("SIGKILL");
    await new Promise((r) => first.proc.once("exit", r));
    assert.deepEqual(processesMatching(natsArgs), [orphan], "kill -9 of serve and its watchdog leaves the nats-server running");

    const second = await startServer({ stateDir, env: { LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_WORKER: "0" } });
    try {
      const running = processesMatching(natsArgs);
      assert.equal(running.length, 1, `one nats-server on ${stateDir}/nats, found ${running.length}`);
      assert.notEqual(running[0], orphan, "the orphan was stopped");
      assert.deepEqual((await second.client.listJobs({})).jobs, []);
    } finally {
      await second.stop();
    }
  });
});

describe("the Infer LoRA cache", () => {
  // One slot of a model, enough to map small LoRA files onto.
  const slot: SlotInfo = {
    component: "unet",
    module: "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    diffusers_key: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    kohya_key: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    in_features: 32,
    out_features: 32,
    input_a: "lora_0_a",
    input_b: "lora_0_b",
  };
  const index = new SlotIndex([slot]);
  const rank = 16;
  const fileBytes = 2 * rank * 32 * 4; // down [r, 32] and up [32, r], float32

  function lora(file: string, layer = slot.diffusers_key) {
    const n = rank * 32 * 4;
    safetensors(
      file,
      {
        [`${layer}.lora.down.weight`]: { dtype: "F32", shape: [rank, 32], data_offsets: [0, n] },
        [`${layer}.lora.up.weight`]: { dtype: "F32", shape: [32, rank], data_offsets: [n, 2 * n] },
      },
      Buffer.alloc(2 * n),
    );
    return file;
  }

  it("holds one file behind several links once (keyed by real path)", async () => {
    const dir = tmpDir("lora-cache");
    const real = lora(path.join(dir, "a.safetensors"));
    const cache = new LoraCache(10 * fileBytes);
    for (const i of [1, 2, 3, 4]) {
      symlinkSync(real, path.join(dir, `link-${i}.safetensors`));
      cache.map(await cache.file(path.join(dir, `link-${i}.safetensors`)), "model", index);
    }
    assert.equal(cache.size, 1);
    assert.equal(cache.bytes, fileBytes);
  });

  it("keeps no refused file and stays within its byte budget", async () => {
    const dir = tmpDir("lora-cache");
    const cache = new LoraCache(Math.floor(1.5 * fileBytes));
    const wrong = lora(path.join(dir, "other-model.safetensors"), "unet.mid_block.attentions.0.proj_in");
    await assert.rejects(async () => cache.map(await cache.file(wrong), "model", index), LoraMismatch);
    assert.equal(cache.size, 0);
    assert.equal(cache.bytes, 0);
    cache.map(await cache.file(lora(path.join(dir, "a.safetensors"))), "model", index);
    cache.map(await cache.file(lora(path.join(dir, "b.safetensors"))), "model", index);
    assert.equal(cache.size, 1, "the least recently used file made room");
    assert.ok(cache.bytes <= cache.maxBytes);
  });
});

describe("Infer's working memory", () => {
  // The tiny model's estimates (server/src/infer/memory.ts, arena on): 256 px is about 480 MiB for one
  // image, 780 MiB for two and 1360 MiB for four, so four fit the 900 MiB budget only in two groups;
  // 2048 px needs hundreds of GiB.
  const BUDGET_MIB = 900;
  let f: Fixtures;
  let srv: ServerProcess;

  before(async () => {
    f = fixtures();
    const stateDir = tmpDir("probe-memory");
    cpSync(onnxExport(f), path.join(stateDir, "onnx"), { recursive: true });
    srv = await startServer({
      stateDir,
      args: ["--data-root", f.root],
      env: { LORAFORGE_INFER_MEMORY_MB: String(BUDGET_MIB), LORAFORGE_DASHBOARD_ADDRESS: "off" },
    });
  });

  after(async () => {
    await srv?.stop();
  });

  const infer = (req: Partial<InferInput>) => srv.client.infer({ baseModel: f.model, prompt: "a red circle", numInferenceSteps: 1, ...req } as InferInput);

  it("refuses a request whose single image cannot fit, before anything loads", async () => {
    for (const req of [{ width: 2048, height: 2048 }, { width: 768, height: 768, numImages: 8 }]) {
      const err = await refused(infer(req), status.RESOURCE_EXHAUSTED, "INFER_TOO_LARGE");
      assert.equal(err.metadata.limit, String(BUDGET_MIB * 2 ** 20));
      assert.ok(Number(err.metadata.bytes) > BUDGET_MIB * 2 ** 20, err.message);
      assert.match(err.message, /LORAFORGE_INFER_MEMORY_MB/);
    }
  });

  it("renders a request too big for one batch in image groups, within the budget by the RSS of serve and its Infer process, before and after", async () => {
    await infer({ width: 64, height: 64 }); // loads the sessions: their weights are resident from now on
    // onnxruntime runs in serve's Infer process (infer/child.ts): both processes are measured.
    const child = inferProcess(srv.proc.pid!);
    assert.ok(child, "serve has an Infer process");
    const pids = [srv.proc.pid!, child];
    const sum = (key: string) => pids.reduce((n, pid) => n + procStatusBytes(pid, key), 0);
    const before = sum("VmRSS");
    for (const pid of pids) writeFileSync(`/proc/${pid}/clear_refs`, "5"); // resets VmHWM to the current RSS
    const res = await infer({ width: 256, height: 256, numImages: 4, seed: 7 });
    const peak = sum("VmHWM") - before;
    assert.deepEqual(res.images.map((i) => i.seed), [7, 8, 9, 10]);
    assert.ok(srv.stderr.join("").includes("Infer renders in image groups"), "the log says the request was split");
    // The budget bounds what onnxruntime takes during the request and what its arenas keep afterwards
    // (below LORAFORGE_INFER_RECYCLE_MB's default, the process is not retired: its arenas stay).
    assert.ok(peak <= BUDGET_MIB * 2 ** 20, `peak RSS rose by ${(peak / 2 ** 20).toFixed(0)} MiB`);
    const kept = sum("VmRSS") - before;
    assert.ok(kept <= BUDGET_MIB * 2 ** 20, `the request left ${(kept / 2 ** 20).toFixed(0)} MiB behind`);
    // Groups render the images one batch would: image i's noise comes from seed + i.
    const single = await infer({ width: 256, height: 256, numImages: 1, seed: 9 });
    const [a, b] = await Promise.all([res.images[2].png, single.images[0].png].map((png) => sharp(png).raw().toBuffer()));
    let worst = 0;
    for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
    assert.ok(worst <= 2, `image 2 of the grouped request differs from the same seed alone by up to ${worst}/255`);
  });
});

describe("the data set quota", () => {
  // Each set is one incompressible 512×512 image (about 0.75 MiB), so two fit in 2 MiB and a third does not.
  const QUOTA_MB = 2;
  let f: Fixtures;
  let srv: ServerProcess;

  before(async () => {
    f = fixtures();
    // No worker: a job stays queued, so its set stays in use.
    srv = await startServer({ env: { LORAFORGE_DATASETS_MAX_MB: String(QUOTA_MB), LORAFORGE_WORKER: "0", LORAFORGE_DASHBOARD_ADDRESS: "off" } });
  });

  after(async () => {
    await srv?.stop();
  });

  const noiseSet = (name: string) => {
    const dir = path.join(tmpDir("probe-quota"), name);
    python([
      "-c",
      "import os, sys\nfrom PIL import Image\n" +
        "os.makedirs(sys.argv[1])\n" +
        "Image.frombytes('RGB', (512, 512), os.urandom(512 * 512 * 3)).save(os.path.join(sys.argv[1], 'noise.png'))\n" +
        "open(os.path.join(sys.argv[1], 'noise.txt'), 'w').write('noise')\n",
      dir,
    ]);
    return dir;
  };
  const scratch = () => readdirSync(path.join(srv.stateDir, "datasets")).filter((n) => n.startsWith("."));

  it("refuses an upload that would take the stored sets past the quota, keeps nothing of it, and DeleteDataset frees the space", async () => {
    const a = await srv.client.datasets.upload(noiseSet("a"));
    const b = await srv.client.datasets.upload(noiseSet("b"));
    const before = await storedObjects(srv);
    const err = await refused(srv.client.datasets.upload(noiseSet("c")), status.RESOURCE_EXHAUSTED, "DATASET_QUOTA_EXCEEDED");
    assert.equal(err.metadata.limit_bytes, String(QUOTA_MB * 2 ** 20));
    const used = Number(err.metadata.used_bytes);
    assert.ok(used >= a.sizeBytes + b.sizeBytes && used < a.sizeBytes + b.sizeBytes + 4096, `the stored sets' files and manifests: ${used}`);
    assert.match(err.message, /LORAFORGE_DATASETS_MAX_MB/);
    assert.deepEqual(scratch(), [], "no partial upload is left on disk");
    assert.deepEqual(await storedObjects(srv), before, "nothing of the refused set is stored");

    // A queued job trains on a: it cannot be deleted until the job is final.
    const job = await srv.client.train(quickSpec(f, { datasetId: a.id }));
    const inUse = await refused(srv.client.datasets.delete(a.id), status.FAILED_PRECONDITION, "DATASET_IN_USE");
    assert.equal(inUse.metadata.job_id, job.id);
    await srv.client.cancelJob(job.id);
    assert.deepEqual(await srv.client.datasets.delete(a.id), a, "returns the set as it was stored");
    assert.ok(!(await storedObjects(srv)).some((n) => n.includes(a.id)), "its files and manifest are gone from the object store");
    assert.ok(!existsSync(path.join(srv.stateDir, "datasets", a.id)), "and this host's copy");
    const spec = await refused(srv.client.train(quickSpec(f, { datasetId: a.id })), status.INVALID_ARGUMENT, "INVALID_SPEC");
    assert.ok(spec.violations.some((v) => v.field === "spec.dataset_id"), "a deleted set cannot be trained on");

    const c = await srv.client.datasets.upload(noiseSet("c"));
    assert.ok(c.sizeBytes > 0, "the freed space takes a new set");
    await refused(srv.client.datasets.delete(a.id), status.NOT_FOUND, "DATASET_NOT_FOUND");
    await refused(srv.client.datasets.delete("../etc"), status.INVALID_ARGUMENT, "INVALID_REQUEST");
  });

  it("counts a zip's inflated files against the quota as they are written", async () => {
    const zip = path.join(tmpDir("probe-quota-zip"), "bomb.zip");
    python(["-c", "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n    for i in range(8): z.writestr(f'{i:04d}.png', bytes(1 << 20))\n", zip]);
    const pid = srv.proc.pid!;
    const before = bytesWritten(pid);
    try {
      await refused(srv.client.datasets.upload(zip), status.RESOURCE_EXHAUSTED, "DATASET_QUOTA_EXCEEDED");
    } catch (e) {
      console.error(srv.stderr.join("").slice(-3000));
      throw e;
    }
    const written = bytesWritten(pid) - before;
    assert.ok(written < QUOTA_MB * 2 ** 20 + 2 ** 20, `the server wrote ${written} bytes with a quota of ${QUOTA_MB} MiB`);
    assert.deepEqual(scratch(), []);
  });
});

describe("the disk bound on finished jobs' outputs", () => {
  let f: Fixtures;
  let srv: ServerProcess;

  before(async () => {
    f = fixtures();
    // Bounds 0: a host keeps no finished job's folder but the newest one's, and no data set copy after a job.
    srv = await startServer({ env: { LORAFORGE_JOB_OUTPUTS_MAX_MB: "0", LORAFORGE_DATASET_COPIES_MAX_MB: "0", LORAFORGE_DASHBOARD_ADDRESS: "off" } });
  });

  after(async () => {
    await srv?.stop();
  });

  it("removes the least recently finished job's local folder and the data set copy once a job ends; both come back from the store", async () => {
    const jobsDir = path.join(srv.stateDir, "jobs");
    const copies = path.join(srv.stateDir, "datasets");
    const set = await srv.client.datasets.upload(f.dataset);
    const spec = quickSpec(f, { datasetId: set.id, maxTrainSteps: 2, checkpointingSteps: 1 });
    const first = await (await srv.client.train(spec)).result();
    assert.equal(first.state, JobState.JOB_STATE_SUCCEEDED);
    assert.ok(existsSync(path.join(jobsDir, first.id)), "the newest finished job's folder stays");
    assert.deepEqual(readdirSync(copies).filter((n) => !n.startsWith(".")), [], "the data set copy is removed after the job");
    // The second job on the same set fetches it again from the object store.
    const second = await (await srv.client.train(spec)).result();
    assert.equal(second.state, JobState.JOB_STATE_SUCCEEDED);
    assert.deepEqual(readdirSync(jobsDir), [second.id]);
    assert.match(srv.stderr.join(""), /removed local copies to stay within the disk bound/);
    // Nothing was lost: the first job's LoRA and checkpoint still download by name.
    const dir = tmpDir("probe-disk");
    const lora = await srv.client.artifacts.download(first.artifacts.find((a) => a.name.includes("/lora/"))!, { file: path.join(dir, "lora.safetensors") });
    assert.equal(statSync(path.join(dir, "lora.safetensors")).size, lora.sizeBytes);
    const ckpt = first.artifacts.find((a) => a.name.includes("/checkpoint-"))!;
    await srv.client.artifacts.download(ckpt, { file: path.join(dir, "ckpt.tar") });
    assert.ok(statSync(path.join(dir, "ckpt.tar")).size > 0);
  });

  it("refuses a bound that is not a whole number of MiB at start", async () => {
    await assert.rejects(startServer({ env: { LORAFORGE_JOB_OUTPUTS_MAX_MB: "lots", LORAFORGE_DASHBOARD_ADDRESS: "off" } }), /LORAFORGE_JOB_OUTPUTS_MAX_MB/);
  });
});
