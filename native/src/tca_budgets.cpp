// tca_ggml — the native reader of a GGUF's tca.* budgets (docs/design.md §2).
//
// Llama (and any C caller) reads a model's budgets with it and hands them to tca_context_create;
// tests check with it that what the Python writer stores is what the native side reads. Every
// failure names the key.
#include "tca_ggml.h"
#include "tca_guard.h"
#include "tca_config.h"

#include "gguf.h"
#include "llama.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {
// the Python validator's tolerances (gguf_meta.P_SUM_TOL, DENSITY_TOL)
constexpr double kPSumTol = 1e-3;
constexpr double kDensityTol = 1e-3;

// strict UTF-8 as Python's bytes.decode("utf-8") (no overlongs, no surrogates, <= U+10FFFF)
bool utf8_ok(const char * s) {
    const unsigned char * p = (const unsigned char *) s;
    while (*p) {
        const unsigned c = *p;
        int n;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) { ++p; continue; }
        else if (c >= 0xC2 && c <= 0xDF) n = 1;
        else if (c == 0xE0) { n = 2; lo = 0xA0; }
        else if (c == 0xED) { n = 2; hi = 0x9F; }
        else if (c >= 0xE1 && c <= 0xEF) n = 2;
        else if (c == 0xF0) { n = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) n = 3;
        else if (c == 0xF4) { n = 3; hi = 0x8F; }
        else return false;
        ++p;
        for (int i = 0; i < n; ++i, ++p) {
            if (*p < (i == 0 ? lo : 0x80) || *p > (i == 0 ? hi : 0xBF)) return false;
        }
    }
    return true;
}

bool is_sha256_hex(const char * s) {
    if (!s || strlen(s) != 64) return false;
    for (int i = 0; i < 64; ++i) if (!isxdigit((unsigned char) s[i])) return false;
    return true;
}

struct reader {
    gguf_context * g;
    char * err;
    size_t n;
    int fail(const char * key, const std::string & msg) {
        if (err && n) snprintf(err, n, "%s: %s", key, msg.c_str());
        return -1;
    }
    int64_t find(const char * key) { return gguf_find_key(g, key); }
    int u32(const char * key, uint32_t & v) {
        const int64_t id = find(key);
        if (id < 0) return fail(key, "missing");
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_UINT32) return fail(key, "expected u32");
        v = gguf_get_val_u32(g, id);
        return 0;
    }
    int f32(const char * key, float & v) {
        const int64_t id = find(key);
        if (id < 0) return fail(key, "missing");
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_FLOAT32) return fail(key, "expected f32");
        v = gguf_get_val_f32(g, id);
        if (!std::isfinite(v)) return fail(key, "not finite");
        return 0;
    }
    int str(const char * key, char * dst, size_t cap) {
        const int64_t id = find(key);
        if (id < 0) return fail(key, "missing");
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) return fail(key, "expected a string");
        if (!utf8_ok(gguf_get_val_str(g, id))) return fail(key, "string is not UTF-8");
        snprintf(dst, cap, "%s", gguf_get_val_str(g, id));
        return 0;
    }
    const char * raw_str(const char * key) { return gguf_get_val_str(g, find(key)); }  // after str() succeeded
    template <typename T>
    int arr(const char * key, gguf_type t, size_t want, T ** out) {
        const int64_t id = find(key);
        if (id < 0) return fail(key, "missing");
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != t)
            return fail(key, std::string("expected an array of ") + gguf_type_name(t));
        const size_t got = gguf_get_arr_n(g, id);
        if (got > (1u << 24)) return fail(key, "array too large (" + std::to_string(got) + ")");
        if (want != (size_t) -1 && got != want)
            return fail(key, "length " + std::to_string(got) + ", expected " + std::to_string(want));
        *out = (T *) calloc(got ? got : 1, sizeof(T));
        if (!*out) return fail(key, "out of memory");
        memcpy(*out, gguf_get_arr_data(g, id), got * sizeof(T));
        return (int) 0;
    }
    size_t arr_n(const char * key) { const int64_t id = find(key); return id < 0 ? 0 : gguf_get_arr_n(g, id); }
};
}  // namespace

static void tca_budgets_free_impl(tca_budgets * b) {
    if (!b) return;
    free(b->k_values); free(b->grid_mu); free(b->grid_sigma); free(b->n_head_kv);
    free(b->candidate); free(b->p); free(b->density); free(b->coverage);
    memset(b, 0, sizeof(*b));
}

static int tca_budgets_read_impl(const char * path, tca_budgets * out, char * err, size_t err_len) {
    if (!out) return -1;
    memset(out, 0, sizeof(*out));
    if (err && err_len) err[0] = 0;
    if (!path) { if (err && err_len) snprintf(err, err_len, "path is NULL"); return -1; }
    gguf_init_params ip = { true, nullptr };
    gguf_context * g = gguf_init_from_file(path, ip);
    if (!g) { if (err && err_len) snprintf(err, err_len, "%s: not a readable GGUF", path); return -1; }
    reader r{g, err, err_len};
    int rc = 0;
    auto done = [&](int code) { if (code < 0) tca_budgets_free(out); gguf_free(g); return code; };
    if (r.find("tca.version") < 0) {
        // no tca.version: not calibrated, unless other tca.* keys are there -- then the calibration is
        // incomplete or damaged, and saying "not calibrated" would hide that
        std::string others;
        int64_t n_others = 0;
        for (int64_t i = 0; i < gguf_get_n_kv(g); ++i) {
            const char * k = gguf_get_key(g, i);
            if (k && strncmp(k, "tca.", 4) == 0) {
                if (n_others++ < 3) others += std::string(others.empty() ? "" : ", ") + k;
            }
        }
        if (n_others == 0) return done(1);
        return done(r.fail("tca.version", "missing, but the file has " + std::to_string(n_others) + " other tca.* key" +
                                              (n_others > 1 ? "s" : "") + " (" + others + (n_others > 3 ? ", ..." : "") +
                                              "): a malformed or incomplete TCA calibration; recalibrate it "
                                              "(tca-ggml calibrate) or remove the tca.* keys (tca-ggml strip)"));
    }
    if ((rc = r.u32("tca.version", out->version))) return done(rc);
    // 1: calibrated for the "stream" retention, 2: for "hold" (same keys, same meaning)
    if (out->version != 1 && out->version != 2)
        return done(r.fail("tca.version", "unknown version " + std::to_string(out->version) + " (known: 1, 2)"));
    if ((rc = r.u32("tca.block_size", out->block))) return done(rc);
    if (!tca_block_ok(out->block)) return done(r.fail("tca.block_size", "not a power of two in [1, 4096]"));
    if ((rc = r.u32("tca.window", out->window))) return done(rc);
    if (out->window % out->block) return done(r.fail("tca.window", "not a multiple of tca.block_size"));
    if ((rc = r.u32("tca.n_sink", out->n_sink))) return done(rc);
    if ((rc = r.f32("tca.tau", out->tau))) return done(rc);
    if (!(out->tau > 0 && out->tau <= 1)) return done(r.fail("tca.tau", "outside (0, 1]"));
    if ((rc = r.f32("tca.alpha", out->alpha))) return done(rc);
    if (!(out->alpha >= 0 && out->alpha <= 1)) return done(r.fail("tca.alpha", "outside [0, 1]"));
    out->n_k = tca_n_k(out->block);
    if ((rc = r.arr("tca.k_values", GGUF_TYPE_UINT32, out->n_k, &out->k_values))) return done(rc);
    for (uint32_t i = 0; i < out->n_k; ++i) if (out->k_values[i] != (1u << i)) return done(r.fail("tca.k_values", "must be 1, 2, 4, ..., block_size"));
    out->n_grid = (uint32_t) r.arr_n("tca.grid.mu");
    if ((rc = r.arr("tca.grid.mu", GGUF_TYPE_FLOAT32, (size_t) -1, &out->grid_mu))) return done(rc);
    if (out->n_grid == 0) return done(r.fail("tca.grid.mu", "empty candidate grid"));
    if ((rc = r.arr("tca.grid.sigma", GGUF_TYPE_FLOAT32, out->n_grid, &out->grid_sigma))) return done(rc);
    // the same rules as the Python validator (gguf_meta.TCABudgets.validate)
    for (uint32_t i = 0; i < out->n_grid; ++i) {
        if (!std::isfinite(out->grid_mu[i])) return done(r.fail("tca.grid.mu", "non-finite value at index " + std::to_string(i)));
        if (!std::isfinite(out->grid_sigma[i])) return done(r.fail("tca.grid.sigma", "non-finite value at index " + std::to_string(i)));
        if (!(out->grid_sigma[i] > 0)) return done(r.fail("tca.grid.sigma", "spreads must be > 0 (index " + std::to_string(i) + ")"));
    }
    if ((rc = r.u32("tca.n_layer", out->n_layer))) return done(rc);
    if (out->n_layer == 0 || out->n_layer > 4096) return done(r.fail("tca.n_layer", "out of range"));
    if ((rc = r.arr("tca.n_head_kv", GGUF_TYPE_UINT32, out->n_layer, &out->n_head_kv))) return done(rc);
    uint64_t H = 0;
    for (uint32_t il = 0; il < out->n_layer; ++il) {
        if (out->n_head_kv[il] > 4096) return done(r.fail("tca.n_head_kv", "out of range"));
        H += out->n_head_kv[il];
    }
    if (H == 0 || H * out->n_k > (1u << 24)) return done(r.fail("tca.n_head_kv", "no heads or too many"));
    out->n_heads = (uint32_t) H;
    if ((rc = r.arr("tca.budget.candidate", GGUF_TYPE_INT32, H, &out->candidate))) return done(rc);
    if ((rc = r.arr("tca.budget.p", GGUF_TYPE_FLOAT32, H * out->n_k, &out->p))) return done(rc);
    if ((rc = r.arr("tca.budget.density", GGUF_TYPE_FLOAT32, H, &out->density))) return done(rc);
    if ((rc = r.arr("tca.coverage", GGUF_TYPE_FLOAT32, H, &out->coverage))) return done(rc);
    for (uint64_t h = 0; h < H; ++h) {
        if (out->candidate[h] < -1 || out->candidate[h] >= (int32_t) out->n_grid) return done(r.fail("tca.budget.candidate", "index out of range"));
        double s = 0;
        for (uint32_t i = 0; i < out->n_k; ++i) {
            const float v = out->p[h * out->n_k + i];
            if (!std::isfinite(v) || v < 0) return done(r.fail("tca.budget.p", "negative or not finite"));
            s += v;
        }
        const std::string head = "head " + std::to_string(h) + ": ";
        if (std::fabs(s - 1.0) > kPSumTol) return done(r.fail("tca.budget.p", head + "a row does not sum to 1"));
        if (out->candidate[h] == -1 && out->p[h * out->n_k + out->n_k - 1] < 1.0 - kPSumTol)
            return done(r.fail("tca.budget.p", head + "dense (candidate -1) but p is not one-hot at k = block_size"));
        if (!std::isfinite(out->density[h]) || out->density[h] <= 0 || out->density[h] > 1) return done(r.fail("tca.budget.density", head + "outside (0, 1]"));
        double expect = 0;  // sum_k k p_k / b
        for (uint32_t i = 0; i < out->n_k; ++i) expect += (double) out->k_values[i] * (double) out->p[h * out->n_k + i];
        expect /= (double) out->block;
        if (std::fabs((double) out->density[h] - expect) > kDensityTol)
            return done(r.fail("tca.budget.density", head + std::to_string(out->density[h]) + " != sum_k k p_k / b = " + std::to_string(expect)));
        // Python: coverage <= 1 + 1e-6 (a float32 sum of shares may round just above 1)
        if (!std::isfinite(out->coverage[h]) || out->coverage[h] < 0 || (double) out->coverage[h] > 1.0 + 1e-6) return done(r.fail("tca.coverage", head + "outside [0, 1]"));
    }
    if ((rc = r.str("tca.calib.text_name", out->text_name, sizeof(out->text_name)))) return done(rc);
    if ((rc = r.str("tca.calib.text_sha256", out->text_sha256, sizeof(out->text_sha256)))) return done(rc);
    if (!is_sha256_hex(r.raw_str("tca.calib.text_sha256"))) return done(r.fail("tca.calib.text_sha256", "not a hex sha256"));
    if ((rc = r.u32("tca.calib.n_tokens", out->n_tokens))) return done(rc);
    if ((rc = r.str("tca.calib.tool", out->tool, sizeof(out->tool)))) return done(rc);
    return done(0);
}

// ---- the entry points: no exception crosses into C (tca_guard.h) ----
extern "C" void tca_budgets_free(tca_budgets * b) {
    tca_guard_void(__func__, [&] { tca_budgets_free_impl(b); });
}

extern "C" int tca_budgets_read(const char * path, tca_budgets * out, char * err, size_t err_len) {
    const int rc = tca_guard(__func__, -2, err, err_len, [&] { return tca_budgets_read_impl(path, out, err, err_len); });
    if (rc == -2) {  // an exception: nothing half-read is handed out
        tca_budgets_free(out);
        return -1;
    }
    return rc;
}
