#!/usr/bin/env bash
# Build the CUDA library and the patched llama-bench HERE (nvcc 13.0, sm_90a, same as the lent GPU
# machine's toolkit) and stage them, stripped, in .devbin/ (git-ignored) to carry to that machine,
# so that a device call spends no time compiling. Needs cuBLAS headers/libraries and a libcuda stub
# for linking only (the machine brings the real ones):
#   pip download nvidia-cublas (cu13) -> CUBLAS=<dir with include/ and lib/>
#   a stub libcuda.so (soname libcuda.so.1) exporting the driver symbols ggml-cuda uses -> CUDASTUB=<dir>
# First configure (once):
#   cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90a \
#     -DTCA_GGML_BUILD_TOOLS=ON -DGGML_CUDA_NCCL=OFF -DCUDA_cublas_LIBRARY=$CUBLAS/lib/libcublas.so \
#     -DCUDA_cublasLt_LIBRARY=$CUBLAS/lib/libcublasLt.so -DCUDA_cuda_driver_LIBRARY=$CUDASTUB/libcuda.so \
#     -DCMAKE_CUDA_FLAGS=-I$CUBLAS/include -DCMAKE_CXX_FLAGS=-I$CUBLAS/include
set -euo pipefail
cd "$(dirname "$0")/.."
python3 native/upstream.py prepare > /dev/null
ninja -C build/cuda -j${JOBS:-2} tca_ggml tca-llama-bench
rm -rf .devbin && mkdir -p .devbin /tmp/devbin
strip --strip-unneeded -o /tmp/devbin/libtca_ggml.so build/cuda/libtca_ggml.so
strip -o /tmp/devbin/tca-llama-bench build/cuda/tca-llama-bench
# the library is ~68 MB (CUDA kernels of every type), over the 64 MiB a device call carries: gzip
tar czf .devbin/bin.tgz -C /tmp/devbin libtca_ggml.so tca-llama-bench
(git rev-parse --short HEAD; git diff --quiet || echo "+dirty") | tr '\n' ' ' > .devbin/REV
ls -la .devbin
