// tca_ggml — CUDA entry points of the TCA ops (the ops: native/patches/0001-ggml-tca-attn-op.patch,
// CPU kernels: native/ggml-cpu/). Compiled into upstream's ggml-cuda target by the top-level
// CMakeLists.txt; native/patches/0003-ggml-cuda-tca-attn.patch includes this header and dispatches
// to them. GGML_OP_TCA_ATTN: tca-attn.cu (kernels in tca-attn-*.cuh); GGML_OP_TCA_SCORE /
// TCA_SELECT / TCA_COMPACT: tca-select.cu (declared in tca-select.cuh, included below).
// CUDA only: CMakeLists.txt adds these files to ggml-cuda (GGML_CUDA); a HIP or MUSA build of
// upstream does not compile them and is not supported with TCA.
#pragma once

#include "common.cuh"
#include "tca-select.cuh"

// dst = ggml_tca_attn(q, k, v, kpos, meta, qpos, n_head_kv, scale) on ctx's stream.
void ggml_cuda_op_tca_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// true iff the kernels implement this node exactly (types, head size, layout, shared memory of
// `device`); anything else stays on the CPU backend.
bool ggml_cuda_op_tca_attn_supported(int device, const ggml_tensor * dst);
