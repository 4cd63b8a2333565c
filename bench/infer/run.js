// bench/infer: the server's onnxruntime-node inference path against diffusers' PyTorch pipeline,
// measured side by side in one run on the same tiny model and the same CPU:
//   - images/s (64 px, 20 Euler steps, guidance 7.5, one image per request), and
//   - the cost of switching LoRAs between requests (p50, ms): ours = reading the cached LoRAs and
//     building the slot tensors for the next request; diffusers = delete_adapters + load_lora_weights +
//     set_adapters (and, for reference, set_adapters alone with both LoRAs resident).
//
//   npm run build && node bench/infer/run.js [--images N] [--switches N] [--threads N] [--work DIR]
//
// The first run exports the tiny model to ONNX (about a minute); --work keeps it for later runs.
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { LoraCache, slotFeeds } from "../../server/dist/infer/lora.js";
import { ModelRegistry } from "../../server/dist/infer/model.js";
import { render } from "../../server/dist/infer/pipeline.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const PYTHON = process.env.LORAFORGE_PYTHON ?? path.join(REPO, "engine", ".venv", "bin", "python");

function arg(name, def) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}
const images = Number(arg("images", "10"));
const switches = Number(arg("switches", "200"));
const threads = Number(arg("threads", "1"));
const steps = 20;
const work = path.resolve(arg("work", path.join(os.tmpdir(), "loraforge-bench-infer")));
mkdirSync(work, { recursive: true });

const py = (args) =>
  execFileSync(PYTHON, args, { env: { ...process.env, PYTHONPATH: path.join(REPO, "engine") }, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], maxBuffer: 1 << 26 });

const model = path.join(work, "tiny-sd");
if (!existsSync(path.join(model, "model_index.json"))) py(["-m", "loraforge_engine", "make-tiny-model", model]);
const loraA = path.join(work, "a", "pytorch_lora_weights.safetensors");
const loraB = path.join(work, "b", "pytorch_lora_weights.safetensors");
if (!existsSync(loraA) || !existsSync(loraB)) {
  const jobs = path.join(work, "jobs.json");
  writeFileSync(jobs, JSON.stringify([
    ["make-lora", loraA, "--seed", "1", "--rank", "4", "--alpha", "4", "--text-encoder"],
    ["make-lora", loraB, "--seed", "2", "--rank", "8", "--alpha", "8"],
  ]));
  py([path.join(REPO, "tests", "py", "infer_reference.py"), "batch", model, jobs]);
}

// ---- ours: onnxruntime-node
const registry = new ModelRegistry(
  { python: PYTHON, engineDir: path.join(REPO, "engine"), cacheRoot: path.join(work, "onnx") },
  { intraOpThreads: threads, providers: ["cpu"] },
);
let t = performance.now();
const loaded = await registry.get(model);
const loadS = (performance.now() - t) / 1000;
const loras = new LoraCache();
const hash = loaded.manifest.model_hash;
const params = (seed, mapped) => ({
  prompt: "a red circle on a blue background", negativePrompt: "", steps, guidanceScale: 7.5, seed,
  width: 64, height: 64, numImages: 1, scheduler: "euler", loras: mapped,
});
for (let i = 0; i < 2; i++) await render(loaded, params(i, []));
t = performance.now();
for (let i = 0; i < images; i++) await render(loaded, params(100 + i, []));
const oursImagesPerS = images / ((performance.now() - t) / 1000);

t = performance.now();
await loras.load(loraA, hash, loaded.slots);
await loras.load(loraB, hash, loaded.slots);
const coldLoadMs = (performance.now() - t) / 2;
const combos = [[[loraA, 1]], [[loraB, 1]], [[loraA, 0.7], [loraB, 1.3]]];
const switchMs = [];
for (let i = 0; i < switches + 3; i++) {
  t = performance.now();
  const mapped = [];
  for (const [file, scale] of combos[i % 3]) mapped.push({ lora: await loras.load(file, hash, loaded.slots), scale });
  slotFeeds(loaded.slots, "text_encoder", mapped);
  slotFeeds(loaded.slots, "unet", mapped);
  if (i >= 3) switchMs.push(performance.now() - t);
}
switchMs.sort((a, b) => a - b);
const oursSwitchP50 = switchMs[Math.floor(switchMs.length / 2)];
const withLora = [];
for (let i = 0; i < 3; i++) {
  const mapped = [{ lora: await loras.load(loraA, hash, loaded.slots), scale: 0.7 }, { lora: await loras.load(loraB, hash, loaded.slots), scale: 1.3 }];
  t = performance.now();
  await render(loaded, params(200 + i, mapped));
  withLora.push(performance.now() - t);
}
await registry.close();

// ---- diffusers: PyTorch
const ref = JSON.parse(
  py([path.join(REPO, "bench", "infer", "diffusers_bench.py"), model, loraA, loraB, "--steps", String(steps), "--images", String(images), "--switches", "30", "--threads", String(threads)])
    .trim()
    .split("\n")
    .pop(),
);

const f = (x, d = 2) => x.toFixed(d);
console.log(`bench/infer — tiny SD-1.x model, 64 px, ${steps} Euler steps, guidance 7.5, 1 image/request, ${threads} thread(s), ${os.cpus().length} CPUs`);
console.log(`  (ONNX export + session load: ${f(loadS, 1)} s; first read of a LoRA file: ${f(coldLoadMs)} ms)`);
console.log("");
console.log("                                  onnxruntime-node   diffusers (torch " + ref.torch + ")   ratio");
console.log(`  images/s                        ${f(oursImagesPerS).padStart(12)}       ${f(ref.images_per_s).padStart(12)}                ${f(oursImagesPerS / ref.images_per_s)}×`);
console.log(`  LoRA switch p50 (ms)            ${f(oursSwitchP50, 3).padStart(12)}       ${f(ref.switch_load_p50_ms).padStart(12)}                ${f(ref.switch_load_p50_ms / oursSwitchP50, 0)}× cheaper`);
console.log(`    diffusers set_adapters alone (both resident): ${f(ref.switch_set_adapters_p50_ms)} ms`);
console.log(`  render with two LoRAs (ms, median of 3): ${f(withLora.sort((a, b) => a - b)[1], 1)} vs ${f(1000 / oursImagesPerS, 1)} without`);
console.log(
  JSON.stringify({
    date: new Date().toISOString().slice(0, 10),
    ours: { images_per_s: oursImagesPerS, switch_p50_ms: oursSwitchP50, cold_lora_load_ms: coldLoadMs },
    diffusers: ref,
    ratios: { images_per_s: oursImagesPerS / ref.images_per_s, switch_cost: ref.switch_load_p50_ms / oursSwitchP50 },
  }),
);
