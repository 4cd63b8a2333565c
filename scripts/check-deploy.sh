#!/usr/bin/env bash
# Checks deploy/ with the tools operators' pipelines use: every Kubernetes manifest against the
# Kubernetes schemas (strict: unknown fields fail), every Dockerfile with hadolint, and, where a Docker
# daemon answers, a real build of each image. The tools live in a venv outside the clone, keyed by
# deploy/check-requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
hash=$(sha256sum deploy/check-requirements.txt | cut -c1-12)
venv=${LORAFORGE_CACHE:-$HOME/.cache/loraforge}/deploycheck-$hash
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -r deploy/check-requirements.txt
  touch "$venv/.complete"
fi
k8s_version=${LORAFORGE_K8S_VERSION:-1.37.0}
"$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s_version" deploy/k8s/*.yaml
echo "deploy/k8s: every manifest valid against the Kubernetes $k8s_version schemas (strict)"
"$venv/bin/hadolint" deploy/docker/Dockerfile*
echo "deploy/docker: hadolint clean"
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  docker build -q -f deploy/docker/Dockerfile -t loraforge:check .
  docker build -q -f deploy/docker/Dockerfile.gpu -t loraforge-worker-gpu:check .
  echo "deploy/docker: both images built"
else
  echo "deploy/docker: no Docker daemon here, images not built (linted only)"
fi
