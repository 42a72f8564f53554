"""cffi (ABI mode) bindings to libtca_ggml.

Trimmed C declarations: only the subset of llama.h the package uses, plus the project's
own ``tca_ggml.h``. Enums inside structs are declared as ``int`` (their C ABI size); the
layouts are checked at import against the library's own ``sizeof``/``offsetof``
(``tca_abi_layout``), so a mismatched declaration fails loudly instead of corrupting memory.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import cffi

from .errors import NativeLibraryError

CDEF = r"""
typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;
struct llama_model;
struct llama_context;
struct llama_vocab;
struct llama_sampler;
struct llama_memory_i;
typedef struct llama_memory_i * llama_memory_t;

typedef bool (*llama_progress_callback)(float progress, void * user_data);
typedef bool (*ggml_backend_sched_eval_callback)(void * t, bool ask, void * user_data);
typedef bool (*ggml_abort_callback)(void * data);
typedef void (*ggml_log_callback)(int level, const char * text, void * user_data);

struct llama_model_params {
    void * devices;
    const void * tensor_buft_overrides;
    int32_t n_gpu_layers;
    int split_mode;
    int load_mode;
    int lazy_mode;
    int32_t main_gpu;
    const float * tensor_split;
    llama_progress_callback progress_callback;
    void * progress_callback_user_data;
    const void * kv_overrides;
    bool vocab_only;
    bool check_tensors;
    bool use_extra_bufts;
    bool no_host;
    bool no_alloc;
    bool load_mtp;
};

struct llama_sampler_seq_config { llama_seq_id seq_id; struct llama_sampler * sampler; };

struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    uint32_t n_rs_seq;
    uint32_t n_outputs_max;
    uint32_t n_outputs_max_per_seq;
    int32_t  n_threads;
    int32_t  n_threads_batch;
    int ctx_type;
    int rope_scaling_type;
    int pooling_type;
    int attention_type;
    int flash_attn_type;
    float    rope_freq_base;
    float    rope_freq_scale;
    float    yarn_ext_factor;
    float    yarn_attn_factor;
    float    yarn_beta_fast;
    float    yarn_beta_slow;
    uint32_t yarn_orig_ctx;
    float    defrag_thold;
    ggml_backend_sched_eval_callback cb_eval;
    void * cb_eval_user_data;
    int type_k;
    int type_v;
    ggml_abort_callback abort_callback;
    void *              abort_callback_data;
    bool embeddings;
    bool offload_kqv;
    bool no_perf;
    bool op_offload;
    bool swa_full;
    bool kv_unified;
    struct llama_sampler_seq_config * samplers;
    size_t n_samplers;
    struct llama_context * ctx_other;
};

typedef struct llama_batch {
    int32_t n_tokens;
    llama_token  *  token;
    float        *  embd;
    llama_pos    *  pos;
    int32_t      *  n_seq_id;
    llama_seq_id ** seq_id;
    int8_t       *  logits;
} llama_batch;

typedef struct llama_chat_message { const char * role; const char * content; } llama_chat_message;
typedef struct llama_sampler_chain_params { bool no_perf; } llama_sampler_chain_params;

void llama_backend_init(void);
void llama_log_set(ggml_log_callback log_callback, void * user_data);
const char * llama_print_system_info(void);

struct llama_model_params llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_sampler_chain_params llama_sampler_chain_default_params(void);

struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);
struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
void llama_free(struct llama_context * ctx);

uint32_t llama_n_ctx(const struct llama_context * ctx);
uint32_t llama_n_batch(const struct llama_context * ctx);
uint32_t llama_n_ubatch(const struct llama_context * ctx);
int32_t llama_model_n_ctx_train(const struct llama_model * model);
int32_t llama_model_n_embd(const struct llama_model * model);
int32_t llama_model_n_layer(const struct llama_model * model);
int32_t llama_model_n_head(const struct llama_model * model);
int32_t llama_model_n_head_kv(const struct llama_model * model);
uint64_t llama_model_size(const struct llama_model * model);
int32_t llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
const char * llama_model_chat_template(const struct llama_model * model, const char * name);

const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
llama_token llama_vocab_bos(const struct llama_vocab * vocab);
llama_token llama_vocab_eos(const struct llama_vocab * vocab);
bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
bool llama_vocab_get_add_bos(const struct llama_vocab * vocab);
int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                       llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
                             int32_t length, int32_t lstrip, bool special);
int32_t llama_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                         char * text, int32_t text_len_max, bool remove_special, bool unparse_special);
int32_t llama_chat_apply_template(const char * tmpl, const struct llama_chat_message * chat, size_t n_msg,
                                  bool add_ass, char * buf, int32_t length);

struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
void llama_batch_free(struct llama_batch batch);
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
void llama_synchronize(struct llama_context * ctx);
void llama_set_abort_callback(struct llama_context * ctx, ggml_abort_callback abort_callback, void * abort_callback_data);

llama_memory_t llama_get_memory(const struct llama_context * ctx);
void llama_memory_clear(llama_memory_t mem, bool data);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
size_t llama_state_get_size(struct llama_context * ctx);
size_t llama_state_get_data(struct llama_context * ctx, uint8_t * dst, size_t size);
size_t llama_state_set_data(struct llama_context * ctx, const uint8_t * src, size_t size);

struct llama_sampler * llama_sampler_chain_init(struct llama_sampler_chain_params params);
void llama_sampler_chain_add(struct llama_sampler * chain, struct llama_sampler * smpl);
struct llama_sampler * llama_sampler_init_greedy(void);
struct llama_sampler * llama_sampler_init_dist(uint32_t seed);
struct llama_sampler * llama_sampler_init_top_k(int32_t k);
struct llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_typical(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_temp(float t);
struct llama_sampler * llama_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n,
                                                    float penalty_repeat, float penalty_freq, float penalty_present);
llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);
void llama_sampler_accept(struct llama_sampler * smpl, llama_token token);
void llama_sampler_reset(struct llama_sampler * smpl);
void llama_sampler_free(struct llama_sampler * smpl);

/* tca_ggml.h */
const char * tca_version(void);
const char * tca_upstream_version(void);
int64_t tca_abi_layout(const char * struct_name, const char * field);
int tca_gguf_check(const char * path, char * err, size_t err_len);
double tca_selftest_matmul(int type, int n, int k, int m, int n_threads);
int tca_tensor_meta(void * t, char * name, size_t name_len, int64_t * ne4, int32_t * type);
const char * tca_tensor_op(void * t);
int tca_tensor_get_f32(void * t, float * dst, int64_t n_elements);
struct tca_params {
    uint32_t block; uint32_t window; uint32_t n_sink; float alpha;
    uint32_t n_k; const uint32_t * k_values;
    uint32_t n_layer; const uint32_t * n_head_kv;
    const float * p; int32_t forced;
    int32_t retention; uint32_t n_obs; int32_t n_whole; int32_t type_hold;
};
int tca_params_forced(const struct llama_model * model, float density, uint32_t block, uint32_t window,
                      struct tca_params * out, char * err, size_t err_len);
void tca_params_free(struct tca_params * p);
struct llama_context * tca_init_from_model(struct llama_model * model, struct llama_context_params params,
                                           const struct tca_params * tp, char * err, size_t err_len);
struct tca_stats {
    int32_t active; uint32_t n_layers; uint32_t n_seen; uint32_t frontier;
    uint64_t bytes_alloc; uint64_t bytes_dense; uint64_t rows_kept; uint64_t rows_cap;
    uint64_t n_compactions; double t_compact_ms; uint64_t bytes_device;
    int32_t retention; uint64_t bytes_hold; uint64_t rows_held; uint64_t n_final;
};
int tca_get_stats(const struct llama_context * ctx, struct tca_stats * out);
int64_t tca_get_head_stats(const struct llama_context * ctx, int32_t * layer, uint32_t * kv_head,
                           uint32_t * len, uint32_t * cap, float * coverage, int64_t n_max);
int64_t tca_get_head_positions(const struct llama_context * ctx, int32_t il, uint32_t kv_head, int32_t * pos, int64_t n_max);
struct tca_budgets {
    uint32_t version, block, window, n_sink;
    float tau, alpha;
    uint32_t n_k;  uint32_t * k_values;
    uint32_t n_grid; float * grid_mu; float * grid_sigma;
    uint32_t n_layer; uint32_t * n_head_kv;
    uint32_t n_heads; int32_t * candidate; float * p; float * density; float * coverage;
    char text_name[256]; char text_sha256[80]; uint32_t n_tokens; char tool[128];
};
int  tca_budgets_read(const char * path, struct tca_budgets * out, char * err, size_t err_len);
void tca_budgets_free(struct tca_budgets * b);
int tca_quantize(const char * src, const char * dst, int ftype, int allow_requantize, int n_threads);
void tca_context_memory(const struct llama_context * ctx, uint64_t * model, uint64_t * context, uint64_t * compute);
"""

LIB_NAME = "libtca_ggml.so"

ffi = cffi.FFI()
ffi.cdef(CDEF)

_lib = None
_lib_path: Path | None = None
_lock = threading.Lock()

# Log capture: upstream reports load failures through the log callback; we keep the
# recent error lines so exceptions can carry upstream's own message.
_log_state = {"verbose": False, "errors": [], "callback": None}
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_CONT = 5


def library_path() -> Path:
    env = os.environ.get("TCA_GGML_LIB")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    return here / "lib" / LIB_NAME


@ffi.callback("void(int, const char *, void *)")
def _log_cb(level, text, user_data):  # pragma: no cover - exercised through loads
    # Never let an exception escape into C: store it, the caller re-raises.
    try:
        msg = ffi.string(text).decode("utf-8", "replace") if text != ffi.NULL else ""
        if level in (GGML_LOG_LEVEL_ERROR,) or (level == GGML_LOG_LEVEL_CONT and _log_state.get("last_error")):
            _log_state["errors"].append(msg)
            del _log_state["errors"][:-50]
            _log_state["last_error"] = level == GGML_LOG_LEVEL_ERROR or _log_state.get("last_error")
        else:
            _log_state["last_error"] = False
        cb = _log_state["callback"]
        if cb is not None:
            cb(level, msg)
        elif _log_state["verbose"]:
            sys.stderr.write(msg)
    except BaseException as e:  # noqa: BLE001
        _log_state["pending"] = e


def set_verbose(verbose: bool) -> None:
    _log_state["verbose"] = bool(verbose)


def set_log_callback(cb) -> None:
    """cb(level: int, text: str) or None. Exceptions raised in it are re-raised by the
    next API call that checks (`pop_pending_exception`)."""
    _log_state["callback"] = cb


def take_errors() -> str:
    msg = "".join(_log_state["errors"]).strip()
    _log_state["errors"].clear()
    return msg


def pop_pending_exception():
    e = _log_state.pop("pending", None)
    if e is not None:
        raise e


def lib():
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        p = library_path()
        if not p.exists():
            raise NativeLibraryError(
                f"native library not found at {p}; build the package with `pip install .` "
                f"(or set TCA_GGML_LIB to a built libtca_ggml.so)")
        try:
            L = ffi.dlopen(str(p))
        except OSError as e:
            raise NativeLibraryError(f"cannot load {p}: {e}") from e
        _check_abi(L)
        L.llama_log_set(_log_cb, ffi.NULL)
        L.llama_backend_init()
        _lib, _lib_path = L, p
        return L


def _check_abi(L) -> None:
    checks = [("llama_model_params", None), ("llama_model_params", "n_gpu_layers"),
              ("llama_model_params", "progress_callback"), ("llama_model_params", "kv_overrides"),
              ("llama_model_params", "vocab_only"), ("llama_model_params", "load_mtp"),
              ("llama_context_params", None), ("llama_context_params", "n_threads_batch"),
              ("llama_context_params", "flash_attn_type"), ("llama_context_params", "cb_eval"),
              ("llama_context_params", "type_k"), ("llama_context_params", "type_v"),
              ("llama_context_params", "abort_callback"), ("llama_context_params", "kv_unified"),
              ("llama_context_params", "samplers"), ("llama_context_params", "ctx_other"),
              ("llama_batch", None), ("llama_batch", "logits"),
              ("llama_chat_message", None), ("llama_sampler_chain_params", None)]
    for struct, field in checks:
        want = L.tca_abi_layout(struct.encode(), field.encode() if field else ffi.NULL)
        ctype = f"struct {struct}"
        got = ffi.sizeof(ctype) if field is None else ffi.offsetof(ctype, field)
        if want != got:
            raise NativeLibraryError(
                f"ABI mismatch: {struct}{'.' + field if field else ''} is {want} in the library, "
                f"{got} in the Python declarations")
