// tca_ggml — creating a TCA context and reading its statistics (project C API).
#include "tca_ggml.h"

#include "llama.h"
#include "llama-context.h"
#include "llama-model.h"
#include "llama-tca.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

static int fail(char * err, size_t n, const std::string & msg) {
    if (err && n) snprintf(err, n, "%s", msg.c_str());
    return 1;
}

static int validate(const llama_model * model, const tca_params * tp, llama_tca_config & cfg, char * err, size_t n) {
    if (!tp) return fail(err, n, "tca params are NULL");
    if (tp->block == 0 || (tp->block & (tp->block - 1)) || tp->block > 4096)
        return fail(err, n, "tca.block_size: must be a power of two in [1, 4096], got " + std::to_string(tp->block));
    if (tp->window % tp->block)
        return fail(err, n, "tca.window: must be a multiple of the block size (" + std::to_string(tp->block) + "), got " + std::to_string(tp->window));
    if (!(tp->alpha >= 0.0f && tp->alpha <= 1.0f))
        return fail(err, n, "tca.alpha: must be in [0, 1]");
    if (tp->n_sink > 65536) return fail(err, n, "tca.n_sink: too large");
    uint32_t nk_expect = 0;
    for (uint32_t k = 1; k <= tp->block; k <<= 1) ++nk_expect;
    if (!tp->k_values || tp->n_k != nk_expect) return fail(err, n, "tca.k_values: must be 1, 2, 4, ..., block_size");
    for (uint32_t i = 0; i < tp->n_k; ++i)
        if (tp->k_values[i] != (1u << i)) return fail(err, n, "tca.k_values: must be 1, 2, 4, ..., block_size");
    const int32_t n_layer = llama_model_n_layer(model);
    if ((int32_t) tp->n_layer != n_layer)
        return fail(err, n, "tca.n_layer: " + std::to_string(tp->n_layer) + " but the model has " + std::to_string(n_layer) + " layers");
    if (!tp->n_head_kv) return fail(err, n, "tca.n_head_kv: missing");
    size_t H = 0;
    for (uint32_t il = 0; il < tp->n_layer; ++il) {
        const uint32_t want = model->hparams.n_head_kv(il);
        if (tp->n_head_kv[il] != want)
            return fail(err, n, "tca.n_head_kv[" + std::to_string(il) + "]: " + std::to_string(tp->n_head_kv[il]) +
                                " but the model has " + std::to_string(want));
        H += tp->n_head_kv[il];
    }
    if (!tp->p) return fail(err, n, "tca.budget.p: missing");
    for (size_t h = 0; h < H; ++h) {
        double sum = 0.0;
        for (uint32_t i = 0; i < tp->n_k; ++i) {
            const float v = tp->p[h * tp->n_k + i];
            if (!std::isfinite(v) || v < 0.0f) return fail(err, n, "tca.budget.p: head " + std::to_string(h) + " has a negative or non-finite value");
            sum += v;
        }
        if (std::fabs(sum - 1.0) > 1e-3) return fail(err, n, "tca.budget.p: head " + std::to_string(h) + " does not sum to 1");
    }
    cfg.block = tp->block;
    cfg.window = tp->window;
    cfg.n_sink = tp->n_sink;
    cfg.alpha = tp->alpha;
    cfg.k_values.assign(tp->k_values, tp->k_values + tp->n_k);
    cfg.n_head_kv.assign(tp->n_head_kv, tp->n_head_kv + tp->n_layer);
    cfg.p.assign(tp->p, tp->p + H * tp->n_k);
    cfg.forced = tp->forced != 0;
    if (tp->retention != TCA_RETENTION_HOLD && tp->retention != TCA_RETENTION_STREAM)
        return fail(err, n, "tca retention: must be TCA_RETENTION_HOLD (0) or TCA_RETENTION_STREAM (1), got " + std::to_string(tp->retention));
    if (tp->n_obs > 4096) return fail(err, n, "tca n_obs: must be in [0, 4096] (0 = default 32), got " + std::to_string(tp->n_obs));
    if (tp->n_whole < -1 || tp->n_whole > 65536) return fail(err, n, "tca n_whole: must be in [-1, 65536] (-1 = default 4), got " + std::to_string(tp->n_whole));
    if (tp->type_hold != -1 && tp->type_hold != GGML_TYPE_F32 && tp->type_hold != GGML_TYPE_F16 && tp->type_hold != GGML_TYPE_Q8_0)
        return fail(err, n, "tca hold type: must be -1 (the cache's), f32, f16 or q8_0, got " + std::to_string(tp->type_hold));
    cfg.type_hold = tp->type_hold;
    cfg.hold = tp->retention == TCA_RETENTION_HOLD;
    cfg.n_whole = tp->n_whole < 0 ? 4u : (uint32_t) tp->n_whole;
    cfg.n_obs = tp->n_obs ? tp->n_obs : 32;
    return 0;
}

extern "C" llama_context * tca_init_from_model(llama_model * model, llama_context_params params, const tca_params * tp,
                                               char * err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!model) { fail(err, err_len, "model is NULL"); return nullptr; }
    llama_tca_config cfg;
    if (validate(model, tp, cfg, err, err_len)) return nullptr;
    // upstream refuses a quantized V cache without flash attention; TCA's own attention reads
    // quantized V directly, and a context that falls back to the dense cache needs flash
    // attention for it anyway
    if (ggml_is_quantized(params.type_v) && params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    }
    llama_tca_set_pending(&cfg);
    llama_context * ctx = nullptr;
    try {
        ctx = llama_init_from_model(model, params);
    } catch (const std::exception & e) {
        fail(err, err_len, e.what());
        ctx = nullptr;
    }
    llama_tca_set_pending(nullptr);
    if (ctx) {
        if (auto * m = dynamic_cast<llama_tca_memory *>(llama_get_memory(ctx))) {
            m->sched = ctx->get_sched();
        }
    }
    if (!ctx && err && err_len && !err[0]) fail(err, err_len, "context creation failed (see the log)");
    return ctx;
}

// The compaction that follows a ubatch runs lazily (before the next ubatch); statistics
// flush it first so that they describe what the memory holds after the last step.
static const llama_tca_memory * tca_mem(const llama_context * ctx) {
    if (!ctx) return nullptr;
    auto * m = dynamic_cast<llama_tca_memory *>(llama_get_memory(ctx));
    if (m) m->compact_pending();
    return m;
}

extern "C" int tca_get_stats(const llama_context * ctx, tca_stats * out) {
    if (!out) return -1;
    memset(out, 0, sizeof(*out));
    const auto * m = tca_mem(ctx);
    if (!m) return 0;
    out->active = 1;
    out->n_layers = (uint32_t) m->layers.size();
    out->n_seen = m->n_seen;
    out->frontier = m->frontier;
    for (const auto & kv : m->memory_breakdown()) {
        out->bytes_alloc += kv.second;
        if (!ggml_backend_buft_is_host(kv.first)) out->bytes_device += kv.second;
    }
    out->bytes_dense = m->bytes_dense;
    out->n_compactions = m->n_compactions;
    out->t_compact_ms = m->t_compact_us / 1000.0;
    uint64_t kept = 0, cap = 0;
    for (const auto & L : m->layers) for (const auto & h : L.heads) { kept += h.len; cap += h.cap; }
    out->rows_kept = kept;
    out->rows_cap = cap;
    out->retention = m->cfg.hold ? TCA_RETENTION_HOLD : TCA_RETENTION_STREAM;
    out->bytes_hold = m->bytes_hold;
    out->rows_held = m->cfg.hold ? (uint64_t) m->n_seen * [&] { uint64_t h = 0; for (const auto & L : m->layers) h += L.n_head_kv; return h; }() : 0;
    out->n_final = m->n_final;
    return 1;
}

extern "C" int64_t tca_get_head_stats(const llama_context * ctx, int32_t * layer, uint32_t * kv_head, uint32_t * len,
                                      uint32_t * cap, float * coverage, int64_t n_max) {
    const auto * m = tca_mem(ctx);
    if (!m) return 0;
    int64_t i = 0;
    for (const auto & L : m->layers) {
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

extern "C" int64_t tca_get_head_positions(const llama_context * ctx, int32_t il, uint32_t kv_head, int32_t * pos, int64_t n_max) {
    const auto * m = tca_mem(ctx);
    if (!m) return -1;
    auto * mm = const_cast<llama_tca_memory *>(m);
    auto * L = mm->layer(il);
    if (!L || kv_head >= L->heads.size()) return -1;
    mm->ensure_pos(*L);
    const auto & h = L->heads[kv_head];
    for (int64_t i = 0; i < (int64_t) h.len && i < n_max; ++i) pos[i] = h.pos[i];
    return h.len;
}
