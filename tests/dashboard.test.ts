// The live dashboard in a real headless Chromium, against real training jobs on the
// tiny model: a loading state until the job list's first answer, the job list and
// charts update live, a validation image appears, a reload replays the history,
// checkpoints download, the cancel button cancels, and without the token every
// request is refused.
import assert from "node:assert/strict";
import { request } from "node:http";
import { after, before, describe, it } from "node:test";
import type { Browser, BrowserContext, Page, Route } from "playwright-core";
import { errorMessage, JobState, MixedPrecision, stateName } from "@loraforge/sdk";
import { assertNoHostPaths, fixtures, quickSpec, until, type Fixtures } from "./lib/harness.js";
import { artifactPath, launchBrowser, startDashboardStack, type DashboardStack } from "./lib/browser.js";

const TOKEN = "t0ken-for-the-dashboard-test";
/** Generous: other suites may be training on the same two cores. */
const WAIT = { timeout: 180_000, polling: 100 } as const;
/** Held by the prompt to show that user text is drawn as text, never as markup. */
const PROMPT = `a <b>red</b> circle <img src="x-injected" onerror="window.__pwned=1">`;
const STEPS = 8;

/**
 * Holds the job list's event stream (its first answer) back until `release()`, so the
 * test can look at the page before any answer has arrived.
 */
async function holdJobList(page: Page): Promise<{ release(): void; done(): Promise<void> }> {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const handler = async (route: Route) => {
    await gate;
    await route.continue();
  };
  await page.route("**/api/jobs/events", handler);
  return { release, done: () => page.unroute("**/api/jobs/events", handler) };
}

const visible = (page: Page, selector: string) => page.isVisible(selector);

const points = (page: Page) => page.$eval("#loss-chart", (e) => Number((e as HTMLElement).dataset.points ?? "0"));
const pageState = (page: Page) => page.$eval("#job-state", (e) => (e as HTMLElement).dataset.state ?? "");

describe("dashboard", () => {
  let f: Fixtures;
  let stack: DashboardStack;
  let browser: Browser;
  let context: BrowserContext;
  let page: Page;

  before(async () => {
    f = fixtures();
    stack = await startDashboardStack({ token: TOKEN });
    browser = await launchBrowser();
    context = await browser.newContext({ viewport: { width: 1400, height: 1100 } });
    page = await context.newPage();
  });
  after(async () => {
    await browser?.close();
    await stack?.close();
  });

  it("refuses requests without the token (401), and cross-site style POSTs (403)", async () => {
    const api = `${stack.url}api/jobs`;
    assert.equal((await fetch(api)).status, 401);
    assert.equal((await fetch(stack.url)).status, 401);
    assert.equal((await fetch(api, { headers: { authorization: "Bearer wrong" } })).status, 401);
    assert.equal((await fetch(`${api}?token=wrong`)).status, 401);
    assert.equal((await fetch(`${stack.url}api/jobs/events`)).status, 401);
    const ok = await fetch(api, { headers: { authorization: `Bearer ${TOKEN}` } });
    assert.equal(ok.status, 200);
    assert.ok(Array.isArray(((await ok.json()) as { jobs: unknown[] }).jobs));
    // ?token= on the page sets the cookie and takes the token out of the address.
    const visit = await fetch(`${stack.url}?token=${TOKEN}`, { redirect: "manual" });
    assert.equal(visit.status, 303);
    assert.equal(visit.headers.get("location"), "/");
    assert.match(visit.headers.get("set-cookie") ?? "", /HttpOnly; SameSite=Strict/);
    // Cancel needs the dashboard's own header (a cross-site form cannot send it).
    const bare = await fetch(`${api}/job-00000000000000000000000000/cancel`, { method: "POST", headers: { authorization: `Bearer ${TOKEN}` } });
    assert.equal(bare.status, 403);
    const missing = await fetch(`${api}/job-00000000000000000000000000/cancel`, {
      method: "POST",
      headers: { authorization: `Bearer ${TOKEN}`, "x-loraforge-dashboard": "1" },
    });
    assert.equal(missing.status, 404);
    // Bound to loopback, it answers loopback names only (no DNS rebinding).
    const rebound = await new Promise<number>((resolve, reject) =>
      request(`${api}`, { headers: { host: "evil.example:80", authorization: `Bearer ${TOKEN}` } }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      })
        .on("error", reject)
        .end(),
    );
    assert.equal(rebound, 403);
  });

  it("says it is loading until the job list's first answer, and only then that there are no jobs", async () => {
    const held = await holdJobList(page);
    try {
      await page.goto(`${stack.url}?token=${TOKEN}`);
      assert.equal(await visible(page, "#jobs-loading"), true, "a loading state while the list is unknown");
      assert.equal(await page.textContent("#jobs-loading"), "Loading jobs…");
      assert.equal(await visible(page, "#no-jobs"), false, "not 'No jobs yet' before an answer says so");
      assert.equal(await visible(page, "#empty"), false);
      assert.equal(await page.getAttribute("#job-list", "aria-busy"), "true");
      await page.screenshot({ path: artifactPath("dashboard-loading.png") });
    } finally {
      held.release();
    }
    await page.waitForSelector("#no-jobs", { state: "visible", timeout: WAIT.timeout });
    assert.equal(await visible(page, "#jobs-loading"), false);
    assert.equal(await page.getAttribute("#job-list", "aria-busy"), "false");
    assert.equal(await page.$$eval("#job-list li", (li) => li.length), 0);
    await held.done();
  });

  it("follows a job live: list, growing chart, validation image, checkpoints; a reload keeps the history", { timeout: 300_000 }, async () => {
    await page.goto(`${stack.url}?token=${TOKEN}`);
    assert.equal(new URL(page.url()).search, "", "the token is taken out of the address");

    const job = await stack.client.train(
      quickSpec(f, {
        maxTrainSteps: STEPS,
        checkpointingSteps: 4,
        validationPrompt: PROMPT,
        numValidationImages: 1,
        validationInferenceSteps: 3,
        validationSteps: 4,
        mixedPrecision: MixedPrecision.MIXED_PRECISION_NO,
      }) as never,
    );
    // The job list is live: the new job shows up without a reload.
    const link = page.locator(`#job-list a[data-job-id="${job.id}"]`);
    await link.waitFor({ timeout: WAIT.timeout });
    await link.click();
    await page.waitForFunction((id) => document.getElementById("job-id")?.textContent === id, job.id, WAIT);

    // Watch the chart while the job runs: the point count only grows, step by step.
    const seen: number[] = [];
    let state = "";
    await until(
      async () => {
        const n = await points(page);
        if (seen.length === 0 || n !== seen[seen.length - 1]) seen.push(n);
        state = await pageState(page);
        return state === "SUCCEEDED" || state === "FAILED" || state === "CANCELLED";
      },
      WAIT.timeout,
      "the job to end on the page",
    );
    assert.equal(state, "SUCCEEDED", `job ended ${state}: ${await page.textContent("#job-error")}`);
    await page.waitForFunction((n) => Number(document.getElementById("loss-chart")?.dataset.points) === n, STEPS, WAIT);
    seen.push(await points(page));
    assert.deepEqual([...seen].sort((a, b) => a - b), seen, `point counts never shrink: ${seen}`);
    assert.ok(seen.filter((n) => n > 0 && n < STEPS).length >= 1, `the chart gained points while the job ran: ${seen}`);

    // Validation images (steps 4 and 8), served from the artifact store, really decoded.
    await page.waitForFunction(
      () => [...document.querySelectorAll<HTMLImageElement>("#gallery img")].filter((i) => i.complete && i.naturalWidth > 0).length >= 2,
      undefined,
      WAIT,
    );
    const caption = await page.textContent("#gallery .val-step .cap");
    assert.ok(caption?.includes(PROMPT), `the prompt is shown as text: ${caption}`);
    assert.equal(await page.$('img[src="x-injected"]'), null, "the prompt's markup is not parsed");
    assert.equal(await page.evaluate(() => (window as unknown as { __pwned?: number }).__pwned), undefined);

    // The numbers: final loss, throughput, ETA says done.
    assert.match((await page.textContent("#st-step")) ?? "", new RegExp(`^${STEPS} / ${STEPS}$`));
    assert.equal(await page.textContent("#st-eta"), "done");
    assert.notEqual(await page.textContent("#st-ips"), "–");

    // Checkpoints (steps 4 and 8) as .tar downloads, and the final LoRA.
    await page.waitForFunction(() => document.querySelectorAll('#files li[data-kind="ARTIFACT_KIND_LORA"]').length === 1, undefined, WAIT);
    const ckpts = await page.$$eval('#files li[data-kind="ARTIFACT_KIND_CHECKPOINT"] a', (as) => as.map((a) => (a as HTMLAnchorElement).href));
    assert.equal(ckpts.length, 2);
    const tar = await page.request.get(ckpts[0]);
    assert.equal(tar.status(), 200);
    assert.equal(tar.headers()["content-type"], "application/x-tar");
    const body = await tar.body();
    assert.equal(body.subarray(257, 262).toString(), "ustar", "a POSIX tar archive");
    assert.match(tar.headers()["content-disposition"] ?? "", /checkpoint-4\.tar/);
    // Files are named resources fetched through the API, by their artifact names.
    const names = await page.$$eval("#files li", (lis) => lis.map((li) => (li as HTMLElement).dataset.name ?? ""));
    assert.deepEqual(
      [...names].sort(),
      [`jobs/${job.id}/checkpoint-4/`, `jobs/${job.id}/checkpoint-8/`, `jobs/${job.id}/lora/pytorch_lora_weights.safetensors`],
    );
    assert.ok(ckpts.every((href) => new URL(href).pathname === "/api/artifacts"), ckpts.join(" "));
    // The data set report: every image of the fixture set used, its sizes and the one training size.
    await page.waitForFunction(() => !document.getElementById("dataset")?.hidden, undefined, WAIT);
    assert.match((await page.textContent("#ds-summary")) ?? "", /^8 of 8 images used, 0 skipped; captions from metadata\.jsonl; cached: /);
    const sizeRows = await page.$$eval("#ds-sizes tr", (rows) => rows.map((r) => [...r.querySelectorAll("td")].slice(0, 2).map((td) => td.textContent)));
    assert.equal(sizeRows.reduce((n, [, images]) => n + Number(images), 0), 8, JSON.stringify(sizeRows));
    const bucketRows = await page.$$eval("#ds-buckets tr", (rows) => rows.map((r) => [...r.querySelectorAll("td")].slice(0, 2).map((td) => td.textContent)));
    assert.deepEqual(bucketRows, [["64×64", "8"]]);
    assert.equal(await page.isHidden("#ds-skipped-wrap"), true);

    // The spec shows enum values as people say them.
    const specRow = await page.$$eval("#spec tr", (rows) =>
      rows.map((r) => [...r.querySelectorAll("td")].map((td) => td.textContent)).find(([k]) => k === "mixedPrecision"),
    );
    assert.deepEqual(specRow, ["mixedPrecision", "no"]);

    // The list follows too.
    await page.waitForFunction(
      (id) => document.querySelector(`#job-list a[data-job-id="${id}"] .state`)?.getAttribute("data-state") === "SUCCEEDED",
      job.id,
      WAIT,
    );
    await page.screenshot({ path: artifactPath("dashboard.png"), fullPage: true });

    // A reload replays the whole history.
    const beforeReload = await points(page);
    await page.reload();
    await page.waitForFunction(
      (n) => Number(document.getElementById("loss-chart")?.dataset.points) >= n && document.getElementById("job-state")?.dataset.state === "SUCCEEDED",
      beforeReload,
      WAIT,
    );
    assert.ok((await points(page)) >= beforeReload);
    await page.waitForFunction(() => document.querySelectorAll("#gallery img").length >= 2, undefined, WAIT);

    // The event stream itself: resuming after a sequence sends only what follows; after the last, 204.
    const auth = { authorization: `Bearer ${TOKEN}` };
    // The job as the API gives it names no place on the server host (beyond the folders its spec gave).
    const asJson = await (await fetch(`${stack.url}api/jobs/${job.id}`, { headers: auth })).json();
    assert.equal((asJson as { spec: { mixedPrecision: string } }).spec.mixedPrecision, "MIXED_PRECISION_NO", "proto3 JSON: enum value names");
    assertNoHostPaths(asJson, [f.model, f.dataset], "GET /api/jobs/:id");
    const last = (await stack.jobs.get(job.id)).lastSequence;
    const tail = await (await fetch(`${stack.url}api/jobs/${job.id}/events`, { headers: { ...auth, "last-event-id": String(last - 1) } })).text();
    assert.deepEqual([...tail.matchAll(/^id: (\d+)$/gm)].map((m) => Number(m[1])), [last]);
    assert.match(tail, /event: end/);
    assert.equal((await fetch(`${stack.url}api/jobs/${job.id}/events?after=${last}`, { headers: auth })).status, 204);
  });

  it("with jobs, shows the loading state and then the real list, never 'No jobs yet'", async () => {
    assert.ok((await stack.client.listJobs({ pageSize: 1 })).jobs.length > 0, "runs after the live test above made a job");
    const held = await holdJobList(page);
    try {
      await page.goto(stack.url);
      assert.equal(await visible(page, "#jobs-loading"), true);
      assert.equal(await visible(page, "#no-jobs"), false);
      assert.equal(await page.$$eval("#job-list li", (li) => li.length), 0);
    } finally {
      held.release();
    }
    await page.waitForSelector("#job-list a[data-job-id]", { timeout: WAIT.timeout });
    assert.equal(await visible(page, "#jobs-loading"), false);
    assert.equal(await visible(page, "#no-jobs"), false);
    // With none chosen, the page follows the newest job.
    await page.waitForFunction(() => /^job-/.test(document.getElementById("job-id")?.textContent ?? ""), undefined, WAIT);
    await held.done();
  });

  it("shows an unknown job's error as text", async () => {
    const bogus = "<img src=y-injected onerror=alert(1)>";
    await page.goto(`${stack.url}#${encodeURIComponent(bogus)}`);
    await page.waitForFunction(() => /does not exist/.test(document.getElementById("job-error")?.textContent ?? ""), undefined, WAIT);
    assert.ok((await page.textContent("#job-error"))?.includes(bogus));
    assert.equal(await page.$('img[src="y-injected"]'), null);
  });

  it("shows a DreamBooth job's class images: given, cached, generated, ready", { timeout: 300_000 }, async () => {
    const job = await stack.client.train(
      quickSpec(f, {
        instancePrompt: "a photo of sks shape",
        withPriorPreservation: true,
        classPrompt: "a photo of a <b>shape</b>",
        numClassImages: 2,
        classInferenceSteps: 1,
        classSampleBatchSize: 1,
        maxTrainSteps: 1,
      }) as never,
    );
    assert.equal(stateName((await job.result()).state), "SUCCEEDED");
    await page.goto(`${stack.url}?token=${TOKEN}`);
    await page.goto(`${stack.url}#${job.id}`);
    await page.waitForFunction(() => /ready/.test(document.getElementById("ci-summary")?.textContent ?? ""), undefined, WAIT);
    assert.equal(await page.isVisible("#class-images"), true);
    assert.equal(await page.textContent("#ci-summary"), "2 class images of “a photo of a <b>shape</b>”: 0 given, 0 from the cache, 2 of 2 generated — ready");
    assert.equal(await page.$eval("#ci-progress", (e) => (e as HTMLProgressElement).value), 2);
  });

  it("cancels a running job from the cancel button", { timeout: 300_000 }, async () => {
    const job = await stack.client.train(quickSpec(f, { maxTrainSteps: 2000, checkpointingSteps: 1000 }) as never);
    await page.goto(`${stack.url}#${job.id}`);
    // Running: at least one step on the chart.
    await page.waitForFunction(() => Number(document.getElementById("loss-chart")?.dataset.points) >= 1, undefined, WAIT);
    assert.equal(await page.isEnabled("#cancel"), true);
    page.once("dialog", (d) => void d.accept());
    await page.click("#cancel");
    await page.waitForFunction(() => document.getElementById("job-state")?.dataset.state === "CANCELLED", undefined, WAIT);
    assert.equal(await page.isEnabled("#cancel"), false);
    const done = await stack.jobs.get(job.id);
    assert.equal(stateName(done.state), stateName(JobState.JOB_STATE_CANCELLED));
    assert.match(errorMessage(done), /dashboard/);
    // The page shows why, from the job's google.rpc.Status, in words.
    await page.waitForFunction(() => /cancelled from the dashboard/.test(document.getElementById("job-error")?.textContent ?? ""), undefined, WAIT);
  });

  it("shows why a job no worker can run is waiting, in the list and above its progress, until it is cancelled", async () => {
    const job = await stack.client.train(quickSpec(f, { minDeviceMemoryMb: 16777216 }) as never);
    await page.goto(`${stack.url}#${job.id}`);
    const reason = /^no worker can run this job: it needs 1 device with ≥ 16777216 MiB; live workers: 1 \((cpu|cuda) × \d+, \d+ MiB\)$/;
    await page.waitForFunction((re) => new RegExp(re).test(document.getElementById("job-waiting")?.textContent ?? ""), reason.source, WAIT);
    assert.equal(await visible(page, "#job-waiting"), true);
    assert.match((await page.textContent(`#job-list a[data-job-id="${job.id}"] .waiting`)) ?? "", reason);
    await page.screenshot({ path: artifactPath("dashboard-waiting.png") });
    await stack.client.cancelJob(job.id);
    await page.waitForFunction(() => document.getElementById("job-state")?.dataset.state === "CANCELLED", undefined, WAIT);
    await page.waitForSelector("#job-waiting", { state: "hidden", timeout: WAIT.timeout });
    await page.waitForFunction((id) => !document.querySelector(`#job-list a[data-job-id="${id}"] .waiting`), job.id, WAIT);
  });
});
