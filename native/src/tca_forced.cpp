// tca_ggml — forced (uncalibrated) uniform budgets for tools without Python (project C API).
//
// The same budget as python/tca_ggml/llama.py forced_budget(): for t = clamp(density * b, 1, b),
// the kept-rows distribution over k_values 1, 2, 4, ..., b is one-hot on t when t is a power of
// two, otherwise the mix of the two powers of two around t whose expectation is t.
#include "tca_ggml.h"

#include "llama.h"
#include "llama-model.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

static int forced_fail(tca_params * out, char * err, size_t n, const std::string & msg) {
    tca_params_free(out);
    if (err && n) snprintf(err, n, "%s", msg.c_str());
    return 1;
}

extern "C" void tca_params_free(tca_params * p) {
    if (!p) return;
    free((void *) p->k_values);
    free((void *) p->n_head_kv);
    free((void *) p->p);
    memset(p, 0, sizeof(*p));
}

extern "C" int tca_params_forced(const llama_model * model, float density, uint32_t block, uint32_t window,
                                 tca_params * out, char * err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!out) {
        if (err && err_len) snprintf(err, err_len, "out is NULL");
        return 1;
    }
    memset(out, 0, sizeof(*out));
    out->n_whole = -1;  // defaults: retention HOLD, n_obs 32, n_whole 4, hold tier in the cache's type
    out->type_hold = -1;
    // tools without Python (tca-llama-bench -tca X): TCA_GGML_RETENTION=stream picks the old rule
    if (const char * e = getenv("TCA_GGML_RETENTION"); e && strcmp(e, "stream") == 0) out->retention = TCA_RETENTION_STREAM;
    if (!model) return forced_fail(out, err, err_len, "model is NULL");
    if (!(density > 0.0f && density <= 1.0f))  // also rejects NaN
        return forced_fail(out, err, err_len, "tca density must be in (0, 1], got " + std::to_string(density));
    if (block == 0 || (block & (block - 1)) || block > 4096)
        return forced_fail(out, err, err_len, "tca block: must be a power of two in [1, 4096], got " + std::to_string(block));
    if (window % block)
        return forced_fail(out, err, err_len, "tca window: must be a multiple of the block size (" + std::to_string(block) +
                                              "), got " + std::to_string(window));

    uint32_t n_k = 0;
    for (uint32_t k = 1; k <= block; k <<= 1) ++n_k;
    const int32_t n_layer = llama_model_n_layer(model);
    if (n_layer <= 0) return forced_fail(out, err, err_len, "model has no layers");

    uint32_t * kv  = (uint32_t *) calloc(n_k, sizeof(uint32_t));
    uint32_t * nhk = (uint32_t *) calloc((size_t) n_layer, sizeof(uint32_t));
    out->k_values = kv;
    out->n_head_kv = nhk;
    if (!kv || !nhk) return forced_fail(out, err, err_len, "out of memory");
    for (uint32_t i = 0; i < n_k; ++i) kv[i] = 1u << i;
    size_t H = 0;
    for (int32_t il = 0; il < n_layer; ++il) {
        nhk[il] = model->hparams.n_head_kv(il);
        H += nhk[il];
    }

    // forced_budget(density, k_values), in double like numpy
    double row[13] = { 0.0 };  // n_k <= log2(4096) + 1
    const double b = (double) block;
    const double t = std::fmin(std::fmax((double) density * b, 1.0), b);
    uint32_t hi = 0;
    while (hi + 1 < n_k && (double) kv[hi] < t) ++hi;  // numpy searchsorted(k, t), side='left'
    if ((double) kv[hi] == t) {
        row[hi] = 1.0;
    } else {
        const uint32_t lo = hi - 1;
        const double w = (t - kv[lo]) / ((double) kv[hi] - kv[lo]);
        row[hi] = w;
        row[lo] = 1.0 - w;
    }

    float * p = (float *) calloc(H ? H * n_k : 1, sizeof(float));
    out->p = p;
    if (!p) return forced_fail(out, err, err_len, "out of memory");
    for (size_t h = 0; h < H; ++h)
        for (uint32_t i = 0; i < n_k; ++i) p[h * n_k + i] = (float) row[i];

    out->block = block;
    out->window = window;
    out->n_sink = 4;
    out->alpha = 0.5f;
    out->n_k = n_k;
    out->n_layer = (uint32_t) n_layer;
    out->forced = 1;
    return 0;
}
