// tca_ggml — the TCA retention memory (see llama-tca-memory.h, docs/design.md §3).
#include "llama-tca-memory.h"
#include "llama-tca-seqs.h"

#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-alloc.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <atomic>
#include <thread>

// ------------------------------------------------------------------------ hand-over
static thread_local const llama_tca_config * g_tca_pending = nullptr;

void llama_tca_set_pending(const llama_tca_config * cfg) { g_tca_pending = cfg; }
const llama_tca_config * llama_tca_get_pending() { return g_tca_pending; }

llama_memory_i * llama_tca_memory_create(const llama_model & model, const llama_memory_params & params,
                                         const llama_cparams & cparams) {
    const llama_tca_config * cfg = g_tca_pending;
    if (!cfg) {
        return nullptr;
    }
    if (cparams.n_seq_max > 1 && cparams.kv_unified) {
        throw std::runtime_error("TCA: several sequences need one retention memory each (n_seq_max > 1 with "
                                 "kv_unified = false: each sequence holds n_ctx / n_seq_max tokens)");
    }
    if (!cparams.causal_attn) {
        throw std::runtime_error("TCA: non-causal attention cannot use TCA");
    }
    if (cparams.n_ctx_seq <= cfg->window + cfg->block) {
        LLAMA_LOG_INFO("%s: TCA: n_ctx %u <= window + block (%u): every token stays in the window, "
                       "using upstream's dense KV cache (identical, no overhead)\n",
                       __func__, cparams.n_ctx_seq, cfg->window + cfg->block);
        return nullptr;
    }
    // GPUs: upstream's flash attention beats TCA's kernel at equal work (0.77-0.88x at p = 1,
    // docs/benchmarks.md), so short contexts, where little or nothing is evicted, stay dense there
    // (issue 6: never slower than 0.98x at <= 8K). TCA_GGML_GPU_MIN_CTX overrides the floor.
    if (cparams.offload_kqv) {
        const uint32_t gpu_min_ctx = cfg->gpu_min_ctx;
        bool on_gpu = false;
        for (uint32_t il = 0; il < model.hparams.n_layer(); ++il) {
            ggml_backend_dev_t dev = model.dev_layer(il);
            on_gpu |= dev && ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU;
        }
        if (on_gpu && cparams.n_ctx_seq <= gpu_min_ctx) {
            LLAMA_LOG_INFO("%s: TCA: n_ctx %u <= %u with layers on a GPU: using upstream's dense KV cache and flash "
                           "attention (faster there at this length; TCA_GGML_GPU_MIN_CTX)\n", __func__,
                           cparams.n_ctx_seq, gpu_min_ctx);
            return nullptr;
        }
    }
    if (cparams.n_seq_max <= 1) {
        return new llama_tca_memory(model, *cfg, params.type_k, params.type_v, cparams.n_ctx_seq, cparams.n_ubatch,
                                    cparams.offload_kqv);
    }
    // many sequences (llama-tca-seqs.h): one retention memory a sequence, each of n_ctx_seq tokens
    std::vector<std::unique_ptr<llama_tca_memory>> seqs;
    for (uint32_t s = 0; s < cparams.n_seq_max; ++s) {
        seqs.emplace_back(new llama_tca_memory(model, *cfg, params.type_k, params.type_v, cparams.n_ctx_seq,
                                               cparams.n_ubatch, cparams.offload_kqv));
    }
    return new llama_tca_memory_seqs(std::move(seqs));
}

// ------------------------------------------------------------------------ memory
static uint32_t head_capacity(const std::vector<float> & p, const std::vector<uint32_t> & kv,
                              uint32_t block, uint32_t window, uint32_t n_sink, uint32_t n_ctx, uint32_t n_ubatch,
                              uint32_t n_whole) {
    double t = 0.0;
    for (size_t i = 0; i < kv.size(); ++i) t += (double) kv[i] * p[i];
    const double n_blocks = std::ceil((double) n_ctx / block);
    // kept tokens of N aged blocks <= N*t + b/2 (assign_k rounding); + live region
    // (< w + b) + one ubatch appended before the next compaction + sinks
    // HOLD: the final selection keeps its top n_whole blocks whole, the rest at p (N - W) / N:
    // W*b + (N - W)*t <= N*t + W*b
    const double need = std::ceil(n_blocks * t) + block + (double) window + block + n_ubatch + n_sink +
                        (double) n_whole * block;
    return (uint32_t) std::min<double>(n_ctx, need);
}

llama_tca_memory::llama_tca_memory(const llama_model & model, const llama_tca_config & cfg_, ggml_type type_k_,
                                   ggml_type type_v_, uint32_t n_ctx_, uint32_t n_ubatch_, bool offload)
    : cfg(cfg_), n_ctx(n_ctx_), n_ubatch(n_ubatch_), type_k(type_k_), type_v(type_v_) {
    const auto & hp = model.hparams;
    const uint32_t n_layer = hp.n_layer();
    const size_t n_k = cfg.k_values.size();
    // cfg was validated against this model by its owner (tca_context_create)
    GGML_ASSERT(cfg.n_head_kv.size() == n_layer);
    if (n_ctx > (1u << 24)) {
        throw std::runtime_error("TCA: n_ctx above 2^24 (positions are kept as exact f32)");
    }
    if (hp.is_swa_any()) {
        throw std::runtime_error("TCA: sliding-window models use llama_kv_cache_iswa; not served by TCA");
    }

    size_t h_base = 0;
    for (uint32_t il = 0; il < n_layer; ++il) {
        const uint32_t nkv = hp.n_head_kv(il);
        if (!hp.has_kv(il) || nkv == 0) {
            h_base += nkv;
            continue;
        }
        layer_t L;
        L.il = (int32_t) il;
        L.n_head = hp.n_head(il);
        L.n_head_kv = nkv;
        L.d_k = hp.n_embd_head_k(il);
        L.d_v = hp.n_embd_head_v(il);
        if (L.n_head % nkv != 0) {
            throw std::runtime_error("TCA: n_head not a multiple of n_head_kv in layer " + std::to_string(il));
        }
        L.heads.resize(nkv);
        uint32_t off = 0;
        for (uint32_t g = 0; g < nkv; ++g) {
            auto & h = L.heads[g];
            h.p.assign(cfg.p.begin() + (h_base + g) * n_k, cfg.p.begin() + (h_base + g + 1) * n_k);
            h.cap = head_capacity(h.p, cfg.k_values, cfg.block, cfg.window, cfg.n_sink, n_ctx, n_ubatch,
                                  cfg.hold ? cfg.n_whole : 0);
            h.off = off;
            // HOLD, recall: r slots after the head's rows, rewritten by each decode step's recalled rows
            off += h.cap + (cfg.hold ? cfg.recall_slots() : 0);
        }
        L.cap_total = off;
        L.len_before.assign(nkv, 0);
        L.len_pending.assign(nkv, 0);
        h_base += nkv;

        // the layer's device, as upstream's KV cache places it (offload_kqv)
        ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
        if (offload) {
            buft = ggml_backend_dev_buffer_type(model.dev_layer(il));
        }
        L.buft = buft;
        const size_t rk = ggml_row_size(type_k, L.d_k), rv = ggml_row_size(type_v, L.d_v);
        if (rk % 4 || rv % 4) {
            throw std::runtime_error("TCA: K/V rows of " + std::to_string(rk) + "/" + std::to_string(rv) +
                                     " bytes are not a multiple of 4");
        }
        ggml_init_params ip = { 12 * ggml_tensor_overhead(), nullptr, true };
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) throw std::runtime_error("TCA: ggml_init failed");
        ctxs.emplace_back(ctx);
        L.k = ggml_new_tensor_2d(ctx, type_k, L.d_k, L.cap_total);
        L.v = ggml_new_tensor_2d(ctx, type_v, L.d_v, L.cap_total);
        L.kpos = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, L.cap_total);
        L.q_last = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, L.d_k, L.n_head);
        ggml_format_name(L.k, "tca_k_l%d", il);
        ggml_format_name(L.v, "tca_v_l%d", il);
        ggml_format_name(L.kpos, "tca_kpos_l%d", il);
        ggml_format_name(L.q_last, "tca_qlast_l%d", il);
        L.bud = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 2 * (int64_t) n_k + 1, nkv);
        ggml_format_name(L.bud, "tca_bud_l%d", il);
        if (cfg.hold) {
            L.q_obs = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, L.d_k, L.n_head, std::max<uint32_t>(1, cfg.n_obs));
            ggml_format_name(L.q_obs, "tca_qobs_l%d", il);
        }
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        if (!buf) throw std::runtime_error("TCA: failed to allocate the retention cache for layer " + std::to_string(il));
        ggml_backend_buffer_clear(buf, 0);
        bufs.emplace_back(buf);
        L.host = ggml_backend_buffer_is_host(buf);
        if (cfg.hold) {
            // the hold tier: every row of the sequence until a prompt's end has been seen (and
            // after, for the next prompt's final selection), in the layer's buffer type
            ggml_init_params hp_ = { 5 * ggml_tensor_overhead(), nullptr, true };
            ggml_context * hctx = ggml_init(hp_);
            if (!hctx) throw std::runtime_error("TCA: ggml_init failed");
            ctxs.emplace_back(hctx);
            const int64_t n_rows = (int64_t) nkv * n_ctx;
            const ggml_type th_k = cfg.type_hold < 0 ? type_k : (ggml_type) cfg.type_hold;
            const ggml_type th_v = cfg.type_hold < 0 ? type_v : (ggml_type) cfg.type_hold;
            if (ggml_row_size(th_k, L.d_k) % 4 || ggml_row_size(th_v, L.d_v) % 4 || (ggml_is_quantized(th_k) && L.d_k % ggml_blck_size(th_k))) {
                throw std::runtime_error("TCA: the hold tier type " + std::string(ggml_type_name(th_k)) +
                                         " does not fit head size " + std::to_string(L.d_k));
            }
            L.hk = ggml_new_tensor_2d(hctx, th_k, L.d_k, n_rows);
            L.hv = ggml_new_tensor_2d(hctx, th_v, L.d_v, n_rows);
            L.hkpos = ggml_new_tensor_2d(hctx, GGML_TYPE_F32, 1, n_rows);
            ggml_format_name(L.hk, "tca_hk_l%d", il);
            ggml_format_name(L.hv, "tca_hv_l%d", il);
            ggml_format_name(L.hkpos, "tca_hkpos_l%d", il);
            if (cfg.recall_blocks && L.host) {
                if (n_ctx % cfg.recall_bs) {
                    throw std::runtime_error("TCA: TCA_GGML_RECALL_BS=" + std::to_string(cfg.recall_bs) +
                                             " does not divide n_ctx " + std::to_string(n_ctx));
                }
                L.ksum = ggml_new_tensor_2d(hctx, GGML_TYPE_F32, 2 * (int64_t) L.d_k, (int64_t) nkv * (n_ctx / cfg.recall_bs));
                ggml_format_name(L.ksum, "tca_ksum_l%d", il);
            }
            ggml_backend_buffer_t hbuf = ggml_backend_alloc_ctx_tensors_from_buft(hctx, buft);
            if (!hbuf) throw std::runtime_error("TCA: failed to allocate the hold tier for layer " + std::to_string(il) +
                                                " (tca_retention='stream' needs none)");
            ggml_backend_buffer_clear(hbuf, 0);
            bytes_hold += ggml_backend_buffer_get_size(hbuf);
            bufs.emplace_back(hbuf);
        }
        {   // per head: the budget in descending-k order, k descending, the decode cut floor(t)
            std::vector<float> & bd = L.bud_host;
            for (const auto & h : L.heads) {
                double t = 0.0;
                for (size_t i = 0; i < n_k; ++i) t += (double) cfg.k_values[i] * h.p[i];
                for (size_t i = 0; i < n_k; ++i) bd.push_back(h.p[n_k - 1 - i]);
                for (size_t i = 0; i < n_k; ++i) bd.push_back((float) cfg.k_values[n_k - 1 - i]);
                bd.push_back((float) std::max<uint32_t>(1, (uint32_t) std::floor(t + 1e-9)));
            }
            ggml_backend_tensor_set(L.bud, bd.data(), 0, bd.size() * sizeof(float));
        }
        init_hold_pos(L);
        if (ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
            dev && ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
            // the device must run the layer's TCA nodes itself: no silent fallback to the CPU
            ggml_init_params tp = { 16 * ggml_tensor_overhead(), nullptr, true };
            ggml_context_ptr tctx{ggml_init(tp)};
            ggml_tensor * q  = ggml_new_tensor_3d(tctx.get(), GGML_TYPE_F32, L.d_k, n_ubatch, L.n_head);
            ggml_tensor * kp = ggml_new_tensor_1d(tctx.get(), GGML_TYPE_F32, L.cap_total);
            ggml_tensor * mt = ggml_new_tensor_1d(tctx.get(), GGML_TYPE_I32, 2 * nkv);
            ggml_tensor * qp = ggml_new_tensor_1d(tctx.get(), GGML_TYPE_I32, n_ubatch);
            ggml_tensor * at = ggml_tca_attn(tctx.get(), q, L.k, L.v, kp, mt, qp, (int) nkv, 1.0f);
            ggml_tensor * sc = ggml_tca_score(tctx.get(), L.q_last, L.k, mt, (int) nkv, 1.0f);
            ggml_tensor * se = ggml_tca_select(tctx.get(), sc, L.kpos, mt, L.bud, (int) nkv, (int) cfg.block,
                                               (int) cfg.n_sink, 0, -1, cfg.alpha, 3);
            ggml_tensor * ck = ggml_tca_compact(tctx.get(), L.k, se, (int) nkv);
            ggml_tensor * cv = ggml_tca_compact(tctx.get(), L.v, se, (int) nkv);
            if (L.d_k != L.d_v || type_k != type_v || !ggml_backend_dev_supports_op(dev, at) ||
                !ggml_backend_dev_supports_op(dev, sc) || !ggml_backend_dev_supports_op(dev, se) ||
                !ggml_backend_dev_supports_op(dev, ck) || !ggml_backend_dev_supports_op(dev, cv)) {
                throw std::runtime_error(std::string("TCA: device ") + ggml_backend_dev_name(dev) +
                                         " does not support TCA attention for layer " + std::to_string(il) +
                                         " (head size " + std::to_string(L.d_k) + "/" + std::to_string(L.d_v) +
                                         ", K " + ggml_type_name(type_k) + ", V " + ggml_type_name(type_v) +
                                         "; supported: head size 64/128/256, K = V type f32/f16/q8_0); "
                                         "use n_gpu_layers=0 or offload_kqv=False for TCA on the CPU");
            }
        }
        bytes_dense += (uint64_t) ggml_row_size(type_k, L.d_k) * nkv * n_ctx +
                       (uint64_t) ggml_row_size(type_v, L.d_v) * nkv * n_ctx;
        map_il[(int32_t) il] = layers.size();
        layers.push_back(std::move(L));
    }
    // device-resident graph inputs, one set per device (TCA_GGML_IO=1: host layers too, for tests)
    for (const auto & L : layers) {
        if (L.host && !cfg.io_on_host) continue;
        auto & o = io[L.buft];
        o.n_meta += 2 * (int64_t) L.n_head_kv;
        o.rows_per_token += L.n_head_kv;
    }
    for (auto & kv : io) {
        auto & o = kv.second;
        ggml_init_params ip = { 6 * ggml_tensor_overhead(), nullptr, true };
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) throw std::runtime_error("TCA: ggml_init failed");
        ctxs.emplace_back(ctx);
        const int64_t n_rows = std::max<int64_t>(1, o.rows_per_token * (int64_t) n_ubatch);
        o.hidx  = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_rows);
        o.hmeta = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, std::max<int64_t>(1, o.n_meta));
        ggml_set_name(o.hidx, "tca_io_hidx");
        ggml_set_name(o.hmeta, "tca_io_hmeta");
        o.pnew = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_rows);
        o.idx  = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_rows);
        o.meta = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, std::max<int64_t>(1, o.n_meta));
        ggml_set_name(o.pnew, "tca_io_pnew");
        ggml_set_name(o.idx, "tca_io_idx");
        ggml_set_name(o.meta, "tca_io_meta");
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, kv.first);
        if (!buf) throw std::runtime_error("TCA: failed to allocate the retention cache's graph inputs");
        ggml_backend_buffer_clear(buf, 0);
        bufs.emplace_back(buf);
    }
    size_t total = 0;
    for (auto & b : bufs) total += ggml_backend_buffer_get_size(b.get());
    size_t n_dev = 0;
    for (auto & L : layers) n_dev += L.host ? 0 : 1;
    LLAMA_LOG_INFO("%s: TCA retention cache: %zu layers (%zu on a device), %.2f MiB fast tier + %.2f MiB hold tier "
                   "(dense KV would be %.2f MiB; fast tier %.1f%%), b=%u w=%u sinks=%u alpha=%.2f retention=%s n_obs=%u%s\n",
                   __func__, layers.size(), n_dev, (total - bytes_hold) / 1048576.0, bytes_hold / 1048576.0,
                   bytes_dense / 1048576.0, 100.0 * (total - bytes_hold) / std::max<double>(1.0, (double) bytes_dense),
                   cfg.block, cfg.window, cfg.n_sink, cfg.alpha, cfg.hold ? "hold" : "stream", cfg.n_obs,
                   cfg.forced ? " [forced density, uncalibrated]" : "");
}

// TCA_GGML_STATS=1: one line on stderr when the context goes (for tools that do not ask, e.g.
// llama-bench): compactions and the time they took, device work included
llama_tca_memory::~llama_tca_memory() {
    if (cfg.stats_on_exit) {
        uint64_t kept = 0, cap = 0;
        for (const auto & L : layers) for (const auto & h : L.heads) { kept += h.len; cap += h.cap; }
        fprintf(stderr, "tca_stats: n_seen=%u compactions=%llu t_compact_ms=%.1f (device: build %.1f, compute %.1f, "
                "read %.1f) rows_kept=%llu rows_cap=%llu final=%llu final_deferred=%llu\n",
                n_seen, (unsigned long long) n_compactions, t_compact_us / 1000.0, t_dev_build_us / 1000.0,
                t_dev_compute_us / 1000.0, t_dev_read_us / 1000.0, (unsigned long long) kept,
                (unsigned long long) cap, (unsigned long long) n_final, (unsigned long long) n_final_deferred);
    }
}

llama_memory_context_ptr llama_tca_memory::init_batch(llama_batch_allocr & balloc, uint32_t n_ub, bool embd_all) {
    GGML_UNUSED(embd_all);
    balloc.split_reset();
    std::vector<llama_ubatch> ubatches;
    uint32_t next = n_seen;
    while (true) {
        auto ub = balloc.split_simple(n_ub);
        if (ub.n_tokens == 0) break;
        for (uint32_t i = 0; i < ub.n_tokens; ++i) {
            if (ub.n_seq_id[i] != 1 || ub.seq_id[i][0] != 0) {
                LLAMA_LOG_ERROR("%s: TCA: only sequence 0 is supported\n", __func__);
                return std::make_unique<llama_tca_memory_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
            if ((uint32_t) ub.pos[i] != next) {
                LLAMA_LOG_ERROR("%s: TCA: tokens must be appended in order (got position %d, expected %u); "
                                "use seq_rm to truncate first\n", __func__, ub.pos[i], next);
                return std::make_unique<llama_tca_memory_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
            ++next;
        }
        ubatches.push_back(std::move(ub));
    }
    if (balloc.get_n_used() < balloc.get_n_tokens()) {
        return std::make_unique<llama_tca_memory_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    if (next > n_ctx) {
        LLAMA_LOG_ERROR("%s: TCA: %u tokens exceed the context of %u\n", __func__, next, n_ctx);
        return std::make_unique<llama_tca_memory_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    return std::make_unique<llama_tca_memory_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_tca_memory::init_full() {
    return std::make_unique<llama_tca_memory_context>(this);
}

llama_memory_context_ptr llama_tca_memory::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(lctx);
    GGML_UNUSED(optimize);
    return std::make_unique<llama_tca_memory_context>(LLAMA_MEMORY_STATUS_NO_UPDATE);
}

bool llama_tca_memory::reserve_ubatch(const llama_ubatch & ub) {
    for (auto & L : layers) {
        for (uint32_t g = 0; g < L.n_head_kv; ++g) {
            auto & h = L.heads[g];
            if (h.len + ub.n_tokens > h.cap) {
                LLAMA_LOG_ERROR("%s: TCA: head %u of layer %d is full (%u + %u > %u)\n", __func__, g, L.il,
                                h.len, ub.n_tokens, h.cap);
                return false;
            }
        }
    }
    if (!pending) pending_first_pos = ub.pos[0];
    // HOLD: a prompt's last ubatch is the one whose last token asks for logits (a one-token
    // ubatch only right after a prompt's other ubatches: otherwise it is a decode step)
    const bool out_last = ub.output && ub.output[ub.n_tokens - 1];
    cur_final = cfg.hold && out_last && (ub.n_tokens > 1 || prev_prefill);
    prev_prefill = ub.n_tokens > 1 && !cur_final;
    // HOLD: the first hold_decode decode steps after a prompt end attend the hold tier too
    cur_hold_decode = cfg.hold && !cur_final && ub.n_tokens == 1 && n_decode_after_final < cfg.hold_decode;
    // refresh: the hold-decode steps keep their queries (step k in q_obs slot k mod n_obs); after the
    // last one, the kept set is selected again from the hold tier by them (compact_pending)
    cur_obs_slot = (cur_hold_decode && cfg.refresh) ? (int32_t) (n_decode_after_final % std::max<uint32_t>(1, cfg.n_obs)) : -1;
    if (cur_final) n_decode_after_final = 0;
    else if (ub.n_tokens == 1) n_decode_after_final += n_decode_after_final < cfg.hold_decode;
    else n_decode_after_final = cfg.hold_decode;
    if (cur_final || ub.n_tokens > 1) pending_refresh = false;
    if (cur_obs_slot >= 0 && n_decode_after_final == cfg.hold_decode) pending_refresh = true;
    if (cur_final) {
        n_obs_valid = std::min<uint32_t>(std::max<uint32_t>(1, cfg.n_obs), ub.n_tokens);
        pending_final = true;
    }
    for (auto & L : layers) {
        for (uint32_t g = 0; g < L.n_head_kv; ++g) {
            auto & h = L.heads[g];
            if (!pending) L.len_pending[g] = h.len;
            L.len_before[g] = h.len;
            if (L.pos_valid) for (uint32_t i = 0; i < ub.n_tokens; ++i) h.pos.push_back(ub.pos[i]);
            else if (L.pos_tail.empty()) { L.tail_from.resize(L.n_head_kv); L.tail_from[g] = h.len; }
            h.len += ub.n_tokens;
        }
        if (!L.pos_valid) L.pos_tail.insert(L.pos_tail.end(), ub.pos, ub.pos + ub.n_tokens);
    }
    n_seen += ub.n_tokens;
    if (cur_final) n_seen_final = n_seen;
    // a decode-rule compaction only if every ubatch since the last compaction was one token
    pending_decode = (pending ? pending_decode : true) && ub.n_tokens == 1;
    pending = true;
    return true;
}

// TCA_GGML_LAZY=1 (experiment, off by default): defer the compaction while every head's region
// still has room for the next ubatch, so that it runs later, with a later query (at the end of a
// prompt: the prompt's own last query, as in the paper). Same allocation; more rows are attended
// until the compaction runs.
bool llama_tca_memory::fits(const llama_ubatch & ub) const {
    return cfg.lazy && room(ub);
}

bool llama_tca_memory::room(const llama_ubatch & ub) const {
    for (const auto & L : layers) {
        for (const auto & h : L.heads) {
            if (h.len + ub.n_tokens > h.cap) return false;
        }
    }
    return true;
}

void llama_tca_memory::prepare(const llama_ubatch & ub) {
    if (fits(ub)) return;
    // HOLD: a decode step that attends the hold tier (n_decode_after_final is counted in
    // reserve_ubatch: here it is the steps before this one) reads neither the kept set nor its
    // metadata, so the final selection can wait for the ubatch that does; the refresh experiment
    // writes its queries over q_obs, so it cannot wait there
    const bool hold_step = cfg.hold && !cfg.refresh && ub.n_tokens == 1 && n_decode_after_final < cfg.hold_decode;
    // ... but not past the step that ages a block after the prompt's end: the eager order runs the
    // decode rule on that block after the final selection, so the selection runs now (as at the
    // prompt's end) and the decode rule after this step, as always; the fast tier never overflows
    const bool ages = llama_tca_aged_frontier(n_seen + ub.n_tokens, cfg.window, cfg.block) >
                      llama_tca_aged_frontier(std::min(n_seen_final, n_seen), cfg.window, cfg.block);
    compact_pending(ub.n_tokens > 1, hold_step && !ages && (pending_final || final_owed) && room(ub));
}

void llama_tca_memory::compact_pending(bool prompt_continues, bool defer_final) {
    if (!pending) return;
    if (defer_final && (pending_final || final_owed)) {
        // the rows since the last compaction stay pending (the final selection rebuilds the fast
        // tier from the hold tier, so the steps' rows there need no compaction of their own)
        final_owed = true;
        pending_final = false;
        return;
    }
    pending = false;
    const bool fin = (pending_final && !prompt_continues) || final_owed;
    if (pending_final && prompt_continues && !final_owed) ++n_final_deferred;
    if (final_owed) ++n_final_lazy;
    pending_final = false;
    final_owed = false;
    // a final selection is made as at its prompt's end, also when it was deferred (prepare)
    const uint32_t n_end = fin ? std::min(n_seen_final, n_seen) : n_seen;
    const uint32_t F = llama_tca_aged_frontier(n_end, cfg.window, cfg.block);
    const bool refresh = pending_refresh && !fin;
    pending_refresh = false;
    if (F == 0) return;
    if (fin || refresh) {
        // HOLD, after a prompt's last ubatch: what stays is selected from every row of the
        // sequence (the hold tier) by the prompt's last queries. Refresh (TCA_GGML_REFRESH), after
        // the last hold-decode step: the same, by the queries of the answer's first steps (q_obs)
        if (refresh) n_obs_valid = std::min<uint32_t>(std::max<uint32_t>(1, cfg.n_obs), cfg.hold_decode);
        if (sched) ggml_backend_sched_synchronize(sched);
        const int64_t t0 = ggml_time_us();
        std::map<ggml_backend_buffer_type_t, std::vector<layer_t *>> groups;
        for (auto & L : layers) groups[L.buft].push_back(&L);
        for (auto & kv : groups) compact_final(kv.second, n_end);
        frontier = F;
        ++n_compactions;
        if (refresh) {
            ++n_refresh;
        } else {
            ++n_final;
            n_obs_last = n_obs_valid;
        }
        t_compact_us += (double) (ggml_time_us() - t0);
        return;
    }
    if (pending_decode && F <= frontier) return;
    if (sched) {
        ggml_backend_sched_synchronize(sched);  // the last ubatch's graph wrote K/V/q_last
    }
    const int64_t t0 = ggml_time_us();  // after the sync: the ubatch's own compute is not counted
    // prefill ubatch: re-select over all aged blocks; decode step: only the newly aged block(s)
    const int64_t f0 = pending_decode ? (int64_t) frontier : -1;
    // one graph per buffer type (GGML_OP_TCA_SCORE / _SELECT / _COMPACT), on the CPU as on a GPU
    std::map<ggml_backend_buffer_type_t, std::vector<layer_t *>> groups;
    for (auto & L : layers) groups[L.buft].push_back(&L);
    for (auto & kv : groups) compact_graph(kv.second, f0);
    frontier = F;
    ++n_compactions;
    t_compact_us += (double) (ggml_time_us() - t0);
}

ggml_backend_t llama_tca_memory::backend_for(ggml_backend_buffer_type_t buft) {
    auto it = backends.find(buft);
    if (it != backends.end()) return it->second.get();
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_t be = dev ? ggml_backend_dev_init(dev, nullptr) : nullptr;
    if (!be) throw std::runtime_error("TCA: cannot start a backend for the retention cache's device");
    if (ggml_backend_is_cpu(be)) {
        // the compaction runs between two graph computes: the cores are otherwise idle
        ggml_backend_cpu_set_n_threads(be, (int) std::max<unsigned>(1, std::min<unsigned>(32, std::thread::hardware_concurrency())));
    }
    backends[buft].reset(be);
    gallocs[buft].reset(ggml_gallocr_new(ggml_backend_get_default_buffer_type(be)));
    return be;
}

// A no-alloc context for n_nodes tensors and a graph of n_nodes nodes in it (the device graphs below)
struct tca_graph_ctx {
    ggml_context_ptr ctx;
    ggml_cgraph * gf;
};

static tca_graph_ctx tca_new_graph(size_t n_nodes) {
    ggml_init_params ip = { ggml_tensor_overhead() * n_nodes + ggml_graph_overhead_custom(n_nodes, false), nullptr, true };
    ggml_context_ptr ctx{ggml_init(ip)};
    ggml_cgraph * gf = ggml_new_graph_custom(ctx.get(), n_nodes, false);
    return { std::move(ctx), gf };
}

// Selection graphs (compact_graph, compact_final): the layer's head-range input of TCA_SCORE /
// TCA_SELECT ([2*n_head_kv] i32; its score scale defaults to 1/sqrt(d_k)) ...
static ggml_tensor * tca_meta_input(ggml_context * ctx, llama_tca_memory::layer_t * L) {
    if (L->scale == 0.0f) L->scale = 1.0f / std::sqrt((float) L->d_k);
    ggml_tensor * meta = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 2 * (int64_t) L->n_head_kv);
    ggml_set_input(meta);
    return meta;
}

// ... and its upload once the graph is allocated: range(L, g) is KV head g's (offset, length)
template <typename R>
static void tca_set_meta(const std::vector<llama_tca_memory::layer_t *> & Ls, const std::vector<ggml_tensor *> & metas, R range) {
    std::vector<int32_t> mt;
    for (size_t i = 0; i < Ls.size(); ++i) {
        mt.clear();
        for (uint32_t g = 0; g < Ls[i]->n_head_kv; ++g) {
            const std::pair<uint32_t, uint32_t> r = range(*Ls[i], g);
            mt.push_back((int32_t) r.first);
            mt.push_back((int32_t) r.second);
        }
        ggml_backend_tensor_set(metas[i], mt.data(), 0, mt.size() * sizeof(int32_t));
    }
}

// Selection and compaction of the layers of one buffer type, in one graph on that device (the CPU too):
// per layer GGML_OP_TCA_SCORE (importance of every retained row), GGML_OP_TCA_SELECT (blocks,
// ranking, budgets, per-block top-k: which rows stay, where they go) and GGML_OP_TCA_COMPACT on K,
// V and kpos (rows moved in place). Only the per-head results come back (4 integers a head).
void llama_tca_memory::compact_graph(const std::vector<layer_t *> & Ls, int64_t f0) {
    if (Ls.empty()) return;
    const int64_t t0 = ggml_time_us();
    ggml_backend_t be = backend_for(Ls[0]->buft);  // also makes the buffer type's gallocr
    ggml_gallocr_t galloc = gallocs[Ls[0]->buft].get();
    const uint32_t F = llama_tca_aged_frontier(n_seen, cfg.window, cfg.block);
    auto [ctx, gf] = tca_new_graph(8 * Ls.size() + 16);
    std::vector<ggml_tensor *> metas, sels;
    for (layer_t * L : Ls) {
        const int nkv = (int) L->n_head_kv;
        ggml_tensor * meta = tca_meta_input(ctx.get(), L);
        ggml_tensor * sc = ggml_tca_score(ctx.get(), L->q_last, L->k, meta, nkv, L->scale);
        ggml_tensor * se = ggml_tca_select(ctx.get(), sc, L->kpos, meta, L->bud, nkv, (int) cfg.block, (int) cfg.n_sink,
                                           (int) F, (int) f0, cfg.alpha, cfg.pool_radius);
        ggml_set_output(se);
        for (ggml_tensor * t : { L->k, L->v, L->kpos }) {
            ggml_build_forward_expand(gf, ggml_tca_compact(ctx.get(), t, se, nkv));
        }
        metas.push_back(meta);
        sels.push_back(se);
    }
    if (!ggml_gallocr_alloc_graph(galloc, gf)) throw std::runtime_error("TCA: cannot allocate the selection graph");
    tca_set_meta(Ls, metas, [](const layer_t & L, uint32_t g) { return std::make_pair(L.heads[g].off, L.heads[g].len); });
    const int64_t t1 = ggml_time_us();
    if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) throw std::runtime_error("TCA: selection graph failed");
    ggml_backend_synchronize(be);
    const int64_t t2 = ggml_time_us();
    // every layer's read-back queued, then one wait: over RPC one round trip's latency, not one a layer
    std::vector<std::vector<int32_t>> tails(Ls.size());
    for (size_t i = 0; i < Ls.size(); ++i) {
        tails[i].resize(4 * (size_t) Ls[i]->n_head_kv);
        ggml_backend_tensor_get_async(be, sels[i], tails[i].data(), (size_t) Ls[i]->cap_total * sizeof(int32_t),
                                      tails[i].size() * sizeof(int32_t));
    }
    ggml_backend_synchronize(be);
    for (size_t i = 0; i < Ls.size(); ++i) {
        layer_t & L = *Ls[i];
        const std::vector<int32_t> & tail = tails[i];
        for (uint32_t g = 0; g < L.n_head_kv; ++g) {
            auto & h = L.heads[g];
            const int32_t * tg = tail.data() + 4 * (size_t) g;
            if (tg[0] != (int32_t) h.off || tg[1] < 0 || (uint32_t) tg[1] > h.len || tg[2] != (int32_t) h.len - tg[1]) {
                throw std::runtime_error("TCA: the device's selection returned an inconsistent head (layer " +
                                         std::to_string(L.il) + ", head " + std::to_string(g) + ")");
            }
            float ev;
            memcpy(&ev, &tg[3], sizeof(ev));
            h.len = (uint32_t) tg[1];
            h.n_evicted += (uint32_t) tg[2];
            h.coverage = 1.0f - ev;
            h.pos.clear();
        }
        L.pos_valid = false;
        L.pos_tail.clear();
    }
    const int64_t t3 = ggml_time_us();
    t_dev_build_us += (double) (t1 - t0);
    t_dev_compute_us += (double) (t2 - t1);
    t_dev_read_us += (double) (t3 - t2);
}

void llama_tca_memory::init_hold_pos(layer_t & L) {
    if (!L.hkpos) return;
    std::vector<float> pf((size_t) L.n_head_kv * n_ctx);
    for (uint32_t g = 0; g < L.n_head_kv; ++g)
        for (uint32_t p = 0; p < n_ctx; ++p) pf[(size_t) g * n_ctx + p] = (float) p;
    ggml_backend_tensor_set(L.hkpos, pf.data(), 0, pf.size() * sizeof(float));
}

// HOLD's final selection (docs/design.md "Retention"): per layer, the pooled importance of every
// held row is the mean over the observation window's queries of GGML_OP_TCA_SCORE (each already
// the mean over the KV head's query heads); GGML_OP_TCA_SELECT picks the rows to keep as after a
// prefill ubatch (design §3); the kept rows are then gathered from the hold tier into the fast
// tier (GET_ROWS -> SET_ROWS), which they replace. The hold tier keeps every row.
void llama_tca_memory::compact_final(const std::vector<layer_t *> & Ls, uint32_t n_end) {
    if (Ls.empty()) return;
    const int64_t t0 = ggml_time_us();
    ggml_backend_t be = backend_for(Ls[0]->buft);  // also makes the buffer type's gallocr
    ggml_gallocr_t galloc = gallocs[Ls[0]->buft].get();
    const uint32_t F = llama_tca_aged_frontier(n_end, cfg.window, cfg.block);
    const uint32_t n_q = std::max<uint32_t>(1, n_obs_valid);
    const bool on_cpu = ggml_backend_is_cpu(be) && !cfg.score_per_query;
    std::vector<std::vector<int32_t>> sel_host(Ls.size());
    {   // 1. scores and selection on the hold tier
        auto [ctx, gf] = tca_new_graph((4 * (size_t) n_q + 8) * Ls.size() + 16);
        std::vector<ggml_tensor *> metas, metas_s, sels, buds;
        for (layer_t * L : Ls) {
            const int nkv = (int) L->n_head_kv;
            // the scores cover the rows up to the prompt's end (n_end); the selection every row
            // (the candidates are the rows before F <= n_end - w: the later ones stay)
            ggml_tensor * meta = tca_meta_input(ctx.get(), L);
            ggml_tensor * meta_s = n_end < n_seen ? tca_meta_input(ctx.get(), L) : meta;
            ggml_tensor * s = nullptr;
            if (on_cpu) {
                // one node: the window's queries as n_head x n_q query heads, head h's query o at
                // h*n_q + o, so that KV head g pools over its G*n_q (query head, query) pairs: the
                // mean over the window of the mean over the group, each K row converted once
                ggml_tensor * qo = ggml_view_3d(ctx.get(), L->q_obs, L->d_k, L->n_head, n_q, L->q_obs->nb[1], L->q_obs->nb[2], 0);
                qo = ggml_cont(ctx.get(), ggml_permute(ctx.get(), qo, 0, 2, 1, 3));   // [d, n_q, n_head]
                qo = ggml_reshape_2d(ctx.get(), qo, L->d_k, (int64_t) n_q * L->n_head);
                s = ggml_tca_score(ctx.get(), qo, L->hk, meta_s, nkv, L->scale);
            } else {
                // GPU kernels keep a query block and n_head logits a row on chip: one node a query
                for (uint32_t j = 0; j < n_q; ++j) {
                    ggml_tensor * qj = ggml_view_2d(ctx.get(), L->q_obs, L->d_k, L->n_head, L->q_obs->nb[1], (size_t) j * L->q_obs->nb[2]);
                    ggml_tensor * sj = ggml_tca_score(ctx.get(), qj, L->hk, meta_s, nkv, L->scale);
                    s = s ? ggml_add(ctx.get(), s, sj) : sj;
                }
                if (n_q > 1) s = ggml_scale(ctx.get(), s, 1.0f / (float) n_q);
            }
            ggml_tensor * bud = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, L->bud->ne[0], L->bud->ne[1]);
            ggml_set_input(bud);
            ggml_tensor * se = ggml_tca_select(ctx.get(), s, L->hkpos, meta, bud, nkv, (int) cfg.block, (int) cfg.n_sink,
                                               (int) F, -1, cfg.alpha, cfg.pool_radius);
            buds.push_back(bud);
            ggml_set_output(se);
            ggml_build_forward_expand(gf, se);
            metas.push_back(meta);
            if (meta_s != meta) metas_s.push_back(meta_s);
            sels.push_back(se);
        }
        if (!ggml_gallocr_alloc_graph(galloc, gf)) throw std::runtime_error("TCA: cannot allocate the final selection graph");
        tca_set_meta(Ls, metas, [&](const layer_t &, uint32_t g) { return std::make_pair(g * n_ctx, n_seen); });
        if (!metas_s.empty()) tca_set_meta(Ls, metas_s, [&](const layer_t &, uint32_t g) { return std::make_pair(g * n_ctx, n_end); });
        for (size_t i = 0; i < Ls.size(); ++i) {
            // the head's budget with its top n_whole ranks at k = b: p'_0 = (W + p_0 (N - W)) / N,
            // p'_i = p_i (N - W) / N over the N aged blocks (every aged block has candidates: the
            // hold tier holds every row)
            const size_t n_k = cfg.k_values.size(), stride = 2 * n_k + 1;
            std::vector<float> bd = Ls[i]->bud_host;
            const double N = (double) (F / cfg.block), W = std::min<double>(cfg.n_whole, N);
            if (N > 0 && W > 0) {
                for (uint32_t g = 0; g < Ls[i]->n_head_kv; ++g) {
                    float * pd = bd.data() + g * stride;
                    for (size_t k = 0; k < n_k; ++k) pd[k] = (float) (pd[k] * (N - W) / N);
                    pd[0] += (float) (W / N);
                }
            }
            ggml_backend_tensor_set(buds[i], bd.data(), 0, bd.size() * sizeof(float));
        }
        if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) throw std::runtime_error("TCA: final selection graph failed");
        ggml_backend_synchronize(be);
        for (size_t i = 0; i < Ls.size(); ++i) {  // queued, then one wait (RPC: one round trip's latency)
            sel_host[i].resize((size_t) ggml_nelements(sels[i]));
            ggml_backend_tensor_get_async(be, sels[i], sel_host[i].data(), 0, sel_host[i].size() * sizeof(int32_t));
        }
        ggml_backend_synchronize(be);
    }
    const int64_t t1 = ggml_time_us();
    {   // 2. gather the kept rows into the fast tier
        auto [ctx, gf] = tca_new_graph(16 * Ls.size() + 16);
        std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>> srcs;
        std::vector<std::pair<ggml_tensor *, std::vector<int64_t>>> dsts;
        for (size_t i = 0; i < Ls.size(); ++i) {
            layer_t & L = *Ls[i];
            const int32_t * sel = sel_host[i].data();
            const size_t n_rows = (size_t) L.n_head_kv * n_ctx;
            std::vector<int32_t> src;
            std::vector<int64_t> dst;
            for (uint32_t g = 0; g < L.n_head_kv; ++g) {
                auto & h = L.heads[g];
                const int32_t * tg = sel + n_rows + 4 * (size_t) g;
                const uint32_t base = g * n_ctx;
                if (tg[0] != (int32_t) base || tg[1] < 0 || (uint32_t) tg[1] > n_seen || tg[2] != (int32_t) n_seen - tg[1]) {
                    throw std::runtime_error("TCA: the final selection returned an inconsistent head (layer " +
                                             std::to_string(L.il) + ", head " + std::to_string(g) + ")");
                }
                const uint32_t nl = (uint32_t) tg[1];
                if (nl > h.cap) {
                    throw std::runtime_error("TCA: the final selection keeps " + std::to_string(nl) + " rows, more than the " +
                                             std::to_string(h.cap) + " of the fast tier (layer " + std::to_string(L.il) +
                                             ", head " + std::to_string(g) + ")");
                }
                float ev;
                memcpy(&ev, &tg[2 + 1], sizeof(ev));
                h.pos.resize(nl);
                for (uint32_t r = 0; r < nl; ++r) {
                    const int32_t row = sel[base + r];
                    if (row < (int32_t) base || row >= (int32_t) (base + n_seen)) {
                        throw std::runtime_error("TCA: the final selection returned a row outside its head");
                    }
                    src.push_back(row);
                    dst.push_back((int64_t) h.off + r);
                    h.pos[r] = row - (int32_t) base;
                }
                h.n_evicted = (uint32_t) tg[2];  // rows of the sequence not in the fast tier
                h.len = nl;
                h.coverage = 1.0f - ev;
            }
            L.pos_valid = true;
            L.pos_tail.clear();
            if (src.empty()) continue;
            const int64_t n = (int64_t) src.size();
            ggml_tensor * is = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n);
            ggml_tensor * id = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I64, n);
            ggml_set_input(is);
            ggml_set_input(id);
            const std::pair<ggml_tensor *, ggml_tensor *> pairs[3] = { { L.hk, L.k }, { L.hv, L.v }, { L.hkpos, L.kpos } };
            for (const auto & pr : pairs) {
                ggml_tensor * rows = ggml_get_rows(ctx.get(), pr.first, is);
                ggml_build_forward_expand(gf, ggml_set_rows(ctx.get(), pr.second, rows, id));
            }
            srcs.emplace_back(is, std::move(src));
            dsts.emplace_back(id, std::move(dst));
        }
        if (!srcs.empty()) {
            if (!ggml_gallocr_alloc_graph(galloc, gf)) throw std::runtime_error("TCA: cannot allocate the gather graph");
            for (auto & sv : srcs) ggml_backend_tensor_set(sv.first, sv.second.data(), 0, sv.second.size() * sizeof(int32_t));
            for (auto & dv : dsts) ggml_backend_tensor_set(dv.first, dv.second.data(), 0, dv.second.size() * sizeof(int64_t));
            if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) throw std::runtime_error("TCA: gather graph failed");
            ggml_backend_synchronize(be);
        }
    }
    const int64_t t2 = ggml_time_us();
    t_dev_build_us += 0.0;
    t_dev_compute_us += (double) (t1 - t0);
    t_dev_read_us += (double) (t2 - t1);
}

void llama_tca_memory::ensure_pos(const layer_t & L) const {
    if (L.pos_valid) return;
    if (sched) ggml_backend_sched_synchronize(sched);
    std::vector<float> pf;
    for (size_t g = 0; g < L.heads.size(); ++g) {
        const auto & h = L.heads[g];
        pf.resize(h.len);
        if (h.len) ggml_backend_tensor_get(L.kpos, pf.data(), (size_t) h.off * sizeof(float), (size_t) h.len * sizeof(float));
        h.pos.assign(pf.begin(), pf.end());
        // rows reserved but not computed yet (a graph's set_input asks between the two): their
        // positions are the ubatches', not what their slots still hold
        for (size_t i = 0; i < L.pos_tail.size(); ++i) {
            const size_t r = (size_t) L.tail_from[g] + i;
            if (r < h.len) h.pos[r] = L.pos_tail[i];
        }
    }
    L.pos_tail.clear();
    L.pos_valid = true;
}

void llama_tca_memory::clear(bool data) {
    for (auto & L : layers) {
        for (auto & h : L.heads) { h.len = 0; h.pos.clear(); h.coverage = 1.0f; h.n_evicted = 0; }
        L.pos_valid = true;
        L.pos_tail.clear();
    }
    if (data) {
        for (auto & b : bufs) ggml_backend_buffer_clear(b.get(), 0);
        for (auto & L : layers) {
            ggml_backend_tensor_set(L.bud, L.bud_host.data(), 0, L.bud_host.size() * sizeof(float));
            init_hold_pos(L);
        }
    }
    n_seen = 0;
    for (auto & Lr : layers) Lr.n_sum = std::min(Lr.n_sum, n_seen / std::max<uint32_t>(1, cfg.recall_bs) * cfg.recall_bs);
    frontier = 0;
    pending = false;
    pending_final = false;
    final_owed = false;
    cur_final = false;
    cur_hold_decode = false;
    n_decode_after_final = cfg.hold_decode;
    prev_prefill = false;
    pending_refresh = false;
    cur_obs_slot = -1;
}

bool llama_tca_memory::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (seq_id > 0) return false;
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = std::numeric_limits<llama_pos>::max();
    if (p1 < (llama_pos) n_seen) {
        LLAMA_LOG_ERROR("%s: TCA: only truncation (removing [p0, end)) is supported, not [%d, %d)\n", __func__, p0, p1);
        return false;
    }
    if (pending && p0 <= pending_first_pos && !final_owed) {
        // the ubatches since the last compaction go whole (a failed decode's cleanup, or a prompt
        // re-evaluating its last token): drop their rows without compacting on them (a failed
        // graph never wrote them); the memory is then as it was after that compaction
        for (auto & L : layers) {
            for (uint32_t g = 0; g < L.n_head_kv; ++g) {
                auto & h = L.heads[g];
                h.len = std::min(h.len, L.len_pending[g]);
                if (L.pos_valid) h.pos.resize(h.len);
            }
            L.pos_tail.clear();
        }
        n_seen = (uint32_t) pending_first_pos;
        for (auto & Lr : layers) Lr.n_sum = std::min(Lr.n_sum, n_seen / std::max<uint32_t>(1, cfg.recall_bs) * cfg.recall_bs);
        pending = false;
        pending_final = false;
        pending_refresh = false;
    } else {
        try {
            compact_pending();
        } catch (const std::exception & e) {  // seq_rm is called from llama_memory_seq_rm: no exception may leave it
            LLAMA_LOG_ERROR("%s: %s\n", __func__, e.what());
            return false;
        }
    }
    if (p0 == 0) { clear(false); return true; }
    if ((uint32_t) p0 >= n_seen) return true;
    for (auto & L : layers) {
        ensure_pos(L);
        for (auto & h : L.heads) {
            uint32_t w = 0;
            while (w < h.len && h.pos[w] < p0) ++w;
            h.len = w;
            h.pos.resize(w);
        }
    }
    n_seen = (uint32_t) p0;
    for (auto & Lr : layers) Lr.n_sum = std::min(Lr.n_sum, n_seen / std::max<uint32_t>(1, cfg.recall_bs) * cfg.recall_bs);
    frontier = std::min(frontier, llama_tca_aged_frontier(n_seen, cfg.window, cfg.block));
    return true;
}

void llama_tca_memory::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos, llama_pos) {
    if (src != dst) LLAMA_LOG_ERROR("%s: TCA: sequence copy is not supported (single sequence)\n", __func__);
}
void llama_tca_memory::seq_keep(llama_seq_id seq_id) {
    if (seq_id != 0) LLAMA_LOG_ERROR("%s: TCA: only sequence 0 exists\n", __func__);
}
void llama_tca_memory::seq_add(llama_seq_id, llama_pos, llama_pos, llama_pos shift) {
    if (shift != 0) LLAMA_LOG_ERROR("%s: TCA: position shifts (context shift) are not supported\n", __func__);
}
void llama_tca_memory::seq_div(llama_seq_id, llama_pos, llama_pos, int d) {
    if (d != 1) LLAMA_LOG_ERROR("%s: TCA: position division is not supported\n", __func__);
}
llama_pos llama_tca_memory::seq_pos_min(llama_seq_id seq_id) const {
    return (seq_id == 0 && n_seen > 0) ? 0 : -1;
}
llama_pos llama_tca_memory::seq_pos_max(llama_seq_id seq_id) const {
    return (seq_id == 0 && n_seen > 0) ? (llama_pos) n_seen - 1 : -1;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_tca_memory::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> ret;
    for (const auto & b : bufs) ret[ggml_backend_buffer_get_type(b.get())] += ggml_backend_buffer_get_size(b.get());
    return ret;
}

static const uint32_t TCA_STATE_MAGIC = 0x32414354; // "TCA2": + retention flag, the hold tier's rows

void llama_tca_memory::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    GGML_UNUSED(flags);
    // upstream's interface makes state_write const, but what is saved is the memory after the
    // compaction that the last ubatch deferred (compact_pending): the one place that completes the
    // deferred work from a const method
    const_cast<llama_tca_memory *>(this)->compact_pending();
    const uint32_t magic = TCA_STATE_MAGIC;
    const uint32_t n_layers = (seq_id <= 0) ? (uint32_t) layers.size() : 0;
    const uint32_t seen = (seq_id <= 0) ? n_seen : 0;
    const uint32_t hold = cfg.hold ? 1 : 0;
    io.write(&magic, sizeof(magic));
    io.write(&hold, sizeof(hold));
    io.write(&seen, sizeof(seen));
    io.write(&frontier, sizeof(frontier));
    io.write(&n_layers, sizeof(n_layers));
    for (uint32_t i = 0; i < n_layers; ++i) {
        const auto & L = layers[i];
        ensure_pos(L);
        io.write(&L.il, sizeof(L.il));
        io.write(&L.n_head_kv, sizeof(L.n_head_kv));
        const size_t rk = ggml_row_size(type_k, L.d_k), rv = ggml_row_size(type_v, L.d_v);
        for (const auto & h : L.heads) {
            io.write(&h.len, sizeof(h.len));
            io.write(h.pos.data(), h.len * sizeof(int32_t));
            if (h.len) {
                io.write_tensor(L.k, (size_t) h.off * rk, (size_t) h.len * rk);
                io.write_tensor(L.v, (size_t) h.off * rv, (size_t) h.len * rv);
            }
        }
        if (hold && seen) {
            const size_t hrk = ggml_row_size(L.hk->type, L.d_k), hrv = ggml_row_size(L.hv->type, L.d_v);
            for (uint32_t g = 0; g < L.n_head_kv; ++g) {
                io.write_tensor(L.hk, (size_t) g * n_ctx * hrk, (size_t) seen * hrk);
                io.write_tensor(L.hv, (size_t) g * n_ctx * hrv, (size_t) seen * hrv);
            }
        }
    }
}

void llama_tca_memory::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    GGML_UNUSED(flags);
    if (seq_id > 0) throw std::runtime_error("TCA: only sequence 0 exists");
    uint32_t magic = 0, hold = 0, seen = 0, fr = 0, n_layers = 0;
    io.read(&magic, sizeof(magic));
    if (magic != TCA_STATE_MAGIC) throw std::runtime_error("TCA: state was not written by a TCA context of this version");
    io.read(&hold, sizeof(hold));
    if (hold != (cfg.hold ? 1u : 0u)) {
        throw std::runtime_error(std::string("TCA: state was saved with tca_retention='") + (hold ? "hold" : "stream") +
                                 "', this context uses '" + (cfg.hold ? "hold" : "stream") + "'");
    }
    io.read(&seen, sizeof(seen));
    io.read(&fr, sizeof(fr));
    io.read(&n_layers, sizeof(n_layers));
    if (n_layers != 0 && n_layers != layers.size()) throw std::runtime_error("TCA: state has a different layer count");
    if (seen > n_ctx) throw std::runtime_error("TCA: state holds more tokens than this context");
    // the header's own consistency (a corrupted state must fail here, never decode garbage):
    // the frontier is a block boundary inside the sequence; an empty state has no layers' rows
    if (fr > seen || fr % cfg.block != 0)
        throw std::runtime_error("TCA: state has an inconsistent frontier (" + std::to_string(fr) + " for " +
                                 std::to_string(seen) + " tokens, block " + std::to_string(cfg.block) + ")");
    if (n_layers == 0 && (seen != 0 || fr != 0)) throw std::runtime_error("TCA: state holds tokens but no layers");
    clear(false);
    for (uint32_t i = 0; i < n_layers; ++i) {
        auto & L = layers[i];
        int32_t il = 0; uint32_t nkv = 0;
        io.read(&il, sizeof(il));
        io.read(&nkv, sizeof(nkv));
        if (il != L.il || nkv != L.n_head_kv) throw std::runtime_error("TCA: state layer layout mismatch");
        const size_t rk = ggml_row_size(type_k, L.d_k), rv = ggml_row_size(type_v, L.d_v);
        for (auto & h : L.heads) {
            uint32_t len = 0;
            io.read(&len, sizeof(len));
            if (len > h.cap) throw std::runtime_error("TCA: state does not fit this context's budgets");
            h.pos.resize(len);
            io.read(h.pos.data(), len * sizeof(int32_t));
            // retained positions: strictly ascending, inside the sequence, and the live region
            // [frontier, seen) held whole (design.md §3: it is exact)
            uint32_t n_live = 0;
            for (uint32_t j = 0; j < len; ++j) {
                const int32_t q = h.pos[j];
                if (q < 0 || (uint32_t) q >= seen || (j > 0 && q <= h.pos[j - 1]))
                    throw std::runtime_error("TCA: state has corrupted positions (layer " + std::to_string(il) +
                                             ": position " + std::to_string(q) + " at row " + std::to_string(j) +
                                             ", " + std::to_string(seen) + " tokens)");
                n_live += (uint32_t) q >= fr;
            }
            if (n_live != seen - fr)
                throw std::runtime_error("TCA: state has corrupted positions (layer " + std::to_string(il) + ": " +
                                         std::to_string(n_live) + " rows after the frontier " + std::to_string(fr) +
                                         ", expected " + std::to_string(seen - fr) + ")");
            h.len = len;
            if (len) {
                io.read_tensor(L.k, (size_t) h.off * rk, (size_t) len * rk);
                io.read_tensor(L.v, (size_t) h.off * rv, (size_t) len * rv);
                std::vector<float> pf(h.pos.begin(), h.pos.end());
                ggml_backend_tensor_set(L.kpos, pf.data(), (size_t) h.off * sizeof(float), (size_t) len * sizeof(float));
            }
        }
        if (hold && seen) {
            const size_t hrk = ggml_row_size(L.hk->type, L.d_k), hrv = ggml_row_size(L.hv->type, L.d_v);
            for (uint32_t g = 0; g < L.n_head_kv; ++g) {
                io.read_tensor(L.hk, (size_t) g * n_ctx * hrk, (size_t) seen * hrk);
                io.read_tensor(L.hv, (size_t) g * n_ctx * hrv, (size_t) seen * hrv);
            }
        }
    }
    n_seen = seen;
    for (auto & Lr : layers) Lr.n_sum = 0;   // a loaded hold tier: summaries made anew
    frontier = fr;
}

void llama_tca_memory::update_summaries(uint32_t upto) const {
    if (!cfg.recall_blocks) return;
    const uint32_t bs = cfg.recall_bs, nb = n_ctx / bs;
    upto = std::min(upto, n_ctx);
    bool synced = false;
    std::vector<float> row;
    for (const auto & L : layers) {
        if (!L.ksum) continue;
        if (L.n_sum > upto) L.n_sum = upto / bs * bs;
        if (L.n_sum == upto) continue;
        if (!synced && sched) { ggml_backend_sched_synchronize(sched); synced = true; }
        const auto * tr = ggml_get_type_traits(L.hk->type);
        const size_t rs = ggml_row_size(L.hk->type, L.d_k);
        row.resize(L.d_k);
        for (uint32_t g = 0; g < L.n_head_kv; ++g) {
            for (uint32_t b = L.n_sum / bs; b * bs < upto; ++b) {
                float * mn = (float *) L.ksum->data + ((size_t) g * nb + b) * 2 * L.d_k;
                float * mx = mn + L.d_k;
                std::fill(mn, mn + L.d_k, INFINITY);
                std::fill(mx, mx + L.d_k, -INFINITY);
                for (uint32_t p = b * bs; p < std::min(upto, (b + 1) * bs); ++p) {
                    const char * src = (const char *) L.hk->data + ((size_t) g * n_ctx + p) * rs;
                    if (L.hk->type == GGML_TYPE_F32) memcpy(row.data(), src, L.d_k * sizeof(float));
                    else tr->to_float(src, row.data(), L.d_k);
                    for (uint32_t i = 0; i < L.d_k; ++i) { mn[i] = std::min(mn[i], row[i]); mx[i] = std::max(mx[i], row[i]); }
                }
            }
        }
        L.n_sum = upto;
    }
}

int64_t llama_tca_memory::head_positions(int32_t il, uint32_t kv_head, int32_t * pos, int64_t n_max) const {
    const layer_t * L = layer(il);
    if (!L || kv_head >= L->heads.size()) return -1;
    ensure_pos(*L);
    const auto & h = L->heads[kv_head];
    for (int64_t i = 0; i < (int64_t) h.len && i < n_max; ++i) pos[i] = h.pos[i];
    return h.len;
}

// ------------------------------------------------------------------------ memory context
llama_tca_memory_context::llama_tca_memory_context(llama_memory_status s) : status(s) {}
llama_tca_memory_context::llama_tca_memory_context(llama_tca_memory * m) : mem(m), is_full(true), status(LLAMA_MEMORY_STATUS_SUCCESS) {}
llama_tca_memory_context::llama_tca_memory_context(llama_tca_memory * m, std::vector<llama_ubatch> ubs)
    : mem(m), status(LLAMA_MEMORY_STATUS_SUCCESS), ubatches(std::move(ubs)) {}

bool llama_tca_memory_context::next() {
    if (++i_next >= ubatches.size()) return false;
    return true;
}

bool llama_tca_memory_context::apply() {
    if (is_full || !mem) return true;
    // upstream's llama_decode catches nothing: an exception from a compaction must become this
    // ubatch's failure (llama_decode returns an error, Python raises), never std::terminate
    try {
        mem->prepare(ubatches[i_next]);   // the previous ubatch has been computed by now
        return mem->reserve_ubatch(ubatches[i_next]);
    } catch (const std::exception & e) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, e.what());
        return false;
    }
}

const llama_ubatch & llama_tca_memory_context::get_ubatch() const {
    GGML_ASSERT(!ubatches.empty());
    return ubatches[i_next];
}

llama_memory_status llama_tca_memory_context::get_status() const { return status; }

