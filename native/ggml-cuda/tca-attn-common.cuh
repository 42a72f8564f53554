// tca_ggml — CUDA kernels of GGML_OP_TCA_ATTN: what the kernels share (arguments, the CTA's work,
// warp reductions, K/V tile loads, query loads). Included by tca-attn.cu and its kernel headers
// (tca-attn-ffma.cuh, tca-attn-mma.cuh, tca-attn-vec.cuh); tca-select.cu uses its warp reductions.
//
// Semantics (ggml.h, as the CPU kernel native/ggml-cpu/tca-attn.cpp): for query head h (KV head
// g = h / (n_head/n_head_kv)) and token t,
//   o = softmax(scale * q . K_j) V  over the rows j in [meta[2g], meta[2g] + meta[2g+1]) with
//   kpos[j] <= qpos[t];  o = 0 when no row is visible.
//
// A CTA owns one KV head g, a range of g's query heads and a tile of tokens (the "queries" of
// the CTA: heads x tokens), so that every K/V row it brings into shared memory serves all of
// them. It walks the head's rows in chunks (skipping chunks no query of the CTA can see) with an
// online softmax in f32 (running max m, running sum l, unnormalised accumulator). The rows of a
// head can be split over several CTAs (blockIdx.y, split-K / flash-decoding): each split then
// writes (m, l, acc) and tca_attn_combine (tca-attn-vec.cuh) merges them, so that one decode query
// still fills the GPU. The head ranges live in device memory (meta), so the split is decided on
// the host from n_slots / n_head_kv and each split takes its share of the head's actual chunks.
#pragma once

#include "common.cuh"

#include <climits>
#include <cstdint>
#include <cstring>

#define TCA_NT 128  // threads per CTA (4 warps)

namespace {

struct tca_args {
    const char * q;
    const char * k;
    const char * v;
    const int  * kpos;
    const float * kposf;    // kpos as f32 (the retention cache's layout), read directly; or null
    const int  * meta;
    const int  * qpos;
    float      * dst;       // [D, n_head, T]
    float      * part_acc;  // [nsplit][T][n_head][D]   (nsplit > 1)
    float2     * part_ml;   // [nsplit][T][n_head] (m, l)
    int          T;
    int          n_head;
    int          n_head_kv;
    int          n_slots;
    int          hs;        // query heads per CTA
    int          nhs;       // head ranges per KV head
    int          tt;        // tokens per CTA
    int          nsplit;
    size_t       q_nb1;
    size_t       q_nb2;
    size_t       k_nb1;
    size_t       v_nb1;
    float        scale;
};

// position of row r (kpos i32, or f32 holding exact integers)
__device__ __forceinline__ int tca_kp(const tca_args & a, int r) {
    return a.kposf ? (int) a.kposf[r] : a.kpos[r];
}

// butterfly reduction over the 32 lanes of a warp (every lane gets the result)
template <typename T, typename F>
__device__ __forceinline__ T tca_warp_reduce(T x, F f) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x = f(x, __shfl_xor_sync(0xffffffff, x, o, 32));
    }
    return x;
}
__device__ __forceinline__ float tca_warp_max(float x) { return tca_warp_reduce(x, [](float a, float b) { return fmaxf(a, b); }); }
__device__ __forceinline__ float tca_warp_sum(float x) { return tca_warp_reduce(x, [](float a, float b) { return a + b; }); }
__device__ __forceinline__ int   tca_warp_min_i(int x) { return tca_warp_reduce(x, [](int a, int b) { return min(a, b); }); }
__device__ __forceinline__ int   tca_warp_max_i(int x) { return tca_warp_reduce(x, [](int a, int b) { return max(a, b); }); }

// the CTA of blockIdx.x: KV head g, its first query head h0 and count nh, first token t0 and count ntk
struct tca_cta {
    int g, h0, nh, t0, ntk;
};

__device__ __forceinline__ tca_cta tca_cta_of(const tca_args & a) {
    int bx = blockIdx.x;
    const int hr = bx % a.nhs;
    bx /= a.nhs;
    tca_cta c;
    c.g = bx % a.n_head_kv;
    const int tile = bx / a.n_head_kv;
    const int G = a.n_head / a.n_head_kv;
    c.h0  = c.g*G + hr*a.hs;
    c.nh  = min(a.hs, G - hr*a.hs);
    c.t0  = tile*a.tt;
    c.ntk = min(a.tt, a.T - c.t0);
    return c;
}

// the latest query position of the CTA's NQ = nh*tt query slots (every lane of a warp gets it; no
// barrier needed); returns false when the CTA has no valid query (then it reads no rows)
template <int NQ>
__device__ __forceinline__ bool tca_cta_qmax(const tca_args & a, const tca_cta & cta, int lane, int & qmax) {
    qmax = INT_MIN;
    bool any_valid = false;
    for (int i = lane; i < NQ; i += 32) {
        if (i / a.tt < cta.nh && i % a.tt < cta.ntk) {
            qmax = max(qmax, a.qpos[cta.t0 + i % a.tt]);
            any_valid = true;
        }
    }
    qmax = tca_warp_max_i(qmax);
    return __any_sync(0xffffffff, any_valid);
}

// rows [off, off + len) of the head, clamped to the slots (the CPU asserts this instead)
__device__ __forceinline__ void tca_head_rows(const tca_args & a, int g, int & off, int & len) {
    off = a.meta[2*g];
    len = a.meta[2*g + 1];
    off = min(max(off, 0), a.n_slots);
    len = min(max(len, 0), a.n_slots - off);
}

// the chunks [c0, c1) of this split
__device__ __forceinline__ void tca_split_chunks(int len, int C, int nsplit, int & c0, int & c1) {
    const int nchunk = (len + C - 1)/C;
    const int per    = (nchunk + nsplit - 1)/nsplit;
    c0 = min(nchunk, (int) blockIdx.y*per);
    c1 = min(nchunk, c0 + per);
}

// One chunk of C rows of K or V: every global load of the chunk is issued first (load()), then
// converted and written to shared memory (store_f32 / store_f16), so that a chunk costs one
// memory round trip. Units of 16 bytes (f32: 4 values, f16: 8 values) or, for q8_0, pairs of
// blocks (68 bytes = 17 aligned words: rows hold an even number of 34-byte blocks, so a pair
// starts 4-byte aligned). Rows [nc, C) read as zero (their probabilities are 0, and 0 * garbage
// could be NaN).
__device__ __forceinline__ uint32_t tca_pack_h2(const float lo, const float hi) {
    const half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
}

__device__ __forceinline__ float tca_q8_val(const uint32_t (&w)[17], const int byte) {
    return (float) (int8_t) (w[byte >> 2] >> (8*(byte & 3)));
}

template <int D, int TYPE, int C>
struct tca_tile {
    static constexpr bool Q8  = TYPE == GGML_TYPE_Q8_0;
    static constexpr int  VPU = TYPE == GGML_TYPE_F32 ? 4 : 8;  // values per 16-byte unit
    static constexpr int  UPR = Q8 ? D/(2*QK8_0) : D/VPU;       // units per row
    static constexpr int  NU  = C*UPR;
    static constexpr int  IT  = (NU + TCA_NT - 1)/TCA_NT;
    static constexpr int  W   = Q8 ? 17 : 4;                     // 32-bit words per unit
    static_assert(!Q8 || D % (2*QK8_0) == 0, "q8_0 rows of an even number of blocks");

    uint32_t w[IT][W];

    __device__ __forceinline__ void load(const char * __restrict__ src, const size_t nb1, const int nc) {
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int  e  = threadIdx.x + it*TCA_NT;
            const int  r  = e / UPR;
            const int  c  = e % UPR;
            const bool ok = (NU % TCA_NT == 0 || e < NU) && r < nc;
            if constexpr (Q8) {
                const uint32_t * p = (const uint32_t *) (src + (size_t) r*nb1 + c*(2*sizeof(block_q8_0)));
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    w[it][k] = ok ? p[k] : 0u;
                }
            } else {
                uint4 x = make_uint4(0u, 0u, 0u, 0u);
                if (ok) {
                    x = *(const uint4 *) (src + (size_t) r*nb1 + c*16);
                }
                w[it][0] = x.x; w[it][1] = x.y; w[it][2] = x.z; w[it][3] = x.w;
            }
        }
    }

    // f(it, r, c) for each unit this thread holds: unit c of chunk row r
    template <typename F>
    __device__ __forceinline__ void for_each_unit(F && f) const {
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int e = threadIdx.x + it*TCA_NT;
            if (NU % TCA_NT != 0 && e >= NU) {
                continue;
            }
            f(it, e / UPR, e % UPR);
        }
    }

    // the scales of a q8_0 unit's two blocks (each block: f16 scale, 32 int8)
    __device__ __forceinline__ float2 q8_scales(const int it) const {
        return make_float2(__half2float(__ushort_as_half((unsigned short) (w[it][0] & 0xffffu))),
                           __half2float(__ushort_as_half((unsigned short) (w[it][8] >> 16))));
    }

    // -> f32 rows of stride DP floats
    template <int DP>
    __device__ __forceinline__ void store_f32(float * __restrict__ dst) const {
        for_each_unit([&](const int it, const int r, const int c) {
            if constexpr (Q8) {
                float * o = dst + r*DP + c*2*QK8_0;
                const float d0 = q8_scales(it).x;
                const float d1 = q8_scales(it).y;
#pragma unroll
                for (int m = 0; m < QK8_0/4; ++m) {
                    *(float4 *) (o + 4*m) = make_float4(d0*tca_q8_val(w[it], 2 + 4*m + 0), d0*tca_q8_val(w[it], 2 + 4*m + 1),
                                                        d0*tca_q8_val(w[it], 2 + 4*m + 2), d0*tca_q8_val(w[it], 2 + 4*m + 3));
                    *(float4 *) (o + QK8_0 + 4*m) = make_float4(d1*tca_q8_val(w[it], 36 + 4*m + 0), d1*tca_q8_val(w[it], 36 + 4*m + 1),
                                                                d1*tca_q8_val(w[it], 36 + 4*m + 2), d1*tca_q8_val(w[it], 36 + 4*m + 3));
                }
            } else if constexpr (TYPE == GGML_TYPE_F32) {
                *(uint4 *) (dst + r*DP + c*4) = make_uint4(w[it][0], w[it][1], w[it][2], w[it][3]);
            } else {
                float f[8];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float2 h = __half22float2(__halves2half2(__ushort_as_half((unsigned short) (w[it][k] & 0xffffu)),
                                                                   __ushort_as_half((unsigned short) (w[it][k] >> 16))));
                    f[2*k + 0] = h.x;
                    f[2*k + 1] = h.y;
                }
                *(float4 *) (dst + r*DP + c*8 + 0) = make_float4(f[0], f[1], f[2], f[3]);
                *(float4 *) (dst + r*DP + c*8 + 4) = make_float4(f[4], f[5], f[6], f[7]);
            }
        });
    }

    // -> f16 rows of stride DH halves (f16 / q8_0)
    template <int DH>
    __device__ __forceinline__ void store_f16(half * __restrict__ dst) const {
        for_each_unit([&](const int it, const int r, const int c) {
            if constexpr (Q8) {
                uint4 * o = (uint4 *) (dst + r*DH + c*2*QK8_0);
                const float d0 = q8_scales(it).x;
                const float d1 = q8_scales(it).y;
#pragma unroll
                for (int m = 0; m < QK8_0/8; ++m) {
                    uint4 x;
                    x.x = tca_pack_h2(d0*tca_q8_val(w[it], 2 + 8*m + 0), d0*tca_q8_val(w[it], 2 + 8*m + 1));
                    x.y = tca_pack_h2(d0*tca_q8_val(w[it], 2 + 8*m + 2), d0*tca_q8_val(w[it], 2 + 8*m + 3));
                    x.z = tca_pack_h2(d0*tca_q8_val(w[it], 2 + 8*m + 4), d0*tca_q8_val(w[it], 2 + 8*m + 5));
                    x.w = tca_pack_h2(d0*tca_q8_val(w[it], 2 + 8*m + 6), d0*tca_q8_val(w[it], 2 + 8*m + 7));
                    o[m] = x;
                    x.x = tca_pack_h2(d1*tca_q8_val(w[it], 36 + 8*m + 0), d1*tca_q8_val(w[it], 36 + 8*m + 1));
                    x.y = tca_pack_h2(d1*tca_q8_val(w[it], 36 + 8*m + 2), d1*tca_q8_val(w[it], 36 + 8*m + 3));
                    x.z = tca_pack_h2(d1*tca_q8_val(w[it], 36 + 8*m + 4), d1*tca_q8_val(w[it], 36 + 8*m + 5));
                    x.w = tca_pack_h2(d1*tca_q8_val(w[it], 36 + 8*m + 6), d1*tca_q8_val(w[it], 36 + 8*m + 7));
                    o[QK8_0/8 + m] = x;
                }
            } else {
                static_assert(Q8 || TYPE == GGML_TYPE_F16, "f16 tiles: f16 or q8_0 K/V");
                *(uint4 *) (dst + r*DH + c*8) = make_uint4(w[it][0], w[it][1], w[it][2], w[it][3]);
            }
        });
    }
};

// the CTA's queries -> shared memory rows of stride LD (f32 or f16), zero for the padding
// queries; loads issued in batches (scalar: q may be any contiguous view)
template <int NQ, int D, int LD, bool F16, typename T>
__device__ __forceinline__ void tca_load_q(const tca_args & a, const tca_cta & cta, T * __restrict__ dst) {
    constexpr int N  = NQ*D;
    constexpr int QB = N/TCA_NT < 8 ? (N/TCA_NT < 1 ? 1 : N/TCA_NT) : 8;
    for (int e0 = 0; e0 < N; e0 += QB*TCA_NT) {
        float x[QB];
#pragma unroll
        for (int b = 0; b < QB; ++b) {
            const int e  = e0 + b*TCA_NT + threadIdx.x;
            const int i  = e / D;
            const int c  = e % D;
            const int hh = i / a.tt;
            const int tk = i % a.tt;
            x[b] = 0.0f;
            if (e < N && hh < cta.nh && tk < cta.ntk) {
                x[b] = *(const float *) (a.q + (size_t) (cta.t0 + tk)*a.q_nb1 + (size_t) (cta.h0 + hh)*a.q_nb2 + c*sizeof(float));
            }
        }
#pragma unroll
        for (int b = 0; b < QB; ++b) {
            const int e = e0 + b*TCA_NT + threadIdx.x;
            if (e < N) {
                if constexpr (F16) {
                    dst[(e / D)*LD + e % D] = __float2half(x[b]);
                } else {
                    dst[(e / D)*LD + e % D] = x[b];
                }
            }
        }
    }
}

} // namespace
