// tca_ggml — CPU kernel of GGML_OP_TCA_ATTN (the other TCA ops: tca-select.cpp).
//
// The op itself (enum value, ggml_tca_attn() constructor with its shape contract, CPU
// dispatch, n_tasks and work-size hooks) is added to upstream ggml by
// native/patches/0001-ggml-tca-attn-op.patch; this file is compiled into upstream's
// ggml-cpu target by the top-level CMakeLists.txt.
//
// Semantics (ggml.h): for query head h (KV head g = h / (n_head/n_head_kv)) and token t,
//   o = softmax(scale * q . K_j) V  over the rows j of head g with kpos[j] <= qpos[t];
//   o = 0 when no row is visible.
//
// Work is split into units of (KV head g, a tile of tokens, a range of g's query heads):
// units are handed to threads dynamically (params->ith/nth + ggml's chunk counter). A unit
// walks its KV head's rows in chunks of TCA_C rows; each chunk is dequantized to f32 once
// for all queries of the unit (K also transposed, so that the scores of 4 queries x 64 rows
// -- 2 x 32 with AVX2 -- accumulate in registers), masked causally (kpos > qpos -> skipped),
// and folded into each query's state by an online softmax (running max, running sum, f32).
// Paths: AVX-512, AVX2+FMA, plain C++. Chunk boundaries do not depend on the unit shape and
// each query's arithmetic is the same whatever unit holds it, so within one build the
// result is bit-identical for any thread count.
#include "ops.h"

#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "tca-common.h"
#include "tca-op-params.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TCA_C    = 64;   // KV rows per chunk (multiple of 16)
constexpr int64_t TCA_QMAX = 64;   // queries (head x token) per work unit

// per-thread scratch, in floats
int64_t tca_scratch_floats(int64_t d) {
    return d*TCA_C          // KT: chunk of K, transposed [d][C]
         + TCA_C*d          // Kc: chunk of K, dequantized [C][d]
         + TCA_C*d          // Vc: chunk of V, dequantized [C][d]
         + TCA_QMAX*TCA_C   // S : scores / probabilities [QMAX][C]
         + TCA_QMAX*d       // A : output accumulators [QMAX][d]
         + 2*TCA_QMAX;      // M, L: running max and sum
}

struct tca_units {
    int64_t hs;      // query heads per unit
    int64_t nhs;     // head ranges per KV head
    int64_t tq;      // tokens per unit
    int64_t ntiles;  // token tiles
    int64_t n;       // units
};

tca_units tca_make_units(int64_t G, int64_t T, int64_t n_head_kv, int nth) {
    tca_units u;
    u.hs = std::min<int64_t>(G, TCA_QMAX);
    u.tq = std::max<int64_t>(1, TCA_QMAX / u.hs);
    auto update = [&]() {
        u.nhs    = (G + u.hs - 1) / u.hs;
        u.hs     = (G + u.nhs - 1) / u.nhs;  // even out the head ranges
        u.tq     = std::min<int64_t>(u.tq, T);
        u.ntiles = (T + u.tq - 1) / u.tq;
        u.n      = n_head_kv * u.nhs * u.ntiles;
    };
    update();
    // at least one unit per thread (splitting the heads of a group repeats the K/V
    // conversion for each part, so only as far as the threads need)
    while (u.n < (int64_t) nth) {
        if (u.tq > 1) {
            u.tq = (u.tq + 1) / 2;
        } else if (u.hs > 1) {
            u.hs = (u.hs + 1) / 2;
        } else {
            break;
        }
        update();
    }
    return u;
}

// the SIMD vector of the kernels below (tca_simd): W floats; loads, stores, broadcast, arithmetic,
// the steps of an in-register W x W transpose and, where ggml has a vector expf (TCA_SIMD_EXP), the
// pieces of a chunk's softmax: horizontal max / sum, exp, and hide() (-inf where a row is past nc or
// its position kp is after the query's qp). The ops that AVX-512 and AVX2 spell alike but
// for the prefix (_mm512 / _mm256):
#define TCA_SIMD_OPS(pfx) \
    static vec  zero ()                       { return pfx##_setzero_ps(); } \
    static vec  load (const float * x)        { return pfx##_loadu_ps(x); } \
    static void store(float * x, vec a)       { pfx##_storeu_ps(x, a); } \
    static vec  set1 (float x)                { return pfx##_set1_ps(x); } \
    static vec  mul  (vec a, vec b)           { return pfx##_mul_ps(a, b); } \
    static vec  fmadd(vec a, vec b, vec c)    { return pfx##_fmadd_ps(a, b, c); } \
    static vec  add  (vec a, vec b)           { return pfx##_add_ps(a, b); } \
    static vec  sub  (vec a, vec b)           { return pfx##_sub_ps(a, b); } \
    static vec  max  (vec a, vec b)           { return pfx##_max_ps(a, b); } \
    static vec  unpacklo(vec a, vec b)        { return pfx##_unpacklo_ps(a, b); } \
    static vec  unpackhi(vec a, vec b)        { return pfx##_unpackhi_ps(a, b); } \
    template <int imm> static vec shuffle(vec a, vec b) { return pfx##_shuffle_ps(a, b, imm); }

#if defined(__AVX512F__)
struct tca_simd {
    using vec = __m512;
    static constexpr int64_t W   = 16;
    static constexpr int     NQS = 4;   // tca_scores: 4 queries x 64 rows (16 accumulators)
    TCA_SIMD_OPS(_mm512)
    // last step of the transpose: the 128-bit lanes of r[0..16) across registers (t: scratch)
    static void transpose_lanes(vec * r, vec * t) {
        for (int i = 0; i < 4; ++i) {
            t[i]      = _mm512_shuffle_f32x4(r[i],     r[i + 4],  0x88);
            t[i + 4]  = _mm512_shuffle_f32x4(r[i],     r[i + 4],  0xdd);
            t[i + 8]  = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
            t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
        }
        for (int i = 0; i < 8; ++i) {
            r[i]     = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
            r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
        }
    }
#if defined(__AVX512DQ__)
#define TCA_SIMD_EXP 1
    static float hmax(vec a) { return _mm512_reduce_max_ps(a); }
    static float hsum(vec a) { return _mm512_reduce_add_ps(a); }
    static vec   exp (vec a) { return ggml_v_expf(a); }
    static vec   hide(vec x, const int32_t * kp, int64_t j0, int64_t nc, int32_t qp) {
        const int64_t   nv    = std::min<int64_t>(std::max<int64_t>(nc - j0, 0), W);
        const __mmask16 valid = (__mmask16) ((1u << nv) - 1u);
        const __mmask16 m     = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(kp), _mm512_set1_epi32(qp)) | (__mmask16) ~valid;
        return _mm512_mask_mov_ps(x, m, _mm512_set1_ps(-INFINITY));
    }
#endif
};
#define TCA_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
struct tca_simd {
    using vec = __m256;
    static constexpr int64_t W   = 8;
    static constexpr int     NQS = 2;   // tca_scores: 2 queries x 32 rows (8 accumulators + 4 loads)
    TCA_SIMD_OPS(_mm256)
    static void transpose_lanes(vec * r, vec * t) {
        for (int i = 0; i < 4; ++i) {
            t[i]     = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
            t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
        }
        for (int i = 0; i < 8; ++i) {
            r[i] = t[i];
        }
    }
#define TCA_SIMD_EXP 1
    static float hmax(vec a) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    }
    static float hsum(vec a) {
        __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
    }
    static vec   exp (vec a) { return ggml_v_expf(a); }
    static vec   hide(vec x, const int32_t * kp, int64_t j0, int64_t nc, int32_t qp) {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i past = _mm256_cmpgt_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32((int) j0)),
                                                _mm256_set1_epi32((int) nc - 1));
        const __m256i m    = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *) kp),
                                                                _mm256_set1_epi32(qp)), past);
        return _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(m));
    }
};
#define TCA_SIMD 1
#endif

#if defined(TCA_SIMD_EXP)
// One query's softmax step over a chunk of TCA_C scores s: x = scale*s, -inf where a row is past nc
// or (need_mask) its position kpad[j] is after the query's qp; Mn = max(M, max x), s <- exp(x - Mn),
// sum = its sum. false (s and the state unchanged) when no row of the chunk is visible.
bool tca_chunk_softmax(float * s, float scale, bool need_mask, const int32_t * kpad, int64_t nc, int32_t qp,
                       float M, float & Mn, float & sum) {
    using S = tca_simd;
    constexpr int NB = (int) (TCA_C / S::W);
    static_assert(TCA_C % S::W == 0, "a chunk is whole vectors");
    S::vec x[NB];
    S::vec vmax = S::set1(-INFINITY);
    for (int b = 0; b < NB; ++b) {
        x[b] = S::mul(S::load(s + S::W*b), S::set1(scale));
        if (need_mask) {
            x[b] = S::hide(x[b], kpad + S::W*b, S::W*b, nc, qp);
        }
        vmax = S::max(vmax, x[b]);
    }
    const float mc = S::hmax(vmax);
    if (mc == -INFINITY) {
        return false;
    }
    Mn = std::max(M, mc);
    const S::vec vM = S::set1(Mn);
    S::vec vsum = S::zero();
    for (int b = 0; b < NB; ++b) {
        const S::vec e = S::exp(S::sub(x[b], vM));  // exp(-inf) = 0
        S::store(s + S::W*b, e);
        vsum = S::add(vsum, e);
    }
    sum = S::hsum(vsum);
    return true;
}
#endif

// KT[k][j] = Kc[j][k] for j < TCA_C, k < d (Kc: TCA_C rows of d floats, row stride ldk)
void tca_transpose(int64_t d, const float * Kc, int64_t ldk, float * KT) {
    int64_t k0 = 0;
#if defined(TCA_SIMD)
    using S = tca_simd;
    constexpr int W = (int) S::W;
    for (; k0 + W <= d; k0 += W) {
        for (int64_t j0 = 0; j0 < TCA_C; j0 += W) {
            S::vec r[W], t[W];
            for (int i = 0; i < W; ++i) {
                r[i] = S::load(Kc + (j0 + i)*ldk + k0);
            }
            for (int i = 0; i < W; i += 2) {
                t[i]     = S::unpacklo(r[i], r[i + 1]);
                t[i + 1] = S::unpackhi(r[i], r[i + 1]);
            }
            for (int i = 0; i < W; i += 4) {
                r[i]     = S::shuffle<_MM_SHUFFLE(1, 0, 1, 0)>(t[i],     t[i + 2]);
                r[i + 1] = S::shuffle<_MM_SHUFFLE(3, 2, 3, 2)>(t[i],     t[i + 2]);
                r[i + 2] = S::shuffle<_MM_SHUFFLE(1, 0, 1, 0)>(t[i + 1], t[i + 3]);
                r[i + 3] = S::shuffle<_MM_SHUFFLE(3, 2, 3, 2)>(t[i + 1], t[i + 3]);
            }
            S::transpose_lanes(r, t);
            for (int i = 0; i < W; ++i) {
                S::store(KT + (k0 + i)*TCA_C + j0, r[i]);
            }
        }
    }
#endif
    for (; k0 < d; ++k0) {
        for (int64_t j = 0; j < TCA_C; ++j) {
            KT[k0*TCA_C + j] = Kc[j*ldk + k0];
        }
    }
}

#if defined(TCA_SIMD)
// S[a][0..C) = sum_k q_a[k] * KT[k][0..C) for the NQ queries qs[0..NQ), 4 vectors of rows at a
// time; each element is the same chain of fmas over k whatever NQ
template <int NQ>
void tca_scores_block(int64_t d, const float * KT, const float * const * qs, float * S) {
    using V = tca_simd;
    constexpr int64_t W = V::W;
    static_assert(TCA_C % (4*W) == 0, "the SIMD score kernel assumes whole groups of 4 vectors per chunk");
    for (int64_t h = 0; h < TCA_C; h += 4*W) {
        V::vec acc[NQ][4];
        for (int a = 0; a < NQ; ++a) {
            for (int b = 0; b < 4; ++b) {
                acc[a][b] = V::zero();
            }
        }
        for (int64_t k = 0; k < d; ++k) {
            const float * kt = KT + k*TCA_C + h;
            const V::vec k0 = V::load(kt + 0*W);
            const V::vec k1 = V::load(kt + 1*W);
            const V::vec k2 = V::load(kt + 2*W);
            const V::vec k3 = V::load(kt + 3*W);
            for (int a = 0; a < NQ; ++a) {
                const V::vec x = V::set1(qs[a][k]);
                acc[a][0] = V::fmadd(x, k0, acc[a][0]); acc[a][1] = V::fmadd(x, k1, acc[a][1]);
                acc[a][2] = V::fmadd(x, k2, acc[a][2]); acc[a][3] = V::fmadd(x, k3, acc[a][3]);
            }
        }
        for (int a = 0; a < NQ; ++a) {
            for (int b = 0; b < 4; ++b) {
                V::store(S + a*TCA_C + h + b*W, acc[a][b]);
            }
        }
    }
}
#endif

// S[i][0..C) = sum_k q_i[k] * KT[k][0..C), for nq queries
void tca_scores(int64_t d, const float * KT, const float * const * qs, int64_t nq, float * S) {
    int64_t i = 0;
#if defined(TCA_SIMD)
    constexpr int NQ = tca_simd::NQS;
    for (; i + NQ <= nq; i += NQ) {
        tca_scores_block<NQ>(d, KT, qs + i, S + i*TCA_C);
    }
    for (; i < nq; ++i) {
        tca_scores_block<1>(d, KT, qs + i, S + i*TCA_C);
    }
#else
    for (; i < nq; ++i) {
        float acc[TCA_C] = {0};
        const float * q = qs[i];
        for (int64_t k = 0; k < d; ++k) {
            const float   qk = q[k];
            const float * kt = KT + k*TCA_C;
            for (int64_t j = 0; j < TCA_C; ++j) {
                acc[j] += qk*kt[j];
            }
        }
        memcpy(S + i*TCA_C, acc, sizeof(acc));
    }
#endif
}

// A[0..d) = A*ms + sum_j p[j] * V_j   over the rows with p[j] != 0
void tca_pv(int64_t d, float * A, float ms, const float * p, int64_t n, const float * V, int64_t ldv) {
    int64_t c = 0;
#if defined(TCA_SIMD)
    using S = tca_simd;
    constexpr int64_t W = S::W;
    const S::vec vms = S::set1(ms);
    for (; c + 4*W <= d; c += 4*W) {
        S::vec a0 = S::mul(S::load(A + c + 0*W), vms);
        S::vec a1 = S::mul(S::load(A + c + 1*W), vms);
        S::vec a2 = S::mul(S::load(A + c + 2*W), vms);
        S::vec a3 = S::mul(S::load(A + c + 3*W), vms);
        for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.0f) {
                continue;
            }
            const S::vec  b  = S::set1(p[j]);
            const float * vr = V + j*ldv + c;
            a0 = S::fmadd(b, S::load(vr + 0*W), a0);
            a1 = S::fmadd(b, S::load(vr + 1*W), a1);
            a2 = S::fmadd(b, S::load(vr + 2*W), a2);
            a3 = S::fmadd(b, S::load(vr + 3*W), a3);
        }
        S::store(A + c + 0*W, a0);
        S::store(A + c + 1*W, a1);
        S::store(A + c + 2*W, a2);
        S::store(A + c + 3*W, a3);
    }
    for (; c + W <= d; c += W) {
        S::vec a0 = S::mul(S::load(A + c), vms);
        for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.0f) {
                continue;
            }
            a0 = S::fmadd(S::set1(p[j]), S::load(V + j*ldv + c), a0);
        }
        S::store(A + c, a0);
    }
#endif
    for (; c < d; ++c) {
        float a = A[c]*ms;
        for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.0f) {
                continue;
            }
            a = fmaf(p[j], V[j*ldv + c], a);
        }
        A[c] = a;
    }
}

// two queries at once (shares the V loads); per query the same operations as tca_pv
void tca_pv2(int64_t d, float * A0, float * A1, float ms0, float ms1, const float * p0, const float * p1,
             int64_t n, const float * V, int64_t ldv) {
#if defined(TCA_SIMD)
    using S = tca_simd;
    constexpr int64_t W = S::W;
    if (d % (4*W) == 0) {
        const S::vec vms0 = S::set1(ms0);
        const S::vec vms1 = S::set1(ms1);
        for (int64_t c = 0; c < d; c += 4*W) {
            S::vec a0 = S::mul(S::load(A0 + c + 0*W), vms0);
            S::vec a1 = S::mul(S::load(A0 + c + 1*W), vms0);
            S::vec a2 = S::mul(S::load(A0 + c + 2*W), vms0);
            S::vec a3 = S::mul(S::load(A0 + c + 3*W), vms0);
            S::vec b0 = S::mul(S::load(A1 + c + 0*W), vms1);
            S::vec b1 = S::mul(S::load(A1 + c + 1*W), vms1);
            S::vec b2 = S::mul(S::load(A1 + c + 2*W), vms1);
            S::vec b3 = S::mul(S::load(A1 + c + 3*W), vms1);
            for (int64_t j = 0; j < n; ++j) {
                const bool u0 = p0[j] != 0.0f, u1 = p1[j] != 0.0f;
                if (!u0 && !u1) {
                    continue;
                }
                const float * vr = V + j*ldv + c;
                const S::vec v0 = S::load(vr + 0*W);
                const S::vec v1 = S::load(vr + 1*W);
                const S::vec v2 = S::load(vr + 2*W);
                const S::vec v3 = S::load(vr + 3*W);
                if (u0) {
                    const S::vec w = S::set1(p0[j]);
                    a0 = S::fmadd(w, v0, a0); a1 = S::fmadd(w, v1, a1);
                    a2 = S::fmadd(w, v2, a2); a3 = S::fmadd(w, v3, a3);
                }
                if (u1) {
                    const S::vec w = S::set1(p1[j]);
                    b0 = S::fmadd(w, v0, b0); b1 = S::fmadd(w, v1, b1);
                    b2 = S::fmadd(w, v2, b2); b3 = S::fmadd(w, v3, b3);
                }
            }
            S::store(A0 + c + 0*W, a0); S::store(A0 + c + 1*W, a1);
            S::store(A0 + c + 2*W, a2); S::store(A0 + c + 3*W, a3);
            S::store(A1 + c + 0*W, b0); S::store(A1 + c + 1*W, b1);
            S::store(A1 + c + 2*W, b2); S::store(A1 + c + 3*W, b3);
        }
        return;
    }
#endif
    tca_pv(d, A0, ms0, p0, n, V, ldv);
    tca_pv(d, A1, ms1, p1, n, V, ldv);
}

} // namespace

extern "C" size_t ggml_compute_forward_tca_attn_work_size(const struct ggml_tensor * node, int n_tasks) {
    const int64_t d = node->src[0]->ne[0];
    return sizeof(float)*(size_t) (tca_scratch_floats(d) + (int64_t) CACHE_LINE_SIZE_F32)*(size_t) n_tasks;
}

extern "C" void ggml_compute_forward_tca_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const tca_attn_op op = tca_attn_op_get(dst);
    const auto & [q, k, v, kpos, meta, qpos, d, T, n_head, n_slots, n_head_kv, scale] = op;

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && q->type == GGML_TYPE_F32);
    GGML_ASSERT(k->type == v->type);
    GGML_ASSERT(ggml_is_contiguous(q) && ggml_is_contiguous(k) && ggml_is_contiguous(v) && ggml_is_contiguous(dst));
    GGML_ASSERT(ggml_is_contiguous(kpos) && ggml_is_contiguous(meta) && ggml_is_contiguous(qpos));
    GGML_ASSERT(tca_attn_op_shapes_ok(op, dst) && "tca_attn: shapes outside the op's contract");

    const int ith = params->ith;
    const int nth = params->nth;

    const int64_t per_thread = tca_scratch_floats(d) + (int64_t) CACHE_LINE_SIZE_F32;
    GGML_ASSERT(params->wsize >= sizeof(float)*(size_t) (per_thread*nth));

    float * KT = (float *) params->wdata + ith*per_thread;
    float * Kc = KT + d*TCA_C;
    float * Vc = Kc + TCA_C*d;
    float * S  = Vc + TCA_C*d;
    float * A  = S  + TCA_QMAX*TCA_C;
    float * M  = A  + TCA_QMAX*d;
    float * L  = M  + TCA_QMAX;

    // kpos: i32, or f32 holding integer positions (the retention cache keeps it as f32 so that
    // the graph can append rows with ggml_set_rows)
    const bool      kp_f32 = kpos->type == GGML_TYPE_F32;
    GGML_ASSERT(kp_f32 || kpos->type == GGML_TYPE_I32);
    const int32_t * kp  = kp_f32 ? nullptr : (const int32_t *) kpos->data;
    const float   * kpf = kp_f32 ? (const float *) kpos->data : nullptr;
    const int32_t * hm = (const int32_t *) meta->data;
    const int32_t * qp = (const int32_t *) qpos->data;

    GGML_ASSERT(tca_head_ranges_ok(hm, n_head_kv, n_slots) && "tca_attn: head range outside the K/V slots");

    const int64_t G = n_head / n_head_kv;
    const tca_units U = tca_make_units(G, T, n_head_kv, nth);

    const ggml_type kv_type = k->type;
    const size_t    row_k   = k->nb[1];
    const size_t    row_v   = v->nb[1];

    // dynamic scheduling: units are handed out from a shared counter, latest tokens first
    if (ith == 0) {
        ggml_threadpool_chunk_set(params->threadpool, nth);
    }
    ggml_barrier(params->threadpool);

    for (int64_t u = ith; u < U.n; u = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t tile = U.ntiles - 1 - u / (n_head_kv*U.nhs);
        const int64_t rest = u % (n_head_kv*U.nhs);
        const int64_t g    = rest / U.nhs;
        const int64_t hr   = rest % U.nhs;

        const int64_t t0 = tile*U.tq;
        const int64_t t1 = std::min(T, t0 + U.tq);
        const int64_t h0 = g*G + hr*U.hs;
        const int64_t h1 = std::min(g*G + G, h0 + U.hs);
        if (h0 >= h1) {
            continue;
        }
        const int64_t nt = t1 - t0;
        const int64_t nq = nt*(h1 - h0);  // query i <-> (h0 + i / nt, t0 + i % nt)

        const float * qs[TCA_QMAX];
        int32_t qmin = INT32_MAX, qmax = INT32_MIN;
        for (int64_t i = 0; i < nq; ++i) {
            const int64_t h = h0 + i / nt, t = t0 + i % nt;
            qs[i] = (const float *) ((const char *) q->data + t*q->nb[1] + h*q->nb[2]);
            M[i]  = -INFINITY;
            L[i]  = 0.0f;
            memset(A + i*d, 0, d*sizeof(float));
        }
        for (int64_t t = t0; t < t1; ++t) {
            qmin = std::min(qmin, qp[t]);
            qmax = std::max(qmax, qp[t]);
        }

        const int64_t off = hm[2*g];
        const int64_t len = hm[2*g + 1];

        for (int64_t r0 = 0; r0 < len; r0 += TCA_C) {
            const int64_t   nc  = std::min(TCA_C, len - r0);
            int32_t         kpcv[TCA_C];
            const int32_t * kpc = kp ? kp + off + r0 : kpcv;
            if (kpf) {
                for (int64_t j = 0; j < nc; ++j) {
                    kpcv[j] = (int32_t) kpf[off + r0 + j];
                }
            }

            int32_t kmin = INT32_MAX, kmax = INT32_MIN;
            for (int64_t j = 0; j < nc; ++j) {
                kmin = std::min(kmin, kpc[j]);
                kmax = std::max(kmax, kpc[j]);
            }
            if (kmin > qmax) {
                continue;  // no query of the unit sees any row of the chunk
            }
            const bool need_mask = kmax > qmin || nc < TCA_C;

            // K chunk -> f32, transposed (rows beyond nc are zero)
            const char  * ksrc = (const char *) k->data + (off + r0)*row_k;
            const float * kf;
            if (kv_type == GGML_TYPE_F32 && nc == TCA_C) {
                kf = (const float *) ksrc;
            } else {
                tca_to_f32(kv_type, ksrc, Kc, nc*d);
                memset(Kc + nc*d, 0, (TCA_C - nc)*d*sizeof(float));
                kf = Kc;
            }
            tca_transpose(d, kf, d, KT);

            // V chunk -> f32
            const char  * vsrc = (const char *) v->data + (off + r0)*row_v;
            const float * vf;
            if (kv_type == GGML_TYPE_F32) {
                vf = (const float *) vsrc;
            } else {
                tca_to_f32(kv_type, vsrc, Vc, nc*d);
                vf = Vc;
            }

            tca_scores(d, KT, qs, nq, S);

            int32_t kpad[TCA_C];  // positions of the chunk (rows past nc are masked separately)
            for (int64_t j = 0; j < TCA_C; ++j) {
                kpad[j] = j < nc ? kpc[j] : INT32_MAX;
            }

            int   act[TCA_QMAX];  // queries with a visible row in the chunk
            float MS[TCA_QMAX];   // their rescaling factors
            int64_t n_act = 0;
            for (int64_t i = 0; i < nq; ++i) {
                float * s = S + i*TCA_C;
                const int32_t qpi = qp[t0 + i % nt];
                float sum;
                float Mn;
#if defined(TCA_SIMD_EXP)
                if (!tca_chunk_softmax(s, scale, need_mask, kpad, nc, qpi, M[i], Mn, sum)) {
                    continue;  // nothing visible in this chunk: the state is unchanged
                }
#else
                float mc = -INFINITY;
                for (int64_t j = 0; j < TCA_C; ++j) {
                    float x = s[j]*scale;
                    if (need_mask && (j >= nc || kpad[j] > qpi)) {
                        x = -INFINITY;
                    }
                    s[j] = x;
                    mc = std::max(mc, x);
                }
                if (mc == -INFINITY) {
                    continue;  // nothing visible in this chunk: the state is unchanged
                }
                Mn  = std::max(M[i], mc);
                sum = (float) ggml_vec_soft_max_f32(TCA_C, s, s, Mn);
#endif
                const float ms = Mn == M[i] ? 1.0f : expf(M[i] - Mn);  // 0 when M[i] == -inf
                L[i] = L[i]*ms + sum;
                M[i] = Mn;
                MS[n_act] = ms;
                act[n_act++] = (int) i;
            }

            // P V for the queries that saw something, two at a time
            int64_t a = 0;
            for (; a + 2 <= n_act; a += 2) {
                const int i0 = act[a], i1 = act[a + 1];
                tca_pv2(d, A + i0*d, A + i1*d, MS[a], MS[a + 1], S + i0*TCA_C, S + i1*TCA_C, nc, vf, d);
            }
            if (a < n_act) {
                const int i0 = act[a];
                tca_pv(d, A + i0*d, MS[a], S + i0*TCA_C, nc, vf, d);
            }
        }

        for (int64_t i = 0; i < nq; ++i) {
            const int64_t h = h0 + i / nt, t = t0 + i % nt;
            float * o = (float *) ((char *) dst->data + h*dst->nb[1] + t*dst->nb[2]);
            if (L[i] > 0.0f) {
                const float inv = 1.0f/L[i];
                for (int64_t c = 0; c < d; ++c) {
                    o[c] = A[i*d + c]*inv;
                }
            } else {
                memset(o, 0, d*sizeof(float));
            }
        }
    }
}
