// The server as generic gRPC tools meet it: `buf curl` with no local schema lists the
// services through server reflection, calls Health and the API, and an error's
// ErrorInfo detail decodes with the descriptor set in proto/.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { REPO, startServer, tmpDir, type ServerProcess } from "./lib/harness.js";

const BUF = path.join(REPO, "node_modules", ".bin", "buf");
const DESCRIPTORS = path.join(REPO, "proto", "loraforge.binpb");

function buf(args: string[]) {
  const r = spawnSync(BUF, args, { encoding: "utf8", timeout: 60_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

describe("gRPC reflection and health (buf curl, no --schema)", () => {
  let srv: ServerProcess;
  let curl: (args: string[]) => ReturnType<typeof buf>;
  before(async () => {
    srv = await startServer({ env: { LORAFORGE_DASHBOARD_ADDRESS: "off", LORAFORGE_API_TOKEN: "reflect-t0ken" } });
    const url = `http://${srv.address}`;
    curl = (args) => buf(["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args.map((a) => a.replace("URL", url))]);
  });
  after(async () => {
    await srv?.stop();
  });

  it("lists every service and method", () => {
    // --reflect-header '*': the reflection requests carry the --header token too.
    const auth = ["--header", "authorization: Bearer reflect-t0ken", "--reflect-header", "*"];
    const services = curl([...auth, "--list-services", "URL"]);
    assert.equal(services.code, 0, services.err);
    assert.deepEqual(services.out.trim().split("\n").sort(), [
      "grpc.health.v1.Health",
      "loraforge.v1.DatasetService",
      "loraforge.v1.InferenceService",
      "loraforge.v1.TrainerService",
    ]);
    const methods = curl([...auth, "--list-methods", "URL"]).out.trim().split("\n");
    for (const m of ["grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch", "loraforge.v1.TrainerService/Train", "loraforge.v1.TrainerService/StreamProgress", "loraforge.v1.InferenceService/Infer"])
      assert.ok(methods.includes(m), `${m} in ${methods.join(", ")}`);
    // Reflection is part of the API: without the token it is refused like any RPC but health
    // (buf words UNAUTHENTICATED as its own registry's "you are not authenticated").
    const refused = curl(["--list-services", "URL"]);
    assert.notEqual(refused.code, 0);
    assert.match(refused.err, /not authenticated/i);
  });

  it("calls Health without a token, for the server and for each service", () => {
    for (const service of ["", "loraforge.v1.TrainerService", "loraforge.v1.InferenceService", "loraforge.v1.DatasetService"]) {
      const r = curl(["--reflect-header", "authorization: Bearer reflect-t0ken", "-d", JSON.stringify({ service }), "URL/grpc.health.v1.Health/Check"]);
      assert.equal(r.code, 0, r.err);
      assert.deepEqual(JSON.parse(r.out), { status: "SERVING" });
    }
  });

  it("calls the API; an error's ErrorInfo decodes with proto/loraforge.binpb", () => {
    const auth = ["--header", "authorization: Bearer reflect-t0ken", "--reflect-header", "*"];
    const list = curl([...auth, "-d", '{"pageSize": 5}', "URL/loraforge.v1.TrainerService/ListJobs"]);
    assert.equal(list.code, 0, list.err);
    assert.ok(typeof JSON.parse(list.out) === "object");

    const missing = curl([...auth, "-d", '{"jobId": "job-0000000000000000zz"}', "URL/loraforge.v1.TrainerService/GetJob"]);
    assert.notEqual(missing.code, 0);
    const err = JSON.parse(missing.err) as { code: string; details: { type: string; value: string }[] };
    assert.equal(err.code, "not_found");
    const info = err.details.find((d) => d.type === "google.rpc.ErrorInfo");
    assert.ok(info, missing.err);
    const bin = path.join(tmpDir("reflect"), "error-info.binpb");
    writeFileSync(bin, Buffer.from(info.value, "base64"));
    const decoded = buf(["convert", DESCRIPTORS, "--type", "google.rpc.ErrorInfo", "--from", `${bin}#format=binpb`, "--to", "-#format=json"]);
    assert.equal(decoded.code, 0, decoded.err);
    assert.deepEqual(JSON.parse(decoded.out), { reason: "JOB_NOT_FOUND", domain: "loraforge.dev", metadata: { job_id: "job-0000000000000000zz" } });
  });
});
