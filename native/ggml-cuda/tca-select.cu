// tca_ggml — CUDA kernels of GGML_OP_TCA_SCORE, GGML_OP_TCA_SELECT and GGML_OP_TCA_COMPACT: the
// retention cache's importance scores, selection and compaction on the device (docs/design.md §5,
// "Device-resident retention"; CPU kernels: native/ggml-cpu/tca-select.cpp). Entry points:
// tca-select.cuh (included by tca-attn.cuh, the header upstream's dispatch includes).
#include "tca-select.cuh"
#include "tca-attn-common.cuh"  // tca_warp_sum, tca_warp_max
#include "tca-op-params.h"

#include <algorithm>
#include <climits>
#include <cstdint>

namespace {

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
    // with one row a warp, copying q into every CTA would move ~16x more bytes than the rows themselves)
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
// this one ~13.
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
// accumulators a thread, so that loads are in flight (with one accumulator each pass over a head's
// rows is a long chain of dependent loads a thread)
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

bool ggml_cuda_op_tca_score_supported(int device, const ggml_tensor * op) {
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
// The arithmetic is that of the CPU kernel (native/ggml-cpu/tca-select.cpp, tca_select_one): block
// sums and the block score in double, ranks with ties to the lower block, the cumulative budget in
// double in descending-k order, per-block top-k on max-pooled f32 scores with ties to the lower
// row. Only the order of the block sums differs (a tree here), so a block score can differ in its
// last bits and two blocks whose scores tie to ~1e-16 may swap ranks.
namespace {

// op_params (H, block, n_sink, F, f0, alpha, radius) and n_k: tca_select_params (tca-op-params.h, shared
// with the CPU kernel)
struct tca_sel_args : tca_select_params {
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
    int n_slots, j0, NB;
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
// block. O(NB^2) comparisons spread over the GPU (tca_sel_rank has only one CTA a head); every CTA
// recomputes M and the h of each tile (a few thousand doubles).
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
// bases allow it, else 4 bytes. A grid-stride loop (the launch caps the grid at 8 CTAs an SM), not
// a CTA per group of slots: most slots keep their row.
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
    static_cast<tca_select_params &>(a) = tca_select_params_get(dst);
    a.n_slots = (int) ggml_nelements(s);
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
