// LoRA key mapping (server/src/infer/lora.ts: mapLora over a SlotIndex) against where diffusers (peft for
// peft's own files) really puts each tensor, as stored by fixtures/make_fixtures.py. For SD 1.5's and SDXL's
// module layouts (toy widths; the manifest's slots made by the engine's export code), LoRA files in each form:
//   diffusers_peft   diffusers' save_lora_weights of peft state dicts + lora_adapter_metadata (rank_pattern,
//                    alpha_pattern, alpha ≠ rank, rsLoRA on SDXL's second text encoder)
//   diffusers_old    convert_state_dict_to_diffusers' .lora.down / .lora_linear_layer.down keys, no metadata
//   kohya_converted  diffusers' convert_state_dict_to_kohya (diffusers' module names, lora_te1_ / lora_te2_)
//   kohya            as kohya's sd-scripts / A1111 name them: lora_te_ (SD) or lora_te1_ / lora_te2_ with the
//                    text_model. path, SDXL UNet layers in the original (SGM) block names, one alpha per layer
//   peft_native      peft's own save_pretrained of a UNet adapter (base_model.model.… keys; SD 1.5)
// Each file was loaded by diffusers' load_lora_weights into fresh models, and each loaded layer's lora_A /
// lora_B matched back to the file's tensors: that gives the expected slot per (down, up) pair and the scale
// (peft's scaling; for kohya files alpha / rank, see make_fixtures.py). mapLora must put every pair in that
// slot, A as is and B times the scale (1e-6 relative: one float32 multiply).
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { LoraMismatch, mapLora, SlotIndex, type SlotInfo } from "@loraforge/server/infer/lora";
import type { Tensor } from "@loraforge/server/infer/safetensors";
import { assertClose, loadFixture } from "./helpers.js";

type SlotRow = [SlotInfo["component"], string, number, number, string, string | null];
interface FileFx {
  metadata: Record<string, string>;
  tensors: [string, number[], number?][];
  expected: [number, number, number, number][];
}
interface ArchFx {
  slot_count: Record<string, number>;
  slots: SlotRow[];
  files: Record<string, FileFx>;
}
const fx = loadFixture<{ archs: Record<string, ArchFx> }>("lora.json");

const KOHYA_PREFIX = { unet: "lora_unet_", text_encoder: "lora_te_", text_encoder_2: "lora_te2_" } as const;

/** The manifest's slot entries (diffusers_key, kohya_key and the input names as the engine's export writes them). */
function slots(arch: ArchFx): SlotInfo[] {
  return arch.slots.map(([component, module, inF, outF, kind, sgm], i) => ({
    component,
    module,
    diffusers_key: `${component}.${module}`,
    kohya_key: KOHYA_PREFIX[component] + module.replace(/\./g, "_"),
    in_features: inF,
    out_features: outF,
    input_a: `lora_${i}_a`,
    input_b: `lora_${i}_b`,
    kind,
    ...(sgm ? { kohya_sgm_key: sgm } : {}),
  }));
}

/** The file's tensors with distinct values (its alphas with their stored values). */
function tensors(f: FileFx): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  f.tensors.forEach(([name, shape, value], k) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = value !== undefined ? Float32Array.of(value) : Float32Array.from({ length: n }, (_, j) => ((k * 7919 + j * 104729) % 2003) / 1000 - 1);
    out.set(name, { shape, data });
  });
  return out;
}

for (const [archName, arch] of Object.entries(fx.archs)) {
  describe(`${archName}: every LoRA layer lands where diffusers loads it`, () => {
    const index = new SlotIndex(slots(arch));
    for (const [fileName, f] of Object.entries(arch.files)) {
      it(`${fileName} (${f.expected.length} layers, ${f.tensors.length} tensors)`, () => {
        const t = tensors(f);
        const mapped = mapLora(`${archName}/${fileName}`, t, f.metadata, index);
        assert.equal(mapped.a.size, f.expected.length, "layers mapped");
        for (const [down, up, slot, scale] of f.expected) {
          const [downName, downShape] = f.tensors[down];
          const [upName] = f.tensors[up];
          const where = `${downName} → ${arch.slots[slot][0]}.${arch.slots[slot][1]}`;
          assert.ok(mapped.a.has(slot), `${where}: not mapped there (mapped: ${[...mapped.a.keys()].map((s) => arch.slots[s][1]).join(", ")})`);
          assert.equal(mapped.rank.get(slot), downShape[0], `${where}: rank`);
          assertClose(mapped.a.get(slot)!, t.get(downName)!.data, { rel: 0, abs: 0 }, `${where}: A`);
          const upData = t.get(upName)!.data;
          assertClose(mapped.b.get(slot)!, upData.map((v) => v * scale), { rel: 1e-6, abs: 0 }, `${where}: B × ${scale}`);
        }
      });
    }
  });
}

describe("a LoRA for another base model is refused with the layer named", () => {
  it("SD 1.5 files on SDXL's slots and SDXL files on SD 1.5's", () => {
    for (const [from, to] of [
      ["sd15", "sdxl"],
      ["sdxl", "sd15"],
    ]) {
      const index = new SlotIndex(slots(fx.archs[to]));
      for (const [fileName, f] of Object.entries(fx.archs[from].files))
        assert.throws(() => mapLora(fileName, tensors(f), f.metadata, index), LoraMismatch, `${from} ${fileName} on ${to}`);
    }
  });
});
