#!/usr/bin/env bash
# Build the CUDA library and the patched llama-bench HERE (nvcc 13.0, sm_90a, same as the lent GPU
# machine's toolkit) and stage them, stripped, in .devbin/ (git-ignored) to carry to that machine,
# so that a device call spends no time compiling. First (once per machine): bash scripts/gpu/cuda_link_deps.sh
# (cuBLAS from its PyPI wheel and a libcuda link stub under .cache/cuda-link; configures build/cuda).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 native/upstream.py prepare > /dev/null
ninja -C build/cuda -j${JOBS:-2} tca_ggml tca_ggml_test tca-llama-bench
rm -rf .devbin && mkdir -p .devbin /tmp/devbin
strip --strip-unneeded -o /tmp/devbin/libtca_ggml.so build/cuda/libtca_ggml.so
strip --strip-unneeded -o /tmp/devbin/libtca_ggml_test.so build/cuda/libtca_ggml_test.so   # the op tests' entry points
strip -o /tmp/devbin/tca-llama-bench build/cuda/tca-llama-bench
# the library is ~68 MB (CUDA kernels of every type), over the 64 MiB a device call carries: gzip
tar czf .devbin/bin.tgz -C /tmp/devbin libtca_ggml.so libtca_ggml_test.so tca-llama-bench
(git rev-parse --short HEAD; git diff --quiet || echo "+dirty") | tr '\n' ' ' > .devbin/REV
ls -la .devbin
