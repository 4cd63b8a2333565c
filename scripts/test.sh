#!/usr/bin/env bash
# All of loraforge's tests: contracts (lint + generated code up to date), the engine
# (pytest), and the end-to-end suites (node:test against real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== contracts: buf lint, no breaking change, generated code and descriptor set up to date"
bash scripts/proto-deps.sh
npx buf lint
# loraforge.v1 only grows compatibly: compare with the previous commit once it is at or after the
# commit named in proto/BREAKING_SINCE (where the v1 contract was settled).
since=$(cat proto/BREAKING_SINCE)
prev=$(git rev-parse --verify -q HEAD~1 || true)
if [ -n "$prev" ] && git merge-base --is-ancestor "$since" "$prev" 2>/dev/null; then
  against=$(mktemp -d)
  git archive "$prev" proto buf.yaml | tar -x -C "$against"
  cp -r .proto-deps "$against/"
  npx buf breaking --against "$against"
  echo "buf breaking: loraforge.v1 is compatible with $(git rev-parse --short "$prev")"
  rm -rf "$against"
else
  echo "(buf breaking: the previous commit predates proto/BREAKING_SINCE; nothing to compare)"
fi
# Generated code must match proto/: regenerate into the tree and look for any difference.
before=$(mktemp -d)
cp -r sdk/src/gen "$before/ts"
cp -r engine/gen "$before/py"
npx buf generate
npx buf generate --template buf.gen.python.yaml
for pair in "ts:sdk/src/gen" "py:engine/gen"; do
  if ! diff -r -x __pycache__ "$before/${pair%%:*}" "${pair#*:}" >/dev/null; then
    echo "${pair#*:} was out of date with proto/: 'npm run generate' changed it (commit the result):" >&2
    diff -r -x __pycache__ "$before/${pair%%:*}" "${pair#*:}" | head -20 >&2
    exit 1
  fi
done
rm -rf "$before"
# The descriptor set (reflection, validation, the CLI's JSON, other languages) is built from the same proto/.
desc=$(mktemp --suffix=.binpb)
npx buf build --as-file-descriptor-set -o "$desc"
if ! cmp -s "$desc" proto/loraforge.binpb; then
  echo "proto/loraforge.binpb is out of date with proto/: run 'npm run generate' and commit it" >&2
  exit 1
fi
rm -f "$desc"
npx tsc -b sdk server tests examples

echo "== unit: node --test"
node --test tests/dist/unit/

echo "== deploy: manifests against the Kubernetes schemas, Dockerfiles linted"
bash scripts/check-deploy.sh

# The engine's tests keep the CPU busy while the end-to-end tests spend much of their time waiting on
# servers, NATS and child processes (about half of two cores): the two suites run side by side, the
# engine's output kept in a file and shown once it ends. Either one failing fails the run.
echo "== engine (pytest) and end to end (node --test), side by side"
work=$(mktemp -d -t loraforge-test-XXXXXX)
LORAFORGE_TEST_FIXTURES="$work/fixtures"
mkdir -p "$LORAFORGE_TEST_FIXTURES"
export LORAFORGE_TEST_FIXTURES
engine_pid=""
trap '[ -n "$engine_pid" ] && kill "$engine_pid" 2>/dev/null; rm -rf "$work"' EXIT
(PYTHONPATH=engine engine/.venv/bin/python -m pytest -q engine/tests >"$work/engine.log" 2>&1) &
engine_pid=$!
e2e=0
node --test --test-concurrency=1 tests/dist/*.test.js || e2e=$?
engine=0
wait "$engine_pid" || engine=$?
engine_pid=""
echo "== engine: pytest (ran beside the end-to-end tests)"
cat "$work/engine.log"
if [ "$e2e" -ne 0 ] || [ "$engine" -ne 0 ]; then
  echo "failed: end to end exit $e2e, engine exit $engine" >&2
  exit 1
fi
