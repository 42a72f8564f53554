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

// KT[k][j] = Kc[j][k] for j < TCA_C, k < d (Kc: TCA_C rows of d floats, row stride ldk)
void tca_transpose(int64_t d, const float * Kc, int64_t ldk, float * KT) {
    int64_t k0 = 0;
#if defined(__AVX512F__)
    for (; k0 + 16 <= d; k0 += 16) {
        for (int64_t j0 = 0; j0 < TCA_C; j0 += 16) {
            __m512 r[16], t[16];
            for (int i = 0; i < 16; ++i) {
                r[i] = _mm512_loadu_ps(Kc + (j0 + i)*ldk + k0);
            }
            for (int i = 0; i < 16; i += 2) {
                t[i]     = _mm512_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 16; i += 4) {
                r[i]     = _mm512_shuffle_ps(t[i],     t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
                r[i + 1] = _mm512_shuffle_ps(t[i],     t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
                r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
                r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
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
            for (int i = 0; i < 16; ++i) {
                _mm512_storeu_ps(KT + (k0 + i)*TCA_C + j0, r[i]);
            }
        }
    }
#elif defined(__AVX2__)
    for (; k0 + 8 <= d; k0 += 8) {
        for (int64_t j0 = 0; j0 < TCA_C; j0 += 8) {
            __m256 r[8], t[8];
            for (int i = 0; i < 8; ++i) {
                r[i] = _mm256_loadu_ps(Kc + (j0 + i)*ldk + k0);
            }
            for (int i = 0; i < 8; i += 2) {
                t[i]     = _mm256_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {
                r[i]     = _mm256_shuffle_ps(t[i],     t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
                r[i + 1] = _mm256_shuffle_ps(t[i],     t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
                r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
                r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            for (int i = 0; i < 4; ++i) {
                t[i]     = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
                t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
            }
            for (int i = 0; i < 8; ++i) {
                _mm256_storeu_ps(KT + (k0 + i)*TCA_C + j0, t[i]);
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

// S[i][0..C) = sum_k q_i[k] * KT[k][0..C), for nq queries
void tca_scores(int64_t d, const float * KT, const float * const * qs, int64_t nq, float * S) {
    int64_t i = 0;
#if defined(__AVX512F__)
    static_assert(TCA_C == 64, "the AVX-512 score kernel assumes 64 rows per chunk");
    for (; i + 4 <= nq; i += 4) {
        __m512 acc[4][4];
        for (int a = 0; a < 4; ++a) for (int b = 0; b < 4; ++b) acc[a][b] = _mm512_setzero_ps();
        const float * q0 = qs[i + 0];
        const float * q1 = qs[i + 1];
        const float * q2 = qs[i + 2];
        const float * q3 = qs[i + 3];
        for (int64_t k = 0; k < d; ++k) {
            const float * kt = KT + k*TCA_C;
            const __m512 k0 = _mm512_loadu_ps(kt +  0);
            const __m512 k1 = _mm512_loadu_ps(kt + 16);
            const __m512 k2 = _mm512_loadu_ps(kt + 32);
            const __m512 k3 = _mm512_loadu_ps(kt + 48);
            const __m512 b0 = _mm512_set1_ps(q0[k]);
            const __m512 b1 = _mm512_set1_ps(q1[k]);
            const __m512 b2 = _mm512_set1_ps(q2[k]);
            const __m512 b3 = _mm512_set1_ps(q3[k]);
            acc[0][0] = _mm512_fmadd_ps(b0, k0, acc[0][0]); acc[0][1] = _mm512_fmadd_ps(b0, k1, acc[0][1]);
            acc[0][2] = _mm512_fmadd_ps(b0, k2, acc[0][2]); acc[0][3] = _mm512_fmadd_ps(b0, k3, acc[0][3]);
            acc[1][0] = _mm512_fmadd_ps(b1, k0, acc[1][0]); acc[1][1] = _mm512_fmadd_ps(b1, k1, acc[1][1]);
            acc[1][2] = _mm512_fmadd_ps(b1, k2, acc[1][2]); acc[1][3] = _mm512_fmadd_ps(b1, k3, acc[1][3]);
            acc[2][0] = _mm512_fmadd_ps(b2, k0, acc[2][0]); acc[2][1] = _mm512_fmadd_ps(b2, k1, acc[2][1]);
            acc[2][2] = _mm512_fmadd_ps(b2, k2, acc[2][2]); acc[2][3] = _mm512_fmadd_ps(b2, k3, acc[2][3]);
            acc[3][0] = _mm512_fmadd_ps(b3, k0, acc[3][0]); acc[3][1] = _mm512_fmadd_ps(b3, k1, acc[3][1]);
            acc[3][2] = _mm512_fmadd_ps(b3, k2, acc[3][2]); acc[3][3] = _mm512_fmadd_ps(b3, k3, acc[3][3]);
        }
        for (int a = 0; a < 4; ++a) {
            for (int b = 0; b < 4; ++b) {
                _mm512_storeu_ps(S + (i + a)*TCA_C + 16*b, acc[a][b]);
            }
        }
    }
    for (; i < nq; ++i) {
        // same per-element operation order as the 4-query block above
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const float * q = qs[i];
        for (int64_t k = 0; k < d; ++k) {
            const float * kt = KT + k*TCA_C;
            const __m512 b = _mm512_set1_ps(q[k]);
            a0 = _mm512_fmadd_ps(b, _mm512_loadu_ps(kt +  0), a0);
            a1 = _mm512_fmadd_ps(b, _mm512_loadu_ps(kt + 16), a1);
            a2 = _mm512_fmadd_ps(b, _mm512_loadu_ps(kt + 32), a2);
            a3 = _mm512_fmadd_ps(b, _mm512_loadu_ps(kt + 48), a3);
        }
        _mm512_storeu_ps(S + i*TCA_C +  0, a0);
        _mm512_storeu_ps(S + i*TCA_C + 16, a1);
        _mm512_storeu_ps(S + i*TCA_C + 32, a2);
        _mm512_storeu_ps(S + i*TCA_C + 48, a3);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    static_assert(TCA_C == 64, "the AVX2 score kernel assumes 64 rows per chunk");
    // two queries x 32 rows at a time (12 accumulators + 4 loads fit the 16 registers)
    for (; i + 2 <= nq; i += 2) {
        const float * q0 = qs[i + 0];
        const float * q1 = qs[i + 1];
        for (int64_t h = 0; h < TCA_C; h += 32) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
            for (int64_t k = 0; k < d; ++k) {
                const float * kt = KT + k*TCA_C + h;
                const __m256 k0 = _mm256_loadu_ps(kt +  0);
                const __m256 k1 = _mm256_loadu_ps(kt +  8);
                const __m256 k2 = _mm256_loadu_ps(kt + 16);
                const __m256 k3 = _mm256_loadu_ps(kt + 24);
                const __m256 x0 = _mm256_broadcast_ss(q0 + k);
                const __m256 x1 = _mm256_broadcast_ss(q1 + k);
                a0 = _mm256_fmadd_ps(x0, k0, a0); a1 = _mm256_fmadd_ps(x0, k1, a1);
                a2 = _mm256_fmadd_ps(x0, k2, a2); a3 = _mm256_fmadd_ps(x0, k3, a3);
                b0 = _mm256_fmadd_ps(x1, k0, b0); b1 = _mm256_fmadd_ps(x1, k1, b1);
                b2 = _mm256_fmadd_ps(x1, k2, b2); b3 = _mm256_fmadd_ps(x1, k3, b3);
            }
            float * s0 = S + (i + 0)*TCA_C + h;
            float * s1 = S + (i + 1)*TCA_C + h;
            _mm256_storeu_ps(s0, a0); _mm256_storeu_ps(s0 + 8, a1); _mm256_storeu_ps(s0 + 16, a2); _mm256_storeu_ps(s0 + 24, a3);
            _mm256_storeu_ps(s1, b0); _mm256_storeu_ps(s1 + 8, b1); _mm256_storeu_ps(s1 + 16, b2); _mm256_storeu_ps(s1 + 24, b3);
        }
    }
    for (; i < nq; ++i) {
        const float * q0 = qs[i];
        for (int64_t h = 0; h < TCA_C; h += 32) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (int64_t k = 0; k < d; ++k) {
                const float * kt = KT + k*TCA_C + h;
                const __m256 x0 = _mm256_broadcast_ss(q0 + k);
                a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(kt +  0), a0);
                a1 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(kt +  8), a1);
                a2 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(kt + 16), a2);
                a3 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(kt + 24), a3);
            }
            float * s0 = S + i*TCA_C + h;
            _mm256_storeu_ps(s0, a0); _mm256_storeu_ps(s0 + 8, a1); _mm256_storeu_ps(s0 + 16, a2); _mm256_storeu_ps(s0 + 24, a3);
        }
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
#if defined(__AVX512F__)
    const __m512 vms = _mm512_set1_ps(ms);
    for (; c + 64 <= d; c += 64) {
        __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(A + c +  0), vms);
        __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(A + c + 16), vms);
        __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(A + c + 32), vms);
        __m512 a3 = _mm512_mul_ps(_mm512_loadu_ps(A + c + 48), vms);
        for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.0f) {
                continue;
            }
            const __m512  b  = _mm512_set1_ps(p[j]);
            const float * vr = V + j*ldv + c;
            a0 = _mm512_fmadd_ps(b, _mm512_loadu_ps(vr +  0), a0);
            a1 = _mm512_fmadd_ps(b, _mm512_loadu_ps(vr + 16), a1);
            a2 = _mm512_fmadd_ps(b, _mm512_loadu_ps(vr + 32), a2);
            a3 = _mm512_fmadd_ps(b, _mm512_loadu_ps(vr + 48), a3);
        }
        _mm512_storeu_ps(A + c +  0, a0);
        _mm512_storeu_ps(A + c + 16, a1);
        _mm512_storeu_ps(A + c + 32, a2);
        _mm512_storeu_ps(A + c + 48, a3);
    }
    for (; c + 16 <= d; c += 16) {
        __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(A + c), vms);
        for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.0f) {
                continue;
            }
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(V + j*ldv + c), a0);
        }
        _mm512_storeu_ps(A + c, a0);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 vms = _mm256_set1_ps(ms);
    for (; c + 32 <= d; c += 32) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(A + c +  0), vms);
        __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(A + c +  8), vms);
        __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(A + c + 16), vms);
        __m256 a3 = _mm256_mul_ps(_mm256_loadu_ps(A + c + 24), vms);
        for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.0f) {
                continue;
            }
            const __m256  b  = _mm256_set1_ps(p[j]);
            const float * vr = V + j*ldv + c;
            a0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(vr +  0), a0);
            a1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(vr +  8), a1);
            a2 = _mm256_fmadd_ps(b, _mm256_loadu_ps(vr + 16), a2);
            a3 = _mm256_fmadd_ps(b, _mm256_loadu_ps(vr + 24), a3);
        }
        _mm256_storeu_ps(A + c +  0, a0);
        _mm256_storeu_ps(A + c +  8, a1);
        _mm256_storeu_ps(A + c + 16, a2);
        _mm256_storeu_ps(A + c + 24, a3);
    }
    for (; c + 8 <= d; c += 8) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(A + c), vms);
        for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.0f) {
                continue;
            }
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(V + j*ldv + c), a0);
        }
        _mm256_storeu_ps(A + c, a0);
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
#if defined(__AVX512F__)
    if (d % 64 == 0) {
        const __m512 vms0 = _mm512_set1_ps(ms0);
        const __m512 vms1 = _mm512_set1_ps(ms1);
        for (int64_t c = 0; c < d; c += 64) {
            __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(A0 + c +  0), vms0);
            __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(A0 + c + 16), vms0);
            __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(A0 + c + 32), vms0);
            __m512 a3 = _mm512_mul_ps(_mm512_loadu_ps(A0 + c + 48), vms0);
            __m512 b0 = _mm512_mul_ps(_mm512_loadu_ps(A1 + c +  0), vms1);
            __m512 b1 = _mm512_mul_ps(_mm512_loadu_ps(A1 + c + 16), vms1);
            __m512 b2 = _mm512_mul_ps(_mm512_loadu_ps(A1 + c + 32), vms1);
            __m512 b3 = _mm512_mul_ps(_mm512_loadu_ps(A1 + c + 48), vms1);
            for (int64_t j = 0; j < n; ++j) {
                const bool u0 = p0[j] != 0.0f, u1 = p1[j] != 0.0f;
                if (!u0 && !u1) {
                    continue;
                }
                const float * vr = V + j*ldv + c;
                const __m512 v0 = _mm512_loadu_ps(vr +  0);
                const __m512 v1 = _mm512_loadu_ps(vr + 16);
                const __m512 v2 = _mm512_loadu_ps(vr + 32);
                const __m512 v3 = _mm512_loadu_ps(vr + 48);
                if (u0) {
                    const __m512 w = _mm512_set1_ps(p0[j]);
                    a0 = _mm512_fmadd_ps(w, v0, a0); a1 = _mm512_fmadd_ps(w, v1, a1);
                    a2 = _mm512_fmadd_ps(w, v2, a2); a3 = _mm512_fmadd_ps(w, v3, a3);
                }
                if (u1) {
                    const __m512 w = _mm512_set1_ps(p1[j]);
                    b0 = _mm512_fmadd_ps(w, v0, b0); b1 = _mm512_fmadd_ps(w, v1, b1);
                    b2 = _mm512_fmadd_ps(w, v2, b2); b3 = _mm512_fmadd_ps(w, v3, b3);
                }
            }
            _mm512_storeu_ps(A0 + c +  0, a0); _mm512_storeu_ps(A0 + c + 16, a1);
            _mm512_storeu_ps(A0 + c + 32, a2); _mm512_storeu_ps(A0 + c + 48, a3);
            _mm512_storeu_ps(A1 + c +  0, b0); _mm512_storeu_ps(A1 + c + 16, b1);
            _mm512_storeu_ps(A1 + c + 32, b2); _mm512_storeu_ps(A1 + c + 48, b3);
        }
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (d % 32 == 0) {
        const __m256 vms0 = _mm256_set1_ps(ms0);
        const __m256 vms1 = _mm256_set1_ps(ms1);
        for (int64_t c = 0; c < d; c += 32) {
            __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(A0 + c +  0), vms0);
            __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(A0 + c +  8), vms0);
            __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(A0 + c + 16), vms0);
            __m256 a3 = _mm256_mul_ps(_mm256_loadu_ps(A0 + c + 24), vms0);
            __m256 b0 = _mm256_mul_ps(_mm256_loadu_ps(A1 + c +  0), vms1);
            __m256 b1 = _mm256_mul_ps(_mm256_loadu_ps(A1 + c +  8), vms1);
            __m256 b2 = _mm256_mul_ps(_mm256_loadu_ps(A1 + c + 16), vms1);
            __m256 b3 = _mm256_mul_ps(_mm256_loadu_ps(A1 + c + 24), vms1);
            for (int64_t j = 0; j < n; ++j) {
                const bool u0 = p0[j] != 0.0f, u1 = p1[j] != 0.0f;
                if (!u0 && !u1) {
                    continue;
                }
                const float * vr = V + j*ldv + c;
                const __m256 v0 = _mm256_loadu_ps(vr +  0);
                const __m256 v1 = _mm256_loadu_ps(vr +  8);
                const __m256 v2 = _mm256_loadu_ps(vr + 16);
                const __m256 v3 = _mm256_loadu_ps(vr + 24);
                if (u0) {
                    const __m256 w = _mm256_set1_ps(p0[j]);
                    a0 = _mm256_fmadd_ps(w, v0, a0); a1 = _mm256_fmadd_ps(w, v1, a1);
                    a2 = _mm256_fmadd_ps(w, v2, a2); a3 = _mm256_fmadd_ps(w, v3, a3);
                }
                if (u1) {
                    const __m256 w = _mm256_set1_ps(p1[j]);
                    b0 = _mm256_fmadd_ps(w, v0, b0); b1 = _mm256_fmadd_ps(w, v1, b1);
                    b2 = _mm256_fmadd_ps(w, v2, b2); b3 = _mm256_fmadd_ps(w, v3, b3);
                }
            }
            _mm256_storeu_ps(A0 + c +  0, a0); _mm256_storeu_ps(A0 + c +  8, a1);
            _mm256_storeu_ps(A0 + c + 16, a2); _mm256_storeu_ps(A0 + c + 24, a3);
            _mm256_storeu_ps(A1 + c +  0, b0); _mm256_storeu_ps(A1 + c +  8, b1);
            _mm256_storeu_ps(A1 + c + 16, b2); _mm256_storeu_ps(A1 + c + 24, b3);
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
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * kpos = dst->src[3];
    const ggml_tensor * meta = dst->src[4];
    const ggml_tensor * qpos = dst->src[5];

    const int64_t d         = q->ne[0];
    const int64_t T         = q->ne[1];
    const int64_t n_head    = q->ne[2];
    const int64_t n_slots   = k->ne[1];
    const int64_t n_head_kv = ggml_get_op_params_i32(dst, 0);
    const float   scale     = ggml_get_op_params_f32(dst, 1);

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && q->type == GGML_TYPE_F32);
    GGML_ASSERT(k->type == v->type);
    GGML_ASSERT(ggml_is_contiguous(q) && ggml_is_contiguous(k) && ggml_is_contiguous(v) && ggml_is_contiguous(dst));
    GGML_ASSERT(ggml_is_contiguous(kpos) && ggml_is_contiguous(meta) && ggml_is_contiguous(qpos));
    GGML_ASSERT(k->ne[0] == d && v->ne[0] == d && v->ne[1] == n_slots);
    GGML_ASSERT(dst->ne[0] == d && dst->ne[1] == n_head && dst->ne[2] == T);
    GGML_ASSERT(n_head_kv > 0 && n_head % n_head_kv == 0);
    GGML_ASSERT(ggml_nelements(meta) == 2*n_head_kv && ggml_nelements(kpos) == n_slots && ggml_nelements(qpos) == T);

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

    for (int64_t g = 0; g < n_head_kv; ++g) {
        GGML_ASSERT(hm[2*g] >= 0 && hm[2*g + 1] >= 0 && (int64_t) hm[2*g] + hm[2*g + 1] <= n_slots &&
                    "tca_attn: head range outside the K/V slots");
    }

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
#if defined(__AVX512F__) && defined(__AVX512DQ__)
                static_assert(TCA_C == 64, "the AVX-512 softmax assumes 64 rows per chunk");
                const __m512  vscale = _mm512_set1_ps(scale);
                const __m512  vninf  = _mm512_set1_ps(-INFINITY);
                const __m512i vqp    = _mm512_set1_epi32(qpi);
                __m512 x[4];
                __m512 vmax = vninf;
                for (int b = 0; b < 4; ++b) {
                    x[b] = _mm512_mul_ps(_mm512_loadu_ps(s + 16*b), vscale);
                    if (need_mask) {
                        const int64_t   nv = std::min<int64_t>(std::max<int64_t>(nc - 16*b, 0), 16);
                        const __mmask16 valid = (__mmask16) ((1u << nv) - 1u);
                        const __mmask16 m = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(kpad + 16*b), vqp) | (__mmask16) ~valid;
                        x[b] = _mm512_mask_mov_ps(x[b], m, vninf);
                    }
                    vmax = _mm512_max_ps(vmax, x[b]);
                }
                const float mc = _mm512_reduce_max_ps(vmax);
                if (mc == -INFINITY) {
                    continue;  // nothing visible in this chunk: the state is unchanged
                }
                Mn = std::max(M[i], mc);
                const __m512 vM = _mm512_set1_ps(Mn);
                __m512 vsum = _mm512_setzero_ps();
                for (int b = 0; b < 4; ++b) {
                    const __m512 e = ggml_v_expf(_mm512_sub_ps(x[b], vM));  // exp(-inf) = 0
                    _mm512_storeu_ps(s + 16*b, e);
                    vsum = _mm512_add_ps(vsum, e);
                }
                sum = _mm512_reduce_add_ps(vsum);
#elif defined(__AVX2__) && defined(__FMA__)
                static_assert(TCA_C == 64, "the AVX2 softmax assumes 64 rows per chunk");
                const __m256  vscale = _mm256_set1_ps(scale);
                const __m256  vninf  = _mm256_set1_ps(-INFINITY);
                const __m256i vqp    = _mm256_set1_epi32(qpi);
                const __m256i lane   = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                __m256 x[8];
                __m256 vmax = vninf;
                for (int b = 0; b < 8; ++b) {
                    x[b] = _mm256_mul_ps(_mm256_loadu_ps(s + 8*b), vscale);
                    if (need_mask) {
                        const __m256i kv   = _mm256_loadu_si256((const __m256i *) (kpad + 8*b));
                        const __m256i past = _mm256_cmpgt_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(8*b)),
                                                                _mm256_set1_epi32((int) nc - 1));
                        const __m256i m    = _mm256_or_si256(_mm256_cmpgt_epi32(kv, vqp), past);
                        x[b] = _mm256_blendv_ps(x[b], vninf, _mm256_castsi256_ps(m));
                    }
                    vmax = _mm256_max_ps(vmax, x[b]);
                }
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
                const float mc = _mm_cvtss_f32(m4);
                if (mc == -INFINITY) {
                    continue;  // nothing visible in this chunk: the state is unchanged
                }
                Mn = std::max(M[i], mc);
                const __m256 vM = _mm256_set1_ps(Mn);
                __m256 vsum = _mm256_setzero_ps();
                for (int b = 0; b < 8; ++b) {
                    const __m256 e = ggml_v_expf(_mm256_sub_ps(x[b], vM));
                    _mm256_storeu_ps(s + 8*b, e);
                    vsum = _mm256_add_ps(vsum, e);
                }
                __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
                s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
                sum = _mm_cvtss_f32(s4);
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
