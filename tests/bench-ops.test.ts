// bench/ops (the operator numbers in docs/operations.md) keeps working: one short run on the managed
// single nats-server. It checks that every measurement ran and came back whole; it never judges speed.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { describe, it } from "node:test";
import { REPO } from "./lib/harness.js";

describe("bench/ops", () => {
  it("measures submissions, events and artifact transfers against a real server", () => {
    const out = execFileSync(
      process.execPath,
      [path.join(REPO, "bench", "ops", "run.js"), "--nats", "single", "--seconds", "1", "--concurrency", "1,2", "--events", "40", "--jobs", "2", "--artifact-mib", "2"],
      { encoding: "utf8", env: process.env, timeout: 240_000 },
    );
    const result = JSON.parse(out.trim().split("\n").at(-1)!) as {
      results: { topology: string; submit: { concurrency: number; jobs: number }[]; events: Record<string, number>; artifacts: Record<string, number> }[];
    };
    assert.equal(result.results.length, 1);
    const r = result.results[0];
    assert.equal(r.topology, "single");
    assert.deepEqual(r.submit.map((s) => s.concurrency), [1, 2]);
    for (const s of r.submit) assert.ok(s.jobs > 0, `no job was submitted by ${s.concurrency} client(s)`);
    for (const k of ["perJob", "replay", "perJobWhileParallel", "aggregate"]) assert.ok(r.events[k] > 0, `events.${k} missing`);
    assert.equal(r.artifacts.mib, 2);
    assert.ok(r.artifacts.uploadMiBs > 0 && r.artifacts.downloadMiBs > 0);
  });
});
