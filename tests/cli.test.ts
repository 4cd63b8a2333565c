// The loraforge CLI as people and scripts use it: under a pseudo-terminal (the live
// progress bar), with --json (parsed here), exit codes, and --help everywhere.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { CLI, fixtures, quickSpec, sha256File, startServer, tmpDir, type Fixtures, type ServerProcess } from "./lib/harness.js";

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

  it("--json output parses: train, jobs, watch, cancel, download", () => {
    const t = cli(["train", "--json", "--base-model", f.model, "--dataset-dir", f.dataset, "--resolution", "64", "--max-train-steps", "2", "--train-batch-size", "2", "--seed", "3"], env);
    assert.equal(t.code, 0, t.err);
    const job = JSON.parse(t.out);
    assert.equal(job.state, "JOB_STATE_QUEUED");
    assert.equal(job.spec.maxTrainSteps, 2);

    const w = cli(["watch", job.id, "--json"], env);
    assert.equal(w.code, 0, w.err);
    const events = w.out.trim().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(events.map((e) => Number(e.sequence)), events.map((_, i) => i + 1));
    assert.equal(events.at(-1).state.state, "JOB_STATE_SUCCEEDED");

    const l = cli(["jobs", "--json", "--state", "succeeded"], env);
    assert.equal(l.code, 0, l.err);
    const listed = l.out.trim().split("\n").map((x) => JSON.parse(x));
    assert.ok(listed.some((j) => j.id === job.id) && listed.every((j) => j.state === "JOB_STATE_SUCCEEDED"));

    const out = path.join(tmpDir("dl"), "lora.safetensors");
    const d = cli(["download", job.id, "-o", out, "--json"], env);
    assert.equal(d.code, 0, d.err);
    const info = JSON.parse(d.out);
    assert.equal(info.file, out);
    assert.equal(sha256File(out), info.artifact.sha256);

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

  it("--help works on every command", () => {
    for (const cmd of ["serve", "worker", "train", "jobs", "watch", "cancel", "download", "infer", "datasets", "export-onnx"]) {
      const r = cli([cmd, "--help"], env);
      assert.equal(r.code, 0, `${cmd} --help: ${r.err}`);
      assert.match(r.out, /usage: loraforge/);
    }
    const top = cli(["--help"]);
    assert.equal(top.code, 0);
    assert.match(top.out, /Exit codes/);
    assert.ok(!existsSync(path.join(process.cwd(), "out.png")));
  });
});
