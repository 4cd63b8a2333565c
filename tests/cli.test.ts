// The loraforge CLI as people and scripts use it: under a pseudo-terminal (the live
// progress bar), with --json (parsed here), exit codes, and --help everywhere.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { CLI, fixtures, quickSpec, REPO, sha256File, startServer, tmpDir, type Fixtures, type ServerProcess } from "./lib/harness.js";

function cli(args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env: { ...process.env, ...env }, timeout: 300_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** Runs the CLI under a pseudo-terminal (util-linux `script`), as a person at a terminal would. */
function cliInTerminal(args: string[], env: Record<string, string>) {
  const quoted = [process.execPath, CLI, ...args].map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(" ");
  const r = spawnSync("script", ["-qfec", quoted, "/dev/null"], { encoding: "utf8", env: { ...process.env, ...env }, timeout: 300_000 });
  return { code: r.status, out: r.stdout };
}

describe("loraforge CLI", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  let env: Record<string, string>;
  before(async () => {
    f = fixtures();
    srv = await startServer();
    env = { LORAFORGE_ADDRESS: srv.address };
  });
  after(async () => {
    await srv?.stop();
  });

  it("train --follow under a terminal shows a live progress bar and ends SUCCEEDED (exit 0)", () => {
    const spec = path.join(tmpDir("spec"), "spec.yaml");
    const s = quickSpec(f, { maxTrainSteps: 4 });
    writeFileSync(spec, Object.entries(s).map(([k, v]) => `${k.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase())}: ${JSON.stringify(v)}`).join("\n") + "\n");
    const r = cliInTerminal(["train", spec, "--max-train-steps", "3", "--follow"], env);
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /job job-\w+ queued/);
    assert.match(r.out, /\r\[#+\.*\] 1\/3 loss \d\.\d{4}/, "a bar redrawn in place with \\r");
    assert.match(r.out, /\] 3\/3 loss/);
    assert.match(r.out, /SUCCEEDED — LoRA \/\S+pytorch_lora_weights\.safetensors/);
  });

  it("--json output is proto3 JSON everywhere (enum names, 64-bit integers as strings): train, jobs, watch, download, datasets", () => {
    const t = cli(["train", "--json", "--base-model", f.model, "--dataset-dir", f.dataset, "--resolution", "64", "--max-train-steps", "2", "--train-batch-size", "2", "--seed", "3"], env);
    assert.equal(t.code, 0, t.err);
    const job = JSON.parse(t.out);
    assert.equal(job.state, "JOB_STATE_QUEUED");
    assert.equal(job.spec.maxTrainSteps, 2, "int32 stays a number");
    assert.equal(job.spec.seed, "3", "int64 is a string");
    assert.equal(job.lastSequence, "1");

    const w = cli(["watch", job.id, "--json"], env);
    assert.equal(w.code, 0, w.err);
    const events = w.out.trim().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(events.map((e) => e.sequence), events.map((_, i) => String(i + 1)));
    assert.equal(events.at(-1).state.state, "JOB_STATE_SUCCEEDED");
    const metrics = events.filter((e) => e.metrics).map((e) => e.metrics);
    assert.deepEqual(metrics.map((m) => [m.step, m.totalSteps]), [["1", "2"], ["2", "2"]]);

    const l = cli(["jobs", "--json", "--state", "succeeded"], env);
    assert.equal(l.code, 0, l.err);
    const listed = l.out.trim().split("\n").map((x) => JSON.parse(x));
    const mine = listed.find((j) => j.id === job.id);
    assert.ok(mine && listed.every((j) => j.state === "JOB_STATE_SUCCEEDED"));
    assert.equal(mine.totalSteps, "2");
    assert.equal(mine.lastSequence, events.at(-1).sequence);

    const out = path.join(tmpDir("dl"), "lora.safetensors");
    const d = cli(["download", job.id, "-o", out, "--json"], env);
    assert.equal(d.code, 0, d.err);
    const info = JSON.parse(d.out);
    assert.equal(info.file, out);
    assert.equal(info.artifact.kind, "ARTIFACT_KIND_LORA");
    assert.equal(info.artifact.sizeBytes, String(readFileSync(out).length));
    assert.equal(sha256File(out), info.artifact.sha256);

    const ds = cli(["datasets", "upload", f.dataset, "--name", "shapes-json", "--json"], env);
    assert.equal(ds.code, 0, ds.err);
    const uploaded = JSON.parse(ds.out);
    assert.match(uploaded.id, /^ds-/);
    assert.equal(uploaded.imageCount, 8);
    assert.match(uploaded.sizeBytes, /^\d+$/, "int64 is a string");

    const c = cli(["cancel", job.id], env);
    assert.equal(c.code, 1, "cancelling a finished job fails");
    assert.match(c.err, /already SUCCEEDED/);
  });

  it("exit codes: invalid spec 3 naming the field, unknown job 4, usage 2, unreachable server 69", () => {
    const bad = cli(["train", "--base-model", f.model, "--dataset-dir", f.dataset, "--rank", "0"], env);
    assert.equal(bad.code, 3);
    assert.match(bad.err, /spec\.rank/);
    assert.equal(cli(["watch", "job-0000000000000000zz"], env).code, 4);
    const unknown = cli(["train", "--no-such-knob", "1"], env);
    assert.equal(unknown.code, 2);
    assert.match(unknown.err, /--no-such-knob/);
    assert.equal(cli(["frobnicate"], env).code, 2);
    const crop = cli(["infer", "--base-model", f.model, "--prompt", "a red circle", "--crop", "8"], env);
    assert.equal(crop.code, 2);
    assert.match(crop.err, /--crop takes TOP,LEFT/);
    assert.equal(cli(["jobs"], { LORAFORGE_ADDRESS: "127.0.0.1:1" }).code, 69);
  });

  it("watch of a finished job exits with the job's code, also --after its last event (0 succeeded, 1 failed, 5 cancelled)", { timeout: 300_000 }, async () => {
    // A data set whose only image is not an image: the engine fails on it.
    const broken = tmpDir("broken");
    writeFileSync(path.join(broken, "a.png"), "not a png");
    writeFileSync(path.join(broken, "a.txt"), "a caption");
    const failing = await srv.client.train(quickSpec(f, { datasetDir: broken, maxTrainSteps: 2 }));
    const cancelled = await srv.client.train(quickSpec(f, { maxTrainSteps: 100000 }));
    await cancelled.cancel();
    const succeeded = await srv.client.train(quickSpec(f, { maxTrainSteps: 2 }));
    for (const [job, code, state] of [[failing, 1, "FAILED"], [cancelled, 5, "CANCELLED"], [succeeded, 0, "SUCCEEDED"]] as const) {
      const live = cli(["watch", job.id], env);
      assert.equal(live.code, code, `${state}: ${live.out}${live.err}`);
      assert.match(live.out, new RegExp(`^${state}`, "m"));
      const last = (await srv.client.getJob(job.id)).lastSequence;
      const past = cli(["watch", job.id, "--after", String(last)], env);
      assert.equal(past.code, code, `${state} --after ${last}: ${past.err}`);
      assert.match(past.out, new RegExp(`^${state}`), "the final state, from the job's record");
      const pastJson = cli(["watch", job.id, "--after", String(last + 5), "--json"], env);
      assert.equal(pastJson.code, code);
      assert.equal(pastJson.out, "", "no events after the last one");
    }
  });

  it("--help on every command lists its options; train --help lists every TrainingSpec field", () => {
    const expected: Record<string, string[]> = {
      serve: ["--address", "--state-dir", "--nats", "--data-root", "--no-worker", "--dashboard"],
      worker: ["--nats", "--state-dir"],
      train: ["--request-id", "--follow", "--json", "--address", "--token"],
      jobs: ["--state", "--limit", "--json"],
      watch: ["--after", "--json"],
      cancel: ["--json", "--token"],
      download: ["-o, --output", "--json"],
      infer: ["--base-model", "--prompt", "--lora", "--lora-file", "--steps", "--scheduler", "--prompt-2", "--negative-crop", "--negative-target-size", "-o, --output"],
      datasets: ["--name", "--json"],
      "export-onnx": ["--out"],
    };
    for (const [cmd, flags] of Object.entries(expected)) {
      const r = cli([cmd, "--help"], env);
      assert.equal(r.code, 0, `${cmd} --help: ${r.err}`);
      assert.match(r.out, /usage: loraforge/);
      assert.match(r.out, new RegExp(`loraforge ${cmd}\\b`));
      for (const flag of flags) assert.ok(r.out.includes(flag), `${cmd} --help lists ${flag}`);
    }
    // Read from the .proto here, independently of the CLI's own table.
    const proto = readFileSync(path.join(REPO, "proto", "loraforge", "v1", "training_spec.proto"), "utf8");
    const fields = [...proto.matchAll(/^\s+(?:optional |repeated )?\w+ (\w+) = \d+;/gm)].map((m) => m[1]);
    assert.ok(fields.length >= 50, `${fields.length} fields`);
    const help = cli(["train", "--help"], env).out;
    for (const field of fields) assert.match(help, new RegExp(`^  --${field.replace(/_/g, "-")} `, "m"), `train --help lists --${field}`);
    assert.match(help, /--max-train-steps INT\n\s+Total optimizer steps/, "with the field's documentation");
    // An option of another command is refused, with a pointer to the command's help.
    const wrong = cli(["watch", "job-x", "--limit", "3"], env);
    assert.equal(wrong.code, 2);
    assert.match(wrong.err, /unknown option --limit[\s\S]*loraforge watch --help/);
    const notInt = cli(["train", "--rank", "eight"], env);
    assert.equal(notInt.code, 2);
    assert.match(notInt.err, /--rank takes an integer/);
    const top = cli(["--help"]);
    assert.equal(top.code, 0);
    assert.match(top.out, /Exit codes/);
    assert.ok(!existsSync(path.join(process.cwd(), "out.png")));
  });
});
