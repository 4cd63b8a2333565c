// bench/infer/memory.js: Infer's working memory per request, measured against the server's
// estimate (server/src/infer/memory.ts). For each size and image count it renders one request
// (2 steps) and reports the peak RSS above the resident model (VmHWM, reset before each request
// via /proc/self/clear_refs), the estimate, the RSS left once the request is done, and the time:
// with onnxruntime's arena on (the server's default) the sessions keep their peaks; --no-arena
// (LORAFORGE_INFER_MEM_ARENA=0) returns the memory after each request. Sizes run in ascending
// order, so each row's peak is its own, not an earlier row's arena.
//
//   npx tsc -b sdk server && node --expose-gc bench/infer/memory.js [--model tiny|sd15] [--sizes 256,512] [--images 1,2] [--no-arena] [--work DIR]
//
// --process measures the Infer process instead (server/src/infer/process.ts, as `loraforge serve` runs
// it): its RSS once the model is open, after one large request (--large, default 512 px) and after the
// next small one (--small, default 64 px), first without recycling, then with the process retired after
// the large request: the next request sent at once (it waits for a fresh process to start and reopen
// the model) and one sent once the fresh process has reopened it. Each request renders 2 steps, 1 image.
//
//   node bench/infer/memory.js --process [--model tiny|sd15] [--large 512] [--small 64] [--no-arena]
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { estimateBytes, readMemoryShape } from "../../server/dist/infer/memory.js";
import { ModelRegistry } from "../../server/dist/infer/model.js";
import { render } from "../../server/dist/infer/pipeline.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const PYTHON = process.env.LORAFORGE_PYTHON ?? path.join(REPO, "engine", ".venv", "bin", "python");
const arg = (name, def) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
};
const kind = arg("model", "tiny");
const sizes = arg("sizes", "256,512").split(",").map(Number);
const counts = arg("images", "1,2").split(",").map(Number);
const arena = !process.argv.includes("--no-arena");
const work = path.resolve(arg("work", path.join(os.tmpdir(), "loraforge-bench-memory")));

const modelDir = execFileSync(PYTHON, [path.join(REPO, "bench", "models.py"), kind, work], {
  env: { ...process.env, PYTHONPATH: path.join(REPO, "engine") },
  encoding: "utf8",
}).trim().split("\n").pop();
const status = (key) => Number(new RegExp(`${key}:\\s+(\\d+)`).exec(readFileSync("/proc/self/status", "utf8"))[1]) * 1024;
const mib = (b) => (b / 2 ** 20).toFixed(0);

if (process.argv.includes("--process")) {
  await processBench();
  process.exit(0);
}

const registry = new ModelRegistry(
  { python: PYTHON, engineDir: path.join(REPO, "engine"), cacheRoot: path.join(work, "onnx") },
  { intraOpThreads: os.availableParallelism(), providers: ["cpu"], memArena: arena },
);
const model = await registry.get(modelDir);
const shape = readMemoryShape(modelDir);
const unetBytes = model.manifest.io_dtype?.unet === "float16" ? 2 : 4;
const vaeBytes = model.manifest.io_dtype?.vae_decoder === "float16" ? 2 : 4;
console.log(`model ${kind} (${modelDir}), onnxruntime arena ${arena ? "on" : "off"}, ${os.availableParallelism()} threads`);
console.log("| size | images | peak above resident MiB | estimate MiB | estimate ÷ peak | left after MiB | s |");
console.log("| --- | --- | --- | --- | --- | --- | --- |");
const rows = [];
for (const size of sizes)
  for (const n of counts) {
    globalThis.gc?.();
    const before = status("VmRSS");
    writeFileSync("/proc/self/clear_refs", "5");
    const t = performance.now();
    await render(model, {
      prompt: "a photo", negativePrompt: "", steps: 2, guidanceScale: 7.5, seed: 1, width: size, height: size,
      numImages: n, scheduler: "euler", loras: [],
    });
    const s = (performance.now() - t) / 1000;
    const peak = status("VmHWM") - before;
    globalThis.gc?.();
    const left = status("VmRSS") - before;
    const est = estimateBytes(shape, { width: size, height: size, rowsPerImage: 2, unetBytes, vaeBytes, arena }, n);
    rows.push({ size, n, peak, est, left, s });
    console.log(`| ${size} | ${n} | ${mib(peak)} | ${mib(est)} | ${(est / peak).toFixed(2)} | ${mib(left)} | ${s.toFixed(1)} |`);
  }
await registry.close();
const worst = Math.min(...rows.map((r) => r.est / r.peak));
console.log(`lowest estimate ÷ peak: ${worst.toFixed(2)} (below 1: the estimate is too low for that row)`);

/** --process: the Infer process's RSS and the next request's time, with and without its retirement. */
async function processBench() {
  const { InferProcess, rssOf } = await import("../../server/dist/infer/process.js");
  const { ModelHasher } = await import("../../server/dist/core/models.js");
  const large = Number(arg("large", "512"));
  const small = Number(arg("small", "64"));
  const engine = { python: PYTHON, engineDir: path.join(REPO, "engine"), cacheRoot: path.join(work, "onnx") };
  const hash = await new ModelHasher(engine).hashOf(modelDir);
  const proc = new InferProcess({ ...engine, dataRoots: [], runtime: { intraOpThreads: os.availableParallelism(), providers: ["cpu"], memArena: arena } });
  const job = (size) => ({
    base: { dir: modelDir, hash }, req: { prompt: "a photo", negativePrompt: "" }, loras: [], steps: 2, guidance: 7.5,
    seed: 1, numImages: 1, perGroup: 1, scheduler: "euler", width: size, height: size,
  });
  const timed = async (size) => {
    const t = performance.now();
    await proc.render(job(size));
    return (performance.now() - t) / 1000;
  };
  const ticks = (pid) => readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ").slice(11, 13).map(Number).reduce((a, b) => a + b);
  /** Waits until a process runs and has used no CPU for a second (its successor has reopened the model). */
  const settled = async () => {
    for (;;) {
      await new Promise((r) => setTimeout(r, 1000));
      const pid = proc.pid;
      if (pid === undefined) continue;
      const a = ticks(pid);
      await new Promise((r) => setTimeout(r, 1000));
      if (proc.pid === pid && ticks(pid) === a) return;
    }
  };
  const retire = () => {
    proc.markForRetirement();
    proc.retireIfMarked();
  };

  console.log(`model ${kind} (${modelDir}), Infer process, onnxruntime arena ${arena ? "on" : "off"}, ${os.availableParallelism()} threads; large ${large} px, small ${small} px`);
  await proc.render(job(small)); // starts the process, exports if needed, opens the model
  const base = rssOf(proc.pid);
  const baseline = await timed(small);
  console.log(`process RSS with the model open: ${mib(base)} MiB; a small request in a warm process: ${baseline.toFixed(2)} s`);
  console.log("| recycling | RSS after the large request MiB | next small request: process | RSS after it MiB | its time s |");
  console.log("| --- | --- | --- | --- | --- |");
  const row = async (label, after) => {
    const pid = proc.pid;
    const s = await timed(large);
    const rssLarge = rssOf(pid);
    await after();
    const next = await timed(small);
    console.log(`| ${label} | ${mib(rssLarge)} (large request ${s.toFixed(1)} s) | ${proc.pid === pid ? "same" : "fresh"} | ${mib(rssOf(proc.pid))} | ${next.toFixed(2)} |`);
  };
  await row("off", async () => undefined);
  await row("on, next request at once", async () => retire());
  await row("on, next request after the reopen", async () => {
    retire();
    await settled();
  });
  await proc.close();
}
