// CLIP's byte-level BPE tokenizer, read from a model's tokenizer/ folder (vocab.json,
// merges.txt, tokenizer_config.json), giving the ids transformers' CLIPTokenizer gives:
// take the special tokens' text out as written (case-sensitive), normalize the rest (NFC,
// whitespace runs → one space, lower case one character at a time), split into words with
// CLIP's pattern, map each word's UTF-8 bytes to printable characters, mark the word's
// last symbol with "</w>", apply the merges lowest rank first, look the pieces up.
// "Whitespace" is Unicode's White_Space, as the tokenizers library's regex engine reads \s
// (JavaScript's \s also takes U+FEFF and leaves out U+0085).
import { readFileSync, existsSync } from "node:fs";
import path from "node:path";

const WS = "\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const WHITESPACE_RUN = new RegExp(`[${WS}]+`, "gu");
const SPECIAL_TOKEN = /<\|startoftext\|>|<\|endoftext\|>/gu;
// CLIP's word pattern less its special-token alternatives: the special tokens' text in another case (lower
// cased here) is split again by the byte-level step, into "<|", the letters and "|>", which this gives.
const WORD_PATTERN = new RegExp(`'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^${WS}\\p{L}\\p{N}]+`, "giu");

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

  /**
   * BPE of one word (already mapped to printable characters), as vocabulary ids. The reference merges
   * the lowest-ranked pair everywhere (left to right), then looks again; here candidate pairs wait in a
   * heap ordered by (rank, position) and each rank's pairs are merged left to right before the pairs they
   * create are added, which gives the same result in O(n log n) rather than O(n²) for a long word.
   */
  private bpe(word: string): number[] {
    const hit = this.cache.get(word);
    if (hit) return hit;
    const sym = Array.from(word);
    sym[sym.length - 1] += "</w>";
    const n = sym.length;
    // A doubly linked list over the symbols; a merge keeps the left one and unlinks the right one.
    const next = Int32Array.from({ length: n }, (_, i) => (i + 1 < n ? i + 1 : -1));
    const prev = Int32Array.from({ length: n }, (_, i) => i - 1);
    const heap = new PairHeap();
    const push = (i: number) => {
      const j = next[i];
      if (j < 0) return;
      const r = this.ranks.get(`${sym[i]} ${sym[j]}`);
      if (r !== undefined) heap.push(r, i, sym[i], sym[j]);
    };
    for (let i = 0; i + 1 < n; i++) push(i);
    while (heap.size > 0) {
      const rank = heap.peekRank();
      const merged: number[] = [];
      while (heap.size > 0 && heap.peekRank() === rank) {
        const { pos: i, left, right } = heap.pop();
        const j = next[i];
        // Stale when either side was merged since the pair was queued.
        if (sym[i] !== left || j < 0 || sym[j] !== right) continue;
        sym[i] = left + right;
        sym[j] = "";
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = i;
        merged.push(i);
      }
      for (const i of merged) {
        if (prev[i] >= 0) push(prev[i]);
        push(i);
      }
    }
    const ids: number[] = [];
    for (let i = 0; i >= 0; i = next[i]) ids.push(this.vocab.get(sym[i]) ?? this.unkId);
    if (this.cache.size < 50_000 && word.length <= 256) this.cache.set(word, ids);
    return ids;
  }

  /** Token ids of `text` without start/end tokens; with `limit`, stops once it has that many. */
  encodeRaw(text: string, limit = Infinity): number[] {
    const ids: number[] = [];
    let from = 0;
    for (const special of [...text.matchAll(SPECIAL_TOKEN), null]) {
      const end = special ? special.index : text.length;
      // Final sigma: a whole-string toLowerCase() lowers Σ to ς at a word's end; CLIP lowers per character.
      const clean = text.slice(from, end).normalize("NFC").replace(WHITESPACE_RUN, " ").replace(/Σ/gu, "σ").toLowerCase();
      for (const m of clean.matchAll(WORD_PATTERN)) {
        if (ids.length >= limit) return ids;
        let mapped = "";
        for (const b of Buffer.from(m[0], "utf8")) mapped += this.bytes[b];
        // One push per id: spreading a long word's ids as arguments would overflow the stack.
        for (const id of this.bpe(mapped)) ids.push(id);
      }
      if (!special || ids.length >= limit) break;
      ids.push(this.vocab.get(special[0]) ?? this.unkId);
      from = end + special[0].length;
    }
    return ids;
  }

  /** Start token, at most maxLength − 2 tokens of `text`, end token, padding to maxLength. */
  encode(text: string): number[] {
    const body = this.encodeRaw(text, this.maxLength - 2).slice(0, this.maxLength - 2);
    const ids = [this.bosId, ...body, this.eosId];
    while (ids.length < this.maxLength) ids.push(this.padId);
    return ids;
  }
}

/** A binary min-heap of candidate merges, ordered by (rank, position). */
class PairHeap {
  private readonly rank: number[] = [];
  private readonly pos: number[] = [];
  private readonly left: string[] = [];
  private readonly right: string[] = [];

  get size(): number {
    return this.rank.length;
  }

  peekRank(): number {
    return this.rank[0];
  }

  private less(a: number, b: number): boolean {
    return this.rank[a] < this.rank[b] || (this.rank[a] === this.rank[b] && this.pos[a] < this.pos[b]);
  }

  private swap(a: number, b: number) {
    for (const arr of [this.rank, this.pos, this.left, this.right] as unknown[][]) [arr[a], arr[b]] = [arr[b], arr[a]];
  }

  push(rank: number, pos: number, left: string, right: string): void {
    this.rank.push(rank);
    this.pos.push(pos);
    this.left.push(left);
    this.right.push(right);
    for (let i = this.rank.length - 1; i > 0; ) {
      const parent = (i - 1) >> 1;
      if (!this.less(i, parent)) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  pop(): { pos: number; left: string; right: string } {
    const top = { pos: this.pos[0], left: this.left[0], right: this.right[0] };
    const last = this.rank.length - 1;
    this.swap(0, last);
    this.rank.pop();
    this.pos.pop();
    this.left.pop();
    this.right.pop();
    for (let i = 0; ; ) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < this.rank.length && this.less(l, m)) m = l;
      if (r < this.rank.length && this.less(r, m)) m = r;
      if (m === i) break;
      this.swap(i, m);
      i = m;
    }
    return top;
  }
}
