#!/usr/bin/env bash
# Fetches the contract's dependencies into .proto-deps/ (git-ignored), pinned by version and sha256:
#   buf/validate/validate.proto  protovalidate's rules (from its Java artifact on Maven Central)
#   google/api, google/rpc       field_behavior, status, error_details (googleapis-common-protos, PyPI)
#   bin/protoc                   protoc 36.2 for the Python code (matches the engine's protobuf 7.36.2)
# The Buf Schema Registry is not reachable from every machine we build on; these registries are.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=.proto-deps
stamp="$deps/.complete-1"
[ -f "$stamp" ] && exit 0

cache=${LORAFORGE_CACHE:-$HOME/.cache/loraforge}/downloads
mkdir -p "$cache"
fetch() { # url sha256 file
  local out="$cache/$3"
  if [ ! -f "$out" ] || ! echo "$2  $out" | sha256sum -c --quiet - 2>/dev/null; then
    curl -fsSL --retry 3 -o "$out.part" "$1"
    echo "$2  $out.part" | sha256sum -c --quiet -
    mv "$out.part" "$out"
  fi
  printf '%s' "$out"
}
maven=https://repo1.maven.org/maven2
jar=$(fetch "$maven/build/buf/protovalidate/1.3.0/protovalidate-1.3.0.jar" \
  fc65013a322d9b390759670b454c05f94579c49a40dff872143dfba831ebbdc2 protovalidate-1.3.0.jar)
protoc=$(fetch "$maven/com/google/protobuf/protoc/4.36.2/protoc-4.36.2-linux-x86_64.exe" \
  f6ee22d65361338459208da8bff801c9ca689741cba9187b34990dd45198f864 protoc-36.2-linux-x86_64)
wheel=googleapis_common_protos-1.76.0-py3-none-any.whl
if [ ! -f "$cache/$wheel" ]; then
  python3 -m pip download -q --no-deps --dest "$cache" googleapis-common-protos==1.76.0
fi
echo "59e13344a9f3651aa201a03e2bee815a3bf43a4baf1f9ff8a9b62a840ce25fac  $cache/$wheel" | sha256sum -c --quiet -

rm -rf "$deps"
mkdir -p "$deps/protovalidate" "$deps/googleapis" "$deps/bin"
python3 - "$jar" "$cache/$wheel" "$deps" <<'PY'
import sys, zipfile
jar, wheel, deps = sys.argv[1:]
zipfile.ZipFile(jar).extract("buf/validate/validate.proto", f"{deps}/protovalidate")
with zipfile.ZipFile(wheel) as z:
    for name in ("google/api/field_behavior.proto", "google/rpc/status.proto", "google/rpc/error_details.proto"):
        z.extract(name, f"{deps}/googleapis")
PY
install -m 0755 "$protoc" "$deps/bin/protoc"
touch "$stamp"
