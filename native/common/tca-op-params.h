// tca_ggml — host-side reading of the TCA ops' operands and parameters, shared by the CPU kernels
// (native/ggml-cpu) and the CUDA dispatch (native/ggml-cuda): one place for the operand order, the
// op_params layout and the shape contract of GGML_OP_TCA_ATTN and GGML_OP_TCA_SELECT
// (constructors: native/patches/0001-ggml-tca-attn-op.patch). Host code only (no CUDA).
#pragma once

#include "ggml.h"
#include "ggml-impl.h"

#include <cstdint>

// GGML_OP_TCA_ATTN: operands (src[0..5]) and parameters (op_params: n_head_kv, scale). Fields in
// this order, so that a structured binding names them all:
//     const auto [q, k, v, kpos, meta, qpos, d, T, n_head, n_slots, n_head_kv, scale] = tca_attn_op_get(dst);
struct tca_attn_op {
    const ggml_tensor * q;     // [d, T, n_head] f32
    const ggml_tensor * k;     // [d, n_slots]
    const ggml_tensor * v;     // [d, n_slots]
    const ggml_tensor * kpos;  // [n_slots] i32, or f32 holding integer positions
    const ggml_tensor * meta;  // [2*n_head_kv] i32: (offset, length) of each KV head's rows
    const ggml_tensor * qpos;  // [T] i32
    int64_t d;
    int64_t T;
    int64_t n_head;
    int64_t n_slots;
    int64_t n_head_kv;
    float   scale;
};

// the operands must be there (src[0..5] non-null)
static inline tca_attn_op tca_attn_op_get(const ggml_tensor * op) {
    tca_attn_op a;
    a.q         = op->src[0];
    a.k         = op->src[1];
    a.v         = op->src[2];
    a.kpos      = op->src[3];
    a.meta      = op->src[4];
    a.qpos      = op->src[5];
    a.d         = a.q->ne[0];
    a.T         = a.q->ne[1];
    a.n_head    = a.q->ne[2];
    a.n_slots   = a.k->ne[1];
    a.n_head_kv = ggml_get_op_params_i32(op, 0);
    a.scale     = ggml_get_op_params_f32(op, 1);
    return a;
}

// the shape contract of GGML_OP_TCA_ATTN (op: the node, dst [d, n_head, T])
static inline bool tca_attn_op_shapes_ok(const tca_attn_op & a, const ggml_tensor * op) {
    return a.k->ne[0] == a.d && a.v->ne[0] == a.d && a.v->ne[1] == a.n_slots &&
           op->ne[0] == a.d && op->ne[1] == a.n_head && op->ne[2] == a.T &&
           a.n_head_kv > 0 && a.n_head % a.n_head_kv == 0 &&
           ggml_nelements(a.kpos) == a.n_slots && ggml_nelements(a.meta) == 2*a.n_head_kv &&
           ggml_nelements(a.qpos) == a.T;
}

// GGML_OP_TCA_SELECT: op_params (H = n_head_kv, block, n_sink, F, f0, alpha, radius) and the number
// of (p, k) pairs of the budget table (src[3]: [2*n_k + 1, H])
struct tca_select_params {
    int32_t H;
    int32_t block;
    int32_t n_sink;
    int32_t F;
    int32_t f0;
    int32_t radius;
    int32_t n_k;
    double  alpha;
};

static inline tca_select_params tca_select_params_get(const ggml_tensor * op) {
    tca_select_params p;
    p.H      = ggml_get_op_params_i32(op, 0);
    p.block  = ggml_get_op_params_i32(op, 1);
    p.n_sink = ggml_get_op_params_i32(op, 2);
    p.F      = ggml_get_op_params_i32(op, 3);
    p.f0     = ggml_get_op_params_i32(op, 4);
    p.alpha  = (double) ggml_get_op_params_f32(op, 5);
    p.radius = ggml_get_op_params_i32(op, 6);
    p.n_k    = (int32_t) (op->src[3]->ne[0] - 1)/2;
    return p;
}
