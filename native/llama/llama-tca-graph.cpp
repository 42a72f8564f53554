// tca_ggml — the TCA graph hooks (see llama-tca.h, docs/design.md §5): the attention input that
// places a ubatch's K/V rows in each head's region of the retention memory, and the attention
// itself (GGML_OP_TCA_ATTN over the retained rows, or over the hold tier for a prompt's last ubatch).
#include "llama-tca.h"

#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-impl.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {
// HOLD, recall (TCA_GGML_RECALL=r, experiment): a decode step after the hold-decode steps that also
// attends the r held rows outside the fast tier that its own query scores highest, per KV head
bool tca_recall_step(const llama_tca_memory * m, bool full, uint32_t n_tok) {
    const auto & c = m->get_config();
    return c.hold && c.recall_slots() > 0 && !full && n_tok == 1 && !m->is_cur_final() && !m->is_cur_hold_decode();
}

// recall: a recalled row the mask excludes (already in the fast tier, or not yet written) gets this
// position, after every query's: the attention never sees it (exact in f32)
constexpr float TCA_POS_NEVER = 16777215.0f;
// recall: the score bias of a row that may not be recalled (scores are pooled probabilities, in [0, G])
constexpr float TCA_RECALL_OUT = -1e4f;

class llm_graph_input_attn_tca : public llm_graph_input_attn_kv {
public:
    // the rows of one memory: tokens [tok0, tok0 + n_tok) of each ubatch the graph computes, placed in m
    // (stream -1: the context's one memory, every token; stream i >= 0: the i-th sequence run of a
    // ubatch of a many-sequence context, llama-tca-seqs.h)
    llm_graph_input_attn_tca(const llama_hparams & hp, const llama_cparams & cp, llama_tca_memory * m, bool full,
                             int32_t stream_, uint32_t tok0_, uint32_t n_tok_)
        : llm_graph_input_attn_kv(hp, cp, nullptr), tmem(m), tfull(full), stream(stream_), tok0(tok0_), n_tok(n_tok_) {}

    struct per_layer { int32_t il; ggml_tensor * pnew; ggml_tensor * meta; ggml_tensor * idx; };

    // where layer li's inputs live: host layers in this graph's input tensors (*_all), device layers
    // in the memory's device-resident io tensors of their buffer type; offsets in elements
    struct slot_t { const llama_tca_memory::io_t * io = nullptr; ggml_backend_buffer_type_t buft = nullptr;
                    int64_t o_meta = 0, o_rows = 0;
                    int64_t o_kv = 0; };  // recall: KV heads of the layers before it (offset into r*_all)

    void set_input(const llama_ubatch * ub) override {
        const llama_tca_memory * mem = tmem;
        GGML_ASSERT(tok0 + n_tok <= ub->n_tokens);
        const llama_pos * upos = ub->pos + tok0;  // this stream's positions
        if (qpos) {
            GGML_ASSERT(ggml_backend_buffer_is_host(qpos->buffer));
            int32_t * d = (int32_t *) qpos->data;
            for (uint32_t i = 0; i < n_tok; ++i) d[i] = upos[i];
        }
        if (obs_idx) {   // refresh: the hold-decode step's q_obs slot
            GGML_ASSERT(ggml_backend_buffer_is_host(obs_idx->buffer));
            *(int64_t *) obs_idx->data = std::max<int32_t>(0, mem->get_obs_slot());
        }
        // staging for the device-resident inputs, per buffer type
        struct stage { std::vector<float> pn; std::vector<int64_t> ix, hix; std::vector<int32_t> mt, hmt; };
        std::vector<int32_t> scratch, scratch_m;
        std::map<ggml_backend_buffer_type_t, stage> st;
        for (const auto & pl : layers) {
            const auto * L = mem->layer(pl.il);
            GGML_ASSERT(L);
            const slot_t & sl = slots[mem->layer_index(pl.il)];
            float * pn; int32_t * mt; int64_t * ix; int64_t * hix = nullptr; int32_t * hmt = nullptr;
            const bool hold = mem->get_config().hold;
            if (sl.io) {
                stage & S = st[sl.buft];
                if (S.mt.empty()) {
                    S.pn.assign((size_t) sl.io->rows_per_token * n_tok, 0.0f);
                    S.ix.assign((size_t) sl.io->rows_per_token * n_tok, 0);
                    S.mt.assign((size_t) sl.io->n_meta, 0);
                    if (hold) {
                        S.hix.assign((size_t) sl.io->rows_per_token * n_tok, 0);
                        S.hmt.assign((size_t) sl.io->n_meta, 0);
                    }
                }
                pn = S.pn.data() + sl.o_rows;
                ix = S.ix.data() + sl.o_rows;
                mt = S.mt.data() + sl.o_meta;
                if (hold) { hix = S.hix.data() + sl.o_rows; hmt = S.hmt.data() + sl.o_meta; }
            } else {
                GGML_ASSERT(ggml_backend_buffer_is_host(pnew_all->buffer) && ggml_backend_buffer_is_host(idx_all->buffer));
                pn = (float *) pnew_all->data + sl.o_rows;
                // a head-range input that this ubatch's graph does not use (meta: a final ubatch's
                // attention reads hmeta; hmeta: only final ubatches and dense-prefill layers read
                // it) has no buffer: its values go to a scratch vector
                auto meta_of = [&](ggml_tensor * all, std::vector<int32_t> & scr) -> int32_t * {
                    if (all->buffer) {
                        GGML_ASSERT(ggml_backend_buffer_is_host(all->buffer));
                        return (int32_t *) all->data + sl.o_meta;
                    }
                    scr.resize(std::max<size_t>(scr.size(), 2 * (size_t) L->n_head_kv));
                    return scr.data();
                };
                mt = meta_of(meta_all, scratch_m);
                ix = (int64_t *) idx_all->data + sl.o_rows;
                if (hold) {
                    GGML_ASSERT(ggml_backend_buffer_is_host(hidx_all->buffer));
                    hix = (int64_t *) hidx_all->data + sl.o_rows;
                    hmt = meta_of(hmeta_all, scratch);
                }
            }
            for (uint32_t g = 0; g < L->n_head_kv; ++g) {
                const auto & h = L->heads[g];
                // during graph reserve nothing was placed: pretend the ubatch lands at the start
                const uint32_t before = tfull ? 0 : L->len_before[g];
                const uint32_t len = tfull ? std::min<uint32_t>(h.cap, n_tok) : h.len;
                mt[2 * g] = (int32_t) h.off;
                mt[2 * g + 1] = (int32_t) len;
                for (uint32_t t = 0; t < n_tok; ++t) {
                    ix[(size_t) t * L->n_head_kv + g] = (int64_t) h.off + std::min<uint32_t>(before + t, h.cap - 1);
                    pn[(size_t) t * L->n_head_kv + g] = (float) upos[t];
                }
                if (hold) {
                    const uint32_t base = g * mem->get_n_ctx();
                    hmt[2 * g] = (int32_t) base;
                    hmt[2 * g + 1] = tfull ? (int32_t) std::min<uint32_t>(mem->get_n_ctx(), n_tok) : (int32_t) mem->get_n_seen();
                    for (uint32_t t = 0; t < n_tok; ++t) {
                        const uint32_t p = tfull ? t : (uint32_t) upos[t];
                        hix[(size_t) t * L->n_head_kv + g] = (int64_t) base + std::min<uint32_t>(p, mem->get_n_ctx() - 1);
                    }
                }
            }
        }
        if (recall) set_recall_inputs(upos[0]);
        if (!st.empty() && mem->get_sched()) {
            // the previous ubatch's graph may still be reading them
            ggml_backend_sched_synchronize(mem->get_sched());
        }
        for (auto & kv : st) {
            const auto & o = *mem->get_io(kv.first);
            ggml_backend_tensor_set(o.pnew, kv.second.pn.data(), 0, kv.second.pn.size() * sizeof(float));
            ggml_backend_tensor_set(o.idx, kv.second.ix.data(), 0, kv.second.ix.size() * sizeof(int64_t));
            ggml_backend_tensor_set(o.meta, kv.second.mt.data(), 0, kv.second.mt.size() * sizeof(int32_t));
            if (!kv.second.hix.empty()) {
                ggml_backend_tensor_set(o.hidx, kv.second.hix.data(), 0, kv.second.hix.size() * sizeof(int64_t));
                ggml_backend_tensor_set(o.hmeta, kv.second.hmt.data(), 0, kv.second.hmt.size() * sizeof(int32_t));
            }
        }
    }

    // recall: per layer and KV head g, over the hold tier's rows: a score bias (0 for a row of
    // position p < the query's not in the fast tier, TCA_RECALL_OUT otherwise) and the position a
    // recalled row takes (p, or TCA_POS_NEVER for an excluded one); the r slots after the head's
    // rows and the head range with them
    void set_recall_inputs(int32_t qp) {
        const llama_tca_memory * mem = tmem;
        const uint32_t n_ctx = mem->get_n_ctx(), r = mem->get_config().recall_slots();
        const uint32_t bs = mem->get_config().recall_bs, nblk = mem->get_n_blk();   // by blocks: nblk > 0
        if (nblk) mem->update_summaries((uint32_t) std::max<int32_t>(qp, 0));
        GGML_ASSERT(!nblk || ggml_backend_buffer_is_host(rsmeta_all->buffer));
        GGML_ASSERT(ggml_backend_buffer_is_host(rbias_all->buffer) && ggml_backend_buffer_is_host(rpos_all->buffer) &&
                    ggml_backend_buffer_is_host(ridx_all->buffer) && ggml_backend_buffer_is_host(rmeta_all->buffer));
        std::vector<int32_t> pos;
        std::vector<float> bias_blk(nblk ? n_ctx : 0);   // by blocks: the row bias is only a scratch
        const uint32_t lim = (uint32_t) std::min<int64_t>(std::max<int32_t>(qp, 0), n_ctx);
        for (const auto & pl : layers) {
            const auto * L = mem->layer(pl.il);
            const slot_t & sl = slots[mem->layer_index(pl.il)];
            int64_t * ix = (int64_t *) ridx_all->data + sl.o_kv * r;
            int32_t * mt = (int32_t *) rmeta_all->data + 2 * sl.o_kv;
            for (uint32_t g = 0; g < L->n_head_kv; ++g) {
                const auto & h = L->heads[g];
                float * bias = nblk ? bias_blk.data() : (float *) rbias_all->data + (sl.o_kv + g) * n_ctx;
                float * rp = (float *) rpos_all->data + (sl.o_kv + g) * n_ctx;
                std::fill(bias, bias + lim, 0.0f);
                std::fill(bias + lim, bias + n_ctx, TCA_RECALL_OUT);
                for (uint32_t p = 0; p < lim; ++p) rp[p] = (float) p;
                std::fill(rp + lim, rp + n_ctx, TCA_POS_NEVER);
                pos.resize(h.len);
                const int64_t n = mem->head_positions(pl.il, g, pos.data(), (int64_t) pos.size());
                for (int64_t i = 0; i < n; ++i) {
                    if (pos[i] >= 0 && (uint32_t) pos[i] < n_ctx) { bias[pos[i]] = TCA_RECALL_OUT; rp[pos[i]] = TCA_POS_NEVER; }
                }
                if (nblk) {   // a block may be recalled while it has a row the step may read
                    float * bb = (float *) rbias_all->data + (sl.o_kv + g) * nblk;
                    int32_t * sm = (int32_t *) rsmeta_all->data + 2 * (sl.o_kv + g);
                    for (uint32_t b = 0; b < nblk; ++b) {
                        bool any = false;
                        for (uint32_t t = 0; t < bs && !any; ++t) any = rp[b * bs + t] < TCA_POS_NEVER;
                        bb[b] = any ? 0.0f : TCA_RECALL_OUT;
                    }
                    sm[0] = (int32_t) (g * nblk);
                    sm[1] = (int32_t) ((lim + bs - 1) / bs);
                }
                for (uint32_t j = 0; j < r; ++j) ix[(size_t) g * r + j] = (int64_t) h.off + h.len + j;
                mt[2 * g] = (int32_t) h.off;
                mt[2 * g + 1] = (int32_t) (h.len + r);
            }
        }
    }

    // every TCA tensor of the graph has a shape fixed by n_tokens (the retention tensors are whole,
    // head lengths and row indices are input values), so a graph of the same ubatch size over the
    // same memory is reused (decode: no rebuild per token, CUDA graphs stay captured)
    bool can_reuse(const llm_graph_params & params) override {
        // (the memory context the graph was built with is freed by now: compare with what it held)
        const llama_tca_memory * m = nullptr;
        bool full = false;
        if (stream < 0) {
            const auto * t = dynamic_cast<const llama_tca_memory_context *>(params.mctx);
            if (!t || params.ubatch.n_tokens != n_tok) return false;
            m = t->memory();
            full = t->full();
        } else {
            const auto * t = dynamic_cast<const llama_tca_memory_seqs_context *>(params.mctx);
            if (!t) return false;
            const auto streams = llama_tca_streams(*t, params.ubatch);
            if ((size_t) stream >= streams.size() || streams[stream].tok0 != tok0 || streams[stream].n_tok != n_tok) {
                return false;
            }
            m = streams[stream].mem;
            full = t->full();
        }
        if (m != tmem || full != tfull) return false;
        if (!qpos || qpos->ne[0] != (int64_t) n_tok) return false;
        if (final != (m->is_cur_final() && !full)) return false;  // HOLD: another graph
        if (hold_decode != (m->is_cur_hold_decode() && !full)) return false;
        if ((obs_idx != nullptr) != (m->get_obs_slot() >= 0 && !full)) return false;
        if (recall != tca_recall_step(m, full, n_tok)) return false;
        return true;
    }

    llama_tca_memory * tmem;  // the memory and the kind of context the graph was built for
    bool tfull;
    int32_t stream;           // -1: the context's one memory; else the stream's index in the ubatch
    uint32_t tok0, n_tok;     // the stream's tokens in each ubatch
    ggml_tensor * qpos = nullptr;
    ggml_tensor * obs_idx = nullptr;      // HOLD, refresh: [1] i64, the q_obs slot of a hold-decode step
    std::vector<per_layer> layers;
    // host layers: one graph input tensor of each kind for all of them (views per layer)
    ggml_tensor * pnew_all = nullptr;     // [1, sum nkv * n_tokens] f32
    ggml_tensor * meta_all = nullptr;     // [sum 2 nkv] i32
    ggml_tensor * idx_all  = nullptr;     // [sum nkv * n_tokens] i64
    ggml_tensor * hidx_all = nullptr;     // HOLD: [sum nkv * n_tokens] i64 hold-tier rows
    ggml_tensor * hmeta_all = nullptr;    // HOLD: [sum 2 nkv] i32 hold-tier head ranges
    bool final = false;                   // HOLD: a prompt's last ubatch (attends the hold tier)
    bool hold_decode = false;             // HOLD: a decode step that attends the hold tier
    bool recall = false;                  // HOLD, recall: a decode step that recalls held rows
    ggml_tensor * rbias_all = nullptr;    // recall: [n_ctx * sum nkv] f32, score bias of each held row
    ggml_tensor * rpos_all  = nullptr;    // recall: [n_ctx * sum nkv] f32, position a recalled row takes
    ggml_tensor * ridx_all  = nullptr;    // recall: [r * sum nkv] i64, the fast-tier slots of the recalled rows
    ggml_tensor * rmeta_all = nullptr;    // recall: [sum 2 nkv] i32, head ranges with the slots
    ggml_tensor * rsmeta_all = nullptr;   // recall by blocks: [sum 2 nkv] i32, the summaries' head ranges
                                          // (rbias_all is then [n_blk * sum nkv], a bias a block)
    std::vector<slot_t> slots;            // per layer (memory's layer order)
};

// Many sequences (llama-tca-seqs.h): the attention input of a ubatch cut by sequence, one
// llm_graph_input_attn_tca a stream (each registered as a graph input of its own, setting its inputs)
class llm_graph_input_attn_tca_seqs : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_tca_seqs(const llama_hparams & hp, const llama_cparams & cp) : llm_graph_input_attn_kv(hp, cp, nullptr) {}
    void set_input(const llama_ubatch * ub) override { GGML_UNUSED(ub); }
    bool can_reuse(const llm_graph_params & params) override {
        const auto * t = dynamic_cast<const llama_tca_memory_seqs_context *>(params.mctx);
        return t && llama_tca_streams(*t, params.ubatch).size() == streams.size();  // each stream checks itself
    }
    std::vector<llm_graph_input_attn_tca *> streams;
};

// the graph inputs of one memory's stream of tokens
llm_graph_input_attn_tca * tca_stream_input(const llm_graph_context & g, llama_tca_memory * mem, bool full,
                                            int32_t stream, uint32_t tok0, uint32_t n_tok) {
    auto inp = std::make_unique<llm_graph_input_attn_tca>(g.hparams, g.cparams, mem, full, stream, tok0, n_tok);
    inp->qpos = ggml_new_tensor_1d(g.ctx0, GGML_TYPE_I32, n_tok);
    ggml_set_input(inp->qpos);
    ggml_set_name(inp->qpos, "tca_qpos");
    int64_t n_meta = 0, n_rows = 0, n_kv = 0;
    std::map<ggml_backend_buffer_type_t, std::pair<int64_t, int64_t>> dev_off;  // per device: meta, rows
    for (const auto & L : mem->get_layers()) {
        llm_graph_input_attn_tca::slot_t sl;
        sl.o_kv = n_kv;
        n_kv += L.n_head_kv;
        if (const auto * io = mem->get_io(L.buft)) {
            auto & d = dev_off[L.buft];
            sl.io = io;
            sl.buft = L.buft;
            sl.o_meta = d.first;
            sl.o_rows = d.second;
            d.first += 2 * (int64_t) L.n_head_kv;
            d.second += (int64_t) L.n_head_kv * n_tok;
        } else {
            sl.o_meta = n_meta;
            sl.o_rows = n_rows;
            n_meta += 2 * (int64_t) L.n_head_kv;
            n_rows += (int64_t) L.n_head_kv * n_tok;
        }
        inp->slots.push_back(sl);
    }
    // a 1-D graph input of n (at least 1) elements
    auto input = [&](ggml_type t, int64_t n, const char * name) {
        ggml_tensor * x = ggml_new_tensor_1d(g.ctx0, t, std::max<int64_t>(1, n));
        ggml_set_input(x);
        ggml_set_name(x, name);
        return x;
    };
    inp->pnew_all = ggml_new_tensor_2d(g.ctx0, GGML_TYPE_F32, 1, std::max<int64_t>(1, n_rows));   // [1, rows]
    ggml_set_input(inp->pnew_all);
    ggml_set_name(inp->pnew_all, "tca_pnew");
    inp->meta_all = input(GGML_TYPE_I32, n_meta, "tca_meta");
    inp->idx_all  = input(GGML_TYPE_I64, n_rows, "tca_idx");
    if (mem->get_config().hold) {
        inp->hidx_all  = input(GGML_TYPE_I64, n_rows, "tca_hidx");
        inp->hmeta_all = input(GGML_TYPE_I32, n_meta, "tca_hmeta");
    }
    inp->final = mem->is_cur_final() && !full;
    inp->hold_decode = mem->is_cur_hold_decode() && !full;
    inp->recall = tca_recall_step(mem, full, n_tok);
    if (inp->recall) {
        const int64_t r = mem->get_config().recall_slots();
        const int64_t nblk = mem->get_n_blk();   // recall by blocks: a bias a block, the summaries' ranges
        inp->rbias_all = input(GGML_TYPE_F32, (nblk ? nblk : (int64_t) mem->get_n_ctx()) * n_kv, "tca_rbias");
        if (nblk) inp->rsmeta_all = input(GGML_TYPE_I32, 2 * n_kv, "tca_rsmeta");
        inp->rpos_all  = input(GGML_TYPE_F32, (int64_t) mem->get_n_ctx() * n_kv, "tca_rpos");
        inp->ridx_all  = input(GGML_TYPE_I64, r * n_kv, "tca_ridx");
        inp->rmeta_all = input(GGML_TYPE_I32, 2 * n_kv, "tca_rmeta");
    }
    if (mem->get_obs_slot() >= 0 && !full) {
        inp->obs_idx = ggml_new_tensor_1d(g.ctx0, GGML_TYPE_I64, 1);
        ggml_set_input(inp->obs_idx);
        ggml_set_name(inp->obs_idx, "tca_obs_idx");
    }
    return (llm_graph_input_attn_tca *) g.res->add_input(std::move(inp));
}

// One stream's attention in layer il: its K/V rows placed in its memory, GGML_OP_TCA_ATTN of its
// queries over the rows its memory holds; q_cur/k_cur/v_cur are the stream's tokens only.
// Returns [d_v * n_head, n_tok].
ggml_tensor * tca_attn_stream(const llm_graph_context & g, llm_graph_input_attn_tca * inp, ggml_tensor * q_cur,
                              ggml_tensor * k_cur, ggml_tensor * v_cur, float kq_scale, int il) {
    llama_tca_memory * mem = inp->tmem;
    const auto * L = mem->layer(il);
    if (!L) throw std::runtime_error("TCA: layer " + std::to_string(il) + " has no retention cache");
    mem->set_kq_scale(il, kq_scale);
    ggml_context * ctx0 = g.ctx0;
    ggml_cgraph * gf = g.gf;
    const int64_t n_tokens = q_cur->ne[2];
    const int64_t nkv = L->n_head_kv;

    ggml_build_forward_expand(gf, q_cur);
    ggml_build_forward_expand(gf, v_cur);

    llm_graph_input_attn_tca::per_layer pl;
    pl.il = il;
    const auto & sl = inp->slots[mem->layer_index(il)];
    ggml_tensor * src_pnew = sl.io ? sl.io->pnew : inp->pnew_all;
    ggml_tensor * src_meta = sl.io ? sl.io->meta : inp->meta_all;
    ggml_tensor * src_idx  = sl.io ? sl.io->idx  : inp->idx_all;
    pl.pnew = ggml_view_2d(ctx0, src_pnew, 1, nkv * n_tokens, sizeof(float), sl.o_rows * sizeof(float));
    pl.meta = ggml_view_1d(ctx0, src_meta, 2 * nkv, sl.o_meta * sizeof(int32_t));
    pl.idx  = ggml_view_1d(ctx0, src_idx, nkv * n_tokens, sl.o_rows * sizeof(int64_t));
    inp->layers.push_back(pl);

    // store this ubatch's K/V rows into each head's region. K last and as ROPE -> VIEW -> SET_ROWS,
    // adjacent in the graph (the row indices are expanded before): the CUDA backend then writes the
    // roped rows straight into the cache in one kernel (upstream's fusion, extended to one row per
    // head by patch 0005); other backends run the same three nodes.
    ggml_tensor * vc = ggml_is_contiguous(v_cur) ? v_cur : ggml_cont(ctx0, v_cur);
    vc = ggml_reshape_2d(ctx0, vc, L->d_v, nkv * n_tokens);
    ggml_tensor * v_all = ggml_set_rows(ctx0, L->v, vc, pl.idx);
    ggml_tensor * p_all = ggml_reshape_1d(ctx0, ggml_set_rows(ctx0, L->kpos, pl.pnew, pl.idx), L->cap_total);
    ggml_build_forward_expand(gf, v_all);
    ggml_build_forward_expand(gf, p_all);
    ggml_build_forward_expand(gf, pl.idx);
    ggml_build_forward_expand(gf, k_cur);
    ggml_tensor * kc = ggml_is_contiguous(k_cur)
        ? ggml_view_2d(ctx0, k_cur, L->d_k, nkv * n_tokens, k_cur->nb[1], 0)
        : ggml_reshape_2d(ctx0, ggml_cont(ctx0, k_cur), L->d_k, nkv * n_tokens);
    ggml_tensor * k_all = ggml_set_rows(ctx0, L->k, kc, pl.idx);
    ggml_build_forward_expand(gf, k_all);

    // HOLD: every row also goes to the hold tier (head g, position p at g*n_ctx + p); a prompt's
    // last ubatch attends the hold tier (every row of the sequence), and its last n_obs queries
    // are kept for the final selection that follows it
    ggml_tensor * att_k = k_all, * att_v = v_all, * att_p = p_all, * att_meta = pl.meta;
    ggml_tensor * q_att = nullptr;   // the attention's queries when a branch below made them
    if (mem->get_config().hold) {
        ggml_tensor * src_hidx  = sl.io ? sl.io->hidx  : inp->hidx_all;
        ggml_tensor * src_hmeta = sl.io ? sl.io->hmeta : inp->hmeta_all;
        ggml_tensor * hidx  = ggml_view_1d(ctx0, src_hidx, nkv * n_tokens, sl.o_rows * sizeof(int64_t));
        ggml_tensor * hmeta = ggml_view_1d(ctx0, src_hmeta, 2 * nkv, sl.o_meta * sizeof(int32_t));
        ggml_tensor * hk_all = ggml_set_rows(ctx0, L->hk, kc, hidx);
        ggml_tensor * hv_all = ggml_set_rows(ctx0, L->hv, vc, hidx);
        ggml_build_forward_expand(gf, hk_all);
        ggml_build_forward_expand(gf, hv_all);
        // TCA_PREFILL_DENSE: every multi-token ubatch attends the hold tier too (the prompt's rows
        // are dense's; the budgets apply from the prompt's end); TCA_GGML_PREFILL_LAYERS: only
        // those layers do (experiment)
        if (inp->hold_decode || (n_tokens == 1 && !inp->final && mem->get_config().decode_hold_layer(il))) {
            att_k = hk_all;
            att_v = hv_all;
            att_p = ggml_reshape_1d(ctx0, L->hkpos, ggml_nelements(L->hkpos));
            att_meta = hmeta;
            if (inp->obs_idx) {
                // refresh: this step's query into its q_obs slot (the selection after the last
                // hold-decode step is made by them)
                ggml_tensor * qs = ggml_cont(ctx0, q_cur);
                if (qs->type != GGML_TYPE_F32) qs = ggml_cast(ctx0, qs, GGML_TYPE_F32);
                qs = ggml_reshape_2d(ctx0, qs, L->d_k * L->n_head, 1);
                ggml_tensor * dst = ggml_reshape_2d(ctx0, L->q_obs, L->d_k * L->n_head, L->q_obs->ne[2]);
                ggml_build_forward_expand(gf, ggml_set_rows(ctx0, dst, qs, inp->obs_idx));
            }
        } else if (inp->recall && (!inp->rsmeta_all || L->ksum)) {   // by blocks: host layers only
            // recall: the step's query scores every held row (GGML_OP_TCA_SCORE: the pooled softmax
            // of the head's query heads); per KV head the r best rows outside the fast tier (the
            // bias) are copied into the r slots after the head's rows, and the attention reads them
            // too. A pick the bias excludes (fewer than r candidates) takes a position no query sees.
            // 9 compute nodes a layer (each a barrier of the CPU threads: the cost that matters here)
            const int64_t r = mem->get_config().recall_slots();
            const int64_t n_ctx = mem->get_n_ctx();
            const int64_t o_kv = inp->slots[mem->layer_index(il)].o_kv;
            q_att = ggml_cont(ctx0, ggml_permute(ctx0, q_cur, 0, 2, 1, 3));  // [d, 1, n_head], the attention's too
            if (q_att->type != GGML_TYPE_F32) q_att = ggml_cast(ctx0, q_att, GGML_TYPE_F32);
            ggml_tensor * q2 = ggml_reshape_2d(ctx0, q_att, L->d_k, L->n_head);
            ggml_tensor * rp = ggml_view_1d(ctx0, inp->rpos_all, nkv * n_ctx, o_kv * n_ctx * sizeof(float));
            ggml_tensor * kr, * vr, * pr;
            if (inp->rsmeta_all) {
                // by blocks: Quest's bound of every block of recall_bs held rows (its K summary), the
                // kb best blocks whose rows the step may read, their rows whole
                const int64_t bs = mem->get_config().recall_bs, nblk = mem->get_n_blk();
                const int64_t kb = mem->get_config().recall_blocks;
                ggml_tensor * smeta = ggml_view_1d(ctx0, inp->rsmeta_all, 2 * nkv, o_kv * 2 * sizeof(int32_t));
                ggml_tensor * sc = ggml_tca_score(ctx0, ggml_concat(ctx0, q2, q2, 0), L->ksum, smeta, (int) nkv, kq_scale);
                sc->op_params[2] = 2;   // the bound (native/ggml-cpu/tca-select.cpp)
                sc = ggml_add(ctx0, sc, ggml_view_1d(ctx0, inp->rbias_all, nkv * nblk, o_kv * nblk * sizeof(float)));
                ggml_tensor * top = ggml_top_k(ctx0, ggml_reshape_2d(ctx0, sc, nblk, nkv), (int) kb);  // [kb, nkv]
                kr = ggml_get_rows(ctx0, ggml_reshape_3d(ctx0, hk_all, L->d_k * bs, nblk, nkv), top);
                vr = ggml_get_rows(ctx0, ggml_reshape_3d(ctx0, hv_all, L->d_v * bs, nblk, nkv), top);
                pr = ggml_get_rows(ctx0, ggml_reshape_3d(ctx0, rp, bs, nblk, nkv), top);
            } else {
                ggml_tensor * sc = ggml_tca_score(ctx0, q2, hk_all, hmeta, (int) nkv, kq_scale);   // [nkv * n_ctx]
                sc->op_params[2] = 1;   // a ranking: f16 dots allowed (CPU; native/ggml-cpu/tca-select.cpp)
                sc = ggml_add(ctx0, sc, ggml_view_1d(ctx0, inp->rbias_all, nkv * n_ctx, o_kv * n_ctx * sizeof(float)));
                ggml_tensor * top = ggml_top_k(ctx0, ggml_reshape_2d(ctx0, sc, n_ctx, nkv), (int) r);  // [r, nkv] i32
                kr = ggml_get_rows(ctx0, ggml_reshape_3d(ctx0, hk_all, L->d_k, n_ctx, nkv), top);
                vr = ggml_get_rows(ctx0, ggml_reshape_3d(ctx0, hv_all, L->d_v, n_ctx, nkv), top);
                pr = ggml_get_rows(ctx0, ggml_reshape_3d(ctx0, rp, 1, n_ctx, nkv), top);
            }
            ggml_tensor * ridx = ggml_view_1d(ctx0, inp->ridx_all, nkv * r, o_kv * r * sizeof(int64_t));
            att_k = ggml_set_rows(ctx0, k_all, ggml_reshape_2d(ctx0, kr, L->d_k, nkv * r), ridx);
            att_v = ggml_set_rows(ctx0, v_all, ggml_reshape_2d(ctx0, vr, L->d_v, nkv * r), ridx);
            att_p = ggml_reshape_1d(ctx0, ggml_set_rows(ctx0, ggml_reshape_2d(ctx0, p_all, 1, L->cap_total),
                                                        ggml_reshape_2d(ctx0, pr, 1, nkv * r), ridx), L->cap_total);
            att_meta = ggml_view_1d(ctx0, inp->rmeta_all, 2 * nkv, o_kv * 2 * sizeof(int32_t));
        } else if (inp->final || (n_tokens > 1 && mem->get_config().prefill_dense_layer(il))) {
            att_k = hk_all;
            att_v = hv_all;
            att_p = ggml_reshape_1d(ctx0, L->hkpos, ggml_nelements(L->hkpos));
            att_meta = hmeta;
            const int64_t n_o = std::min<int64_t>(n_tokens, L->q_obs->ne[2]);
            ggml_tensor * q_o = ggml_view_3d(ctx0, q_cur, q_cur->ne[0], q_cur->ne[1], n_o, q_cur->nb[1], q_cur->nb[2],
                                             (size_t) (n_tokens - n_o) * q_cur->nb[2]);
            ggml_tensor * dst = ggml_view_3d(ctx0, L->q_obs, L->q_obs->ne[0], L->q_obs->ne[1], n_o, L->q_obs->nb[1],
                                             L->q_obs->nb[2], 0);
            ggml_build_forward_expand(gf, ggml_cpy(ctx0, q_o, dst));
        }
    }

    // keep the ubatch's last query for the compaction that follows this ubatch
    ggml_tensor * q_last = ggml_view_2d(ctx0, q_cur, q_cur->ne[0], q_cur->ne[1], q_cur->nb[1],
                                        (size_t) (n_tokens - 1) * q_cur->nb[2]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx0, q_last, L->q_last));

    ggml_tensor * q = q_att;
    if (!q) {
        q = ggml_cont(ctx0, ggml_permute(ctx0, q_cur, 0, 2, 1, 3));  // [d, n_tokens, n_head]
        if (q->type != GGML_TYPE_F32) q = ggml_cast(ctx0, q, GGML_TYPE_F32);
    }
    ggml_tensor * cur = ggml_tca_attn(ctx0, q, att_k, att_v, att_p, att_meta, inp->qpos, (int) nkv, kq_scale);
    g.cb(cur, "kqv_out", il);
    return ggml_reshape_2d(ctx0, cur, cur->ne[0] * cur->ne[1], cur->ne[2]);
}
}  // namespace

llm_graph_input_attn_kv * llama_tca_build_attn_inp(const llm_graph_context & g) {
    if (const auto * t = dynamic_cast<const llama_tca_memory_context *>(g.mctx)) {
        return tca_stream_input(g, t->memory(), t->full(), -1, 0, (uint32_t) g.n_tokens);
    }
    const auto * ts = dynamic_cast<const llama_tca_memory_seqs_context *>(g.mctx);
    if (!ts) return nullptr;
    const auto streams = llama_tca_streams(*ts, g.ubatch);
    if (streams.empty()) throw std::runtime_error("TCA: a ubatch of several sequences that is not cut by sequence");
    auto multi = std::make_unique<llm_graph_input_attn_tca_seqs>(g.hparams, g.cparams);
    for (size_t i = 0; i < streams.size(); ++i) {
        multi->streams.push_back(tca_stream_input(g, streams[i].mem, ts->full(), (int32_t) i, streams[i].tok0,
                                                  streams[i].n_tok));
    }
    return (llm_graph_input_attn_kv *) g.res->add_input(std::move(multi));
}

ggml_tensor * llama_tca_build_attn(const llm_graph_context & g, llm_graph_input_attn_kv * inp_base,
                                   ggml_tensor * wo, ggml_tensor * wo_b, ggml_tensor * wo_s,
                                   ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                   ggml_tensor * kq_b, ggml_tensor * sinks, float kq_scale, int il) {
    auto * one = dynamic_cast<llm_graph_input_attn_tca *>(inp_base);
    auto * multi = one ? nullptr : dynamic_cast<llm_graph_input_attn_tca_seqs *>(inp_base);
    if (!one && !multi) return nullptr;
    if (kq_b || sinks) {
        throw std::runtime_error("TCA: attention with a KQ bias or sinks is not supported by TCA");
    }
    ggml_tensor * cur = nullptr;
    if (one) {
        cur = tca_attn_stream(g, one, q_cur, k_cur, v_cur, kq_scale, il);
    } else {
        // several sequences: each stream's tokens (a contiguous run, split_equal) attend their own
        // sequence's rows, in one graph; the outputs are concatenated back in token order
        for (auto * st : multi->streams) {
            auto slice = [&](ggml_tensor * t) {
                return ggml_view_3d(g.ctx0, t, t->ne[0], t->ne[1], st->n_tok, t->nb[1], t->nb[2], (size_t) st->tok0 * t->nb[2]);
            };
            ggml_tensor * o = tca_attn_stream(g, st, slice(q_cur), slice(k_cur), slice(v_cur), kq_scale, il);
            cur = cur ? ggml_concat(g.ctx0, cur, o, 1) : o;
        }
    }
    if (wo) {
        cur = g.build_lora_mm(wo, cur, wo_s);
    }
    if (wo_b) {
        cur = ggml_add(g.ctx0, cur, wo_b);
    }
    return cur;
}

uint32_t llama_tca_graph_nodes(const llama_memory_i * mem) {
    const auto * ms = dynamic_cast<const llama_tca_memory_seqs *>(mem);
    if (!ms) return 0;
    // per stream and layer: the slices, K/V/position stores (main and hold tier), query copies,
    // the permute/cont/cast, the attention, its reshape and the concatenation, with their views
    const uint32_t n_layer = (uint32_t) ms->seq(0)->get_layers().size();
    return ms->n_seq() * n_layer * 48u;
}
