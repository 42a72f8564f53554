// tca_ggml — the one owner of a context's TCA configuration (project C API, native/include/tca_ggml.h):
// tca_config_check validates what the caller gives, tca_context_create resolves it against the
// budgets (a GGUF's, or a forced density) and the model, reads the environment knobs once
// (docs/design.md "Knobs") and creates the context with the TCA retention memory.
#include "tca_ggml.h"
#include "tca_guard.h"
#include "tca_config.h"

#include "llama.h"
#include "llama-context.h"
#include "llama-model.h"
#include "llama-tca-seqs.h"
#include "ggml.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

bool tca_block_ok(int64_t b) { return b >= 1 && b <= 4096 && (b & (b - 1)) == 0; }

uint32_t tca_n_k(uint32_t block) {
    uint32_t n = 0;
    for (uint32_t k = 1; k <= block; k <<= 1) ++n;
    return n;
}

static int fail(char * err, size_t n, const std::string & msg) {
    if (err && n) snprintf(err, n, "%s", msg.c_str());
    return 1;
}

static std::string num(double v) {
    char b[64];
    snprintf(b, sizeof(b), "%g", v);
    return b;
}

static int tca_forced_budget_impl(double density, uint32_t block, float * p, uint32_t n_k) {
    if (!p || !(density > 0.0 && density <= 1.0) || !tca_block_ok(block) || n_k != tca_n_k(block)) return 1;
    // in double like numpy (tca_ggml.reference.forced_budget)
    double row[13] = { 0.0 };  // n_k <= log2(4096) + 1
    const double b = (double) block;
    const double t = std::fmin(std::fmax(density * b, 1.0), b);
    uint32_t hi = 0;
    while (hi + 1 < n_k && (double) (1u << hi) < t) ++hi;  // numpy searchsorted(k, t), side='left'
    if ((double) (1u << hi) == t) {
        row[hi] = 1.0;
    } else {
        const uint32_t lo = hi - 1;
        const double k_lo = (double) (1u << lo), k_hi = (double) (1u << hi);
        const double w = (t - k_lo) / (k_hi - k_lo);
        row[hi] = w;
        row[lo] = 1.0 - w;
    }
    for (uint32_t i = 0; i < n_k; ++i) p[i] = (float) row[i];
    return 0;
}

static int tca_config_check_impl(const tca_config * c, char * err, size_t n) {
    if (err && n) err[0] = 0;
    if (!c) return fail(err, n, "tca config is NULL");
    const uint32_t s = c->set;
    if (s & ~(uint32_t) (TCA_SET_DENSITY | TCA_SET_BLOCK | TCA_SET_WINDOW | TCA_SET_ALPHA | TCA_SET_N_SINK |
                         TCA_SET_RETENTION | TCA_SET_N_OBS | TCA_SET_N_WHOLE | TCA_SET_TYPE_HOLD | TCA_SET_PREFILL |
                         TCA_SET_HOLD_DECODE))
        return fail(err, n, "tca config: unknown TCA_SET_* bits " + std::to_string(s));
    if ((s & TCA_SET_RETENTION) && c->retention != TCA_RETENTION_HOLD && c->retention != TCA_RETENTION_STREAM)
        return fail(err, n, "tca_retention must be TCA_RETENTION_HOLD (0, 'hold') or TCA_RETENTION_STREAM (1, 'stream'), got " +
                            std::to_string(c->retention));
    if ((s & TCA_SET_PREFILL) && c->prefill != TCA_PREFILL_SPARSE && c->prefill != TCA_PREFILL_DENSE &&
        c->prefill != TCA_PREFILL_EARLY)
        return fail(err, n, "tca_prefill must be TCA_PREFILL_SPARSE (0, 'sparse'), TCA_PREFILL_DENSE (1, 'dense') or "
                            "TCA_PREFILL_EARLY (2, 'early'), got " + std::to_string(c->prefill));
    if ((s & TCA_SET_PREFILL) && c->prefill != TCA_PREFILL_SPARSE && (s & TCA_SET_RETENTION) &&
        c->retention == TCA_RETENTION_STREAM)
        return fail(err, n, "tca_prefill='dense'/'early' needs tca_retention='hold' (a stream retention holds no rows to attend)");
    if ((s & TCA_SET_N_OBS) && (c->n_obs < 1 || c->n_obs > 4096))
        return fail(err, n, "tca_obs must be in [1, 4096], got " + std::to_string(c->n_obs));
    if ((s & TCA_SET_HOLD_DECODE) && (c->n_hold_decode < TCA_HOLD_DECODE_AUTO || c->n_hold_decode > (1 << 20)))
        return fail(err, n, "tca_hold_decode must be in [0, 1048576], -1 (every step) or -2 (auto: -1 with the KV cache "
                            "on the CPU, 32 on a GPU), got " + std::to_string(c->n_hold_decode));
    if ((s & TCA_SET_HOLD_DECODE) && c->n_hold_decode != 0 && c->n_hold_decode != TCA_HOLD_DECODE_AUTO && (s & TCA_SET_RETENTION) && c->retention == TCA_RETENTION_STREAM)
        return fail(err, n, "tca_hold_decode needs tca_retention='hold' (a stream retention holds no rows to attend)");
    if ((s & TCA_SET_N_WHOLE) && (c->n_whole < 0 || c->n_whole > 65536))
        return fail(err, n, "tca_whole must be in [0, 65536], got " + std::to_string(c->n_whole));
    if ((s & TCA_SET_TYPE_HOLD) && c->type_hold != GGML_TYPE_F32 && c->type_hold != GGML_TYPE_F16 && c->type_hold != GGML_TYPE_Q8_0)
        return fail(err, n, "tca_hold_type must be GGML_TYPE_F32 (0), GGML_TYPE_F16 (1) or GGML_TYPE_Q8_0 (8), got " +
                            std::to_string(c->type_hold));
    if ((s & TCA_SET_DENSITY) && !(c->density > 0.0 && c->density <= 1.0))  // also rejects NaN
        return fail(err, n, "tca_density must be in (0, 1], got " + num(c->density));
    if ((s & TCA_SET_BLOCK) && !tca_block_ok(c->block))
        return fail(err, n, "tca_block must be a power of two in [1, 4096], got " + std::to_string(c->block));
    if ((s & TCA_SET_WINDOW) && (c->window < 1 || c->window > (1 << 20)))
        return fail(err, n, "tca_window must be in [1, 1048576], got " + std::to_string(c->window));
    if ((s & TCA_SET_WINDOW) && (s & TCA_SET_BLOCK) && c->window % c->block)
        return fail(err, n, "tca_window (" + std::to_string(c->window) + ") must be a multiple of tca_block (" +
                            std::to_string(c->block) + ")");
    if ((s & TCA_SET_ALPHA) && !(c->alpha >= 0.0f && c->alpha <= 1.0f))
        return fail(err, n, "tca_alpha must be in [0, 1], got " + num(c->alpha));
    if ((s & TCA_SET_N_SINK) && (c->n_sink < 0 || c->n_sink > 65536))
        return fail(err, n, "tca n_sink must be in [0, 65536], got " + std::to_string(c->n_sink));
    return 0;
}

// The environment knobs (docs/design.md "Knobs"), read once per context, at its creation.
static void read_knobs(llama_tca_config & cfg) {
    auto env_int = [](const char * name, int dflt) { const char * e = getenv(name); return e ? atoi(e) : dflt; };
    cfg.gpu_min_ctx = (uint32_t) std::max(0, env_int("TCA_GGML_GPU_MIN_CTX", 8192));
    cfg.io_on_host  = env_int("TCA_GGML_IO", 0) != 0;
    cfg.lazy        = env_int("TCA_GGML_LAZY", 0) != 0;
    cfg.pool_radius = std::max(0, env_int("TCA_GGML_POOL", 3));
    cfg.score_per_query = env_int("TCA_GGML_SCORE_PER_QUERY", 0) != 0;
    cfg.refresh     = env_int("TCA_GGML_REFRESH", 0) != 0;
    const char * st = getenv("TCA_GGML_STATS");
    cfg.stats_on_exit = st && *st && strcmp(st, "0") != 0;
}

// *c (checked) + the budget source + the model -> the configuration the retention memory runs.
// an integer environment knob in [lo, hi]: 0 (v untouched when unset or empty), 1 (err) when not
// an integer in range
static int env_checked(const char * name, long lo, long hi, long & v, char * err, size_t n) {
    const char * e = getenv(name);
    if (!e || !*e) return 0;
    char * end = nullptr;
    const long x = strtol(e, &end, 10);
    if (*end || x < lo || x > hi)
        return fail(err, n, std::string(name) + " must be an integer in [" + std::to_string(lo) + ", " +
                            std::to_string(hi) + "], got '" + e + "'");
    v = x;
    return 0;
}

// Whether a context of these parameters keeps its KV cache (and so TCA's attention) on a local GPU:
// K/V offloaded and some layer on a non-CPU device that is not an RPC device (ggml-rpc reports every
// remote device as a GPU whatever its backend; a remote layer keeps the CPU's default, so a model
// gives the same tokens over a CPU rpc-server as locally)
static bool kv_on_gpu(const llama_model * model, const llama_context_params & params) {
    if (!params.offload_kqv) return false;
    for (uint32_t il = 0; il < model->hparams.n_layer(); ++il) {
        ggml_backend_dev_t dev = model->dev_layer(il);
        if (!dev || ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) continue;
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        if (reg && strncmp(ggml_backend_reg_name(reg), "RPC", 3) == 0) continue;   // "RPC", "RPC[host:port]"
        return true;
    }
    return false;
}

// TCA_HOLD_DECODE_* (C API) -> llama_tca_config::hold_decode; AUTO by where the KV cache lives
static uint32_t hold_decode_steps(int64_t v, bool on_gpu) {
    if (v == TCA_HOLD_DECODE_AUTO) v = on_gpu ? TCA_HOLD_DECODE_GPU : TCA_HOLD_DECODE_ALL;
    return v == TCA_HOLD_DECODE_ALL ? UINT32_MAX : (uint32_t) v;
}

static int resolve(const llama_model * model, const tca_budgets * bud, const tca_config & c, bool on_gpu,
                   llama_tca_config & cfg, tca_config & out, char * err, size_t n) {
    const uint32_t s = c.set;
    const bool forced = s & TCA_SET_DENSITY;
    if (!forced && !bud)
        return fail(err, n, "the model has no TCA calibration (tca.* metadata). Calibrate it once with "
                            "`tca-ggml calibrate MODEL.gguf -o MODEL.tca.gguf`, or pass tca_density=X for an "
                            "uncalibrated uniform budget (benchmarks only)");
    if (!forced && (s & TCA_SET_BLOCK) && (uint32_t) c.block != bud->block)
        return fail(err, n, "tca_block=" + std::to_string(c.block) + " differs from the calibrated block size " +
                            std::to_string(bud->block) + "; recalibrate, or use tca_density");
    const int32_t n_layer = llama_model_n_layer(model);
    if (n_layer <= 0) return fail(err, n, "the model has no layers");
    cfg.block  = (s & TCA_SET_BLOCK) ? (uint32_t) c.block : (bud ? bud->block : 128u);
    cfg.window = (s & TCA_SET_WINDOW) ? (uint32_t) c.window : (bud ? bud->window : 4096u);
    cfg.alpha  = (s & TCA_SET_ALPHA) ? c.alpha : (bud ? bud->alpha : 0.5f);
    cfg.n_sink = (s & TCA_SET_N_SINK) ? (uint32_t) c.n_sink : (bud ? bud->n_sink : 4u);
    if (cfg.window % cfg.block)
        return fail(err, n, "tca_window (" + std::to_string(cfg.window) + ") must be a multiple of the block size (" +
                            std::to_string(cfg.block) + ")");
    if (cfg.n_sink > 65536) return fail(err, n, "tca.n_sink: must be in [0, 65536], got " + std::to_string(cfg.n_sink));
    const uint32_t n_k = tca_n_k(cfg.block);
    cfg.k_values.resize(n_k);
    for (uint32_t i = 0; i < n_k; ++i) cfg.k_values[i] = 1u << i;
    cfg.n_head_kv.resize((size_t) n_layer);
    size_t H = 0;
    for (int32_t il = 0; il < n_layer; ++il) {
        cfg.n_head_kv[il] = model->hparams.n_head_kv(il);
        H += cfg.n_head_kv[il];
    }
    cfg.forced = forced;
    if (forced) {
        std::vector<float> row(n_k);
        if (tca_forced_budget(c.density, cfg.block, row.data(), n_k)) return fail(err, n, "tca_density: no forced budget");
        cfg.p.resize(H * n_k);
        for (size_t h = 0; h < H; ++h) std::copy(row.begin(), row.end(), cfg.p.begin() + h * n_k);
    } else {
        // tca_budgets_read checked the file's own consistency; here: the budgets against the model
        if (bud->n_k != n_k || !bud->k_values || !bud->n_head_kv || !bud->p)
            return fail(err, n, "tca.k_values: must be 1, 2, 4, ..., block_size");
        for (uint32_t i = 0; i < n_k; ++i)
            if (bud->k_values[i] != (1u << i)) return fail(err, n, "tca.k_values: must be 1, 2, 4, ..., block_size");
        if ((int32_t) bud->n_layer != n_layer)
            return fail(err, n, "tca.n_layer: " + std::to_string(bud->n_layer) + " but the model has " +
                                std::to_string(n_layer) + " layers");
        for (int32_t il = 0; il < n_layer; ++il)
            if (bud->n_head_kv[il] != cfg.n_head_kv[il])
                return fail(err, n, "tca.n_head_kv[" + std::to_string(il) + "]: " + std::to_string(bud->n_head_kv[il]) +
                                    " but the model has " + std::to_string(cfg.n_head_kv[il]));
        if (bud->n_heads != H) return fail(err, n, "tca.n_head_kv: " + std::to_string(bud->n_heads) + " heads, the model has " + std::to_string(H));
        cfg.p.assign(bud->p, bud->p + H * n_k);
    }
    int32_t retention = TCA_RETENTION_HOLD;
    if (s & TCA_SET_RETENTION) {
        retention = c.retention;
    } else if (const char * e = getenv("TCA_GGML_RETENTION"); e && strcmp(e, "stream") == 0) {
        retention = TCA_RETENTION_STREAM;  // tools without Python (tca-llama-bench -tca X)
    }
    cfg.hold = retention == TCA_RETENTION_HOLD;
    // default: EARLY with the hold retention (fidelity first: docs/benchmarks.md "session 11"),
    // SPARSE with stream (which holds no rows to attend)
    int32_t prefill = cfg.hold ? TCA_PREFILL_EARLY : TCA_PREFILL_SPARSE;
    if (s & TCA_SET_PREFILL) {
        prefill = c.prefill;
    } else if (const char * e = getenv("TCA_GGML_PREFILL"); e && cfg.hold) {
        if (strcmp(e, "sparse") == 0) prefill = TCA_PREFILL_SPARSE;  // tools without Python
        if (strcmp(e, "dense") == 0) prefill = TCA_PREFILL_DENSE;
        if (strcmp(e, "early") == 0) prefill = TCA_PREFILL_EARLY;
    }
    if (prefill != TCA_PREFILL_SPARSE && !cfg.hold)
        return fail(err, n, "tca_prefill='dense'/'early' needs tca_retention='hold' (a stream retention holds no rows to attend)");
    cfg.dense_prefill = prefill == TCA_PREFILL_DENSE;
    if (prefill == TCA_PREFILL_EARLY) {
        // the first half of the layers: their far attention is query-specific, a shared selection
        // per ubatch misses it (docs/benchmarks.md "sessions 9-10")
        cfg.dense_prefill_lo = 0;
        cfg.dense_prefill_hi = n_layer / 2 - 1;
    }
    if (const char * e = getenv("TCA_GGML_PREFILL_LAYERS"); e && *e && cfg.hold && prefill != TCA_PREFILL_DENSE) {
        int lo = -1, hi = -1;
        if (sscanf(e, "%d-%d", &lo, &hi) != 2 || lo < 0 || hi < lo)
            return fail(err, n, std::string("TCA_GGML_PREFILL_LAYERS must be 'lo-hi' (layer indices), got '") + e + "'");
        cfg.dense_prefill_lo = lo;   // experiment (docs/design.md "Knobs")
        cfg.dense_prefill_hi = hi;
    }
    if (const char * e = getenv("TCA_GGML_DECODE_HOLD_LAYERS"); e && *e && cfg.hold) {
        // experiment: "lo-hi,l,..." layers that attend the hold tier at every decode step
        cfg.decode_hold_layers.assign(n_layer, false);
        for (const char * q = e; *q;) {
            int lo = -1, hi = -1, used = 0;
            if (sscanf(q, "%d-%d%n", &lo, &hi, &used) == 2) {
            } else if (sscanf(q, "%d%n", &lo, &used) == 1) {
                hi = lo;
            } else {
                lo = -1;
            }
            if (lo < 0 || hi < lo || hi >= (int) n_layer || (q[used] && q[used] != ','))
                return fail(err, n, std::string("TCA_GGML_DECODE_HOLD_LAYERS must be a list of layers or 'lo-hi' ranges, got '") + e + "'");
            for (int l = lo; l <= hi; ++l) cfg.decode_hold_layers[l] = true;
            q += used + (q[used] == ',');
        }
    }
    // experiments (docs/design.md "Knobs"): decode recall, exact or by blocks
    long v = 0;
    if (cfg.hold && env_checked("TCA_GGML_RECALL", 0, 4096, v, err, n)) return 1;
    cfg.recall = (uint32_t) v;
    v = 0;
    if (cfg.hold && env_checked("TCA_GGML_RECALL_BLOCKS", 0, 1024, v, err, n)) return 1;
    cfg.recall_blocks = (uint32_t) v;
    v = cfg.recall_bs;
    if (cfg.recall_blocks && env_checked("TCA_GGML_RECALL_BS", 1, 256, v, err, n)) return 1;
    if (v & (v - 1)) return fail(err, n, "TCA_GGML_RECALL_BS must be a power of 2, got " + std::to_string(v));
    cfg.recall_bs = (uint32_t) v;
    if (cfg.recall && cfg.recall_blocks)
        return fail(err, n, "TCA_GGML_RECALL and TCA_GGML_RECALL_BLOCKS exclude each other");
    cfg.n_obs = (s & TCA_SET_N_OBS) ? (uint32_t) c.n_obs : 32u;
    cfg.n_whole = (s & TCA_SET_N_WHOLE) ? (uint32_t) c.n_whole : 4u;
    cfg.type_hold = (s & TCA_SET_TYPE_HOLD) ? c.type_hold : -1;
    if (s & TCA_SET_HOLD_DECODE) {
        cfg.hold_decode = hold_decode_steps(c.n_hold_decode, on_gpu);
    } else if (const char * e = getenv("TCA_GGML_HOLD_DECODE"); e && *e) {
        char * end = nullptr;
        const long v = strtol(e, &end, 10);
        if (*end || v < TCA_HOLD_DECODE_AUTO || v > (1 << 20))
            return fail(err, n, std::string("TCA_GGML_HOLD_DECODE must be an integer in [0, 1048576], -1 or -2, got '") + e + "'");
        cfg.hold_decode = hold_decode_steps(v, on_gpu);   // tools without Python (tca-llama-bench)
    } else {
        cfg.hold_decode = hold_decode_steps(TCA_HOLD_DECODE_AUTO, on_gpu);
    }
    if (!cfg.hold) cfg.hold_decode = 0;
    read_knobs(cfg);

    out = tca_config{};
    out.set = TCA_SET_BLOCK | TCA_SET_WINDOW | TCA_SET_ALPHA | TCA_SET_N_SINK | TCA_SET_RETENTION | TCA_SET_N_OBS |
              TCA_SET_N_WHOLE | TCA_SET_TYPE_HOLD | TCA_SET_PREFILL | TCA_SET_HOLD_DECODE |
              (forced ? TCA_SET_DENSITY : 0);
    out.density = forced ? c.density : 0.0;
    out.block = cfg.block;
    out.window = cfg.window;
    out.alpha = cfg.alpha;
    out.n_sink = cfg.n_sink;
    out.retention = retention;
    out.n_obs = cfg.n_obs;
    out.n_whole = cfg.n_whole;
    out.type_hold = cfg.type_hold;
    out.prefill = prefill;
    out.n_hold_decode = cfg.hold_decode == UINT32_MAX ? (int64_t) TCA_HOLD_DECODE_ALL : (int64_t) cfg.hold_decode;
    return 0;
}

// Why a TCA retention cache cannot hold rows of type t and head size d, or "" when it can: the memory
// (native/llama/llama-tca-memory.cpp) moves rows in 4-byte words and keeps quantized rows as whole
// blocks, so a row must be a whole number of blocks and a multiple of 4 bytes. q8_0 (blocks of 32
// values in 34 bytes), q4_0 (18) and q5_0 (22) need a head size that is a multiple of 64: with head
// size 32 a row is one block, not a multiple of 4 bytes.
static std::string row_misfit(const char * name, const char * tier, ggml_type t, int64_t d) {
    const int64_t blck = ggml_blck_size(t);
    const size_t tsize = ggml_type_size(t);
    if (d % blck == 0 && ggml_row_size(t, d) % 4 == 0) return "";
    const size_t g = tsize % 4 == 0 ? 4 : tsize % 2 == 0 ? 2 : 1;  // gcd(type size, 4)
    const int64_t need = blck * (int64_t) (4 / g);
    std::string fits;
    for (ggml_type u : { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q5_1, GGML_TYPE_Q5_0,
                         GGML_TYPE_Q4_1, GGML_TYPE_Q4_0 }) {
        if (d % ggml_blck_size(u) == 0 && ggml_row_size(u, d) % 4 == 0) fits += std::string(fits.empty() ? "" : ", ") + ggml_type_name(u);
    }
    std::string msg = std::string(name) + "=" + ggml_type_name(t) + " does not fit the TCA " + tier + " of this model: ";
    if (d % blck) {
        msg += "its head size " + std::to_string(d) + " is not a multiple of the " + ggml_type_name(t) + " block of " +
               std::to_string(blck) + " values";
    } else {
        msg += "a row of head size " + std::to_string(d) + " is " + std::to_string(ggml_row_size(t, d)) + " bytes (" +
               ggml_type_name(t) + " stores " + std::to_string(blck) + " values in " + std::to_string(tsize) +
               " bytes), and TCA moves rows in 4-byte words";
    }
    msg += "; " + std::string(ggml_type_name(t)) + " needs a head size that is a multiple of " + std::to_string(need) +
           ". Types that fit head size " + std::to_string(d) + ": " + fits;
    return msg;
}

// After a failed llama_init_from_model (upstream logs the memory's exception and returns NULL): the
// cause that a K/V type gives, in words.
static std::string diagnose_rows(const llama_model * model, const llama_context_params & params, const llama_tca_config & cfg) {
    const auto & hp = model->hparams;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        if (!hp.has_kv(il) || hp.n_head_kv(il) == 0) continue;
        const int64_t dk = hp.n_embd_head_k(il), dv = hp.n_embd_head_v(il);
        std::string m = row_misfit("type_k", "retention cache", params.type_k, dk);
        if (m.empty()) m = row_misfit("type_v", "retention cache", params.type_v, dv);
        if (m.empty() && cfg.hold) {
            const bool own = cfg.type_hold >= 0;
            const ggml_type hk = own ? (ggml_type) cfg.type_hold : params.type_k;
            const ggml_type hv = own ? (ggml_type) cfg.type_hold : params.type_v;
            m = row_misfit(own ? "tca_hold_type" : "type_k", "hold tier", hk, dk);
            if (m.empty()) m = row_misfit(own ? "tca_hold_type" : "type_v", "hold tier", hv, dv);
        }
        if (!m.empty()) return m;
    }
    return "";
}

static llama_context * tca_context_create_impl(llama_model * model, llama_context_params params, const tca_budgets * budgets,
                                              const tca_config * c, tca_config * resolved, char * err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!model) { fail(err, err_len, "model is NULL"); return nullptr; }
    if (tca_config_check(c, err, err_len)) return nullptr;
    llama_tca_config cfg;
    tca_config out;
    if (resolve(model, budgets, *c, kv_on_gpu(model, params), cfg, out, err, err_len)) return nullptr;
    if (resolved) *resolved = out;
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
        for (llama_tca_memory * m : llama_tca_memories(llama_get_memory(ctx))) {
            m->set_sched(ctx->get_sched());
        }
    }
    if (!ctx && err && err_len && !err[0]) {
        const std::string why = diagnose_rows(model, params, cfg);
        fail(err, err_len, why.empty() ? "context creation failed (see the log)" : why);
    }
    return ctx;
}

// ---- the entry points: no exception crosses into C (tca_guard.h) ----
extern "C" int tca_forced_budget(double density, uint32_t block, float * p, uint32_t n_k) {
    return tca_guard(__func__, 1, nullptr, 0, [&] { return tca_forced_budget_impl(density, block, p, n_k); });
}

extern "C" int tca_config_check(const tca_config * c, char * err, size_t n) {
    return tca_guard(__func__, 1, err, n, [&] { return tca_config_check_impl(c, err, n); });
}

extern "C" llama_context * tca_context_create(llama_model * model, llama_context_params params, const tca_budgets * budgets,
                                              const tca_config * c, tca_config * resolved, char * err, size_t err_len) {
    llama_context * ctx = tca_guard(__func__, (llama_context *) nullptr, err, err_len, [&] {
        return tca_context_create_impl(model, params, budgets, c, resolved, err, err_len);
    });
    if (!ctx) llama_tca_set_pending(nullptr);  // never left pending for the next context
    return ctx;
}
