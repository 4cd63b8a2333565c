// The server as generic gRPC tools meet it: `buf curl` with no local schema lists the
// services through server reflection, calls Health and the API; an error's details
// (google.rpc.ErrorInfo, BadRequest) decode to JSON with the descriptors reflection
// serves for their type names, and with the descriptor set in proto/.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createFileRegistry, fromBinary, toJson, type JsonValue } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, type FileDescriptorProto } from "@bufbuild/protobuf/wkt";
import { BinaryReader, BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { credentials, makeGenericClientConstructor, Metadata } from "@grpc/grpc-js";
import { existsSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { REPO, startServer, tmpDir, type ServerProcess } from "./lib/harness.js";

const BUF = path.join(REPO, "node_modules", ".bin", "buf");
// grpcurl is a test tool (a Go program) that scripts/setup.sh builds into .tools/ where Go is installed;
// LORAFORGE_GRPCURL names another, else `grpcurl` on the PATH; without any, its test is skipped.
const BUILT_GRPCURL = path.join(REPO, ".tools", "grpcurl");
const GRPCURL =
  process.env.LORAFORGE_GRPCURL ??
  (existsSync(BUILT_GRPCURL) ? BUILT_GRPCURL : spawnSync("grpcurl", ["-version"]).status === 0 ? "grpcurl" : "");
const DESCRIPTORS = path.join(REPO, "proto", "loraforge.binpb");

function buf(args: string[]) {
  const r = spawnSync(BUF, args, { encoding: "utf8", timeout: 60_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/**
 * What a reflection client such as grpcurl does to print an Any: asks grpc.reflection.v1 for the file
 * that defines `symbol`, then for each of its imports by file name, until every file is known.
 */
async function reflectedFiles(address: string, token: string, symbol: string): Promise<Map<string, FileDescriptorProto>> {
  const Client = makeGenericClientConstructor({}, "ServerReflection");
  const client = new Client(address, credentials.createInsecure());
  const md = new Metadata();
  md.set("authorization", `Bearer ${token}`);
  const call = client.makeBidiStreamRequest(
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    (b: Uint8Array) => Buffer.from(b),
    (b: Buffer) => new Uint8Array(b),
    md,
  );
  const responses: Uint8Array[] = [];
  let wake = () => {};
  call.on("data", (b: Uint8Array) => {
    responses.push(b);
    wake();
  });
  const next = () => (responses.length ? Promise.resolve(responses.shift()!) : new Promise<Uint8Array>((r) => (wake = () => r(responses.shift()!))));
  // ServerReflectionRequest: 3 = file_by_filename, 4 = file_containing_symbol.
  const ask = async (field: 3 | 4, value: string) => {
    call.write(new BinaryWriter().tag(field, WireType.LengthDelimited).string(value).finish());
    // ServerReflectionResponse: 4 = file_descriptor_response { repeated bytes file_descriptor_proto = 1 }, 7 = error_response.
    const r = new BinaryReader(await next());
    const protos: FileDescriptorProto[] = [];
    while (r.pos < r.len) {
      const [no, wt] = r.tag();
      if (no === 7) throw new Error(`reflection refused ${value}`);
      if (no !== 4) {
        r.skip(wt);
        continue;
      }
      const inner = new BinaryReader(r.bytes());
      while (inner.pos < inner.len) {
        const [n, w] = inner.tag();
        if (n === 1) protos.push(fromBinary(FileDescriptorProtoSchema, inner.bytes()));
        else inner.skip(w);
      }
    }
    return protos;
  };
  try {
    const files = new Map<string, FileDescriptorProto>();
    const pending = await ask(4, symbol);
    while (pending.length) {
      const file = pending.pop()!;
      if (files.has(file.name)) continue;
      files.set(file.name, file);
      for (const dep of file.dependency) if (!files.has(dep)) pending.push(...(await ask(3, dep)));
    }
    return files;
  } finally {
    call.end();
    client.close();
  }
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

  it("an error's details decode to JSON with what reflection serves for their type names", async () => {
    const auth = ["--header", "authorization: Bearer reflect-t0ken", "--reflect-header", "*"];
    const bad = curl([...auth, "-d", JSON.stringify({ spec: { baseModel: "/nowhere", datasetDir: "/nowhere", rank: 0 } }), "URL/loraforge.v1.TrainerService/Train"]);
    assert.notEqual(bad.code, 0);
    const err = JSON.parse(bad.err) as { code: string; details: { type: string; value: string; debug?: unknown }[] };
    assert.equal(err.code, "invalid_argument");
    assert.deepEqual(err.details.map((d) => d.type).sort(), ["google.rpc.BadRequest", "google.rpc.ErrorInfo"]);
    // buf curl (1.75) prints each detail's bytes only: its error printer (connect-go's error writer)
    // decodes a detail with the types compiled into buf, never with the reflected schema, and buf
    // does not include google/rpc/error_details.proto. README "Generic gRPC tools" has the evidence.
    for (const d of err.details) assert.equal(d.debug, undefined, "if buf curl now prints details as JSON, update the README");

    // Reflection gives a tool everything it needs: the file defining each detail's type, and its imports.
    const decoded: Record<string, JsonValue> = {};
    for (const d of err.details) {
      const files = await reflectedFiles(srv.address, "reflect-t0ken", d.type);
      assert.ok(files.has("google/rpc/error_details.proto"), `reflection serves ${d.type}'s file: ${[...files.keys()].join(", ")}`);
      const registry = createFileRegistry(files.get("google/rpc/error_details.proto")!, (name) => files.get(name));
      const desc = registry.getMessage(d.type)!;
      decoded[d.type] = toJson(desc, fromBinary(desc, Buffer.from(d.value, "base64")));
    }
    assert.deepEqual(decoded["google.rpc.ErrorInfo"], { reason: "INVALID_SPEC", domain: "loraforge.dev" });
    const violations = (decoded["google.rpc.BadRequest"] as { fieldViolations: { field: string }[] }).fieldViolations;
    assert.ok(violations.some((v) => v.field === "spec.rank"), JSON.stringify(decoded["google.rpc.BadRequest"]));
  });

  it("grpcurl prints an error's details as JSON through reflection", { skip: GRPCURL ? false : "grpcurl is not installed (set LORAFORGE_GRPCURL)" }, () => {
    const r = spawnSync(
      GRPCURL,
      ["-plaintext", "-H", "authorization: Bearer reflect-t0ken", "-format-error", "-d", '{"spec": {"rank": 0}}', srv.address, "loraforge.v1.TrainerService/Train"],
      { encoding: "utf8", timeout: 60_000 },
    );
    assert.notEqual(r.status, 0);
    const err = JSON.parse(r.stdout + r.stderr) as { code: number; details: Record<string, unknown>[] };
    assert.equal(err.code, 3, "INVALID_ARGUMENT");
    const info = err.details.find((d) => d["@type"] === "type.googleapis.com/google.rpc.ErrorInfo");
    assert.deepEqual(info, { "@type": "type.googleapis.com/google.rpc.ErrorInfo", reason: "INVALID_SPEC", domain: "loraforge.dev" });
    const bad = err.details.find((d) => d["@type"] === "type.googleapis.com/google.rpc.BadRequest") as { fieldViolations: { field: string }[] } | undefined;
    assert.ok(bad?.fieldViolations.some((v) => v.field === "spec.rank"), r.stdout + r.stderr);
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
