// @loraforge/sdk as another team installs it: `npm pack` of sdk/, the tarball installed
// into an empty project outside the repo (its dependencies from npm), a strict TypeScript
// client compiled against the installed typings and run against a real server, and
// CommonJS `require()` of the ESM-only package. examples/ is such a project too
// (scripts/install-examples-sdk.sh); sdk.test.ts runs its example against a server.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, lstatSync, mkdirSync, readFileSync, realpathSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { fixtures, REPO, startServer, tmpDir, type Fixtures, type ServerProcess } from "./lib/harness.js";

/** Runs a command; throws with its output when it fails. */
function run(cmd: string, args: string[], cwd: string): string {
  const r = spawnSync(cmd, args, { cwd, encoding: "utf8", timeout: 180_000, env: { ...process.env, npm_config_update_notifier: "false" } });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} (in ${cwd}) failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

const versionOf = (pkg: string) => (JSON.parse(readFileSync(path.join(REPO, "node_modules", pkg, "package.json"), "utf8")) as { version: string }).version;

// Strict, and the SDK's own .d.ts files are checked too (skipLibCheck off).
const TSCONFIG = {
  compilerOptions: {
    strict: true,
    noUncheckedIndexedAccess: true,
    skipLibCheck: false,
    module: "NodeNext",
    moduleResolution: "NodeNext",
    target: "ES2022",
    types: ["node"],
    outDir: "dist",
  },
  files: ["client.ts"],
};

const CLIENT = `import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createClient, errorMessage, InvalidSpecError, JobState, LrScheduler, stateName, type DatasetSource, type JobEvent } from "@loraforge/sdk";

const [address, baseModel, datasetDir, loraFile] = process.argv.slice(2);
if (!address || !baseModel || !datasetDir || !loraFile) throw new Error("usage: client ADDRESS MODEL DATASET LORA_FILE");
const client = createClient({ address });
try {
  const before: string[] = [];
  for await (const job of client.jobs.list({ pageSize: 10 })) before.push(job.id);

  let violations: string[] = [];
  try {
    await client.train({ baseModel, datasetDir, rank: 0 });
  } catch (err) {
    if (!(err instanceof InvalidSpecError)) throw err;
    violations = err.violations.map((v) => v.field);
  }

  const source: DatasetSource = { datasetDir };
  const job = await client.train({ baseModel, ...source, resolution: 64, trainBatchSize: 2, maxTrainSteps: 2, seed: 11, lrScheduler: LrScheduler.LR_SCHEDULER_LINEAR });
  const events: JobEvent[] = [];
  for await (const ev of job.progress()) events.push(ev);
  const done = await job.result();
  let sha256 = "";
  if (job.lora) {
    await client.artifacts.download(job.lora, { file: loraFile });
    sha256 = createHash("sha256").update(readFileSync(loraFile)).digest("hex");
  }
  console.log(JSON.stringify({
    before,
    violations,
    id: job.id,
    sequences: events.map((e) => e.sequence),
    kinds: events.map((e) => e.payload?.$case ?? ""),
    state: stateName(done.state),
    succeeded: done.state === JobState.JOB_STATE_SUCCEEDED,
    error: errorMessage(done),
    lora: job.lora?.name ?? null,
    loraSha256: job.lora?.sha256 ?? null,
    downloadedSha256: sha256,
  }));
} finally {
  client.close();
}
`;

describe("@loraforge/sdk as an npm package", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  before(async () => {
    f = fixtures();
    srv = await startServer({ env: { LORAFORGE_DASHBOARD_ADDRESS: "off" } });
  });
  after(async () => {
    await srv?.stop();
  });

  let packedTarball = "";

  it("packs, installs into an empty project, compiles a strict TypeScript client and runs it against a server", { timeout: 240_000 }, () => {
    const work = tmpDir("sdk-pack");
    const packed = JSON.parse(run("npm", ["pack", "--json", "--pack-destination", work], path.join(REPO, "sdk"))) as { filename: string; files: { path: string }[] }[];
    packedTarball = path.join(work, packed[0]!.filename);
    const files = packed[0]!.files.map((x) => x.path);
    for (const needed of ["package.json", "README.md", "dist/index.js", "dist/index.d.ts", "dist/gen/loraforge/v1/job.js"]) assert.ok(files.includes(needed), `the tarball has ${needed}`);
    assert.ok(!files.some((x) => x.endsWith(".tsbuildinfo")), "no build state in the tarball");

    // An empty project outside the repo: nothing resolves from the repo's node_modules.
    const project = path.join(work, "consumer");
    mkdirSync(project);
    writeFileSync(path.join(project, "package.json"), JSON.stringify({ name: "sdk-consumer", private: true, type: "module" }));
    run(
      "npm",
      ["install", "--prefer-offline", "--no-audit", "--no-fund", path.join(work, packed[0]!.filename), `typescript@${versionOf("typescript")}`, `@types/node@${versionOf("@types/node")}`],
      project,
    );
    const installed = realpathSync(path.join(project, "node_modules", "@loraforge", "sdk"));
    assert.ok(installed.startsWith(realpathSync(project)), `installed as files, not linked to the repo: ${installed}`);
    assert.ok(existsSync(path.join(project, "node_modules", "@grpc", "grpc-js")), "its dependencies came from npm");

    writeFileSync(path.join(project, "tsconfig.json"), JSON.stringify(TSCONFIG));
    writeFileSync(path.join(project, "client.ts"), CLIENT);
    run(process.execPath, [path.join(project, "node_modules", "typescript", "bin", "tsc"), "-p", project], project);

    const out = JSON.parse(run(process.execPath, [path.join(project, "dist", "client.js"), srv.address, f.model, f.dataset, path.join(work, "lora.safetensors")], project).trim());
    assert.ok(Array.isArray(out.before));
    assert.ok(out.violations.includes("spec.rank"), `InvalidSpecError names the field: ${out.violations}`);
    assert.match(out.id, /^job-/);
    assert.deepEqual(out.sequences, out.sequences.map((_: number, i: number) => i + 1), "every event, in order");
    assert.deepEqual(out.kinds.filter((k: string) => k === "metrics").length, 2);
    assert.equal(out.state, "SUCCEEDED");
    assert.equal(out.succeeded, true);
    assert.equal(out.error, "");
    assert.equal(out.lora, `jobs/${out.id}/lora/pytorch_lora_weights.safetensors`);
    assert.equal(out.downloadedSha256, out.loraSha256, "the LoRA downloads by its artifact name");

    // ESM-only, and a CommonJS file can still require() it (Node's require(esm), Node >= 20.19).
    writeFileSync(path.join(project, "check.cjs"), 'const sdk = require("@loraforge/sdk"); console.log(typeof sdk.createClient, typeof sdk.subscribe);\n');
    assert.equal(run(process.execPath, [path.join(project, "check.cjs")], project).trim(), "function function");
  });

  it("examples/ installs the SDK the same way: from the packed tarball, not the workspace", () => {
    const examples = path.join(REPO, "examples");
    const pkg = JSON.parse(readFileSync(path.join(examples, "package.json"), "utf8")) as { dependencies: Record<string, string> };
    assert.equal(pkg.dependencies["@loraforge/sdk"], "file:.sdk/loraforge-sdk.tgz");
    const installed = path.join(examples, "node_modules", "@loraforge", "sdk");
    assert.ok(existsSync(installed), "examples/node_modules has the SDK (scripts/setup.sh installs it)");
    assert.ok(!lstatSync(installed).isSymbolicLink(), "a copy unpacked from the tarball, not a link to sdk/");
    // Installed from the tarball of the current sdk/ (npm pack is reproducible).
    assert.ok(packedTarball, "the pack test ran first");
    assert.ok(readFileSync(path.join(examples, ".sdk", "loraforge-sdk.tgz")).equals(readFileSync(packedTarball)), "examples/.sdk holds the current SDK's tarball");
    // What the example imports at run time is that copy.
    const resolved = run(process.execPath, ["--input-type=module", "-e", 'console.log(import.meta.resolve("@loraforge/sdk"))'], examples).trim();
    assert.equal(resolved, `file://${realpathSync(installed)}/dist/index.js`);
  });
});
