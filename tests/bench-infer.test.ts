// bench/infer/device_run.sh (the prepared device bench, issue 20) keeps working on a CPU-only machine: one short
// run on the tiny model with an fp16 export on onnxruntime's CPU provider, the precision a CUDA run uses, through
// bench/infer/run.js and diffusers' side. It checks that every measurement ran and came back whole; never speed.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { describe, it } from "node:test";
import { REPO, tmpDir } from "./lib/harness.js";

interface Result {
  model: string;
  provider: string;
  providers_used: string[];
  dtype: string;
  export: { dir: string; seconds: number; peak_rss_bytes: number };
  images_per_s: { threads: number; ours: number; diffusers: number; ratio: number }[];
  loras: { cold: Record<string, { first: number; p50: number }>; p50: number; p99: number; newCombo: number; rebuild: number };
  render_ms: { none: number; two_loras: number };
}

describe("bench/infer/device_run.sh", () => {
  it("runs the bench on the CPU provider with an fp16 export when no CUDA provider is installed", () => {
    const work = tmpDir("bench-infer");
    const args = ["--model", "tiny", "--provider", "auto", "--dtype", "fp16", "--threads", "1", "--images", "1", "--switches", "20", "--work", work];
    const out = execFileSync("bash", [path.join(REPO, "bench", "infer", "device_run.sh"), ...args], {
      encoding: "utf8",
      // "auto" takes the CPU provider: onnxruntime-node is installed without its CUDA provider library.
      env: { ...process.env, OUT: "" },
      stdio: ["ignore", "pipe", "pipe"],
      timeout: 540_000,
    });
    const r = JSON.parse(out.trim().split("\n").at(-1)!) as Result;
    assert.equal(r.model, "tiny");
    assert.equal(r.provider, "cpu");
    assert.deepEqual(r.providers_used, ["cpu"]);
    assert.equal(r.dtype, "fp16");
    assert.ok(r.export.dir.endsWith("-fp16"), r.export.dir);
    assert.ok(r.export.seconds > 0 && r.export.peak_rss_bytes > 0);
    assert.equal(r.images_per_s.length, 1);
    const row = r.images_per_s[0];
    assert.equal(row.threads, 1);
    assert.ok(row.ours > 0 && row.diffusers > 0 && row.ratio === row.ours / row.diffusers, JSON.stringify(row));
    assert.deepEqual(Object.keys(r.loras.cold).sort(), ["r16", "r4", "r64"]);
    for (const c of Object.values(r.loras.cold)) assert.ok(c.first > 0 && c.p50 > 0);
    assert.ok(r.loras.p50 > 0 && r.loras.p99 >= r.loras.p50 && r.loras.newCombo > 0 && r.loras.rebuild > 0);
    assert.ok(r.render_ms.none > 0 && r.render_ms.two_loras > 0);
  });
});
