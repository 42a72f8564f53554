// tca_ggml — the TCA retention memory for llama.cpp (state; the graph hooks are in llama-tca-graph.cpp).
//
// llama_tca_memory is a llama_memory_i beside llama.cpp's KV caches: per layer and per KV
// head a *ragged* retained list (sinks, compacted tokens of aged blocks, and the exact live
// window), sized from the head's calibrated budget instead of n_ctx x all heads. After each
// ubatch (prefill) or when a block leaves the window (decode), the blocks that aged are
// re-selected with the ubatch's last query (docs/design.md §3) and compacted in place.
//
// It is chosen by llama_model::create_memory (patch 0002, through llama-tca.h) when a TCA
// configuration has been handed over for this context (tca_context_create, native/src/tca_config.cpp,
// the one owner of the configuration). Its state is private: the graph hooks and the C API's
// statistics read it through the accessors below.
#pragma once

#include "llama-memory.h"
#include "llama-graph.h"

#include "ggml-alloc.h"
#include "ggml-cpp.h"

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

struct llama_model;
struct llama_cparams;
class llama_tca_memory;

// The configuration a retention memory runs, resolved and validated by its one owner,
// tca_context_create (native/src/tca_config.cpp): budgets from the GGUF's tca.* keys (or a forced
// density), the overrides, and the environment knobs read once at context creation
// (docs/design.md "Knobs").
struct llama_tca_config {
    uint32_t block  = 128;
    uint32_t window = 4096;
    uint32_t n_sink = 4;
    float    alpha  = 0.5f;
    std::vector<uint32_t> k_values;   // ascending, 1 .. block
    std::vector<uint32_t> n_head_kv;  // per layer (as calibrated)
    std::vector<float>    p;          // [sum(n_head_kv) x k_values.size()], layer-major
    bool forced = false;              // uniform forced density (uncalibrated, for benchmarks)
    bool hold = true;                 // retention HOLD (docs/design.md "Retention"); false: STREAM
    uint32_t n_obs = 32;              // HOLD: queries at the prompt's end that score the final selection
    uint32_t n_whole = 4;             // HOLD: top-ranked blocks of the final selection kept whole
    uint32_t hold_decode = 0;         // HOLD: decode steps after a prompt's end that attend the hold tier
    int32_t type_hold = -1;           // HOLD: ggml_type of the hold tier (-1: the cache's)
    bool dense_prefill = false;       // HOLD: every prefill ubatch attends the hold tier (TCA_PREFILL_DENSE)
    int32_t dense_prefill_lo = -1;    // HOLD, sparse prefill: layers lo..hi attend the hold tier in prefill
    int32_t dense_prefill_hi = -1;    // ubatches (TCA_GGML_PREFILL_LAYERS=lo-hi, experiment)
    bool prefill_dense_layer(int32_t il) const {
        return dense_prefill || (il >= dense_prefill_lo && il <= dense_prefill_hi);
    }
    std::vector<bool> decode_hold_layers;  // HOLD: layers whose every decode step attends the hold tier
                                           // (TCA_GGML_DECODE_HOLD_LAYERS, experiment); empty: none
    bool decode_hold_layer(int32_t il) const {
        return il >= 0 && (size_t) il < decode_hold_layers.size() && decode_hold_layers[il];
    }
    // knobs (environment, read once at context creation)
    uint32_t gpu_min_ctx = 8192;      // TCA_GGML_GPU_MIN_CTX: layers on a GPU and n_ctx <= this: dense cache
    bool io_on_host = false;          // TCA_GGML_IO: device-resident graph inputs for host layers too (tests)
    bool lazy = false;                // TCA_GGML_LAZY: defer compactions while every head has room (experiment)
    int pool_radius = 3;              // TCA_GGML_POOL: within-block ranking radius (0 = plain scores)
    bool score_per_query = false;     // TCA_GGML_SCORE_PER_QUERY: the final selection's CPU score as one node a query (A/B)
    bool stats_on_exit = false;       // TCA_GGML_STATS: one line of compaction statistics on stderr at the end
    uint32_t recall = 0;              // TCA_GGML_RECALL=r (experiment): HOLD, each decode step after the hold-decode
                                      // steps also attends, per KV head, the r held rows outside the fast tier that
                                      // its own query scores highest (exact scores over the hold tier)
    uint32_t recall_blocks = 0;       // TCA_GGML_RECALL_BLOCKS=kb (experiment): the same by blocks of recall_bs held
    uint32_t recall_bs = 16;          // rows (TCA_GGML_RECALL_BS), ranked by Quest's bound on per-block K summaries
                                      // (min/max a dimension, host layers only), the kb best blocks attended
    uint32_t recall_slots() const { return recall ? recall : recall_blocks * recall_bs; }
    bool refresh = false;             // TCA_GGML_REFRESH=1 (experiment): HOLD, after the hold-decode steps the
                                      // kept set is selected again from the hold tier by those steps' queries
};

// The aged frontier: blocks entirely more than `window` tokens behind the n_seen-th token are
// selected; returns the first position after them (a multiple of block).
inline uint32_t llama_tca_aged_frontier(uint32_t n_seen, uint32_t window, uint32_t block) {
    return (n_seen > window ? (n_seen - window) / block : 0) * block;
}

// Hand-over from tca_context_create to llama_model::create_memory (same thread).
void llama_tca_set_pending(const llama_tca_config * cfg);
const llama_tca_config * llama_tca_get_pending();

// Called by llama_model::create_memory for models on the plain llama_kv_cache path.
// Returns nullptr when no TCA was requested; throws std::runtime_error when it was but
// cannot be honoured (the context creation then fails with that message).
llama_memory_i * llama_tca_memory_create(const llama_model & model, const llama_memory_params & params,
                                         const llama_cparams & cparams);

class llama_tca_memory_context : public llama_memory_context_i {
public:
    explicit llama_tca_memory_context(llama_memory_status status);
    llama_tca_memory_context(llama_tca_memory * mem);  // full (graph reserve)
    llama_tca_memory_context(llama_tca_memory * mem, std::vector<llama_ubatch> ubatches);

    bool next() override;
    bool apply() override;
    const llama_ubatch & get_ubatch() const override;
    llama_memory_status get_status() const override;

    llama_tca_memory * memory() const { return mem; }
    bool full() const { return is_full; }  // the graph reserve's context (nothing placed)

private:
    llama_tca_memory * mem = nullptr;
    bool is_full = false;
    llama_memory_status status;
    std::vector<llama_ubatch> ubatches;
    size_t i_next = 0;
};

class llama_tca_memory : public llama_memory_i {
public:
    struct head_t {
        uint32_t off = 0, cap = 0, len = 0;
        // ascending positions of rows [0, len): a host mirror of kpos, refreshed on demand after a
        // device compaction (layer_t::pos_valid, ensure_pos)
        mutable std::vector<int32_t> pos;
        std::vector<float> p;      // budget over k_values
        float coverage = 1.0f;     // pooled q_last mass kept at the last compaction
        uint32_t n_evicted = 0;
    };
    struct layer_t {
        int32_t il = -1;
        uint32_t n_head = 0, n_head_kv = 0, d_k = 0, d_v = 0, cap_total = 0;
        float scale = 0.0f;        // kq_scale seen at graph build
        ggml_tensor * k = nullptr; // [d_k, cap_total] type_k
        ggml_tensor * v = nullptr; // [d_v, cap_total] type_v
        ggml_tensor * kpos = nullptr;   // [1, cap_total] f32: position of each row (exact integers)
        ggml_tensor * q_last = nullptr; // [d_k, n_head] f32: last query of the last ubatch
        ggml_tensor * bud = nullptr;    // [2*n_k+1, n_head_kv] f32: budgets for GGML_OP_TCA_SELECT
        std::vector<float> bud_host;    // its values (uploaded again after a clear of the buffers)
        ggml_backend_buffer_type_t buft = nullptr;
        bool host = true;          // buffers in host memory
        mutable bool pos_valid = true; // heads[].pos mirror kpos (false after a device compaction:
                                       // ensure_pos() reads them back when needed)
        // while !pos_valid: positions of the rows reserved since (ubatches not computed yet: their
        // kpos slots still hold what was there), heads[g] rows from tail_from[g] on
        mutable std::vector<int32_t> pos_tail;
        mutable std::vector<uint32_t> tail_from;
        std::vector<head_t> heads;
        // recall by blocks (config recall_blocks, host layers): per KV head g and block b of recall_bs
        // held rows, row g*n_blk + b = [min of each K dimension, max of each], f32; rows [0, n_sum)
        // of every head summarized (update_summaries)
        ggml_tensor * ksum = nullptr;
        mutable uint32_t n_sum = 0;
        std::vector<uint32_t> len_before; // per head, rows before the current ubatch
        std::vector<uint32_t> len_pending; // per head, rows before the ubatches since the last compaction
        // HOLD tier: every row of the sequence, head g's row of position p at g*n_ctx + p
        ggml_tensor * hk = nullptr;     // [d_k, n_head_kv*n_ctx] type_k
        ggml_tensor * hv = nullptr;     // [d_v, n_head_kv*n_ctx] type_v
        ggml_tensor * hkpos = nullptr;  // [1, n_head_kv*n_ctx] f32: g*n_ctx + p holds p (constant)
        ggml_tensor * q_obs = nullptr;  // [d_k, n_head, n_obs] f32: the last queries of a final ubatch
    };
    // per device (buffer type of device layers): the graph's per-layer inputs (new rows' positions,
    // head ranges, row indices), resident on the device and uploaded once per ubatch by the graph
    // input's set_input. As ordinary graph inputs they were copied by the scheduler one per layer,
    // each copy synchronising (3 per layer per token).
    struct io_t {
        ggml_tensor * pnew = nullptr;   // [1, rows_per_token * n_ubatch] f32
        ggml_tensor * idx  = nullptr;   // [rows_per_token * n_ubatch] i64
        ggml_tensor * meta = nullptr;   // [n_meta] i32
        ggml_tensor * hidx = nullptr;   // [rows_per_token * n_ubatch] i64: HOLD tier rows
        ggml_tensor * hmeta = nullptr;  // [n_meta] i32: HOLD tier head ranges
        int64_t n_meta = 0, rows_per_token = 0;
    };

    llama_tca_memory(const llama_model & model, const llama_tca_config & cfg, ggml_type type_k,
                     ggml_type type_v, uint32_t n_ctx, uint32_t n_ubatch, bool offload = false);

    ~llama_tca_memory() override;

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;
    bool get_can_shift() const override { return false; }

    void clear(bool data) override;
    bool seq_rm  (llama_seq_id seq_id, llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id) override;
    void seq_add (llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) override;
    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;
    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;
    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    // called by the memory context
    bool reserve_ubatch(const llama_ubatch & ub);   // before a ubatch's graph is built
    bool fits(const llama_ubatch & ub) const;        // TCA_GGML_LAZY: room for ub without compacting
    bool room(const llama_ubatch & ub) const;        // every head's fast tier has room for ub
    // the compaction that follows a computed ubatch runs lazily (before the next ubatch); the
    // memory context, state saves and the C API's statistics flush it first. prompt_continues:
    // the next ubatch has more than one token, so a prompt end marked by a token asking for logits
    // was not the end (llama-cli / llama-bench ask for the last token of every n_batch chunk): its
    // final selection is left to the real end and the chunk compacts as any prefill ubatch
    // defer_final: HOLD, a prompt's final selection waits (final_owed) while the steps after the
    // prompt attend the hold tier (they never read its result, the fast tier); prepare() decides
    void compact_pending(bool prompt_continues = false, bool defer_final = false);
    // before a ubatch (the memory contexts' apply): the previous ubatch's compaction, or its
    // deferral: the final selection runs before the first ubatch that reads the fast tier (a
    // prompt, a step past the hold-decode steps), when the fast tier has no room for the step,
    // or when flushed (statistics, state save, seq_rm)
    void prepare(const llama_ubatch & ub);
    bool is_final_owed() const { return final_owed; }

    // retained positions of one (layer, KV head), ascending (-1: no such head); fills at most n_max
    int64_t head_positions(int32_t il, uint32_t kv_head, int32_t * pos, int64_t n_max) const;

    // set by tca_context_create: the context's scheduler, synchronised before the retention
    // cache is read or moved outside its graphs
    void set_sched(ggml_backend_sched_t s) { sched = s; }
    // graph build: the kq_scale a layer's attention uses (the compactions score with it)
    void set_kq_scale(int32_t il, float s) { if (auto * L = layer_mut(il)) L->scale = s; }

    // ---- read-only views (graph hooks, statistics)
    const llama_tca_config & get_config() const { return cfg; }
    const std::vector<layer_t> & get_layers() const { return layers; }
    const layer_t * layer(int32_t il) const { auto it = map_il.find(il); return it == map_il.end() ? nullptr : &layers[it->second]; }
    size_t layer_index(int32_t il) const { return map_il.at(il); }  // in get_layers()
    const io_t * get_io(ggml_backend_buffer_type_t buft) const { auto it = io.find(buft); return it == io.end() ? nullptr : &it->second; }
    ggml_backend_sched_t get_sched() const { return sched; }
    uint32_t get_n_ctx() const { return n_ctx; }
    uint32_t get_n_seen() const { return n_seen; }   // tokens of the sequence held (positions 0 .. n_seen-1)
    uint32_t get_frontier() const { return frontier; }
    bool is_cur_final() const { return cur_final; }
    bool is_cur_hold_decode() const { return cur_hold_decode; }
    // recall by blocks: the K summaries of held rows [0, upto) of every host layer, brought up to date
    // from the hold tier (the graphs that wrote them have finished)
    void update_summaries(uint32_t upto) const;
    uint32_t get_n_blk() const { return cfg.recall_blocks ? n_ctx / cfg.recall_bs : 0; }
    // HOLD, refresh: the q_obs slot the hold-decode step being built writes its query to (-1: none)
    int32_t get_obs_slot() const { return cur_obs_slot; }
    uint64_t get_n_refresh() const { return n_refresh; }  // HOLD: a decode step that attends the hold tier  // HOLD: the ubatch being built is a prompt's last
    uint64_t get_bytes_dense() const { return bytes_dense; }
    uint64_t get_bytes_hold() const { return bytes_hold; }
    uint64_t get_n_compactions() const { return n_compactions; }
    uint64_t get_n_final() const { return n_final; }
    uint64_t get_n_final_lazy() const { return n_final_lazy; }
    uint32_t get_n_obs_last() const { return n_obs_last; }
    double get_t_compact_us() const { return t_compact_us; }
    // HOLD: decode steps since the last prompt end (what a state does not carry; a sequence copy does)
    uint32_t get_n_decode_after_final() const { return n_decode_after_final; }
    void set_n_decode_after_final(uint32_t n) { n_decode_after_final = n; }

private:
    layer_t * layer_mut(int32_t il) { auto it = map_il.find(il); return it == map_il.end() ? nullptr : &layers[it->second]; }
    void ensure_pos(const layer_t & L) const;  // heads[].pos from the device's kpos (after device compactions)
    void init_hold_pos(layer_t & L); // HOLD: hkpos[g*n_ctx + p] = p (constant; again after a buffer clear)
    // selection + compaction of the layers of one buffer type: one graph of TCA_SCORE / TCA_SELECT /
    // TCA_COMPACT nodes on that device (prefill: f0 < 0; decode rule: f0 = the old frontier)
    void compact_graph(const std::vector<layer_t *> & Ls, int64_t f0);
    // HOLD: the final selection of the layers of one buffer type, from the hold tier by the
    // observation window's pooled scores; the kept rows are gathered into the fast tier
    // n_end: the rows the selection scores and its frontier (the prompt's end: a deferred final
    // selection is the one it would have been then; rows after it stay, as the window's)
    void compact_final(const std::vector<layer_t *> & Ls, uint32_t n_end);
    ggml_backend_t backend_for(ggml_backend_buffer_type_t buft);

    const llama_tca_config cfg;
    const uint32_t n_ctx;
    const uint32_t n_ubatch;
    ggml_type type_k, type_v;
    std::vector<layer_t> layers;
    std::map<int32_t, size_t> map_il;
    uint32_t n_seen = 0;          // tokens of the sequence held (positions 0 .. n_seen-1)
    // HOLD: the ubatch being built/computed is a prompt's last (its last token asks for logits):
    // it attends the hold tier, and the compaction after it selects from the hold tier
    bool cur_final = false;
    bool cur_hold_decode = false;
    uint32_t n_decode_after_final = 0; // decode steps since the last prompt end
    int32_t cur_obs_slot = -1;    // refresh: the hold-decode step's q_obs slot
    bool pending_refresh = false; // refresh: the last hold-decode step ran; the selection follows it
    uint64_t n_refresh = 0;       // refresh selections made
    bool pending_final = false;   // a final ubatch ran since the last compaction
    bool final_owed = false;      // HOLD: a prompt ended; its final selection is deferred (prepare)
    uint32_t n_seen_final = 0;    // HOLD: n_seen at the last prompt end (the final ubatch's last row + 1)
    uint64_t n_final_lazy = 0;    // final selections that ran after their prompt's first step
    bool prev_prefill = false;    // the previous ubatch was a non-final multi-token ubatch
    uint32_t n_obs_valid = 0;     // queries in q_obs (min(n_obs, the final ubatch's tokens))
    uint64_t n_final = 0;         // final selections from the hold tier
    uint32_t n_obs_last = 0;      // observation queries of the last final selection
    uint64_t n_final_deferred = 0; // prompt ends followed by more of the prompt (no selection there)
    uint64_t bytes_hold = 0;      // hold tier allocation
    uint32_t frontier = 0;        // F: blocks before it have been selected
    bool pending = false;         // a ubatch ran since the last compaction
    bool pending_decode = false;  // ... and it was a single token
    int32_t pending_first_pos = -1; // first position of the ubatches since the last compaction
    uint64_t bytes_dense = 0;     // what upstream's cache would allocate for the same n_ctx
    uint64_t n_compactions = 0;
    double t_compact_us = 0.0;
    // device compactions (TCA_GGML_STATS): graph build + allocation + inputs, compute (the
    // selection and the moves, synchronised), read-back of the per-head results
    double t_dev_build_us = 0.0, t_dev_compute_us = 0.0, t_dev_read_us = 0.0;
    std::map<ggml_backend_buffer_type_t, io_t> io;
    ggml_backend_sched_t sched = nullptr;

    std::vector<ggml_context_ptr> ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;
    std::map<ggml_backend_buffer_type_t, ggml_backend_ptr> backends;  // compaction backends
    std::map<ggml_backend_buffer_type_t, ggml_gallocr_ptr> gallocs;
};
