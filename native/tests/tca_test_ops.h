// tca_ggml — test and benchmark entry points of the TCA graph ops (test-backend-ops style).
//
// Built into libtca_ggml_test.so (linked against libtca_ggml.so; CMake option
// TCA_GGML_BUILD_TESTS, on by default), never into the production library. Used by
// tests/test_op_tca_*.py, tests/test_tca_cuda_e2e.py (through tests/_native_test.py, whose cffi
// declarations are read from this header) and native/bench_tca_attn.py.
//
// Every argument is validated so that bad input returns an error code instead of reaching a
// GGML_ASSERT. Array layouts (C order, ggml's memory order):
//   q    [n_head][n_tokens][d]     (ggml tensor [d, n_tokens, n_head])
//   k, v [n_slots][d]              f32 here; stored in the graph as kv_type (0 f32, 1 f16, 8 q8_0)
//   kpos [n_slots], qpos [n_tokens], meta [2*n_head_kv] (head_off, head_len pairs)
//   out  [n_tokens][n_head][d]     (ggml tensor [d, n_head, n_tokens])
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TCA_TEST_API __attribute__((visibility("default")))

enum tca_test_status {
    TCA_TEST_OK         =  0,
    TCA_TEST_E_NULL     = -1,  // a required pointer is NULL
    TCA_TEST_E_SHAPE    = -2,  // a size is out of range or inconsistent
    TCA_TEST_E_TYPE     = -3,  // kv_type unsupported (or d not a multiple of its block size)
    TCA_TEST_E_META     = -4,  // a head range lies outside [0, n_slots)
    TCA_TEST_E_SCALE    = -5,  // scale not finite
    TCA_TEST_E_ALLOC    = -6,  // ggml context / backend could not be created
    TCA_TEST_E_COMPUTE  = -7,  // graph compute failed
    TCA_TEST_E_BACKEND  = -10, // no backend of that name in this build / on this machine
    TCA_TEST_E_UNSUPP   = -11  // the backend does not support this node (supports_op)
};

// Rows of d floats stored as kv_type and read back as f32 (what the op sees).
TCA_TEST_API int tca_test_tca_attn_dequant(int kv_type, int d, int n_rows, const float * src, float * dst);

// GGML_OP_TCA_ATTN through a graph on the CPU backend; out is poisoned with NaN first.
TCA_TEST_API int tca_test_tca_attn(int d, int n_head, int n_head_kv, int n_tokens, int n_slots, int kv_type,
                                   const float * q, const float * k, const float * v, const int32_t * kpos,
                                   const int32_t * meta, const int32_t * qpos, float scale, int n_threads,
                                   float * out);

// Benchmark: seconds per graph compute (best of reps, after one warm-up), random data,
// every KV head holding n_kv rows and every query seeing all of them. cpu_time != 0
// measures the process CPU time instead of wall time (meaningful with n_threads = 1 on a
// loaded machine: idle or spinning workers would count otherwise).
//   which = 0: ggml_tca_attn (k/v [d, n_head_kv*n_kv] of kv_type)
//   which = 1: upstream ggml_flash_attn_ext on the same shapes (k/v [d, n_kv, n_head_kv],
//              an all-zero f16 mask [n_kv, n_tokens])
// Returns a negative value on bad arguments or failure.
TCA_TEST_API double tca_test_bench_attn(int which, int d, int n_head, int n_head_kv, int n_tokens, int n_kv,
                                        int kv_type, int n_threads, int reps, int cpu_time);

// tca_test_tca_attn on a named backend ("CPU", "CUDA0", ...): inputs uploaded to a buffer of that
// backend. Errors as tca_test_tca_attn, plus TCA_TEST_E_BACKEND and TCA_TEST_E_UNSUPP. n_threads
// only matters for CPU backends. kpos_f32 != 0: kpos is given to the op as f32 (the retention
// cache's layout), same values.
TCA_TEST_API int tca_test_tca_attn_backend_ex(const char * backend, int d, int n_head, int n_head_kv, int n_tokens,
                                              int n_slots, int kv_type, const float * q, const float * k,
                                              const float * v, const int32_t * kpos, const int32_t * meta,
                                              const int32_t * qpos, float scale, int n_threads, int kpos_f32,
                                              float * out);
TCA_TEST_API int tca_test_tca_attn_backend(const char * backend, int d, int n_head, int n_head_kv, int n_tokens,
                                           int n_slots, int kv_type, const float * q, const float * k,
                                           const float * v, const int32_t * kpos, const int32_t * meta,
                                           const int32_t * qpos, float scale, int n_threads, float * out);

// GGML_OP_TCA_SCORE on a named backend. q [n_head][d] (one query per head), k [n_slots][d] f32
// stored as kv_type, meta [2*n_head_kv]; out [n_slots] (poisoned with NaN first).
TCA_TEST_API int tca_test_tca_score_backend(const char * backend, int d, int n_head, int n_head_kv, int n_slots,
                                            int kv_type, const float * q, const float * k, const int32_t * meta,
                                            float scale, int n_threads, float * out);

// Benchmark on a named backend: seconds per op (best of reps graph computes, after one warm-up,
// each graph holding n_ops independent copies of the op on the same inputs, so that launch and
// synchronisation costs are amortised; the inputs stay resident, i.e. partly in the GPU's L2
// for small K/V). Shapes and data as tca_test_bench_attn:
//   which = 0: ggml_tca_attn, which = 1: ggml_flash_attn_ext (k/v [d, n_kv, n_head_kv], zero f16 mask).
// Returns -10 (no backend), -11 (unsupported), other negatives on bad arguments or failure.
TCA_TEST_API double tca_test_bench_attn_backend(const char * backend, int which, int d, int n_head, int n_head_kv,
                                                int n_tokens, int n_kv, int kv_type, int n_threads, int reps,
                                                int n_ops);

// GGML_OP_TCA_SELECT on a named backend. s [n_slots] f32, kpos [n_slots] (integer positions,
// ascending within each head, |pos| < 2^24), meta [2*n_head_kv], bud [n_head_kv][n_bud] with
// n_bud = 2*n_k+1 (p_desc, k_desc, kt); out [n_slots + 4*n_head_kv] (poisoned first).
TCA_TEST_API int tca_test_tca_select_backend(const char * backend, int n_slots, int n_head_kv, const float * s,
                                             const int32_t * kpos, const int32_t * meta, const float * bud, int n_bud,
                                             int block, int n_sink, int F, int f0, float alpha, int radius,
                                             int n_threads, int32_t * out);

// GGML_OP_TCA_COMPACT on a named backend: rows [n_slots][width] f32 moved in place by sel
// [n_slots + 4*n_head_kv] (as ggml_tca_select writes it; checked here: every kept slot's source
// lies at or after it, inside its head, strictly increasing); rows_out [n_slots][width].
TCA_TEST_API int tca_test_tca_compact_backend(const char * backend, int n_slots, int n_head_kv, int width,
                                              const float * rows, const int32_t * sel, int n_threads, float * rows_out);

#ifdef __cplusplus
}
#endif
