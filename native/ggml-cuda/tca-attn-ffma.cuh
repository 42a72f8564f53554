// tca_ggml — GGML_OP_TCA_ATTN's FFMA kernel (tca_attn_ffma) and its launch: f32 FMA everywhere,
// K/V dequantised to f32 in shared memory. Used for f32 K/V (exact f32, like the CPU) and for few
// queries per KV head (decode) with q8_0 K/V. Dispatch: tca-attn.cu.
#pragma once

#include "tca-attn-common.cuh"

namespace {

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

template <int D, int NQ, int TYPE>
void tca_launch_ffma(const tca_args & a, const dim3 grid, cudaStream_t stream) {
    using cfg = tca_ffma_cfg<D, NQ>;
    auto kernel = tca_attn_ffma<D, NQ, TYPE>;
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

} // namespace
