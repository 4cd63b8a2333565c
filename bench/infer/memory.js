// bench/infer/memory.js: Infer's working memory per request, measured against the server's
// estimate (server/src/infer/memory.ts). For each size and image count it renders one request
// (2 steps) and reports the peak RSS above the resident model (VmHWM, reset before each request
// via /proc/self/clear_refs), the estimate, the RSS left once the request is done, and the time:
// with onnxruntime's arena on (the server's default) the sessions keep their peaks; --no-arena
// (LORAFORGE_INFER_MEM_ARENA=0) returns the memory after each request. Sizes run in ascending
// order, so each row's peak is its own, not an earlier row's arena.
//
//   npx tsc -b sdk server && node --expose-gc bench/infer/memory.js [--model tiny|sd15] [--sizes 256,512] [--images 1,2] [--no-arena] [--work DIR]
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
