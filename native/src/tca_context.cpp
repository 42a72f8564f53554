// tca_ggml — a TCA context's statistics (project C API; the context is created by
// tca_context_create, native/src/tca_config.cpp).
#include "tca_ggml.h"
#include "tca_guard.h"

#include "llama.h"
#include "llama-context.h"
#include "llama-model.h"
#include "llama-tca-seqs.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdio>
#include <cstring>
#include <string>

// The compaction that follows a ubatch runs lazily (before the next ubatch); statistics
// flush it first so that they describe what the memory holds after the last step.
// seq_id < 0: every sequence's memory (one unless n_seq_max > 1); else that sequence's.
static std::vector<llama_tca_memory *> tca_mems(const llama_context * ctx, int32_t seq_id = -1) {
    if (!ctx) return {};
    std::vector<llama_tca_memory *> ms = llama_tca_memories(llama_get_memory(ctx));
    if (seq_id >= 0) ms = (size_t) seq_id < ms.size() ? std::vector<llama_tca_memory *>{ ms[(size_t) seq_id] }
                                                        : std::vector<llama_tca_memory *>{};
    for (auto * m : ms) m->compact_pending();
    return ms;
}

// the statistics of the memories summed (several sequences: totals; frontier and n_obs_last: the largest)
static int tca_get_stats_impl(const llama_context * ctx, int32_t seq_id, tca_stats * out) {
    if (!out) return -1;
    memset(out, 0, sizeof(*out));
    const auto ms = tca_mems(ctx, seq_id);
    if (ms.empty()) return 0;
    out->active = 1;
    for (const llama_tca_memory * m : ms) {
        out->n_layers = (uint32_t) m->get_layers().size();
        out->n_seen += m->get_n_seen();
        out->frontier = std::max(out->frontier, m->get_frontier());
        for (const auto & kv : m->memory_breakdown()) {
            out->bytes_alloc += kv.second;
            if (!ggml_backend_buft_is_host(kv.first)) out->bytes_device += kv.second;
        }
        out->bytes_dense += m->get_bytes_dense();
        out->n_compactions += m->get_n_compactions();
        out->t_compact_ms += m->get_t_compact_us() / 1000.0;
        uint64_t n_head_kv = 0;
        for (const auto & L : m->get_layers()) {
            n_head_kv += L.n_head_kv;
            uint64_t kept_l = 0;
            for (const auto & h : L.heads) { kept_l += h.len; out->rows_cap += h.cap; }
            out->rows_kept += kept_l;
            out->bytes_resident += kept_l * (ggml_row_size(L.k->type, L.k->ne[0]) + ggml_row_size(L.v->type, L.v->ne[0]) +
                                             ggml_row_size(L.kpos->type, L.kpos->ne[0]));
        }
        const bool hold = m->get_config().hold;
        out->retention = hold ? TCA_RETENTION_HOLD : TCA_RETENTION_STREAM;
        out->bytes_hold += m->get_bytes_hold();
        out->rows_held += hold ? (uint64_t) m->get_n_seen() * n_head_kv : 0;
        out->n_final += m->get_n_final();
        out->n_refresh += m->get_n_refresh();
        out->n_final_lazy += m->get_n_final_lazy();
        out->n_obs_last = std::max(out->n_obs_last, m->get_n_obs_last());
    }
    return 1;
}

static int64_t tca_get_head_stats_impl(const llama_context * ctx, int32_t * layer, uint32_t * kv_head, uint32_t * len,
                                      uint32_t * cap, float * coverage, int64_t n_max) {
    int64_t i = 0;
    for (const llama_tca_memory * m : tca_mems(ctx)) {  // several sequences: one after the other
        for (const auto & L : m->get_layers()) {
            for (uint32_t g = 0; g < L.heads.size(); ++g, ++i) {
                if (i >= n_max) continue;
                const auto & h = L.heads[g];
                if (layer) layer[i] = L.il;
                if (kv_head) kv_head[i] = g;
                if (len) len[i] = h.len;
                if (cap) cap[i] = h.cap;
                if (coverage) coverage[i] = h.coverage;
            }
        }
    }
    return i;
}

static int64_t tca_get_head_positions_impl(const llama_context * ctx, int32_t il, uint32_t kv_head, int32_t * pos, int64_t n_max) {
    const auto ms = tca_mems(ctx, 0);  // several sequences: sequence 0's
    if (ms.empty()) return -1;
    return ms[0]->head_positions(il, kv_head, pos, n_max);
}

// ---- the entry points: no exception crosses into C (tca_guard.h) ----
extern "C" int tca_get_stats(const llama_context * ctx, tca_stats * out) {
    return tca_guard(__func__, -1, nullptr, 0, [&] { return tca_get_stats_impl(ctx, -1, out); });
}

extern "C" int tca_get_seq_stats(const llama_context * ctx, int32_t seq_id, tca_stats * out) {
    if (seq_id < 0) return -1;
    return tca_guard(__func__, -1, nullptr, 0, [&] { return tca_get_stats_impl(ctx, seq_id, out); });
}

extern "C" int64_t tca_get_head_stats(const llama_context * ctx, int32_t * layer, uint32_t * kv_head, uint32_t * len,
                                      uint32_t * cap, float * coverage, int64_t n_max) {
    return tca_guard(__func__, (int64_t) -1, nullptr, 0, [&] {
        return tca_get_head_stats_impl(ctx, layer, kv_head, len, cap, coverage, n_max);
    });
}

extern "C" int64_t tca_get_head_positions(const llama_context * ctx, int32_t il, uint32_t kv_head, int32_t * pos, int64_t n_max) {
    return tca_guard(__func__, (int64_t) -2, nullptr, 0, [&] { return tca_get_head_positions_impl(ctx, il, kv_head, pos, n_max); });
}
