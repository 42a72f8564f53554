// tca_ggml — GGML_OP_TCA_ATTN's decode kernel (tca_attn_vec: few queries per KV head with f16 K/V,
// f32 arithmetic, rows streamed from global memory into registers by each warp independently, no
// barrier in the loop), its launch, and the combine of split partials (tca_attn_combine: the rows
// of a head split over several CTAs, for any of the kernels). Dispatch: tca-attn.cu.
#pragma once

#include "tca-attn-common.cuh"

#include <cstdlib>

namespace {

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
// in the FFMA kernel, different summation order. The kernel is latency-bound (its registers leave
// 8 warps an SM), hence every load is requested as early as the data flow allows. Timings of these
// choices: docs/benchmarks.md, "Kernel notes moved from code comments".
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
// memory, so that no thread walks a long chain of dependent loads through all the splits.
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

} // namespace
