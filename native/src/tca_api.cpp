// tca_ggml — project C API (see native/include/tca_ggml.h).
#include "tca_ggml.h"

#include "llama.h"
#include "ggml.h"
#include "ggml-cpu.h"
#include "ggml-backend.h"
#include "gguf.h"
#include "llama-ext.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#ifndef TCA_GGML_VERSION
#define TCA_GGML_VERSION "0.1.0"
#endif

extern "C" const char * tca_version(void) { return TCA_GGML_VERSION; }
extern "C" const char * tca_upstream_version(void) { return "llama-cpp-python 0.3.36 / llama.cpp b11312 (0c1e57098)"; }

#define TCA_LAYOUT(S, F)                                   \
    if (field && strcmp(field, #F) == 0) return (int64_t) offsetof(S, F);

extern "C" int64_t tca_abi_layout(const char * name, const char * field) {
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
    return -1;
}

static void set_err(char * err, size_t n, const std::string & msg) {
    if (!err || n == 0) return;
    snprintf(err, n, "%s", msg.c_str());
}

extern "C" int tca_gguf_check(const char * path, char * err, size_t err_len) {
    if (!path) { set_err(err, err_len, "path is NULL"); return 1; }
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
    const size_t data_off = gguf_get_data_offset(g);
    const int64_t nt = gguf_get_n_tensors(g);
    long long need = (long long) data_off;
    // gguf has no per-tensor size accessor that needs no ggml context; the tensor-info
    // offsets are sorted by construction, so the end of data is max(offset + nbytes).
    ggml_context * gctx = nullptr;
    gguf_init_params p2 = { true, &gctx };
    gguf_context * g2 = gguf_init_from_file(path, p2);
    if (g2 && gctx) {
        for (int64_t i = 0; i < nt; ++i) {
            const char * nm = gguf_get_tensor_name(g2, i);
            ggml_tensor * t = ggml_get_tensor(gctx, nm);
            if (!t) continue;
            long long end = (long long) data_off + (long long) gguf_get_tensor_offset(g2, i) + (long long) ggml_nbytes(t);
            if (end > need) need = end;
        }
    }
    if (g2) gguf_free(g2);
    if (gctx) ggml_free(gctx);
    gguf_free(g);
    if (need > fsize) {
        set_err(err, err_len, "truncated GGUF: tensor data needs " + std::to_string(need) +
                " bytes, file has " + std::to_string(fsize));
        return 5;
    }
    return 0;
}

extern "C" double tca_selftest_matmul(int type, int n, int k, int m, int n_threads) {
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

extern "C" void tca_context_memory(const llama_context * ctx, uint64_t * model, uint64_t * context, uint64_t * compute) {
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

extern "C" int tca_tensor_meta(const ggml_tensor * t, char * name, size_t name_len, int64_t * ne4, int32_t * type) {
    if (!t) return -1;
    if (name && name_len) snprintf(name, name_len, "%s", t->name);
    if (ne4) for (int i = 0; i < 4; ++i) ne4[i] = t->ne[i];
    if (type) *type = (int32_t) t->type;
    return 0;
}

extern "C" int tca_tensor_get_f32(const ggml_tensor * t, float * dst, int64_t n) {
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

extern "C" const char * tca_tensor_op(const ggml_tensor * t) { return t ? ggml_op_name(t->op) : ""; }

extern "C" int tca_quantize(const char * src, const char * dst, int ftype, int allow_requantize, int n_threads) {
    // llama_model_quantize (the code behind llama-quantize): it copies every metadata
    // key/value of the source, tca.* budgets included.
    if (!src || !dst) return -1;
    llama_model_quantize_params qp = llama_model_quantize_default_params();
    qp.ftype = (llama_ftype) ftype;
    qp.allow_requantize = allow_requantize != 0;
    qp.nthread = n_threads;
    try {
        return (int) llama_model_quantize(src, dst, &qp);
    } catch (...) {
        return -2;
    }
}
