// tca_ggml — CPU kernels of GGML_OP_TCA_SCORE, GGML_OP_TCA_SELECT and GGML_OP_TCA_COMPACT: the
// retention cache's importance scores, selection and compaction as graph ops (docs/design.md §5,
// "Device-resident retention"; CUDA kernels: native/ggml-cuda/tca-select.cu).
//
// The ops themselves (enum values, constructors with their shape contracts, CPU dispatch, n_tasks
// and work-size hooks) are added to upstream ggml by native/patches/0001-ggml-tca-attn-op.patch;
// this file is compiled into upstream's ggml-cpu target by the top-level CMakeLists.txt.
#include "ops.h"

#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "tca-common.h"
#include "tca-op-params.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// ---------------------------------------------------------------------------- GGML_OP_TCA_SCORE
//
// s[r] = 1/G * sum over g's query heads h of softmax_r(scale * q_h . k_r), rows r of KV head g.
// Dots in f32 (ggml_vec_dot_f32: SIMD, as the CUDA kernel's f32 FMAs), exponentials in f32
// (ggml_vec_soft_max_f32), the softmax sums and the pooling in double; the float64 reference is
// tests/test_op_tca_score.py's NumPy. Until session 11 this op was scalar double throughout; at 8K
// the hold retention's final selection (32 observation queries x every held row) then cost 2.4 s
// on 2 threads (docs/benchmarks.md "session 11").
// Work: the query heads go in chunks of at most TCA_SCORE_CHUNK_BYTES of f32 logits (so a final
// selection can pass every observation query as one node: n_head x n_obs "heads", the K row
// converted once for all of them); per chunk, pass 1 splits the rows of all heads over the threads
// (logits into wdata, f32), pass 2 splits the chunk's query heads (max, exp in place, 1/sum),
// pass 3 splits the rows again and adds the chunk's pooled probabilities.

static const int64_t TCA_SCORE_CHUNK_BYTES = 64ll << 20;

static int64_t tca_score_chunk_heads(int64_t n_head, int64_t n_slots) {
    const int64_t per = std::max<int64_t>(1, TCA_SCORE_CHUNK_BYTES / (int64_t) sizeof(float) / std::max<int64_t>(1, n_slots));
    return std::min(n_head, per);
}

// op_params[2] == 1 (set by the graph's decode recall, llama-tca-graph.cpp): with f16 K, each dot is
// ggml_vec_dot_f16 of the K row as stored and the query rounded to f16 (as ggml's flash attention
// on the CPU), not an f32 dot of the converted row: for a ranking, ~3x faster; the final selection
// (op_params[2] == 0) keeps the f32 dots its float64 reference checks
static bool tca_score_f16_dots(const ggml_tensor * node) {
    return ggml_get_op_params_i32(node, 2) == 1 && node->src[1]->type == GGML_TYPE_F16;
}

extern "C" size_t ggml_compute_forward_tca_score_work_size(const struct ggml_tensor * node, int n_tasks) {
    const int64_t n_head  = node->src[0]->ne[1];
    const int64_t n_slots = node->src[1]->ne[1];
    const int64_t d       = node->src[0]->ne[0];
    const int64_t per_thread = tca_score_f16_dots(node) ? (n_head*d + 1)/2 : d;   // floats: krow, or q in f16
    return sizeof(float)*(size_t) (tca_score_chunk_heads(n_head, n_slots)*n_slots) + sizeof(double)*(size_t) n_head
         + sizeof(float)*(size_t) (per_thread + CACHE_LINE_SIZE_F32)*(size_t) n_tasks;
}

extern "C" void ggml_compute_forward_tca_score(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * meta = dst->src[2];

    const int64_t d         = q->ne[0];
    const int64_t n_head    = q->ne[1];
    const int64_t n_slots   = k->ne[1];
    const int64_t n_head_kv = ggml_get_op_params_i32(dst, 0);
    const float   scale     = ggml_get_op_params_f32(dst, 1);
    const int64_t G         = n_head / n_head_kv;

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && q->type == GGML_TYPE_F32 && ggml_nelements(dst) == n_slots);
    GGML_ASSERT(ggml_is_contiguous(q) && ggml_is_contiguous(k) && ggml_is_contiguous(meta));
    GGML_ASSERT(n_head_kv > 0 && n_head % n_head_kv == 0 && k->ne[0] == d);

    const int32_t * hm = (const int32_t *) meta->data;
    GGML_ASSERT(tca_head_ranges_ok(hm, n_head_kv, n_slots) && "tca_score: head range outside the K slots");

    const int ith = params->ith;
    const int nth = params->nth;

    const int64_t HC = tca_score_chunk_heads(n_head, n_slots);
    const bool f16_dots = tca_score_f16_dots(dst);
    // op_params[2] == 2 (the graph's recall by blocks): q = [q | q] (2*dh), K rows f32 [min | max] of a
    // block's dh dimensions; the logit of a block is scale * sum_i max(q_i min_i, q_i max_i)
    const bool bound = ggml_get_op_params_i32(dst, 2) == 2;
    const int64_t dh = d/2;
    GGML_ASSERT(!bound || (k->type == GGML_TYPE_F32 && d % 2 == 0));
    const int64_t per_thread = f16_dots ? (n_head*d + 1)/2 : d;
    float  * logit = (float *) params->wdata;                      // [HC][n_slots]: head h0 + i at i*n_slots
    double * inv   = (double *) (logit + HC*n_slots);              // [n_head]: 1 / softmax sum
    float  * krow  = (float *) (inv + n_head) + ith*(per_thread + CACHE_LINE_SIZE_F32);
    ggml_fp16_t * q16 = (ggml_fp16_t *) krow;                      // f16_dots: this thread's queries in f16
    float  * out   = (float *) dst->data;
    if (f16_dots) ggml_cpu_fp32_to_fp16((const float *) q->data, q16, n_head*d);

    const int64_t per = (n_slots + nth - 1)/nth;
    const int64_t r_lo = std::min(n_slots, ith*per), r_hi = std::min(n_slots, r_lo + per);
    for (int64_t r = r_lo; r < r_hi; ++r) out[r] = 0.0f;  // 0 outside the heads' ranges

    for (int64_t h0 = 0; h0 < n_head; h0 += HC) {
        const int64_t h1 = std::min(n_head, h0 + HC);
        // pass 1: logits of every (query head of the chunk, row of its KV head g)
        for (int64_t g = h0 / G; g <= (h1 - 1) / G; ++g) {
            const int64_t off = hm[2*g], len = hm[2*g + 1];
            const int64_t a = std::max(r_lo, off), b = std::min(r_hi, off + len);
            const int64_t ha = std::max(h0, g*G), hb = std::min(h1, (g + 1)*G);
            for (int64_t r = a; r < b; ++r) {
                if (bound) {   // recall by blocks: Quest's bound, K row = [min | max] per dimension
                    const float * mn = (const float *) ((const char *) k->data + r*k->nb[1]);
                    const float * mx = mn + dh;
                    for (int64_t h = ha; h < hb; ++h) {
                        const float * qh = (const float *) q->data + h*d;
                        float dot = 0.0f;
                        for (int64_t i = 0; i < dh; ++i) dot += std::max(qh[i]*mn[i], qh[i]*mx[i]);
                        logit[(h - h0)*n_slots + r] = dot*scale;
                    }
                    continue;
                }
                if (f16_dots) {
                    ggml_fp16_t * kr = (ggml_fp16_t *) ((const char *) k->data + r*k->nb[1]);
                    for (int64_t h = ha; h < hb; ++h) {
                        float dot;
                        ggml_vec_dot_f16((int) d, &dot, 0, kr, 0, q16 + h*d, 0, 1);
                        logit[(h - h0)*n_slots + r] = dot*scale;
                    }
                    continue;
                }
                tca_to_f32(k->type, (const char *) k->data + r*k->nb[1], krow, d);
                for (int64_t h = ha; h < hb; ++h) {
                    float dot;
                    ggml_vec_dot_f32((int) d, &dot, 0, (const float *) q->data + h*d, 0, krow, 0, 1);
                    logit[(h - h0)*n_slots + r] = dot*scale;
                }
            }
        }
        ggml_barrier(params->threadpool);

        // pass 2: per query head, exp(logit - max) in place and 1 / its sum
        for (int64_t h = h0 + ith; h < h1; h += nth) {
            const int64_t g = h / G, off = hm[2*g], len = hm[2*g + 1];
            float * lg = logit + (h - h0)*n_slots + off;
            float m = -INFINITY;
            for (int64_t r = 0; r < len; ++r) m = std::max(m, lg[r]);
            inv[h] = len > 0 ? 1.0 / (double) ggml_vec_soft_max_f32((int) len, lg, lg, m) : 1.0;
        }
        ggml_barrier(params->threadpool);

        // pass 3: the chunk's share of the pooled probabilities
        for (int64_t g = h0 / G; g <= (h1 - 1) / G; ++g) {
            const int64_t off = hm[2*g], len = hm[2*g + 1];
            const int64_t a = std::max(r_lo, off), b = std::min(r_hi, off + len);
            const int64_t ha = std::max(h0, g*G), hb = std::min(h1, (g + 1)*G);
            for (int64_t r = a; r < b; ++r) {
                double s = 0.0;
                for (int64_t h = ha; h < hb; ++h) s += (double) logit[(h - h0)*n_slots + r] * inv[h];
                out[r] += (float) (s / (double) G);
            }
        }
        if (h1 < n_head) ggml_barrier(params->threadpool);  // the next chunk reuses the logits
    }
}

// ------------------------------------------------------------------------ GGML_OP_TCA_SELECT
// Which rows each KV head keeps (ggml.h; docs/design.md §3 steps 2-4), the reference for the CUDA
// kernels and the CPU's own selection: block sums and block scores in double in row order, ranks
// with ties to the lower block, the cumulative budget in double in descending-k order, per-block top-k
// on max-pooled scores with ties to the lower row (= reference.select_keep on the same f32 scores).
namespace {

// one KV head: rows [0, len) of s/kpos (region-relative), output sel (region-relative slots,
// absolute source rows = off + r) and the 4-entry tail
void tca_select_one(const tca_select_params & P, const float * s, const float * kpos, int64_t off, int64_t len,
                    const float * bud, int32_t * sel, int32_t * tail) {
    const int64_t b = P.block;
    const int n_k = P.n_k;
    const float * p_desc = bud;
    const float * k_desc = bud + n_k;
    const int32_t kt = (int32_t) bud[2*n_k];
    const bool decode = P.f0 >= 0;
    const int64_t lo = decode ? std::max<int64_t>(P.f0, P.n_sink) : P.n_sink;

    // candidate rows [c0, c1): lo <= pos < F (rows ascending in position)
    int64_t c0 = 0;
    while (c0 < len && kpos[c0] < (float) lo) ++c0;
    int64_t c1 = c0;
    while (c1 < len && kpos[c1] < (float) P.F) ++c1;

    struct blk { int64_t r0, r1; double m, sq, h; int64_t k; };
    std::vector<blk> blocks;
    for (int64_t r = c0; r < c1; ++r) {
        const int64_t id = (int64_t) kpos[r] / b;
        if (blocks.empty() || (int64_t) kpos[blocks.back().r0] / b != id) {
            blocks.push_back({r, r + 1, 0.0, 0.0, 0.0, 0});
        } else {
            blocks.back().r1 = r + 1;
        }
        blocks.back().m  += (double) s[r];
        blocks.back().sq += (double) s[r] * (double) s[r];
    }
    if (decode) {
        for (auto & bl : blocks) bl.k = kt;
    } else if (!blocks.empty()) {
        double M = 0.0;
        for (auto & bl : blocks) M = std::max(M, bl.m);
        for (auto & bl : blocks) {
            const double c = bl.m > 0 ? 1.0 - bl.sq / (bl.m * bl.m) : 0.0;
            bl.h = (1.0 - P.alpha) * (M > 0 ? bl.m / M : 0.0) + P.alpha * c;
        }
        std::vector<int64_t> order(blocks.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = (int64_t) i;
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return blocks[a].h > blocks[c].h; });
        std::vector<double> cum(n_k);
        double acc = 0.0;
        for (int i = 0; i < n_k; ++i) { acc += (double) p_desc[i]; cum[i] = acc; }
        const double N = (double) blocks.size();
        for (size_t r = 0; r < order.size(); ++r) {
            const double u = ((double) r + 0.5) / N;
            int64_t kk = (int64_t) k_desc[n_k - 1];
            for (int i = 0; i < n_k; ++i) if (u < cum[i]) { kk = (int64_t) k_desc[i]; break; }
            blocks[order[r]].k = kk;
        }
    }
    // pooled scores over the candidates of the same block within `radius` positions
    std::vector<double> sp(std::max<int64_t>(c1 - c0, 0));
    const int R = P.radius;
    for (int64_t r = c0; r < c1; ++r) {
        double m = s[r];
        const int64_t pr = (int64_t) kpos[r];
        for (int o = 1; o <= R; ++o) {
            if (r - o >= c0) {
                const int64_t pj = (int64_t) kpos[r - o];
                if (pr - pj <= R && pj / b == pr / b) m = std::max(m, (double) s[r - o]);
            }
            if (r + o < c1) {
                const int64_t pj = (int64_t) kpos[r + o];
                if (pj - pr <= R && pj / b == pr / b) m = std::max(m, (double) s[r + o]);
            }
        }
        sp[r - c0] = m;
    }
    std::vector<uint8_t> keep(len, 1);
    std::vector<int64_t> idx;
    double evicted = 0.0;
    for (auto & bl : blocks) {
        const int64_t cnt = bl.r1 - bl.r0;
        if (bl.k >= cnt) continue;
        idx.resize(cnt);
        for (int64_t i = 0; i < cnt; ++i) idx[i] = bl.r0 + i;
        std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t c) { return sp[a - c0] > sp[c - c0]; });
        for (int64_t i = bl.k; i < cnt; ++i) { keep[idx[i]] = 0; evicted += (double) s[idx[i]]; }
    }
    int64_t w = 0;
    for (int64_t r = 0; r < len; ++r) {
        if (keep[r]) sel[w++] = (int32_t) (off + r);
    }
    for (int64_t r = w; r < len; ++r) sel[r] = -1;
    const float ev = (float) evicted;
    tail[0] = (int32_t) off;
    tail[1] = (int32_t) w;
    tail[2] = (int32_t) (len - w);
    memcpy(&tail[3], &ev, sizeof(ev));
}

} // namespace

extern "C" void ggml_compute_forward_tca_select(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_tensor * s    = dst->src[0];
    const ggml_tensor * kpos = dst->src[1];
    const ggml_tensor * meta = dst->src[2];
    const ggml_tensor * bud  = dst->src[3];

    const tca_select_params P = tca_select_params_get(dst);

    const int64_t n_slots = ggml_nelements(s);
    const int32_t * hm = (const int32_t *) meta->data;
    GGML_ASSERT(tca_head_ranges_ok(hm, P.H, n_slots) && "tca_select: head range outside the slots");
    int32_t * out = (int32_t *) dst->data;
    const int ith = params->ith, nth = params->nth;
    if (ith == 0) {
        for (int64_t i = 0; i < n_slots; ++i) out[i] = -1;
    }
    ggml_barrier(params->threadpool);
    for (int64_t g = ith; g < P.H; g += nth) {
        const int64_t off = hm[2*g], len = hm[2*g + 1];
        tca_select_one(P, (const float *) s->data + off, (const float *) kpos->data + off, off, len,
                       (const float *) bud->data + g*bud->ne[0], out + off, out + n_slots + 4*g);
    }
}

// ------------------------------------------------------------------------ GGML_OP_TCA_COMPACT
// Rows move towards the front of their head's range, in ascending slot order: slot i's source is
// at or after i and after every earlier slot's destination, so no source is overwritten before it
// is read. One KV head per thread.
extern "C" void ggml_compute_forward_tca_compact(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_tensor * a   = dst->src[0];
    const ggml_tensor * sel = dst->src[1];
    const int64_t n_head_kv = ggml_get_op_params_i32(dst, 0);
    const int64_t n_slots   = a->ne[1];
    const size_t  rb        = a->nb[1];
    const int32_t * sv = (const int32_t *) sel->data;
    char * base = (char *) a->data;
    for (int64_t g = params->ith; g < n_head_kv; g += params->nth) {
        const int32_t * tail = sv + n_slots + 4*g;
        const int64_t off = tail[0], n = tail[1];
        GGML_ASSERT(off >= 0 && n >= 0 && off + n <= n_slots && "tca_compact: head range outside the slots");
        for (int64_t i = 0; i < n; ++i) {
            const int64_t src = sv[off + i], d = off + i;
            if (src == d) continue;
            GGML_ASSERT(src > d && src < n_slots && "tca_compact: rows only move towards the front");
            memcpy(base + d*rb, base + src*rb, rb);
        }
    }
}
