// tca_ggml — a TCA context's statistics (project C API; the context is created by
// tca_context_create, native/src/tca_config.cpp).
#include "tca_ggml.h"
#include "tca_guard.h"

#include "llama.h"
#include "llama-context.h"
#include "llama-model.h"
#include "llama-tca-memory.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

// The compaction that follows a ubatch runs lazily (before the next ubatch); statistics
// flush it first so that they describe what the memory holds after the last step.
static llama_tca_memory * tca_mem(const llama_context * ctx) {
    if (!ctx) return nullptr;
    auto * m = dynamic_cast<llama_tca_memory *>(llama_get_memory(ctx));
    if (m) m->compact_pending();
    return m;
}

static int tca_get_stats_impl(const llama_context * ctx, tca_stats * out) {
    if (!out) return -1;
    memset(out, 0, sizeof(*out));
    const auto * m = tca_mem(ctx);
    if (!m) return 0;
    out->active = 1;
    out->n_layers = (uint32_t) m->get_layers().size();
    out->n_seen = m->get_n_seen();
    out->frontier = m->get_frontier();
    for (const auto & kv : m->memory_breakdown()) {
        out->bytes_alloc += kv.second;
        if (!ggml_backend_buft_is_host(kv.first)) out->bytes_device += kv.second;
    }
    out->bytes_dense = m->get_bytes_dense();
    out->n_compactions = m->get_n_compactions();
    out->t_compact_ms = m->get_t_compact_us() / 1000.0;
    uint64_t kept = 0, cap = 0, n_head_kv = 0;
    for (const auto & L : m->get_layers()) {
        n_head_kv += L.n_head_kv;
        uint64_t kept_l = 0;
        for (const auto & h : L.heads) { kept_l += h.len; cap += h.cap; }
        kept += kept_l;
        out->bytes_resident += kept_l * (ggml_row_size(L.k->type, L.k->ne[0]) + ggml_row_size(L.v->type, L.v->ne[0]) +
                                         ggml_row_size(L.kpos->type, L.kpos->ne[0]));
    }
    out->rows_kept = kept;
    out->rows_cap = cap;
    const bool hold = m->get_config().hold;
    out->retention = hold ? TCA_RETENTION_HOLD : TCA_RETENTION_STREAM;
    out->bytes_hold = m->get_bytes_hold();
    out->rows_held = hold ? (uint64_t) m->get_n_seen() * n_head_kv : 0;
    out->n_final = m->get_n_final();
    out->n_obs_last = m->get_n_obs_last();
    return 1;
}

static int64_t tca_get_head_stats_impl(const llama_context * ctx, int32_t * layer, uint32_t * kv_head, uint32_t * len,
                                      uint32_t * cap, float * coverage, int64_t n_max) {
    const auto * m = tca_mem(ctx);
    if (!m) return 0;
    int64_t i = 0;
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
    return i;
}

static int64_t tca_get_head_positions_impl(const llama_context * ctx, int32_t il, uint32_t kv_head, int32_t * pos, int64_t n_max) {
    const auto * m = tca_mem(ctx);
    if (!m) return -1;
    return m->head_positions(il, kv_head, pos, n_max);
}

// ---- the entry points: no exception crosses into C (tca_guard.h) ----
extern "C" int tca_get_stats(const llama_context * ctx, tca_stats * out) {
    return tca_guard(__func__, -1, nullptr, 0, [&] { return tca_get_stats_impl(ctx, out); });
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
