// tca_ggml — test and benchmark entry points of the TCA graph ops: the implementation of
// native/tests/tca_test_ops.h (declarations, array layouts, error codes), built into
// libtca_ggml_test.so, never into libtca_ggml.so.
#include "tca_test_ops.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-alloc.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <limits>
#include <random>
#include <vector>

static bool tca_test_type_ok(int kv_type, int64_t d) {
    switch (kv_type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
            return true;
        case GGML_TYPE_Q8_0:
            return d % ggml_blck_size(GGML_TYPE_Q8_0) == 0;
        default:
            return false;
    }
}

// store n_rows rows of d floats as kv_type into dst (ggml_row_size(type, d) bytes a row)
static void tca_test_store_rows(ggml_type type, const float * src, void * dst, int64_t d, int64_t n_rows) {
    if (n_rows == 0) {
        return;
    }
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, (size_t) (d*n_rows)*sizeof(float));
    } else if (type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(src, (ggml_fp16_t *) dst, d*n_rows);
    } else {
        ggml_quantize_chunk(type, src, dst, 0, n_rows, d, nullptr);
    }
}

TCA_TEST_API int tca_test_tca_attn_dequant(int kv_type, int d, int n_rows, const float * src, float * dst) {
    if (d <= 0 || n_rows < 0 || (int64_t) d*n_rows > (int64_t(1) << 32)) return TCA_TEST_E_SHAPE;
    if (!tca_test_type_ok(kv_type, d)) return TCA_TEST_E_TYPE;
    if (n_rows == 0) return TCA_TEST_OK;
    if (!src || !dst) return TCA_TEST_E_NULL;
    const ggml_type type = (ggml_type) kv_type;
    std::vector<uint8_t> buf(ggml_row_size(type, d)*(size_t) n_rows);
    tca_test_store_rows(type, src, buf.data(), d, n_rows);
    if (type == GGML_TYPE_F32) {
        memcpy(dst, buf.data(), buf.size());
    } else {
        ggml_get_type_traits(type)->to_float(buf.data(), dst, (int64_t) d*n_rows);
    }
    return TCA_TEST_OK;
}

namespace {

struct tca_test_graph {
    ggml_context * ctx = nullptr;
    ggml_cgraph  * gf  = nullptr;
    ggml_tensor  * out = nullptr;
    ~tca_test_graph() { if (ctx) ggml_free(ctx); }
};

int tca_test_check(int d, int n_head, int n_head_kv, int n_tokens, int n_slots, int kv_type,
                   const float * q, const float * k, const float * v, const int32_t * kpos,
                   const int32_t * meta, const int32_t * qpos, float scale, int n_threads) {
    if (d <= 0 || d > 4096 || n_head <= 0 || n_head > 4096 || n_head_kv <= 0 || n_head % n_head_kv != 0 ||
        n_tokens <= 0 || n_tokens > (1 << 20) || n_slots < 0 || n_slots > (1 << 26) ||
        n_threads <= 0 || n_threads > 512) {
        return TCA_TEST_E_SHAPE;
    }
    if ((int64_t) d*n_head*n_tokens > (int64_t(1) << 32) || (int64_t) d*n_slots > (int64_t(1) << 32)) {
        return TCA_TEST_E_SHAPE;
    }
    if (!tca_test_type_ok(kv_type, d)) return TCA_TEST_E_TYPE;
    if (!std::isfinite(scale)) return TCA_TEST_E_SCALE;
    if (!q || !meta || !qpos) return TCA_TEST_E_NULL;
    if (n_slots > 0 && (!k || !v || !kpos)) return TCA_TEST_E_NULL;
    for (int g = 0; g < n_head_kv; ++g) {
        const int64_t off = meta[2*g], len = meta[2*g + 1];
        if (off < 0 || len < 0 || off + len > n_slots) return TCA_TEST_E_META;
    }
    return TCA_TEST_OK;
}

// builds q/k/v/kpos/meta/qpos and the op; the inputs are filled from the arrays
int tca_test_build(tca_test_graph & G, int d, int n_head, int n_head_kv, int n_tokens, int n_slots, int kv_type,
                   const float * q, const float * k, const float * v, const int32_t * kpos,
                   const int32_t * meta, const int32_t * qpos, float scale) {
    const ggml_type type = (ggml_type) kv_type;
    const size_t bytes = sizeof(float)*(size_t) d*n_head*n_tokens*2        // q, out
                       + 2*ggml_row_size(type, d)*(size_t) n_slots           // k, v
                       + sizeof(int32_t)*((size_t) n_slots + 2*n_head_kv + n_tokens)
                       + 16*ggml_tensor_overhead() + ggml_graph_overhead() + 64*1024;
    ggml_init_params ip = { bytes, nullptr, false };
    G.ctx = ggml_init(ip);
    if (!G.ctx) return TCA_TEST_E_ALLOC;

    ggml_tensor * tq  = ggml_new_tensor_3d(G.ctx, GGML_TYPE_F32, d, n_tokens, n_head);
    ggml_tensor * tk  = ggml_new_tensor_2d(G.ctx, type, d, n_slots);
    ggml_tensor * tv  = ggml_new_tensor_2d(G.ctx, type, d, n_slots);
    ggml_tensor * tkp = ggml_new_tensor_1d(G.ctx, GGML_TYPE_I32, n_slots);
    ggml_tensor * tm  = ggml_new_tensor_1d(G.ctx, GGML_TYPE_I32, 2*n_head_kv);
    ggml_tensor * tqp = ggml_new_tensor_1d(G.ctx, GGML_TYPE_I32, n_tokens);
    if (!tq || !tk || !tv || !tkp || !tm || !tqp) return TCA_TEST_E_ALLOC;

    if (q) memcpy(tq->data, q, ggml_nbytes(tq));
    if (k) tca_test_store_rows(type, k, tk->data, d, n_slots);
    if (v) tca_test_store_rows(type, v, tv->data, d, n_slots);
    if (kpos && n_slots > 0) memcpy(tkp->data, kpos, ggml_nbytes(tkp));
    memcpy(tm->data, meta, ggml_nbytes(tm));
    if (qpos) memcpy(tqp->data, qpos, ggml_nbytes(tqp));

    G.out = ggml_tca_attn(G.ctx, tq, tk, tv, tkp, tm, tqp, n_head_kv, scale);
    G.gf  = ggml_new_graph(G.ctx);
    ggml_build_forward_expand(G.gf, G.out);
    return TCA_TEST_OK;
}

} // namespace

TCA_TEST_API int tca_test_tca_attn(int d, int n_head, int n_head_kv, int n_tokens, int n_slots, int kv_type,
                                   const float * q, const float * k, const float * v, const int32_t * kpos,
                                   const int32_t * meta, const int32_t * qpos, float scale, int n_threads,
                                   float * out) {
    int rc = tca_test_check(d, n_head, n_head_kv, n_tokens, n_slots, kv_type, q, k, v, kpos, meta, qpos, scale, n_threads);
    if (rc != TCA_TEST_OK) return rc;
    if (!out) return TCA_TEST_E_NULL;

    tca_test_graph G;
    rc = tca_test_build(G, d, n_head, n_head_kv, n_tokens, n_slots, kv_type, q, k, v, kpos, meta, qpos, scale);
    if (rc != TCA_TEST_OK) return rc;

    // poison the result: every element the op fails to write stays NaN
    const float nan = std::numeric_limits<float>::quiet_NaN();
    float * o = (float *) G.out->data;
    for (int64_t i = 0, n = ggml_nelements(G.out); i < n; ++i) o[i] = nan;

    ggml_backend_t be = ggml_backend_cpu_init();
    if (!be) return TCA_TEST_E_ALLOC;
    ggml_backend_cpu_set_n_threads(be, n_threads);
    const ggml_status st = ggml_backend_graph_compute(be, G.gf);
    ggml_backend_free(be);
    if (st != GGML_STATUS_SUCCESS) return TCA_TEST_E_COMPUTE;

    memcpy(out, G.out->data, ggml_nbytes(G.out));
    return TCA_TEST_OK;
}

namespace {

// The benchmarks' data: every KV head holds n_kv rows (positions 0 .. n_kv-1), token t is at
// position n_kv + t (every query sees every row), Q, K, V ~ N(0, 1) from a fixed seed. False when
// tca_test_check rejects the shapes.
struct tca_bench_data {
    std::vector<int32_t> meta, qpos, kpos;
    std::vector<float>   Q, K, V;
    float                scale;
};

bool tca_bench_make(tca_bench_data & B, int d, int n_head, int n_head_kv, int n_tokens, int n_kv, int kv_type,
                    int n_threads) {
    const int n_slots = n_kv*n_head_kv;
    B.meta.assign(2*(size_t) n_head_kv, 0);
    B.qpos.assign(n_tokens, 0);
    B.kpos.assign(n_slots, 0);
    for (int g = 0; g < n_head_kv; ++g) { B.meta[2*g] = g*n_kv; B.meta[2*g + 1] = n_kv; }
    for (int j = 0; j < n_slots; ++j) B.kpos[j] = j % n_kv;
    for (int t = 0; t < n_tokens; ++t) B.qpos[t] = n_kv + t;
    B.scale = 1.0f/std::sqrt((float) d);
    std::mt19937 rng(42);
    std::normal_distribution<float> N(0.f, 1.f);
    B.Q.resize((size_t) d*n_head*n_tokens);
    B.K.resize((size_t) d*n_slots);
    B.V.resize((size_t) d*n_slots);
    for (auto & x : B.Q) x = N(rng);
    for (auto & x : B.K) x = N(rng);
    for (auto & x : B.V) x = N(rng);
    return tca_test_check(d, n_head, n_head_kv, n_tokens, n_slots, kv_type, B.Q.data(), B.K.data(), B.V.data(),
                          B.kpos.data(), B.meta.data(), B.qpos.data(), B.scale, n_threads) == TCA_TEST_OK;
}

} // namespace

// Benchmark: seconds per graph compute (best of reps, after one warm-up), random data,
// every KV head holding n_kv rows and every query seeing all of them. cpu_time != 0
// measures the process CPU time instead of wall time (meaningful with n_threads = 1 on a
// loaded machine: idle or spinning workers would count otherwise).
//   which = 0: ggml_tca_attn (k/v [d, n_head_kv*n_kv] of kv_type)
//   which = 1: upstream ggml_flash_attn_ext on the same shapes (k/v [d, n_kv, n_head_kv],
//              an all-zero f16 mask [n_kv, n_tokens])
// Returns a negative value on bad arguments or failure.
TCA_TEST_API double tca_test_bench_attn(int which, int d, int n_head, int n_head_kv, int n_tokens, int n_kv,
                                        int kv_type, int n_threads, int reps, int cpu_time) {
    if (which < 0 || which > 1 || reps <= 0 || n_kv <= 0 || n_head_kv <= 0 || (int64_t) n_kv*n_head_kv > (1 << 26)) return -2.0;
    const int n_slots = n_kv*n_head_kv;
    if (d <= 0 || d > 4096 || n_head <= 0 || n_head > 4096 || n_tokens <= 0 || n_tokens > (1 << 20)) return -2.0;
    tca_bench_data data;
    if (!tca_bench_make(data, d, n_head, n_head_kv, n_tokens, n_kv, kv_type, n_threads)) return -2.0;
    const auto & [meta, qpos, kpos, Q, K, V, scale] = data;

    tca_test_graph G;
    if (which == 0) {
        if (tca_test_build(G, d, n_head, n_head_kv, n_tokens, n_slots, kv_type, Q.data(), K.data(), V.data(),
                           kpos.data(), meta.data(), qpos.data(), scale) != TCA_TEST_OK) {
            return -3.0;
        }
    } else {
        const ggml_type type = (ggml_type) kv_type;
        const size_t bytes = sizeof(float)*(size_t) d*n_head*n_tokens*2 + 2*ggml_row_size(type, d)*(size_t) n_slots
                           + sizeof(ggml_fp16_t)*(size_t) n_kv*n_tokens + 16*ggml_tensor_overhead()
                           + ggml_graph_overhead() + 64*1024;
        ggml_init_params ip = { bytes, nullptr, false };
        G.ctx = ggml_init(ip);
        if (!G.ctx) return -3.0;
        ggml_tensor * tq = ggml_new_tensor_3d(G.ctx, GGML_TYPE_F32, d, n_tokens, n_head);
        ggml_tensor * tk = ggml_new_tensor_3d(G.ctx, type, d, n_kv, n_head_kv);
        ggml_tensor * tv = ggml_new_tensor_3d(G.ctx, type, d, n_kv, n_head_kv);
        ggml_tensor * tm = ggml_new_tensor_2d(G.ctx, GGML_TYPE_F16, n_kv, n_tokens);
        memcpy(tq->data, Q.data(), ggml_nbytes(tq));
        tca_test_store_rows(type, K.data(), tk->data, d, n_slots);
        tca_test_store_rows(type, V.data(), tv->data, d, n_slots);
        memset(tm->data, 0, ggml_nbytes(tm));  // f16 +0.0
        G.out = ggml_flash_attn_ext(G.ctx, tq, tk, tv, tm, scale, 0.0f, 0.0f);
        G.gf  = ggml_new_graph(G.ctx);
        ggml_build_forward_expand(G.gf, G.out);
    }

    ggml_backend_t be = ggml_backend_cpu_init();
    if (!be) return -3.0;
    ggml_backend_cpu_set_n_threads(be, n_threads);
    double best = std::numeric_limits<double>::infinity();
    auto now = [cpu_time]() {
        if (cpu_time) {
            timespec ts;
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
            return (double) ts.tv_sec + 1e-9*(double) ts.tv_nsec;
        }
        return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
    };
    for (int r = 0; r <= reps; ++r) {
        const double t0 = now();
        const ggml_status st = ggml_backend_graph_compute(be, G.gf);
        const double t1 = now();
        if (st != GGML_STATUS_SUCCESS) { ggml_backend_free(be); return -4.0; }
        if (r > 0) best = std::min(best, t1 - t0);
    }
    ggml_backend_free(be);
    return best;
}

// ------------------------------------------------------------------------------------------
// The same op on a named backend ("CPU", "CUDA0", ...): inputs uploaded into a buffer of that
// backend, the output poisoned with NaN first. Same arguments and return codes as
// tca_test_tca_attn, plus TCA_TEST_E_BACKEND (no such backend) and TCA_TEST_E_UNSUPP
// (ggml_backend_supports_op says no). n_threads only matters for CPU backends.
namespace {

struct tca_test_backend_graph {
    ggml_backend_t        be  = nullptr;
    ggml_context        * ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    ggml_cgraph         * gf  = nullptr;
    ~tca_test_backend_graph() {
        if (buf) ggml_backend_buffer_free(buf);
        if (ctx) ggml_free(ctx);
        if (be)  ggml_backend_free(be);
    }
};

int tca_test_backend_open(tca_test_backend_graph & B, const char * backend, int n_threads, size_t n_tensors) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_name(backend);
    if (!dev) return TCA_TEST_E_BACKEND;
    B.be = ggml_backend_dev_init(dev, nullptr);
    if (!B.be) return TCA_TEST_E_BACKEND;
    if (ggml_backend_is_cpu(B.be)) ggml_backend_cpu_set_n_threads(B.be, n_threads);
    ggml_init_params ip = { n_tensors*ggml_tensor_overhead() + ggml_graph_overhead() + 64*1024, nullptr, true };
    B.ctx = ggml_init(ip);
    return B.ctx ? TCA_TEST_OK : TCA_TEST_E_ALLOC;
}

// the graph of one node `out` on B's backend, its tensors allocated there (E_UNSUPP if the backend
// does not support the node)
int tca_test_backend_prepare(tca_test_backend_graph & B, ggml_tensor * out) {
    if (!ggml_backend_supports_op(B.be, out)) return TCA_TEST_E_UNSUPP;
    B.gf = ggml_new_graph(B.ctx);
    ggml_build_forward_expand(B.gf, out);
    B.buf = ggml_backend_alloc_ctx_tensors(B.ctx, B.be);
    return B.buf ? TCA_TEST_OK : TCA_TEST_E_ALLOC;
}

// uploads n_rows rows of d floats, stored as t->type
void tca_test_upload_rows(ggml_tensor * t, const float * src, int64_t d, int64_t n_rows) {
    if (n_rows == 0 || !src) return;
    std::vector<uint8_t> tmp(ggml_nbytes(t));
    tca_test_store_rows(t->type, src, tmp.data(), d, n_rows);
    ggml_backend_tensor_set(t, tmp.data(), 0, tmp.size());
}

} // namespace

// kpos_f32 != 0: kpos is given to the op as f32 (the retention cache's layout), same values
TCA_TEST_API int tca_test_tca_attn_backend_ex(const char * backend, int d, int n_head, int n_head_kv, int n_tokens,
                                              int n_slots, int kv_type, const float * q, const float * k,
                                              const float * v, const int32_t * kpos, const int32_t * meta,
                                              const int32_t * qpos, float scale, int n_threads, int kpos_f32,
                                              float * out) {
    if (!backend) return TCA_TEST_E_NULL;
    int rc = tca_test_check(d, n_head, n_head_kv, n_tokens, n_slots, kv_type, q, k, v, kpos, meta, qpos, scale, n_threads);
    if (rc != TCA_TEST_OK) return rc;
    if (!out) return TCA_TEST_E_NULL;

    tca_test_backend_graph B;
    rc = tca_test_backend_open(B, backend, n_threads, 16);
    if (rc != TCA_TEST_OK) return rc;

    const ggml_type type = (ggml_type) kv_type;
    ggml_tensor * tq  = ggml_new_tensor_3d(B.ctx, GGML_TYPE_F32, d, n_tokens, n_head);
    ggml_tensor * tk  = ggml_new_tensor_2d(B.ctx, type, d, n_slots);
    ggml_tensor * tv  = ggml_new_tensor_2d(B.ctx, type, d, n_slots);
    ggml_tensor * tkp = ggml_new_tensor_1d(B.ctx, kpos_f32 ? GGML_TYPE_F32 : GGML_TYPE_I32, n_slots);
    ggml_tensor * tm  = ggml_new_tensor_1d(B.ctx, GGML_TYPE_I32, 2*n_head_kv);
    ggml_tensor * tqp = ggml_new_tensor_1d(B.ctx, GGML_TYPE_I32, n_tokens);
    ggml_tensor * to  = ggml_tca_attn(B.ctx, tq, tk, tv, tkp, tm, tqp, n_head_kv, scale);
    rc = tca_test_backend_prepare(B, to);
    if (rc != TCA_TEST_OK) return rc;

    ggml_backend_tensor_set(tq, q, 0, ggml_nbytes(tq));
    tca_test_upload_rows(tk, k, d, n_slots);
    tca_test_upload_rows(tv, v, d, n_slots);
    if (n_slots > 0 && kpos_f32) {
        for (int j = 0; j < n_slots; ++j) {
            if (std::abs(kpos[j]) >= (1 << 24)) return TCA_TEST_E_SHAPE;  // not exact as f32
        }
        std::vector<float> kf(kpos, kpos + n_slots);
        ggml_backend_tensor_set(tkp, kf.data(), 0, ggml_nbytes(tkp));
    } else if (n_slots > 0) {
        ggml_backend_tensor_set(tkp, kpos, 0, ggml_nbytes(tkp));
    }
    ggml_backend_tensor_set(tm, meta, 0, ggml_nbytes(tm));
    ggml_backend_tensor_set(tqp, qpos, 0, ggml_nbytes(tqp));
    {
        std::vector<float> nan(ggml_nelements(to), std::numeric_limits<float>::quiet_NaN());
        ggml_backend_tensor_set(to, nan.data(), 0, ggml_nbytes(to));
    }

    if (ggml_backend_graph_compute(B.be, B.gf) != GGML_STATUS_SUCCESS) return TCA_TEST_E_COMPUTE;
    ggml_backend_tensor_get(to, out, 0, ggml_nbytes(to));
    return TCA_TEST_OK;
}

TCA_TEST_API int tca_test_tca_attn_backend(const char * backend, int d, int n_head, int n_head_kv, int n_tokens,
                                           int n_slots, int kv_type, const float * q, const float * k,
                                           const float * v, const int32_t * kpos, const int32_t * meta,
                                           const int32_t * qpos, float scale, int n_threads, float * out) {
    return tca_test_tca_attn_backend_ex(backend, d, n_head, n_head_kv, n_tokens, n_slots, kv_type, q, k, v, kpos,
                                        meta, qpos, scale, n_threads, 0, out);
}

// GGML_OP_TCA_SCORE on a named backend. q [n_head][d] (one query per head), k [n_slots][d] f32
// stored as kv_type, meta [2*n_head_kv]; out [n_slots] (poisoned with NaN first).
TCA_TEST_API int tca_test_tca_score_backend(const char * backend, int d, int n_head, int n_head_kv, int n_slots,
                                            int kv_type, const float * q, const float * k, const int32_t * meta,
                                            float scale, int n_threads, float * out) {
    if (!backend) return TCA_TEST_E_NULL;
    std::vector<int32_t> qpos(1, 0), kpos((size_t) std::max(n_slots, 0), 0);
    int rc = tca_test_check(d, n_head, n_head_kv, 1, n_slots, kv_type, q, k, k, kpos.data(), meta, qpos.data(),
                            scale, n_threads);
    if (rc != TCA_TEST_OK) return rc;
    if (!out || n_slots <= 0) return out ? TCA_TEST_E_SHAPE : TCA_TEST_E_NULL;

    tca_test_backend_graph B;
    rc = tca_test_backend_open(B, backend, n_threads, 8);
    if (rc != TCA_TEST_OK) return rc;
    const ggml_type type = (ggml_type) kv_type;
    ggml_tensor * tq = ggml_new_tensor_2d(B.ctx, GGML_TYPE_F32, d, n_head);
    ggml_tensor * tk = ggml_new_tensor_2d(B.ctx, type, d, n_slots);
    ggml_tensor * tm = ggml_new_tensor_1d(B.ctx, GGML_TYPE_I32, 2*n_head_kv);
    ggml_tensor * to = ggml_tca_score(B.ctx, tq, tk, tm, n_head_kv, scale);
    rc = tca_test_backend_prepare(B, to);
    if (rc != TCA_TEST_OK) return rc;
    ggml_backend_tensor_set(tq, q, 0, ggml_nbytes(tq));
    tca_test_upload_rows(tk, k, d, n_slots);
    ggml_backend_tensor_set(tm, meta, 0, ggml_nbytes(tm));
    {
        std::vector<float> nan(n_slots, std::numeric_limits<float>::quiet_NaN());
        ggml_backend_tensor_set(to, nan.data(), 0, ggml_nbytes(to));
    }
    if (ggml_backend_graph_compute(B.be, B.gf) != GGML_STATUS_SUCCESS) return TCA_TEST_E_COMPUTE;
    ggml_backend_tensor_get(to, out, 0, ggml_nbytes(to));
    return TCA_TEST_OK;
}

// Benchmark on a named backend: seconds per op (best of reps graph computes, after one warm-up,
// each graph holding n_ops independent copies of the op on the same inputs, so that launch and
// synchronisation costs are amortised; the inputs stay resident, i.e. partly in the GPU's L2
// for small K/V). Shapes and data as tca_test_bench_attn:
//   which = 0: ggml_tca_attn, which = 1: ggml_flash_attn_ext (k/v [d, n_kv, n_head_kv], zero f16 mask).
// Returns -10 (no backend), -11 (unsupported), other negatives on bad arguments or failure.
TCA_TEST_API double tca_test_bench_attn_backend(const char * backend, int which, int d, int n_head, int n_head_kv,
                                                int n_tokens, int n_kv, int kv_type, int n_threads, int reps,
                                                int n_ops) {
    if (!backend || which < 0 || which > 1 || reps <= 0 || n_ops <= 0 || n_ops > 256 || n_kv <= 0 ||
        n_head_kv <= 0 || (int64_t) n_kv*n_head_kv > (1 << 26)) return -2.0;
    if (d <= 0 || d > 4096 || n_head <= 0 || n_head > 4096 || n_tokens <= 0 || n_tokens > (1 << 20)) return -2.0;
    const int n_slots = n_kv*n_head_kv;
    tca_bench_data data;
    if (!tca_bench_make(data, d, n_head, n_head_kv, n_tokens, n_kv, kv_type, std::max(n_threads, 1))) return -2.0;
    const auto & [meta, qpos, kpos, Q, K, V, scale] = data;

    tca_test_backend_graph B;
    const int rc = tca_test_backend_open(B, backend, std::max(n_threads, 1), 8 + (size_t) n_ops);
    if (rc != TCA_TEST_OK) return (double) rc;
    const ggml_type type = (ggml_type) kv_type;
    ggml_tensor * tq = ggml_new_tensor_3d(B.ctx, GGML_TYPE_F32, d, n_tokens, n_head);
    ggml_tensor * tk = nullptr, * tv = nullptr, * tkp = nullptr, * tm = nullptr, * tqp = nullptr, * tmask = nullptr;
    std::vector<ggml_tensor *> outs;
    if (which == 0) {
        tk  = ggml_new_tensor_2d(B.ctx, type, d, n_slots);
        tv  = ggml_new_tensor_2d(B.ctx, type, d, n_slots);
        tkp = ggml_new_tensor_1d(B.ctx, GGML_TYPE_I32, n_slots);
        tm  = ggml_new_tensor_1d(B.ctx, GGML_TYPE_I32, 2*n_head_kv);
        tqp = ggml_new_tensor_1d(B.ctx, GGML_TYPE_I32, n_tokens);
        for (int r = 0; r < n_ops; ++r) outs.push_back(ggml_tca_attn(B.ctx, tq, tk, tv, tkp, tm, tqp, n_head_kv, scale));
    } else {
        tk    = ggml_new_tensor_3d(B.ctx, type, d, n_kv, n_head_kv);
        tv    = ggml_new_tensor_3d(B.ctx, type, d, n_kv, n_head_kv);
        tmask = ggml_new_tensor_2d(B.ctx, GGML_TYPE_F16, n_kv, n_tokens);
        for (int r = 0; r < n_ops; ++r) outs.push_back(ggml_flash_attn_ext(B.ctx, tq, tk, tv, tmask, scale, 0.0f, 0.0f));
    }
    if (!ggml_backend_supports_op(B.be, outs[0])) return (double) TCA_TEST_E_UNSUPP;
    B.gf = ggml_new_graph(B.ctx);
    for (ggml_tensor * o : outs) ggml_build_forward_expand(B.gf, o);
    B.buf = ggml_backend_alloc_ctx_tensors(B.ctx, B.be);
    if (!B.buf) return -3.0;

    ggml_backend_tensor_set(tq, Q.data(), 0, ggml_nbytes(tq));
    tca_test_upload_rows(tk, K.data(), d, n_slots);
    tca_test_upload_rows(tv, V.data(), d, n_slots);
    if (which == 0) {
        ggml_backend_tensor_set(tkp, kpos.data(), 0, ggml_nbytes(tkp));
        ggml_backend_tensor_set(tm, meta.data(), 0, ggml_nbytes(tm));
        ggml_backend_tensor_set(tqp, qpos.data(), 0, ggml_nbytes(tqp));
    } else {
        std::vector<uint8_t> zero(ggml_nbytes(tmask), 0);  // f16 +0.0
        ggml_backend_tensor_set(tmask, zero.data(), 0, zero.size());
    }

    double best = std::numeric_limits<double>::infinity();
    for (int r = 0; r <= reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        const ggml_status st = ggml_backend_graph_compute(B.be, B.gf);  // synchronous
        const auto t1 = std::chrono::steady_clock::now();
        if (st != GGML_STATUS_SUCCESS) return -4.0;
        if (r > 0) best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    }
    return best/n_ops;
}

// GGML_OP_TCA_SELECT on a named backend. s [n_slots] f32, kpos [n_slots] (integer positions,
// ascending within each head, |pos| < 2^24), meta [2*n_head_kv], bud [n_head_kv][n_bud] with
// n_bud = 2*n_k+1 (p_desc, k_desc, kt); out [n_slots + 4*n_head_kv] (poisoned first).
TCA_TEST_API int tca_test_tca_select_backend(const char * backend, int n_slots, int n_head_kv, const float * s,
                                             const int32_t * kpos, const int32_t * meta, const float * bud, int n_bud,
                                             int block, int n_sink, int F, int f0, float alpha, int radius,
                                             int n_threads, int32_t * out) {
    if (!backend || !s || !kpos || !meta || !bud || !out) return TCA_TEST_E_NULL;
    if (n_slots <= 0 || n_slots > (1 << 26) || n_head_kv <= 0 || n_head_kv > 4096 || n_threads <= 0) return TCA_TEST_E_SHAPE;
    if (n_bud < 3 || n_bud % 2 != 1 || block <= 0 || block > 4096 || n_sink < 0 || F < 0 || F % block != 0 ||
        (f0 >= 0 && f0 % block != 0) || radius < 0 || radius > 64 || !(alpha >= 0.0f && alpha <= 1.0f)) return TCA_TEST_E_SHAPE;
    for (int g = 0; g < n_head_kv; ++g) {
        const int64_t o = meta[2*g], l = meta[2*g + 1];
        if (o < 0 || l < 0 || o + l > n_slots) return TCA_TEST_E_META;
        for (int64_t r = o; r < o + l; ++r) {
            if (std::abs(kpos[r]) >= (1 << 24) || (r > o && kpos[r] <= kpos[r - 1])) return TCA_TEST_E_META;
        }
    }
    tca_test_backend_graph B;
    int rc = tca_test_backend_open(B, backend, n_threads, 8);
    if (rc != TCA_TEST_OK) return rc;
    ggml_tensor * ts = ggml_new_tensor_1d(B.ctx, GGML_TYPE_F32, n_slots);
    ggml_tensor * tp = ggml_new_tensor_1d(B.ctx, GGML_TYPE_F32, n_slots);
    ggml_tensor * tm = ggml_new_tensor_1d(B.ctx, GGML_TYPE_I32, 2*n_head_kv);
    ggml_tensor * tb = ggml_new_tensor_2d(B.ctx, GGML_TYPE_F32, n_bud, n_head_kv);
    ggml_tensor * to = ggml_tca_select(B.ctx, ts, tp, tm, tb, n_head_kv, block, n_sink, F, f0, alpha, radius);
    rc = tca_test_backend_prepare(B, to);
    if (rc != TCA_TEST_OK) return rc;
    std::vector<float> kf(kpos, kpos + n_slots);
    ggml_backend_tensor_set(ts, s, 0, ggml_nbytes(ts));
    ggml_backend_tensor_set(tp, kf.data(), 0, ggml_nbytes(tp));
    ggml_backend_tensor_set(tm, meta, 0, ggml_nbytes(tm));
    ggml_backend_tensor_set(tb, bud, 0, ggml_nbytes(tb));
    {
        std::vector<int32_t> poison(ggml_nelements(to), 0x7eadbeef);
        ggml_backend_tensor_set(to, poison.data(), 0, ggml_nbytes(to));
    }
    if (ggml_backend_graph_compute(B.be, B.gf) != GGML_STATUS_SUCCESS) return TCA_TEST_E_COMPUTE;
    ggml_backend_tensor_get(to, out, 0, ggml_nbytes(to));
    return TCA_TEST_OK;
}

// GGML_OP_TCA_COMPACT on a named backend: rows [n_slots][width] f32 moved in place by sel
// [n_slots + 4*n_head_kv] (as ggml_tca_select writes it; checked here: every kept slot's source
// lies at or after it, inside its head, strictly increasing); rows_out [n_slots][width].
TCA_TEST_API int tca_test_tca_compact_backend(const char * backend, int n_slots, int n_head_kv, int width,
                                              const float * rows, const int32_t * sel, int n_threads, float * rows_out) {
    if (!backend || !rows || !sel || !rows_out) return TCA_TEST_E_NULL;
    if (n_slots <= 0 || n_slots > (1 << 26) || n_head_kv <= 0 || width <= 0 || width > 4096 || n_threads <= 0) return TCA_TEST_E_SHAPE;
    for (int g = 0; g < n_head_kv; ++g) {
        const int64_t o = sel[n_slots + 4*g], n = sel[n_slots + 4*g + 1];
        if (o < 0 || n < 0 || o + n > n_slots) return TCA_TEST_E_META;
        int64_t prev = -1;
        for (int64_t i = o; i < o + n; ++i) {
            if (sel[i] < i || sel[i] >= n_slots || sel[i] <= prev) return TCA_TEST_E_META;
            prev = sel[i];
        }
    }
    tca_test_backend_graph B;
    int rc = tca_test_backend_open(B, backend, n_threads, 8);
    if (rc != TCA_TEST_OK) return rc;
    ggml_tensor * ta = ggml_new_tensor_2d(B.ctx, GGML_TYPE_F32, width, n_slots);
    ggml_tensor * tsel = ggml_new_tensor_1d(B.ctx, GGML_TYPE_I32, n_slots + 4*(int64_t) n_head_kv);
    ggml_tensor * to = ggml_tca_compact(B.ctx, ta, tsel, n_head_kv);
    rc = tca_test_backend_prepare(B, to);
    if (rc != TCA_TEST_OK) return rc;
    ggml_backend_tensor_set(ta, rows, 0, ggml_nbytes(ta));
    ggml_backend_tensor_set(tsel, sel, 0, ggml_nbytes(tsel));
    if (ggml_backend_graph_compute(B.be, B.gf) != GGML_STATUS_SUCCESS) return TCA_TEST_E_COMPUTE;
    ggml_backend_tensor_get(ta, rows_out, 0, ggml_nbytes(ta));
    return TCA_TEST_OK;
}
