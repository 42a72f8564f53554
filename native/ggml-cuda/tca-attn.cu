// tca_ggml — CUDA kernels of GGML_OP_TCA_ATTN: the dispatch (which kernel, CTA tiles, splits) and
// the entry points declared in tca-attn.cuh. The kernels, as upstream splits flash attention:
//  - tca-attn-common.cuh: arguments, the CTA's work, K/V tile and query loads (and the semantics);
//  - tca-attn-ffma.cuh:   tca_attn_ffma, f32 FMA everywhere (K/V dequantised to f32 in shared
//    memory): f32 K/V (exact f32, like the CPU) and few queries per KV head (decode) with q8_0 K/V;
//  - tca-attn-vec.cuh:    tca_attn_vec, few queries per KV head (decode) with f16 K/V: rows streamed
//    from global memory into registers by each warp independently; tca_attn_combine, the merge of
//    the splits of a head's rows (any kernel);
//  - tca-attn-mma.cuh:    tensor cores (mma.sync m16n8k16, Ampere+) for f16 / q8_0 K/V with many
//    queries (prefill): tca_attn_mma, and tca_attn_mma2 for f16 K/V with D <= 128, double-buffered
//    with cp.async (the default for f16 prefill with D <= 128; TCA_CUDA_ATTN=mma1 forces the
//    single-buffered one).
// Architectures: the tensor-core kernels need sm_80 (mma.sync m16n8k16 f16 and cp.async are sm_80+,
// ldmatrix sm_75+); compiled for an older target their bodies are NO_DEVICE_CODE, and the dispatcher
// never picks them there: ampere_mma_available(cc) (upstream's check of the device's compute capability
// against the highest architecture compiled in) gates them. Without them (sm_75 and older, or a build
// whose highest arch <= the device's is older than sm_80) f16 decode runs the vector kernel and everything
// else the FFMA kernel, its query tile shrunk to the device's shared memory (docs/design.md, "CUDA kernels
// by GPU architecture").
// TCA_CUDA_ATTN=ffma|mma|mma1|mma2|mma2t1|mma2t2|vec|nomma (environment, read per call: the op tests
// force each kernel case by case) forces one kernel (tests, benchmarks); nomma picks as on a GPU
// without the tensor-core path (vector kernel for f16 decode, FFMA otherwise). The other TCA ops
// (TCA_SCORE, TCA_SELECT, TCA_COMPACT): tca-select.cu.
#include "tca-attn.cuh"
#include "tca-attn-common.cuh"
#include "tca-attn-ffma.cuh"
#include "tca-attn-mma.cuh"
#include "tca-attn-vec.cuh"
#include "tca-op-params.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

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

// shared memory of the FFMA kernel with a query tile of NQ (1, 4, 8, 32; 32 only for D <= 128)
static size_t tca_ffma_smem(const int D, const int NQ) {
    switch (D) {
        case 64:  return NQ <= 1 ? tca_ffma_cfg<64, 1>::SMEM  : NQ <= 4 ? tca_ffma_cfg<64, 4>::SMEM  : NQ <= 8 ? tca_ffma_cfg<64, 8>::SMEM  : tca_ffma_cfg<64, 32>::SMEM;
        case 128: return NQ <= 1 ? tca_ffma_cfg<128, 1>::SMEM : NQ <= 4 ? tca_ffma_cfg<128, 4>::SMEM : NQ <= 8 ? tca_ffma_cfg<128, 8>::SMEM : tca_ffma_cfg<128, 32>::SMEM;
        case 256: return NQ <= 1 ? tca_ffma_cfg<256, 1>::SMEM : NQ <= 4 ? tca_ffma_cfg<256, 4>::SMEM : tca_ffma_cfg<256, 8>::SMEM;
        default:  return SIZE_MAX;
    }
}

// TCA_CUDA_ATTN (read per call: the op tests force each kernel case by case in one process), null when unset
static const char * tca_force_env() {
    const char * e = getenv("TCA_CUDA_ATTN");
    return e && *e ? e : nullptr;
}

// whether the tensor-core kernels can run for this K/V type on device compute capability cc: sm_80+
// (mma.sync m16n8k16 f16 and cp.async) and compiled for an architecture <= cc that has them; never with
// TCA_CUDA_ATTN=nomma (as on a GPU without them: supports_op and the dispatch alike)
static bool tca_can_mma(const int cc, const ggml_type type) {
    const char * force = tca_force_env();
    return (type == GGML_TYPE_F16 || type == GGML_TYPE_Q8_0) && ampere_mma_available(cc) &&
           !(force && strcmp(force, "nomma") == 0);
}

// largest shared memory any kernel the dispatcher may pick for (D, type) on this device asks for; the
// FFMA kernel counts with its smallest query tile (tca_ffma_nq shrinks the tile to what fits). Over
// the device's per-block limit (smpbo) the op is refused (supports_op: a TCAConfigError at context
// creation): D = 256 on 64 KiB-per-block GPUs (sm_75), whose FFMA tile alone needs 67 KiB.
static size_t tca_max_smem(const int D, const ggml_type type, const int cc) {
    size_t s = tca_ffma_smem(D, 1);
    if (type == GGML_TYPE_F16) {
        s = std::max(s, D == 64 ? tca_vec_cfg<64, 8>::SMEM : D == 128 ? tca_vec_cfg<128, 8>::SMEM : tca_vec_cfg<256, 8>::SMEM);
    }
    if (tca_can_mma(cc, type)) {
        switch (D) {
            case 64:  s = std::max({s, tca_mma_cfg<64>::SMEM,  tca_mma2_cfg<64, 64>::SMEM,  tca_mma2_cfg<64, 32, 2>::SMEM});  break;
            case 128: s = std::max({s, tca_mma_cfg<128>::SMEM, tca_mma2_cfg<128, 64>::SMEM, tca_mma2_cfg<128, 32, 2>::SMEM}); break;
            case 256: s = std::max(s, tca_mma_cfg<256>::SMEM); break;
            default:  return SIZE_MAX;
        }
    }
    return s;
}

// vector-kernel query tile: the smallest of 1, 2, 4, 8 holding the KV head's queries (8 at most)
int tca_vec_nq(const int64_t nq_head) {
    return nq_head <= 1 ? 1 : nq_head <= 2 ? 2 : nq_head <= 4 ? 4 : 8;
}

// the device's shared memory per block (opt-in limit); TCA_CUDA_SMPBO=<bytes> lowers it (read per call:
// with TCA_CUDA_ATTN=nomma and 65536 the dispatcher picks as on an sm_75 GPU, for tests on newer ones)
static size_t tca_smpbo(const int device) {
    size_t smpbo = ggml_cuda_info().devices[device].smpbo;
    const char * e = getenv("TCA_CUDA_SMPBO");
    if (e && *e) {
        smpbo = std::min(smpbo, (size_t) std::max(0LL, atoll(e)));
    }
    return smpbo;
}

// FFMA query tile: the smallest of 1, 4, 8, 32 holding the KV head's queries (8 at most for D=256),
// shrunk until its shared memory fits the device (smpbo: sm_75's 64 KiB takes 8 for D = 128)
static int tca_ffma_nq(const int64_t nq_head, const int D, const size_t smpbo) {
    const int cap = D >= 256 ? 8 : 32;
    int nq = nq_head <= 1 ? 1 : nq_head <= 4 ? 4 : nq_head <= 8 ? 8 : 32;
    nq = std::min(nq, cap);
    while (nq > 1 && tca_ffma_smem(D, nq) > smpbo) {
        nq = nq == 32 ? 8 : nq == 8 ? 4 : 1;
    }
    return nq;
}

} // namespace

bool ggml_cuda_op_tca_attn_supported(int device, const ggml_tensor * op) {
    for (int i = 0; i < 6; ++i) {
        if (!op->src[i]) {
            return false;
        }
    }
    const tca_attn_op a = tca_attn_op_get(op);
    const auto & [q, k, v, kpos, meta, qpos, D, T, n_head, n_slots, n_head_kv, scale] = a;
    GGML_UNUSED(scale);
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
    if (D != 64 && D != 128 && D != 256) {
        return false;
    }
    if (!tca_attn_op_shapes_ok(a, op)) {
        return false;
    }
    if (q->ne[3] != 1 || k->ne[2] != 1 || k->ne[3] != 1 || v->ne[2] != 1 || v->ne[3] != 1 || op->ne[3] != 1) {
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
    return tca_smpbo(device) >= tca_max_smem((int) D, k->type, ggml_cuda_info().devices[device].cc);
}

void ggml_cuda_op_tca_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const auto [q, k, v, kpos, meta, qpos, D, T, n_head, n_slots, n_head_kv, scale] = tca_attn_op_get(dst);

    GGML_ASSERT(ggml_cuda_op_tca_attn_supported(ctx.device, dst) && "tca_attn: unsupported on CUDA");
    const size_t align = k->type == GGML_TYPE_Q8_0 ? 4 : 16;
    GGML_ASSERT((uintptr_t) k->data % align == 0 && (uintptr_t) v->data % align == 0);
    GGML_ASSERT((uintptr_t) dst->data % 16 == 0);

    const int64_t G = n_head/n_head_kv;
    const int     cc    = ggml_cuda_info().devices[ctx.device].cc;
    const int     nsm   = ggml_cuda_info().devices[ctx.device].nsm;
    const size_t  smpbo = tca_smpbo(ctx.device);

    // TCA_CUDA_ATTN=ffma|mma|mma1|mma2|mma2t1|mma2t2|vec|nomma forces a kernel (A/B, tests); read per
    // call, since the op tests force each kernel case by case in one process (a getenv per op call)
    const char * force = tca_force_env();
    if (force && strcmp(force, "ffma") != 0 && strcmp(force, "vec") != 0 && strcmp(force, "nomma") != 0 &&
        strcmp(force, "mma") != 0 && strcmp(force, "mma1") != 0 && strcmp(force, "mma2") != 0 &&
        strcmp(force, "mma2t1") != 0 && strcmp(force, "mma2t2") != 0) {
        GGML_ABORT("TCA_CUDA_ATTN=%s: expected ffma, vec, nomma, mma, mma1, mma2, mma2t1 or mma2t2", force);
    }
    // the tensor-core kernels only where the device and the build have them (tca_can_mma; nomma
    // takes them away, as on a GPU without them)
    const bool   can_mma = tca_can_mma(cc, k->type);
    // TCA_CUDA_VEC=0: FFMA instead of the vector kernel for f16 decode (A/B and fallback)
    static const bool vec_on = [] { const char * e = getenv("TCA_CUDA_VEC"); return !e || atoi(e) != 0; }();
    const bool   can_vec = k->type == GGML_TYPE_F16;
    bool mma = can_mma && G*T >= 16;
    bool vec = !mma && can_vec && vec_on;
    if (force && strcmp(force, "ffma") == 0) {
        mma = vec = false;
    } else if (force && strncmp(force, "mma", 3) == 0) {  // mma, mma1, mma2, mma2t1, mma2t2
        mma = can_mma;  // FFMA where the device has no tensor-core path
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
    const int NQ = mma ? tca_mma_cfg<64>::NQ*(mk == TCA_MMA2_T2 ? 2 : 1) : vec ? tca_vec_nq(G*T) : tca_ffma_nq(G*T, (int) D, smpbo);
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
    // vector kernel: 2 CTAs per SM (the fastest of 1/2/4: docs/benchmarks.md, "Kernel notes moved
    // from code comments")
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
