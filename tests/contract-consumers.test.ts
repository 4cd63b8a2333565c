// The contract as another team's code meets it: the buf module exported by
// scripts/export-contract.sh builds and generates with nothing else from the repository, and the
// documented Python subscriber (examples/python/subscribe_job.py: nats-py + messages generated from
// that export) replays a real job's events from the start, through a real server.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { JobState } from "@loraforge/sdk";
import { collect, fixtures, quickSpec, REPO, startServer, tmpDir, type Fixtures, type ServerProcess } from "./lib/harness.js";

const BUF = path.join(REPO, "node_modules", ".bin", "buf");
const PROTOC = path.join(REPO, ".proto-deps", "bin", "protoc");
// The subscriber's own small environment (nats-py, protobuf), made by scripts/setup.sh.
const SUB_PYTHON = path.join(REPO, "examples", "python", ".venv", "bin", "python");
const SUBSCRIBER = path.join(REPO, "examples", "python", "subscribe_job.py");

function run(cmd: string, args: string[], cwd: string, env: Record<string, string> = {}) {
  const r = spawnSync(cmd, args, { cwd, encoding: "utf8", timeout: 300_000, env: { ...process.env, ...env } });
  return { code: r.status, out: r.stdout, err: r.stderr };
}
function ok(cmd: string, args: string[], cwd: string, env: Record<string, string> = {}): string {
  const r = run(cmd, args, cwd, env);
  assert.equal(r.code, 0, `${cmd} ${args.join(" ")} (in ${cwd}):\n${r.out}\n${r.err}`);
  return r.out;
}

/** Runs the Python subscriber without blocking this process (the server's piped logs keep draining). */
function subscriber(jobId: string, stateDir: string, generated: string): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(SUB_PYTHON, [SUBSCRIBER, jobId, "--state-dir", stateDir, "--timeout", "180"], {
      env: { ...process.env, PYTHONPATH: generated },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    p.stdout.on("data", (d: Buffer) => (out += d.toString()));
    p.stderr.on("data", (d: Buffer) => (err += d.toString()));
    p.on("error", reject);
    p.on("close", (code) => resolve({ code, out, err }));
  });
}

/** Every file under `dir`, relative, sorted. */
function filesUnder(dir: string, prefix = ""): string[] {
  return readdirSync(path.join(dir, prefix), { withFileTypes: true })
    .flatMap((e) => (e.isDirectory() ? filesUnder(dir, path.join(prefix, e.name)) : [path.join(prefix, e.name)]))
    .sort();
}

describe("the contract as a buf module, and a Python subscriber generated from it", () => {
  let work: string;
  let exported: string;
  let generated: string;
  before(() => {
    work = tmpDir("contract");
    exported = path.join(work, "loraforge-contract");
    ok("bash", [path.join(REPO, "scripts", "export-contract.sh"), exported, "--tar", path.join(work, "loraforge-contract.tar.gz")], work);
    // Another team's Python code: protoc's built-in generator through buf, from the export alone.
    generated = path.join(work, "gen");
    writeFileSync(
      path.join(work, "buf.gen.yaml"),
      `version: v2\nplugins:\n  - protoc_builtin: python\n    protoc_path: ${PROTOC}\n    out: ${generated}\n    include_imports: true\n`,
    );
    ok(BUF, ["generate", exported, "--template", path.join(work, "buf.gen.yaml")], work);
  });

  it("exports a standalone module: named, with its README and every import, that builds to the descriptor set and generates code", () => {
    const files = filesUnder(exported);
    for (const f of ["buf.yaml", "README.md", "loraforge.binpb", "loraforge/README.md", "loraforge/loraforge/v1/job.proto", "loraforge/grpc/health/v1/health.proto", "deps/buf/validate/validate.proto", "deps/google/rpc/error_details.proto"])
      assert.ok(files.includes(f), `${f} in ${files.join(", ")}`);
    assert.match(readFileSync(path.join(exported, "buf.yaml"), "utf8"), /name: buf\.build\/loraforge\/loraforge/);

    // Built in an empty folder elsewhere, from the directory and from the tarball: the same contract
    // as proto/loraforge.binpb, byte for byte.
    const elsewhere = path.join(work, "elsewhere");
    mkdirSync(elsewhere);
    const committed = readFileSync(path.join(REPO, "proto", "loraforge.binpb"));
    for (const input of [exported, `${path.join(work, "loraforge-contract.tar.gz")}#strip_components=1`]) {
      const out = path.join(elsewhere, "fds.binpb");
      ok(BUF, ["build", input, "--as-file-descriptor-set", "-o", out], elsewhere);
      assert.ok(readFileSync(out).equals(committed), `buf build ${input} is proto/loraforge.binpb`);
    }
    // buf export of the export (what a team vendoring it would run) keeps every file.
    ok(BUF, ["export", exported, "-o", path.join(elsewhere, "again")], elsewhere);
    assert.ok(existsSync(path.join(elsewhere, "again", "loraforge", "v1", "trainer_service.proto")));

    const gen = filesUnder(generated);
    for (const f of ["loraforge/v1/job_pb2.py", "loraforge/v1/training_spec_pb2.py", "google/rpc/status_pb2.py", "buf/validate/validate_pb2.py"])
      assert.ok(gen.includes(f), `${f} generated: ${gen.join(", ")}`);
  });

  describe("the Python subscriber against a real server", () => {
    let f: Fixtures;
    let srv: ServerProcess;
    before(async () => {
      f = fixtures();
      srv = await startServer({ env: { LORAFORGE_DASHBOARD_ADDRESS: "off" } });
    });
    after(async () => {
      await srv?.stop();
    });

    it("replays a finished job's events from the start, in order, ending at its final state", { timeout: 240_000 }, async () => {
      const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 2 }));
      const events = await collect(job.progress());
      const done = await job.result();
      assert.equal(done.state, JobState.JOB_STATE_SUCCEEDED);

      // The bus found from <state dir>/server.json; messages from the export's generated code.
      const r = await subscriber(job.id, srv.stateDir, generated);
      assert.equal(r.code, 0, r.err + r.out);
      const lines = r.out.trim().split("\n");
      assert.deepEqual(
        lines.map((l) => Number(l.split(" ")[0])),
        events.map((_, i) => i + 1),
        `every sequence 1..${events.length}:\n${r.out}`,
      );
      assert.deepEqual(
        lines.map((l) => l.split(" ")[1]),
        events.map((e) => e.payload?.$case),
        "each event decoded to its kind",
      );
      assert.equal(lines.filter((l) => / metrics step \d\/2 loss=/.test(l)).length, 2, r.out);
      assert.match(lines.at(-1)!, new RegExp(`^${events.length} state SUCCEEDED lora=${job.lora!.name.replace(/[.]/g, "\\.")} sha256=${job.lora!.sha256}$`));
    });

    it("follows a job still running and exits with its final state's code", { timeout: 240_000 }, async () => {
      const job = await srv.client.train(quickSpec(f, { maxTrainSteps: 2 }));
      const r = await subscriber(job.id, srv.stateDir, generated);
      assert.equal(r.code, 0, r.err + r.out);
      const lines = r.out.trim().split("\n");
      assert.equal(lines[0], "1 state QUEUED");
      assert.match(lines.at(-1)!, new RegExp(`^${lines.length} state SUCCEEDED`));
    });
  });
});
