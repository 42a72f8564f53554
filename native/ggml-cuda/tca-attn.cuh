// tca_ggml — CUDA kernels of GGML_OP_TCA_ATTN (the op: native/patches/0001-ggml-tca-attn-op.patch,
// CPU kernel: native/ggml-cpu/tca-attn.cpp). Compiled into upstream's ggml-cuda target by the
// top-level CMakeLists.txt; native/patches/0003-ggml-cuda-tca-attn.patch dispatches to it.
#pragma once

#include "common.cuh"

// dst = ggml_tca_attn(q, k, v, kpos, meta, qpos, n_head_kv, scale) on ctx's stream.
void ggml_cuda_op_tca_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// true iff the kernels implement this node exactly (types, head size, layout, shared memory of
// `device`); anything else stays on the CPU backend.
bool ggml_cuda_op_tca_attn_supported(int device, const ggml_tensor * dst);

// dst = ggml_tca_score(q, k, meta, n_head_kv, scale) on ctx's stream (pooled probabilities of one
// query per head over each KV head's rows: the importance used by the retention cache's selection).
void ggml_cuda_op_tca_score(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_op_tca_score_supported(int device, const ggml_tensor * dst);

// dst = ggml_tca_select(s, kpos, meta, bud, ...) (which rows each KV head keeps, on the device: block
// mass/diversity, rank, per-block top-k) and dst = ggml_tca_compact(a, sel) (rows moved in place).
void ggml_cuda_op_tca_select(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
void ggml_cuda_op_tca_compact(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_op_tca_select_supported(int device, const ggml_tensor * dst);
