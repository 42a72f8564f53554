// tca_ggml — CUDA entry points of GGML_OP_TCA_SCORE, GGML_OP_TCA_SELECT and GGML_OP_TCA_COMPACT
// (native/ggml-cuda/tca-select.cu; the ops: native/patches/0001-ggml-tca-attn-op.patch, CPU kernels:
// native/ggml-cpu/tca-select.cpp). Included through tca-attn.cuh by upstream's dispatch
// (native/patches/0003-ggml-cuda-tca-attn.patch).
#pragma once

#include "common.cuh"

// dst = ggml_tca_score(q, k, meta, n_head_kv, scale) on ctx's stream (pooled probabilities of one
// query per head over each KV head's rows: the importance used by the retention cache's selection).
void ggml_cuda_op_tca_score(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_op_tca_score_supported(int device, const ggml_tensor * dst);

// dst = ggml_tca_select(s, kpos, meta, bud, ...) (which rows each KV head keeps, on the device: block
// mass/diversity, rank, per-block top-k) and dst = ggml_tca_compact(a, sel) (rows moved in place).
void ggml_cuda_op_tca_select(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
void ggml_cuda_op_tca_compact(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_op_tca_select_supported(int device, const ggml_tensor * dst);
