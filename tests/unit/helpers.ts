// Helpers shared by the unit tests: where the stored fixtures are (tests/unit/fixtures, written by
// make_fixtures.py from diffusers / transformers / peft / numpy) and a tolerance check that names the
// worst element when it fails.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** tests/unit/fixtures, from the source file (tests/unit/) or its compiled copy (tests/dist/unit/). */
export const FIXTURES = fileURLToPath(
  new URL(import.meta.url.includes("/dist/unit/") ? "../../unit/fixtures/" : "./fixtures/", import.meta.url),
);

export function loadFixture<T>(name: string): T {
  return JSON.parse(readFileSync(FIXTURES + name, "utf8")) as T;
}

/**
 * Asserts |actual[i] − expected[i]| ≤ abs + rel·|expected[i]| for every i (and equal lengths);
 * the message names the first element outside, with both values.
 */
export function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: { rel: number; abs: number }, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length ${actual.length}, expected ${expected.length}`);
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i];
    const e = expected[i];
    const ok = Math.abs(a - e) <= tol.abs + tol.rel * Math.abs(e);
    if (!ok) assert.fail(`${what}[${i}]: ${a}, expected ${e} (± ${tol.abs} + ${tol.rel}·|expected|)`);
  }
}
