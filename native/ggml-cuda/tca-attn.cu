// tca_ggml — CUDA kernels of GGML_OP_TCA_ATTN.
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
// writes (m, l, acc) and tca_attn_combine merges them, so that one decode query still fills
// the GPU. The head ranges live in device memory (meta), so the split is decided on the host
// from n_slots / n_head_kv and each split takes its share of the head's actual chunks.
//
// The kernels:
//  - tca_attn_ffma: f32 FMA everywhere (K/V dequantised to f32 in shared memory). Used for f32
//    K/V (exact f32, like the CPU) and for few queries per KV head (decode) with q8_0 K/V.
//  - tca_attn_vec:  few queries per KV head (decode) with f16 K/V: f32 arithmetic, rows streamed
//    from global memory into registers by each warp independently (no barrier in the loop).
//  - tca_attn_mma:  tensor cores (mma.sync m16n8k16 f16 x f16 -> f32, Ampere+), for f16 / q8_0
//    K/V with many queries (prefill). 4 warps x 16 queries; q, K (q8_0 dequantised) and the
//    probabilities P are rounded to f16 for the products (as upstream's flash attention does),
//    scores, softmax and accumulators are f32.
//  - tca_attn_mma2: tca_attn_mma for f16 K/V with D <= 128, double-buffered with cp.async (the
//    default for f16 prefill with D = 64; TCA_CUDA_ATTN=mma1 forces the single-buffered one).
// TCA_CUDA_ATTN=ffma|mma|mma1|mma2|vec (environment, read per call) forces one kernel (tests, benchmarks).
#include "tca-attn.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
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

__device__ __forceinline__ float tca_warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o, 32));
    }
    return x;
}

__device__ __forceinline__ float tca_warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x += __shfl_xor_sync(0xffffffff, x, o, 32);
    }
    return x;
}

__device__ __forceinline__ int tca_warp_min_i(int x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x = min(x, __shfl_xor_sync(0xffffffff, x, o, 32));
    }
    return x;
}

__device__ __forceinline__ int tca_warp_max_i(int x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x = max(x, __shfl_xor_sync(0xffffffff, x, o, 32));
    }
    return x;
}

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

// ------------------------------------------------------------------------------------------
// FFMA kernel
// ------------------------------------------------------------------------------------------
template <int D, int NQ>
struct tca_ffma_cfg {
    static constexpr int C   = 32;                // rows per chunk (one per lane in phase A)
    static constexpr int DP  = D + 4;             // padded row (floats): conflict-free float4 columns
    static constexpr int DT  = D/4;               // threads covering one output row (float4 each)
    static constexpr int NG  = TCA_NT/DT;         // thread groups in the P.V phase
    static constexpr int NGQ = NQ/8 < 1 ? 1 : (NQ/8 > NG ? NG : NQ/8);  // groups over queries
    static constexpr int QPT = NQ/NGQ;            // queries per thread
    static constexpr int NGR = NG/NGQ;            // groups over rows (reduced at the end)
    // shared memory, in floats
    static constexpr int OFF_Q  = 0;              // Qs [NQ][DP]
    static constexpr int OFF_K  = OFF_Q  + NQ*DP; // Ks [C][DP]
    static constexpr int OFF_V  = OFF_K  + C*DP;  // Vs [C][DP]
    static constexpr int OFF_SP = OFF_V  + C*DP;  // Sp [4][NQ][C]  partial scores (4 slices of D)
    static constexpr int OFF_P  = OFF_SP + 4*NQ*C;// Ps [NQ][C]     probabilities
    static constexpr int OFF_M  = OFF_P  + NQ*C;  // running max
    static constexpr int OFF_L  = OFF_M  + NQ;    // running sum
    static constexpr int OFF_MS = OFF_L  + NQ;    // rescale factor of the current chunk
    static constexpr int OFF_KP = OFF_MS + NQ;    // int kpos of the chunk [C]
    static constexpr int OFF_QP = OFF_KP + C;     // int qpos of each query [NQ]
    static constexpr int OFF_QV = OFF_QP + NQ;    // int query valid [NQ]
    static constexpr int NF     = OFF_QV + NQ;
    static constexpr size_t SMEM = (size_t) NF*sizeof(float);

    static_assert(D % 16 == 0 && TCA_NT % DT == 0, "unsupported head size");
    static_assert(NQ % NGQ == 0 && NG % NGQ == 0, "bad query split");
    static_assert((NGR - 1)*NQ*D <= 2*C*DP, "row-group reduction does not fit in Ks+Vs");
};

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

    // -> f32 rows of stride DP floats
    template <int DP>
    __device__ __forceinline__ void store_f32(float * __restrict__ dst) const {
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int e = threadIdx.x + it*TCA_NT;
            if (NU % TCA_NT != 0 && e >= NU) {
                continue;
            }
            const int r = e / UPR;
            const int c = e % UPR;
            if constexpr (Q8) {
                float * o = dst + r*DP + c*2*QK8_0;
                const float d0 = __half2float(__ushort_as_half((unsigned short) (w[it][0] & 0xffffu)));
                const float d1 = __half2float(__ushort_as_half((unsigned short) (w[it][8] >> 16)));
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
        }
    }

    // -> f16 rows of stride DH halves (f16 / q8_0)
    template <int DH>
    __device__ __forceinline__ void store_f16(half * __restrict__ dst) const {
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int e = threadIdx.x + it*TCA_NT;
            if (NU % TCA_NT != 0 && e >= NU) {
                continue;
            }
            const int r = e / UPR;
            const int c = e % UPR;
            if constexpr (Q8) {
                uint4 * o = (uint4 *) (dst + r*DH + c*2*QK8_0);
                const float d0 = __half2float(__ushort_as_half((unsigned short) (w[it][0] & 0xffffu)));
                const float d1 = __half2float(__ushort_as_half((unsigned short) (w[it][8] >> 16)));
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
        }
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

// query i of the CTA <-> (head h0 + i / tt, token t0 + i % tt)
template <int D, int NQ, int TYPE>
__global__ void __launch_bounds__(TCA_NT) tca_attn_ffma(const tca_args a) {
    using cfg = tca_ffma_cfg<D, NQ>;
    constexpr int C  = cfg::C;
    constexpr int DP = cfg::DP;

    extern __shared__ float4 tca_smem_f4[];
    float * sm  = (float *) tca_smem_f4;
    float * Qs  = sm + cfg::OFF_Q;
    float * Ks  = sm + cfg::OFF_K;
    float * Vs  = sm + cfg::OFF_V;
    float * Sp  = sm + cfg::OFF_SP;
    float * Ps  = sm + cfg::OFF_P;
    float * Ms  = sm + cfg::OFF_M;
    float * Ls  = sm + cfg::OFF_L;
    float * MSs = sm + cfg::OFF_MS;
    int   * kps = (int *) (sm + cfg::OFF_KP);
    int   * qps = (int *) (sm + cfg::OFF_QP);
    int   * qvs = (int *) (sm + cfg::OFF_QV);

    const int tid  = threadIdx.x;
    const int lane = tid % 32;
    const int w    = tid / 32;

    const tca_cta cta = tca_cta_of(a);

    // the head's rows, this split's chunks, the first chunk's positions (loads issued early)
    int off, len;
    tca_head_rows(a, cta.g, off, len);
    int ch0, ch1;
    tca_split_chunks(len, C, a.nsplit, ch0, ch1);
    int kp_cur = (ch0 < ch1 && lane < len - ch0*C) ? tca_kp(a, off + ch0*C + lane) : INT_MAX;

    // queries -> shared memory
    tca_load_q<NQ, D, DP, false>(a, cta, Qs);
    for (int i = tid; i < NQ; i += TCA_NT) {
        const int  hh    = i / a.tt;
        const int  tk    = i % a.tt;
        const bool valid = hh < cta.nh && tk < cta.ntk;
        qvs[i] = valid;
        qps[i] = valid ? a.qpos[cta.t0 + tk] : 0;
        Ms[i]  = -INFINITY;
        Ls[i]  = 0.0f;
        MSs[i] = 1.0f;
    }
    __syncthreads();

    int qmax = INT_MIN;
    bool any_valid = false;
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
        if (qvs[i]) {
            qmax = max(qmax, qps[i]);
            any_valid = true;
        }
    }
    if (!any_valid) {
        ch1 = ch0;
    }

    // P.V mapping: thread -> (query group zq, row group zr, float4 column c4)
    const int z  = tid / cfg::DT;
    const int c4 = tid % cfg::DT;
    const int zq = z % cfg::NGQ;
    const int zr = z / cfg::NGQ;

    float acc[cfg::QPT][4];
#pragma unroll
    for (int u = 0; u < cfg::QPT; ++u) {
        acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.0f;
    }

    int kp_nxt = INT_MAX;
    for (int ch = ch0; ch < ch1; ++ch, kp_cur = kp_nxt) {
        const int r0 = ch*C;
        const int nc = min(C, len - r0);
        // the next chunk's positions, one chunk ahead
        kp_nxt = (ch + 1 < ch1 && lane < len - r0 - C) ? tca_kp(a, off + r0 + C + lane) : INT_MAX;

        // every warp has the chunk's positions: CTA-uniform skip without a barrier
        const int kp   = kp_cur;
        const int kmin = tca_warp_min_i(kp);
        if (kmin > qmax) {
            continue;  // no query of the CTA sees any row of the chunk: states unchanged
        }
        if (w == 0) {
            kps[lane] = kp;
        }
        {
            tca_tile<D, TYPE, C> tk, tv;
            tk.load(a.k + (size_t) (off + r0)*a.k_nb1, a.k_nb1, nc);
            tv.load(a.v + (size_t) (off + r0)*a.v_nb1, a.v_nb1, nc);
            tk.template store_f32<DP>(Ks);
            tv.template store_f32<DP>(Vs);
        }
        __syncthreads();

        // phase A: warp w, lane j: partial q_i . K_j over the w-th quarter of the dims
        {
            float s[NQ];
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                s[i] = 0.0f;
            }
            const float * kr = Ks + lane*DP + w*(D/4);
            const float * qr = Qs + w*(D/4);
#pragma unroll 4
            for (int c = 0; c < D/4; c += 4) {
                const float4 kk = *(const float4 *) (kr + c);
#pragma unroll
                for (int i = 0; i < NQ; ++i) {
                    const float4 qq = *(const float4 *) (qr + i*DP + c);
                    s[i] = fmaf(qq.x, kk.x, s[i]);
                    s[i] = fmaf(qq.y, kk.y, s[i]);
                    s[i] = fmaf(qq.z, kk.z, s[i]);
                    s[i] = fmaf(qq.w, kk.w, s[i]);
                }
            }
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                Sp[(w*NQ + i)*C + lane] = s[i];
            }
        }
        __syncthreads();

        // phase A2: one warp per query, lane j: mask, online softmax
        for (int i = w; i < NQ; i += 4) {
            if (!qvs[i]) {
                Ps[i*C + lane] = 0.0f;
                if (lane == 0) {
                    MSs[i] = 1.0f;
                }
                continue;
            }
            const float sc = (Sp[(0*NQ + i)*C + lane] + Sp[(1*NQ + i)*C + lane] +
                              Sp[(2*NQ + i)*C + lane] + Sp[(3*NQ + i)*C + lane])*a.scale;
            const bool  vis = lane < nc && kps[lane] <= qps[i];
            const float x   = vis ? sc : -INFINITY;
            const float mc  = tca_warp_max(x);
            const float mo  = Ms[i];
            const float mn  = fmaxf(mo, mc);
            const float mu  = mn == -INFINITY ? 0.0f : mn;
            const float p   = vis ? expf(x - mu) : 0.0f;
            const float sum = tca_warp_sum(p);
            Ps[i*C + lane] = p;
            if (lane == 0) {
                const float ms = expf(mo - mu);  // 0 when mo == -inf
                MSs[i] = ms;
                Ls[i]  = Ls[i]*ms + sum;
                Ms[i]  = mn;
            }
        }
        __syncthreads();

        // phase B: acc = acc*ms + P V over this thread's row group
        {
#pragma unroll
            for (int u = 0; u < cfg::QPT; ++u) {
                const float ms = MSs[zq*cfg::QPT + u];
                acc[u][0] *= ms; acc[u][1] *= ms; acc[u][2] *= ms; acc[u][3] *= ms;
            }
            for (int j = zr; j < nc; j += cfg::NGR) {
                const float4 vv = *(const float4 *) (Vs + j*DP + 4*c4);
#pragma unroll
                for (int u = 0; u < cfg::QPT; ++u) {
                    const float p = Ps[(zq*cfg::QPT + u)*C + j];
                    acc[u][0] = fmaf(p, vv.x, acc[u][0]);
                    acc[u][1] = fmaf(p, vv.y, acc[u][1]);
                    acc[u][2] = fmaf(p, vv.z, acc[u][2]);
                    acc[u][3] = fmaf(p, vv.w, acc[u][3]);
                }
            }
        }
        __syncthreads();
    }

    // reduce the row groups (Ks..Vs reused)
    if constexpr (cfg::NGR > 1) {
        float * red = Ks;
        __syncthreads();
        if (zr > 0) {
#pragma unroll
            for (int u = 0; u < cfg::QPT; ++u) {
                *(float4 *) (red + ((zr - 1)*NQ + zq*cfg::QPT + u)*D + 4*c4) =
                    make_float4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]);
            }
        }
        __syncthreads();
        if (zr == 0) {
            for (int r = 1; r < cfg::NGR; ++r) {
#pragma unroll
                for (int u = 0; u < cfg::QPT; ++u) {
                    const float4 o = *(const float4 *) (red + ((r - 1)*NQ + zq*cfg::QPT + u)*D + 4*c4);
                    acc[u][0] += o.x; acc[u][1] += o.y; acc[u][2] += o.z; acc[u][3] += o.w;
                }
            }
        }
    }
    if (zr != 0) {
        return;
    }
#pragma unroll
    for (int u = 0; u < cfg::QPT; ++u) {
        const int i = zq*cfg::QPT + u;
        if (!qvs[i]) {
            continue;
        }
        const int h = cta.h0 + i / a.tt;
        const int t = cta.t0 + i % a.tt;
        const float l = Ls[i];
        if (a.nsplit == 1) {
            const float inv = l > 0.0f ? 1.0f/l : 0.0f;
            *(float4 *) (a.dst + ((size_t) t*a.n_head + h)*D + 4*c4) =
                make_float4(acc[u][0]*inv, acc[u][1]*inv, acc[u][2]*inv, acc[u][3]*inv);
        } else {
            const size_t row = ((size_t) blockIdx.y*a.T + t)*a.n_head + h;
            *(float4 *) (a.part_acc + row*D + 4*c4) = make_float4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]);
            if (c4 == 0) {
                a.part_ml[row] = make_float2(Ms[i], l);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// tensor-core kernel (f16 / q8_0 K/V)
// ------------------------------------------------------------------------------------------
template <int D>
struct tca_mma_cfg {
    static constexpr int C  = D <= 128 ? 64 : 32;  // rows per chunk
    static constexpr int NQ = 16*(TCA_NT/32);      // 16 queries per warp
    static constexpr int DH = D + 8;               // padded row (halves): conflict-free ldmatrix
    static constexpr size_t SMEM = (size_t) (NQ + 2*C)*DH*sizeof(half) + C*sizeof(int);
    static_assert(D % 16 == 0 && C % 16 == 0, "bad tile");
};

#if defined(AMPERE_MMA_AVAILABLE)
__device__ __forceinline__ void tca_ldmatrix_x4(uint32_t (&r)[4], const half * p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}

__device__ __forceinline__ void tca_ldmatrix_x4_trans(uint32_t (&r)[4], const half * p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}

// c (16x8 f32) += a (16x16 f16, row) * b (16x8 f16, col)
__device__ __forceinline__ void tca_mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t b0, const uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// one chunk of C rows for the warp's 16 queries (rows i0 = 16 w + gid, i1 = i0 + 8): S = Q K^T on
// tensor cores, mask (skipped when the whole chunk is visible to every query of the warp: full),
// online softmax, acc += P V. Qh, Kh, Vh: f16 rows of stride DH halves; kps: the chunk's positions.
// The softmax runs in base 2: scale2 = scale*log2(e), so m0/m1 are log2-domain maxima (the caller
// converts them back with ln 2) and each probability is one exp2f (expf costs several instructions).
template <int D, int C, int DH, int MT>
__device__ __forceinline__ void tca_mma_chunk(const half * __restrict__ Qh, const half * __restrict__ Kh,
                                              const half * __restrict__ Vh, const int * __restrict__ kps,
                                              const int nc, const bool full, const float scale2,
                                              const int w, const int lane, const int tig,
                                              const bool (&vq)[MT][2], const int (&qp)[MT][2],
                                              float (&acc)[MT][D/8][4], float (&m)[MT][2], float (&l)[MT][2]) {
    // S = Q K^T: MT tiles of 16 queries x C rows; every K fragment serves the MT tiles
    float S[MT][C/8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < C/8; ++n) {
            S[mt][n][0] = S[mt][n][1] = S[mt][n][2] = S[mt][n][3] = 0.0f;
        }
    }
#pragma unroll
    for (int kk = 0; kk < D/16; ++kk) {
        uint32_t qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            tca_ldmatrix_x4(qa[mt], Qh + (16*(MT*w + mt) + (lane % 8) + 8*((lane / 8) % 2))*DH + 16*kk + 8*(lane / 16));
        }
#pragma unroll
        for (int np = 0; np < C/16; ++np) {
            uint32_t kb4[4];
            tca_ldmatrix_x4(kb4, Kh + (16*np + (lane % 8) + 8*(lane / 16))*DH + 16*kk + 8*((lane / 8) % 2));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                tca_mma(S[mt][2*np + 0], qa[mt], kb4[0], kb4[1]);
                tca_mma(S[mt][2*np + 1], qa[mt], kb4[2], kb4[3]);
            }
        }
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        // mask + online softmax (rows i0: S[.][0..1], i1: S[.][2..3]; columns 8n + 2 tig + {0, 1})
        const bool v0 = vq[mt][0], v1 = vq[mt][1];
        const int  qp0 = qp[mt][0], qp1 = qp[mt][1];
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < C/8; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = 8*n + 2*tig + e;
                float x0 = S[mt][n][e]*scale2;
                float x1 = S[mt][n][2 + e]*scale2;
                if (!full) {
                    const int  kpj = kps[j];
                    const bool ok  = j < nc;
                    x0 = (v0 && ok && kpj <= qp0) ? x0 : -INFINITY;
                    x1 = (v1 && ok && kpj <= qp1) ? x1 : -INFINITY;
                }
                S[mt][n][e]     = x0;
                S[mt][n][2 + e] = x1;
                mx0 = fmaxf(mx0, x0);
                mx1 = fmaxf(mx1, x1);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1, 32));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2, 32));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1, 32));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2, 32));
        const float mn0 = fmaxf(m[mt][0], mx0);
        const float mn1 = fmaxf(m[mt][1], mx1);
        const float mu0 = mn0 == -INFINITY ? 0.0f : mn0;
        const float mu1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float ms0 = exp2f(m[mt][0] - mu0);
        const float ms1 = exp2f(m[mt][1] - mu1);
        float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
        for (int n = 0; n < C/8; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                S[mt][n][e]     = exp2f(S[mt][n][e]     - mu0);  // exp2(-inf) = 0
                S[mt][n][2 + e] = exp2f(S[mt][n][2 + e] - mu1);
                s0 += S[mt][n][e];
                s1 += S[mt][n][2 + e];
            }
        }
        s0 += __shfl_xor_sync(0xffffffff, s0, 1, 32);
        s0 += __shfl_xor_sync(0xffffffff, s0, 2, 32);
        s1 += __shfl_xor_sync(0xffffffff, s1, 1, 32);
        s1 += __shfl_xor_sync(0xffffffff, s1, 2, 32);
        l[mt][0] = l[mt][0]*ms0 + s0;
        l[mt][1] = l[mt][1]*ms1 + s1;
        m[mt][0] = mn0;
        m[mt][1] = mn1;
#pragma unroll
        for (int n = 0; n < D/8; ++n) {
            acc[mt][n][0] *= ms0; acc[mt][n][1] *= ms0;
            acc[mt][n][2] *= ms1; acc[mt][n][3] *= ms1;
        }
    }

    // acc += P V: P (16 x C a tile) from the S registers, V via ldmatrix.trans (each V fragment serves the MT tiles)
#pragma unroll
    for (int kk = 0; kk < C/16; ++kk) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            pa[mt][0] = tca_pack_h2(S[mt][2*kk + 0][0], S[mt][2*kk + 0][1]);
            pa[mt][1] = tca_pack_h2(S[mt][2*kk + 0][2], S[mt][2*kk + 0][3]);
            pa[mt][2] = tca_pack_h2(S[mt][2*kk + 1][0], S[mt][2*kk + 1][1]);
            pa[mt][3] = tca_pack_h2(S[mt][2*kk + 1][2], S[mt][2*kk + 1][3]);
        }
#pragma unroll
        for (int np = 0; np < D/16; ++np) {
            uint32_t vb[4];
            tca_ldmatrix_x4_trans(vb, Vh + (16*kk + (lane % 8) + 8*((lane / 8) % 2))*DH + 16*np + 8*(lane / 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                tca_mma(acc[mt][2*np + 0], pa[mt], vb[0], vb[1]);
                tca_mma(acc[mt][2*np + 1], pa[mt], vb[2], vb[3]);
            }
        }
    }
}
#endif // AMPERE_MMA_AVAILABLE

// the tensor-core kernels' output of query row i (the accumulator rows r = 0 / 1 of an m16n8 tile:
// acc[n][2r], acc[n][2r + 1] hold columns 8n + 2 tig + {0, 1}): normalised into dst, or with one
// split of several the unnormalised row and (m, l) into the split partials (m: log2 -> natural domain)
template <int D>
__device__ __forceinline__ void tca_mma_store(const tca_args & a, const tca_cta & cta, const int i, const bool valid,
                                              const float l, const float m, const float (&acc)[D/8][4], const int r, const int tig) {
    if (!valid) {
        return;
    }
    const int h = cta.h0 + i / a.tt;
    const int t = cta.t0 + i % a.tt;
    if (a.nsplit == 1) {
        const float inv = l > 0.0f ? 1.0f/l : 0.0f;
        float * o = a.dst + ((size_t) t*a.n_head + h)*D;
#pragma unroll
        for (int n = 0; n < D/8; ++n) {
            *(float2 *) (o + 8*n + 2*tig) = make_float2(acc[n][2*r + 0]*inv, acc[n][2*r + 1]*inv);
        }
    } else {
        const size_t row = ((size_t) blockIdx.y*a.T + t)*a.n_head + h;
        float * o = a.part_acc + row*D;
#pragma unroll
        for (int n = 0; n < D/8; ++n) {
            *(float2 *) (o + 8*n + 2*tig) = make_float2(acc[n][2*r + 0], acc[n][2*r + 1]);
        }
        if (tig == 0) {
            a.part_ml[row] = make_float2(m*0.6931471805599453f, l);
        }
    }
}

template <int D, int TYPE>
__global__ void __launch_bounds__(TCA_NT) tca_attn_mma(const tca_args a) {
#if defined(AMPERE_MMA_AVAILABLE)
    using cfg = tca_mma_cfg<D>;
    constexpr int C  = cfg::C;
    constexpr int NQ = cfg::NQ;
    constexpr int DH = cfg::DH;

    extern __shared__ float4 tca_smem_f4[];
    half * Qh  = (half *) tca_smem_f4;
    half * Kh  = Qh + NQ*DH;
    half * Vh  = Kh + C*DH;
    int  * kps = (int *) (Vh + C*DH);

    const int tid  = threadIdx.x;
    const int lane = tid % 32;
    const int w    = tid / 32;
    const int gid  = lane / 4;  // fragment row
    const int tig  = lane % 4;  // fragment column pair

    const tca_cta cta = tca_cta_of(a);

    // the head's rows, this split's chunks, the first chunk's positions (loads issued early)
    int off, len;
    tca_head_rows(a, cta.g, off, len);
    int ch0, ch1;
    tca_split_chunks(len, C, a.nsplit, ch0, ch1);
    int ka_cur = (ch0 < ch1 && lane < len - ch0*C) ? tca_kp(a, off + ch0*C + lane) : INT_MAX;
    int kb_cur = (C > 32 && ch0 < ch1 && lane + 32 < len - ch0*C) ? tca_kp(a, off + ch0*C + lane + 32) : INT_MAX;

    // queries -> f16 shared memory (zero for the padding queries)
    tca_load_q<NQ, D, DH, true>(a, cta, Qh);

    // this thread's two query rows i0 = 16w + gid, i1 = i0 + 8
    const int  i0 = 16*w + gid;
    const int  i1 = i0 + 8;
    const bool v0 = i0 / a.tt < cta.nh && i0 % a.tt < cta.ntk;
    const bool v1 = i1 / a.tt < cta.nh && i1 % a.tt < cta.ntk;
    const int  qp0 = v0 ? a.qpos[cta.t0 + i0 % a.tt] : INT_MIN;
    const int  qp1 = v1 ? a.qpos[cta.t0 + i1 % a.tt] : INT_MIN;
    const bool warp_active = __any_sync(0xffffffff, v0 || v1);
    const int  qmax_w = tca_warp_max_i(max(v0 ? qp0 : INT_MIN, v1 ? qp1 : INT_MIN));
    const int  qmin_w = tca_warp_min_i(min(v0 ? qp0 : INT_MAX, v1 ? qp1 : INT_MAX));

    // the CTA's latest query position (every warp computes it: no barrier needed)
    int  qmax = INT_MIN;
    bool any_valid = false;
    for (int i = lane; i < NQ; i += 32) {
        if (i / a.tt < cta.nh && i % a.tt < cta.ntk) {
            qmax = max(qmax, a.qpos[cta.t0 + i % a.tt]);
            any_valid = true;
        }
    }
    qmax      = tca_warp_max_i(qmax);
    any_valid = __any_sync(0xffffffff, any_valid);
    if (!any_valid) {
        ch1 = ch0;
    }

    float acc[D/8][4];
#pragma unroll
    for (int n = 0; n < D/8; ++n) {
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    }
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    int ka_nxt = INT_MAX, kb_nxt = INT_MAX;
    for (int ch = ch0; ch < ch1; ++ch, ka_cur = ka_nxt, kb_cur = kb_nxt) {
        const int r0 = ch*C;
        const int nc = min(C, len - r0);
        // the next chunk's positions, one chunk ahead
        ka_nxt = (ch + 1 < ch1 && lane < len - r0 - C) ? tca_kp(a, off + r0 + C + lane) : INT_MAX;
        kb_nxt = (C > 32 && ch + 1 < ch1 && lane + 32 < len - r0 - C) ? tca_kp(a, off + r0 + C + lane + 32) : INT_MAX;

        const int ka = ka_cur;
        const int kb = kb_cur;
        const int kmin = tca_warp_min_i(min(ka, kb));
        if (kmin > qmax) {
            continue;  // CTA-uniform
        }
        const int kmax = tca_warp_max_i(max(lane < nc ? ka : INT_MIN, (C > 32 && lane + 32 < nc) ? kb : INT_MIN));
        if (w == 0) {
            kps[lane] = ka;
            if (C > 32) {
                kps[lane + 32] = kb;
            }
        }
        {
            tca_tile<D, TYPE, C> tk, tv;
            tk.load(a.k + (size_t) (off + r0)*a.k_nb1, a.k_nb1, nc);
            tv.load(a.v + (size_t) (off + r0)*a.v_nb1, a.v_nb1, nc);
            tk.template store_f16<DH>(Kh);
            tv.template store_f16<DH>(Vh);
        }
        __syncthreads();

        if (warp_active && kmin <= qmax_w) {
            const bool vq[1][2] = { { v0, v1 } };
            const int  qq[1][2] = { { qp0, qp1 } };
            float mm[1][2] = { { m0, m1 } }, ll[1][2] = { { l0, l1 } };
            tca_mma_chunk<D, C, DH, 1>(Qh, Kh, Vh, kps, nc, nc == C && kmax <= qmin_w, a.scale*1.4426950408889634f, w, lane, tig,
                                       vq, qq, reinterpret_cast<float (&)[1][D/8][4]>(acc), mm, ll);
            m0 = mm[0][0]; m1 = mm[0][1]; l0 = ll[0][0]; l1 = ll[0][1];
        }
        __syncthreads();
    }

    // output: row i0 <- acc[.][0..1], row i1 <- acc[.][2..3]; columns 8n + 2 tig + {0, 1}
    tca_mma_store<D>(a, cta, i0, v0, l0, m0, acc, 0, tig);
    tca_mma_store<D>(a, cta, i1, v1, l1, m1, acc, 1, tig);
#else
    GGML_UNUSED(a);
    NO_DEVICE_CODE;
#endif // AMPERE_MMA_AVAILABLE
}

// ------------------------------------------------------------------------------------------
// tensor-core kernel, f16 K/V, double-buffered (cp.async)
// ------------------------------------------------------------------------------------------
// tca_attn_mma for f16 K/V: the rows go straight from global to shared memory with cp.async (no
// registers, no conversion), two stages: chunk c+1 is in flight while chunk c is computed. The
// positions run two chunks ahead, so a chunk no query of the CTA can see is never fetched.
// Same arithmetic as tca_attn_mma (tca_mma_chunk).
template <int D, int C_ = 64, int MT_ = 1>
struct tca_mma2_cfg {
    static constexpr int C  = C_;                       // rows a chunk: 64, or 32 (4 CTAs an SM)
    static constexpr int MT = MT_;                      // 16-query tiles a warp (2: K/V fragments serve 32 queries)
    static constexpr int MINB = (C_ == 32 && MT_ == 1) ? 4 : 1;  // CTAs an SM to fit (registers <= 128 for 4)
    static constexpr int NQ = 16*MT*(TCA_NT/32);
    static constexpr int DH = D + 8;
    static constexpr int UPR = D/8;                     // 16-byte units per row
    static constexpr int IT  = C*UPR/TCA_NT;            // units per thread per matrix
    static constexpr size_t SMEM = (size_t) (NQ + 4*C)*DH*sizeof(half) + 2*C*sizeof(int);
    static_assert((C*UPR) % TCA_NT == 0, "bad tile");
};

#if defined(AMPERE_MMA_AVAILABLE)
__device__ __forceinline__ void tca_cp_async16(const uint32_t dst, const void * src, const bool ok) {
    // src-size 0: nothing is read, the 16 bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" : : "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void tca_cp_async_commit() {
    asm volatile("cp.async.commit_group;");
}

__device__ __forceinline__ void tca_cp_async_wait1() {
    asm volatile("cp.async.wait_group 1;");
}

// rows [r0, r0 + nc) of a head region (f16, rows of nb1 bytes) -> C rows of stride DH halves
template <int D, int C_>
__device__ __forceinline__ void tca_mma2_issue(half * dst, const char * __restrict__ src, const size_t nb1, const int nc) {
    using cfg = tca_mma2_cfg<D, C_, 1>;  // the tile geometry does not depend on MT
    const uint32_t d0 = (uint32_t) __cvta_generic_to_shared(dst);
#pragma unroll
    for (int it = 0; it < cfg::IT; ++it) {
        const int  e  = threadIdx.x + it*TCA_NT;
        const int  r  = e / cfg::UPR;
        const int  c  = e % cfg::UPR;
        const bool ok = r < nc;
        tca_cp_async16(d0 + (uint32_t) ((r*cfg::DH + 8*c)*sizeof(half)), src + (size_t) (ok ? r : 0)*nb1 + 16*c, ok);
    }
}
#endif // AMPERE_MMA_AVAILABLE

template <int D, int C_, int MT_>
__global__ void __launch_bounds__(TCA_NT, tca_mma2_cfg<D, C_, MT_>::MINB) tca_attn_mma2(const tca_args a) {
#if defined(AMPERE_MMA_AVAILABLE)
    using cfg = tca_mma2_cfg<D, C_, MT_>;
    constexpr int MT = cfg::MT;
    constexpr int C  = cfg::C;
    constexpr int NQ = cfg::NQ;
    constexpr int DH = cfg::DH;

    extern __shared__ float4 tca_smem_f4[];
    half * Qh  = (half *) tca_smem_f4;
    half * Kb  = Qh + NQ*DH;   // [2][C][DH]
    half * Vb  = Kb + 2*C*DH;  // [2][C][DH]
    int  * kpb = (int *) (Vb + 2*C*DH);  // [2][C]

    const int tid  = threadIdx.x;
    const int lane = tid % 32;
    const int w    = tid / 32;
    const int gid  = lane / 4;
    const int tig  = lane % 4;

    const tca_cta cta = tca_cta_of(a);

    int off, len;
    tca_head_rows(a, cta.g, off, len);
    int ch0, ch1;
    tca_split_chunks(len, C, a.nsplit, ch0, ch1);
    // positions of chunk c: lanes hold rows c*C + lane and c*C + lane + 32 (INT_MAX past the end)
    auto kp_of = [&](const int c, int & x, int & y) {
        x = (c < ch1 && lane < len - c*C) ? tca_kp(a, off + c*C + lane) : INT_MAX;
        y = (C > 32 && c < ch1 && lane + 32 < len - c*C) ? tca_kp(a, off + c*C + lane + 32) : INT_MAX;
    };
    int ka_cur, kb_cur, ka_nxt, kb_nxt;
    kp_of(ch0, ka_cur, kb_cur);
    kp_of(ch0 + 1, ka_nxt, kb_nxt);

    tca_load_q<NQ, D, DH, true>(a, cta, Qh);

    // this thread's query rows: tile mt, rows 16 (MT w + mt) + gid and + 8
    bool vq[MT][2];
    int  qq[MT][2];
    bool any_w = false;
    int  qmax_t = INT_MIN, qmin_t = INT_MAX;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
            const int i = 16*(MT*w + mt) + gid + 8*h2;
            vq[mt][h2] = i / a.tt < cta.nh && i % a.tt < cta.ntk;
            qq[mt][h2] = vq[mt][h2] ? a.qpos[cta.t0 + i % a.tt] : INT_MIN;
            if (vq[mt][h2]) {
                any_w  = true;
                qmax_t = max(qmax_t, qq[mt][h2]);
                qmin_t = min(qmin_t, qq[mt][h2]);
            }
        }
    }
    const bool warp_active = __any_sync(0xffffffff, any_w);
    const int  qmax_w = tca_warp_max_i(qmax_t);
    const int  qmin_w = tca_warp_min_i(qmin_t);

    int  qmax = INT_MIN;
    bool any_valid = false;
    for (int i = lane; i < NQ; i += 32) {
        if (i / a.tt < cta.nh && i % a.tt < cta.ntk) {
            qmax = max(qmax, a.qpos[cta.t0 + i % a.tt]);
            any_valid = true;
        }
    }
    qmax      = tca_warp_max_i(qmax);
    any_valid = __any_sync(0xffffffff, any_valid);
    if (!any_valid) {
        ch1 = ch0;
    }

    float acc[MT][D/8][4];
    float mm[MT][2], ll[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < D/8; ++n) {
            acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.0f;
        }
        mm[mt][0] = mm[mt][1] = -INFINITY;
        ll[mt][0] = ll[mt][1] = 0.0f;
    }

    // chunk c is fetched into stage (c - ch0) & 1 when some query of the CTA can see a row of it
    // (CTA-uniform: every warp holds the same positions)
    auto issue = [&](const int c, const int x, const int y) {
        const int st = (c - ch0) & 1;
        if (c < ch1 && tca_warp_min_i(min(x, y)) <= qmax) {
            const int nc = min(C, len - c*C);
            if (w == 0) {
                kpb[st*C + lane] = x;
                if (C > 32) {
                    kpb[st*C + lane + 32] = y;
                }
            }
            tca_mma2_issue<D, C>(Kb + st*C*DH, a.k + (size_t) (off + c*C)*a.k_nb1, a.k_nb1, nc);
            tca_mma2_issue<D, C>(Vb + st*C*DH, a.v + (size_t) (off + c*C)*a.v_nb1, a.v_nb1, nc);
        }
        tca_cp_async_commit();  // possibly empty: one group per chunk keeps wait_group 1 exact
    };
    issue(ch0, ka_cur, kb_cur);

    for (int ch = ch0; ch < ch1; ++ch) {
        const int st = (ch - ch0) & 1;
        issue(ch + 1, ka_nxt, kb_nxt);
        int ka_n2, kb_n2;
        kp_of(ch + 2, ka_n2, kb_n2);

        const int kmin = tca_warp_min_i(min(ka_cur, kb_cur));
        if (kmin <= qmax) {  // CTA-uniform
            const int nc   = min(C, len - ch*C);
            const int kmax = tca_warp_max_i(max(lane < nc ? ka_cur : INT_MIN, (C > 32 && lane + 32 < nc) ? kb_cur : INT_MIN));
            tca_cp_async_wait1();
            __syncthreads();
            if (warp_active && kmin <= qmax_w) {
                tca_mma_chunk<D, C, DH, MT>(Qh, Kb + st*C*DH, Vb + st*C*DH, kpb + st*C, nc, nc == C && kmax <= qmin_w,
                                            a.scale*1.4426950408889634f, w, lane, tig, vq, qq, acc, mm, ll);
            }
            __syncthreads();  // stage st is refilled by the next iteration's issue
        }
        ka_cur = ka_nxt; kb_cur = kb_nxt;
        ka_nxt = ka_n2;  kb_nxt = kb_n2;
    }
    asm volatile("cp.async.wait_all;");

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tca_mma_store<D>(a, cta, 16*(MT*w + mt) + gid + 8*r, vq[mt][r], ll[mt][r], mm[mt][r], acc[mt], r, tig);
        }
    }
#else
    GGML_UNUSED(a);
    NO_DEVICE_CODE;
#endif // AMPERE_MMA_AVAILABLE
}

// ------------------------------------------------------------------------------------------
// vector kernel: few queries per KV head (decode) with f16 K/V
// ------------------------------------------------------------------------------------------
// Memory-bound: each kept row is read once, so the kernel must keep enough bytes in flight.
// No shared memory and no barrier in the loop: every warp walks its own batches of rows straight
// from global memory into registers (a lane holds U 16-byte units = 8U dims of a row: dims
// 8 sub + D/U j, LPR = D/(8U) lanes a row, RPW = 32/LPR rows a warp load, NB rows a lane a batch)
// with its own online softmax; the next batch's K is requested before this batch's softmax and
// its V before this batch's P.V, so two batches are in flight per warp. The partial scores of a
// batch (NB rows x NQ queries a lane) are summed over the LPR lanes of a row by a reduce-scatter
// (each shuffle level moves half of the values, so a lane ends with NB NQ / LPR whole scores), the
// softmax runs on those (in the log2 domain: scale * log2 e folded into q, one exp2 a score, no
// redundant exps), and P.V takes each probability from the lane that holds it (one shuffle);
// the accumulator is per row group (lanes with the same rw) and reduced over the row groups and
// the warps once, at the end, the running sum over every lane. f32 dots of f16-converted K/V as
// in the FFMA kernel, different summation order. (H200, decode op at 128K / p = 0.1, 16794 rows
// a KV head, 32/8 heads: the earlier version — a shuffle tree a score, 8 redundant expf a score —
// D=64 0.020 ms, D=128 0.038 ms; with the reduce-scatter 0.018 / 0.030 ms; with the queries
// requested before the head's row range and the next positions converted at the loop end (ncu:
// long-scoreboard stalls 1.16 -> 0.91 cycles an instruction) 0.017 / 0.029 ms. The kernel is
// latency-bound: 250 registers a thread hold 8 warps an SM, ~4.6 cycles between a warp's issues.)
template <int D, int NQ, int U_ = 1>
struct tca_vec_cfg {
    static constexpr int U   = U_;                              // 16-byte units a lane a row
    static constexpr int LPR = D/(8*U);                         // lanes a row
    static constexpr int RPW = 32/LPR;                          // rows a warp load
    static constexpr int NB  = (NQ <= 4 ? 8 : 4)/U;             // rows a lane a batch
    static constexpr int BR  = RPW*NB;                          // rows a warp batch
    static constexpr int NW  = TCA_NT/32;
    static constexpr size_t SMEM = (size_t) NW*NQ*(D + 2)*sizeof(float);
    static_assert(D == 64 || D == 128 || D == 256, "vector kernel: D in {64, 128, 256}");
};

__device__ __forceinline__ void tca_h8_to_f32(const uint4 x, float * f) {
    const uint32_t u[4] = { x.x, x.y, x.z, x.w };
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        half2 h;
        memcpy(&h, &u[k], sizeof(h));
        const float2 g = __half22float2(h);
        f[2*k + 0] = g.x;
        f[2*k + 1] = g.y;
    }
}

template <int D, int NQ, int U_>
__global__ void __launch_bounds__(TCA_NT) tca_attn_vec(const tca_args a) {
    using cfg = tca_vec_cfg<D, NQ, U_>;
    constexpr int U = cfg::U, LPR = cfg::LPR, RPW = cfg::RPW, NB = cfg::NB, BR = cfg::BR, NW = cfg::NW;
    constexpr int DU = D/U;  // dims between a lane's units
    constexpr int V   = NB*NQ;                  // scores a lane a batch before the reduction
    constexpr int C   = V >= LPR ? V/LPR : 1;   // whole scores a lane holds after it
    constexpr int REP = V >= LPR ? 1 : LPR/V;   // lanes that hold the same score
    constexpr int LLPR = LPR == 32 ? 5 : LPR == 16 ? 4 : LPR == 8 ? 3 : LPR == 4 ? 2 : LPR == 2 ? 1 : 0;  // log2 LPR
    static_assert((1 << LLPR) == LPR, "vector kernel: LPR a power of two");
    extern __shared__ float4 tca_smem_f4[];
    float * wacc = (float *) tca_smem_f4;   // [NW][NQ][D]
    float * wm   = wacc + NW*NQ*D;          // [NW][NQ]
    float * wl   = wm + NW*NQ;              // [NW][NQ]

    const int tid  = threadIdx.x;
    const int lane = tid % 32;
    const int w    = tid / 32;
    const int sub  = lane % LPR;  // dims 8 sub + DU j + [0, 8)
    const int rw   = lane / LPR;  // row of a warp load

    const tca_cta cta = tca_cta_of(a);

    // this lane's dims of each query (times scale * log2 e), the queries' positions: requested
    // before the head's row range, so that both loads are in flight together
    const float qscale = a.scale*1.4426950408889634f;
    float    qf[NQ][8*U];
    int      qp[NQ];
    unsigned qvalid = 0;
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
        const int  hh = i / a.tt;
        const int  tk = i % a.tt;
        const bool ok = hh < cta.nh && tk < cta.ntk;
        qvalid |= ok ? 1u << i : 0u;
        qp[i] = ok ? a.qpos[cta.t0 + tk] : 0;
#pragma unroll
        for (int e = 0; e < 8*U; ++e) {
            qf[i][e] = 0.0f;
        }
        if (ok) {
            const float * qr = (const float *) (a.q + (size_t) (cta.t0 + tk)*a.q_nb1 + (size_t) (cta.h0 + hh)*a.q_nb2) + 8*sub;
#pragma unroll
            for (int j = 0; j < U; ++j) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    qf[i][8*j + e] = qr[DU*j + e];  // scaled below, once the row loads are issued
                }
            }
        }
    }

    int off, len;
    tca_head_rows(a, cta.g, off, len);
    const int nbat = (len + BR - 1)/BR;
    const int per  = (nbat + a.nsplit - 1)/a.nsplit;
    const int bb0  = min(nbat, (int) blockIdx.y*per);
    const int bb1  = min(nbat, bb0 + per);

    const char * kb = a.k + (size_t) off*a.k_nb1 + 16*sub;
    const char * vb = a.v + (size_t) off*a.v_nb1 + 16*sub;

    uint4 kr[NB][U], vr[NB][U];
    int   kp[NB];
    int bi = bb0 + w;
    if (bi < bb1) {
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const int r = bi*BR + b*RPW + rw;
#pragma unroll
            for (int j = 0; j < U; ++j) {
                kr[b][j] = r < len ? *(const uint4 *) (kb + (size_t) r*a.k_nb1 + 2*DU*j) : make_uint4(0u, 0u, 0u, 0u);
            }
            kp[b] = r < len ? tca_kp(a, off + r) : INT_MAX;
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const int r = bi*BR + b*RPW + rw;
#pragma unroll
            for (int j = 0; j < U; ++j) {
                vr[b][j] = r < len ? *(const uint4 *) (vb + (size_t) r*a.v_nb1 + 2*DU*j) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
    }

    // scores in the log2 domain
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
#pragma unroll
        for (int e = 0; e < 8*U; ++e) {
            qf[i][e] *= qscale;
        }
    }

    float m[NQ], l[NQ], acc[NQ][8*U];
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8*U; ++e) {
            acc[i][e] = 0.0f;
        }
    }

    for (; bi < bb1; bi += NW) {
        const int  nbi = bi + NW;
        const bool nxt = nbi < bb1;

        // partial scores over this lane's dims
        float s[NB][NQ];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            float kf[8*U];
#pragma unroll
            for (int j = 0; j < U; ++j) {
                tca_h8_to_f32(kr[b][j], kf + 8*j);
            }
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                float x = 0.0f;
#pragma unroll
                for (int e = 0; e < 8*U; ++e) {
                    x = fmaf(qf[i][e], kf[e], x);
                }
                s[b][i] = x;
            }
        }
        // the next batch's K and positions
        int kpn[NB];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const int r = nbi*BR + b*RPW + rw;
            const bool ok = nxt && r < len;
            if (ok) {
#pragma unroll
                for (int j = 0; j < U; ++j) {
                    kr[b][j] = *(const uint4 *) (kb + (size_t) r*a.k_nb1 + 2*DU*j);
                }
            }
            // raw bits (f32 positions converted at the copy below, not here, where the load is in flight)
            kpn[b] = ok ? (a.kposf ? __float_as_int(a.kposf[off + r]) : a.kpos[off + r]) : INT_MAX;
        }
        // full dots: a reduce-scatter over the LPR lanes of a row (a shuffle moves half of the values
        // a level), so that lane sub ends with the whole scores of values sub*C .. sub*C + C - 1
        // (value b*NQ + i: row b of the batch, query i), or of value sub/REP when there are fewer
        // values than lanes (then REP lanes hold each)
        float x[V];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                x[b*NQ + i] = s[b][i];
            }
        }
#pragma unroll
        for (int lv = 0; lv < LLPR; ++lv) {
            const int  o  = LPR >> (lv + 1);
            const int  n  = V >> lv;  // values a lane holds before this level
            const bool hi = (sub & o) != 0;
            if (n >= 2) {
#pragma unroll
                for (int k = 0; k < V/2; ++k) {  // (a bound of n/2 would not unroll)
                    if (k >= n/2) {
                        break;
                    }
                    const float lo = x[k], up = x[k + n/2];  // (a select of two elements would take their addresses)
                    const float keep = hi ? up : lo;
                    const float send = hi ? lo : up;
                    x[k] = keep + __shfl_xor_sync(0xffffffff, send, o, 32);
                }
            } else {
                x[0] += __shfl_xor_sync(0xffffffff, x[0], o, 32);
            }
        }
        // mask; online softmax in the log2 domain (scale * log2 e is folded into q); m warp-uniform
        float mx[NQ];
#pragma unroll
        for (int i = 0; i < NQ; ++i) {
            mx[i] = -INFINITY;
        }
#pragma unroll
        for (int k = 0; k < C; ++k) {
            const int idx = V >= LPR ? sub*C + k : sub/REP;
            const int b   = idx / NQ;
            const int qi  = idx % NQ;
            int kpb = INT_MAX, qpi = 0;
            bool qok = false;
#pragma unroll
            for (int bb = 0; bb < NB; ++bb) {
                kpb = bb == b ? kp[bb] : kpb;
            }
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                qpi = i == qi ? qp[i] : qpi;
                qok = i == qi ? ((qvalid >> i) & 1u) != 0 : qok;
            }
            // rows past len: not visible even to a query at INT_MAX (their kp is INT_MAX)
            const bool vis = qok && bi*BR + b*RPW + rw < len && kpb <= qpi;
            x[k] = vis ? x[k] : -INFINITY;
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                mx[i] = i == qi ? fmaxf(mx[i], x[k]) : mx[i];
            }
        }
        float mu[NQ];
#pragma unroll
        for (int i = 0; i < NQ; ++i) {
            const float mxi = tca_warp_max(mx[i]);
            const float mn  = fmaxf(m[i], mxi);
            mu[i] = mn == -INFINITY ? 0.0f : mn;
            if (mn > m[i]) {  // warp-uniform; the running max rarely moves after the first batches
                const float ms = exp2f(m[i] - mu[i]);  // 0 when m == -inf
                l[i] *= ms;
#pragma unroll
                for (int e = 0; e < 8*U; ++e) {
                    acc[i][e] *= ms;
                }
                m[i] = mn;
            }
        }
#pragma unroll
        for (int k = 0; k < C; ++k) {
            const int qi = (V >= LPR ? sub*C + k : sub/REP) % NQ;
            float mk = 0.0f;
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                mk = i == qi ? mu[i] : mk;
            }
            x[k] = exp2f(x[k] - mk);  // exp2(-inf) = 0
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                l[i] += i == qi ? x[k] : 0.0f;
            }
        }
        // P.V: each probability from the lane that holds it
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            float vf[8*U];
#pragma unroll
            for (int j = 0; j < U; ++j) {
                tca_h8_to_f32(vr[b][j], vf + 8*j);
            }
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                const int idx = b*NQ + i;
                const int src = (lane & ~(LPR - 1)) | (V >= LPR ? idx / C : idx*REP);
                const float pv = __shfl_sync(0xffffffff, x[V >= LPR ? idx % C : 0], src, 32);
#pragma unroll
                for (int e = 0; e < 8*U; ++e) {
                    acc[i][e] = fmaf(pv, vf[e], acc[i][e]);
                }
            }
        }
        // the next batch's V
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const int r = nbi*BR + b*RPW + rw;
#pragma unroll
            for (int j = 0; j < U; ++j) {
                if (nxt && r < len) {
                    vr[b][j] = *(const uint4 *) (vb + (size_t) r*a.v_nb1 + 2*DU*j);
                } else {
                    vr[b][j] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
        }
        // the next batch's positions, used last (a copy waits for the load to land)
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            kp[b] = a.kposf && kpn[b] != INT_MAX ? (int) __int_as_float(kpn[b]) : kpn[b];
        }
    }

    // reduce the row groups of the warp, then the warps; l over every lane (each lane summed the
    // probabilities it held; REP lanes held each), m back to the natural-log domain
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
        l[i] = tca_warp_sum(l[i]) * (1.0f/REP);
        m[i] *= 0.6931471805599453f;  // -inf stays -inf
#pragma unroll
        for (int o = 16; o >= LPR; o >>= 1) {
#pragma unroll
            for (int e = 0; e < 8*U; ++e) {
                acc[i][e] += __shfl_xor_sync(0xffffffff, acc[i][e], o, 32);
            }
        }
        if (rw == 0) {
#pragma unroll
            for (int j = 0; j < U; ++j) {
                float4 * o4 = (float4 *) (wacc + (w*NQ + i)*D + 8*sub + DU*j);
                o4[0] = make_float4(acc[i][8*j + 0], acc[i][8*j + 1], acc[i][8*j + 2], acc[i][8*j + 3]);
                o4[1] = make_float4(acc[i][8*j + 4], acc[i][8*j + 5], acc[i][8*j + 6], acc[i][8*j + 7]);
            }
        }
        if (lane == 0) {
            wm[w*NQ + i] = m[i];
            wl[w*NQ + i] = l[i];
        }
    }
    __syncthreads();
    for (int e = tid; e < NQ*D; e += TCA_NT) {
        const int i = e / D;
        const int c = e % D;
        if (!((qvalid >> i) & 1u)) {
            continue;
        }
        float M = -INFINITY;
#pragma unroll
        for (int ww = 0; ww < NW; ++ww) {
            M = fmaxf(M, wm[ww*NQ + i]);
        }
        float A = 0.0f, L = 0.0f;
#pragma unroll
        for (int ww = 0; ww < NW; ++ww) {
            const float mw = wm[ww*NQ + i];
            const float f  = mw == -INFINITY ? 0.0f : expf(mw - M);
            A = fmaf(wacc[(ww*NQ + i)*D + c], f, A);
            L = fmaf(wl[ww*NQ + i], f, L);
        }
        const int h = cta.h0 + i / a.tt;
        const int t = cta.t0 + i % a.tt;
        if (a.nsplit == 1) {
            a.dst[((size_t) t*a.n_head + h)*D + c] = L > 0.0f ? A/L : 0.0f;
        } else {
            const size_t row = ((size_t) blockIdx.y*a.T + t)*a.n_head + h;
            a.part_acc[row*D + c] = A;
            if (c == 0) {
                a.part_ml[row] = make_float2(M, L);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// split combine: one CTA per (token, head)
// ------------------------------------------------------------------------------------------
// one CTA (TCA_NT threads) per (token, head): the splits' weights exp(m_s - M) once into shared
// memory; then the threads form SG = TCA_NT/(D/4) groups, each summing every SG-th split's partial
// row (a float4 of dims per thread, 4 splits in flight), and the groups' sums are added in shared
// memory. (The version with one thread per dim walked all the splits of a column in one thread:
// at 33-66 splits a layer in decode that chain of dependent loads cost more than it should.)
__global__ void __launch_bounds__(TCA_NT) tca_attn_combine(const float * __restrict__ part_acc, const float2 * __restrict__ part_ml,
                                 float * __restrict__ dst, const int nsplit, const int T, const int n_head, const int D) {
    extern __shared__ float fs[];  // [nsplit] weights, then [SG][D] group sums
    __shared__ float red[32];
    const size_t row    = blockIdx.x;  // t*n_head + h
    const size_t stride = (size_t) T*n_head;
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid % 32, w = tid / 32, nw = (nt + 31)/32;

    const int DT = D/4;           // threads per partial row
    const int SG = nt/DT;         // split groups
    const int g  = tid / DT;
    const int c4 = tid % DT;
    const float4 * pa = (const float4 *) (part_acc + row*D) + c4;
    const size_t   ps = stride*D/4;  // float4s between splits

    // every load of the first splits is issued before the first barrier: the (m, l) pairs and this
    // thread's partial rows of splits g, g + SG, g + 2 SG, g + 3 SG arrive together (one memory
    // round trip instead of three dependent ones)
    float4 x[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int s = g + k*SG;
        x[k] = g < SG && s < nsplit ? pa[(size_t) s*ps] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float M = -INFINITY;
    float2 own[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int s = tid + k*nt;
        own[k] = s < nsplit ? part_ml[s*stride + row] : make_float2(-INFINITY, 0.0f);
        M = fmaxf(M, own[k].x);
    }
    for (int s = tid + 2*nt; s < nsplit; s += nt) {
        M = fmaxf(M, part_ml[s*stride + row].x);
    }
    M = tca_warp_max(M);
    if (lane == 0) red[w] = M;
    __syncthreads();
    M = red[0];
    for (int i = 1; i < nw; ++i) M = fmaxf(M, red[i]);
    __syncthreads();

    float L = 0.0f;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int s = tid + k*nt;
        if (s < nsplit) {
            const float f = M == -INFINITY ? 0.0f : expf(own[k].x - M);  // 0 for an empty split (m = -inf)
            fs[s] = f;
            L += own[k].y*f;
        }
    }
    for (int s = tid + 2*nt; s < nsplit; s += nt) {
        const float2 ml = part_ml[s*stride + row];
        const float  f  = M == -INFINITY ? 0.0f : expf(ml.x - M);
        fs[s] = f;
        L += ml.y*f;
    }
    L = tca_warp_sum(L);
    if (lane == 0) red[w] = L;
    __syncthreads();
    L = 0.0f;
    for (int i = 0; i < nw; ++i) L += red[i];

    float * gsum = fs + nsplit;   // [SG][D]
    if (g < SG) {
        float4 a0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), a1 = a0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int s = g + k*SG;
            const float f = s < nsplit ? fs[s] : 0.0f;
            float4 & a = k % 2 ? a1 : a0;
            a.x = fmaf(x[k].x, f, a.x); a.y = fmaf(x[k].y, f, a.y); a.z = fmaf(x[k].z, f, a.z); a.w = fmaf(x[k].w, f, a.w);
        }
        for (int s = g + 4*SG; s < nsplit; s += SG) {
            const float4 y = pa[(size_t) s*ps];
            const float  f = fs[s];
            a0.x = fmaf(y.x, f, a0.x); a0.y = fmaf(y.y, f, a0.y); a0.z = fmaf(y.z, f, a0.z); a0.w = fmaf(y.w, f, a0.w);
        }
        *(float4 *) (gsum + g*D + 4*c4) = make_float4(a0.x + a1.x, a0.y + a1.y, a0.z + a1.z, a0.w + a1.w);
    }
    __syncthreads();
    for (int c = tid; c < D; c += nt) {
        float A = 0.0f;
        for (int k = 0; k < SG; ++k) {
            A += gsum[k*D + c];
        }
        dst[row*D + c] = L > 0.0f ? A/L : 0.0f;
    }
}

// ------------------------------------------------------------------------------------------
// host
// ------------------------------------------------------------------------------------------
template <int D, int NQ, int TYPE>
void tca_launch_ffma(const tca_args & a, const dim3 grid, cudaStream_t stream) {
    using cfg = tca_ffma_cfg<D, NQ>;
    auto kernel = tca_attn_ffma<D, NQ, TYPE>;
    CUDA_SET_SHARED_MEMORY_LIMIT(kernel, cfg::SMEM);
    kernel<<<grid, TCA_NT, cfg::SMEM, stream>>>(a);
}

// the f16 tensor-core prefill kernel (H200, 2048 queries over 12.7K rows a KV head, 32/8 heads):
//   mma1 (single-buffered, 64-row chunks)             D=128 2.742 ms  D=64 1.701 ms
//   mma2 (cp.async double-buffered, 64-row chunks)    D=128 2.289 ms  D=64 1.306 ms
//   mma2, 32-row chunks, 4 CTAs an SM                 D=128 2.428 ms  D=64 1.447 ms  (dropped)
//   mma2, 32-row chunks, two 16-query tiles a warp    D=128 2.172 ms  D=64 1.242 ms  (default)
// Two tiles a warp halve the shared-memory (ldmatrix) reads per flop; they take 128 queries a CTA,
// so a ubatch with fewer than 128 queries a KV head keeps one tile. TCA_CUDA_ATTN=mma1 forces the
// single-buffered kernel, mma2t1 / mma2t2 one or two tiles (tests, A/B).
enum tca_mma_kind { TCA_MMA1, TCA_MMA2_T1, TCA_MMA2_T2 };

template <int D, int C, int MT = 1>
void tca_launch_mma2(const tca_args & a, const dim3 grid, cudaStream_t stream) {
    static_assert(D <= 128, "tca_attn_mma2: D <= 128");
    using cfg = tca_mma2_cfg<D, C, MT>;
    auto kernel = tca_attn_mma2<D, C, MT>;
    CUDA_SET_SHARED_MEMORY_LIMIT(kernel, cfg::SMEM);
    kernel<<<grid, TCA_NT, cfg::SMEM, stream>>>(a);
}

template <int D, int NQ, int U>
void tca_launch_vec(const tca_args & a, const dim3 grid, cudaStream_t stream) {
    using cfg = tca_vec_cfg<D, NQ, U>;
    auto kernel = tca_attn_vec<D, NQ, U>;
    CUDA_SET_SHARED_MEMORY_LIMIT(kernel, cfg::SMEM);
    kernel<<<grid, TCA_NT, cfg::SMEM, stream>>>(a);
}

// a lane holds U = 2 units of a row (fewer shuffles, more registers) for D >= 128 and <= 4 queries;
// TCA_CUDA_VU=1 keeps one (A/B)
int tca_vec_u(const int D, const int NQ) {
    static const int vu = [] { const char * e = getenv("TCA_CUDA_VU"); return e ? atoi(e) : 2; }();
    return (D >= 128 && NQ <= 4 && vu != 1) ? 2 : 1;
}

template <int D>
void tca_dispatch_vec(const tca_args & a, const int NQ, const dim3 grid, cudaStream_t stream) {
    const bool u2 = tca_vec_u(D, NQ) == 2;
    switch (NQ) {
        case 1: if constexpr (D >= 128) { if (u2) { tca_launch_vec<D, 1, 2>(a, grid, stream); break; } }
                tca_launch_vec<D, 1, 1>(a, grid, stream); break;
        case 2: if constexpr (D >= 128) { if (u2) { tca_launch_vec<D, 2, 2>(a, grid, stream); break; } }
                tca_launch_vec<D, 2, 1>(a, grid, stream); break;
        case 4: if constexpr (D >= 128) { if (u2) { tca_launch_vec<D, 4, 2>(a, grid, stream); break; } }
                tca_launch_vec<D, 4, 1>(a, grid, stream); break;
        case 8: tca_launch_vec<D, 8, 1>(a, grid, stream); break;
        default: GGML_ABORT("tca_attn: bad vector query tile %d", NQ);
    }
}

template <int D, int TYPE>
void tca_launch_mma(const tca_args & a, const dim3 grid, cudaStream_t stream) {
    using cfg = tca_mma_cfg<D>;
    auto kernel = tca_attn_mma<D, TYPE>;
    CUDA_SET_SHARED_MEMORY_LIMIT(kernel, cfg::SMEM);
    kernel<<<grid, TCA_NT, cfg::SMEM, stream>>>(a);
}

template <int D, int TYPE>
void tca_dispatch_ffma(const tca_args & a, const int NQ, const dim3 grid, cudaStream_t stream) {
    switch (NQ) {
        case 1:  tca_launch_ffma<D, 1, TYPE>(a, grid, stream); break;
        case 4:  tca_launch_ffma<D, 4, TYPE>(a, grid, stream); break;
        case 8:  tca_launch_ffma<D, 8, TYPE>(a, grid, stream); break;
        case 32:
            if constexpr (D <= 128) {
                tca_launch_ffma<D, 32, TYPE>(a, grid, stream);
                break;
            }
            GGML_ABORT("tca_attn: no 32-query FFMA kernel for D=%d", D);
        default: GGML_ABORT("tca_attn: bad query tile %d", NQ);
    }
}

template <int D>
void tca_dispatch_d(const tca_args & a, const ggml_type type, const bool mma, const tca_mma_kind mk, const bool vec, const int NQ,
                    const dim3 grid, cudaStream_t stream) {
    if (vec) {
        tca_dispatch_vec<D>(a, NQ, grid, stream);
        return;
    }
    switch (type) {
        case GGML_TYPE_F32:
            tca_dispatch_ffma<D, GGML_TYPE_F32>(a, NQ, grid, stream);
            break;
        case GGML_TYPE_F16:
            if (mma) {
                if (mk == TCA_MMA1 || D > 128) {  // D = 256: two stages would need 101 KiB of shared memory
                    tca_launch_mma<D, GGML_TYPE_F16>(a, grid, stream);
                } else if constexpr (D <= 128) {
                    if (mk == TCA_MMA2_T2) {
                        tca_launch_mma2<D, 32, 2>(a, grid, stream);
                    } else {
                        tca_launch_mma2<D, 64>(a, grid, stream);
                    }
                }
            } else {
                tca_dispatch_ffma<D, GGML_TYPE_F16>(a, NQ, grid, stream);
            }
            break;
        case GGML_TYPE_Q8_0:
            if (mma) {
                tca_launch_mma<D, GGML_TYPE_Q8_0>(a, grid, stream);
            } else {
                tca_dispatch_ffma<D, GGML_TYPE_Q8_0>(a, NQ, grid, stream);
            }
            break;
        default:
            GGML_ABORT("tca_attn: unsupported K/V type %s", ggml_type_name(type));
    }
}

// largest shared memory any kernel for (D, type) may ask for
size_t tca_max_smem(const int D, const ggml_type type) {
    size_t s = 0;
    switch (D) {
        case 64:  s = std::max({tca_ffma_cfg<64, 32>::SMEM,  tca_mma_cfg<64>::SMEM, tca_mma2_cfg<64, 64>::SMEM, tca_mma2_cfg<64, 32, 2>::SMEM, tca_vec_cfg<64, 8>::SMEM});  break;
        case 128: s = std::max({tca_ffma_cfg<128, 32>::SMEM, tca_mma_cfg<128>::SMEM, tca_mma2_cfg<128, 64>::SMEM, tca_mma2_cfg<128, 32, 2>::SMEM, tca_vec_cfg<128, 8>::SMEM}); break;
        case 256: s = std::max({tca_ffma_cfg<256, 8>::SMEM,  tca_mma_cfg<256>::SMEM, tca_vec_cfg<256, 8>::SMEM}); break;
        default:  return SIZE_MAX;
    }
    GGML_UNUSED(type);
    return s;
}

// vector-kernel query tile: the smallest of 1, 2, 4, 8 holding the KV head's queries (8 at most)
int tca_vec_nq(const int64_t nq_head) {
    return nq_head <= 1 ? 1 : nq_head <= 2 ? 2 : nq_head <= 4 ? 4 : 8;
}

// FFMA query tile: the smallest of 1, 4, 8, 32 holding the KV head's queries (8 at most for D=256)
int tca_ffma_nq(const int64_t nq_head, const int D) {
    const int cap = D >= 256 ? 8 : 32;
    int nq = nq_head <= 1 ? 1 : nq_head <= 4 ? 4 : nq_head <= 8 ? 8 : 32;
    return std::min(nq, cap);
}

// ------------------------------------------------------------------------------------------
// GGML_OP_TCA_SCORE: pooled attention probabilities of one query per head over the head's rows
// ------------------------------------------------------------------------------------------
struct tca_score_args {
    const float * q;        // [D, n_head]
    const char  * k;        // [D, n_slots] rows of k_nb1 bytes
    const int   * meta;     // [2*n_head_kv]
    float       * logit;    // [n_head, n_slots] scratch
    float2      * ms;       // [n_head] (max, sum)
    float       * dst;      // [n_slots]
    int           n_head;
    int           n_head_kv;
    int           n_slots;
    size_t        k_nb1;
    float         scale;
};

// the KV head whose rows contain slot r, or -1
__device__ __forceinline__ int tca_score_head_of(const tca_score_args & a, int r, int & off, int & len) {
    for (int g = 0; g < a.n_head_kv; ++g) {
        int o = min(max(a.meta[2*g], 0), a.n_slots);
        int l = min(max(a.meta[2*g + 1], 0), a.n_slots - o);
        if (r >= o && r < o + l) {
            off = o;
            len = l;
            return g;
        }
    }
    return -1;
}

// element c = lane + 32*i of row r, as f32 (q8_0: block i, quant lane)
template <ggml_type T, int D>
__device__ __forceinline__ void tca_score_load_row(const char * row, int lane, float (&x)[D/32]) {
#pragma unroll
    for (int i = 0; i < D/32; ++i) {
        if constexpr (T == GGML_TYPE_F32) {
            x[i] = ((const float *) row)[lane + 32*i];
        } else if constexpr (T == GGML_TYPE_F16) {
            x[i] = __half2float(((const half *) row)[lane + 32*i]);
        } else {
            const block_q8_0 * b = (const block_q8_0 *) row + i;
            x[i] = __half2float(b->d) * (float) b->qs[lane];
        }
    }
}

// one warp per row: logits of every query head of the row's KV head
#define TCA_SCORE_RW 16  // rows a warp in tca_score_logits

template <ggml_type T, int D>
__global__ void __launch_bounds__(128) tca_score_logits(const tca_score_args a) {
    extern __shared__ float qs[];  // [n_head][D]
    for (int i = threadIdx.x; i < a.n_head*D; i += blockDim.x) {
        qs[i] = a.q[i];
    }
    __syncthreads();
    // a warp takes TCA_SCORE_RW consecutive rows (the CTA's copy of q serves 4*TCA_SCORE_RW rows:
    // with one row a warp, copying q into every CTA moved ~16x more bytes than the rows themselves)
    const int lane = threadIdx.x % 32;
    const int r0   = (blockIdx.x*(blockDim.x/32) + threadIdx.x/32)*TCA_SCORE_RW;
    const int G    = a.n_head/a.n_head_kv;
#pragma unroll 4
    for (int rr = 0; rr < TCA_SCORE_RW; ++rr) {
        const int r = r0 + rr;
        if (r >= a.n_slots) {
            break;
        }
        int off, len;
        const int g = tca_score_head_of(a, r, off, len);
        if (g < 0) {
            continue;
        }
        float x[D/32];
        tca_score_load_row<T, D>(a.k + (size_t) r*a.k_nb1, lane, x);
        for (int j = 0; j < G; ++j) {
            const float * qh = qs + (g*G + j)*D;
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < D/32; ++i) {
                dot = fmaf(qh[lane + 32*i], x[i], dot);
            }
            dot = tca_warp_sum(dot);
            if (lane == 0) {
                a.logit[(size_t) (g*G + j)*a.n_slots + r] = dot*a.scale;
            }
        }
    }
}

// f16 K: one THREAD per row. The row is read in 16-byte pieces and dotted with the G query heads of
// its KV head, held in shared memory (the lanes of a warp read the same q element: a broadcast).
// The warp-per-row kernel above spends ~150 instructions a row (head lookup, G shuffle reductions);
// this one ~13. H200, 1B shape at 128K/p=0.1 (ncu, 150K slots a layer): 87 us a layer before.
#define TCA_SCORE_TPR_NT 128
#define TCA_SCORE_TPR_GM 8   // query heads a pass over the row

template <int D>
__global__ void __launch_bounds__(TCA_SCORE_TPR_NT) tca_score_logits_tpr(const tca_score_args a) {
    extern __shared__ float qs[];  // [n_head][D], then the meta as int [2*n_head_kv]
    int * sm = (int *) (qs + a.n_head*D);
    for (int i = threadIdx.x; i < a.n_head*D; i += blockDim.x) {
        qs[i] = a.q[i];
    }
    for (int i = threadIdx.x; i < 2*a.n_head_kv; i += blockDim.x) {
        sm[i] = a.meta[i];
    }
    __syncthreads();
    const int r = blockIdx.x*blockDim.x + threadIdx.x;
    if (r >= a.n_slots) {
        return;
    }
    int g = -1;
    for (int gg = 0; gg < a.n_head_kv; ++gg) {
        const int o = min(max(sm[2*gg], 0), a.n_slots);
        const int l = min(max(sm[2*gg + 1], 0), a.n_slots - o);
        if (r >= o && r < o + l) {
            g = gg;
            break;
        }
    }
    if (g < 0) {
        return;
    }
    const int G = a.n_head/a.n_head_kv;
    const uint4 * row = (const uint4 *) (a.k + (size_t) r*a.k_nb1);
    for (int j0 = 0; j0 < G; j0 += TCA_SCORE_TPR_GM) {
        const float * qg = qs + (size_t) (g*G + j0)*D;
        float acc[TCA_SCORE_TPR_GM];
#pragma unroll
        for (int j = 0; j < TCA_SCORE_TPR_GM; ++j) {
            acc[j] = 0.0f;
        }
#pragma unroll 2
        for (int c = 0; c < D/8; ++c) {
            const uint4 u = __ldg(row + c);
            const half2 * h2 = (const half2 *) &u;
            float x[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 f = __half22float2(h2[i]);
                x[2*i] = f.x;
                x[2*i + 1] = f.y;
            }
#pragma unroll
            for (int j = 0; j < TCA_SCORE_TPR_GM; ++j) {
                if (j0 + j < G) {
                    const float4 qa = *(const float4 *) (qg + j*D + 8*c);
                    const float4 qb = *(const float4 *) (qg + j*D + 8*c + 4);
                    float t = acc[j];
                    t = fmaf(qa.x, x[0], t); t = fmaf(qa.y, x[1], t); t = fmaf(qa.z, x[2], t); t = fmaf(qa.w, x[3], t);
                    t = fmaf(qb.x, x[4], t); t = fmaf(qb.y, x[5], t); t = fmaf(qb.z, x[6], t); t = fmaf(qb.w, x[7], t);
                    acc[j] = t;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < TCA_SCORE_TPR_GM; ++j) {
            if (j0 + j < G) {
                a.logit[(size_t) (g*G + j0 + j)*a.n_slots + r] = acc[j]*a.scale;
            }
        }
    }
}

// one CTA (1024 threads) per query head: max and sum of exp over the head's rows, 4 independent
// accumulators a thread (loads in flight; with 256 threads and one accumulator the two passes over
// ~20K rows were a chain of ~80 dependent loads a thread, 32 CTAs on the whole GPU)
__global__ void __launch_bounds__(1024) tca_score_stats(const tca_score_args a) {
    __shared__ float red[32];
    const int h = blockIdx.x;
    const int G = a.n_head/a.n_head_kv;
    const int g = h/G;
    const int off = min(max(a.meta[2*g], 0), a.n_slots);
    const int len = min(max(a.meta[2*g + 1], 0), a.n_slots - off);
    const float * lg = a.logit + (size_t) h*a.n_slots + off;
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, nt = blockDim.x, nw = nt/32;

    float m0 = -INFINITY, m1 = -INFINITY, m2 = -INFINITY, m3 = -INFINITY;
    int r = threadIdx.x;
    for (; r + 3*nt < len; r += 4*nt) {
        m0 = fmaxf(m0, lg[r]);
        m1 = fmaxf(m1, lg[r + nt]);
        m2 = fmaxf(m2, lg[r + 2*nt]);
        m3 = fmaxf(m3, lg[r + 3*nt]);
    }
    for (; r < len; r += nt) {
        m0 = fmaxf(m0, lg[r]);
    }
    float m = tca_warp_max(fmaxf(fmaxf(m0, m1), fmaxf(m2, m3)));
    if (lane == 0) red[w] = m;
    __syncthreads();
    m = red[0];
    for (int i = 1; i < nw; ++i) m = fmaxf(m, red[i]);
    __syncthreads();

    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    r = threadIdx.x;
    for (; r + 3*nt < len; r += 4*nt) {
        s0 += expf(lg[r] - m);
        s1 += expf(lg[r + nt] - m);
        s2 += expf(lg[r + 2*nt] - m);
        s3 += expf(lg[r + 3*nt] - m);
    }
    for (; r < len; r += nt) {
        s0 += expf(lg[r] - m);
    }
    float s = tca_warp_sum((s0 + s1) + (s2 + s3));
    if (lane == 0) red[w] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int i = 0; i < nw; ++i) t += red[i];
        a.ms[h] = make_float2(m, t);
    }
}

// one thread per slot: pooled probability (0 outside every head's rows)
__global__ void tca_score_pool(const tca_score_args a) {
    const int r = blockIdx.x*blockDim.x + threadIdx.x;
    if (r >= a.n_slots) {
        return;
    }
    int off, len;
    const int g = tca_score_head_of(a, r, off, len);
    float s = 0.0f;
    if (g >= 0) {
        const int G = a.n_head/a.n_head_kv;
        for (int j = 0; j < G; ++j) {
            const int    h  = g*G + j;
            const float2 ms = a.ms[h];
            s += expf(a.logit[(size_t) h*a.n_slots + r] - ms.x)/ms.y;
        }
        s /= (float) G;
    }
    a.dst[r] = s;
}

template <int D>
void tca_score_launch(const tca_score_args & a, ggml_type type, cudaStream_t stream) {
    const size_t smpbo    = (size_t) ggml_cuda_info().devices[ggml_cuda_get_device()].smpbo;
    const size_t smem_tpr = (size_t) a.n_head*D*sizeof(float) + 2*(size_t) a.n_head_kv*sizeof(int);
    if (type == GGML_TYPE_F16 && (uintptr_t) a.k % 16 == 0 && a.k_nb1 % 16 == 0 && smem_tpr <= smpbo) {
        const size_t smem = smem_tpr;
        CUDA_SET_SHARED_MEMORY_LIMIT((tca_score_logits_tpr<D>), (int) ggml_cuda_info().devices[ggml_cuda_get_device()].smpbo);
        const dim3 grid((unsigned) ((a.n_slots + TCA_SCORE_TPR_NT - 1)/TCA_SCORE_TPR_NT));
        tca_score_logits_tpr<D><<<grid, TCA_SCORE_TPR_NT, smem, stream>>>(a);
        return;
    }
    const int    rows_per_cta = 4*TCA_SCORE_RW;  // 128 threads = 4 warps
    const dim3   grid((unsigned) ((a.n_slots + rows_per_cta - 1)/rows_per_cta));
    const size_t smem = (size_t) a.n_head*D*sizeof(float);
    switch (type) {
        case GGML_TYPE_F32:
            CUDA_SET_SHARED_MEMORY_LIMIT((tca_score_logits<GGML_TYPE_F32, D>), (int) ggml_cuda_info().devices[ggml_cuda_get_device()].smpbo);
            tca_score_logits<GGML_TYPE_F32, D><<<grid, 128, smem, stream>>>(a); break;
        case GGML_TYPE_F16:
            CUDA_SET_SHARED_MEMORY_LIMIT((tca_score_logits<GGML_TYPE_F16, D>), (int) ggml_cuda_info().devices[ggml_cuda_get_device()].smpbo);
            tca_score_logits<GGML_TYPE_F16, D><<<grid, 128, smem, stream>>>(a); break;
        case GGML_TYPE_Q8_0:
            CUDA_SET_SHARED_MEMORY_LIMIT((tca_score_logits<GGML_TYPE_Q8_0, D>), (int) ggml_cuda_info().devices[ggml_cuda_get_device()].smpbo);
            tca_score_logits<GGML_TYPE_Q8_0, D><<<grid, 128, smem, stream>>>(a); break;
        default: GGML_ABORT("tca_score: unsupported K type");
    }
}

} // namespace

bool ggml_cuda_op_tca_attn_supported(int device, const ggml_tensor * op) {
#if defined(GGML_USE_HIP) || defined(GGML_USE_MUSA)
    GGML_UNUSED_VARS(device, op);
    return false;
#else
    const ggml_tensor * q    = op->src[0];
    const ggml_tensor * k    = op->src[1];
    const ggml_tensor * v    = op->src[2];
    const ggml_tensor * kpos = op->src[3];
    const ggml_tensor * meta = op->src[4];
    const ggml_tensor * qpos = op->src[5];
    if (!q || !k || !v || !kpos || !meta || !qpos) {
        return false;
    }
    if (op->type != GGML_TYPE_F32 || q->type != GGML_TYPE_F32 || k->type != v->type) {
        return false;
    }
    if (k->type != GGML_TYPE_F32 && k->type != GGML_TYPE_F16 && k->type != GGML_TYPE_Q8_0) {
        return false;
    }
    if ((kpos->type != GGML_TYPE_I32 && kpos->type != GGML_TYPE_F32) || meta->type != GGML_TYPE_I32 ||
        qpos->type != GGML_TYPE_I32) {
        return false;
    }
    const int64_t D         = q->ne[0];
    const int64_t T         = q->ne[1];
    const int64_t n_head    = q->ne[2];
    const int64_t n_slots   = k->ne[1];
    const int64_t n_head_kv = ggml_get_op_params_i32(op, 0);
    if (D != 64 && D != 128 && D != 256) {
        return false;
    }
    if (q->ne[3] != 1 || k->ne[0] != D || k->ne[2] != 1 || k->ne[3] != 1 ||
        v->ne[0] != D || v->ne[1] != n_slots || v->ne[2] != 1 || v->ne[3] != 1) {
        return false;
    }
    if (op->ne[0] != D || op->ne[1] != n_head || op->ne[2] != T || op->ne[3] != 1) {
        return false;
    }
    if (n_head_kv <= 0 || n_head % n_head_kv != 0) {
        return false;
    }
    if (ggml_nelements(kpos) != n_slots || ggml_nelements(meta) != 2*n_head_kv || ggml_nelements(qpos) != T) {
        return false;
    }
    for (const ggml_tensor * t : { q, k, v, kpos, meta, qpos, (const ggml_tensor *) op }) {
        if (!ggml_is_contiguous(t)) {
            return false;
        }
    }
    // vector loads of K/V rows: 16-byte aligned rows for f32/f16, 4-byte for q8_0 (pairs of blocks)
    const size_t align = k->type == GGML_TYPE_Q8_0 ? 4 : 16;
    for (const ggml_tensor * t : { k, v }) {
        if (t->view_src && t->view_offs % align != 0) {
            return false;
        }
    }
    // int indexing and grid limits
    if (n_slots > INT_MAX/2 || T*n_head > INT_MAX/2 || T*n_head*D > (int64_t) INT_MAX*64) {
        return false;
    }
    return ggml_cuda_info().devices[device].smpbo >= tca_max_smem((int) D, k->type);
#endif
}

void ggml_cuda_op_tca_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * kpos = dst->src[3];
    const ggml_tensor * meta = dst->src[4];
    const ggml_tensor * qpos = dst->src[5];

    const int64_t D         = q->ne[0];
    const int64_t T         = q->ne[1];
    const int64_t n_head    = q->ne[2];
    const int64_t n_slots   = k->ne[1];
    const int64_t n_head_kv = ggml_get_op_params_i32(dst, 0);
    const float   scale     = ggml_get_op_params_f32(dst, 1);

    GGML_ASSERT(ggml_cuda_op_tca_attn_supported(ctx.device, dst) && "tca_attn: unsupported on CUDA");
    const size_t align = k->type == GGML_TYPE_Q8_0 ? 4 : 16;
    GGML_ASSERT((uintptr_t) k->data % align == 0 && (uintptr_t) v->data % align == 0);
    GGML_ASSERT((uintptr_t) dst->data % 16 == 0);

    const int64_t G = n_head/n_head_kv;
    const int     cc  = ggml_cuda_info().devices[ctx.device].cc;
    const int     nsm = ggml_cuda_info().devices[ctx.device].nsm;

    const char * force = getenv("TCA_CUDA_ATTN");
    const bool   can_mma = (k->type == GGML_TYPE_F16 || k->type == GGML_TYPE_Q8_0) && ampere_mma_available(cc);
    // TCA_CUDA_VEC=0: FFMA instead of the vector kernel for f16 decode (A/B and fallback)
    static const bool vec_on = [] { const char * e = getenv("TCA_CUDA_VEC"); return !e || atoi(e) != 0; }();
    const bool   can_vec = k->type == GGML_TYPE_F16;
    bool mma = can_mma && G*T >= 16;
    bool vec = !mma && can_vec && vec_on;
    if (force && strcmp(force, "ffma") == 0) {
        mma = vec = false;
    } else if (force && strncmp(force, "mma", 3) == 0) {  // mma, mma1, mma2, mma2t1, mma2t2
        mma = can_mma;
        vec = false;
    } else if (force && strcmp(force, "vec") == 0) {
        vec = can_vec;
        mma = false;
    }

    // f16 prefill, D <= 128: mma2 with two query tiles a warp when a KV head has >= 128 queries (see
    // tca_mma_kind); q8_0 and D = 256 take the single-buffered kernel
    tca_mma_kind mk = TCA_MMA1;
    if (mma && k->type == GGML_TYPE_F16 && D <= 128 && !(force && strcmp(force, "mma1") == 0)) {
        const int mt = force && strcmp(force, "mma2t1") == 0 ? 1 : force && strcmp(force, "mma2t2") == 0 ? 2 : 0;
        mk = mt == 2 || (mt == 0 && G*T >= 2*tca_mma_cfg<64>::NQ) ? TCA_MMA2_T2 : TCA_MMA2_T1;
    }
    const int NQ = mma ? tca_mma_cfg<64>::NQ*(mk == TCA_MMA2_T2 ? 2 : 1) : vec ? tca_vec_nq(G*T) : tca_ffma_nq(G*T, (int) D);
    // rows a split should hold at least twice: an mma/FFMA chunk, or one round of the vector kernel's warps
    int C = mma ? (mk == TCA_MMA2_T2 ? 32 : 64) : 32;
    if (vec) {
        // rows of one round of the CTA's warps: (rows a warp load) x (rows a lane a batch) x warps
        const int U   = tca_vec_u((int) D, NQ);
        const int rpw = 32/((int) D/(8*U));
        C = rpw*((NQ <= 4 ? 8 : 4)/U)*(TCA_NT/32);
    }

    // CTA tile: hs query heads of one KV head x tt tokens, hs*tt <= NQ
    int64_t hs  = std::min<int64_t>(G, NQ);
    const int64_t nhs = (G + hs - 1)/hs;
    hs = (G + nhs - 1)/nhs;
    const int64_t tt     = std::min<int64_t>(T, std::max<int64_t>(1, NQ/hs));
    const int64_t ntiles = (T + tt - 1)/tt;
    const int64_t base   = n_head_kv*nhs*ntiles;
    GGML_ASSERT(hs*tt <= NQ && base <= INT_MAX);

    // split the rows of a head when the tiles alone do not fill the GPU
    int64_t nsplit = 1;
    // CTAs per SM to aim for (TCA_CUDA_SPLIT overrides the FFMA/decode figure, for tuning)
    static const int ffma_per_sm = [] { const char * e = getenv("TCA_CUDA_SPLIT"); return e ? std::max(1, atoi(e)) : 4; }();
    // vector kernel: 2 CTAs per SM (H200, decode op at 128K/p=0.1: 1/2/4 -> D=128 0.057/0.038/0.040 ms,
    // D=64 0.032/0.020/0.023 ms; the FFMA kernel 0.042/0.025)
    static const int vec_per_sm  = [] { const char * e = getenv("TCA_CUDA_VSPLIT"); return e ? std::max(1, atoi(e)) : 2; }();
    const int64_t target = (int64_t) nsm*(mma ? 2 : vec ? vec_per_sm : ffma_per_sm);
    if (base < target && n_slots > 0) {
        const int64_t rows   = (n_slots + n_head_kv - 1)/n_head_kv;  // rows per head (estimate)
        const int64_t chunks = (rows + C - 1)/C;
        nsplit = std::min<int64_t>((target + base - 1)/base, std::max<int64_t>(1, chunks/2));
        nsplit = std::min<int64_t>(nsplit, 1024);
    }

    tca_args a;
    a.q         = (const char *) q->data;
    a.k         = (const char *) k->data;
    a.v         = (const char *) v->data;
    // kpos as f32 (the retention cache's layout): converted to i32 once, on the stream
    // kpos as f32 (the retention cache's layout) is read as is (no conversion pass)
    a.kpos  = kpos->type == GGML_TYPE_F32 ? nullptr : (const int *) kpos->data;
    a.kposf = kpos->type == GGML_TYPE_F32 ? (const float *) kpos->data : nullptr;
    a.meta      = (const int *) meta->data;
    a.qpos      = (const int *) qpos->data;
    a.dst       = (float *) dst->data;
    a.part_acc  = nullptr;
    a.part_ml   = nullptr;
    a.T         = (int) T;
    a.n_head    = (int) n_head;
    a.n_head_kv = (int) n_head_kv;
    a.n_slots   = (int) n_slots;
    a.hs        = (int) hs;
    a.nhs       = (int) nhs;
    a.tt        = (int) tt;
    a.nsplit    = (int) nsplit;
    a.q_nb1     = q->nb[1];
    a.q_nb2     = q->nb[2];
    a.k_nb1     = k->nb[1];
    a.v_nb1     = v->nb[1];
    a.scale     = scale;

    cudaStream_t stream = ctx.stream();
    ggml_cuda_pool_alloc<float>  part_acc(ctx.pool());
    ggml_cuda_pool_alloc<float2> part_ml(ctx.pool());
    if (nsplit > 1) {
        a.part_acc = part_acc.alloc(nsplit*T*n_head*D);
        a.part_ml  = part_ml.alloc(nsplit*T*n_head);
    }

    const dim3 grid((unsigned) base, (unsigned) nsplit, 1);
    switch (D) {
        case 64:  tca_dispatch_d<64>(a, k->type, mma, mk, vec, NQ, grid, stream);  break;
        case 128: tca_dispatch_d<128>(a, k->type, mma, mk, vec, NQ, grid, stream); break;
        case 256: tca_dispatch_d<256>(a, k->type, mma, mk, vec, NQ, grid, stream); break;
        default:  GGML_ABORT("tca_attn: unsupported head size %d", (int) D);
    }
    if (nsplit > 1) {
        GGML_ASSERT(D % 4 == 0 && D/4 <= TCA_NT);
        const size_t smem = (nsplit + (size_t) (TCA_NT/(D/4))*D)*sizeof(float);
        tca_attn_combine<<<(unsigned) (T*n_head), TCA_NT, smem, stream>>>(a.part_acc, a.part_ml, a.dst,
                                                                            (int) nsplit, (int) T, (int) n_head, (int) D);
    }
    CUDA_CHECK(cudaGetLastError());
}

bool ggml_cuda_op_tca_score_supported(int device, const ggml_tensor * op) {
#if defined(GGML_USE_HIP) || defined(GGML_USE_MUSA)
    GGML_UNUSED_VARS(device, op);
    return false;
#else
    const ggml_tensor * q    = op->src[0];
    const ggml_tensor * k    = op->src[1];
    const ggml_tensor * meta = op->src[2];
    if (!q || !k || !meta || op->type != GGML_TYPE_F32 || q->type != GGML_TYPE_F32 || meta->type != GGML_TYPE_I32) {
        return false;
    }
    if (k->type != GGML_TYPE_F32 && k->type != GGML_TYPE_F16 && k->type != GGML_TYPE_Q8_0) {
        return false;
    }
    const int64_t D = q->ne[0], n_head = q->ne[1], n_slots = k->ne[1];
    const int64_t n_head_kv = ggml_get_op_params_i32(op, 0);
    if (D != 64 && D != 128 && D != 256) {
        return false;
    }
    if (ggml_nelements(q) != D*n_head || k->ne[0] != D || k->ne[2] != 1 || k->ne[3] != 1 || ggml_nelements(op) != n_slots) {
        return false;
    }
    if (n_head_kv <= 0 || n_head % n_head_kv != 0 || ggml_nelements(meta) != 2*n_head_kv) {
        return false;
    }
    for (const ggml_tensor * t : { q, k, meta, (const ggml_tensor *) op }) {
        if (!ggml_is_contiguous(t)) {
            return false;
        }
    }
    if (n_slots > INT_MAX/2 || n_head*n_slots > (int64_t) INT_MAX*16) {
        return false;
    }
    return (size_t) ggml_cuda_info().devices[device].smpbo >= (size_t) (n_head*D*sizeof(float));
#endif
}

void ggml_cuda_op_tca_score(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * meta = dst->src[2];
    GGML_ASSERT(ggml_cuda_op_tca_score_supported(ctx.device, dst) && "tca_score: unsupported on CUDA");

    const int64_t D = q->ne[0], n_head = q->ne[1], n_slots = k->ne[1];

    tca_score_args a;
    a.q         = (const float *) q->data;
    a.k         = (const char *) k->data;
    a.meta      = (const int *) meta->data;
    a.dst       = (float *) dst->data;
    a.n_head    = (int) n_head;
    a.n_head_kv = ggml_get_op_params_i32(dst, 0);
    a.n_slots   = (int) n_slots;
    a.k_nb1     = k->nb[1];
    a.scale     = ggml_get_op_params_f32(dst, 1);
    if (n_slots == 0) {
        return;
    }

    cudaStream_t stream = ctx.stream();
    ggml_cuda_pool_alloc<float>  logit(ctx.pool(), (size_t) n_head*n_slots);
    ggml_cuda_pool_alloc<float2> ms(ctx.pool(), (size_t) n_head);
    a.logit = logit.get();
    a.ms    = ms.get();

    switch (D) {
        case 64:  tca_score_launch<64>(a, k->type, stream);  break;
        case 128: tca_score_launch<128>(a, k->type, stream); break;
        case 256: tca_score_launch<256>(a, k->type, stream); break;
        default:  GGML_ABORT("tca_score: unsupported head size %d", (int) D);
    }
    tca_score_stats<<<(unsigned) n_head, 1024, 0, stream>>>(a);
    tca_score_pool<<<(unsigned) ((n_slots + 255)/256), 256, 0, stream>>>(a);
    CUDA_CHECK(cudaGetLastError());
}

// ------------------------------------------------------------------------------------------
// GGML_OP_TCA_SELECT / GGML_OP_TCA_COMPACT: selection and compaction on the device
// ------------------------------------------------------------------------------------------
// The arithmetic is that of the CPU kernel (native/ggml-cpu/tca-attn.cpp, tca_select_one): block
// sums and the block score in double, ranks with ties to the lower block, the cumulative budget in
// double in descending-k order, per-block top-k on max-pooled f32 scores with ties to the lower
// row. Only the order of the block sums differs (a tree here), so a block score can differ in its
// last bits and two blocks whose scores tie to ~1e-16 may swap ranks.
namespace {

struct tca_sel_args {
    const float * s;      // [n_slots]
    const float * kpos;   // [n_slots]
    const int   * meta;   // [2*H]
    const float * bud;    // [2*n_k+1, H]
    int         * sel;    // [n_slots + 4*H]
    // scratch, [H][NB]
    int         * r0;
    int         * cnt;
    double      * m;
    double      * sq;
    int         * kb;     // kept rows of the block
    int         * out;    // first destination slot of the block (region-relative)
    int         * rk;     // rank of the block by score (prefill)
    int n_slots, H, n_k, block, n_sink, F, f0, radius, j0, NB;
    double alpha;
};

// first row r in [0, len) of the region with kpos[r] >= p (rows ascending)
__device__ __forceinline__ int tca_lower_bound(const float * kp, int len, float p) {
    int lo = 0, hi = len;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (kp[mid] < p) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// the same, by a whole warp: 32 probes a round (3 dependent rounds of loads for ~20K rows instead of 15)
__device__ __forceinline__ int tca_lower_bound_warp(const float * kp, int len, float p, int lane) {
    int lo = 0, hi = len;
    while (hi - lo > 32) {
        const int step = (hi - lo + 31)/32;
        const int idx  = min(lo + (lane + 1)*step - 1, hi - 1);
        const int c    = __popc(__ballot_sync(0xffffffff, kp[idx] < p));  // probes below p: a prefix of the lanes
        const int nlo  = lo + c*step;
        hi = min(hi, lo + (c + 1)*step);
        lo = min(nlo, hi);
    }
    const bool below = lo + lane < hi && kp[lo + lane] < p;
    return lo + __popc(__ballot_sync(0xffffffff, below));
}

__device__ __forceinline__ double tca_warp_sum_d(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

// grid (NB, H), 128 threads: the rows of candidate block j0 + blockIdx.x and their sums
__global__ void __launch_bounds__(128) tca_sel_blocks(const tca_sel_args a) {
    __shared__ int rr[2];
    __shared__ double red[2][4];
    const int g = blockIdx.y, jb = blockIdx.x, j = a.j0 + jb;
    const int off = a.meta[2*g], len = a.meta[2*g + 1];
    const float * kp = a.kpos + off;
    const int lo = a.f0 >= 0 ? max(a.f0, a.n_sink) : a.n_sink;
    if (threadIdx.x < 64) {  // warp 0: the block's first row, warp 1: the row after its last
        const int wq = threadIdx.x / 32;
        const float p = (float) (wq == 0 ? max(j*a.block, lo) : min((j + 1)*a.block, a.F));
        const int r = tca_lower_bound_warp(kp, len, p, threadIdx.x % 32);
        if (threadIdx.x % 32 == 0) rr[wq] = r;
    }
    __syncthreads();
    const int r0 = rr[0], r1 = max(rr[1], rr[0]);
    double m = 0.0, sq = 0.0;
    for (int r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
        const double x = (double) a.s[off + r];
        m += x;
        sq += x*x;
    }
    m = tca_warp_sum_d(m);
    sq = tca_warp_sum_d(sq);
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    if (lane == 0) { red[0][w] = m; red[1][w] = sq; }
    __syncthreads();
    if (threadIdx.x == 0) {
        const size_t i = (size_t) g*a.NB + jb;
        a.r0[i]  = r0;
        a.cnt[i] = r1 - r0;
        a.m[i]   = red[0][0] + red[0][1] + red[0][2] + red[0][3];
        a.sq[i]  = red[1][0] + red[1][1] + red[1][2] + red[1][3];
    }
}

// inclusive prefix sum over the lanes of a warp
__device__ __forceinline__ int tca_warp_scan_incl(int x, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffff, x, o);
        if (lane >= o) x += y;
    }
    return x;
}

// inclusive scan of one int per thread over a CTA of 1024 threads (32 warps)
__device__ __forceinline__ int tca_block_scan_1024(int x, int * wsum) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    x = tca_warp_scan_incl(x, lane);
    if (lane == 31) wsum[w] = x;
    __syncthreads();
    if (w == 0) {
        wsum[lane] = tca_warp_scan_incl(wsum[lane], lane);
    }
    __syncthreads();
    const int add = w > 0 ? wsum[w - 1] : 0;
    __syncthreads();
    return x + add;
}

// block score h_j = (1 - alpha) m_j/M + alpha (1 - sq_j/m_j^2) (present blocks; -1 ranks an absent one last)
__device__ __forceinline__ double tca_sel_h(const tca_sel_args & a, size_t i, double M) {
    const double mj = a.m[i], sj = a.sq[i];
    if (a.cnt[i] <= 0) return -1.0;
    const double c = mj > 0 ? 1.0 - sj/(mj*mj) : 0.0;
    return (1.0 - a.alpha)*(M > 0 ? mj/M : 0.0) + a.alpha*c;
}

// grid (ceil(NB/256), H), 256 threads (prefill): rank of every block by h, descending, ties to the lower
// block. O(NB^2) comparisons spread over the GPU (in tca_sel_rank they ran on H CTAs: 57 us a layer for
// NB ~ 1000 on the H200); every CTA recomputes M and the h of each tile (a few thousand doubles).
#define TCA_SEL_RNT 256
__global__ void __launch_bounds__(TCA_SEL_RNT) tca_sel_ranks(const tca_sel_args a) {
    __shared__ double tile[TCA_SEL_RNT];
    __shared__ double dred[TCA_SEL_RNT/32];
    const int g = blockIdx.y, t = threadIdx.x, lane = t % 32, w = t / 32;
    const size_t base = (size_t) g*a.NB;
    double M = 0.0;
    for (int j = t; j < a.NB; j += TCA_SEL_RNT) {
        if (a.cnt[base + j] > 0) M = fmax(M, a.m[base + j]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmax(M, __shfl_xor_sync(0xffffffff, M, o));
    if (lane == 0) dred[w] = M;
    __syncthreads();
    M = 0.0;
    for (int i = 0; i < TCA_SEL_RNT/32; ++i) M = fmax(M, dred[i]);
    const int j = blockIdx.x*TCA_SEL_RNT + t;
    const double hj = j < a.NB ? tca_sel_h(a, base + j, M) : 0.0;
    int rank = 0;
    for (int i0 = 0; i0 < a.NB; i0 += TCA_SEL_RNT) {
        __syncthreads();
        if (i0 + t < a.NB) tile[t] = tca_sel_h(a, base + i0 + t, M);
        __syncthreads();
        const int ni = min(TCA_SEL_RNT, a.NB - i0);
        for (int i = 0; i < ni; ++i) {
            const double hi = tile[i];
            rank += (hi > hj) || (hi == hj && i0 + i < j);
        }
    }
    if (j < a.NB) a.rk[base + j] = rank;
}

// grid (H), 1024 threads: block scores, ranks, budgets, destinations; the identity/shift slots of
// the sinks and the live rows; the head's tail
__global__ void __launch_bounds__(1024) tca_sel_rank(const tca_sel_args a) {
    __shared__ int wsum[32];
    __shared__ int ired[32];
    const int g = blockIdx.x, t = threadIdx.x;
    const int off = a.meta[2*g], len = a.meta[2*g + 1];
    const size_t base = (size_t) g*a.NB;
    const float * bud = a.bud + (size_t) g*(2*a.n_k + 1);
    const bool decode = a.f0 >= 0;
    const int lane = t % 32, w = t / 32;

    // N (present blocks)
    int n_present = 0;
    for (int j = t; j < a.NB; j += 1024) {
        if (a.cnt[base + j] > 0) ++n_present;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        n_present += __shfl_xor_sync(0xffffffff, n_present, o);
    }
    if (lane == 0) ired[w] = n_present;
    __syncthreads();
    if (t == 0) {
        int n = 0;
        for (int i = 0; i < 32; ++i) n += ired[i];
        ired[0] = n;
    }
    __syncthreads();
    n_present = ired[0];
    __syncthreads();

    // per block: k, kept rows (ranks from tca_sel_ranks)
    const int kt = (int) bud[2*a.n_k];
    int carry = 0;
    for (int j0t = 0; j0t < a.NB; j0t += 1024) {
        const int j = j0t + t;
        int kept = 0;
        int k = 0;
        if (!decode) {
            const int rank = j < a.NB ? a.rk[base + j] : 0;
            if (j < a.NB && a.cnt[base + j] > 0) {
                const double u = ((double) rank + 0.5)/(double) n_present;
                double acc = 0.0;
                k = (int) bud[a.n_k + a.n_k - 1];
                for (int i = 0; i < a.n_k; ++i) {
                    acc += (double) bud[i];
                    if (u < acc) { k = (int) bud[a.n_k + i]; break; }
                }
            }
        } else {
            k = kt;
        }
        if (j < a.NB) kept = min(k, a.cnt[base + j]);
        const int incl = tca_block_scan_1024(kept, wsum);
        if (j < a.NB) {
            a.kb[base + j] = kept;
            a.out[base + j] = carry + incl - kept;  // relative to the first candidate row, fixed below
        }
        __syncthreads();
        if (t == 1023) wsum[0] = incl;
        __syncthreads();
        carry += wsum[0];
        __syncthreads();
    }
    // first candidate row c0 and first live row c1
    const int lo = decode ? max(a.f0, a.n_sink) : a.n_sink;
    const float * kp = a.kpos + off;
    const int c0 = a.NB > 0 ? a.r0[base] : tca_lower_bound(kp, len, (float) lo);
    const int c1 = a.NB > 0 ? a.r0[base + a.NB - 1] + a.cnt[base + a.NB - 1] : c0;
    const int newlen = c0 + carry + (len - c1);
    for (int j = t; j < a.NB; j += 1024) a.out[base + j] += c0;
    int * sel = a.sel + off;
    for (int r = t; r < c0; r += 1024) sel[r] = off + r;
    for (int r = t; r < len - c1; r += 1024) sel[c0 + carry + r] = off + c1 + r;
    for (int r = newlen + t; r < len; r += 1024) sel[r] = -1;
    if (t == 0) {
        int * tail = a.sel + a.n_slots + 4*g;
        tail[0] = off;
        tail[1] = newlen;
        tail[2] = len - newlen;
        ((float *) tail)[3] = 0.0f;
    }
}

// grid (NB, H), 128 threads: top-k rows of one block by pooled score; their destinations
__global__ void __launch_bounds__(128) tca_sel_topk(const tca_sel_args a) {
    extern __shared__ float sp[];                 // [cnt] pooled scores
    int * keep = (int *) (sp + a.block);          // [cnt]
    __shared__ int wsum[4];
    __shared__ float fred[4];
    const int g = blockIdx.y, jb = blockIdx.x;
    const size_t i = (size_t) g*a.NB + jb;
    const int off = a.meta[2*g];
    const int r0 = a.r0[i], cnt = a.cnt[i], k = a.kb[i], out = a.out[i];
    int * sel = a.sel + off;
    if (cnt == 0) return;
    if (k >= cnt) {
        for (int r = threadIdx.x; r < cnt; r += blockDim.x) sel[out + r] = off + r0 + r;
        return;
    }
    const float * s  = a.s + off + r0;
    const float * kp = a.kpos + off + r0;
    const int R = a.radius;
    for (int r = threadIdx.x; r < cnt; r += blockDim.x) {
        float m = s[r];
        const float pr = kp[r];
        for (int o = 1; o <= R; ++o) {
            if (r - o >= 0 && pr - kp[r - o] <= (float) R) m = fmaxf(m, s[r - o]);
            if (r + o < cnt && kp[r + o] - pr <= (float) R) m = fmaxf(m, s[r + o]);
        }
        sp[r] = m;
    }
    __syncthreads();
    float evicted = 0.0f;
    for (int r = threadIdx.x; r < cnt; r += blockDim.x) {
        const float x = sp[r];
        int rank = 0;
        for (int q = 0; q < cnt; ++q) {
            const float y = sp[q];
            rank += (y > x) || (y == x && q < r);
        }
        keep[r] = rank < k;
        if (rank >= k) evicted += s[r];
    }
    evicted = tca_warp_sum(evicted);
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    if (lane == 0) fred[w] = evicted;
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd((float *) (a.sel + a.n_slots + 4*g) + 3, fred[0] + fred[1] + fred[2] + fred[3]);
    // destinations: exclusive scan of keep over the block's rows, in order
    int carry = 0;
    for (int c = 0; c < cnt; c += blockDim.x) {
        const int r = c + threadIdx.x;
        const int x = tca_warp_scan_incl(r < cnt ? keep[r] : 0, lane);
        if (lane == 31) wsum[w] = x;
        __syncthreads();
        int add = carry;
        for (int q = 0; q < w; ++q) add += wsum[q];
        const int tot = wsum[0] + wsum[1] + wsum[2] + wsum[3];
        if (r < cnt && keep[r]) sel[out + add + x - 1] = off + r0 + r;
        __syncthreads();
        carry += tot;
    }
}

// Row moves of the compaction, over (slot d, word i) pairs, grid-stride: GATHER copies row sel[d] of a
// into slot d of the scratch, then !GATHER copies it back into slot d of a. Slots that keep their row
// (sel[d] == d) or hold none (-1) cost one cached read of sel. W is a 16-byte word where rows and
// bases allow it, else 4 bytes. (Before: one warp a slot with 4-byte words, one CTA per 8 slots: a
// layer at 128K on the 1B shape launched ~19K CTAs a pass, most of them for rows that do not move.)
template <typename W, bool GATHER>
__global__ void __launch_bounds__(256) tca_compact_copy(char * a, char * tmp, const int * __restrict__ sel, int n_slots, int words) {
    const int64_t n = (int64_t) n_slots*words;
    for (int64_t t = blockIdx.x*(int64_t) blockDim.x + threadIdx.x; t < n; t += (int64_t) gridDim.x*blockDim.x) {
        const int d = (int) (t/words), i = (int) (t - (int64_t) d*words);
        const int src = sel[d];
        if (src < 0 || src == d) continue;
        if (GATHER) {
            ((W *) tmp)[(int64_t) d*words + i] = ((const W *) a)[(int64_t) src*words + i];
        } else {
            ((W *) a)[(int64_t) d*words + i] = ((const W *) tmp)[(int64_t) d*words + i];
        }
    }
}

} // namespace

bool ggml_cuda_op_tca_select_supported(int device, const ggml_tensor * op) {
#if defined(GGML_USE_HIP) || defined(GGML_USE_MUSA)
    GGML_UNUSED_VARS(device, op);
    return false;
#else
    if (op->op == GGML_OP_TCA_COMPACT) {
        const ggml_tensor * a = op->src[0], * sel = op->src[1];
        if (!a || !sel || sel->type != GGML_TYPE_I32 || !ggml_is_contiguous(a) || !ggml_is_contiguous(sel)) return false;
        if (a->nb[1] % 4 != 0 || (a->view_src && a->view_offs % 4 != 0) || a->ne[1] > INT_MAX/2) return false;
        return true;
    }
    const ggml_tensor * s = op->src[0], * kpos = op->src[1], * meta = op->src[2], * bud = op->src[3];
    if (!s || !kpos || !meta || !bud) return false;
    if (s->type != GGML_TYPE_F32 || kpos->type != GGML_TYPE_F32 || meta->type != GGML_TYPE_I32 ||
        bud->type != GGML_TYPE_F32 || op->type != GGML_TYPE_I32) return false;
    for (const ggml_tensor * t : { s, kpos, meta, bud, (const ggml_tensor *) op }) {
        if (!ggml_is_contiguous(t)) return false;
    }
    const int64_t block = ggml_get_op_params_i32(op, 1);
    GGML_UNUSED(device);
    return ggml_nelements(s) <= INT_MAX/2 && block > 0 && block <= 4096;
#endif
}

void ggml_cuda_op_tca_select(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    GGML_ASSERT(ggml_cuda_op_tca_select_supported(ctx.device, dst) && "tca_select: unsupported on CUDA");
    const ggml_tensor * s = dst->src[0], * kpos = dst->src[1], * meta = dst->src[2], * bud = dst->src[3];
    tca_sel_args a;
    a.s      = (const float *) s->data;
    a.kpos   = (const float *) kpos->data;
    a.meta   = (const int *) meta->data;
    a.bud    = (const float *) bud->data;
    a.sel    = (int *) dst->data;
    a.n_slots = (int) ggml_nelements(s);
    a.H      = ggml_get_op_params_i32(dst, 0);
    a.block  = ggml_get_op_params_i32(dst, 1);
    a.n_sink = ggml_get_op_params_i32(dst, 2);
    a.F      = ggml_get_op_params_i32(dst, 3);
    a.f0     = ggml_get_op_params_i32(dst, 4);
    a.alpha  = (double) ggml_get_op_params_f32(dst, 5);
    a.radius = ggml_get_op_params_i32(dst, 6);
    a.n_k    = (int) (bud->ne[0] - 1)/2;
    const int lo = a.f0 >= 0 ? std::max(a.f0, a.n_sink) : a.n_sink;
    a.j0 = lo / a.block;
    a.NB = std::max(0, a.F / a.block - a.j0);

    cudaStream_t stream = ctx.stream();
    CUDA_CHECK(cudaMemsetAsync(dst->data, 0xff, ggml_nbytes(dst), stream));  // -1 everywhere
    const size_t nb = (size_t) std::max(1, a.NB)*a.H;
    ggml_cuda_pool_alloc<int>    r0(ctx.pool(), nb), cnt(ctx.pool(), nb), kb(ctx.pool(), nb), out(ctx.pool(), nb), rk(ctx.pool(), nb);
    ggml_cuda_pool_alloc<double> m(ctx.pool(), nb), sq(ctx.pool(), nb);
    a.r0 = r0.get(); a.cnt = cnt.get(); a.kb = kb.get(); a.out = out.get(); a.m = m.get(); a.sq = sq.get(); a.rk = rk.get();
    if (a.NB > 0) {
        tca_sel_blocks<<<dim3((unsigned) a.NB, (unsigned) a.H), 128, 0, stream>>>(a);
        if (a.f0 < 0) {
            tca_sel_ranks<<<dim3((unsigned) ((a.NB + TCA_SEL_RNT - 1)/TCA_SEL_RNT), (unsigned) a.H), TCA_SEL_RNT, 0, stream>>>(a);
        }
    }
    tca_sel_rank<<<(unsigned) a.H, 1024, 0, stream>>>(a);
    if (a.NB > 0) {
        const size_t smem = (size_t) a.block*8;  // <= 32 KiB (block <= 4096): no opt-in needed
        tca_sel_topk<<<dim3((unsigned) a.NB, (unsigned) a.H), 128, smem, stream>>>(a);
    }
    CUDA_CHECK(cudaGetLastError());
}

void ggml_cuda_op_tca_compact(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    GGML_ASSERT(ggml_cuda_op_tca_select_supported(ctx.device, dst) && "tca_compact: unsupported on CUDA");
    const ggml_tensor * a = dst->src[0], * sel = dst->src[1];
    const int n_slots = (int) a->ne[1];
    const size_t rb = a->nb[1];
    if (n_slots == 0) return;
    cudaStream_t stream = ctx.stream();
    ggml_cuda_pool_alloc<char> tmp(ctx.pool(), (size_t) n_slots*rb);
    const int nsm = ggml_cuda_info().devices[ctx.device].nsm;
    char * base = (char *) a->data;
    const bool w16 = rb % 16 == 0 && (uintptr_t) base % 16 == 0;
    const int words = (int) (w16 ? rb/16 : rb/4);
    const int64_t n = (int64_t) n_slots*words;
    const dim3 grid((unsigned) std::max<int64_t>(1, std::min<int64_t>((n + 255)/256, (int64_t) nsm*8)));
    if (w16) {
        tca_compact_copy<uint4, true ><<<grid, 256, 0, stream>>>(base, tmp.get(), (const int *) sel->data, n_slots, words);
        tca_compact_copy<uint4, false><<<grid, 256, 0, stream>>>(base, tmp.get(), (const int *) sel->data, n_slots, words);
    } else {
        tca_compact_copy<int, true ><<<grid, 256, 0, stream>>>(base, tmp.get(), (const int *) sel->data, n_slots, words);
        tca_compact_copy<int, false><<<grid, 256, 0, stream>>>(base, tmp.get(), (const int *) sel->data, n_slots, words);
    }
    CUDA_CHECK(cudaGetLastError());
}
