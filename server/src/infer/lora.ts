// LoRA files → the exported graphs' slot inputs. A file is read once (cached by path, size and
// mtime) and mapped onto a model's slots: per slot A [r, in] and B [out, r] with alpha / r
// folded into B. A request's LoRAs are then concatenated along r, each B times its scale; those
// session inputs are built once per combination (files and scales) and kept for the next request.
//
// Key forms understood (all as diffusers' load_lora_weights reads them):
//   unet.<module>.lora.down.weight / .lora.up.weight            diffusers (our trainer's output)
//   unet.<module>.lora_A.weight / .lora_B.weight (also .lora_A.<adapter>.weight)  peft
//   text_encoder.<module>.lora_linear_layer.down.weight / .up   diffusers, text encoder
//   unet.<…>.processor.to_q_lora.down.weight                    diffusers' old attention-processor form
//   base_model.model.<module>.lora_A.weight                      peft's own save (UNet)
//   lora_unet_<module with _>.lora_down.weight / .lora_up.weight / .alpha   kohya (lora_te_ for the text encoder)
//   lora_unet_input_blocks_4_1_…, middle_block_1_…, output_blocks_…   kohya's SDXL files: the original (SGM)
//                                                                UNet's module names (the manifest's kohya_sgm_key)
//   text_encoder_2.<module>…, lora_te1_… / lora_te2_…             SDXL's two text encoders (diffusers / kohya)
// 1x1 convolution layers (SD-1.x's proj_in/proj_out) carry [r, in, 1, 1] / [out, r, 1, 1] weights: read as 2-D.
// alpha: a `<stem>.alpha` tensor, else diffusers' `lora_adapter_metadata` (lora_alpha, r, alpha_pattern,
// rank_pattern, use_rslora), else alpha = r (scale 1), as load_lora_weights does.
import { realpathSync, statSync } from "node:fs";
import ort from "onnxruntime-node";
import { floatTensor } from "./half.js";
import { readSafetensors, shownName, type SafetensorsFile, type Tensor } from "./safetensors.js";

/** One slot of an exported model, as manifest.json lists it. */
export interface SlotInfo {
  component: "unet" | "text_encoder" | "text_encoder_2";
  module: string;
  diffusers_key: string;
  kohya_key: string;
  in_features: number;
  out_features: number;
  input_a: string;
  input_b: string;
  /** "linear" or "conv1x1" (absent in older manifests: linear). */
  kind?: string;
  /** The kohya key in SDXL's original UNet names (UNet slots inside transformers). */
  kohya_sgm_key?: string;
}

/** A LoRA mapped onto one model: per slot index, A [r, in] and B [out, r] (alpha / r folded in). */
export interface MappedLora {
  rank: Map<number, number>;
  a: Map<number, Float32Array>;
  b: Map<number, Float32Array>;
}

/** A problem with a LoRA file for this model; `layer` names the offending layer. */
export class LoraMismatch extends Error {
  constructor(
    readonly layer: string,
    message: string,
  ) {
    super(message);
  }
}

/** A LoRA file that is well-formed safetensors but not a usable LoRA (rank 0, a bad alpha). */
export class LoraInvalid extends Error {}

const stripTextModel = (s: string) => s.replace(/^text_model[._]/, "");
const KOHYA_PREFIX: Record<SlotInfo["component"], string> = { unet: "lora_unet_", text_encoder: "lora_te_", text_encoder_2: "lora_te2_" };

/** Lookup tables from every key form to slot indices, built once per model. */
export class SlotIndex {
  private readonly byDotted = new Map<string, number>();
  private readonly byKohya = new Map<string, number>();
  readonly counts = { unet: 0, text_encoder: 0, text_encoder_2: 0 };

  constructor(readonly slots: SlotInfo[]) {
    slots.forEach((s, i) => {
      const mod = s.component === "unet" ? s.module : stripTextModel(s.module);
      this.byDotted.set(`${s.component}.${mod}`, i);
      this.byKohya.set(KOHYA_PREFIX[s.component] + mod.replace(/\./g, "_"), i);
      if (s.kohya_sgm_key) this.byKohya.set(s.kohya_sgm_key, i);
      this.counts[s.component]++;
    });
  }

  /** The slot of a stem like "unet.down_blocks.0….to_q" or "lora_unet_down_blocks_0_…_to_q"; -1 if none. */
  find(stem: string): number {
    if (/^lora_(unet|te|te1|te2)_/.test(stem)) {
      const k = stem
        .replace(/^lora_te1_/, "lora_te_")
        .replace(/^lora_te_text_model_/, "lora_te_")
        .replace(/^lora_te2_text_model_/, "lora_te2_");
      return this.byKohya.get(k) ?? -1;
    }
    let s = stem.replace(/^base_model\.model\./, "unet.");
    if (!/^(unet|text_encoder|text_encoder_2)\./.test(s)) s = `unet.${s}`;
    s = s.replace(/^(text_encoder(?:_2)?)\.text_model\./, "$1.");
    return this.byDotted.get(s) ?? -1;
  }
}

type Part = "down" | "up" | "alpha";

// The key forms, tried in this order: plain suffixes first (endsWith is cheaper than a regex, and a file has
// thousands of names), then the forms with a variable part.
const SUFFIXES: [string, Part][] = [
  [".lora.down.weight", "down"],
  [".lora.up.weight", "up"],
  [".lora_linear_layer.down.weight", "down"],
  [".lora_linear_layer.up.weight", "up"],
];
const PROCESSOR = /^(.*\.processor\.to_(?:q|k|v|out)_lora)\.(down|up)\.weight$/;
const PEFT = /^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$/;
const KOHYA: [string, Part][] = [
  [".lora_down.weight", "down"],
  [".lora_up.weight", "up"],
  [".alpha", "alpha"],
];

/** Splits a tensor name into (layer stem, part), or null for a name that is not LoRA weight. */
function parseKey(name: string): { stem: string; part: Part } | null {
  const found = (stem: string, part: Part) => ({
    // diffusers' old attention-processor form: <attn>.processor.to_q_lora → <attn>.to_q
    stem: stem.includes(".processor.") ? stem.replace(/\.processor\.(to_q|to_k|to_v)_lora$/, ".$1").replace(/\.processor\.to_out_lora$/, ".to_out.0") : stem,
    part,
  });
  for (const [suffix, part] of SUFFIXES) if (name.endsWith(suffix)) return found(name.slice(0, -suffix.length), part);
  let m = name.includes(".processor.") ? PROCESSOR.exec(name) : null;
  if (m) return found(m[1], m[2] === "down" ? "down" : "up");
  m = name.includes(".lora_") ? PEFT.exec(name) : null;
  if (m) return found(m[1], m[2] === "A" ? "down" : "up");
  for (const [suffix, part] of KOHYA) if (name.endsWith(suffix)) return found(name.slice(0, -suffix.length), part);
  return null;
}

/** peft's pattern lookup: the first key k with `(.*\.)?k$` matching the module name. */
function fromPattern(pattern: unknown, module: string): number | undefined {
  if (!pattern || typeof pattern !== "object") return undefined;
  for (const [k, v] of Object.entries(pattern as Record<string, number>)) {
    try {
      if (new RegExp(`^(.*\\.)?(${k})$`).test(module)) return v;
    } catch {
      // not a usable pattern
    }
  }
  return undefined;
}

function adapterMetadata(metadata: Record<string, string>): Record<string, unknown> | null {
  const raw = metadata["lora_adapter_metadata"];
  if (!raw) return null;
  try {
    return JSON.parse(raw) as Record<string, unknown>;
  } catch {
    return null;
  }
}

/** A LoRA matrix's 2-D shape: [a, b] as is, [a, b, 1, 1] (a 1x1 convolution) as [a, b]; null otherwise. */
function as2d(t: Tensor): [number, number] | null {
  const s = t.shape;
  if (s.length === 2) return [s[0], s[1]];
  if (s.length === 4 && s[2] === 1 && s[3] === 1) return [s[0], s[1]];
  return null;
}

/** `data` times `scale`, in a new array (a plain loop: TypedArray.map calls a function per element, ~10× slower). */
function scaled(data: Float32Array, scale: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = data[i] * scale;
  return out;
}

/** Maps one parsed LoRA file onto a model's slots, checking every shape. */
export function mapLora(file: string, tensors: Map<string, Tensor>, metadata: Record<string, string>, index: SlotIndex): MappedLora {
  const groups = new Map<string, Partial<Record<Part, Tensor>>>();
  for (const [name, t] of tensors) {
    const k = parseKey(name);
    if (!k) throw new LoraMismatch(name.slice(0, 120), `${file}: tensor ${shownName(name)} is not a LoRA weight this server understands`);
    const g = groups.get(k.stem) ?? {};
    g[k.part] = t;
    groups.set(k.stem, g);
  }
  const meta = adapterMetadata(metadata);
  const out: MappedLora = { rank: new Map(), a: new Map(), b: new Map() };
  for (const [stem, g] of groups) {
    const slot = index.find(stem);
    if (slot < 0)
      throw new LoraMismatch(
        stem.slice(0, 120),
        `${file}: layer ${shownName(stem)} has no LoRA slot in this base model. Slots cover every Linear and 1x1 convolution ` +
          `inside the UNet's transformers (attention, feed-forward, proj_in/proj_out) and the text encoders' attention ` +
          `and MLP layers; a LoRA on other layers (ResNet convolutions: LoCon/LyCORIS) is not served, and one made ` +
          `for another base model names layers this one does not have`,
      );
    const info = index.slots[slot];
    if (!g.down || !g.up) throw new LoraMismatch(stem, `${file}: layer ${stem} lacks its ${g.down ? "up" : "down"} weight`);
    const down = as2d(g.down);
    const up = as2d(g.up);
    if (!down || !up)
      throw new LoraMismatch(
        stem,
        `${file}: layer ${stem} has down ${JSON.stringify(g.down.shape)} and up ${JSON.stringify(g.up.shape)}: only linear and 1x1 convolution LoRA layers are served`,
      );
    const [r, inF] = down;
    const [outF, r2] = up;
    if (r === 0) throw new LoraInvalid(`${file}: layer ${stem} has rank 0`);
    if (r !== r2)
      throw new LoraMismatch(stem, `${file}: layer ${stem} has down ${JSON.stringify(g.down.shape)} and up ${JSON.stringify(g.up.shape)}, which do not pair`);
    if (inF !== info.in_features || outF !== info.out_features)
      throw new LoraMismatch(
        stem,
        `${file}: layer ${stem} maps ${inF} → ${outF} features, but this base model's ${info.component}.${info.module} maps ${info.in_features} → ${info.out_features} (the LoRA is made for another base model)`,
      );
    let scale = 1;
    if (g.alpha) {
      if (g.alpha.data.length !== 1) throw new LoraInvalid(`${file}: layer ${stem}'s alpha is not a single number`);
      scale = g.alpha.data[0] / r;
    } else if (meta) {
      const c = info.component;
      const baseR = Number(meta[`${c}.r`] ?? r);
      const rr = fromPattern(meta[`${c}.rank_pattern`], info.module) ?? baseR;
      const alpha = fromPattern(meta[`${c}.alpha_pattern`], info.module) ?? Number(meta[`${c}.lora_alpha`] ?? rr);
      scale = meta[`${c}.use_rslora`] === true ? alpha / Math.sqrt(rr) : alpha / rr;
    }
    if (!Number.isFinite(scale)) throw new LoraInvalid(`${file}: layer ${stem}'s alpha / rank is not a finite number`);
    if (out.a.has(slot)) throw new LoraMismatch(stem, `${file}: layer ${stem} appears twice`);
    const b = scale === 1 ? g.up.data : scaled(g.up.data, scale);
    out.rank.set(slot, r);
    out.a.set(slot, g.down.data);
    out.b.set(slot, b);
  }
  return out;
}

/** A parsed LoRA file; `bytes` counts its decoded tensors and the mapped copies made from them. */
export interface LoraFile {
  /** Unique per parse: a file read again after it changed gets a new id, so nothing built from the old content is reused. */
  id: number;
  real: string;
  signature: string;
  parsed: SafetensorsFile;
  mapped: Map<string, MappedLora>;
  bytes: number;
}

/** Default byte budget of the LoRA cache (LORAFORGE_INFER_LORA_CACHE_MB): 2 GiB of decoded float32 tensors. */
export const DEFAULT_LORA_CACHE_BYTES = 2 * 1024 * 1024 * 1024;

const tensorBytes = (t: Map<string, Tensor>) => [...t.values()].reduce((n, x) => n + x.data.byteLength, 0);

export type Component = SlotInfo["component"];
export type FeedDtype = "float32" | "float16";

/**
 * One request's LoRAs with their scales on one model: the session inputs of each component, built on
 * first use and kept (in the LoraCache that made it) for the next request with the same combination.
 */
export class LoraCombo {
  private readonly built = new Map<string, Record<string, ort.Tensor>>();
  /** Bytes of feed data this combination holds beyond the mapped LoRAs' own arrays. */
  bytes = 0;
  tick = 0;
  constructor(
    readonly key: string,
    readonly fileIds: number[],
    private readonly index: SlotIndex,
    private readonly loras: { lora: MappedLora; scale: number }[],
    private readonly grew: (combo: LoraCombo, bytes: number) => void,
  ) {}

  /** The slot inputs of `component` (rank 0 where no LoRA of the combination touches a slot). */
  feeds = (component: Component, dtype: FeedDtype = "float32"): Record<string, ort.Tensor> => {
    const k = `${component}/${dtype}`;
    let f = this.built.get(k);
    if (!f) {
      f = slotFeeds(this.index, component, this.loras, dtype);
      this.built.set(k, f);
      const own = new Set<ArrayBufferView>(this.loras.flatMap(({ lora }) => [...lora.a.values(), ...lora.b.values()]));
      const extra = Object.values(f).reduce((n, t) => n + (own.has(t.data as ArrayBufferView) ? 0 : (t.data as ArrayBufferView).byteLength), 0);
      this.bytes += extra;
      this.grew(this, extra);
    }
    return f;
  };
}

/**
 * Parsed LoRA files keyed by real path (one file behind many links is held once), kept while the
 * file's inode, size, mtime and ctime are unchanged; and the session inputs of the LoRA combinations
 * requests used (LoraCombo), keyed by model, the files' parses and the scales. Both share one byte
 * budget: once they hold more than `maxBytes` (or more than `maxEntries` files, or combinations), the
 * least recently used entry goes, files or combinations alike; a file going takes its combinations
 * with it. Only files that mapped onto a model are kept: a file refused for any reason is never
 * cached. A file larger than `maxBytes` is refused outright.
 */
export class LoraCache {
  private readonly entries = new Map<string, LoraFile>();
  private readonly lastUse = new Map<string, number>();
  private readonly combos = new Map<string, LoraCombo>();
  private used = 0;
  private clock = 0;
  private nextId = 1;
  constructor(
    readonly maxBytes = DEFAULT_LORA_CACHE_BYTES,
    private readonly maxEntries = 256,
  ) {}

  /** Bytes the cache holds: decoded tensors, mapped copies and the combinations' feed data. */
  get bytes(): number {
    return this.used;
  }

  /** Files held. */
  get size(): number {
    return this.entries.size;
  }

  /** Combinations held. */
  get comboCount(): number {
    return this.combos.size;
  }

  /**
   * The file at `file` (links followed: the key is its real path): cached if unchanged, else parsed (and
   * cached once it maps); `confined` judges the real path of the file actually opened.
   */
  async file(file: string, confined?: (real: string) => boolean): Promise<LoraFile> {
    // Synchronous: a realpath and a stat take microseconds, less than a trip through libuv's thread pool.
    const real = realpathSync(file);
    const st = statSync(real);
    const signature = `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
    const hit = this.entries.get(real);
    if (hit && hit.signature === signature) return hit;
    const parsed = await readSafetensors(real, this.maxBytes, confined);
    return { id: this.nextId++, real, signature, parsed, mapped: new Map(), bytes: tensorBytes(parsed.tensors) };
  }

  /** `f` mapped onto the model whose slots `index` describes (model key: its hash). */
  map(f: LoraFile, modelKey: string, index: SlotIndex): MappedLora {
    let m = f.mapped.get(modelKey);
    if (!m) {
      try {
        m = mapLora(f.real, f.parsed.tensors, f.parsed.metadata, index);
      } catch (err) {
        this.drop(f.real);
        throw err;
      }
      f.mapped.set(modelKey, m);
      // B matrices are copies when alpha / r folded a scale in; A matrices are the file's own.
      const own = new Set([...f.parsed.tensors.values()].map((t) => t.data));
      const copies = [...m.b.values()].filter((b) => !own.has(b));
      const extra = copies.reduce((n, b) => n + b.byteLength, 0);
      f.bytes += extra;
      if (this.entries.get(f.real) === f) this.used += extra;
    }
    this.keep(f);
    return m;
  }

  /** file() then map(): the file at `file` mapped onto a model. */
  async load(file: string, modelKey: string, index: SlotIndex): Promise<MappedLora> {
    return this.map(await this.file(file), modelKey, index);
  }

  /**
   * The combination of `items` (files with their scales, in order) on a model: the one a request made
   * before when the files are the same parses and the scales the same numbers, else a new one.
   * Maps each file first (throwing as map() does). LoRAs of scale 0 are left out, as they add nothing.
   */
  combination(modelKey: string, index: SlotIndex, items: { file: LoraFile; scale: number }[]): LoraCombo {
    const used = items.filter((it) => it.scale !== 0);
    const mapped = used.map((it) => ({ lora: this.map(it.file, modelKey, index), scale: it.scale }));
    const key = `${modelKey}|${used.map((it) => `${it.file.id}*${it.scale}`).join(",")}`;
    let combo = this.combos.get(key);
    if (!combo) {
      combo = new LoraCombo(
        key,
        used.map((it) => it.file.id),
        index,
        mapped,
        (c, extra) => {
          if (this.combos.get(c.key) !== c) return;
          this.used += extra;
          this.evict(c.key);
        },
      );
      this.combos.set(key, combo);
    }
    // Most recently used last; its files are used with it.
    this.combos.delete(key);
    this.combos.set(key, combo);
    combo.tick = ++this.clock;
    for (const it of used) this.touch(it.file.real);
    this.evict(key);
    return combo;
  }

  private touch(real: string) {
    if (!this.entries.has(real)) return;
    this.lastUse.set(real, ++this.clock);
    const e = this.entries.get(real)!;
    this.entries.delete(real);
    this.entries.set(real, e);
  }

  private drop(real: string) {
    const e = this.entries.get(real);
    if (!e) return;
    this.entries.delete(real);
    this.lastUse.delete(real);
    this.used -= e.bytes;
    // Combinations built from this parse go with it (their arrays may be views of its tensors).
    for (const [k, c] of this.combos) if (c.fileIds.includes(e.id)) this.dropCombo(k);
  }

  private dropCombo(key: string) {
    const c = this.combos.get(key);
    if (!c) return;
    this.combos.delete(key);
    this.used -= c.bytes;
  }

  private keep(f: LoraFile) {
    if (this.entries.get(f.real) !== f) {
      this.drop(f.real);
      this.entries.set(f.real, f);
      this.used += f.bytes;
    }
    this.touch(f.real);
    this.evict();
  }

  /** Least recently used entries out (files or combinations) until within budget; `spare` (a combination in use) goes last. */
  private evict(spare?: string) {
    const over = () => this.used > this.maxBytes || this.entries.size > this.maxEntries || this.combos.size > this.maxEntries;
    while (over()) {
      const oldFile = this.entries.keys().next().value as string | undefined;
      let oldCombo = this.combos.keys().next().value as string | undefined;
      if (oldCombo === spare) oldCombo = [...this.combos.keys()][1];
      const fileTick = oldFile === undefined ? Infinity : this.lastUse.get(oldFile)!;
      const comboTick = oldCombo === undefined ? Infinity : this.combos.get(oldCombo)!.tick;
      if (oldCombo !== undefined && (comboTick < fileTick || this.combos.size > this.maxEntries)) this.dropCombo(oldCombo);
      else if (oldFile !== undefined) this.drop(oldFile);
      else if (spare !== undefined && this.combos.has(spare)) this.dropCombo(spare);
      else break;
    }
  }
}

const EMPTY = new Float32Array(0);

/**
 * The slot feeds of one component for a list of (LoRA, scale): per slot the A matrices stacked
 * along r, and the B matrices side by side along r with their scale applied; rank 0 where no LoRA
 * touches the slot. A slot that one LoRA alone touches reuses its arrays (A always, B at scale 1)
 * instead of copying them (float32 only).
 */
export function slotFeeds(
  index: SlotIndex,
  component: Component,
  loras: { lora: MappedLora; scale: number }[],
  dtype: FeedDtype = "float32",
): Record<string, ort.Tensor> {
  const tensor = (data: Float32Array, dims: number[]) => (dtype === "float32" ? new ort.Tensor("float32", data, dims) : floatTensor(data, dims, dtype));
  const feeds: Record<string, ort.Tensor> = {};
  index.slots.forEach((s, i) => {
    if (s.component !== component) return;
    const parts = loras.filter((l) => l.lora.rank.has(i) && l.scale !== 0);
    const total = parts.reduce((n, l) => n + l.lora.rank.get(i)!, 0);
    if (total === 0) {
      feeds[s.input_a] = tensor(EMPTY, [0, s.in_features]);
      feeds[s.input_b] = tensor(EMPTY, [s.out_features, 0]);
      return;
    }
    if (parts.length === 1) {
      const { lora, scale } = parts[0];
      const src = lora.b.get(i)!;
      feeds[s.input_a] = tensor(lora.a.get(i)!, [total, s.in_features]);
      feeds[s.input_b] = tensor(scale === 1 ? src : scaled(src, scale), [s.out_features, total]);
      return;
    }
    const a = new Float32Array(total * s.in_features);
    const b = new Float32Array(s.out_features * total);
    let off = 0;
    for (const { lora, scale } of parts) {
      const r = lora.rank.get(i)!;
      a.set(lora.a.get(i)!, off * s.in_features);
      const src = lora.b.get(i)!;
      for (let o = 0; o < s.out_features; o++)
        for (let k = 0; k < r; k++) b[o * total + off + k] = src[o * r + k] * scale;
      off += r;
    }
    feeds[s.input_a] = tensor(a, [total, s.in_features]);
    feeds[s.input_b] = tensor(b, [s.out_features, total]);
  });
  return feeds;
}
