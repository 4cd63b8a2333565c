// The loraforge CLI as people and scripts use it: under a pseudo-terminal (the live
// progress bar), with --json (parsed here), exit codes, and --help everywhere.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { assertNoHostPaths, CLI, fixtures, quickSpec, REPO, sha256File, startServer, tmpDir, type Fixtures, type ServerProcess } from "./lib/harness.js";

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
    assert.match(r.out, /SUCCEEDED — LoRA jobs\/job-\w+\/lora\/pytorch_lora_weights\.safetensors/);
  });

  it("--json output is proto3 JSON everywhere (enum names, 64-bit integers as strings): train, jobs, watch, download, datasets", () => {
    const t = cli(
      // Enum flags take the short name or the full one.
      ["train", "--json", "--base-model", f.model, "--dataset-dir", f.dataset, "--resolution", "64", "--max-train-steps", "2", "--train-batch-size", "2", "--seed", "3",
        "--lr-scheduler", "cosine", "--mixed-precision", "MIXED_PRECISION_NO", "--interpolation", "Lanczos", "--lora-format", "kohya", "--checkpointing-steps", "1"],
      env,
    );
    assert.equal(t.code, 0, t.err);
    const job = JSON.parse(t.out);
    assert.equal(job.state, "JOB_STATE_QUEUED");
    assert.equal(job.spec.maxTrainSteps, 2, "int32 stays a number");
    assert.equal(job.spec.seed, "3", "int64 is a string");
    assert.equal(job.lastSequence, "1");
    assert.equal(job.spec.datasetDir, f.dataset, "the data set oneof, as the folder given");
    assert.deepEqual(
      [job.spec.lrScheduler, job.spec.mixedPrecision, job.spec.interpolation, job.spec.loraFormat],
      ["LR_SCHEDULER_COSINE", "MIXED_PRECISION_NO", "INTERPOLATION_LANCZOS", "LORA_FORMAT_KOHYA"],
      "enums by value name",
    );

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

    // No response names a place on the server host (beyond the folders the spec itself gave).
    assertNoHostPaths([job, events, listed], [f.model, f.dataset], "the CLI's JSON");

    // A job id downloads its final LoRA (kohya format asked for: that file is the job's LoRA) ...
    const dl = tmpDir("dl");
    const out = path.join(dl, "lora.safetensors");
    const d = cli(["download", job.id, "-o", out, "--json"], env);
    assert.equal(d.code, 0, d.err);
    const info = JSON.parse(d.out);
    assert.equal(info.file, out);
    assert.equal(info.artifact.kind, "ARTIFACT_KIND_LORA");
    assert.equal(info.artifact.name, `jobs/${job.id}/lora/pytorch_lora_weights_kohya.safetensors`);
    assert.equal(info.artifact.sizeBytes, String(readFileSync(out).length));
    assert.equal(sha256File(out), info.artifact.sha256);
    // ... and an artifact name downloads that artifact: a checkpoint as a tar, by default named after it.
    const ckpt = `jobs/${job.id}/checkpoint-2/`;
    assert.ok(mine.artifacts.some((a: { name: string }) => a.name === ckpt), JSON.stringify(mine.artifacts));
    const c2 = spawnSync(process.execPath, [CLI, "download", ckpt], { encoding: "utf8", cwd: dl, env: { ...process.env, ...env } });
    assert.equal(c2.status, 0, c2.stderr);
    assert.equal(c2.stdout.trim(), path.join(dl, "checkpoint-2.tar"));
    assert.equal(readFileSync(path.join(dl, "checkpoint-2.tar")).subarray(257, 262).toString(), "ustar");
    const missing = spawnSync(process.execPath, [CLI, "download", `jobs/${job.id}/lora/nope.safetensors`], { encoding: "utf8", cwd: dl, env: { ...process.env, ...env } });
    assert.equal(missing.status, 4, missing.stderr);
    assert.ok(!existsSync(path.join(dl, "nope.safetensors")), "a failed download leaves no file behind");
    assert.deepEqual(readdirSync(dl).sort(), ["checkpoint-2.tar", "lora.safetensors"], "nor a partial one");

    const ds = cli(["datasets", "upload", f.dataset, "--name", "shapes-json", "--json"], env);
    assert.equal(ds.code, 0, ds.err);
    const uploaded = JSON.parse(ds.out);
    assert.match(uploaded.id, /^ds-/);
    assert.equal(uploaded.imageCount, 8);
    assert.match(uploaded.sizeBytes, /^\d+$/, "int64 is a string");
    assertNoHostPaths(uploaded, [], "the uploaded Dataset");
    // --dataset-id trains on it; the job keeps the id.
    const byId = cli(["train", "--json", "--base-model", f.model, "--dataset-id", uploaded.id, "--resolution", "64", "--max-train-steps", "1", "--train-batch-size", "2"], env);
    assert.equal(byId.code, 0, byId.err);
    const idJob = JSON.parse(byId.out);
    assert.equal(idJob.spec.datasetId, uploaded.id);
    assert.equal(idJob.spec.datasetDir, undefined);
    const idWatch = cli(["watch", idJob.id], env);
    assert.equal(idWatch.code, 0, idWatch.out + idWatch.err);
    // Once its job is done the set can be deleted; a second rm finds nothing (exit 4, not found).
    const rm = cli(["datasets", "rm", uploaded.id, "--json"], env);
    assert.equal(rm.code, 0, rm.err);
    assert.deepEqual(JSON.parse(rm.out), uploaded);
    const again = cli(["datasets", "rm", uploaded.id], env);
    assert.equal(again.code, 4, again.err);
    assert.match(again.err, /DATASET_NOT_FOUND|no uploaded data set/);

    const c = cli(["cancel", job.id], env);
    assert.equal(c.code, 1, "cancelling a finished job fails");
    assert.match(c.err, /already SUCCEEDED/);
  });

  it("exit codes: invalid spec 3 naming the field, unknown job 4, usage 2, unreachable server 69", () => {
    const bad = cli(["train", "--base-model", f.model, "--dataset-dir", f.dataset, "--rank", "0"], env);
    assert.equal(bad.code, 3);
    assert.match(bad.err, /spec\.rank/);
    // No data set: the contract's oneof is required, and the server names it.
    const none = cli(["train", "--base-model", f.model], env);
    assert.equal(none.code, 3, none.err);
    assert.match(none.err, /spec\.dataset/);
    // A spec file is decoded by the contract: an unknown key or a wrong type is an invalid spec, named.
    const specDir = tmpDir("bad-spec");
    writeFileSync(path.join(specDir, "typo.yaml"), `base_model: ${f.model}\ndataset_dir: ${f.dataset}\nrnak: 4\n`);
    const typo = cli(["train", path.join(specDir, "typo.yaml")], env);
    assert.equal(typo.code, 3, typo.err);
    assert.match(typo.err, /"rnak" is not a TrainingSpec field/);
    writeFileSync(path.join(specDir, "two.json"), JSON.stringify({ baseModel: f.model, datasetDir: f.dataset, datasetName: "someone/pets" }));
    const two = cli(["train", path.join(specDir, "two.json")], env);
    assert.equal(two.code, 3, two.err);
    assert.match(two.err, /dataset/);
    // ... and a data set flag replaces the file's data set.
    const replaced = cli(["train", path.join(specDir, "two.json"), "--dataset-dir", f.dataset, "--rank", "0"], env);
    assert.equal(replaced.code, 3);
    assert.match(replaced.err, /spec\.rank/, "the file's two data sets gave way to the flag; only the rank is wrong");
    // Enum values are checked here, before anything is sent, listing the allowed ones.
    const wobbly = cli(["train", "--base-model", f.model, "--dataset-dir", f.dataset, "--lr-scheduler", "cosine_with_wobbles"], env);
    assert.equal(wobbly.code, 2);
    assert.match(wobbly.err, /--lr-scheduler takes one of linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup/);
    const sampler = cli(["infer", "--base-model", f.model, "--prompt", "a red circle", "--sampler", "heun"], env);
    assert.equal(sampler.code, 2);
    assert.match(sampler.err, /--sampler takes one of euler, ddim, dpmpp_2m/);
    const twoSets = cli(["train", "--base-model", f.model, "--dataset-dir", f.dataset, "--dataset-id", "ds-abc"], env);
    assert.equal(twoSets.code, 2);
    assert.match(twoSets.err, /give one data set/);
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
      serve: ["--address", "--state-dir", "--nats", "--data-root", "--models-dir", "--no-worker", "--dashboard"],
      worker: ["--nats", "--state-dir", "--models-dir"],
      train: ["--request-id", "--follow", "--json", "--address", "--token"],
      jobs: ["--state", "--limit", "--json"],
      watch: ["--after", "--json"],
      cancel: ["--json", "--token"],
      download: ["-o, --output", "--json"],
      infer: ["--base-model", "--prompt", "--lora", "--lora-file", "--steps", "--sampler", "euler, ddim, dpmpp_2m", "--prompt-2", "--negative-crop", "--negative-target-size", "-o, --output"],
      models: ["--json"],
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
    // Read from the .proto here, independently of the CLI's own table (field lines: type, name, number, then ";" or "[").
    const proto = readFileSync(path.join(REPO, "proto", "loraforge", "v1", "training_spec.proto"), "utf8");
    const message = proto.slice(proto.indexOf("message TrainingSpec {"), proto.indexOf("\n}\n", proto.indexOf("message TrainingSpec {")));
    const fields = [...message.matchAll(/^\s+(?:optional |repeated )?[\w.]+ (\w+) = \d+\s*[;[]/gm)].map((m) => m[1]);
    assert.ok(fields.length >= 50, `${fields.length} fields`);
    const help = cli(["train", "--help"], env).out;
    for (const field of fields) assert.match(help, new RegExp(`^  --${field.replace(/_/g, "-")} `, "m"), `train --help lists --${field}`);
    assert.match(help, /--max-train-steps INT\n\s+Total optimizer steps/, "with the field's documentation");
    // Enum fields list their values; the data set oneof says its members are alternatives.
    assert.match(help, /^  --lr-scheduler linear\|cosine\|cosine_with_restarts\|polynomial\|constant\|constant_with_warmup\n/m);
    assert.match(help, /^  --mixed-precision no\|fp16\|bf16\n/m);
    assert.match(help, /^  --interpolation nearest\|bilinear\|bicubic\|box\|hamming\|lanczos\n/m);
    assert.match(help, /^  --prediction-type epsilon\|v_prediction\n/m);
    assert.match(help, /^  --lora-format diffusers\|kohya\n/m);
    for (const flag of ["dataset-id", "dataset-dir", "dataset-name"]) assert.match(help, new RegExp(`^  --${flag} TEXT \\(one of the dataset options\\)`, "m"));
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
