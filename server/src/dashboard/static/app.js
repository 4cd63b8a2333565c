// The loraforge dashboard page: a live job list, and for the selected job its
// charts, numbers, validation images, files, spec and log. Everything it shows of
// a job comes from the job's replayable event stream (server-sent events), so a
// reload replays the history and then goes on live. Jobs and events arrive in proto3
// JSON (64-bit integers as strings, enums by value name, zero values left out).
// User-supplied text (prompts, errors, log lines, spec values) only ever goes into
// the page as text nodes.
"use strict";

const FINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const LOG_LINES = 300;
const $ = (id) => document.getElementById(id);

/** Creates an element; strings among `children` become text nodes (never HTML). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, String(v));
  }
  for (const c of children) if (c !== undefined && c !== null) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const stateOf = (s) => String(s || "").replace("JOB_STATE_", "") || "UNKNOWN";
/** A proto3 JSON integer (int64 comes as a string, a zero value not at all) as a number. */
const int = (x) => Number(x || 0);
/** Why a job failed or was cancelled: the message of its google.rpc.Status. */
const errorText = (status) => (status && (status.message || (status.code ? `error code ${status.code}` : ""))) || "";

/**
 * An enum value as people say it: a spec field's value name without the enum's prefix, which is
 * the field's own name in capitals ("lrScheduler": "LR_SCHEDULER_COSINE" → "cosine").
 */
function readableValue(field, value) {
  if (typeof value !== "string") return typeof value === "object" ? JSON.stringify(value) : String(value);
  const prefix = field.replace(/[A-Z]/g, (c) => "_" + c).toUpperCase() + "_";
  return value.startsWith(prefix) && /^[A-Z0-9_]+$/.test(value) ? value.slice(prefix.length).toLowerCase() : value;
}
const shortId = (id) => (id.length > 14 ? id.slice(0, 8) + "…" + id.slice(-6) : id);

function fmtNum(x, digits = 4) {
  if (x === undefined || x === null || !Number.isFinite(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a < 1e-3 || a >= 1e5) return x.toExponential(2);
  return Number(x.toPrecision(digits)).toString();
}

function fmtDuration(s) {
  if (s === undefined || s === null || !Number.isFinite(s) || s < 0) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

function fmtBytes(n) {
  if (!n) return "";
  const u = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

/** Where an artifact downloads, by its name ("jobs/<job id>/…") through the dashboard's API. */
const artifactUrl = (name) => `/api/artifacts?name=${encodeURIComponent(name)}`;
/** The file an artifact name ends in; a checkpoint folder ("…/checkpoint-4/") downloads as a .tar. */
const artifactFile = (name) => {
  const n = String(name);
  const base = n.replace(/\/+$/, "").split("/").pop();
  return n.endsWith("/") ? `${base}.tar` : base;
};

// ---------------------------------------------------------------- job list

let listJobs = [];
let selectedId = null;
// Until the server's first answer the list is unknown, not empty: the page says it is loading.
let listLoaded = false;

function renderJobList() {
  const ul = $("job-list");
  // The list is polled; the selected job's own event stream is newer.
  if (view && view.state) {
    const j = listJobs.find((x) => x.id === view.jobId);
    if (j) {
      j.state = view.state;
      if (view.last && view.last.step > j.currentStep) j.currentStep = view.last.step;
      if (view.totalSteps) j.totalSteps = view.totalSteps;
    }
  }
  ul.replaceChildren(
    ...listJobs.map((j) => {
      const progress = j.totalSteps ? `step ${j.currentStep}/${j.totalSteps}` : j.currentStep ? `step ${j.currentStep}` : "";
      const when = j.createTime ? new Date(j.createTime).toLocaleString() : "";
      const a = el(
        "a",
        { href: `#${encodeURIComponent(j.id)}`, "data-job-id": j.id, "aria-current": j.id === selectedId ? "true" : "false" },
        el("div", { class: "row" }, el("span", { class: "id", title: j.id }, shortId(j.id)), el("span", { class: "state", "data-state": j.state }, j.state)),
        el("div", { class: "meta" }, [progress, when].filter(Boolean).join(" · ")),
        j.validationPrompt ? el("div", { class: "meta", title: j.validationPrompt }, `“${j.validationPrompt}”`) : null,
        j.queuedReason ? el("div", { class: "meta waiting", title: j.queuedReason }, j.queuedReason) : null,
      );
      return el("li", {}, a);
    }),
  );
  $("jobs-loading").hidden = listLoaded;
  $("job-list").setAttribute("aria-busy", String(!listLoaded));
  $("no-jobs").hidden = !listLoaded || listJobs.length > 0;
  $("empty").hidden = !listLoaded || !!selectedId;
}

function connectJobList() {
  const es = new EventSource("/api/jobs/events");
  const conn = $("conn");
  es.addEventListener("open", () => { conn.textContent = "live"; conn.dataset.ok = "true"; });
  es.addEventListener("error", () => { conn.textContent = "reconnecting…"; conn.dataset.ok = "false"; });
  es.addEventListener("jobs", (e) => {
    listJobs = JSON.parse(e.data);
    listLoaded = true;
    renderJobList();
    // The selected job's queued reason comes with the list, which the server keeps current.
    if (view) scheduleRender();
    // With nothing chosen, follow the newest job.
    if (!selectedId && listJobs.length > 0) {
      history.replaceState(null, "", `#${encodeURIComponent(listJobs[0].id)}`);
      selectFromHash();
    }
  });
}

// ---------------------------------------------------------------- one job

/** Everything known about the selected job, rebuilt from its events. */
let view = null;
let charts = null;

function newView(jobId) {
  return {
    jobId,
    job: null,
    es: null,
    state: "",
    error: "",
    steps: [], loss: [], ema: [], lr: [], ips: [],
    emaState: { s: 0, n: 0 },
    last: null,          // the newest StepMetrics
    lastTime: 0,         // when it happened (ms)
    totalSteps: 0,
    files: new Map(),    // artifact name → {kind, step, sizeBytes, name}
    validations: new Map(), // step → {step, prompt, images: Map(artifact name → artifact)}
    log: [],
    dataset: null,       // the DatasetReport
    classImages: null,   // the newest ClassImageProgress (prior preservation)
    lastSequence: 0,
    dirty: { charts: true, gallery: true, files: true, log: true, dataset: true, classImages: true },
  };
}

function smoothing() {
  return Number($("smoothing").value);
}

/** Debiased exponential moving average (as TensorBoard draws it). */
function pushEma(v, x) {
  const a = smoothing();
  v.emaState.s = a * v.emaState.s + (1 - a) * x;
  v.emaState.n += 1;
  v.ema.push(v.emaState.s / (1 - Math.pow(a, v.emaState.n)));
}

function recomputeEma(v) {
  v.ema = [];
  v.emaState = { s: 0, n: 0 };
  for (const x of v.loss) pushEma(v, x);
}

function applyEvent(v, ev) {
  v.lastSequence = int(ev.sequence) || v.lastSequence;
  if (ev.state) {
    v.state = stateOf(ev.state.state);
    if (ev.state.error) v.error = errorText(ev.state.error);
    if (ev.state.lora && ev.state.lora.name) v.files.set(ev.state.lora.name, ev.state.lora);
    v.dirty.files = true;
  } else if (ev.metrics) {
    // int64 fields as numbers, so that charts and comparisons work on them.
    const m = { ...ev.metrics, step: int(ev.metrics.step), totalSteps: int(ev.metrics.totalSteps) };
    const step = m.step;
    // A resumed run repeats steps after its last checkpoint: the newer values win.
    while (v.steps.length && v.steps[v.steps.length - 1] >= step) {
      v.steps.pop(); v.loss.pop(); v.lr.pop(); v.ips.pop();
    }
    v.steps.push(step);
    v.loss.push(m.loss || 0);
    v.lr.push(m.learningRate || 0);
    v.ips.push(m.imagesPerSecond || 0);
    if (v.ema.length > v.loss.length - 1) recomputeEma(v);
    else pushEma(v, m.loss || 0);
    v.last = m;
    v.lastTime = ev.time ? Date.parse(ev.time) : Date.now();
    if (m.totalSteps) v.totalSteps = m.totalSteps;
    v.dirty.charts = true;
  } else if (ev.checkpoint) {
    const a = ev.checkpoint.artifact;
    if (a && a.name) v.files.set(a.name, a);
    v.dirty.files = true;
  } else if (ev.validation) {
    const val = ev.validation;
    const step = int(val.step);
    let group = v.validations.get(step);
    if (!group) v.validations.set(step, (group = { step, prompt: val.prompt || "", images: new Map() }));
    for (const img of val.images || []) if (img.name) group.images.set(img.name, img);
    v.dirty.gallery = true;
  } else if (ev.dataset) {
    v.dataset = ev.dataset;
    v.dirty.dataset = true;
  } else if (ev.classImages) {
    v.classImages = ev.classImages;
    v.dirty.classImages = true;
  } else if (ev.log) {
    const t = ev.time ? new Date(ev.time).toLocaleTimeString() : "";
    v.log.push(`${t} ${String(ev.log.level || "").replace("LOG_LEVEL_", "")} ${ev.log.message || ""}`);
    if (v.log.length > LOG_LINES) v.log.splice(0, v.log.length - LOG_LINES);
    v.dirty.log = true;
  }
}

// ---------------------------------------------------------------- charts

function axisValues(_u, splits) {
  return splits.map((x) => fmtNum(x, 3));
}

/** Whole steps only on the x axis: 1, 2, 5, 10, 20, 50, … */
const STEP_INCRS = [];
for (let m = 1; m <= 1e9; m *= 10) STEP_INCRS.push(m, 2 * m, 5 * m);

function makeChart(target, series, height) {
  const opts = {
    width: Math.max(200, target.clientWidth),
    height,
    scales: { x: { time: false } },
    legend: { show: true },
    cursor: { drag: { x: true, y: false } },
    series: [{ label: "step", value: (_u, x) => (x === null || x === undefined ? "–" : String(x)) }, ...series],
    axes: [
      { label: "step", size: 40, labelSize: 16, incrs: STEP_INCRS },
      { size: 64, values: axisValues },
    ],
  };
  return new uPlot(opts, [[], ...series.map(() => [])], target);
}

function ensureCharts() {
  if (charts) return charts;
  const value = (_u, y) => (y === null || y === undefined ? "–" : fmtNum(y));
  charts = {
    loss: makeChart($("loss-chart"), [
      { label: "loss", stroke: "rgba(37, 99, 235, 0.35)", width: 1, value },
      { label: "smoothed", stroke: "#1d4ed8", width: 2, value },
    ], 260),
    lr: makeChart($("lr-chart"), [{ label: "learning rate", stroke: "#7c3aed", width: 2, value }], 180),
    ips: makeChart($("ips-chart"), [{ label: "images/s", stroke: "#059669", width: 2, value }], 180),
  };
  window.addEventListener("resize", resizeCharts);
  return charts;
}

function resizeCharts() {
  if (!charts) return;
  for (const [key, c] of Object.entries(charts)) {
    const target = $(`${key}-chart`);
    c.setSize({ width: Math.max(200, target.clientWidth), height: c.height });
  }
}

// ---------------------------------------------------------------- rendering

let frame = 0;
function scheduleRender() {
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); });
}

function renderStats(v) {
  const m = v.last || {};
  const total = v.totalSteps || (v.job ? int(v.job.totalSteps) : 0);
  const step = m.step || 0;
  $("st-step").textContent = total ? `${step} / ${total}` : step ? String(step) : "–";
  $("st-loss").textContent = v.last ? fmtNum(m.loss || 0) : "–";
  $("st-ema").textContent = v.ema.length ? fmtNum(v.ema[v.ema.length - 1]) : "–";
  $("st-lr").textContent = v.last ? fmtNum(m.learningRate || 0, 3) : "–";
  $("st-ips").textContent = v.last ? fmtNum(m.imagesPerSecond || 0, 3) : "–";
  $("st-grad").textContent = v.last ? fmtNum(m.gradNorm || 0, 3) : "–";

  const job = v.job || {};
  const start = job.startTime ? Date.parse(job.startTime) : null;
  const end = job.endTime ? Date.parse(job.endTime) : null;
  if (FINAL.has(v.state)) {
    $("st-eta").textContent = v.state === "SUCCEEDED" ? "done" : "ended";
    $("st-elapsed").textContent = start && end ? fmtDuration((end - start) / 1000) : "–";
  } else {
    const left = v.last ? (m.etaSeconds || 0) - (Date.now() - v.lastTime) / 1000 : null;
    $("st-eta").textContent = left === null ? "–" : left > 0 ? `${fmtDuration(left)} (≈ ${new Date(Date.now() + left * 1000).toLocaleTimeString()})` : "any moment";
    $("st-elapsed").textContent = start ? fmtDuration((Date.now() - start) / 1000) : "–";
  }
  const pct = total ? Math.min(100, (100 * step) / total) : v.state === "SUCCEEDED" ? 100 : 0;
  $("progress-bar").style.width = `${pct}%`;
  $("progress").setAttribute("aria-valuenow", String(Math.round(pct)));
}

function renderHead(v) {
  $("job-id").textContent = v.jobId;
  const st = $("job-state");
  st.textContent = v.state || "…";
  st.dataset.state = v.state;
  $("cancel").disabled = !(v.state === "QUEUED" || v.state === "RUNNING");
  const err = $("job-error");
  err.hidden = !v.error;
  err.textContent = v.error;
  // Why a job no worker runs is waiting (Job.queued_reason): the polled list's is the newest.
  const listed = listJobs.find((x) => x.id === v.jobId);
  const reason = (listed ? listed.queuedReason : v.job && v.job.queuedReason) || "";
  const waiting = $("job-waiting");
  waiting.hidden = !reason || FINAL.has(v.state) || v.state === "CANCELLING";
  waiting.textContent = reason;
}

function renderGallery(v) {
  const groups = [...v.validations.values()].sort((a, b) => b.step - a.step);
  $("no-images").hidden = groups.length > 0;
  $("gallery").replaceChildren(
    ...groups.map((g) =>
      el(
        "div",
        { class: "val-step", "data-step": g.step },
        el("div", { class: "cap" }, el("b", {}, `step ${g.step}`), g.prompt ? ` — “${g.prompt}”` : ""),
        el(
          "div",
          { class: "imgs" },
          ...[...g.images.values()].map((img, i) =>
            el(
              "a",
              { href: artifactUrl(img.name), target: "_blank", rel: "noopener" },
              el("img", { src: artifactUrl(img.name), alt: `validation image ${i + 1} at step ${g.step}`, loading: "lazy" }),
            ),
          ),
        ),
      ),
    ),
  );
}

function renderFiles(v) {
  const files = [...v.files.values()].sort((a, b) => int(a.step) - int(b.step) || String(a.kind).localeCompare(String(b.kind)));
  $("no-files").hidden = files.length > 0;
  $("files").replaceChildren(
    ...files.map((a) => {
      const isCkpt = a.kind === "ARTIFACT_KIND_CHECKPOINT";
      return el(
        "li",
        { "data-kind": a.kind, "data-name": a.name },
        el("span", { class: "kind" }, isCkpt ? `step ${int(a.step)}` : "final LoRA"),
        el("a", { href: artifactUrl(a.name), download: "", title: a.name }, artifactFile(a.name)),
        el("span", { class: "size" }, fmtBytes(int(a.sizeBytes))),
      );
    }),
  );
}

/** Where a run's captions came from, as people say it. */
const CAPTION_SOURCES = {
  CAPTION_SOURCE_METADATA_JSONL: "metadata.jsonl",
  CAPTION_SOURCE_METADATA_CSV: "metadata.csv",
  CAPTION_SOURCE_SIDECAR_TXT: ".txt files beside the images",
  CAPTION_SOURCE_INSTANCE_PROMPT: "the instance prompt",
  CAPTION_SOURCE_HUB: "the hub data set's caption column",
};

/** The data set report: images used and skipped (with the reason each), the sizes, buckets and caches. */
function renderDataset(v) {
  const r = v.dataset;
  $("no-dataset").hidden = !!r;
  $("dataset").hidden = !r;
  if (!r) return;
  const skippedTotal = int(r.skippedTotal);
  const cached = [
    int(r.latentsCached) ? `VAE latents of ${int(r.latentsCached)} images${r.latentsCachedFlipped ? " (both orientations)" : ""}` : "",
    r.textEmbeddingsCached ? "text embeddings" : "",
  ].filter(Boolean);
  $("ds-summary").textContent =
    `${int(r.imagesUsed)} of ${int(r.imagesFound)} images used, ${skippedTotal} skipped; captions from ` +
    `${CAPTION_SOURCES[r.captionSource] || readableValue("captionSource", r.captionSource || "")}; cached: ${cached.join(", ") || "nothing"}`;
  const reason = (x) => readableValue("skipReason", x || "").replace("_", " ");
  $("ds-skipped").replaceChildren(
    ...(r.skipped || []).map((s) => el("tr", {}, el("td", {}, s.name || ""), el("td", { class: "reason" }, reason(s.reason)), el("td", {}, s.detail || ""))),
  );
  $("ds-skipped-wrap").hidden = !skippedTotal;
  $("ds-more-skipped").textContent = skippedTotal > (r.skipped || []).length ? `and ${skippedTotal - r.skipped.length} more` : "";
  const bar = (n, total) => el("span", { class: "bar", style: `width:${total ? Math.max(2, Math.round((100 * n) / total)) : 0}%` });
  const used = int(r.imagesUsed);
  $("ds-sizes").replaceChildren(
    ...(r.sizes || []).map((x) => el("tr", {}, el("td", {}, `${int(x.width)}×${int(x.height)}`), el("td", {}, String(int(x.images))), el("td", { class: "hist" }, bar(int(x.images), used)))),
    ...(int(r.otherSizes) ? [el("tr", {}, el("td", {}, "other"), el("td", {}, String(int(r.otherSizes))), el("td", {}))] : []),
  );
  $("ds-buckets").replaceChildren(
    ...(r.buckets || []).map((b) => el("tr", {}, el("td", {}, `${int(b.width)}×${int(b.height)}`), el("td", {}, String(int(b.images))), el("td", {}, String(int(b.batches))), el("td", { class: "hist" }, bar(int(b.images), used)))),
  );
}

/** Prior preservation: the class images given, cached and generated so far, with a bar while they are made. */
function renderClassImages(v) {
  const c = v.classImages;
  $("class-images").hidden = !c;
  if (!c) return;
  const generated = int(c.generated), toGenerate = int(c.toGenerate);
  $("ci-summary").textContent =
    `${int(c.total)} class images of “${c.classPrompt || ""}”: ${int(c.given)} given, ${int(c.cached)} from the cache, ` +
    `${generated} of ${toGenerate} generated` + (c.done ? " — ready" : " — generating with the base model…");
  const bar = $("ci-progress");
  bar.max = Math.max(1, toGenerate);
  bar.value = toGenerate ? generated : 1;
  bar.dataset.generated = String(generated);
}

function renderSpec(job) {
  const spec = (job && job.spec) || {};
  $("spec").replaceChildren(
    ...Object.entries(spec).map(([k, val]) =>
      el("tr", {}, el("td", {}, k), el("td", { title: typeof val === "string" ? val : undefined }, readableValue(k, val))),
    ),
  );
}

function render() {
  const v = view;
  if (!v) return;
  const listed = listJobs.find((x) => x.id === v.jobId);
  if (listed && (listed.state !== v.state || (v.last && listed.currentStep < v.last.step))) renderJobList();
  renderHead(v);
  renderStats(v);
  if (v.dirty.charts) {
    const c = ensureCharts();
    c.loss.setData([v.steps, v.loss, v.ema]);
    c.lr.setData([v.steps, v.lr]);
    c.ips.setData([v.steps, v.ips]);
    $("loss-chart").dataset.points = String(v.steps.length);
    v.dirty.charts = false;
  }
  if (v.dirty.gallery) { renderGallery(v); v.dirty.gallery = false; }
  if (v.dirty.files) { renderFiles(v); v.dirty.files = false; }
  if (v.dirty.dataset) { renderDataset(v); v.dirty.dataset = false; }
  if (v.dirty.classImages) { renderClassImages(v); v.dirty.classImages = false; }
  if (v.dirty.log) {
    const pre = $("log");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = v.log.join("\n");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    v.dirty.log = false;
  }
  $("job").dataset.lastSequence = String(v.lastSequence);
}

// ---------------------------------------------------------------- selecting a job

async function fetchJob(jobId) {
  const r = await fetch(`/api/jobs/${encodeURIComponent(jobId)}`);
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).message || `HTTP ${r.status}`);
  return r.json();
}

function selectFromHash() {
  let id = "";
  try { id = decodeURIComponent(location.hash.slice(1)); } catch { id = ""; }
  selectJob(id || null);
}

function selectJob(jobId) {
  if (view && view.jobId === jobId) return;
  if (view && view.es) view.es.close();
  selectedId = jobId;
  renderJobList();
  $("job").hidden = !jobId;
  if (!jobId) { view = null; return; }

  const v = (view = newView(jobId));
  if (charts) {
    for (const c of Object.values(charts)) c.setData([[], ...c.series.slice(1).map(() => [])]);
  }
  $("loss-chart").dataset.points = "0";
  $("job-error").hidden = true;
  $("spec").replaceChildren();
  scheduleRender();

  fetchJob(jobId).then(
    (job) => {
      if (view !== v) return;
      v.job = job;
      if (!v.state) v.state = stateOf(job.state);
      if (!v.error) v.error = errorText(job.error);
      v.totalSteps = v.totalSteps || int(job.totalSteps);
      for (const a of job.artifacts || [])
        if (a.name && a.kind !== "ARTIFACT_KIND_VALIDATION_IMAGE" && !v.files.has(a.name)) v.files.set(a.name, a);
      v.dirty.files = true;
      renderSpec(job);
      scheduleRender();
    },
    (err) => {
      if (view !== v) return;
      v.error = `could not load the job: ${err.message}`;
      scheduleRender();
    },
  );

  // From the first event: EventSource itself resumes with Last-Event-ID after a
  // dropped connection, so nothing is missed and nothing is applied twice.
  const es = (v.es = new EventSource(`/api/jobs/${encodeURIComponent(jobId)}/events?after=0`));
  es.onmessage = (e) => {
    if (view !== v) return;
    const ev = JSON.parse(e.data);
    if (int(ev.sequence) <= v.lastSequence) return;
    applyEvent(v, ev);
    scheduleRender();
  };
  es.addEventListener("end", () => {
    es.close();
    if (view !== v) return;
    // The final record has the end time (for "elapsed") and every artifact.
    fetchJob(jobId).then((job) => {
      if (view !== v) return;
      v.job = job;
      for (const a of job.artifacts || [])
        if (a.name && a.kind !== "ARTIFACT_KIND_VALIDATION_IMAGE") v.files.set(a.name, a);
      v.dirty.files = true;
      scheduleRender();
    }, () => {});
  });
}

async function cancelSelected() {
  const v = view;
  if (!v || !confirm(`Cancel job ${v.jobId}? The engine saves a checkpoint and stops.`)) return;
  $("cancel").disabled = true;
  const r = await fetch(`/api/jobs/${encodeURIComponent(v.jobId)}/cancel`, { method: "POST", headers: { "X-Loraforge-Dashboard": "1" } });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    v.error = `cancel failed: ${body.message || `HTTP ${r.status}`}`;
  }
  scheduleRender();
}

function init() {
  $("cancel").addEventListener("click", () => void cancelSelected());
  $("smoothing").addEventListener("input", () => {
    $("smoothing-value").textContent = smoothing().toFixed(2);
    if (view) { recomputeEma(view); view.dirty.charts = true; scheduleRender(); }
  });
  window.addEventListener("hashchange", selectFromHash);
  // ETA and elapsed time move on between events.
  setInterval(() => { if (view && !FINAL.has(view.state)) scheduleRender(); }, 1000);
  connectJobList();
  selectFromHash();
}

init();
