// InferenceService end to end: a real `loraforge serve` exports the tiny model to ONNX on first
// use and renders on onnxruntime-node; diffusers' StableDiffusionPipeline renders the same
// requests from the same initial latents (tests/py/infer_reference.py), and the images must agree
// within a mean absolute difference of 2 (0–255) — for no LoRA, one LoRA, and two with scales.
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { credentials, status } from "@grpc/grpc-js";
import { ArtifactKind, errorMessage, JobState, LoraforgeError, type InferInput, type Job, type LoraforgeClient } from "@loraforge/sdk";
import { InferenceServiceClient, InferRequest, Sampler, type InferResponse } from "@loraforge/sdk/gen/loraforge/v1/inference_service";
import { ClipTokenizer } from "@loraforge/server/infer/tokenizer";
import { assertNoHostPaths, download, fixtures, quickSpec, startServer, tmpDir, type Fixtures, type ServerProcess } from "./lib/harness.js";
import { meanAbsDiff, PROMPT, reference, referenceJob, rgb, safetensorsHeader, TOLERANCE } from "./lib/parity.js";



/** Infer through the SDK (client.infer), as other services call it. */
function infer(client: LoraforgeClient, req: Partial<InferRequest>): Promise<InferResponse> {
  return client.infer(req as InferInput);
}



/** A safetensors file of float32 tensors (for a LoRA that does not fit the tiny model). */
function writeSafetensors(file: string, tensors: Record<string, { shape: number[]; data: Float32Array }>) {
  const header: Record<string, unknown> = {};
  let off = 0;
  for (const [k, t] of Object.entries(tensors)) {
    header[k] = { dtype: "F32", shape: t.shape, data_offsets: [off, off + t.data.byteLength] };
    off += t.data.byteLength;
  }
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, json, ...Object.values(tensors).map((t) => Buffer.from(t.data.buffer))]));
}

interface Case {
  name: string;
  req: Partial<InferRequest>;
  loras: { path: string; scale: number }[];
}

describe("InferenceService", () => {
  let f: Fixtures;
  let srv: ServerProcess;
  let client: InferenceServiceClient;
  let dir: string;
  let loraA: string;
  let loraB: string;
  let loraC: string;
  let tokenizerIds: number[][];
  let trained: Promise<Job>;
  const texts = [PROMPT, "  A  RED\tCircle!! on a Blue-ish background ", "zebra's café 1234 <|endoftext|>", "", "red ".repeat(100)];

  before(async () => {
    f = fixtures();
    dir = tmpDir("infer");
    loraA = path.join(dir, "a", "pytorch_lora_weights.safetensors"); // diffusers form, UNet + text encoder, alpha 8 / rank 4
    // kohya form with .alpha tensors, on every layer kohya's sd-scripts adapts: attention, feed-forward,
    // proj_in/proj_out (1x1 convolutions here, [r, in, 1, 1] weights) and the text encoder's MLP.
    loraB = path.join(dir, "b", "kohya_lora.safetensors");
    // The same layers in diffusers' file with peft's keys (what the engine writes for targets beyond the
    // attention projections), alpha from the adapter metadata.
    loraC = path.join(dir, "c", "pytorch_lora_weights.safetensors");
    srv = await startServer();
    client = new InferenceServiceClient(srv.address, credentials.createInsecure());
    // A LoRA trained by the service itself, for the job_id source.
    trained = srv.client.train(quickSpec(f, { rank: 2, loraAlpha: 4 })).then((job) => job.result());
    trained.catch(() => undefined);
    // The first request exports the model (about a minute here); make the LoRAs meanwhile.
    const [out] = await Promise.all([
      reference(
        f.model,
        [
          ["make-lora", loraA, "--seed", "1", "--rank", "4", "--alpha", "8", "--text-encoder"],
          ["make-lora", loraB, "--seed", "2", "--rank", "2", "--alpha", "1", "--text-encoder", "--kohya", "--wide"],
          ["make-lora", loraC, "--seed", "3", "--rank", "2", "--alpha", "1", "--text-encoder", "--wide"],
          ["tokenize", ...texts],
        ],
        dir,
      ),
      infer(srv.client, { baseModel: f.model, prompt: PROMPT, numInferenceSteps: 1 }),
    ]);
    tokenizerIds = JSON.parse(out.trim().split("\n").pop()!);
  });

  after(async () => {
    client?.close();
    await srv?.stop();
  });

  it("tokenizes as transformers' CLIPTokenizer does", () => {
    const tok = ClipTokenizer.fromDir(path.join(f.model, "tokenizer"));
    assert.deepEqual(texts.map((t) => tok.encode(t)), tokenizerIds);
  });

  it("renders what diffusers renders: no LoRA, one LoRA, two LoRAs with scales", async () => {
    const cases: Case[] = [
      { name: "base-euler", req: { seed: 11, numInferenceSteps: 8, guidanceScale: 7.5, sampler: Sampler.SAMPLER_EULER }, loras: [] },
      { name: "base-dpmpp", req: { seed: 12, numInferenceSteps: 8, guidanceScale: 6, sampler: Sampler.SAMPLER_DPMPP_2M }, loras: [] },
      { name: "one-lora", req: { seed: 11, numInferenceSteps: 8, guidanceScale: 7.5, sampler: Sampler.SAMPLER_EULER }, loras: [{ path: loraA, scale: 1 }] },
      { name: "kohya-wide", req: { seed: 11, numInferenceSteps: 8, guidanceScale: 7.5, sampler: Sampler.SAMPLER_EULER }, loras: [{ path: loraB, scale: 1 }] },
      { name: "peft-wide", req: { seed: 11, numInferenceSteps: 8, guidanceScale: 7.5, sampler: Sampler.SAMPLER_EULER }, loras: [{ path: loraC, scale: 1 }] },
      {
        name: "two-loras",
        req: { seed: 13, numInferenceSteps: 8, guidanceScale: 5, sampler: Sampler.SAMPLER_DDIM, numImages: 2, negativePrompt: "a green square" },
        loras: [
          { path: loraA, scale: 0.7 },
          { path: loraB, scale: 1.5 },
        ],
      },
    ];
    // loraC is in peft's key form, with 1x1-convolution (4-D) layers among its keys.
    const header = safetensorsHeader(loraC);
    assert.ok(Object.keys(header).some((k) => k.startsWith("unet.") && k.endsWith(".lora_A.weight")), Object.keys(header).slice(0, 3).join(" "));
    assert.equal(header["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"]?.shape.length, 4);
    const ours = new Map<string, InferResponse>();
    const jobs: string[][] = [];
    for (const c of cases) {
      const res = await infer(srv.client, {
        ...c.req,
        baseModel: f.model,
        prompt: PROMPT,
        loras: c.loras.map((l) => ({ source: { $case: "path", path: l.path }, scale: l.scale })),
      });
      const n = c.req.numImages ?? 1;
      assert.equal(res.images.length, n);
      assert.deepEqual(res.images.map((im) => [im.seed, im.width, im.height]), Array.from({ length: n }, (_, i) => [c.req.seed! + i, 64, 64]));
      ours.set(c.name, res);
      jobs.push(referenceJob(path.join(dir, c.name), c.req, c.loras, n));
    }
    await reference(f.model, jobs, dir);
    const diffs: string[] = [];
    for (const c of cases) {
      const res = ours.get(c.name)!;
      for (const [i, im] of res.images.entries()) {
        const diff = meanAbsDiff(await rgb(Buffer.from(im.png)), await rgb(path.join(dir, c.name, `ref_${i}.png`)));
        diffs.push(`${c.name}[${i}]=${diff.toFixed(3)}`);
        assert.ok(diff <= TOLERANCE, `${c.name} image ${i}: mean abs diff ${diff.toFixed(3)} > ${TOLERANCE}`);
      }
    }
    console.log(`# SD parity (mean abs diff, 0-255): ${diffs.join(" ")}`);
    // The LoRA really changes the picture (so agreeing with diffusers means something).
    const base = await rgb(Buffer.from(ours.get("base-euler")!.images[0].png));
    for (const name of ["one-lora", "kohya-wide", "peft-wide"]) {
      const change = meanAbsDiff(base, await rgb(Buffer.from(ours.get(name)!.images[0].png)));
      assert.ok(change > 2 * TOLERANCE, `${name}: the LoRA changed the image by only ${change.toFixed(3)}`);
    }
  });

  it("refuses bad requests, naming the field or the layer", async () => {
    const base = { baseModel: f.model, prompt: PROMPT, numInferenceSteps: 2 };
    const fail = async (req: Partial<InferRequest>) => {
      const err = await infer(srv.client, req).then(
        () => assert.fail("the request succeeded"),
        (e: unknown) => e,
      );
      assert.ok(err instanceof LoraforgeError, String(err));
      return err;
    };
    for (const [req, field] of [
      [{ numInferenceSteps: 0 }, "num_inference_steps"],
      [{ numInferenceSteps: 151 }, "num_inference_steps"],
      [{ width: 100 }, "width"],
      [{ height: 4096 }, "height"],
      [{ guidanceScale: 31 }, "guidance_scale"],
      [{ numImages: 9 }, "num_images"],
      // A sampler the contract does not define.
      [{ sampler: 99 as Sampler }, "sampler"],
    ] as const) {
      const e = await fail({ ...base, ...req });
      assert.equal(e.code, status.INVALID_ARGUMENT);
      assert.deepEqual(e.violations.map((v) => v.field), [field]);
    }
    const missingJob = await fail({ ...base, loras: [{ source: { $case: "jobId", jobId: "no-such-job" } }] });
    assert.equal(missingJob.code, status.NOT_FOUND);
    assert.equal(missingJob.reason, "LORA_NOT_FOUND");
    const missingFile = await fail({ ...base, loras: [{ source: { $case: "path", path: path.join(dir, "nope.safetensors") } }] });
    assert.equal(missingFile.code, status.NOT_FOUND);

    // A LoRA for a wider model: its to_k takes 48 features where the tiny model's takes 32.
    const layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
    const foreign = path.join(dir, "foreign.safetensors");
    writeSafetensors(foreign, {
      [`${layer}.lora.down.weight`]: { shape: [4, 48], data: new Float32Array(4 * 48).fill(0.01) },
      [`${layer}.lora.up.weight`]: { shape: [32, 4], data: new Float32Array(32 * 4).fill(0.01) },
    });
    const mismatch = await fail({ ...base, loras: [{ source: { $case: "path", path: loraA } }, { source: { $case: "path", path: foreign } }] });
    assert.equal(mismatch.code, status.FAILED_PRECONDITION);
    assert.equal(mismatch.reason, "LORA_MISMATCH");
    assert.equal(mismatch.metadata.layer, layer);
    assert.match(mismatch.message, /loras\[1\].*attn2\.to_k/);

    // SDXL-only fields on an SD-1.x model are refused, not ignored; bad size conditioning is named.
    const sdxlOnly = await fail({ ...base, prompt2: "a blue square", sizeConditioning: { cropTop: 8, cropLeft: 0 } });
    assert.equal(sdxlOnly.code, status.INVALID_ARGUMENT);
    assert.deepEqual(sdxlOnly.violations.map((v) => v.field), ["prompt_2", "size_conditioning"]);
    const badCrop = await fail({ ...base, sizeConditioning: { cropTop: -1, cropLeft: 0, originalWidth: 0 } });
    assert.equal(badCrop.code, status.INVALID_ARGUMENT);
    assert.deepEqual(badCrop.violations.map((v) => v.field), ["size_conditioning.original_width", "size_conditioning.crop_top"]);

    // A LoCon-style layer (a 3x3 ResNet convolution) has no slot: refused by name, not silently dropped.
    const conv = "lora_unet_down_blocks_0_resnets_0_conv1";
    const locon = path.join(dir, "locon.safetensors");
    writeSafetensors(locon, {
      [`${conv}.lora_down.weight`]: { shape: [2, 32, 3, 3], data: new Float32Array(2 * 32 * 9).fill(0.01) },
      [`${conv}.lora_up.weight`]: { shape: [32, 2, 1, 1], data: new Float32Array(32 * 2).fill(0.01) },
    });
    const noSlot = await fail({ ...base, loras: [{ source: { $case: "path", path: locon } }] });
    assert.equal(noSlot.code, status.FAILED_PRECONDITION);
    assert.equal(noSlot.metadata.layer, conv);
    assert.match(noSlot.message, /no LoRA slot.*LoCon/);
  });

  it("stops denoising when the client cancels", async () => {
    const call = client.infer(
      InferRequest.fromPartial({ baseModel: f.model, prompt: PROMPT, numInferenceSteps: 150, numImages: 8, width: 256, height: 256, seed: 1 }),
      () => undefined,
    );
    await new Promise((r) => setTimeout(r, 1500));
    call.cancel();
    const line = await new Promise<string>((resolve) => {
      const check = () => {
        const m = srv.stderr.join("").match(/inference cancelled.*/);
        if (m) resolve(m[0]);
        else setTimeout(check, 100);
      };
      check();
    });
    const step = Number(line.match(/step=(\d+)/)![1]);
    assert.ok(step < 149, line);
    // The server is free again afterwards.
    const res = await infer(srv.client, { baseModel: f.model, prompt: PROMPT, numInferenceSteps: 2, seed: 3 });
    assert.equal(res.images.length, 1);
  });

  it("serves a LoRA trained by the service, by job id, as diffusers does", async () => {
    const job = await trained;
    assert.equal(job.state, JobState.JOB_STATE_SUCCEEDED, errorMessage(job));
    const lora = job.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA)!;
    // diffusers reads the LoRA as a client would fetch it: by its artifact name, through the API.
    const loraFile = await download(srv.client, lora);
    const req = { seed: 21, numInferenceSteps: 6, guidanceScale: 7.5, sampler: Sampler.SAMPLER_EULER };
    const res = await infer(srv.client, { ...req, baseModel: f.model, prompt: PROMPT, loras: [{ source: { $case: "jobId", jobId: job.id }, scale: 0.8 }] });
    const caseDir = path.join(dir, "trained");
    await reference(f.model, [referenceJob(caseDir, req, [{ path: loraFile, scale: 0.8 }], 1)], dir);
    const diff = meanAbsDiff(await rgb(Buffer.from(res.images[0].png)), await rgb(path.join(caseDir, "ref_0.png")));
    assert.ok(diff <= TOLERANCE, `mean abs diff ${diff.toFixed(3)} > ${TOLERANCE}`);
    const listed = await srv.client.listModels();
    assert.deepEqual(listed.loras.map((l) => [l.jobId, l.artifactName, l.rank]), [[job.id, lora.name, 2]]);
    // Neither the LoRAs nor the base models name a host folder (this job's spec gave one, and no model of the
    // server's models folder has its hash: its TrainedLora names the model by hash alone).
    assertNoHostPaths(listed, [], "ListModels");
    assert.deepEqual([listed.loras[0].baseModel, listed.loras[0].baseModelHash], ["", res.modelHash]);
  });

  it("lists the exported base model", async () => {
    const res = await srv.client.listModels();
    const exported = res.baseModels.filter((m) => m.exported);
    assert.equal(exported.length, 1, JSON.stringify(res));
    const tiny = exported[0];
    assert.deepEqual([tiny.name, tiny.path], ["", ""], "a folder given by path is listed by its hash alone");
    assert.equal(tiny.nativeSize, 64);
    // UNet: 6 transformers x (proj_in, proj_out, 8 attention projections, 2 feed-forward); text encoder: 3 x 6.
    assert.equal(tiny.loraSlots, 6 * 12 + 3 * 6);
    assert.equal(readFileSync(path.join(srv.stateDir, "onnx", tiny.modelHash, "manifest.json"), "utf8").includes(tiny.modelHash), true);
  });
});
