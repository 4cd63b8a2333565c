// CLIP's byte-level BPE tokenizer, read from a model's tokenizer/ folder (vocab.json,
// merges.txt, tokenizer_config.json), giving the ids transformers' CLIPTokenizer gives:
// normalize (NFC, whitespace runs → one space, trim, lower case), split into words with
// CLIP's pattern, map each word's UTF-8 bytes to printable characters, mark the word's
// last symbol with "</w>", apply the merges lowest rank first, look the pieces up.
import { readFileSync, existsSync } from "node:fs";
import path from "node:path";

const WORD_PATTERN = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/giu;

/** GPT-2/CLIP's reversible byte → printable character table. */
function byteToUnicode(): string[] {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const table: string[] = new Array(256);
  for (const b of printable) table[b] = String.fromCodePoint(b);
  let extra = 0;
  for (let b = 0; b < 256; b++) if (table[b] === undefined) table[b] = String.fromCodePoint(256 + extra++);
  return table;
}

/** A special token in tokenizer_config.json is a string or an AddedToken object. */
function tokenContent(v: unknown): string | undefined {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") return (v as { content: string }).content;
  return undefined;
}

export class ClipTokenizer {
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  private readonly bytes = byteToUnicode();
  private readonly cache = new Map<string, number[]>();

  constructor(
    private readonly vocab: Map<string, number>,
    private readonly ranks: Map<string, number>,
    special: { bos: string; eos: string; pad: string; unk: string },
    readonly maxLength: number,
  ) {
    const id = (tok: string, what: string) => {
      const v = vocab.get(tok);
      if (v === undefined) throw new Error(`tokenizer: the ${what} token ${JSON.stringify(tok)} is not in vocab.json`);
      return v;
    };
    this.bosId = id(special.bos, "start");
    this.eosId = id(special.eos, "end");
    this.padId = id(special.pad, "padding");
    this.unkId = id(special.unk, "unknown");
  }
  private readonly unkId: number;

  /** Loads vocab.json + merges.txt (+ tokenizer_config.json / special_tokens_map.json for special tokens). */
  static fromDir(dir: string): ClipTokenizer {
    const vocabObj = JSON.parse(readFileSync(path.join(dir, "vocab.json"), "utf8")) as Record<string, number>;
    const vocab = new Map(Object.entries(vocabObj));
    const ranks = new Map<string, number>();
    const lines = readFileSync(path.join(dir, "merges.txt"), "utf8").split("\n");
    let rank = 0;
    for (const [i, line] of lines.entries()) {
      if ((i === 0 && line.startsWith("#version")) || line.trim() === "") continue;
      const parts = line.split(" ");
      if (parts.length !== 2) continue;
      ranks.set(`${parts[0]} ${parts[1]}`, rank++);
    }
    const cfg: Record<string, unknown> = {};
    for (const name of ["special_tokens_map.json", "tokenizer_config.json"]) {
      const p = path.join(dir, name);
      if (existsSync(p)) Object.assign(cfg, JSON.parse(readFileSync(p, "utf8")));
    }
    const eos = tokenContent(cfg.eos_token) ?? "<|endoftext|>";
    const special = {
      bos: tokenContent(cfg.bos_token) ?? "<|startoftext|>",
      eos,
      pad: tokenContent(cfg.pad_token) ?? eos,
      unk: tokenContent(cfg.unk_token) ?? eos,
    };
    const maxLength = typeof cfg.model_max_length === "number" && cfg.model_max_length < 10_000 ? cfg.model_max_length : 77;
    return new ClipTokenizer(vocab, ranks, special, maxLength);
  }

  /** BPE of one word (already mapped to printable characters), as vocabulary ids. */
  private bpe(word: string): number[] {
    const hit = this.cache.get(word);
    if (hit) return hit;
    const symbols = Array.from(word);
    symbols[symbols.length - 1] += "</w>";
    while (symbols.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i < symbols.length - 1; i++) {
        const r = this.ranks.get(`${symbols[i]} ${symbols[i + 1]}`);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = i;
        }
      }
      if (best < 0) break;
      // Merge every occurrence of the best pair, left to right (as the reference BPE does).
      const a = symbols[best];
      const b = symbols[best + 1];
      const merged: string[] = [];
      for (let i = 0; i < symbols.length; i++) {
        if (i < symbols.length - 1 && symbols[i] === a && symbols[i + 1] === b) {
          merged.push(a + b);
          i++;
        } else merged.push(symbols[i]);
      }
      symbols.splice(0, symbols.length, ...merged);
    }
    const ids = symbols.map((s) => this.vocab.get(s) ?? this.unkId);
    if (this.cache.size < 50_000) this.cache.set(word, ids);
    return ids;
  }

  /** Token ids of `text` without start/end tokens. */
  encodeRaw(text: string): number[] {
    const clean = text.normalize("NFC").replace(/\s+/gu, " ").trim().toLowerCase();
    const ids: number[] = [];
    for (const m of clean.matchAll(WORD_PATTERN)) {
      const word = m[0];
      if (word === "<|startoftext|>" || word === "<|endoftext|>") {
        ids.push(this.vocab.get(word) ?? this.unkId);
        continue;
      }
      let mapped = "";
      for (const b of Buffer.from(word, "utf8")) mapped += this.bytes[b];
      ids.push(...this.bpe(mapped));
    }
    return ids;
  }

  /** Start token, at most maxLength − 2 tokens of `text`, end token, padding to maxLength. */
  encode(text: string): number[] {
    const body = this.encodeRaw(text).slice(0, this.maxLength - 2);
    const ids = [this.bosId, ...body, this.eosId];
    while (ids.length < this.maxLength) ids.push(this.padId);
    return ids;
  }
}
