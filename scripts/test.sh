#!/usr/bin/env bash
# All of loraforge's tests: contracts (lint + generated code up to date), the engine
# (pytest), and the end-to-end suites (node:test against real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== contracts: buf lint, generated code and descriptor set up to date"
npx buf lint
before=$(mktemp -d)
cp -r sdk/src/gen "$before/"
npx buf generate
if ! diff -r "$before/gen" sdk/src/gen >/dev/null; then
  echo "sdk/src/gen was out of date with proto/: 'npx buf generate' changed it (commit the result):" >&2
  diff -r "$before/gen" sdk/src/gen | head -20 >&2
  exit 1
fi
rm -rf "$before"
# The descriptor set (reflection, the CLI's JSON, other languages) is built from the same proto/.
desc=$(mktemp --suffix=.binpb)
npx buf build --as-file-descriptor-set -o "$desc"
if ! cmp -s "$desc" proto/loraforge.binpb; then
  echo "proto/loraforge.binpb is out of date with proto/: run 'npm run generate' and commit it" >&2
  exit 1
fi
rm -f "$desc"
npx tsc -b sdk server tests examples

echo "== engine: pytest"
PYTHONPATH=engine engine/.venv/bin/python -m pytest -q engine/tests

echo "== end to end: node --test"
LORAFORGE_TEST_FIXTURES=$(mktemp -d -t loraforge-fixtures-XXXXXX)
export LORAFORGE_TEST_FIXTURES
trap 'rm -rf "$LORAFORGE_TEST_FIXTURES"' EXIT
node --test --test-concurrency=1 tests/dist/*.test.js
