// Trains a LoRA through the SDK, follows it live, downloads the LoRA file (with --lora) and
// draws an image with it through the Infer RPC (with --image).
//   node examples/dist/train.js --address 127.0.0.1:50051 --model models/NAME|DIR (--upload DIR | --data DIR | --dataset-id ID)
//        [--steps 60] [--lora lora.safetensors] [--image out.png]
// --upload sends a local folder to the server first (DatasetService) and trains on the stored set;
// --data names a folder on the server host; --dataset-id a set uploaded before. The base model is a
// model of the server's models folder (models/<name>) or a folder on the server host.
import { writeFileSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import { createClient, errorMessage, InvalidSpecError, JobState, LrScheduler, Sampler, stateName, type DatasetSource } from "@loraforge/sdk";

const { values } = parseArgs({
  options: {
    address: { type: "string", default: "127.0.0.1:50051" },
    model: { type: "string" },
    upload: { type: "string" },
    data: { type: "string" },
    "dataset-id": { type: "string" },
    steps: { type: "string", default: "60" },
    lora: { type: "string" },
    image: { type: "string" },
  },
});
const sources = [values.upload, values.data, values["dataset-id"]].filter((v) => v !== undefined);
if (!values.model || sources.length !== 1) {
  console.error("usage: train.js --address HOST:PORT --model models/NAME|MODEL_DIR (--upload DIR | --data DIR | --dataset-id ID) [--steps N] [--lora FILE] [--image FILE]");
  process.exit(2);
}
// "models/<name>" is a model of the server's models folder; anything else a folder on the server host.
const baseModel = values.model.startsWith("models/") ? values.model : path.resolve(values.model);

const client = createClient({ address: values.address!, token: process.env.LORAFORGE_API_TOKEN });
try {
  // Exactly one data set source: an uploaded set's id, or a folder on the server host.
  let dataset: DatasetSource;
  if (values.upload) {
    const uploaded = await client.datasets.upload(path.resolve(values.upload));
    console.log(`uploaded data set ${uploaded.id}: ${uploaded.imageCount} images, ${uploaded.sizeBytes} bytes`);
    dataset = { datasetId: uploaded.id };
  } else if (values.data) dataset = { datasetDir: path.resolve(values.data) };
  else dataset = { datasetId: values["dataset-id"]! };

  const job = await client.train({
    baseModel,
    ...dataset,
    resolution: 64,
    trainBatchSize: 4,
    maxTrainSteps: Number(values.steps),
    learningRate: 1e-3,
    lrScheduler: LrScheduler.LR_SCHEDULER_COSINE,
    lrWarmupSteps: 5,
    checkpointingSteps: 20,
    randomFlip: true,
    seed: 1337,
    validationPrompt: "a red circle on a blue background",
    numValidationImages: 1,
  });
  console.log(`job ${job.id} queued`);
  // The progress line is redrawn in place; other events start on a fresh line.
  let midLine = false;
  const say = (text: string) => {
    process.stdout.write(`${midLine ? "\n" : ""}${text}\n`);
    midLine = false;
  };
  for await (const ev of job.progress()) {
    const p = ev.payload;
    if (p?.$case === "metrics") {
      const m = p.metrics;
      process.stdout.write(
        `\rstep ${m.step}/${m.totalSteps}  loss ${m.loss.toFixed(4)}  lr ${m.learningRate.toExponential(2)}  ` +
          `${m.imagesPerSecond.toFixed(1)} img/s  eta ${Math.ceil(m.etaSeconds)}s   `,
      );
      midLine = true;
    } else if (p?.$case === "state") {
      say(`${stateName(p.state.state)}${p.state.error ? `: ${errorMessage(p.state)}` : ""}`);
    } else if (p?.$case === "checkpoint") {
      // Artifacts are named resources of the server ("jobs/<id>/checkpoint-<step>/"), fetched with artifacts.download.
      say(`checkpoint at step ${p.checkpoint.step}: ${p.checkpoint.artifact?.name}`);
    } else if (p?.$case === "validation") {
      say(`validation images (${p.validation.prompt}): ${p.validation.images.map((i) => i.name).join(", ")}`);
    }
  }
  const done = await job.result();
  const lora = job.lora;
  if (done.state !== JobState.JOB_STATE_SUCCEEDED || !lora) {
    console.error(`training ended ${stateName(done.state)}: ${errorMessage(done)}`);
    process.exitCode = 1;
  } else {
    console.log(`LoRA: ${lora.name} (sha256 ${lora.sha256}, ${lora.sizeBytes} bytes)`);
    if (values.lora) {
      await client.artifacts.download(lora, { file: values.lora });
      console.log(`saved to ${path.resolve(values.lora)}; load it with pipeline.load_lora_weights(...)`);
    }
    if (values.image) {
      // The first Infer on a base model exports it to ONNX (about a minute for the tiny one).
      const prompt = "a red circle on a blue background";
      const res = await client.infer({
        prompt,
        baseModel,
        loras: [{ source: { $case: "jobId", jobId: job.id }, scale: 1 }],
        sampler: Sampler.SAMPLER_EULER,
        numInferenceSteps: 20,
        width: 64,
        height: 64,
        seed: 1337,
      });
      writeFileSync(values.image, res.images[0].png);
      console.log(`image with the LoRA ("${prompt}"): ${path.resolve(values.image)} in ${Math.round(res.timings?.totalMs ?? 0)} ms`);
    }
  }
} catch (err) {
  if (err instanceof InvalidSpecError) console.error(`spec refused:\n${err.violations.map((v) => `  ${v.field}: ${v.description}`).join("\n")}`);
  else console.error(err);
  process.exitCode = 1;
} finally {
  client.close();
}
