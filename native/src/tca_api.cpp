// tca_ggml — project C API (see native/include/tca_ggml.h).
#include "tca_ggml.h"

#include "llama.h"
#include "ggml.h"
#include "ggml-cpu.h"
#include "ggml-backend.h"
#include "gguf.h"
#include "llama-ext.h"
#include "llama-impl.h"
#include "tca_guard.h"

#ifdef TCA_GGML_RPC
#include "ggml-rpc.h"
#endif

#include <sys/stat.h>

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#ifndef TCA_GGML_VERSION
#define TCA_GGML_VERSION "0.1.0"
#endif

// (these two return string literals: nothing to throw)
extern "C" const char * tca_version(void) { return TCA_GGML_VERSION; }
extern "C" const char * tca_upstream_version(void) { return "llama-cpp-python 0.3.36 / llama.cpp b11312 (0c1e57098)"; }

#define TCA_LAYOUT(S, F)                                   \
    if (field && strcmp(field, #F) == 0) return (int64_t) offsetof(S, F);

static int64_t tca_abi_layout_impl(const char * name, const char * field) {
    if (!name) return -1;
    if (strcmp(name, "llama_model_params") == 0) {
        using S = llama_model_params;
        if (!field) return sizeof(S);
        TCA_LAYOUT(S, n_gpu_layers) TCA_LAYOUT(S, progress_callback) TCA_LAYOUT(S, kv_overrides)
        TCA_LAYOUT(S, vocab_only) TCA_LAYOUT(S, load_mtp) TCA_LAYOUT(S, main_gpu)
        return -1;
    }
    if (strcmp(name, "llama_context_params") == 0) {
        using S = llama_context_params;
        if (!field) return sizeof(S);
        TCA_LAYOUT(S, n_ctx) TCA_LAYOUT(S, n_threads_batch) TCA_LAYOUT(S, flash_attn_type)
        TCA_LAYOUT(S, rope_freq_base) TCA_LAYOUT(S, cb_eval) TCA_LAYOUT(S, type_k) TCA_LAYOUT(S, type_v)
        TCA_LAYOUT(S, abort_callback) TCA_LAYOUT(S, embeddings) TCA_LAYOUT(S, kv_unified)
        TCA_LAYOUT(S, samplers) TCA_LAYOUT(S, ctx_other)
        return -1;
    }
    if (strcmp(name, "llama_batch") == 0) {
        using S = llama_batch;
        if (!field) return sizeof(S);
        TCA_LAYOUT(S, token) TCA_LAYOUT(S, logits)
        return -1;
    }
    if (strcmp(name, "llama_chat_message") == 0) { if (!field) return sizeof(llama_chat_message); return -1; }
    if (strcmp(name, "llama_sampler_chain_params") == 0) { if (!field) return sizeof(llama_sampler_chain_params); return -1; }
    if (strcmp(name, "llama_token_data") == 0) { if (!field) return sizeof(llama_token_data); return -1; }
    // the project's own structs: the bindings read their declarations from tca_ggml.h, so a
    // size mismatch means that header is not the one this library was built with
    if (strcmp(name, "tca_config") == 0) { if (!field) return sizeof(tca_config); return -1; }
    if (strcmp(name, "tca_stats") == 0) { if (!field) return sizeof(tca_stats); return -1; }
    if (strcmp(name, "tca_budgets") == 0) { if (!field) return sizeof(tca_budgets); return -1; }
    if (strcmp(name, "tca_rpc_stats") == 0) { if (!field) return sizeof(tca_rpc_stats); return -1; }
    return -1;
}

static void set_err(char * err, size_t n, const std::string & msg) {
    if (!err || n == 0) return;
    snprintf(err, n, "%s", msg.c_str());
}

void tca_report_exception(const char * fn, const char * what, char * err, size_t err_len) noexcept {
    if (!what) what = "(no message)";
    LLAMA_LOG_ERROR("%s: %s\n", fn, what);
    if (err && err_len) snprintf(err, err_len, "%s: %s", fn, what);
}

namespace {
// An integer KV of any integer type (GGUF writers differ: u32, i32, u64 ...); false when absent or
// not an integer.
bool kv_int(const gguf_context * g, const std::string & key, long double & v) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return false;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8:  v = gguf_get_val_u8(g, id);  return true;
        case GGUF_TYPE_INT8:   v = gguf_get_val_i8(g, id);  return true;
        case GGUF_TYPE_UINT16: v = gguf_get_val_u16(g, id); return true;
        case GGUF_TYPE_INT16:  v = gguf_get_val_i16(g, id); return true;
        case GGUF_TYPE_UINT32: v = gguf_get_val_u32(g, id); return true;
        case GGUF_TYPE_INT32:  v = gguf_get_val_i32(g, id); return true;
        case GGUF_TYPE_UINT64: v = gguf_get_val_u64(g, id); return true;
        case GGUF_TYPE_INT64:  v = gguf_get_val_i64(g, id); return true;
        default: return false;
    }
}

bool kv_float(const gguf_context * g, const std::string & key, double & v) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return false;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: v = gguf_get_val_f32(g, id); return true;
        case GGUF_TYPE_FLOAT64: v = gguf_get_val_f64(g, id); return true;
        default: return false;
    }
}

// The values upstream asserts on (GGML_ASSERT aborts the process) or computes garbage from,
// checked before llama_model_load sees the file. Returns an empty string when sane.
std::string check_model_metadata(const gguf_context * g) {
    const int64_t aid = gguf_find_key(g, "general.architecture");
    if (aid < 0 || gguf_get_kv_type(g, aid) != GGUF_TYPE_STRING) return "";  // upstream reports it
    const std::string arch = gguf_get_val_str(g, aid);
    long double n = 0;
    // llama_model_load: GGML_ASSERT(n_layer_all > 0 && n_layer_all <= LLAMA_MAX_LAYERS (512))
    const std::string kbc = arch + ".block_count";
    if (kv_int(g, kbc, n) && (n < 1 || n > 512))
        return kbc + ": " + std::to_string((long long) n) + " layers, must be in [1, 512]";
    // the attention heads size the K/V cache (n_head_kv x head size a row) before any tensor is read:
    // a head_count_kv of 2^29 asked for ~21 GB before failing (fuzzing, session 15). A model has at
    // most as many KV heads as heads and at most as many heads as embedding dimensions.
    long double n_embd = 0, n_head = 0, n_head_kv = 0;
    const std::string kne = arch + ".embedding_length", knh = arch + ".attention.head_count",
                      knk = arch + ".attention.head_count_kv";
    const bool has_embd = kv_int(g, kne, n_embd), has_head = kv_int(g, knh, n_head), has_kv = kv_int(g, knk, n_head_kv);
    if (has_embd && (n_embd < 0 || n_embd > (1 << 20)))
        return kne + ": " + std::to_string((long long) n_embd) + ", must be in [0, 1048576]";
    if (has_head && (n_head < 0 || (has_embd && n_head > std::max<long double>(n_embd, 1))))
        return knh + ": " + std::to_string((long long) n_head) + ", must be in [0, " + kne + "]";
    if (has_kv && (n_head_kv < 0 || (has_head && n_head_kv > n_head) || (has_embd && n_head_kv > std::max<long double>(n_embd, 1))))
        return knk + ": " + std::to_string((long long) n_head_kv) + ", must be in [0, " + knh + "]";
    // ggml_rms_norm / ggml_norm: GGML_ASSERT(eps >= 0.0f) at the first decode
    for (const char * suffix : { ".attention.layer_norm_rms_epsilon", ".attention.layer_norm_epsilon" }) {
        double v = 0;
        const std::string k = arch + suffix;
        if (kv_float(g, k, v) && !(std::isfinite(v) && v >= 0))
            return k + ": must be finite and >= 0, got " + std::to_string(v);
    }
    // a NaN, infinite or non-positive RoPE base makes every logit NaN
    for (const char * suffix : { ".rope.freq_base", ".rope.freq_base_swa" }) {
        double v = 0;
        const std::string k = arch + suffix;
        if (kv_float(g, k, v) && !(std::isfinite(v) && v > 0))
            return k + ": must be finite and > 0, got " + std::to_string(v);
    }
    // llama_vocab::load: GGML_ASSERT(id_to_token.size() == token_to_id.size()): every token string
    // must be unique (linear: one hash set over the vocabulary)
    const int64_t tid = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (tid >= 0 && gguf_get_kv_type(g, tid) == GGUF_TYPE_ARRAY && gguf_get_arr_type(g, tid) == GGUF_TYPE_STRING) {
        const size_t nt = gguf_get_arr_n(g, tid);
        std::unordered_map<std::string_view, size_t> seen;
        seen.reserve(nt);
        for (size_t i = 0; i < nt; ++i) {
            const char * s = gguf_get_arr_str(g, tid, i);
            auto r = seen.emplace(std::string_view(s), i);
            if (!r.second)
                return "tokenizer.ggml.tokens: token " + std::to_string(i) + " duplicates token " +
                       std::to_string(r.first->second) + " (every token string must be unique)";
        }
    }
    return "";
}
}  // namespace

static int gguf_check(const char * path, char * err, size_t err_len) {
    if (!path) { set_err(err, err_len, "path is NULL"); return 1; }
    // a FIFO, a directory or a device never reaches fopen (a FIFO would block it forever)
    struct stat st;
    if (stat(path, &st) != 0) { set_err(err, err_len, std::string("cannot open file: ") + strerror(errno)); return 2; }
    if (!S_ISREG(st.st_mode)) { set_err(err, err_len, "not a regular file (a model must be a .gguf file)"); return 2; }
    FILE * f = fopen(path, "rb");
    if (!f) { set_err(err, err_len, std::string("cannot open file: ") + strerror(errno)); return 2; }
    char magic[4] = {0};
    size_t got = fread(magic, 1, 4, f);
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); set_err(err, err_len, "cannot seek"); return 2; }
    long long fsize = ftell(f);
    fclose(f);
    if (got != 4 || memcmp(magic, "GGUF", 4) != 0) {
        set_err(err, err_len, "not a GGUF file (bad magic)");
        return 3;
    }
    gguf_init_params p = { /*no_alloc*/ true, /*ctx*/ nullptr };
    gguf_context * g = gguf_init_from_file(path, p);
    if (!g) { set_err(err, err_len, "corrupt GGUF header (key/value or tensor-info section unreadable)"); return 4; }
    std::unique_ptr<gguf_context, void (*)(gguf_context *)> guard(g, gguf_free);
    // the end of the data: max(offset + size) over the tensor infos, in one pass (linear: no
    // per-name lookup)
    const size_t data_off = gguf_get_data_offset(g);
    const int64_t nt = gguf_get_n_tensors(g);
    long long need = (long long) data_off;
    for (int64_t i = 0; i < nt; ++i) {
        const long long end = (long long) data_off + (long long) gguf_get_tensor_offset(g, i) + (long long) gguf_get_tensor_size(g, i);
        if (end > need) need = end;
    }
    if (need > fsize) {
        set_err(err, err_len, "truncated GGUF: tensor data needs " + std::to_string(need) +
                " bytes, file has " + std::to_string(fsize));
        return 5;
    }
    const std::string bad = check_model_metadata(g);
    if (!bad.empty()) { set_err(err, err_len, "invalid model metadata: " + bad); return 6; }
    return 0;
}

extern "C" int tca_gguf_check(const char * path, char * err, size_t err_len) {
    return tca_guard(__func__, 7, err, err_len, [&] { return gguf_check(path, err, err_len); });
}

extern "C" int32_t tca_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len, int32_t * tokens,
                                int32_t n_tokens_max, int add_special, int parse_special, char * err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    return tca_guard(__func__, INT32_MIN, err, err_len, [&] {
        return llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special != 0, parse_special != 0);
    });
}

extern "C" int32_t tca_decode(llama_context * ctx, const llama_batch * batch, char * err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!ctx || !batch) { set_err(err, err_len, "context or batch is NULL"); return -1; }
#ifdef TCA_GGML_RPC
    // a connection to an rpc-server that fails during the call (patch 0006: counted, not aborted)
    ggml_backend_rpc_stats s0, s1;
    ggml_backend_rpc_get_stats(nullptr, &s0);
    const int32_t rc = tca_guard(__func__, INT32_MIN, err, err_len, [&] {
        const int32_t r = llama_decode(ctx, *batch);
        if (s0.n_cmds > 0) {
            // RPC in use: the outputs' read-back is queued, and a connection lost there would show
            // only as zeroed logits read later (llama_get_logits_ith synchronizes): wait here
            llama_synchronize(ctx);
        }
        return r;
    });
    ggml_backend_rpc_get_stats(nullptr, &s1);
    if (s1.n_failures > s0.n_failures) {
        set_err(err, err_len, "the connection to an rpc-server was lost during llama_decode (the server was killed "
                              "or its host is unreachable): this context's state is lost");
        return TCA_DECODE_RPC_LOST;
    }
    return rc;
#else
    return tca_guard(__func__, INT32_MIN, err, err_len, [&] { return llama_decode(ctx, *batch); });
#endif
}

extern "C" int tca_rpc_available(void) {
#ifdef TCA_GGML_RPC
    return 1;
#else
    return 0;
#endif
}

extern "C" int32_t tca_rpc_add_server(const char * endpoint, void ** devs, int32_t max_devs, char * err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    return tca_guard(__func__, (int32_t) -1, err, err_len, [&]() -> int32_t {
#ifdef TCA_GGML_RPC
        const std::string ep = endpoint ? endpoint : "";
        const size_t colon = ep.rfind(':');
        bool ok = colon != std::string::npos && colon > 0 && colon + 1 < ep.size() && colon + 6 >= ep.size() &&
                  ep.find(':') == colon && ep.find_first_of(" ,\t\n") == std::string::npos;
        long port = 0;
        for (size_t i = colon + 1; ok && i < ep.size(); ++i) {
            ok = ep[i] >= '0' && ep[i] <= '9';
            port = port * 10 + (ep[i] - '0');
        }
        if (!ok || port < 1 || port > 65535) {
            set_err(err, err_len, "RPC endpoint '" + ep + "' is not host:port (IPv4 address or host name, port 1..65535)");
            return -1;
        }
        // a probe first: ggml_backend_rpc_add_server remembers an endpoint once added, so only a
        // fresh command tells whether the server is there now
        ggml_backend_rpc_stats s0, s1;
        ggml_backend_rpc_get_stats(ep.c_str(), &s0);
        size_t free_mem = 0, total_mem = 0;
        ggml_backend_rpc_get_device_memory(ep.c_str(), 0, &free_mem, &total_mem);
        ggml_backend_reg_t reg = nullptr;
        ggml_backend_rpc_get_stats(ep.c_str(), &s1);
        if (s1.n_failures == s0.n_failures) {
            reg = ggml_backend_rpc_add_server(ep.c_str());
            ggml_backend_rpc_get_stats(ep.c_str(), &s1);
        }
        if (!reg || s1.n_failures > s0.n_failures) {
            set_err(err, err_len, "cannot reach an rpc-server at " + ep + " (refused, timed out or another "
                                  "protocol version; start one with `python -m tca_ggml.rpc_server`)");
            return -1;
        }
        const size_t n = ggml_backend_reg_dev_count(reg);
        for (size_t i = 0; i < n && devs && (int64_t) i < (int64_t) max_devs; ++i) {
            devs[i] = ggml_backend_reg_dev_get(reg, i);
        }
        return (int32_t) n;
#else
        (void) endpoint; (void) devs; (void) max_devs;
        set_err(err, err_len, "this libtca_ggml was built without RPC (-DTCA_GGML_RPC=OFF)");
        return -1;
#endif
    });
}

extern "C" int tca_rpc_get_stats(const char * endpoint, struct tca_rpc_stats * out) {
    if (!out) return -1;
    memset(out, 0, sizeof(*out));
#ifdef TCA_GGML_RPC
    ggml_backend_rpc_stats s;
    ggml_backend_rpc_get_stats(endpoint, &s);
    out->n_cmds = s.n_cmds;
    out->n_round_trips = s.n_round_trips;
    out->bytes_sent = s.bytes_sent;
    out->bytes_recv = s.bytes_recv;
    out->n_failures = s.n_failures;
    return 0;
#else
    (void) endpoint;
    return -1;
#endif
}

extern "C" int32_t tca_token_to_piece(const llama_vocab * vocab, int32_t token, char * buf, int32_t length, int32_t lstrip,
                                      int special, char * err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    return tca_guard(__func__, INT32_MIN, err, err_len, [&] {
        return llama_token_to_piece(vocab, token, buf, length, lstrip, special != 0);
    });
}

static double tca_selftest_matmul_impl(int type, int n, int k, int m, int n_threads) {
    if (n <= 0 || k <= 0 || m <= 0 || k % 256 != 0) return -1.0;
    const ggml_type wt = (ggml_type) type;
    if (wt != GGML_TYPE_F32 && wt != GGML_TYPE_F16 && wt != GGML_TYPE_Q8_0 && wt != GGML_TYPE_Q4_K) return -1.0;
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    std::vector<float> W((size_t) n * k), X((size_t) k * m);
    for (auto & v : W) v = U(rng);
    for (auto & v : X) v = U(rng);

    ggml_init_params ip = { 64 * 1024 * 1024 + (size_t) (n * k + k * m + n * m) * 8, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) return -2.0;
    ggml_tensor * w = ggml_new_tensor_2d(ctx, wt, k, n);
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, m);
    memcpy(x->data, X.data(), X.size() * sizeof(float));
    // quantize W into w, then dequantize back for the reference
    std::vector<float> Wd((size_t) n * k);
    if (wt == GGML_TYPE_F32) {
        memcpy(w->data, W.data(), W.size() * sizeof(float));
        Wd = W;
    } else {
        ggml_quantize_chunk(wt, W.data(), w->data, 0, n, k, nullptr);
        const ggml_type_traits * tr = ggml_get_type_traits(wt);
        for (int r = 0; r < n; ++r) {
            tr->to_float((const char *) w->data + r * w->nb[1], Wd.data() + (size_t) r * k, k);
        }
    }
    ggml_tensor * y = ggml_mul_mat(ctx, w, x);  // [n, m]
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, y);
    ggml_backend_t be = ggml_backend_cpu_init();
    if (!be) { ggml_free(ctx); return -3.0; }
    ggml_backend_cpu_set_n_threads(be, n_threads > 0 ? n_threads : 1);
    ggml_status st = ggml_backend_graph_compute(be, gf);
    ggml_backend_free(be);
    if (st != GGML_STATUS_SUCCESS) { ggml_free(ctx); return -4.0; }
    double max_err = 0.0;
    for (int j = 0; j < m; ++j) {
        for (int i = 0; i < n; ++i) {
            double ref = 0.0;
            for (int l = 0; l < k; ++l) ref += (double) Wd[(size_t) i * k + l] * X[(size_t) j * k + l];
            double got = ((const float *) y->data)[(size_t) j * n + i];
            max_err = std::max(max_err, std::fabs(got - ref));
        }
    }
    ggml_free(ctx);
    return max_err;
}

static void tca_context_memory_impl(const llama_context * ctx, uint64_t * model, uint64_t * context, uint64_t * compute) {
    uint64_t m = 0, c = 0, k = 0;
    if (ctx) {
        for (const auto & kv : llama_get_memory_breakdown(ctx)) {
            m += kv.second.model; c += kv.second.context; k += kv.second.compute;
        }
    }
    if (model) *model = m;
    if (context) *context = c;
    if (compute) *compute = k;
}

static int tca_tensor_meta_impl(const ggml_tensor * t, char * name, size_t name_len, int64_t * ne4, int32_t * type) {
    if (!t) return -1;
    if (name && name_len) snprintf(name, name_len, "%s", t->name);
    if (ne4) for (int i = 0; i < 4; ++i) ne4[i] = t->ne[i];
    if (type) *type = (int32_t) t->type;
    return 0;
}

static int tca_tensor_get_f32_impl(const ggml_tensor * t, float * dst, int64_t n) {
    if (!t || !dst) return -1;
    if (ggml_nelements(t) != n) return -2;
    if (!ggml_is_contiguous(t)) return -3;
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16) return -4;
    if (!t->buffer && !t->data) return -5;
    std::vector<uint8_t> raw(ggml_nbytes(t));
    if (t->buffer) {
        ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
    } else {
        memcpy(raw.data(), t->data, raw.size());
    }
    if (t->type == GGML_TYPE_F32) {
        memcpy(dst, raw.data(), raw.size());
    } else {
        ggml_get_type_traits(t->type)->to_float(raw.data(), dst, n);
    }
    return 0;
}

extern "C" const char * tca_tensor_op(const ggml_tensor * t) {
    return tca_guard(__func__, "", nullptr, 0, [&] { return t ? ggml_op_name(t->op) : ""; });
}

static int tca_quantize_impl(const char * src, const char * dst, int ftype, int allow_requantize, int n_threads) {
    // llama_model_quantize (the code behind llama-quantize): it copies every metadata
    // key/value of the source, tca.* budgets included.
    if (!src || !dst) return -1;
    llama_model_quantize_params qp = llama_model_quantize_default_params();
    qp.ftype = (llama_ftype) ftype;
    qp.allow_requantize = allow_requantize != 0;
    qp.nthread = n_threads;
    return (int) llama_model_quantize(src, dst, &qp);  // an exception: -2 (tca_quantize)
}

// ---- the entry points: no exception crosses into C (tca_guard.h) ----
extern "C" int64_t tca_abi_layout(const char * name, const char * field) {
    return tca_guard(__func__, (int64_t) -1, nullptr, 0, [&] { return tca_abi_layout_impl(name, field); });
}

extern "C" double tca_selftest_matmul(int type, int n, int k, int m, int n_threads) {
    return tca_guard(__func__, -5.0, nullptr, 0, [&] { return tca_selftest_matmul_impl(type, n, k, m, n_threads); });
}

extern "C" void tca_context_memory(const llama_context * ctx, uint64_t * model, uint64_t * context, uint64_t * compute) {
    if (model) *model = 0;
    if (context) *context = 0;
    if (compute) *compute = 0;
    tca_guard_void(__func__, [&] { tca_context_memory_impl(ctx, model, context, compute); });
}

extern "C" int tca_tensor_meta(const ggml_tensor * t, char * name, size_t name_len, int64_t * ne4, int32_t * type) {
    return tca_guard(__func__, -6, nullptr, 0, [&] { return tca_tensor_meta_impl(t, name, name_len, ne4, type); });
}

extern "C" int tca_tensor_get_f32(const ggml_tensor * t, float * dst, int64_t n) {
    return tca_guard(__func__, -6, nullptr, 0, [&] { return tca_tensor_get_f32_impl(t, dst, n); });
}

extern "C" int tca_quantize(const char * src, const char * dst, int ftype, int allow_requantize, int n_threads) {
    return tca_guard(__func__, -2, nullptr, 0, [&] { return tca_quantize_impl(src, dst, ftype, allow_requantize, n_threads); });
}
