#!/usr/bin/env bash
# Compile the project's CUDA files (native/ggml-cuda/*.cu) for one architecture on a machine without a
# GPU or cuBLAS (nvcc only), and write each file's PTX and ptxas resource usage (registers, spills) per
# kernel: a compile check, and a way to tell whether a refactor changed the generated code.
#
#   bash scripts/cuda_compile_check.sh OUT_DIR [ARCH]            # ARCH default sm_90a
#   bash scripts/cuda_compile_check.sh OUT_DIR [ARCH] --compare BASE_DIR
#
# --compare diffs OUT_DIR against a BASE_DIR written the same way (e.g. from the previous commit's
# tree): names are normalised (anonymous-namespace hashes), comments dropped. Identical PTX means the
# kernels are the same code; a change still has to be run on a GPU (scripts/gpu/gpu_suite.sh test e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: cuda_compile_check.sh OUT_DIR [ARCH] [--compare BASE_DIR]}; arch=${2:-sm_90a}
base=; [ "${3:-}" = --compare ] && base=${4:?--compare needs BASE_DIR}
src=$(python3 native/upstream.py prepare)
stub=$(mktemp -d); trap 'rm -rf "$stub"' EXIT
# ggml-cuda/common.cuh names a few cuBLAS types and calls; declarations are enough to compile
cat > "$stub/cublas_v2.h" <<'H'
#pragma once
typedef struct cublasContext * cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TF32_TENSOR_OP_MATH = 3 } cublasMath_t;
typedef int cublasComputeType_t;
static inline const char * cublasGetStatusString(cublasStatus_t) { return ""; }
static inline cublasStatus_t cublasCreate(cublasHandle_t *) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetWorkspace(cublasHandle_t, void *, size_t) { return CUBLAS_STATUS_SUCCESS; }
H
# the include directories of CMakeLists.txt's ggml-cuda block
inc=(-I "$stub" -I native/ggml-cuda -I native/common -I native/include -I "$src/ggml/include" -I "$src/ggml/src"
     -I "$src/ggml/src/ggml-cuda")
mkdir -p "$out"
norm() { sed -E 's/_GLOBAL__N__[0-9a-f]+_[0-9]+_[A-Za-z0-9_]+_cu_[0-9a-f]+/ANON/g; s/ANON_[0-9]+/ANON/g;
                 s/_ZN[0-9]+ANON/_ZNANON/g; s/_ZZN[0-9]+ANON/_ZZNANON/g' "$1" | grep -v '^//'; }
rc=0
for f in native/ggml-cuda/*.cu; do
    b=$(basename "$f")
    nvcc -std=c++17 -arch="$arch" -O3 -DGGML_USE_CUDA -DNDEBUG "${inc[@]}" -ptx "$f" -o "$out/$b.ptx"
    nvcc -std=c++17 -arch="$arch" -O3 -DGGML_USE_CUDA -DNDEBUG "${inc[@]}" -c "$f" -o "$stub/$b.o" -Xptxas -v 2>&1 |
        grep -E "Compiling entry|registers|spill" | paste - - - > "$out/$b.res"
    echo "$b: $(wc -l < "$out/$b.res") kernels"
    if [ -n "$base" ]; then
        if diff -q <(norm "$base/$b.ptx") <(norm "$out/$b.ptx") > /dev/null; then echo "  PTX identical to $base"
        else rc=1; echo "  PTX differs; resources:"; diff <(norm "$base/$b.res") <(norm "$out/$b.res") | grep '^[<>]' | head -20 || true; fi
    fi
done
exit $rc
