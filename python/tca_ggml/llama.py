"""`tca_ggml.Llama`: the common surface of `llama_cpp.Llama`, on our own native library.

Same names and defaults as llama-cpp-python 0.3.36 for what is implemented; unknown
keyword arguments raise `TypeError` (llama-cpp-python swallows them silently).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import multiprocessing
import os
import stat
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from . import _native
from .errors import (ContextError, ContextOverflowError, DecodeError, ModelLoadError, RPCError,
                     TCAConfigError, TokenizeError)

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
LLAMA_FLASH_ATTN_TYPE_ENABLED = 1
LLAMA_LOAD_MODE_NONE = 0
LLAMA_LOAD_MODE_MMAP = 1
LLAMA_LOAD_MODE_MLOCK = 2
LLAMA_LOAD_MODE_MMAP_MLOCK = 3

# ggml_type values accepted for type_k / type_v (same integers as llama_cpp.GGML_TYPE_*)
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1 = 0, 1, 2, 3
GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0, GGML_TYPE_BF16 = 6, 7, 8, 30
_KV_TYPES = {GGML_TYPE_F32: "f32", GGML_TYPE_F16: "f16", GGML_TYPE_Q4_0: "q4_0", GGML_TYPE_Q4_1: "q4_1",
             GGML_TYPE_Q5_0: "q5_0", GGML_TYPE_Q5_1: "q5_1", GGML_TYPE_Q8_0: "q8_0", GGML_TYPE_BF16: "bf16"}


@dataclass
class Timings:
    """What the last completion cost (wall clock, seconds)."""
    prompt_tokens: int = 0        # tokens evaluated for the prompt (after prefix reuse)
    prompt_cached: int = 0        # prompt tokens reused from the previous call
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _is_int(v: Any) -> bool:
    """An integer value (int or a numpy integer), never a bool or a float."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, np.integer) and not isinstance(v, np.bool_)


def _check_tokens(tokens: Any, n_vocab: int, name: str = "token ids") -> List[int]:
    """`tokens` as a list of ints, each in [0, n_vocab): TypeError for anything that is not an
    integer (floats, bools, strings), TokenizeError for an id out of range. Before any native call."""
    if isinstance(tokens, (str, bytes, bytearray)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(tokens).__name__}")
    out = []
    for t in tokens:
        if not _is_int(t):
            raise TypeError(f"{name} must be ints, got {type(t).__name__} {t!r}")
        t = int(t)
        if not 0 <= t < n_vocab:
            raise TokenizeError(f"token id {t} out of range [0, {n_vocab})")
        out.append(t)
    return out


def _check_float(name: str, v: Any, lo: Optional[float] = None, lo_open: bool = False) -> float:
    """A finite real number (TypeError for a non-number or bool, ValueError for NaN / inf or
    below `lo`)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            import numpy as np
            ok = isinstance(v, (np.integer, np.floating)) and not isinstance(v, np.bool_)
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    return v


def _check_sampling(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                    presence_penalty, seed) -> None:
    """The sampling parameters, before the sampler chain is built: numbers and finite (a NaN
    temperature or top_p would sample garbage silently)."""
    _check_float("temperature", temperature)
    _check_int("top_k", top_k)
    for name, v in (("top_p", top_p), ("min_p", min_p), ("typical_p", typical_p),
                    ("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        _check_float(name, v)
    _check_float("repeat_penalty", repeat_penalty, 0.0, lo_open=True)
    if seed is not None:
        _check_int("seed", seed, 0, 0xFFFFFFFF)


def _locked(method):
    """Run `method` holding the instance's lock (``Llama._lock``, reentrant): one native context is
    never used by two threads at once."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


def _logprobs(row, tok: int, n_top: int):
    """(log-probability of `tok`, [(id, log-probability)] of the `n_top` most likely tokens, most
    likely first, ties by id): the log-softmax of a raw logits row (float64 arithmetic)."""
    import numpy as np
    x = np.asarray(row, dtype=np.float64)
    m = float(np.max(x))
    if not math.isfinite(m):
        m = 0.0
    lse = m + math.log(float(np.sum(np.exp(x - m))))
    top = []
    k = min(int(n_top), x.size)
    if k > 0:
        idx = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
        idx = idx[np.lexsort((idx, -x[idx]))]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return float(x[tok] - lse), top


# save_state's envelope: magic, then the identity of the model the state belongs to, then
# upstream's state bytes (llama_state_get_data). load_state checks the identity first.
_STATE_MAGIC = b"tca_ggml.state\x00\x01"
_STATE_IDENT = struct.Struct("<iiiQ32s")   # n_vocab, n_embd, n_layer, model file size, fingerprint


def _model_fingerprint(path: str) -> tuple:
    """(size, sha256) of a model file: its first 4 MiB (header, metadata, vocabulary), 32 spread
    64 KiB samples and its last 64 KiB -- tells apart two models of the same shape (different
    weights) in milliseconds, without reading the whole file."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        for i in range(1, 33):
            f.seek(size * i // 33)
            h.update(f.read(64 << 10))
        f.seek(max(size - (64 << 10), 0))
        h.update(f.read(64 << 10))
    h.update(struct.pack("<Q", size))
    return size, h.digest()


def _check_int(name: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


# tca_retention (native/include/tca_ggml.h TCA_RETENTION_*; docs/design.md "Retention"):
# "hold" keeps every row until a prompt's end (the question) decides what stays; "stream"
# evicts after every ubatch (smallest peak memory, loses what filler queries did not read).
RETENTIONS = {"hold": 0, "stream": 1}
# tca_prefill (TCA_PREFILL_*): what a prompt's ubatches attend. "sparse": the fast tier (prefill
# speed-up); "dense" (hold only): every row, as upstream (no prefill speed-up, the prompt's rows
# exactly dense's; the budgets apply from the prompt's end: decode speed-up and resident KV kept).
# "early" (the default with hold since session 11): the first half of the layers attend every row,
# the others the fast tier (the early layers' far attention is query-specific, spread over rows that
# no shared or block-granular selection catches: docs/benchmarks.md "sessions 9-10", "session 11").
PREFILLS = {"sparse": 0, "dense": 1, "early": 2}

# The TCA switches of Llama(...) and the struct tca_config field + TCA_SET_* bit each sets
# (native/include/tca_ggml.h). Their values are validated by the native owner of the TCA
# configuration (tca_config_check / tca_context_create), never here.
_TCA_FIELDS = (("density", "density", "TCA_SET_DENSITY"), ("block", "block", "TCA_SET_BLOCK"),
               ("window", "window", "TCA_SET_WINDOW"), ("alpha", "alpha", "TCA_SET_ALPHA"),
               ("obs", "n_obs", "TCA_SET_N_OBS"), ("whole", "n_whole", "TCA_SET_N_WHOLE"),
               ("hold_type", "type_hold", "TCA_SET_TYPE_HOLD"), ("hold_decode", "n_hold_decode", "TCA_SET_HOLD_DECODE"))


def _tca_config_struct(c: Dict[str, Any]):
    """The native struct tca_config of the switches `c` (Llama.tca_config)."""
    ffi, L = _native.ffi, _native.lib()
    s = ffi.new("struct tca_config *")
    bits = 0
    for key, field_, bit in _TCA_FIELDS:
        v = c[key]
        if v is None:
            continue
        if isinstance(v, int):
            v = max(-(1 << 62), min(v, 1 << 62))  # out of int64: still a range error, from the native check
        setattr(s, field_, v)
        bits |= getattr(L, bit)
    s.retention = RETENTIONS[c["retention"]]  # always given: Python's default is "hold"
    bits |= L.TCA_SET_RETENTION
    if c.get("prefill") is not None:
        s.prefill = PREFILLS[c["prefill"]]
        bits |= L.TCA_SET_PREFILL
    s.set = bits
    return s


@dataclass
class LlamaState:
    """A context's state (llama-cpp-python's ``LlamaState``): the tokens in the cache and the
    serialised cache (upstream's KV cache, or the TCA retention memory: each head's kept rows and
    their positions). Load it into a context of the same model and configuration."""
    input_ids: List[int]
    n_tokens: int
    llama_state: bytes
    llama_state_size: int


class _ModelHandle:
    """A loaded llama_model and how many Llama use it (``Llama.fork``): each fork holds a
    reference, and the model is freed when the last of them closes (never under a live context)."""

    def __init__(self, L, ptr):
        self._L, self.ptr, self._refs, self._lock = L, ptr, 1, threading.Lock()

    def acquire(self) -> "_ModelHandle":
        with self._lock:
            if self._refs <= 0:
                raise ContextError("the shared model has been freed")
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._L.llama_model_free(self.ptr)


class Llama:
    """Load a GGUF model and generate text, llama-cpp-python style.

    >>> llm = Llama("model.gguf", n_ctx=4096)
    >>> llm("Q: 2+2=? A:", max_tokens=8, temperature=0)["choices"][0]["text"]
    """

    def __init__(
        self,
        model_path: str,
        *,
        # model params
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: Optional[Sequence[float]] = None,
        rpc_servers: Optional[str] = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        # context params
        seed: int = LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_seq_max: int = 1,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        offload_kqv: bool = True,
        flash_attn: bool = False,
        type_k: Optional[int] = None,
        type_v: Optional[int] = None,
        no_perf: bool = False,
        last_n_tokens_size: int = 64,
        chat_format: Optional[str] = None,
        verbose: bool = True,
        # tca_ggml additions
        progress: Union[bool, Callable[[float], Optional[bool]], None] = None,
        tca: bool = False,
        tca_density: Optional[float] = None,
        tca_block: Optional[int] = None,
        tca_window: Optional[int] = None,
        tca_alpha: Optional[float] = None,
        tca_retention: Optional[str] = None,
        tca_obs: Optional[int] = None,
        tca_whole: Optional[int] = None,
        tca_hold_type: Optional[int] = None,
        tca_prefill: Optional[str] = None,
        tca_hold_decode: Optional[int] = None,
        eval_callback: Optional[Callable[[Any, bool], bool]] = None,
        _share_model: Optional["Llama"] = None,   # Llama.fork: that Llama's model, not loaded again
    ):
        # Llama.fork copies these (every argument but the model path)
        self._init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "model_path", "_share_model")}
        self._lock = threading.RLock()  # serialises every use of the native context (_locked)
        # a view of one sequence of a shared context (Llama.sequence): its id, the batcher of the
        # context's decode steps, the logits of its last decode (a copy)
        self._seq, self._view, self._batcher, self._last_logits, self._views = 0, False, None, None, []
        self._model = None
        self._model_handle: Optional[_ModelHandle] = None  # the reference to _model this Llama holds
        self._ctx = None
        self._batch = None
        self._closed = False
        self.verbose = bool(verbose)
        self._scope = _native.Scope(self.verbose)  # this instance's log, errors, callback exceptions
        L = self._scope.call(_native.lib)
        ffi = _native.ffi
        self._L, self._ffi = L, ffi

        # ---- parameter validation (clear errors before any native call) ----
        if not isinstance(model_path, (str, os.PathLike)):
            raise TypeError(f"model_path must be a str or PathLike, got {type(model_path).__name__}")
        self.model_path = os.fspath(model_path)
        _check_int("n_ctx", n_ctx, 0, 1 << 24)
        _check_int("n_batch", n_batch, 1, 1 << 24)
        _check_int("n_ubatch", n_ubatch, 1, 1 << 24)
        _check_int("n_seq_max", n_seq_max, 1, 256)  # LLAMA_MAX_SEQ
        _check_int("n_gpu_layers", n_gpu_layers, -1)
        _check_int("seed", seed, 0, 0xFFFFFFFF)
        _check_int("last_n_tokens_size", last_n_tokens_size, 0)
        if n_threads is not None:
            _check_int("n_threads", n_threads, 1, 4096)
        if n_threads_batch is not None:
            _check_int("n_threads_batch", n_threads_batch, 1, 4096)
        # 0 = the model's value; NaN / inf / negative would make every logit NaN
        _check_float("rope_freq_base", rope_freq_base, 0.0)
        _check_float("rope_freq_scale", rope_freq_scale, 0.0)
        for name, t in (("type_k", type_k), ("type_v", type_v)):
            if t is not None and t not in _KV_TYPES:
                raise ValueError(f"{name}={t!r} is not a supported KV cache type "
                                 f"({', '.join(f'{k}={v}' for k, v in _KV_TYPES.items())})")
        if chat_format is not None and not isinstance(chat_format, str):
            raise TypeError("chat_format must be a str or None")
        self.chat_format = chat_format
        self.tca_config = self._tca_config(tca, tca_density, tca_block, tca_window, tca_alpha, tca_retention, tca_obs,
                                           tca_whole, tca_hold_type, tca_prefill, tca_hold_decode)

        # ---- the file, before upstream sees it ----
        if not os.path.exists(self.model_path):
            raise ModelLoadError(f"model file not found: {self.model_path}")
        if os.path.isdir(self.model_path):
            raise ModelLoadError(f"model path is a directory: {self.model_path}")
        if not stat.S_ISREG(os.stat(self.model_path).st_mode):  # a FIFO would block the loader forever
            raise ModelLoadError(f"model path is not a regular file (a FIFO, a device, ...): {self.model_path}")
        err = ffi.new("char[512]")
        rc = L.tca_gguf_check(self.model_path.encode(), err, 512)
        self._scope.check(rc == 0, ModelLoadError, self.model_path, _native.err_text(err))

        # ---- model ----
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.main_gpu = main_gpu
        self._rpc_lost: Optional[str] = None
        if _share_model is None:
            self._rpc_endpoints = self._rpc_devices(mp, rpc_servers, tensor_split)
            self._rpc_failures0 = self._rpc_failures(self._rpc_endpoints)
        else:
            self._rpc_endpoints, self._rpc_failures0 = _share_model._rpc_endpoints, _share_model._rpc_failures0
        mp.vocab_only = bool(vocab_only)
        mp.load_mode = {(True, False): LLAMA_LOAD_MODE_MMAP, (True, True): LLAMA_LOAD_MODE_MMAP_MLOCK,
                        (False, False): LLAMA_LOAD_MODE_NONE, (False, True): LLAMA_LOAD_MODE_MLOCK}[
            (bool(use_mmap), bool(use_mlock))]
        progress_cb = self._make_progress(progress)
        if progress_cb is not None:
            def _progress(p, _ud):
                r = progress_cb(float(p))
                return r is None or bool(r)
            # an exception aborts the load (False) and is re-raised by check() below
            progress_c = self._scope.callback("bool(float, void *)", _progress, False)
            mp.progress_callback = progress_c
        t0 = time.perf_counter()
        if _share_model is not None:
            self._model_handle = _share_model._model_handle.acquire()
            model = self._model_handle.ptr
        else:
            model = self._scope.call(L.llama_model_load_from_file, self.model_path.encode(), mp)
            if self._scope.pending and model != ffi.NULL:
                L.llama_model_free(model)
                model = ffi.NULL
            self._scope.check(model != ffi.NULL, ModelLoadError, f"failed to load model {self.model_path}",
                              default="rejected by the loader")
            self._model_handle = _ModelHandle(L, model)
        self.load_s = time.perf_counter() - t0
        self._model = model
        self._vocab = L.llama_model_get_vocab(model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._metadata = None
        if vocab_only:
            self._n_ctx = self._n_ctx_seq = 0
            self.n_seq_max = n_seq_max
            return

        # ---- context ----
        self.n_threads = n_threads or max(multiprocessing.cpu_count() // 2, 1)
        self.n_threads_batch = n_threads_batch or multiprocessing.cpu_count()
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_ubatch, n_batch)
        # several sequences (generate_batch): each holds n_ctx / n_seq_max tokens (kv_unified off; TCA:
        # one retention memory a sequence)
        cp.n_seq_max = n_seq_max
        cp.kv_unified = False
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads_batch
        cp.rope_freq_base = rope_freq_base
        cp.rope_freq_scale = rope_freq_scale
        cp.offload_kqv = bool(offload_kqv)
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = bool(no_perf)
        if type_k is not None:
            cp.type_k = type_k
        if type_v is not None:
            cp.type_v = type_v
        if eval_callback is not None:
            if not callable(eval_callback):
                raise TypeError("eval_callback must be callable(tensor_ptr, ask) -> bool")

            def _eval_cb(t, ask, _ud):
                return bool(eval_callback(t, bool(ask)))
            # an exception stops the graph (False) and is re-raised after llama_decode (_decode)
            self._eval_cb = self._scope.callback("bool(void *, bool, void *)", _eval_cb, False)
            cp.cb_eval = self._eval_cb
        self.tca_label, self._tp = "dense (upstream)", None
        if self.tca_config["enabled"]:
            ctx = self._tca_context(model, cp)
        else:
            ctx = self._scope.call(L.llama_init_from_model, model, cp)
        self._scope.check(ctx != ffi.NULL, ContextError,
                          f"failed to create a context (n_ctx={n_ctx}, n_batch={n_batch}, "
                          f"type_k={type_k}, type_v={type_v})")
        self._ctx = ctx
        self._n_ctx = L.llama_n_ctx(ctx)
        self.n_seq_max = n_seq_max
        self._n_ctx_seq = L.llama_n_ctx_seq(ctx)   # what one sequence holds (n_ctx / n_seq_max)
        self.n_batch = L.llama_n_batch(ctx)
        self.n_ubatch = L.llama_n_ubatch(ctx)
        self._seed = seed
        self.last_n_tokens_size = last_n_tokens_size
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._tokens: List[int] = []  # tokens currently in the KV cache, in order
        self.timings = Timings()

    def _rpc_devices(self, mp, rpc_servers, tensor_split) -> tuple:
        """llama-cpp-python's rpc_servers ("host:port,host:port") and tensor_split: connect to each
        server (RPCError when one cannot be reached) and give the model its devices, NULL-terminated
        in llama_model_params.devices (the layers n_gpu_layers offloads go there, split by
        tensor_split; the others stay on this machine's CPU). docs/design.md "RPC"."""
        L, ffi = self._L, self._ffi
        if tensor_split is not None:
            ts = [float(x) for x in tensor_split]
            if len(ts) > 16 or any(not math.isfinite(x) or x < 0 for x in ts):
                raise ValueError("tensor_split must be at most 16 finite, non-negative numbers")
            self._tensor_split_c = ffi.new("float[]", ts + [0.0] * (16 - len(ts)))  # llama_max_devices() entries
            mp.tensor_split = self._tensor_split_c
        if rpc_servers is None:
            return ()
        if not isinstance(rpc_servers, str):
            raise TypeError("rpc_servers must be a str of comma-separated host:port")
        endpoints = tuple(e.strip() for e in rpc_servers.split(",") if e.strip())
        if not endpoints or len(set(endpoints)) != len(endpoints):
            raise ValueError(f"rpc_servers={rpc_servers!r}: give distinct host:port entries, comma-separated")
        if not L.tca_rpc_available():
            raise RPCError("this libtca_ggml was built without RPC (-DTCA_GGML_RPC=OFF)")
        devs, err = [], ffi.new("char[512]")
        for ep in endpoints:
            buf = ffi.new("void *[16]")
            n = self._scope.call(L.tca_rpc_add_server, ep.encode(), buf, 16, err, 512)
            if n < 0:
                raise RPCError(_native.err_text(err))
            devs += [buf[i] for i in range(min(n, 16))]
        self._rpc_devs_c = ffi.new("void *[]", devs + [ffi.NULL])
        mp.devices = self._rpc_devs_c
        return endpoints

    def _rpc_failures(self, endpoints) -> int:
        st, n = self._ffi.new("struct tca_rpc_stats *"), 0
        for ep in endpoints:
            self._L.tca_rpc_get_stats(ep.encode(), st)
            n += st.n_failures
        return n

    def _rpc_check(self) -> None:
        """RPCError when a connection to one of this Llama's rpc-servers failed since it loaded."""
        if self._rpc_endpoints and not self._rpc_lost and \
                self._rpc_failures(self._rpc_endpoints) > self._rpc_failures0:
            self._rpc_lost = f"the connection to an rpc-server was lost (rpc_servers={','.join(self._rpc_endpoints)})"
        if self._rpc_lost:
            raise RPCError(self._rpc_lost)

    # ------------------------------------------------------------------ TCA switches
    @staticmethod
    def _tca_config(tca, density, block, window, alpha, retention=None, obs=None, whole=None, hold_type=None,
                    prefill=None, hold_decode=None):
        """The TCA switches as given. Python types are checked here; the values by the native owner
        of the TCA configuration (tca_config_check now, for an error before the model loads, and
        tca_context_create with the model and its budgets)."""
        if not isinstance(tca, bool):
            raise TypeError("tca must be a bool")
        if retention is not None and retention not in RETENTIONS:
            raise ValueError(f"tca_retention must be one of {sorted(RETENTIONS)}, got {retention!r}")
        if prefill is not None and prefill not in PREFILLS:
            raise ValueError(f"tca_prefill must be one of {sorted(PREFILLS)}, got {prefill!r}")
        for name, v in (("tca_block", block), ("tca_window", window), ("tca_obs", obs), ("tca_whole", whole),
                        ("tca_hold_type", hold_type), ("tca_hold_decode", hold_decode)):
            if v is not None:
                _check_int(name, v)
        for name, v in (("tca_density", density), ("tca_alpha", alpha)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"{name} must be a number, got {type(v).__name__}")
        c = {"enabled": tca, "density": density, "block": block, "window": window, "alpha": alpha,
             "retention": retention or "hold", "obs": obs, "whole": whole, "hold_type": hold_type, "prefill": prefill,
             "hold_decode": hold_decode}
        err = _native.ffi.new("char[512]")
        if _native.lib().tca_config_check(_tca_config_struct(c), err, 512) != 0:
            raise TCAConfigError(_native.err_text(err))
        if not tca and any(v is not None for v in (density, block, window, alpha, retention, obs, whole, hold_type,
                                                   prefill, hold_decode)):
            raise TCAConfigError("tca_density/tca_block/tca_window/tca_alpha/tca_retention/tca_obs/tca_whole/"
                                 "tca_hold_type/tca_prefill/tca_hold_decode need tca=True")
        return c

    def _tca_context(self, model, cp):
        """tca_context_create with the GGUF's budgets (read natively) and the switches; sets
        tca_label and _tp (the configuration in force: window, block, n_sink, ...)."""
        L, ffi = self._L, self._ffi
        c = self.tca_config
        err = ffi.new("char[1024]")
        bud = ffi.new("struct tca_budgets *")
        rc = L.tca_budgets_read(self.model_path.encode(), bud, err, 1024)
        if rc < 0:
            raise TCAConfigError(f"invalid TCA metadata in {self.model_path}: {_native.err_text(err)}")
        try:
            if c["density"] is not None:
                self.tca_label = f"forced density {float(c['density']):g} (uncalibrated)"
            elif rc == 0:
                self.tca_label = (f"calibrated ({ffi.string(bud.text_name).decode('utf-8', 'replace')}, "
                                  f"{bud.n_tokens} tokens, tau {bud.tau:g})")
            resolved = ffi.new("struct tca_config *")
            ctx = self._scope.call(L.tca_context_create, model, cp, bud if rc == 0 else ffi.NULL,
                                   _tca_config_struct(c), resolved, err, 1024)
        finally:
            L.tca_budgets_free(bud)
        if ctx == ffi.NULL:
            self._model_handle.release()  # frees the model unless a fork of it still holds it
            self._model = None
        reason = _native.err_text(err)
        if ctx == ffi.NULL and reason.startswith("context creation failed"):
            # the native side could not name the cause: upstream's error lines do (the memory's
            # exception, logged by llama_init_from_model)
            reason = self._scope.take_errors() or reason
        self._scope.check(ctx != ffi.NULL, TCAConfigError, f"{self.model_path}: cannot create a TCA context",
                          reason)
        self._tp = resolved
        if resolved.prefill == L.TCA_PREFILL_DENSE:
            self.tca_label += ", dense prefill"
        elif resolved.prefill == L.TCA_PREFILL_EARLY:
            self.tca_label += ", dense prefill in the first half of the layers"
        return ctx

    @_locked
    def tca_retained_positions(self, layer: int, kv_head: int):
        """Positions (ascending, numpy int32) that (layer, kv_head) still holds."""
        import numpy as np
        L, ffi = self._L, self._ffi
        ctx = self._live()
        if not (_is_int(layer) and _is_int(kv_head)):
            raise TypeError(f"layer and kv_head must be ints, got {type(layer).__name__}, {type(kv_head).__name__}")
        layer, kv_head = int(layer), int(kv_head)
        if not (-(1 << 31) <= layer < (1 << 31) and 0 <= kv_head < (1 << 32)):
            raise ValueError(f"no TCA retention for layer {layer}, KV head {kv_head}")
        n = self._scope.call(L.tca_get_head_positions, ctx, layer, kv_head, ffi.NULL, 0)
        self._scope.check(n != -2, ContextError, "cannot read the retained positions")
        if n < 0:
            raise ValueError(f"no TCA retention for layer {layer}, KV head {kv_head}")
        out = np.zeros(n, np.int32)
        if n:
            L.tca_get_head_positions(ctx, layer, kv_head, ffi.cast("int32_t *", out.ctypes.data), n)
        self._rpc_check()  # a lost server's read-back is zeros, not positions
        return out

    @_locked
    def tca_stats(self, seq: Optional[int] = None) -> Dict[str, Any]:
        """TCA statistics of this context: whether TCA is active, retained rows per (layer,
        KV head), bytes allocated vs dense, and the coverage of the last compaction's query.
        With n_seq_max > 1 the totals are summed over the sequences and the per-head arrays hold
        sequence 0's heads, then sequence 1's, ...; seq=i (a sequence view: its own sequence):
        sequence i's totals and heads only."""
        with self._ctx_guard():
            return self._tca_stats(self._seq if (seq is None and self._view) else seq)

    def _tca_stats(self, seq: Optional[int]) -> Dict[str, Any]:
        import numpy as np
        L, ffi = self._L, self._ffi
        ctx = self._live()
        st = ffi.new("struct tca_stats *")
        if seq is not None:
            _check_int("seq", seq, 0, self.n_seq_max - 1)
            rc = self._scope.call(L.tca_get_seq_stats, ctx, seq, st)
        else:
            rc = self._scope.call(L.tca_get_stats, ctx, st)
        self._scope.check(rc >= 0, ContextError, "cannot read the TCA statistics")
        n = self._scope.call(L.tca_get_head_stats, ctx, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, 0)
        self._scope.check(n >= 0, ContextError, "cannot read the TCA statistics")
        layer = np.zeros(n, np.int32); head = np.zeros(n, np.uint32); ln = np.zeros(n, np.uint32)
        cap = np.zeros(n, np.uint32); cov = np.zeros(n, np.float32)
        if n:
            L.tca_get_head_stats(ctx, ffi.cast("int32_t *", layer.ctypes.data), ffi.cast("uint32_t *", head.ctypes.data),
                                 ffi.cast("uint32_t *", ln.ctypes.data), ffi.cast("uint32_t *", cap.ctypes.data),
                                 ffi.cast("float *", cov.ctypes.data), n)
        if seq is not None and self.n_seq_max > 1 and n:
            k = n // self.n_seq_max   # the heads of each sequence, one sequence after the other
            layer, head, ln, cap, cov = (x[seq * k:(seq + 1) * k] for x in (layer, head, ln, cap, cov))
        return {"active": bool(st.active), "label": self.tca_label, "n_seen": int(st.n_seen),
                "frontier": int(st.frontier), "bytes_alloc": int(st.bytes_alloc), "bytes_dense": int(st.bytes_dense),
                "rows_kept": int(st.rows_kept), "rows_cap": int(st.rows_cap),
                "n_compactions": int(st.n_compactions), "t_compact_ms": float(st.t_compact_ms),
                "bytes_device": int(st.bytes_device),
                "retention": {v: k for k, v in RETENTIONS.items()}.get(int(st.retention), "?") if st.active else None,
                "prefill": ({v: k for k, v in PREFILLS.items()}.get(int(self._tp.prefill), "?")
                            if st.active and self._tp is not None else None),
                "bytes_hold": int(st.bytes_hold), "bytes_fast": int(st.bytes_alloc) - int(st.bytes_hold),
                "rows_held": int(st.rows_held), "n_final": int(st.n_final),
                "n_obs_last": int(st.n_obs_last), "n_refresh": int(st.n_refresh),
                "n_final_lazy": int(st.n_final_lazy),
                "hold_decode": int(self._tp.n_hold_decode) if st.active and self._tp is not None else None, "bytes_resident": int(st.bytes_resident),
                "layer": layer, "kv_head": head, "retained": ln, "capacity": cap, "coverage": cov}

    # ------------------------------------------------------------------ lifecycle
    @_locked
    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if self._closed:
            return
        self._closed = True
        L, ffi = self._L, self._ffi
        if self._view:   # a sequence view: its sequence emptied; the context is its owner's
            if not self._owner._closed:
                with self._batcher.ctx_lock:
                    self._clear_seq()
            return
        for v in self._views:
            v.close()
        if self._batcher is not None:
            self._batcher.close()
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        with self._scope:
            if self._ctx is not None:
                L.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                self._model_handle.release()  # frees the model unless a fork of it still holds it
                self._model = None

    # the model's settings: a fork shares the loaded model, so these cannot differ from its source's
    _MODEL_KWARGS = ("n_gpu_layers", "main_gpu", "tensor_split", "rpc_servers", "use_mmap", "use_mlock")

    def fork(self, **overrides) -> "Llama":
        """A new Llama over this one's loaded model (not loaded again) with a context of its own:
        this one's settings, with `overrides` for the context's (n_ctx, seed, n_threads, tca, ...).
        A context serves one sequence (TCA: n_seq_max = 1), so N forks serve N requests at once
        (``tca-ggml serve --parallel N``). ``fork(vocab_only=True)`` gives one without a context
        (tokenize, detokenize, chat template) that never waits on this one's lock. The model is
        freed when the last Llama sharing it closes, whichever that is."""
        self._check_open()
        if self._ctx is None:
            raise ContextError("cannot fork a vocab_only Llama (its model has no weights loaded)")
        bad = [k for k in overrides if k not in self._init_kwargs]
        if bad:
            raise TypeError(f"fork() got unexpected keyword arguments: {', '.join(sorted(bad))}")
        fixed = [k for k in self._MODEL_KWARGS if k in overrides and overrides[k] != self._init_kwargs[k]]
        if fixed:
            raise ValueError(f"a fork shares the loaded model: {', '.join(fixed)} cannot differ from it")
        kw = dict(self._init_kwargs, progress=None)
        if overrides.get("tca") is False:   # a dense fork: the TCA switches inherited do not apply
            kw.update({k: None for k in kw if k.startswith("tca_")})
        kw.update(overrides)
        return Llama(self.model_path, _share_model=self, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _check_open(self):
        if self._closed or self._model is None:
            raise ContextError("this Llama has been closed")

    def _live(self):
        if self._closed:
            raise ContextError("this Llama has been closed")
        if self._rpc_lost:
            raise RPCError(self._rpc_lost)
        if self._ctx is None:
            raise ContextError("no context (vocab_only=True)")
        return self._ctx

    # ------------------------------------------------------------------ properties
    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._n_vocab

    @_locked
    def n_embd(self) -> int:
        return self._L.llama_model_n_embd(self._model)

    def token_bos(self) -> int:
        return self._L.llama_vocab_bos(self._vocab)

    def token_eos(self) -> int:
        return self._L.llama_vocab_eos(self._vocab)

    @property
    def metadata(self) -> Dict[str, Any]:
        """All GGUF key/value pairs, arrays included (as lists)."""
        if self._metadata is None:
            from .gguf_meta import read_kv
            self._metadata = read_kv(self.model_path)
        return self._metadata

    @_locked
    def memory_bytes(self) -> Dict[str, int]:
        """Bytes held now: model weights, context memory (KV cache), compute buffers."""
        ffi = self._ffi
        m, c, k = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        with self._ctx_guard():
            self._L.tca_context_memory(self._live(), m, c, k)
        return {"model": int(m[0]), "kv": int(c[0]), "compute": int(k[0])}

    # ------------------------------------------------------------------ tokens
    @_locked
    def tokenize(self, text: Union[bytes, str], add_bos: bool = True, special: bool = False) -> List[int]:
        self._check_open()
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError("text must be bytes or str")
        L, ffi = self._L, self._ffi
        if len(text) > (1 << 31) - 16:
            raise TokenizeError(f"text of {len(text)} bytes is too long to tokenize (at most 2^31 - 16)")
        text = bytes(text)
        err = ffi.new("char[512]")
        n_max = len(text) + 8
        buf = ffi.new("int32_t[]", n_max)
        # tca_tokenize: llama_tokenize with upstream's exceptions caught (a code point above
        # U+10FFFF throws std::invalid_argument there): INT32_MIN and the message in err
        n = self._scope.call(L.tca_tokenize, self._vocab, text, len(text), buf, n_max, int(bool(add_bos)),
                             int(bool(special)), err, 512)
        if n < 0 and err[0] == b"\0":  # (a cffi char is a 1-byte bytes: always truthy)
            n_max = -n
            buf = ffi.new("int32_t[]", n_max)
            n = self._scope.call(L.tca_tokenize, self._vocab, text, len(text), buf, n_max, int(bool(add_bos)),
                                 int(bool(special)), err, 512)
        self._scope.check(n >= 0, TokenizeError, "cannot tokenize the text", _native.err_text(err),
                          default=f"llama_tokenize returned {n}")
        return list(buf[0:n])

    @_locked
    def _piece(self, token: int, special: bool = False) -> bytes:
        self._check_open()
        L, ffi = self._L, self._ffi
        token = _check_tokens([token], self._n_vocab)[0]
        err = ffi.new("char[512]")
        buf = ffi.new("char[]", 64)
        n = self._scope.call(L.tca_token_to_piece, self._vocab, token, buf, 64, 0, int(bool(special)), err, 512)
        if n < 0 and err[0] == b"\0":  # (a cffi char is a 1-byte bytes: always truthy)
            buf = ffi.new("char[]", -n)
            n = self._scope.call(L.tca_token_to_piece, self._vocab, token, buf, -n, 0, int(bool(special)), err, 512)
        self._scope.check(n >= 0, TokenizeError, f"cannot convert token {token} to text", _native.err_text(err))
        return ffi.buffer(buf, n)[:]

    @_locked
    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        self._check_open()
        tokens = _check_tokens(tokens, self._n_vocab)
        if prev_tokens:
            prev_tokens = _check_tokens(prev_tokens, self._n_vocab, "prev_tokens")
            full = self.detokenize(prev_tokens + tokens, special=special)
            prev = self.detokenize(prev_tokens, special=special)
            return full[len(prev):]
        return b"".join(self._piece(t, special) for t in tokens)

    # ------------------------------------------------------------------ evaluation
    @_locked
    def kv_cache_seq_rm(self, p0: int, p1: int = -1) -> None:
        """Remove positions [p0, p1) of sequence 0 from the cache (p1 < 0: to the end), as
        llama-cpp-python's ``_ctx.kv_cache_seq_rm``. Raises ContextError when the memory
        refuses (the TCA retention memory supports truncation only: evicted tokens cannot be
        re-inserted between kept ones)."""
        ctx = self._live()
        _check_int("p0", p0, 0)
        _check_int("p1", p1)
        if not self._scope.call(self._L.llama_memory_seq_rm, self._L.llama_get_memory(ctx), 0, p0, p1):
            raise ContextError(f"the KV cache cannot remove positions [{p0}, {p1}) "
                               f"({'TCA supports truncation [p0, end) only' if self.tca_stats()['active'] else 'refused'})")
        end = len(self._tokens) if p1 < 0 else min(p1, len(self._tokens))
        if end >= len(self._tokens):
            self._tokens = self._tokens[:p0]
        else:
            self._tokens = self._tokens[:p0] + self._tokens[end:]  # positions after p1 keep their ids

    @_locked
    def save_state(self) -> LlamaState:
        """Snapshot of the cache (llama-cpp-python's ``save_state``)."""
        L, ffi = self._L, self._ffi
        ctx = self._live()
        if self._view:
            raise ContextError("save_state of a sequence view: save the context's owner")
        size = self._scope.call(L.llama_state_get_size, ctx)
        buf = ffi.new("uint8_t[]", max(int(size), 1))
        n = self._scope.call(L.llama_state_get_data, ctx, buf, size)
        self._scope.check(0 < n <= size, ContextError, "could not serialise the context state")
        data = _STATE_MAGIC + self._state_identity() + bytes(ffi.buffer(buf, n))
        return LlamaState(list(self._tokens), len(self._tokens), data, len(data))

    def _arch_name(self) -> bytes:
        """Upstream's name of this model's architecture (what its state begins with): the first
        word of llama_model_desc."""
        if getattr(self, "_arch", None) is None:
            buf = self._ffi.new("char[256]")
            self._L.llama_model_desc(self._model, buf, 256)
            self._arch = self._ffi.string(buf).split(b" ")[0]
        return self._arch

    def _state_identity(self) -> bytes:
        """The identity of this model that save_state records and load_state checks."""
        if getattr(self, "_ident", None) is None:
            size, digest = _model_fingerprint(self.model_path)
            self._ident = _STATE_IDENT.pack(self._n_vocab, self._L.llama_model_n_embd(self._model),
                                            self._L.llama_model_n_layer(self._model), size, digest)
        return self._ident

    @_locked
    def load_state(self, state: LlamaState) -> None:
        """Restore a snapshot from ``save_state`` (same model and configuration). A state that
        does not fit this context (another model, a dense cache into a TCA one, budgets that do
        not hold it) raises ContextError and leaves the cache empty."""
        L, ffi = self._L, self._ffi
        ctx = self._live()
        if self._view:
            raise ContextError("load_state into a sequence view: load into the context's owner")
        if not isinstance(state, LlamaState):
            raise TypeError("load_state expects a LlamaState from save_state()")
        data = bytes(state.llama_state)
        if not data:
            raise ContextError("the state is empty (0 bytes): nothing to load")
        if len(data) != state.llama_state_size or state.n_tokens != len(state.input_ids) or state.n_tokens > self._n_ctx_seq:
            raise ContextError("inconsistent LlamaState: llama_state_size, n_tokens and input_ids disagree "
                               "(or more tokens than n_ctx)")
        input_ids = _check_tokens(state.input_ids, self._n_vocab, "LlamaState.input_ids")
        if data.startswith(_STATE_MAGIC):  # save_state's envelope: check the model it was saved from
            head = len(_STATE_MAGIC) + _STATE_IDENT.size
            if len(data) <= head:
                raise ContextError(f"the state is truncated ({len(data)} bytes, its header alone is {head})")
            got = _STATE_IDENT.unpack_from(data, len(_STATE_MAGIC))
            want = _STATE_IDENT.unpack(self._state_identity())
            if got != want:
                names = ("n_vocab", "n_embd", "n_layer", "model file size")
                diff = [f"{k} {a} != {b}" for k, a, b in zip(names, got, want) if a != b] or ["the weights differ"]
                raise ContextError(f"the state was saved from another model ({', '.join(diff)}): it does not "
                                   f"belong to {self.model_path}")
            data = data[head:]
        # (bytes without the envelope are handed to upstream as they are: its own checks apply,
        # after this one.) Upstream's state starts with the architecture's name as a u32 length and
        # the bytes; its reader allocates that length (up to 4 GiB) before it checks it against
        # the buffer, so a corrupted length cost seconds and gigabytes (scripts/fuzz/fuzz_state.py)
        arch = self._arch_name()
        if len(data) < 4 + len(arch) or struct.unpack_from("=I", data)[0] != len(arch) or \
                data[4:4 + len(arch)] != arch:
            raise ContextError(f"the state does not begin with this model's architecture ({arch.decode()!r}): "
                               f"it is corrupted or not a state of this kind of model")
        buf = ffi.from_buffer("uint8_t[]", data)
        n = self._scope.call(L.llama_state_set_data, ctx, buf, len(data))
        if n != len(data):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            self._tokens = []
        self._scope.check(n == len(data), ContextError, "the state does not fit this context", default="refused")
        n_cached = L.llama_memory_seq_pos_max(L.llama_get_memory(ctx), 0) + 1
        if n_cached != len(input_ids):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            self._tokens = []
            raise ContextError(f"inconsistent LlamaState: the cache it holds has {n_cached} tokens, its "
                               f"input_ids {len(input_ids)}")
        self._tokens = input_ids

    @_locked
    def reset(self) -> None:
        """Forget the KV cache (a sequence view: its sequence)."""
        self._live()
        with self._ctx_guard():
            self._clear_seq()
        self._tokens = []

    # ------------------------------------------------------------------ sequences of one context
    def _ctx_guard(self):
        """The lock every native use of a shared context takes (a sequence view); else nothing."""
        return self._batcher.ctx_lock if self._view else contextlib.nullcontext()

    def _clear_seq(self) -> None:
        """Empty this Llama's sequence: the whole cache, or a view's own sequence."""
        L = self._L
        mem = L.llama_get_memory(self._ctx)
        if self._view:
            L.llama_memory_seq_rm(mem, self._seq, -1, -1)
        else:
            L.llama_memory_clear(mem, True)

    def _sample(self, smpl, guarded: bool = False):
        """The next token by the sampler chain, which accepts it (once), and the raw logits row it was
        sampled from (numpy float32: the context's last logits, valid until the next decode, or a
        sequence view's copy of its own row). The chain is applied to a candidate array built from
        that row, as llama_sampler_sample does, then the token is accepted: in between, with a grammar
        in the chain (`guarded`), a pick the chain had excluded (-inf: the grammar allows no token
        here) is refused -- llama.cpp's grammar would throw through the C API on accepting it."""
        import numpy as np
        L, ffi = self._L, self._ffi
        n = self._n_vocab
        if self._view:
            row = self._last_logits
        else:
            ptr = L.llama_get_logits_ith(self._ctx, -1)
            if ptr == ffi.NULL:
                raise DecodeError("no logits available")
            row = np.frombuffer(ffi.buffer(ptr, 4 * n), np.float32)
        cur = np.empty(n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        cur["id"] = np.arange(n, dtype=np.int32)
        cur["logit"] = row
        cur["p"] = 0.0
        arr = ffi.new("llama_token_data_array *")
        arr.data = ffi.cast("llama_token_data *", cur.ctypes.data)
        arr.size = n
        arr.selected = -1
        arr.sorted = False
        L.llama_sampler_apply(smpl, arr)
        if not 0 <= arr.selected < arr.size:
            raise DecodeError("the sampler selected no token")
        tok = int(arr.data[arr.selected].id)
        if guarded and not arr.data[arr.selected].logit > -math.inf:
            from .grammar import GrammarError
            raise GrammarError("the grammar allows no token after the text generated so far (no token of this "
                               "vocabulary continues it)")
        L.llama_sampler_accept(smpl, tok)
        return tok, row

    @_locked
    def sequence(self, seq_id: int) -> "Llama":
        """A view of sequence `seq_id` of this context (n_seq_max > 1): the single-sequence API
        (eval_prompt, generate_tokens, create_completion, create_chat_completion, tca_stats, reset)
        on that sequence (n_ctx / n_seq_max tokens), with its own prefix cache, timings and lock, for
        one thread each. Decode steps of views generating at the same time are batched into one
        llama_decode (continuous batching: tca_ggml.batching); a prompt is decoded alone, between
        steps. Use the views, not this Llama, while they generate. Closing a view empties its
        sequence; the context is freed with this Llama (which closes its views)."""
        self._live()
        _check_int("seq_id", seq_id, 0, self.n_seq_max - 1)
        if self.n_seq_max < 2:
            raise ValueError("sequence views need a context of several sequences (n_seq_max > 1)")
        if any(v._seq == seq_id and not v._closed for v in self._views):
            raise ValueError(f"sequence {seq_id} already has an open view")
        if self._batcher is None:
            from .batching import Batcher
            self._batcher = Batcher(self)
        v = object.__new__(Llama)
        v.__dict__.update(self.__dict__)
        v._seq, v._view, v._views, v._owner = seq_id, True, [], self
        v._lock = threading.RLock()
        v._tokens, v._last_logits, v.timings = [], None, Timings()
        v._scope = _native.Scope(self.verbose)
        with self._batcher.ctx_lock:
            v._clear_seq()
        self._views.append(v)
        return v

    @_locked
    def _n_obs_min(self) -> int:
        """The fewest queries a TCA prompt's last ubatch has (its final selection's observation
        window): the resolved n_obs, at most one ubatch."""
        return max(1, min(int(self._tp.n_obs), self.n_ubatch))

    def _prompt_end_start(self, n: int) -> int:
        """Where a TCA prompt of n tokens starts its last ubatch, as a fresh evaluation cuts it
        (_decode): at the last multiple of n_ubatch before n, moved back so that the last ubatch has
        at least n_obs queries (a prompt of 8193 tokens would otherwise be selected by its one
        last query)."""
        ub = self.n_ubatch if self.n_batch % self.n_ubatch == 0 else self.n_batch
        s = ((n - 1) // ub) * ub
        return max(0, min(s, n - self._n_obs_min()))

    def _decode(self, tokens: List[int], start_pos: int, want_last_logits: bool = True, seq_id: Optional[int] = None,
                mirror: bool = True) -> None:
        seq_id = self._seq if seq_id is None else seq_id
        if self._view:
            if len(tokens) == 1 and want_last_logits:
                # a decode step: batched with the other sequences' steps (batching.Batcher)
                try:
                    self._last_logits = self._batcher.decode_one(seq_id, tokens[0], start_pos)
                except BaseException:
                    if mirror:
                        self._sync_tokens_after_failure(tokens)
                    raise
                if mirror:
                    self._tokens.extend(tokens)
                return
            # a prompt: chunk by chunk, each holding the context; between chunks the other
            # sequences' waiting decode steps run (a long prompt does not pause them)
            self._decode_chunks(tokens, start_pos, want_last_logits, seq_id, mirror)
            return
        self._decode_chunks(tokens, start_pos, want_last_logits, seq_id, mirror)

    def _decode_chunks(self, tokens: List[int], start_pos: int, want_last_logits: bool, seq_id: int,
                       mirror: bool) -> None:
        off = 0
        while off < len(tokens):
            if off and self._view:
                self._batcher.let_steps_through(seq_id)
            with self._ctx_guard():
                off = self._decode_chunk(tokens, off, start_pos, want_last_logits, seq_id, mirror)

    def _decode_chunk(self, tokens: List[int], off: int, start_pos: int, want_last_logits: bool, seq_id: int,
                      mirror: bool) -> int:
        """One llama_decode of the prompt `tokens` from `off` (a view holds the context's lock);
        where the next chunk starts. A view reads the last chunk's logits before the lock goes."""
        L, ffi = self._L, self._ffi
        ctx = self._live()
        b = self._batch
        # TCA: batches start at multiples of n_ubatch (absolute positions), so a prompt is cut into
        # the same ubatches whatever prefix was reused: the sparse prefill's compactions run at the
        # same places and a prompt re-evaluated after a cache truncation gives what a fresh one gives.
        # The prompt's last ubatch starts at _prompt_end_start (>= n_obs queries: the final
        # selection's observation window).
        ub = self.n_ubatch if self.tca_config is not None and self.n_batch % self.n_ubatch == 0 else 0
        end_cut = self._prompt_end_start(start_pos + len(tokens)) \
            if (ub and want_last_logits and self._tp is not None) else -1
        n_max = self.n_batch - ((start_pos + off) % ub if ub else 0)
        if start_pos + off < end_cut:
            n_max = min(n_max, end_cut - (start_pos + off))
        elif start_pos + off == end_cut:
            n_max = len(tokens) - off   # the prompt's last ubatch (<= n_ubatch tokens)
        chunk = tokens[off: off + n_max]
        n = len(chunk)
        b.n_tokens = n
        for i, t in enumerate(chunk):
            b.token[i] = t
            b.pos[i] = start_pos + off + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = 0
        if want_last_logits and off + n == len(tokens):
            b.logits[n - 1] = 1
        err = ffi.new("char[512]")
        try:
            # tca_decode: llama_decode with an exception caught (INT32_MIN, the message in err)
            rc = self._scope.call(L.tca_decode, ctx, ffi.addressof(b), err, 512)
            if mirror and (rc != 0 or self._scope.pending):
                # keep our token mirror consistent with what the cache holds
                self._sync_tokens_after_failure(chunk)
            if rc == L.TCA_DECODE_RPC_LOST:
                self._rpc_lost = f"{_native.err_text(err)} (rpc_servers={','.join(self._rpc_endpoints)})"
                raise RPCError(self._rpc_lost)
            if rc != 0:
                self._rpc_check()  # lost before this call (a read-back between decodes)
            self._scope.check(rc == 0, DecodeError, f"llama_decode failed with code {rc}", _native.err_text(err))
            if mirror:
                self._tokens.extend(chunk)
        except BaseException:
            # a KeyboardInterrupt (Ctrl-C) lands between bytecodes: after the native call,
            # before the mirror was extended -- the cache may hold the chunk
            if mirror:
                self._sync_tokens_after_failure(chunk)
            raise
        if self._view and want_last_logits and off + n == len(tokens):
            import numpy as np
            ptr = L.llama_get_logits_ith(ctx, -1)
            self._last_logits = np.frombuffer(ffi.buffer(ptr, 4 * self._n_vocab), np.float32).copy()
        return off + n

    def _sync_tokens_after_failure(self, pending=()) -> None:
        """Make the token mirror what the cache holds: the mirror, then a prefix of `pending` (the
        chunk being decoded), cut at the cache's length."""
        L = self._L
        with self._ctx_guard():
            pmax = L.llama_memory_seq_pos_max(L.llama_get_memory(self._ctx), self._seq)
        held = self._tokens if len(self._tokens) > pmax else self._tokens + list(pending)
        self._tokens = held[: max(pmax + 1, 0)]

    def _resync_tokens(self) -> None:
        """Before an evaluation: if the mirror and the cache disagree in length (an interrupt
        between a cache change and the mirror's update), cut both to what they share."""
        L = self._L
        with self._ctx_guard():
            mem = L.llama_get_memory(self._ctx)
            n_cached = L.llama_memory_seq_pos_max(mem, self._seq) + 1
            if n_cached == len(self._tokens):
                return
            if n_cached > len(self._tokens):
                if not self._scope.call(L.llama_memory_seq_rm, mem, self._seq, len(self._tokens), -1):
                    self._clear_seq()
                    self._tokens = []
            else:
                self._tokens = self._tokens[:max(n_cached, 0)]

    @_locked
    def eval_prompt(self, tokens: List[int]) -> int:
        """Make the cache hold exactly `tokens` with logits for the last one; reuse the
        longest common prefix with what is cached. Returns the number of reused tokens."""
        L = self._L
        ctx = self._live()
        tokens = _check_tokens(tokens, self._n_vocab)
        if not tokens:
            raise ValueError("empty prompt")
        if len(tokens) > self._n_ctx_seq:
            raise ContextOverflowError(
                f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx_seq}")
        self._resync_tokens()
        n_common = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            n_common += 1
        if self._tp is not None and n_common >= len(tokens) - 1 and len(tokens) > 1:
            # TCA, the cache already holds this whole prompt (the same prompt again): its end must be
            # a prompt end again -- one ubatch that attends every held row and whose last n_obs
            # queries make the final selection. Re-evaluating only the last token would make it a
            # decode step over the kept rows, and the answer would differ from the first one
            # (scripts/soak.py interrupt; test_same_prompt_twice_gives_the_same_answer). So the
            # prompt's last ubatch, as a fresh evaluation cuts it (_decode), is evaluated again: the
            # same queries, the same final selection.
            n_common = min(n_common, self._prompt_end_start(len(tokens)))
        elif self._tp is not None and len(tokens) > 1:
            # TCA, a prompt that continues the cache (a chat follow-up): its last ubatch is its
            # observation window (the final selection's queries), so it re-evaluates cached tokens
            # if it has fewer than n_obs new ones -- a 3-token follow-up is selected by more than
            # its own 3 queries
            n_common = min(n_common, max(0, len(tokens) - self._n_obs_min()))
        n_common = min(n_common, len(tokens) - 1)  # always re-evaluate the last token for its logits
        if n_common < len(self._tokens):
            with self._ctx_guard():
                mem = L.llama_get_memory(ctx)
                if not self._scope.call(L.llama_memory_seq_rm, mem, self._seq, n_common, -1):
                    self._clear_seq()
                    n_common = 0
            self._tokens = self._tokens[:n_common]
        self._decode(tokens[n_common:], n_common)
        return n_common

    @_locked
    def _logits_last(self):
        import numpy as np
        if self._view:
            return self._last_logits
        ptr = self._L.llama_get_logits_ith(self._ctx, -1)
        if ptr == self._ffi.NULL:
            raise DecodeError("no logits available")
        return np.frombuffer(self._ffi.buffer(ptr, 4 * self._n_vocab), dtype=np.float32).copy()

    @_locked
    def eval_logits(self, tokens: List[int]):
        """Evaluate `tokens` from an empty cache and return the last token's logits (numpy)."""
        self.reset()
        self.eval_prompt(tokens)
        return self._logits_last()

    def _grammar_sampler(self, grammar):
        """llama.cpp's grammar sampler of `grammar` (GBNF text, or a LlamaGrammar: tca_ggml.grammar),
        or GrammarError when its parser refuses the grammar (llama_sampler_init_grammar: NULL)."""
        from .grammar import GrammarError, grammar_text
        text, root = grammar_text(grammar)
        L, ffi = self._L, self._ffi
        smpl = self._scope.call(L.llama_sampler_init_grammar, self._vocab, text.encode("utf-8"), root.encode("utf-8"))
        if smpl == ffi.NULL:
            reason = self._scope.take_errors() or "refused"
            raise GrammarError(f"invalid grammar: llama.cpp's parser: {reason} (its detailed message is on stderr)")
        return smpl

    @_locked
    def check_grammar(self, grammar) -> None:
        """GrammarError (a ValueError) if llama.cpp's GBNF parser refuses `grammar` (a GBNF string or a
        LlamaGrammar), for this model's vocabulary; works on a vocab_only Llama too."""
        self._check_open()
        self._L.llama_sampler_free(self._grammar_sampler(grammar))

    def _make_sampler(self, temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                      frequency_penalty, presence_penalty, seed, history=(), grammar=None):
        """The sampler chain, llama-cpp-python's order: penalties (which have seen `history`, the
        prompt's last tokens), the grammar (if any), then greedy / top-k ... dist. The history goes
        to the penalties only: the grammar constrains the generated text, never the prompt."""
        L = self._L
        gram = self._grammar_sampler(grammar) if grammar is not None else None   # first: it may raise
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        pen = L.llama_sampler_init_penalties(self._n_vocab, self.last_n_tokens_size, repeat_penalty,
                                             frequency_penalty, presence_penalty)
        for t in history:
            L.llama_sampler_accept(pen, t)
        L.llama_sampler_chain_add(chain, pen)
        if gram is not None:
            L.llama_sampler_chain_add(chain, gram)
        seed = self._seed if seed is None else seed
        if temperature < 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        elif temperature == 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_typical(typical_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    def generate_tokens(self, tokens: List[int], max_tokens: int, *, temperature: float = 0.8,
                        top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                        typical_p: float = 1.0, repeat_penalty: float = 1.0,
                        frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                        seed: Optional[int] = None, grammar=None) -> Iterator[int]:
        """Yield sampled token ids after `tokens` until EOG or `max_tokens` (<= 0: until the
        context is full). The prompt must fit in the context. `grammar`: GBNF text (or a
        LlamaGrammar) that the generated text must follow (tca_ggml.grammar).

        The generator holds the instance's lock from its first step until it ends (or is closed):
        another thread's call on this Llama waits for it, never interleaves with it."""
        self._live()
        tokens = _check_tokens(tokens, self._n_vocab)
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens)
        _check_sampling(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                        presence_penalty, seed)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                        repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                        presence_penalty=presence_penalty, seed=seed)
        return self._generate_tokens(tokens, max_tokens, sampling, grammar)

    def _generate_tokens(self, tokens, max_tokens, sampling, grammar=None) -> Iterator[int]:
        with self._lock, contextlib.closing(self._generate(tokens, max_tokens, sampling, grammar)) as gen:
            for tok, _ in gen:
                yield tok

    def _generate(self, tokens, max_tokens, sampling, grammar=None, n_logprobs=None):
        """(token, logprobs) pairs, generate_tokens's loop holding the lock (and, for a sequence view,
        inside the batcher's generating section). logprobs, when n_logprobs is not None: (the token's
        log-probability, [(id, log-probability)] of the n_logprobs most likely tokens, most likely
        first), the log-softmax of the raw logits row the token was sampled from (before penalties,
        grammar and temperature, as llama-cpp-python reports them); else None."""
        with self._lock, (self._batcher.generating(self._seq) if self._view else contextlib.nullcontext()):
            yield from self._generate_locked(tokens, max_tokens, sampling, grammar, n_logprobs)

    def _generate_locked(self, tokens, max_tokens, sampling, grammar, n_logprobs):
        L = self._L
        self._live()
        history = tokens[-self.last_n_tokens_size:] if self.last_n_tokens_size else []
        # built before the prompt is evaluated: an invalid grammar costs no prefill
        smpl = self._make_sampler(history=history, grammar=grammar, **sampling)
        try:
            t0 = time.perf_counter()
            cached = self.eval_prompt(list(tokens))
            t1 = time.perf_counter()
            self.timings = Timings(prompt_tokens=len(tokens) - cached, prompt_cached=cached, prefill_s=t1 - t0)
            limit = self._n_ctx_seq - len(tokens)
            if max_tokens is not None and max_tokens > 0:
                limit = min(limit, max_tokens)
            n = 0
            self._stop_reason = "length"
            td = time.perf_counter()
            while n < limit:
                # (the chain accepts the token in _sample: penalties and grammar see it once)
                tok, row = self._sample(smpl, guarded=grammar is not None)
                if L.llama_vocab_is_eog(self._vocab, tok):
                    self._stop_reason = "eog"
                    return
                n += 1
                yield tok, (None if n_logprobs is None else _logprobs(row, tok, n_logprobs))
                if n >= limit or len(self._tokens) >= self._n_ctx_seq:
                    return
                self._decode([tok], len(self._tokens))
                self.timings.decode_tokens = n
                self.timings.decode_s = time.perf_counter() - td
        finally:
            L.llama_sampler_free(smpl)

    @_locked
    def generate_batch(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> List[List[int]]:
        """Greedy continuations of several prompts decoded together, one sequence each (needs
        n_seq_max >= len(prompts); each sequence holds n_ctx / n_seq_max tokens). Every prompt is
        prefilled in its own sequence, as eval_prompt prefills one (TCA: its last ubatch is its
        prompt end); then each llama_decode carries one token of every unfinished sequence -- one
        graph, with TCA one attention node a sequence over that sequence's retained rows. A sequence
        stops at an end-of-generation token or after max_tokens tokens. The context is cleared after, the sequences stay (tca_stats(seq=i) reads sequence i's memory) until the next
        call or reset(). Returns the generated token ids of each prompt."""
        import numpy as np
        L, ffi = self._L, self._ffi
        ctx = self._live()
        prompts = [_check_tokens(p, self._n_vocab, f"prompt {i}") for i, p in enumerate(prompts)]
        _check_int("max_tokens", max_tokens, 1)
        if not prompts:
            return []
        if len(prompts) > self.n_seq_max:
            raise ValueError(f"{len(prompts)} prompts but n_seq_max={self.n_seq_max}")
        if len(prompts) > self.n_batch:
            raise ValueError(f"{len(prompts)} prompts exceed n_batch={self.n_batch} (one token each per step)")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + max_tokens > self._n_ctx_seq:
                raise ContextOverflowError(f"prompt {i}: {len(p)} tokens + max_tokens {max_tokens} exceed a "
                                           f"sequence's context of {self._n_ctx_seq} (n_ctx / n_seq_max)")
        mem = L.llama_get_memory(ctx)
        L.llama_memory_clear(mem, True)
        self._tokens = []
        n_vocab = self._n_vocab
        outs: List[List[int]] = [[] for _ in prompts]
        try:
            nxt = []
            for s, p in enumerate(prompts):
                self._decode(list(p), 0, seq_id=s, mirror=False)
                logits = np.frombuffer(ffi.buffer(L.llama_get_logits_ith(ctx, -1), 4 * n_vocab), np.float32)
                nxt.append(int(np.argmax(logits)))
            live = list(range(len(prompts)))
            pos = [len(p) for p in prompts]
            b = self._batch
            while True:
                for s in list(live):
                    t = nxt[s]
                    if L.llama_vocab_is_eog(self._vocab, t):
                        live.remove(s)
                        continue
                    outs[s].append(t)
                    if len(outs[s]) >= max_tokens:
                        live.remove(s)
                if not live:
                    return outs
                b.n_tokens = len(live)
                for i, s in enumerate(live):
                    b.token[i] = nxt[s]
                    b.pos[i] = pos[s]
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = s
                    b.logits[i] = 1
                err = ffi.new("char[512]")
                rc = self._scope.call(L.tca_decode, ctx, ffi.addressof(b), err, 512)
                self._scope.check(rc == 0, DecodeError, f"llama_decode failed with code {rc}", _native.err_text(err))
                for i, s in enumerate(live):
                    pos[s] += 1
                    logits = np.frombuffer(ffi.buffer(L.llama_get_logits_ith(ctx, i), 4 * n_vocab), np.float32)
                    nxt[s] = int(np.argmax(logits))
        except BaseException:
            L.llama_memory_clear(mem, True)
            raise

    # ------------------------------------------------------------------ completions
    @_locked
    def create_completion(
        self,
        prompt: Union[str, List[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        model: Optional[str] = None,
        grammar: Any = None,
    ):
        """Generate text from a prompt; OpenAI-style dict, or an iterator of chunks if stream.

        logprobs=N (an int >= 0): ``choices[0]["logprobs"]`` in llama-cpp-python's (OpenAI's legacy)
        shape, for the generated tokens: ``tokens`` (each token's text), ``text_offset`` (where it
        starts in prompt + completion text), ``token_logprobs`` and ``top_logprobs`` (a dict text ->
        log-probability of the N most likely tokens, plus the sampled one); a stream's chunks carry
        their own tokens. Log-probabilities are the log-softmax of the model's raw logits at each
        step (before penalties, grammar and temperature). Not with echo=True (the prompt's tokens
        have no logits here).

        grammar: a GBNF grammar the generated text must follow (llama.cpp's grammar sampler), as a
        string or an object with llama-cpp-python's LlamaGrammar attributes (``_grammar``,
        ``_root``; tca_ggml.grammar.LlamaGrammar); a grammar llama.cpp's parser refuses raises
        tca_ggml.grammar.GrammarError (a ValueError)."""
        return self._completion(prompt, suffix=suffix, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                min_p=min_p, typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed, model=model,
                                grammar=grammar, logprobs_format="completion")

    @_locked
    def _completion(self, prompt, *, suffix=None, max_tokens=16, temperature=0.8, top_p=0.95, min_p=0.05,
                    typical_p=1.0, logprobs=None, echo=False, stop=None, frequency_penalty=0.0, presence_penalty=0.0,
                    repeat_penalty=1.0, top_k=40, stream=False, seed=None, model=None, grammar=None,
                    logprobs_format="completion"):
        """create_completion, with ``choices[0]["logprobs"]`` in `logprobs_format`: "completion"
        (llama-cpp-python's text-completion shape) or "chat" (OpenAI's chat shape: ``{"content":
        [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}``, the
        N most likely tokens exactly). create_chat_completion and the server's slots use "chat"."""
        self._live()
        if suffix is not None:
            raise ValueError("suffix (infill) is not supported by tca_ggml")
        if logprobs is not None:
            _check_int("logprobs", logprobs, 0)
            if echo:
                raise ValueError("logprobs with echo=True is not supported by tca_ggml (the prompt's tokens "
                                 "have no logits: only a prompt's last token is computed)")
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens)
        _check_sampling(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                        presence_penalty, seed)
        if grammar is not None:
            self.check_grammar(grammar)   # now, not at the stream's first step
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stops = [s for s in stops if s]
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        elif isinstance(prompt, (list, tuple)):
            tokens = _check_tokens(prompt, self._n_vocab, "prompt token ids")
        else:
            raise TypeError("prompt must be a str or a list of token ids")
        if not tokens:
            raise ValueError("empty prompt")
        if len(tokens) > self._n_ctx_seq:
            raise ContextOverflowError(
                f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx_seq}")
        cid = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model or self.model_path
        gen = self._completion_text(tokens, max_tokens, stops, dict(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, seed=seed), grammar, logprobs)
        prompt_text = self.detokenize(tokens).decode("utf-8", "replace") if echo else ""
        fmt = None
        if logprobs is not None:
            # text_offset counts from the prompt's start, as llama-cpp-python's (len of a str prompt)
            base = len(prompt) if isinstance(prompt, str) else len(self.detokenize(tokens).decode("utf-8", "ignore"))
            fmt = functools.partial(self._format_logprobs, chat=logprobs_format == "chat", base=base)

        def chunk(text, finish, entries):
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": fmt(entries) if fmt else None,
                                 "finish_reason": finish}]}

        if stream:
            def _stream():
                if echo:
                    yield chunk(prompt_text, None, [])
                for piece, finish, entries in gen:
                    yield chunk(piece, finish, entries)
            return _stream()
        text, finish, every = "", None, []
        for piece, fin, entries in gen:
            text += piece
            finish = fin or finish
            every += entries
        out = chunk(prompt_text + text, finish, every)
        out["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": self._last_n_generated,
                        "total_tokens": len(tokens) + self._last_n_generated}
        return out

    def _format_logprobs(self, entries, chat: bool, base: int) -> Dict[str, Any]:
        """The logprobs object of `entries` (_completion_text's): llama-cpp-python's text-completion
        shape, or OpenAI's chat shape (`chat`)."""
        pieces: Dict[int, bytes] = {}

        def piece(t):
            if t not in pieces:
                pieces[t] = self._piece(t)
            return pieces[t]

        if chat:
            content = []
            for e in entries:
                content.append({"token": e["piece"].decode("utf-8", "ignore"), "logprob": e["logprob"],
                                "bytes": list(e["piece"]),
                                "top_logprobs": [{"token": piece(i).decode("utf-8", "ignore"), "logprob": lp,
                                                  "bytes": list(piece(i))} for i, lp in e["top"]]})
            return {"content": content, "refusal": None}
        out: Dict[str, Any] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for e in entries:
            s = e["piece"].decode("utf-8", "ignore")
            top: Dict[str, float] = {}
            for i, lp in e["top"]:
                top.setdefault(piece(i).decode("utf-8", "ignore"), lp)
            top[s] = e["logprob"]   # the sampled token is always there (OpenAI: up to N + 1 entries)
            out["tokens"].append(s)
            out["text_offset"].append(base + e["offset"])
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append(top)
        return out

    def _completion_text(self, tokens, max_tokens, stops, sampling, grammar=None, n_logprobs=None):
        """Yield (text_delta, finish_reason, entries) triples; text is released only when it is
        complete UTF-8 and cannot be the start of a stop string. The last triple carries the reason.
        entries (empty unless n_logprobs is not None): the generated tokens whose text starts in
        this delta, each {"id", "piece" (its bytes), "offset" (where its text starts in the
        completion, in characters), "logprob", "top" ([(id, logprob)], most likely first)}; tokens
        after a stop string are dropped with their text."""
        self._last_n_generated = 0
        pending = b""     # bytes not yet valid UTF-8
        held = ""         # decoded text held back because it may start a stop string
        finish = "length"
        decoded = emitted = 0   # characters decoded so far (emitted + held), and handed out
        queue: List[Dict[str, Any]] = []   # entries not handed out yet
        cut_by_stop = False

        def release(upto):
            nonlocal queue
            k = 0
            while k < len(queue) and queue[k]["offset"] < upto:
                k += 1
            out, queue = queue[:k], queue[k:]
            return out

        for tok, lp in self._generate(tokens, max_tokens, sampling, grammar, n_logprobs):
            self._last_n_generated += 1
            piece = self._piece(tok)
            before, start = pending, decoded
            pending += piece
            try:
                new = pending.decode("utf-8")
                pending = b""
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and len(pending) - e.start < 4:
                    new, pending = pending[:e.start].decode("utf-8"), pending[e.start:]
                else:
                    new, pending = pending.decode("utf-8", "replace"), b""
            decoded += len(new)
            held += new
            if lp is not None:
                # where the token's text starts: after the characters of the bytes before it -- an
                # unfinished sequence it does not complete becomes U+FFFD before it; one it completes
                # is the character it starts in (its offset is that character's)
                if before and new.startswith(before.decode("utf-8", "replace")):
                    start += len(before.decode("utf-8", "replace"))
                queue.append({"id": tok, "piece": piece, "offset": start, "logprob": lp[0], "top": lp[1]})
            cut = min((held.find(s) for s in stops if s in held), default=-1)
            if cut >= 0:
                if held[:cut]:
                    emitted += cut
                    yield held[:cut], None, release(emitted)
                held, finish, cut_by_stop = "", "stop", True
                break
            keep = 0
            for s in stops:
                for k in range(min(len(s) - 1, len(held)), 0, -1):
                    if held.endswith(s[:k]):
                        keep = max(keep, k)
                        break
            if len(held) > keep:
                emitted += len(held) - keep
                yield held[:len(held) - keep], None, release(emitted)
                held = held[len(held) - keep:]
        else:
            finish = "stop" if self._stop_reason == "eog" else "length"
        tail = held + (pending.decode("utf-8", "replace") if pending else "")
        if finish == "stop" and held == "" and not pending:
            tail = ""
        emitted += len(tail)
        yield tail, finish, (release(emitted) if cut_by_stop else queue)

    def __call__(self, prompt, **kwargs):
        return self.create_completion(prompt, **kwargs)

    # ------------------------------------------------------------------ chat
    @_locked
    def chat_template(self) -> Optional[str]:
        self._check_open()
        p = self._L.llama_model_chat_template(self._model, self._ffi.NULL)
        return None if p == self._ffi.NULL else self._ffi.string(p).decode("utf-8", "replace")

    @_locked
    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the GGUF's chat template, as llama.cpp's
        llama_chat_apply_template does (built-in template recognition)."""
        L, ffi = self._L, self._ffi
        tmpl = self.chat_template()
        if self.chat_format is not None:
            tmpl = self.chat_format
        if tmpl is None:
            raise ValueError("the model has no chat template; pass chat_format='chatml' (or another "
                             "llama.cpp built-in template name)")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        keep = []
        arr = ffi.new("llama_chat_message[]", len(messages))
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a dict with 'role' and a str 'content'")
            r, c = ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode())
            keep += [r, c]
            arr[i].role, arr[i].content = r, c
        t = tmpl.encode()
        size = 4096 + sum(len(m["content"]) * 2 for m in messages)
        buf = ffi.new("char[]", size)
        n = L.llama_chat_apply_template(t, arr, len(messages), add_generation_prompt, buf, size)
        if n > size:
            buf = ffi.new("char[]", n + 1)
            n = L.llama_chat_apply_template(t, arr, len(messages), add_generation_prompt, buf, n + 1)
        if n < 0:
            raise ValueError("llama.cpp does not recognise this model's chat template; "
                             "pass chat_format= with a built-in template name (e.g. 'chatml')")
        return ffi.buffer(buf, n)[:].decode("utf-8", "replace")

    @_locked
    def create_chat_completion(self, messages: List[Dict[str, str]], temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                               typical_p: float = 1.0, stream: bool = False,
                               stop: Optional[Union[str, List[str]]] = None, seed: Optional[int] = None,
                               max_tokens: Optional[int] = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                               model: Optional[str] = None, response_format: Optional[Dict[str, Any]] = None,
                               grammar: Any = None, logprobs: Optional[bool] = None,
                               top_logprobs: Optional[int] = None):
        """A chat turn with the GGUF's chat template; OpenAI-style dict, or chunks if stream.

        logprobs=True (top_logprobs=N, default 0): ``choices[0]["logprobs"]`` in OpenAI's chat shape,
        ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [N x {"token", "logprob",
        "bytes"}]}], "refusal": None}`` (a stream's chunks carry their own tokens); log-softmax of the
        raw logits, as create_completion's. response_format: ``{"type": "json_object"}`` (llama-cpp-
        python's ``"schema"`` key beside it honoured) or ``{"type": "json_schema", "json_schema":
        {"schema": {...}}}`` constrains the answer with a grammar (tca_ggml.grammar; an unsupported
        schema keyword raises GrammarError, a ValueError); grammar: GBNF text, as create_completion's."""
        _check_sampling(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                        presence_penalty, seed)
        if logprobs is not None and not isinstance(logprobs, bool):
            raise TypeError(f"logprobs must be a bool, got {type(logprobs).__name__}")
        if top_logprobs is not None:
            _check_int("top_logprobs", top_logprobs, 0)
            if not logprobs:
                raise ValueError("top_logprobs needs logprobs=True")
        from .grammar import response_format_grammar
        fmt_grammar = response_format_grammar(response_format)
        if fmt_grammar is not None:
            if grammar is not None:
                raise ValueError("give response_format or grammar, not both")
            grammar = fmt_grammar
        prompt = self.apply_chat_template(messages, add_generation_prompt=True)
        tokens = self.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        bos = self.token_bos()
        if self._L.llama_vocab_get_add_bos(self._vocab) and (not tokens or tokens[0] != bos):
            tokens = [bos] + tokens
        res = self._completion(tokens, suffix=None, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, min_p=min_p, typical_p=typical_p, logprobs=(top_logprobs or 0) if logprobs
                               else None, echo=False, stop=stop, stream=stream, seed=seed,
                               presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                               repeat_penalty=repeat_penalty, model=model, grammar=grammar, logprobs_format="chat")
        cid = f"chatcmpl-{uuid.uuid4()}"
        if stream:
            def _stream():
                first = True
                for ch in res:
                    c = ch["choices"][0]
                    delta = {"role": "assistant", "content": c["text"]} if first else {"content": c["text"]}
                    first = False
                    yield {"id": cid, "object": "chat.completion.chunk", "created": ch["created"],
                           "model": ch["model"], "choices": [{"index": 0, "delta": delta,
                                                               "logprobs": c["logprobs"],
                                                               "finish_reason": c["finish_reason"]}]}
            return _stream()
        c = res["choices"][0]
        return {"id": cid, "object": "chat.completion", "created": res["created"], "model": res["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c["text"]},
                             "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}],
                "usage": res["usage"]}

    # ------------------------------------------------------------------ progress
    @staticmethod
    def _make_progress(progress):
        if progress is None or progress is False:
            return None
        if callable(progress):
            return progress
        if progress is True:
            try:
                from tqdm import tqdm  # optional
                bar = tqdm(total=100, desc="loading model", unit="%")
                state = {"last": 0}

                def cb(p):
                    v = int(p * 100)
                    bar.update(v - state["last"])
                    state["last"] = v
                    if v >= 100:
                        bar.close()
                return cb
            except ImportError:
                import sys
                state = {"last": -1}

                def cb(p):
                    v = int(p * 20)
                    if v != state["last"]:
                        state["last"] = v
                        sys.stderr.write(f"\rloading model [{'#' * v}{'.' * (20 - v)}] {int(p * 100):3d}%")
                        if v == 20:
                            sys.stderr.write("\n")
                return cb
        raise TypeError("progress must be None, a bool, or a callable(progress: float)")
