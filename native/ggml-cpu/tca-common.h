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

} // namespace
