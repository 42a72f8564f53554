#!/usr/bin/env bash
# Pack the prepared (pinned + patched) upstream tree, trimmed to what the build needs, into
# .devcarry/upstream.tgz (~5 MB) for machines without network (the lent GPU machine): there,
#   mkdir -p /tmp/up && tar xzf .devcarry/upstream.tgz -C /tmp/up
#   cmake -S . -B build/cuda -DTCA_UPSTREAM_DIR=/tmp/up -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90a
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$(python3 native/upstream.py prepare)
tmp=$(mktemp -d)
mkdir -p "$tmp/examples" .devcarry
# common/ and tools/ are for -DTCA_GGML_BUILD_TOOLS=ON (the patched llama-bench); tools/ui is the
# server's web page, not needed by the build of llama-bench
( cd "$src" && cp -r CMakeLists.txt cmake ggml src include vendor licenses LICENSE common tools .tca_ggml_stamp "$tmp/" && \
  cp -r examples/simple "$tmp/examples/" )
tar czf .devcarry/upstream.tgz -C "$tmp" .
rm -rf "$tmp"
# the lent machine's python 3.12 has numpy and pytest but no cffi / gguf
mkdir -p .devcarry/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .devcarry/wheels cffi pycparser \
    gguf==0.19.0 pyyaml tqdm requests urllib3 idna certifi charset-normalizer || true
ls -la .devcarry/upstream.tgz .devcarry/wheels
