// Trains a LoRA through the SDK, follows it live, and (with --image) draws an image
// with it through the Infer RPC.
//   node examples/dist/train.js --address 127.0.0.1:50051 --model DIR --data DIR [--steps 60] [--image out.png]
import { writeFileSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import { ArtifactKind, createClient, InvalidSpecError, stateName } from "@loraforge/sdk";

const { values } = parseArgs({
  options: {
    address: { type: "string", default: "127.0.0.1:50051" },
    model: { type: "string" },
    data: { type: "string" },
    steps: { type: "string", default: "60" },
    image: { type: "string" },
  },
});
if (!values.model || !values.data) {
  console.error("usage: train.js --address HOST:PORT --model MODEL_DIR --data DATASET_DIR [--steps N]");
  process.exit(2);
}

const client = createClient({ address: values.address!, token: process.env.LORAFORGE_API_TOKEN });
try {
  const job = await client.train({
    baseModel: path.resolve(values.model),
    datasetDir: path.resolve(values.data),
    resolution: 64,
    trainBatchSize: 4,
    maxTrainSteps: Number(values.steps),
    learningRate: 1e-3,
    lrScheduler: "cosine",
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
      say(`${stateName(p.state.state)}${p.state.error ? `: ${p.state.error}` : ""}`);
    } else if (p?.$case === "checkpoint") {
      say(`checkpoint at step ${p.checkpoint.step}: ${p.checkpoint.artifact?.path}`);
    } else if (p?.$case === "validation") {
      say(`validation images (${p.validation.prompt}): ${p.validation.images.map((i) => i.path).join(", ")}`);
    }
  }
  const done = await job.result();
  const lora = done.artifacts.find((a) => a.kind === ArtifactKind.ARTIFACT_KIND_LORA);
  if (stateName(done.state) !== "SUCCEEDED" || !lora) {
    console.error(`training ended ${stateName(done.state)}: ${done.error}`);
    process.exitCode = 1;
  } else {
    console.log(`LoRA: ${lora.path}`);
    console.log(`sha256 ${lora.sha256}, ${lora.sizeBytes} bytes; load it with pipeline.load_lora_weights(...)`);
    if (values.image) {
      // The first Infer on a base model exports it to ONNX (about a minute for the tiny one).
      const prompt = "a red circle on a blue background";
      const res = await client.infer({
        prompt,
        baseModel: path.resolve(values.model),
        loras: [{ source: { $case: "jobId", jobId: job.id }, scale: 1 }],
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
