// tca_ggml — many sequences in one TCA context (see llama-tca-seqs.h).
#include "llama-tca-seqs.h"

#include "llama-batch.h"
#include "llama-impl.h"
#include "llama-io.h"

#include "ggml-backend.h"

#include <cstring>
#include <limits>
#include <stdexcept>

llama_tca_memory_seqs::llama_tca_memory_seqs(std::vector<std::unique_ptr<llama_tca_memory>> s) : seqs(std::move(s)) {
    GGML_ASSERT(!seqs.empty());
}

llama_ubatch llama_tca_sub_ubatch(const llama_ubatch & ub, uint32_t tok0, uint32_t n) {
    GGML_ASSERT(tok0 + n <= ub.n_tokens);
    llama_ubatch s = ub;
    s.n_tokens = n;
    s.n_seq_tokens = n;
    s.n_seqs = 1;
    s.n_seqs_unq = 1;
    if (s.token) s.token += tok0;
    s.embd = nullptr;  // the memory never reads embeddings
    if (s.pos) s.pos += tok0;       // the first n_tokens entries: the sequential positions
    if (s.n_seq_id) s.n_seq_id += tok0;
    if (s.seq_id) s.seq_id += tok0;
    if (s.output) s.output += tok0;
    return s;
}

std::vector<llama_tca_stream> llama_tca_streams(const llama_tca_memory_seqs_context & ctx, const llama_ubatch & ub) {
    std::vector<llama_tca_stream> out;
    llama_tca_memory_seqs * m = ctx.memory();
    if (!m || ub.n_seqs == 0 || ub.n_seq_tokens == 0 || ub.n_seq_tokens * ub.n_seqs != ub.n_tokens) return out;
    for (uint32_t i = 0; i < ub.n_seqs; ++i) {
        llama_tca_stream s;
        s.tok0 = i * ub.n_seq_tokens;
        s.n_tok = ub.n_seq_tokens;
        if (ctx.full() || !ub.seq_id || !ub.seq_id[s.tok0]) {
            s.mem = m->seq((llama_seq_id) (i % m->n_seq()));  // graph reserve: no sequence ids
        } else {
            s.mem = m->seq(ub.seq_id[s.tok0][0]);
        }
        if (!s.mem) return {};
        out.push_back(s);
    }
    return out;
}

std::vector<llama_tca_memory *> llama_tca_memories(llama_memory_i * m) {
    if (auto * one = dynamic_cast<llama_tca_memory *>(m)) return { one };
    std::vector<llama_tca_memory *> out;
    if (auto * ms = dynamic_cast<llama_tca_memory_seqs *>(m)) {
        for (uint32_t s = 0; s < ms->n_seq(); ++s) out.push_back(ms->seq((llama_seq_id) s));
    }
    return out;
}

llama_memory_context_ptr llama_tca_memory_seqs::init_batch(llama_batch_allocr & balloc, uint32_t n_ub, bool embd_all) {
    GGML_UNUSED(embd_all);
    auto fail = [] { return std::make_unique<llama_tca_memory_seqs_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE); };
    balloc.split_reset();
    std::vector<uint32_t> next(seqs.size());
    for (size_t s = 0; s < seqs.size(); ++s) next[s] = seqs[s]->get_n_seen();
    std::vector<llama_ubatch> ubatches;
    while (true) {
        auto ub = balloc.split_equal(n_ub, false, 0);
        if (ub.n_tokens == 0) break;
        if (ub.n_seq_tokens * ub.n_seqs != ub.n_tokens) return fail();
        for (uint32_t i = 0; i < ub.n_seqs; ++i) {
            const uint32_t tok0 = i * ub.n_seq_tokens;
            const llama_seq_id s = ub.seq_id[tok0][0];
            for (uint32_t t = tok0; t < tok0 + ub.n_seq_tokens; ++t) {
                if (ub.n_seq_id[t] != 1 || ub.seq_id[t][0] != s) {
                    LLAMA_LOG_ERROR("%s: TCA: a token shared by several sequences is not supported\n", __func__);
                    return fail();
                }
                if (s < 0 || (size_t) s >= seqs.size()) {
                    LLAMA_LOG_ERROR("%s: TCA: sequence %d out of range (n_seq_max = %zu)\n", __func__, s, seqs.size());
                    return fail();
                }
                if ((uint32_t) ub.pos[t] != next[(size_t) s]) {
                    LLAMA_LOG_ERROR("%s: TCA: tokens of sequence %d must be appended in order (got position %d, "
                                    "expected %u); use seq_rm to truncate first\n", __func__, s, ub.pos[t], next[(size_t) s]);
                    return fail();
                }
                ++next[(size_t) s];
            }
        }
        ubatches.push_back(std::move(ub));
    }
    if (balloc.get_n_used() < balloc.get_n_tokens()) return fail();
    for (size_t s = 0; s < seqs.size(); ++s) {
        if (next[s] > seqs[s]->get_n_ctx()) {
            LLAMA_LOG_ERROR("%s: TCA: sequence %zu: %u tokens exceed its context of %u (n_ctx / n_seq_max)\n", __func__,
                            s, next[s], seqs[s]->get_n_ctx());
            return fail();
        }
    }
    return std::make_unique<llama_tca_memory_seqs_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_tca_memory_seqs::init_full() {
    return std::make_unique<llama_tca_memory_seqs_context>(this);
}

llama_memory_context_ptr llama_tca_memory_seqs::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(lctx);
    GGML_UNUSED(optimize);
    return std::make_unique<llama_tca_memory_seqs_context>(LLAMA_MEMORY_STATUS_NO_UPDATE);
}

void llama_tca_memory_seqs::clear(bool data) {
    for (auto & s : seqs) s->clear(data);
}

bool llama_tca_memory_seqs::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (seq_id < 0) {
        bool ok = true;
        for (auto & s : seqs) ok = s->seq_rm(0, p0, p1) && ok;
        return ok;
    }
    llama_tca_memory * m = seq(seq_id);
    return m ? m->seq_rm(0, p0, p1) : false;
}

namespace {
// a sequence's state in host memory (seq_cp: the state of one sequence written, then read into another)
struct tca_io_buf_write : llama_io_write_i {
    std::vector<uint8_t> buf;
    void write(const void * src, size_t size) override {
        const auto * p = (const uint8_t *) src;
        buf.insert(buf.end(), p, p + size);
    }
    void write_tensor(ggml_tensor * t, size_t offset, size_t size) override {
        const size_t o = buf.size();
        buf.resize(o + size);
        ggml_backend_tensor_get(t, buf.data() + o, offset, size);
    }
    size_t n_bytes() override { return buf.size(); }
};
struct tca_io_buf_read : llama_io_read_i {
    const std::vector<uint8_t> & buf;
    size_t at = 0;
    explicit tca_io_buf_read(const std::vector<uint8_t> & b) : buf(b) {}
    void read(void * dst, size_t size) override {
        if (at + size > buf.size()) throw std::runtime_error("TCA: sequence state truncated");
        memcpy(dst, buf.data() + at, size);
        at += size;
    }
    void read_tensor(ggml_tensor * t, size_t offset, size_t size) override {
        if (at + size > buf.size()) throw std::runtime_error("TCA: sequence state truncated");
        ggml_backend_tensor_set(t, buf.data() + at, offset, size);
        at += size;
    }
    size_t n_bytes() override { return at; }
};
}  // namespace

void llama_tca_memory_seqs::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    llama_tca_memory * a = seq(src), * b = seq(dst);
    if (!a || !b) {
        LLAMA_LOG_ERROR("%s: TCA: sequence copy %d -> %d: no such sequence\n", __func__, src, dst);
        return;
    }
    if (a == b) return;
    const llama_pos n = a->seq_pos_max(0) + 1;
    if (p0 > 0 || (p1 >= 0 && p1 < n)) {
        // a retained set is a selection over the whole sequence: a part of it is not a sequence
        LLAMA_LOG_ERROR("%s: TCA: only whole sequences are copied (asked [%d, %d) of %d tokens)\n", __func__, p0, p1, n);
        return;
    }
    try {
        tca_io_buf_write w;
        a->state_write(w, 0);
        tca_io_buf_read r(w.buf);
        b->state_read(r, 0);
        b->set_n_decode_after_final(a->get_n_decode_after_final());  // the copy is at the same step
    } catch (const std::exception & e) {  // seq_cp is called through the C API: no exception may leave it
        LLAMA_LOG_ERROR("%s: TCA: sequence copy %d -> %d failed: %s\n", __func__, src, dst, e.what());
        b->clear(false);
    }
}

void llama_tca_memory_seqs::seq_keep(llama_seq_id seq_id) {
    for (size_t s = 0; s < seqs.size(); ++s) {
        if ((llama_seq_id) s != seq_id) seqs[s]->clear(false);
    }
}

void llama_tca_memory_seqs::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    for (size_t s = 0; s < seqs.size(); ++s) {
        if (seq_id < 0 || (size_t) seq_id == s) seqs[s]->seq_add(0, p0, p1, shift);  // logs: not supported
    }
}

void llama_tca_memory_seqs::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    for (size_t s = 0; s < seqs.size(); ++s) {
        if (seq_id < 0 || (size_t) seq_id == s) seqs[s]->seq_div(0, p0, p1, d);
    }
}

llama_pos llama_tca_memory_seqs::seq_pos_min(llama_seq_id seq_id) const {
    const llama_tca_memory * m = seq(seq_id);
    return m ? m->seq_pos_min(0) : -1;
}

llama_pos llama_tca_memory_seqs::seq_pos_max(llama_seq_id seq_id) const {
    const llama_tca_memory * m = seq(seq_id);
    return m ? m->seq_pos_max(0) : -1;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_tca_memory_seqs::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> ret;
    for (const auto & s : seqs) {
        for (const auto & kv : s->memory_breakdown()) ret[kv.first] += kv.second;
    }
    return ret;
}

static const uint32_t TCA_SEQS_STATE_MAGIC = 0x53414354; // "TCAS": the sequence count, then each sequence

void llama_tca_memory_seqs::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    if (seq_id >= 0) {
        const llama_tca_memory * m = seq(seq_id);
        if (!m) throw std::runtime_error("TCA: no sequence " + std::to_string(seq_id));
        m->state_write(io, 0, flags);
        return;
    }
    const uint32_t magic = TCA_SEQS_STATE_MAGIC, n = (uint32_t) seqs.size();
    io.write(&magic, sizeof(magic));
    io.write(&n, sizeof(n));
    for (const auto & s : seqs) s->state_write(io, 0, flags);
}

void llama_tca_memory_seqs::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    if (seq_id >= 0) {
        llama_tca_memory * m = seq(seq_id);
        if (!m) throw std::runtime_error("TCA: no sequence " + std::to_string(seq_id));
        m->state_read(io, 0, flags);
        return;
    }
    uint32_t magic = 0, n = 0;
    io.read(&magic, sizeof(magic));
    if (magic != TCA_SEQS_STATE_MAGIC) {
        throw std::runtime_error("TCA: state was not written by a TCA context of " + std::to_string(seqs.size()) +
                                 " sequences");
    }
    io.read(&n, sizeof(n));
    if (n != seqs.size()) {
        throw std::runtime_error("TCA: state holds " + std::to_string(n) + " sequences, this context " +
                                 std::to_string(seqs.size()));
    }
    for (auto & s : seqs) s->state_read(io, 0, flags);
}

// ------------------------------------------------------------------------ memory context
llama_tca_memory_seqs_context::llama_tca_memory_seqs_context(llama_memory_status s) : status(s) {}
llama_tca_memory_seqs_context::llama_tca_memory_seqs_context(llama_tca_memory_seqs * m)
    : mem(m), is_full(true), status(LLAMA_MEMORY_STATUS_SUCCESS) {}
llama_tca_memory_seqs_context::llama_tca_memory_seqs_context(llama_tca_memory_seqs * m, std::vector<llama_ubatch> ubs)
    : mem(m), status(LLAMA_MEMORY_STATUS_SUCCESS), ubatches(std::move(ubs)) {}

bool llama_tca_memory_seqs_context::next() {
    return ++i_next < ubatches.size();
}

bool llama_tca_memory_seqs_context::apply() {
    if (is_full || !mem) return true;
    const llama_ubatch & ub = ubatches[i_next];
    // as llama_tca_memory_context::apply, a stream at a time: each sequence's pending compaction
    // (its previous ubatch has been computed by now), then its rows placed. A failure leaves the
    // streams placed so far to llama_decode's cleanup (seq_rm of the batch's positions).
    try {
        const auto streams = llama_tca_streams(*this, ub);
        if (streams.empty()) return false;
        for (const auto & s : streams) {
            const llama_ubatch sub = llama_tca_sub_ubatch(ub, s.tok0, s.n_tok);
            s.mem->prepare(sub);
            if (!s.mem->reserve_ubatch(sub)) return false;
        }
        return true;
    } catch (const std::exception & e) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, e.what());
        return false;
    }
}

const llama_ubatch & llama_tca_memory_seqs_context::get_ubatch() const {
    GGML_ASSERT(!ubatches.empty());
    return ubatches[i_next];
}

llama_memory_status llama_tca_memory_seqs_context::get_status() const { return status; }
