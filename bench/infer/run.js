// bench/infer: the server's onnxruntime-node inference path against diffusers' PyTorch pipeline, side by side
// in one run on the same model and CPU (--model tiny | sd15, made by bench/models.py):
//   - images/s (--size px, 20 Euler steps, guidance 7.5, one image per request) at each thread count of
//     --threads (default 1 and all cores), both sides at the same count;
//   - the LoRA switch: what a request does for its LoRAs when they differ from the previous request's (look up
//     the files in the LoRA cache, take the combination's session inputs for the text encoder and the UNet),
//     p50 and p99, against diffusers' delete_adapters + load_lora_weights + set_adapters (and set_adapters
//     alone with both resident); also the first request of a new combination (its inputs built) and the
//     same work without the combination cache (the inputs built every request, as before issue 20);
//   - the cold read of a LoRA file (not in the server's cache, in the OS page cache): parse + map, median;
//   - the ONNX export's wall time and peak RSS (bench/infer/export_measured.py, measured when the export is
//     made; later runs reuse the export and print the numbers recorded then, with their date).
//
//   npx tsc -b sdk server && node bench/infer/run.js [--model tiny|sd15] [--threads 1,all] [--images N]
//       [--switches N] [--size 64] [--work DIR] [--no-diffusers] [--loras-only] [--provider cpu|cuda] [--dtype fp32|fp16]
// --loras-only: the LoRA measurements alone (cold read, switch), on the export's slots; no session, no render.
// --provider cuda: onnxruntime's CUDA execution provider first (the server falls back to CPU when it cannot load;
// the report says which ran), diffusers on the GPU; --dtype: the export's precision (default fp16 with cuda, else
// fp32), diffusers in the same on the GPU (on the CPU it stays fp32). bench/infer/device_run.sh picks these for a device session.
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { LoraCache, SlotIndex, slotFeeds } from "../../server/dist/infer/lora.js";
import { ModelRegistry, readManifest } from "../../server/dist/infer/model.js";
import { render } from "../../server/dist/infer/pipeline.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const PYTHON = process.env.LORAFORGE_PYTHON ?? path.join(REPO, "engine", ".venv", "bin", "python");

function arg(name, def) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}
const kind = arg("model", "tiny");
if (!["tiny", "sd15"].includes(kind)) throw new Error(`--model must be tiny or sd15, got ${kind}`);
const cores = os.availableParallelism();
const threadCounts = [...new Set(arg("threads", "1,all").split(",").map((t) => (t === "all" ? cores : Number(t))))];
const images = Number(arg("images", kind === "tiny" ? "10" : "3"));
const warmup = kind === "tiny" ? 2 : 1;
const switches = Number(arg("switches", "400"));
const size = Number(arg("size", "64"));
const steps = 20;
const lorasOnly = process.argv.includes("--loras-only");
const provider = arg("provider", "cpu");
if (!["cpu", "cuda"].includes(provider)) throw new Error(`--provider must be cpu or cuda, got ${provider}`);
const dtype = arg("dtype", provider === "cuda" ? "fp16" : "fp32");
if (!["fp32", "fp16"].includes(dtype)) throw new Error(`--dtype must be fp32 or fp16, got ${dtype}`);
const withDiffusers = !process.argv.includes("--no-diffusers") && !lorasOnly;
const work = path.resolve(arg("work", path.join(os.tmpdir(), "loraforge-bench-infer")));
mkdirSync(work, { recursive: true });

// The engine first; a PYTHONPATH already set (device_run.sh's carried wheels) stays after it.
const env = { ...process.env, PYTHONPATH: [path.join(REPO, "engine"), process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) };
const py = (args) => execFileSync(PYTHON, args, { env, encoding: "utf8", stdio: ["ignore", "pipe", "inherit"], maxBuffer: 1 << 26 });
const lastJson = (out) => JSON.parse(out.trim().split("\n").pop());
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((xs.length * p) / 100))];
const say = (s) => process.stderr.write(`[bench/infer] ${s}\n`);

// ---- the model, its ONNX export (measured once), and LoRAs at its widths
const modelDir = py([path.join(REPO, "bench", "models.py"), kind, work]).trim().split("\n").pop();
const onnxRoot = path.join(work, "onnx");
const exportRecord = path.join(work, dtype === "fp32" ? `export-${kind}.json` : `export-${kind}-${dtype}.json`);
let exp = existsSync(exportRecord) ? JSON.parse(readFileSync(exportRecord, "utf8")) : null;
if (!exp || !readManifest(exp.dir)) {
  say(`exporting ${modelDir} to ONNX (measured: wall time, peak RSS)`);
  exp = lastJson(py([path.join(REPO, "bench", "infer", "export_measured.py"), modelDir, onnxRoot, "--dtype", dtype]));
  writeFileSync(exportRecord, JSON.stringify(exp));
}

// r16: the trainer's targets (attention q/k/v/out) and the text encoder, rank 16; r4: UNet attention, rank 4;
// r64: every adaptable layer (feed-forward and proj_in/out too) with the text encoder, rank 64, alpha 32.
const loraDir = path.join(work, `loras-${kind}`);
const lora = (name) => path.join(loraDir, name, "pytorch_lora_weights.safetensors");
const specs = {
  r16: ["--rank", "16", "--alpha", "16", "--text-encoder", "--seed", "1"],
  r4: ["--rank", "4", "--alpha", "4", "--seed", "2"],
  r64: ["--rank", "64", "--alpha", "32", "--wide", "--text-encoder", "--seed", "3"],
};
const missing = Object.keys(specs).filter((n) => !existsSync(lora(n)));
if (missing.length > 0) {
  say(`making LoRAs ${missing.join(", ")} at the model's widths`);
  const jobs = path.join(work, `lora-jobs-${kind}.json`);
  writeFileSync(jobs, JSON.stringify(missing.map((n) => ["make-lora", lora(n), ...specs[n]])));
  py([path.join(REPO, "tests", "py", "infer_reference.py"), "batch", modelDir, jobs]);
}

// ---- ours: images/s per thread count
const registryFor = (threads) =>
  new ModelRegistry(
    { python: PYTHON, engineDir: path.join(REPO, "engine"), cacheRoot: onnxRoot },
    { intraOpThreads: threads, providers: provider === "cuda" ? ["cuda", "cpu"] : ["cpu"], dtype },
  );
/** The execution providers the sessions were made with (CUDA may have fallen back to CPU). */
let providersUsed = null;
const params = (seed, loras = [], feeds) => ({
  prompt: "a red circle on a blue background", negativePrompt: "", steps, guidanceScale: 7.5, seed,
  width: size, height: size, numImages: 1, scheduler: "euler", loras, feeds,
});
async function oursImagesPerS(threads) {
  const registry = registryFor(threads);
  try {
    const model = await registry.get(modelDir);
    providersUsed = model.providers;
    for (let i = 0; i < warmup; i++) await render(model, params(i));
    const t = performance.now();
    for (let i = 0; i < images; i++) await render(model, params(100 + i));
    return images / ((performance.now() - t) / 1000);
  } finally {
    await registry.close();
  }
}
const diffusers = (threads, switchCount) =>
  lastJson(py([path.join(REPO, "bench", "infer", "diffusers_bench.py"), modelDir, lora("r16"), lora("r4"), "--steps", String(steps),
    "--images", String(images), "--warmup", String(warmup), "--switches", String(switchCount), "--threads", String(threads), "--size", String(size),
    "--device", provider, "--dtype", provider === "cuda" ? dtype : "fp32"]));

const rows = [];
for (const [k, threads] of lorasOnly ? [] : threadCounts.entries()) {
  say(`ours, ${threads} thread(s)`);
  const ours = await oursImagesPerS(threads);
  say(`diffusers, ${threads} thread(s)`);
  const ref = withDiffusers ? diffusers(threads, k === 0 ? 30 : 0) : null;
  rows.push({ threads, ours, ref });
}

// ---- the LoRA switch and the cold read (on a model's slots; no session involved)
const combos = [[["r16", 1]], [["r4", 1]], [["r16", 0.7], ["r4", 1.3]], [["r64", 0.8]], [["r16", 1], ["r64", 0.5]]];
const median40 = async (fn) => {
  const times = [];
  for (let i = 0; i < 40; i++) {
    const t = performance.now();
    await fn(i);
    times.push(performance.now() - t);
  }
  return median(times);
};

/** Cold reads and switches of the LoRAs `file(name)` on the slots `index` (model key `hash`). */
async function measureLoras(index, hash, file, feedDtype = () => "float32") {
  // Cold read: a fresh cache each time, so the file is parsed and mapped as on a server's first request for it.
  const cold = {};
  for (const n of Object.keys(specs)) {
    const times = [];
    for (let i = 0; i < 21; i++) {
      const c = new LoraCache();
      const t = performance.now();
      c.map(await c.file(file(n)), hash, index);
      times.push(performance.now() - t);
    }
    cold[n] = { first: times[0], p50: median(times.slice(1)) };
  }
  const cache = new LoraCache();
  // One request's LoRA work: look the files up, take the combination's inputs for every component.
  const components = [...new Set(index.slots.map((s) => s.component))];
  async function requestLoras(combo, scaleJitter = 0) {
    const items = [];
    for (const [n, scale] of combo) items.push({ file: await cache.file(file(n)), scale: scale + scaleJitter });
    const c = cache.combination(hash, index, items);
    for (const comp of components) c.feeds(comp, feedDtype(comp));
  }
  for (const c of combos) await requestLoras(c); // every combination built once
  const times = [];
  for (let i = 0; i < switches; i++) {
    const t = performance.now();
    await requestLoras(combos[i % combos.length]);
    times.push(performance.now() - t);
  }
  // A combination never seen: its inputs built from files already parsed and mapped (an empty cache each time,
  // so that building 40 combinations does not evict the files and time their reads instead).
  const parsedFiles = Object.fromEntries(await Promise.all(Object.keys(specs).map(async (n) => [n, await cache.file(file(n))])));
  const newCombo = await median40((i) => {
    const fresh = new LoraCache(Number.MAX_SAFE_INTEGER);
    const c = fresh.combination(hash, index, combos[i % combos.length].map(([n, scale]) => ({ file: parsedFiles[n], scale })));
    for (const comp of components) c.feeds(comp, feedDtype(comp));
  });
  // Without the combination cache: the mapped LoRAs' inputs built every request (the code before issue 20).
  const rebuild = await median40(async (i) => {
    const mapped = [];
    for (const [n, scale] of combos[i % combos.length]) mapped.push({ lora: cache.map(await cache.file(file(n)), hash, index), scale });
    for (const comp of components) slotFeeds(index, comp, mapped, feedDtype(comp));
  });
  const bytes = Object.fromEntries(Object.keys(specs).map((n) => [n, statSync(file(n)).size]));
  return { cold, p50: median(times), p99: pct(times, 99), newCombo, rebuild, bytes, cacheBytes: cache.bytes };
}

// The slots and model key from the export's manifest: the LoRA work needs no session.
const manifest = readManifest(exp.dir);
const hash = manifest.model_hash;
const cache = new LoraCache();
say("LoRA reads and switches");
// Feeds in the precision the export's graphs take (float16 in an fp16 export).
const sw = await measureLoras(new SlotIndex(manifest.slots), hash, lora, (comp) => manifest.io_dtype?.[comp] ?? "float32");
let swXL = null;
if (process.argv.includes("--sdxl-loras")) {
  // SDXL-shaped slots and LoRA files (bench/infer/sdxl_loras.py: meta-device models, the export's slot selection).
  const xlDir = path.join(work, "sdxl-loras");
  const slotsFile = py([path.join(REPO, "bench", "infer", "sdxl_loras.py"), xlDir]).trim().split("\n").pop();
  const xlIndex = new SlotIndex(JSON.parse(readFileSync(slotsFile, "utf8")));
  say("SDXL-shaped LoRA reads and switches");
  swXL = await measureLoras(xlIndex, "sdxl-shaped", (n) => path.join(xlDir, n, "pytorch_lora_weights.safetensors"));
}

// Rendering with a cached combination of two LoRAs against none (all cores; median of 3 each).
const renderMs = { none: [], two: [] };
if (!lorasOnly) {
  const r = registryFor(cores);
  const m = await r.get(modelDir);
  const two = [["r16", 0.7], ["r4", 1.3]];
  const items = [];
  for (const [n, scale] of two) items.push({ file: await cache.file(lora(n)), scale });
  const c = cache.combination(hash, m.slots, items);
  await render(m, params(1));
  for (let i = 0; i < 3; i++) {
    let t = performance.now();
    await render(m, params(200 + i));
    renderMs.none.push(performance.now() - t);
    t = performance.now();
    await render(m, params(200 + i, [], c.feeds));
    renderMs.two.push(performance.now() - t);
  }
  await r.close();
}

// ---- report
const f = (x, d = 2) => (x === null || x === undefined ? "—" : x.toFixed(d));
const mib = (b) => (b / 2 ** 20).toFixed(1);
const ref0 = rows[0]?.ref;
console.log(`bench/infer — ${kind} model, ${size} px, ${steps} Euler steps, guidance 7.5, 1 image/request, ${cores} CPUs, ${new Date().toISOString()}`);
console.log(`  execution provider: ${providersUsed ? providersUsed.join(", ") : "none (no session)"}; export ${dtype}; diffusers on ${provider}`);
console.log(`  ONNX export (${dtype}): ${f(exp.seconds, 1)} s, peak RSS ${(exp.peak_rss_bytes / 2 ** 30).toFixed(2)} GiB (measured ${exp.date})`);
console.log("");
if (rows.length > 0) console.log("| threads | onnxruntime-node images/s | diffusers images/s | ratio |\n| --- | --- | --- | --- |");
for (const r of rows) console.log(`| ${r.threads} | ${f(r.ours, 3)} | ${f(r.ref?.images_per_s, 3)} | ${r.ref ? f(r.ours / r.ref.images_per_s) + "×" : "—"} |`);
console.log("");
const loraReport = (title, m) => {
  console.log(`${title}: ${Object.entries(m.bytes).map(([n, b]) => `${n} ${mib(b)} MiB`).join(", ")}`);
  console.log(`  cold read (parse + map; p50 of 20, first ever in brackets): ${Object.entries(m.cold).map(([n, c]) => `${n} ${f(c.p50, 2)} ms (${f(c.first, 1)})`).join(", ")}`);
  console.log(`  switch to a combination seen before, p50 / p99 of ${switches}: ${f(m.p50, 3)} / ${f(m.p99, 3)} ms`);
  console.log(`  first request of a new combination (its inputs built; files cached), p50: ${f(m.newCombo, 2)} ms; inputs built every request (no combination cache), p50: ${f(m.rebuild, 2)} ms`);
};
loraReport(`LoRA files (${kind})`, sw);
if (ref0?.switch_load_p50_ms)
  console.log(`  diffusers: delete_adapters + load_lora_weights + set_adapters (r16 ↔ r4) p50 ${f(ref0.switch_load_p50_ms)} ms (${f(ref0.switch_load_p50_ms / sw.p50, 0)}× ours); set_adapters alone, both resident: ${f(ref0.switch_set_adapters_p50_ms)} ms (${f(ref0.switch_set_adapters_p50_ms / sw.p50, 0)}× ours)`);
if (!lorasOnly) console.log(`  render at ${cores} threads with r16 0.7 + r4 1.3 (median of 3): ${f(median(renderMs.two), 1)} ms vs ${f(median(renderMs.none), 1)} ms without`);
if (swXL) loraReport("SDXL-shaped LoRA files (no session: slots from bench/infer/sdxl_loras.py)", swXL);
console.log(
  JSON.stringify({
    date: new Date().toISOString(),
    model: kind,
    provider,
    providers_used: providersUsed,
    dtype,
    size,
    steps,
    cpus: cores,
    export: exp,
    images_per_s: rows.map((r) => ({ threads: r.threads, ours: r.ours, diffusers: r.ref?.images_per_s ?? null, ratio: r.ref ? r.ours / r.ref.images_per_s : null })),
    loras: sw,
    loras_sdxl_shaped: swXL,
    diffusers_switch_ms: ref0 ? { load_p50: ref0.switch_load_p50_ms, set_adapters_p50: ref0.switch_set_adapters_p50_ms } : null,
    render_ms: lorasOnly ? null : { none: median(renderMs.none), two_loras: median(renderMs.two) },
    torch: ref0?.torch ?? null,
  }),
);
