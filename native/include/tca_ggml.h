// tca_ggml — the project's own C API, for what llama.h lacks.
//
// llama.h's public structs are never changed (llama-cpp-python binds them by layout);
// everything the project adds is an additive tca_* function declared here.
//
// The Python bindings take their cffi declarations from this file as it is (installed as
// tca_ggml/decl/tca_ggml.h; python/tca_ggml/_native.py strips comments, preprocessor lines and
// TCA_API): keep it plain C declarations -- structs, enums, prototypes, integer #defines; no
// inline functions or function-like macros.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TCA_API __attribute__((visibility("default")))

// version of this library and of the pinned upstream it was built from
TCA_API const char * tca_version(void);
TCA_API const char * tca_upstream_version(void);

// sizeof / offsetof of llama.h structs as this library was compiled: the Python
// bindings check their declarations against these at import (name: "llama_model_params",
// "llama_context_params", "llama_batch", "llama_chat_message", "llama_sampler_chain_params";
// field: NULL for sizeof), and the sizeof of this header's structs ("tca_config", "tca_stats",
// "tca_budgets", "tca_rpc_stats"; the bindings' declarations are read from this header). Returns -1 for an
// unknown name.
TCA_API int64_t tca_abi_layout(const char * struct_name, const char * field);

// Validate a GGUF header without loading tensors: magic, version, key/value section and
// tensor infos, and that every tensor's data lies inside the file. Returns 0 when sane;
// otherwise nonzero with a message in err (NUL-terminated, truncated to err_len).
TCA_API int tca_gguf_check(const char * path, char * err, size_t err_len);

// Every entry point of this header catches C++ exceptions (native/src/tca_guard.h): an exception
// is logged as an error line, written into err where the function has one, and the function
// returns its failure value; it never unwinds into the caller (which would abort a Python process).
//
// tca_gguf_check also refuses what upstream's loader would assert on (abort) or compute garbage
// from: a path that is not a regular file (FIFO, directory, device), <arch>.block_count outside
// [1, 512], <arch>.embedding_length above 2^20, <arch>.attention.head_count above the embedding length,
// <arch>.attention.head_count_kv above head_count (scalars; per-layer arrays are upstream's to check),
// a negative or non-finite <arch>.attention.layer_norm_(rms_)epsilon, a non-finite or
// non-positive <arch>.rope.freq_base(_swa), a duplicated string in tokenizer.ggml.tokens. Linear in
// the file's tensor and token counts.

// llama_tokenize / llama_token_to_piece (same arguments and results) with upstream's exceptions
// caught (e.g. std::invalid_argument for a code point above U+10FFFF): on an exception they return
// INT32_MIN with the message in err (err[0] is 0 otherwise).
struct llama_vocab;
struct llama_context;
TCA_API int32_t tca_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len, int32_t * tokens,
                             int32_t n_tokens_max, int add_special, int parse_special, char * err, size_t err_len);
// llama_decode (same result) with an exception from the graph or the memory caught: INT32_MIN and
// the message in err.
struct llama_batch;
TCA_API int32_t tca_decode(struct llama_context * ctx, const struct llama_batch * batch, char * err, size_t err_len);
TCA_API int32_t tca_token_to_piece(const struct llama_vocab * vocab, int32_t token, char * buf, int32_t length,
                                   int32_t lstrip, int special, char * err, size_t err_len);

// Self-test of the CPU backend's matrix multiplication (guards against the AMX-path
// crash on these machines): multiplies an (n x k) weight of the given ggml type
// (0 = f32, 1 = f16, 8 = q8_0, 12 = q4_K) by a (k x m) f32 input through the
// CPU backend and returns the max abs error vs a double-precision reference on the
// dequantized weight, or a negative value on failure.
TCA_API double tca_selftest_matmul(int type, int n, int k, int m, int n_threads);

struct llama_context;

// Bytes held by a context, summed over backends: model weights, context memory (the KV
// cache / TCA retention cache), compute buffers. Any pointer may be NULL.
TCA_API void tca_context_memory(const struct llama_context * ctx, uint64_t * model, uint64_t * context, uint64_t * compute);

struct ggml_tensor;

// For eval callbacks (calibration capture): a tensor's name, shape and type; and its data
// converted to f32 (f32/f16/bf16, contiguous; any backend). Return 0 on success.
TCA_API int tca_tensor_meta(const struct ggml_tensor * t, char * name, size_t name_len, int64_t * ne4, int32_t * type);
TCA_API const char * tca_tensor_op(const struct ggml_tensor * t);  // ggml_op_name of the op that made t
TCA_API int tca_tensor_get_f32(const struct ggml_tensor * t, float * dst, int64_t n_elements);

// ---- TCA contexts ------------------------------------------------------------------
struct llama_model;
struct llama_context_params;
struct tca_budgets;

// ---- the one entry that configures a TCA context -------------------------------------------
// Everything the caller knows about a context's TCA configuration, as plain numbers. The budgets
// come from a GGUF's tca.* keys (struct tca_budgets, tca_budgets_read below) or, with
// TCA_SET_DENSITY, from a forced uniform density; every other field is an optional override.
//
// Shape contract: a field is read only when its TCA_SET_* bit is in `set`; otherwise the default
// in [brackets] applies ("budgets" = the calibrated value of the tca_budgets passed; without them
// the forced-density defaults). Ranges are checked by tca_config_check (also called by
// tca_context_create: the only place where TCA configuration is validated). Every message names
// the parameter as the Python API spells it (tca_block, tca_window, ...).
struct tca_config {
    uint32_t set;        // TCA_SET_* bits: which of the fields below are given
    double   density;    // DENSITY: forced uniform kept share of each aged block, (0, 1]
                         //   (uncalibrated, benchmarks only) [none: the budgets are required]
    int64_t  block;      // BLOCK: b, a power of two in [1, 4096]; with calibrated budgets only
                         //   their own block size [budgets: tca.block_size, else 128]
    int64_t  window;     // WINDOW: w, a multiple of b, in [1, 2^20] [budgets: tca.window, else 4096]
    float    alpha;      // ALPHA: importance / diversity weight in [0, 1] [budgets: tca.alpha, else 0.5]
    int64_t  n_sink;     // N_SINK: first tokens always kept, [0, 65536] [budgets: tca.n_sink, else 4]
    int32_t  retention;  // RETENTION: TCA_RETENTION_HOLD or TCA_RETENTION_STREAM
                         //   [HOLD; TCA_GGML_RETENTION=stream picks STREAM, for tools without Python]
    int64_t  n_obs;      // N_OBS: hold: the prompt's last queries that score the final selection,
                         //   [1, 4096] [32]
    int64_t  n_whole;    // N_WHOLE: hold: the final selection's top-ranked blocks kept whole (k = b),
                         //   taken from the head's budget shares, [0, 65536] [4]
    int32_t  type_hold;  // TYPE_HOLD: hold: ggml_type of the hold tier, GGML_TYPE_F32 (0), F16 (1)
                         //   or Q8_0 (8; halves it for f16 caches) [the cache's type_k]
    int32_t  prefill;    // PREFILL: hold: what a prompt's ubatches attend, TCA_PREFILL_SPARSE,
                         //   TCA_PREFILL_DENSE or TCA_PREFILL_EARLY [EARLY with hold, SPARSE with
                         //   stream; TCA_GGML_PREFILL=sparse|dense|early picks one, for tools]
    int64_t  n_hold_decode; // HOLD_DECODE: hold: the first decode steps after a prompt's end that
                         //   attend every held row (the answer's start), [0, 1048576], or
                         //   TCA_HOLD_DECODE_ALL: every decode step (decode fidelity first), or
                         //   TCA_HOLD_DECODE_AUTO: ALL when the KV cache is on the CPU (there TCA's
                         //   kernel over every held row still decodes faster than upstream's dense
                         //   path), TCA_HOLD_DECODE_GPU steps when it is on a GPU
                         //   [AUTO, resolved at context creation; TCA_GGML_HOLD_DECODE=N, for tools]
};
#define TCA_HOLD_DECODE_GPU 32
#define TCA_HOLD_DECODE_ALL -1
#define TCA_HOLD_DECODE_AUTO -2
#define TCA_SET_DENSITY   1
#define TCA_SET_BLOCK     2
#define TCA_SET_WINDOW    4
#define TCA_SET_ALPHA     8
#define TCA_SET_N_SINK    16
#define TCA_SET_RETENTION 32
#define TCA_SET_N_OBS     64
#define TCA_SET_N_WHOLE   128
#define TCA_SET_TYPE_HOLD 256
#define TCA_SET_PREFILL   512
#define TCA_SET_HOLD_DECODE 1024
// Retention policies (docs/design.md "Retention"): HOLD keeps every row of the sequence in a
// second tier until a prompt's last ubatch (the one that asks for logits) has been seen, attends
// it there, and selects what stays by that ubatch's last n_obs queries; STREAM evicts for good
// after every ubatch (the smallest peak; rows the filler's queries did not read are lost).
#define TCA_RETENTION_HOLD   0
#define TCA_RETENTION_STREAM 1
// What the ubatches of a prompt before its last attend (docs/design.md "Retention"): SPARSE the fast
// tier (window + sinks + the blocks the budgets kept: prefill speed-up); DENSE (hold only) every
// held row, as upstream's cache (no prefill speed-up; the prompt's K/V rows are exactly dense's,
// the budgets apply from the prompt's end: decode speed and resident KV as SPARSE's).
#define TCA_PREFILL_SPARSE 0
#define TCA_PREFILL_DENSE  1
#define TCA_PREFILL_EARLY  2   // the first half of the layers dense, the rest sparse (docs/design.md);
                               // the default with HOLD since session 11

// The fields of *c on their own (no model, no budgets): 0 when valid; otherwise nonzero with a
// message in err. For early, clear errors (before a model is loaded); tca_context_create runs it too.
TCA_API int tca_config_check(const struct tca_config * c, char * err, size_t err_len);

// llama_init_from_model with the TCA retention memory instead of the dense KV cache, configured by
// budgets (a GGUF's, from tca_budgets_read; NULL: none) and *c (see struct tca_config). Validates
// once: *c's fields, the budget source (budgets or TCA_SET_DENSITY), the budgets against the model
// (layers, KV heads) and the resolved window / block. When `resolved` is not NULL it receives the
// configuration in force (every TCA_SET_* bit set; density only with TCA_SET_DENSITY), also when the
// context falls back to the dense cache. Contexts with n_ctx <= window + block, and models whose
// memory is not the plain KV cache (SWA, recurrent, hybrid), get upstream's dense cache (logged;
// tca_get_stats says active=0). On error returns NULL with a message in err.
TCA_API struct llama_context * tca_context_create(struct llama_model * model, struct llama_context_params params,
                                                  const struct tca_budgets * budgets, const struct tca_config * c,
                                                  struct tca_config * resolved, char * err, size_t err_len);

// The forced (uncalibrated) budget, the same for every (layer, KV head): the kept-rows distribution
// over k_values 1, 2, 4, ..., block (n_k = log2(block) + 1 values into p) with expectation
// t = clamp(density * block, 1, block): one-hot on t when t is a power of two, otherwise the mix
// of the two powers of two around t (python: tca_ggml.reference.forced_budget is its reference).
// Returns 0, or nonzero for a density outside (0, 1], a bad block or n_k != log2(block) + 1.
TCA_API int tca_forced_budget(double density, uint32_t block, float * p, uint32_t n_k);

struct tca_stats {
    int32_t  active;           // 1 when the context runs TCA
    uint32_t n_layers;
    uint32_t n_seen;           // tokens of the sequence
    uint32_t frontier;         // blocks before this position have been selected
    uint64_t bytes_alloc;      // retention cache bytes allocated
    uint64_t bytes_dense;      // what the dense KV cache would allocate for this n_ctx
    uint64_t rows_kept;        // rows held now, summed over layers and KV heads
    uint64_t rows_cap;         // rows allocated
    uint64_t n_compactions;
    double   t_compact_ms;     // time spent selecting + compacting (device work included)
    uint64_t bytes_device;     // of bytes_alloc, in device (non-host) buffers
    int32_t  retention;        // TCA_RETENTION_*
    uint64_t bytes_hold;       // of bytes_alloc, the hold tier (every row of the sequence; 0 for STREAM)
    uint64_t rows_held;        // rows in the hold tier now, summed over layers and KV heads
    uint64_t n_final;          // final selections (prompt ends) from the hold tier
    uint64_t bytes_resident;   // of the fast tier, the bytes of the rows held now (K + V + position):
                               // what attention reads after a prompt; bytes_alloc - bytes_hold is its peak
    uint32_t n_obs_last;       // observation queries (the prompt's last ones) of the last final selection
    uint64_t n_refresh;        // selections from the hold tier after the hold-decode steps (TCA_GGML_REFRESH)
    uint64_t n_final_lazy;     // of n_final, those that ran after their prompt's first decode step: deferred
                               // while every step attended the hold tier (hold_decode), run when a ubatch
                               // needed the kept set (a prompt, a step after the hold-decode steps, a full
                               // fast tier) or when flushed (these statistics, a state save, seq_rm)
};
TCA_API int tca_get_stats(const struct llama_context * ctx, struct tca_stats * out);  // 1 active, 0 not
// A context of several sequences (n_seq_max > 1: one retention memory a sequence, n_ctx / n_seq_max
// tokens each): tca_get_stats sums them (frontier, n_obs_last: the largest); this is one sequence's.
// Returns 1, 0 (no TCA, or no such sequence), -1 (seq_id < 0, or an error).
TCA_API int tca_get_seq_stats(const struct llama_context * ctx, int32_t seq_id, struct tca_stats * out);
// per (layer, KV head): retained rows, capacity, coverage of q_last at the last compaction.
// Returns the number of heads (fills at most n_max entries; any pointer may be NULL; several
// sequences: sequence 0's heads, then sequence 1's, ...).
TCA_API int64_t tca_get_head_stats(const struct llama_context * ctx, int32_t * layer, uint32_t * kv_head,
                                   uint32_t * len, uint32_t * cap, float * coverage, int64_t n_max);

// retained positions of one (layer, KV head), ascending; returns their count (-1: no such head / no TCA);
// several sequences: sequence 0's
TCA_API int64_t tca_get_head_positions(const struct llama_context * ctx, int32_t il, uint32_t kv_head, int32_t * pos, int64_t n_max);

// llama_model_quantize (= llama-quantize) with the common knobs; 0 on success.
TCA_API int tca_quantize(const char * src, const char * dst, int ftype, int allow_requantize, int n_threads);

// ---- ggml RPC (Llama(rpc_servers=...); docs/design.md "RPC") ------------------------------
// 1 when this library was built with ggml's RPC client (-DTCA_GGML_RPC=ON, the default), else 0.
TCA_API int tca_rpc_available(void);
// Connect to an rpc-server at endpoint ("host:port", IPv4 or a host name), register it with ggml's
// RPC backend and write its devices (ggml_backend_dev_t) to devs (at most max_devs; the caller puts
// them, NULL-terminated, in llama_model_params.devices). Returns the number of devices, or -1 with
// the reason in err: a malformed endpoint, a refused or timed-out connection (GGML_RPC_CONNECT_TIMEOUT
// seconds, default 10), a failed handshake (another protocol version), a library without RPC.
TCA_API int32_t tca_rpc_add_server(const char * endpoint, void ** devs, int32_t max_devs, char * err, size_t err_len);
// Counters of the RPC client (native/patches/0006): per endpoint, or summed over all when endpoint
// is NULL. 0 on success, -1 when built without RPC.
struct tca_rpc_stats {
    uint64_t n_cmds;         // commands sent
    uint64_t n_round_trips;  // commands that waited for the server's response
    uint64_t bytes_sent;     // command payload bytes
    uint64_t bytes_recv;     // response payload bytes
    uint64_t n_failures;     // connections that failed: refused at connect, or lost mid-session
};
TCA_API int tca_rpc_get_stats(const char * endpoint, struct tca_rpc_stats * out);
// tca_decode's result when a connection to an rpc-server failed during the call (the server was
// killed, the host vanished): the context's state is lost; err says so.
#define TCA_DECODE_RPC_LOST -1000

// ---- the native reader of tca.* metadata ----------------------------------------------
struct tca_budgets {
    uint32_t version, block, window, n_sink;
    float tau, alpha;
    uint32_t n_k;  uint32_t * k_values;
    uint32_t n_grid; float * grid_mu; float * grid_sigma;
    uint32_t n_layer; uint32_t * n_head_kv;
    uint32_t n_heads; int32_t * candidate; float * p /* n_heads x n_k */; float * density; float * coverage;
    char text_name[256]; char text_sha256[80]; uint32_t n_tokens; char tool[128];
};
// 0: read and valid; 1: the file has no tca.* keys; -1: error, err names the key (also tca.version
// missing while other tca.* keys are there: an incomplete calibration). The rules are those of the
// Python validator (tca_ggml.gguf_meta.TCABudgets.validate), tests/test_reliability.py compares them.
TCA_API int  tca_budgets_read(const char * path, struct tca_budgets * out, char * err, size_t err_len);
TCA_API void tca_budgets_free(struct tca_budgets * b);

#ifdef __cplusplus
}
#endif
