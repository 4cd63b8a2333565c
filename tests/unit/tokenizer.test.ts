// The CLIP tokenizer (server/src/infer/tokenizer.ts) against transformers' CLIPTokenizer, as stored by
// fixtures/make_fixtures.py, on two vocabularies read from the same files by both: the project's tiny
// model's (engine/loraforge_engine/tiny.py: byte symbols plus merges for 26 words) and a richer one whose
// ~600 merges were learned from a prompt corpus (overlapping, competing merges, as in CLIP's own). The
// strings: ASCII prompts, casing, contractions and apostrophes, punctuation, numbers, accents and other
// scripts, emoji (ZWJ sequences, flags, modifiers), whitespace and control characters, the special
// tokens' text, long words and prompts past 77 tokens. Ids must be equal, exactly.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ClipTokenizer } from "@loraforge/server/infer/tokenizer";
import { FIXTURES, loadFixture } from "./helpers.js";

interface Vocab {
  max_length: number;
  pad_id: number;
  bos_id: number;
  eos_id: number;
  vocab_size: number;
  /** Per string: CLIPTokenizer's ids with truncation, before padding (the padding is pad_id up to max_length). */
  ids: number[][];
  /** Per string: its ids without special tokens or truncation. */
  raw: number[][];
}
const fx = loadFixture<{ strings: string[]; vocabs: Record<string, Vocab> }>("tokenizer_cases.json");

for (const [name, v] of Object.entries(fx.vocabs)) {
  const cases = fx.strings.map((text, i) => ({ text, ids: v.ids[i], raw: v.raw[i] }));
  describe(`${name}: ids equal CLIPTokenizer's on ${cases.length} strings`, () => {
    const tok = ClipTokenizer.fromDir(FIXTURES + name);

    it("special tokens and length from the tokenizer files", () => {
      assert.deepEqual(
        { bos: tok.bosId, eos: tok.eosId, pad: tok.padId, max: tok.maxLength },
        { bos: v.bos_id, eos: v.eos_id, pad: v.pad_id, max: v.max_length },
      );
    });

    it("encode(): start, at most max_length − 2 tokens, end, padding (as the pipelines call it)", () => {
      const bad: string[] = [];
      for (const c of cases) {
        const expected = [...c.ids, ...new Array<number>(v.max_length - c.ids.length).fill(v.pad_id)];
        const got = tok.encode(c.text);
        if (JSON.stringify(got) !== JSON.stringify(expected))
          bad.push(`${JSON.stringify(c.text).slice(0, 80)}:\n    got      ${JSON.stringify(got)}\n    expected ${JSON.stringify(expected)}`);
      }
      assert.equal(bad.length, 0, `${bad.length} of ${cases.length} strings differ:\n  ${bad.slice(0, 8).join("\n  ")}`);
    });

    it("encodeRaw(): every token, no special tokens, no truncation", () => {
      const bad: string[] = [];
      for (const c of cases) {
        const got = tok.encodeRaw(c.text);
        if (JSON.stringify(got) !== JSON.stringify(c.raw))
          bad.push(`${JSON.stringify(c.text).slice(0, 80)}:\n    got      ${JSON.stringify(got).slice(0, 300)}\n    expected ${JSON.stringify(c.raw).slice(0, 300)}`);
      }
      assert.equal(bad.length, 0, `${bad.length} of ${cases.length} strings differ:\n  ${bad.slice(0, 8).join("\n  ")}`);
    });

    it("encodeRaw(text, limit) is the first tokens of the full encoding", () => {
      for (const c of cases.filter((c) => c.raw.length > 10)) {
        const got = tok.encodeRaw(c.text, 10);
        assert.ok(got.length >= 10, JSON.stringify(c.text));
        assert.deepEqual(got, c.raw.slice(0, got.length), JSON.stringify(c.text));
      }
    });
  });
}
