// tca_ggml — many sequences in one TCA context (n_seq_max > 1; issue 16).
//
// llama_tca_memory_seqs is a llama_memory_i over one retention memory per sequence
// (llama_tca_memory, each sized for n_ctx_seq = n_ctx / n_seq_max, as upstream's KV cache with
// kv_unified = false). A batch is cut by llama_batch_allocr::split_equal: each sequence of a ubatch
// is one contiguous run of n_seq_tokens tokens (a "stream"). Each stream is placed, attended and
// compacted by its own sequence's memory -- the per-sequence policy (prompt end, final selection,
// hold decode, decode rule) runs unchanged -- while all streams of a ubatch are computed in one graph:
// per layer one GGML_OP_TCA_ATTN node a stream over its sequence's rows, concatenated
// (llama-tca-graph.cpp). A sequence that is removed (seq_rm, seq_keep) frees its rows for the next.
#pragma once

#include "llama-tca-memory.h"

#include <memory>
#include <vector>

class llama_tca_memory_seqs : public llama_memory_i {
public:
    explicit llama_tca_memory_seqs(std::vector<std::unique_ptr<llama_tca_memory>> seqs);

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

    uint32_t n_seq() const { return (uint32_t) seqs.size(); }
    llama_tca_memory * seq(llama_seq_id s) const {
        return (s >= 0 && (size_t) s < seqs.size()) ? seqs[(size_t) s].get() : nullptr;
    }

private:
    std::vector<std::unique_ptr<llama_tca_memory>> seqs;
};

// A stream of a ubatch: tokens [tok0, tok0 + n_tok) of one sequence, placed in `mem`
struct llama_tca_stream {
    llama_tca_memory * mem = nullptr;
    uint32_t tok0 = 0, n_tok = 0;
};

class llama_tca_memory_seqs_context : public llama_memory_context_i {
public:
    explicit llama_tca_memory_seqs_context(llama_memory_status status);
    explicit llama_tca_memory_seqs_context(llama_tca_memory_seqs * mem);  // full (graph reserve)
    llama_tca_memory_seqs_context(llama_tca_memory_seqs * mem, std::vector<llama_ubatch> ubatches);

    bool next() override;
    bool apply() override;
    const llama_ubatch & get_ubatch() const override;
    llama_memory_status get_status() const override;

    llama_tca_memory_seqs * memory() const { return mem; }
    bool full() const { return is_full; }

private:
    llama_tca_memory_seqs * mem = nullptr;
    bool is_full = false;
    llama_memory_status status;
    std::vector<llama_ubatch> ubatches;
    size_t i_next = 0;
};

// The streams of a ubatch under a memory context of the seqs memory (graph reserve: stream i is
// sequence i mod n_seq); empty when the ubatch is not cut as split_equal cuts it.
std::vector<llama_tca_stream> llama_tca_streams(const llama_tca_memory_seqs_context & ctx, const llama_ubatch & ub);

// Tokens [tok0, tok0 + n) of a ubatch as a ubatch of its own (pointers into the same data)
llama_ubatch llama_tca_sub_ubatch(const llama_ubatch & ub, uint32_t tok0, uint32_t n);

// Each sequence's retention memory of a context's memory: one for llama_tca_memory, n_seq_max for
// llama_tca_memory_seqs, none for any other memory.
std::vector<llama_tca_memory *> llama_tca_memories(llama_memory_i * m);
