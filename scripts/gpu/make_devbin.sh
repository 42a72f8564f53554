#!/usr/bin/env bash
# Build the CUDA library and the patched llama-bench HERE (nvcc 13.0, sm_90a unless configured otherwise, same as the lent GPU
# machine's toolkit) and stage them, stripped, in .devbin/ (git-ignored) to carry to that machine,
# so that a device call spends no time compiling. First (once per machine): bash scripts/gpu/cuda_link_deps.sh
# (cuBLAS from its PyPI wheel and a libcuda link stub under .cache/cuda-link; configures build/cuda).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 native/upstream.py prepare > /dev/null
# BUILD: the configured build tree (default build/cuda; e.g. CUDA_ARCHS=80-virtual BUILD=build/cuda-sm80
# bash scripts/gpu/cuda_link_deps.sh for the sm_80 PTX path); BENCH=0 leaves tca-llama-bench out (tests only);
# RPC=1 adds tca-rpc-server (gpu_suite.sh's rpc1b step)
B=${BUILD:-build/cuda}
files="libtca_ggml.so libtca_ggml_test.so"
targets="tca_ggml tca_ggml_test"
if [ "${BENCH:-1}" != 0 ]; then files="$files tca-llama-bench"; targets="$targets tca-llama-bench"; fi
if [ "${RPC:-0}" != 0 ]; then files="$files tca-rpc-server"; targets="$targets tca-rpc-server"; fi
ninja -C "$B" -j${JOBS:-2} $targets
rm -rf .devbin && mkdir -p .devbin /tmp/devbin
strip --strip-unneeded -o /tmp/devbin/libtca_ggml.so "$B/libtca_ggml.so"
strip --strip-unneeded -o /tmp/devbin/libtca_ggml_test.so "$B/libtca_ggml_test.so"   # the op tests' entry points
[ "${BENCH:-1}" != 0 ] && strip -o /tmp/devbin/tca-llama-bench "$B/tca-llama-bench"
[ "${RPC:-0}" != 0 ] && strip -o /tmp/devbin/tca-rpc-server "$B/tca-rpc-server"
# the library is ~68 MB (CUDA kernels of every type), over the 64 MiB a device call carries: gzip
tar czf .devbin/bin.tgz -C /tmp/devbin $files
grep -E "^CMAKE_CUDA_ARCHITECTURES|^CMAKE_CUDA_FLAGS:" "$B/CMakeCache.txt" > .devbin/ARCHS || true
(git rev-parse --short HEAD; git diff --quiet || echo "+dirty") | tr '\n' ' ' > .devbin/REV
ls -la .devbin
