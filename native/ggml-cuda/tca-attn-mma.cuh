// tca_ggml — GGML_OP_TCA_ATTN's tensor-core prefill kernels and their launches: mma.sync m16n8k16
// (f16 x f16 -> f32, Ampere+) for f16 / q8_0 K/V with many queries per KV head. q, K (q8_0
// dequantised) and the probabilities P are rounded to f16 for the products (as upstream's flash
// attention does); scores, softmax and accumulators are f32.
//  - tca_attn_mma:  4 warps x 16 queries, K/V chunks loaded through registers (q8_0 dequantised):
//    q8_0 K/V, f16 K/V with D = 256, and TCA_CUDA_ATTN=mma1;
//  - tca_attn_mma2: f16 K/V with D <= 128, double-buffered with cp.async, one or two 16-query tiles
//    a warp (the default for f16 prefill with D <= 128).
// Both run the same chunk math (tca_mma_chunk) and epilogue (tca_mma_store). Dispatch: tca-attn.cu.
#pragma once

#include "tca-attn-common.cuh"

namespace {

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
    int qmax;
    if (!tca_cta_qmax<NQ>(a, cta, lane, qmax)) {
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

    // the CTA's latest query position (every warp computes it: no barrier needed)
    int qmax;
    if (!tca_cta_qmax<NQ>(a, cta, lane, qmax)) {
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

// the f16 tensor-core prefill kernel: mma2 (cp.async double-buffered) with 32-row chunks and two
// 16-query tiles a warp by default, the fastest of the variants measured (docs/benchmarks.md,
// "Kernel notes moved from code comments"). Two tiles a warp halve the shared-memory (ldmatrix)
// reads per flop; they take 128 queries a CTA, so a ubatch with fewer than 128 queries a KV head
// keeps one tile (64-row chunks). TCA_CUDA_ATTN=mma1 forces the single-buffered kernel, mma2t1 /
// mma2t2 one or two tiles (tests, A/B).
enum tca_mma_kind { TCA_MMA1, TCA_MMA2_T1, TCA_MMA2_T2 };

template <int D, int C, int MT = 1>
void tca_launch_mma2(const tca_args & a, const dim3 grid, cudaStream_t stream) {
    static_assert(D <= 128, "tca_attn_mma2: D <= 128");
    using cfg = tca_mma2_cfg<D, C, MT>;
    auto kernel = tca_attn_mma2<D, C, MT>;
    CUDA_SET_SHARED_MEMORY_LIMIT(kernel, cfg::SMEM);
    kernel<<<grid, TCA_NT, cfg::SMEM, stream>>>(a);
}

template <int D, int TYPE>
void tca_launch_mma(const tca_args & a, const dim3 grid, cudaStream_t stream) {
    using cfg = tca_mma_cfg<D>;
    auto kernel = tca_attn_mma<D, TYPE>;
    CUDA_SET_SHARED_MEMORY_LIMIT(kernel, cfg::SMEM);
    kernel<<<grid, TCA_NT, cfg::SMEM, stream>>>(a);
}

} // namespace
