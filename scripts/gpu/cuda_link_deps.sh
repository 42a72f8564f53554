#!/usr/bin/env bash
# Prepare a CUDA build HERE (a machine with nvcc but no GPU driver and no cuBLAS), for
# scripts/gpu/make_devbin.sh: cuBLAS headers + libraries from the nvidia-cublas wheel (PyPI), and a link
# stub for libcuda (soname libcuda.so.1, the driver symbols ggml-cuda's VMM pool uses; the GPU
# machine brings the real driver). Everything goes under .cache/cuda-link (git-ignored); then
# build/cuda is configured for sm_90a with the patched llama-bench. CUDA_ARCHS picks the architectures:
# unset = 90a (the lent H100/H200), "default" = no CMAKE_CUDA_ARCHITECTURES (upstream's default list),
# anything else is passed as is (e.g. "80-virtual": PTX for sm_80 only, JIT-compiled on any newer GPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
D=$PWD/.cache/cuda-link
mkdir -p "$D/stub"
if [ ! -f "$D/cublas/nvidia/cu13/lib/libcublas.so" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$D/whl" "nvidia-cublas>=13,<14"
    python3 -c "import zipfile,glob,sys; zipfile.ZipFile(glob.glob(sys.argv[1]+'/*.whl')[0]).extractall(sys.argv[1]+'/../cublas')" "$D/whl"
    ( cd "$D/cublas/nvidia/cu13/lib" && ln -sf libcublas.so.13 libcublas.so && ln -sf libcublasLt.so.13 libcublasLt.so )
    rm -rf "$D/whl"
fi
syms="cuDeviceGet cuDeviceGetAttribute cuGetErrorString cuMemAddressFree cuMemAddressReserve cuMemCreate
      cuMemGetAllocationGranularity cuMemMap cuMemRelease cuMemSetAccess cuMemUnmap"
( for f in $syms; do echo "int $f(void){return 999;}"; done ) > "$D/stub/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$D/stub/libcuda.so" "$D/stub/stub.c"
ln -sf libcuda.so "$D/stub/libcuda.so.1"
I=$D/cublas/nvidia/cu13/include L=$D/cublas/nvidia/cu13/lib
ARCHS=${CUDA_ARCHS:-90a}
arch_arg=(); [ "$ARCHS" != default ] && arch_arg=("-DCMAKE_CUDA_ARCHITECTURES=$ARCHS")
cmake -S . -B "${BUILD:-build/cuda}" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=on "${arch_arg[@]}" \
    -DTCA_GGML_BUILD_TOOLS=ON -DGGML_CUDA_NCCL=OFF -DCUDA_cublas_LIBRARY=$L/libcublas.so \
    -DCUDA_cublasLt_LIBRARY=$L/libcublasLt.so -DCUDA_cuda_driver_LIBRARY=$D/stub/libcuda.so \
    "-DCMAKE_CUDA_FLAGS=-I$I" "-DCMAKE_CXX_FLAGS=-I$I" > /dev/null
echo "configured ${BUILD:-build/cuda}; now: bash scripts/gpu/make_devbin.sh (first build ~25 min on 2 cores)"
