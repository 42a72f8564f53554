// tca_ggml — helpers shared by the CPU kernels of the TCA ops: tca-attn.cpp (GGML_OP_TCA_ATTN) and
// tca-select.cpp (GGML_OP_TCA_SCORE, GGML_OP_TCA_SELECT, GGML_OP_TCA_COMPACT). Internal to
// native/ggml-cpu: each translation unit that includes it gets its own copy (anonymous namespace).
#pragma once

#include "ggml-cpu.h"
#include "ggml.h"

#include <cstdint>
#include <cstring>

namespace {

// n values of type `type` -> f32
void tca_to_f32(ggml_type type, const void * src, float * dst, int64_t n) {
    switch (type) {
        case GGML_TYPE_F32:  memcpy(dst, src, n*sizeof(float)); break;
        case GGML_TYPE_F16:  ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, dst, n); break;
        case GGML_TYPE_BF16: ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, dst, n); break;
        default:             ggml_get_type_traits(type)->to_float(src, dst, n); break;
    }
}

// meta's (offset, length) pairs, one per KV head, inside [0, n_slots)
bool tca_head_ranges_ok(const int32_t * hm, int64_t n_head_kv, int64_t n_slots) {
    for (int64_t g = 0; g < n_head_kv; ++g) {
        if (hm[2*g] < 0 || hm[2*g + 1] < 0 || (int64_t) hm[2*g] + hm[2*g + 1] > n_slots) {
            return false;
        }
    }
    return true;
}

} // namespace
