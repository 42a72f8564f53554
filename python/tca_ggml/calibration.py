"""The calibration search of design §4: per (layer, KV head), which candidate budget to keep.

`tca_ggml.reference` states the online math (selection, retention, decode rule); this module
replays that math on the Q/K captured from one dense pass and measures, for every candidate
budget of the grid, the share of probe queries' dense softmax mass the retained rows keep
(coverage). The sparsest candidate reaching tau wins; none -> dense. NumPy only, float64.

Three simulations, one per retention policy the budgets are calibrated for:

* **final** (`calibrate_head_final`; the default of `tca-ggml calibrate`): the "hold" retention
  (docs/design.md "Retention"). Nothing is evicted during a prompt; after the prompt's last
  ubatch one selection over every row decides what stays: pooled importance = mean over the
  prompt's last ``n_obs`` queries (no causal mask), the block metric / ranking / per-block top-k
  of `reference.select_keep`, with the top ``n_whole`` ranked blocks kept whole
  (`reference.whole_budget`). Queries after the prompt (the answer, decoded) attend what stayed;
  blocks leaving the window meanwhile are cut by the decode rule. One dense pass over a text with
  several questions gives several prompts (`Episode`: the prefix up to a question, its answer the
  probes); coverage is the mean over all probes.
* **chunked** (`calibrate_head_chunked`): the "stream" retention: after every prefill ubatch
  all aged blocks are re-selected with that ubatch's last query and evictions are final; a
  probe (last 256 + 256 random positions) is scored against the set retained after its ubatch.
* **single** (`calibrate_head`): the paper's setting: one selection with the text's last query,
  every probe scored against that set.

The candidate grid (`candidate_grid`) is the one of design §4 and the one `gguf_meta` writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from . import reference as R

__all__ = [
    "candidate_grid", "probe_positions", "coverage_of_kept", "candidate_coverages",
    "calibrate_head", "chunked_evictions", "chunked_probe_coverage",
    "chunked_candidate_coverages", "calibrate_head_chunked", "Episode", "final_scores",
    "final_evictions", "final_probe_coverage", "final_candidate_coverages",
    "tail_episode", "calibrate_head_final",
]


# --------------------------------------------------------------------------- candidate grid
def candidate_grid(block_size: int = 128, m: int = 14, sigma: float = 1.0):
    """The M candidate budgets of design §4 (the only definition of the grid).

    ``mu`` linearly spaced over [0, log2 b] (float32, length m), ``sigma`` constant
    (float32, length m), ``k_values = 1, 2, 4, ..., b`` (uint32). Candidate c's budget is
    ``reference.log_gaussian_p(k_values, mu[c], sigma[c])``.
    """
    b = int(block_size)
    if b < 1 or b & (b - 1):
        raise ValueError(f"block_size {block_size} is not a power of two")
    lb = int(round(math.log2(b)))
    k_values = (2 ** np.arange(lb + 1)).astype(np.uint32)
    mu = np.linspace(0.0, float(lb), int(m)).astype(np.float32)
    sig = np.full(int(m), sigma, dtype=np.float32)
    return mu, sig, k_values


# --------------------------------------------------------------------------- single-shot
def probe_positions(n: int, n_last: int = 256, n_random: int = 256, seed: int = 0) -> np.ndarray:
    """Probe query positions for calibration: the last ``min(n_last, n)`` positions plus
    ``min(n_random, remaining)`` distinct random earlier ones drawn with
    ``np.random.default_rng(seed)``. Sorted ascending."""
    n_l = min(int(n_last), int(n))
    rest = int(n) - n_l
    last = np.arange(rest, int(n), dtype=np.int64)
    n_r = min(int(n_random), rest)
    rnd = np.random.default_rng(seed).choice(rest, size=n_r, replace=False) if n_r else \
        np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([rnd.astype(np.int64), last]))


def _as_qk(Qg, Kg):
    """(Qg, Kg) as float64, Qg as [n, G, d] (a [n, d] Qg is one query head)."""
    Qg = np.asarray(Qg, dtype=np.float64)
    if Qg.ndim == 2:
        Qg = Qg[:, None, :]
    return Qg, np.asarray(Kg, dtype=np.float64)


def coverage_of_kept(Qg, Kg, keep_mask, probe_pos, scale: Optional[float] = None,
                     chunk: Optional[int] = None) -> np.ndarray:
    """Kept share of each probe query's pooled dense softmax mass.

    ``Qg``: [n, G, d] group queries; ``Kg``: [n, d]; ``keep_mask``: bool [n] (one kept set)
    or [C, n] (C kept sets evaluated in the same pass); ``probe_pos``: query positions.
    For probe position q the pooled dense distribution is
    ``a = mean_h softmax(Qg[q, h] . Kg[:q+1]^T * scale)`` and its coverage is
    ``1 - sum_{i <= q, not keep[i]} a_i`` (exactly 1.0 when nothing visible is evicted).
    The keep mask must already include what counts as kept (sinks, the live window).

    Probe rows are processed in chunks, so memory is O(chunk * G * n), never n x n.
    Returns float64 [n_probe] or [C, n_probe].
    """
    Qg, Kg = _as_qk(Qg, Kg)
    n, G, d = Qg.shape
    keep = np.asarray(keep_mask, dtype=bool)
    single = keep.ndim == 1
    keep = np.atleast_2d(keep)
    if keep.shape[1] != Kg.shape[0]:
        raise ValueError("keep_mask length must equal the number of keys")
    probe_pos = np.asarray(probe_pos, dtype=np.int64)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    evicted = (~keep).astype(np.float64).T                     # [n_k, C]
    if chunk is None:
        chunk = max(1, (1 << 22) // max(1, G * Kg.shape[0]))
    cov = np.empty((keep.shape[0], probe_pos.size), dtype=np.float64)
    kpos = np.arange(Kg.shape[0])
    for a in range(0, probe_pos.size, chunk):
        qp = probe_pos[a:a + chunk]
        logits = np.einsum("qhd,kd->qhk", Qg[qp], Kg) * float(scale)
        logits = np.where((kpos[None, :] <= qp[:, None])[:, None, :], logits, -np.inf)
        pooled = R._softmax_rows(logits).mean(axis=1)            # [c, n_k]
        cov[:, a:a + chunk] = (1.0 - pooled @ evicted).T
    return cov[0] if single else cov


def candidate_coverages(Qg, Kg, p_list, k_values, block_size: int, window: int, n_sink: int,
                        alpha: float, probe_pos, scale: Optional[float] = None):
    """Single-shot selection (last query over the whole text) for each budget in
    ``p_list`` and the mean probe coverage of each resulting kept set.

    Returns ``(keep_masks [C, n] bool, coverage [C])``.
    """
    Qg = np.asarray(Qg, dtype=np.float64)
    Kg = np.asarray(Kg, dtype=np.float64)
    n = Kg.shape[0]
    pos = np.arange(n, dtype=np.int64)
    s = R.pooled_importance(Qg[n - 1], Kg, scale)
    masks = np.stack([R.select_keep(pos, s, p, k_values, block_size, window, n_sink, n, alpha)
                      for p in p_list])
    cov = coverage_of_kept(Qg, Kg, masks, probe_pos, scale).mean(axis=1)
    return masks, cov


def calibrate_head(Qg, Kg, tau: float = 0.9, block_size: int = 128, window: int = 4096,
                   n_sink: int = 4, alpha: float = 0.5, mu=None, sigma=None, k_values=None,
                   scale: Optional[float] = None, n_probe_last: int = 256,
                   n_probe_random: int = 256, seed: int = 0):
    """Design §4 for one KV head.

    ``Qg``: [n, G, d] the group's queries, ``Kg``: [n, d] the head's keys (after RoPE, as
    the op sees them). For every candidate c (grid from ``candidate_grid(block_size)``
    unless ``mu``/``sigma``/``k_values`` are given) the budget
    ``p_c = log_gaussian_p(k_values, mu[c], sigma[c])`` is applied once, with the last
    query over the whole text (``select_keep`` with n_seen = n); coverage is the mean
    over ``probe_positions(n, n_probe_last, n_probe_random, seed)`` of
    ``coverage_of_kept``. The sparsest candidate (smallest t = sum k p_k; ties lower
    index) with coverage >= tau wins; if none, the head is dense (index -1).

    Returns ``(candidate_index, p, density = t / b, coverage)``; for dense,
    ``p = dense_p(k_values)``, density 1.0 and coverage 1.0.
    """
    p_list, t, k_values = _grid_lists(block_size, mu, sigma, k_values)
    n = np.asarray(Kg).shape[0]
    probes = probe_positions(n, n_probe_last, n_probe_random, seed)
    _, cov = candidate_coverages(Qg, Kg, p_list, k_values, block_size, window, n_sink, alpha,
                                 probes, scale)
    return _pick_sparsest(p_list, t, cov, k_values, tau)


# --------------------------------------------------------------------------- chunked calibration
_NEVER = np.iinfo(np.int64).max      # eviction step of a key that is never evicted


def _select_keep_vec(pos, s, p, k_values, block_size: int, window: int, n_sink: int,
                     n_seen: int, alpha: float) -> np.ndarray:
    """Vectorised ``select_keep`` (same arguments, same result, bit for bit).

    Ranking uses ``assign_k``'s rule (stable sort of -h, ``(r + 0.5)/N < C_i`` found by
    ``searchsorted``), and the per-block top-k one global ``lexsort`` by (block, -pooled s, pos).
    """
    pos, s, keep, idx, _, h = R.aged_rows(pos, s, block_size, window, n_sink, n_seen, alpha)
    if h is None:
        return keep
    b = int(block_size)
    # assign_k, vectorised
    k = np.asarray(k_values).astype(np.int64)
    pk = np.asarray(p, dtype=np.float64)
    desc = np.argsort(-k, kind="stable")
    k_desc = k[desc]
    cum = np.cumsum(pk[desc])
    nb = h.size
    order = np.argsort(-h, kind="stable")
    u = (np.arange(nb) + 0.5) / nb
    hit = np.searchsorted(cum, u, side="right")          # smallest i with u < C_i
    kj = np.empty(nb, dtype=np.int64)
    kj[order] = k_desc[np.minimum(hit, k_desc.size - 1)]
    rank, inv = _rank_in_block(pos[idx], s[idx], b)
    keep[idx] = rank < kj[inv]
    return keep


def _rank_in_block(pos, s, block_size: int):
    """Per-block top-k order of design §3 step 4, vectorised: each row's rank within its block by
    pooled score (`reference.pool_scores`, descending; ties: lower position first), and its
    block's index among the distinct blocks. ``pos`` ascending. Returns (rank, block_index)."""
    b = int(block_size)
    _, inv, counts = np.unique(pos // b, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    o = np.lexsort((pos, -R.pool_scores(pos, s, b), inv))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(pos.size, dtype=np.int64)
    rank[o] = np.arange(pos.size) - starts[inv[o]]
    return rank, inv


def _ubatch_ends(n: int, ubatch: int) -> np.ndarray:
    return np.minimum(np.arange(int(ubatch), int(n) + int(ubatch), int(ubatch)), int(n)) \
        if n > 0 else np.zeros(0, dtype=np.int64)


def chunked_evictions(Qg, Kg, p_list, k_values, block_size: int, window: int, n_sink: int,
                      alpha: float, ubatch: int = 512,
                      scale: Optional[float] = None) -> np.ndarray:
    """Replay a chunked prefill for one KV head, for every budget in ``p_list`` at once.

    Exactly what ``TCALayerState.prefill_ubatch`` does to one head's positions: ubatch j
    covers positions [j*ubatch, e_j) with e_j = min((j+1)*ubatch, n); after it, if any
    block is aged (n_aged_blocks(e_j) > 0), the retained set (earlier survivors plus the
    ubatch's tokens) is compacted with the pooled importance of the query at e_j - 1 over
    exactly that retained set (``select_keep`` with n_seen = e_j).

    The pooled importance only needs the last query's logits on the retained keys, so the
    per-head ``exp(logit - max)`` over all keys [0, e_j) is computed once per ubatch and
    shared by all candidates, each renormalising it over its own retained subset (pooled =
    mean over heads of per-head softmax, so per-head sums are kept separately).

    Returns int64 ``[C, n]``: for candidate c and key i, the index j of the ubatch after
    which key i was evicted, or ``np.iinfo(np.int64).max`` if it never is. Key i is
    retained after ubatch j iff ``i < e_j and evict[c, i] > j``.
    """
    Qg, Kg = _as_qk(Qg, Kg)
    n, G, d = Qg.shape
    if Kg.shape[0] != n:
        raise ValueError("Qg and Kg must have the same number of positions")
    if int(ubatch) < 1:
        raise ValueError("ubatch must be >= 1")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    C = len(p_list)
    evict = np.full((C, n), _NEVER, dtype=np.int64)
    retained = [np.zeros(0, dtype=np.int64) for _ in range(C)]
    a = 0
    for j, e in enumerate(_ubatch_ends(n, ubatch)):
        e = int(e)
        new = np.arange(a, e, dtype=np.int64)
        a = e
        for c in range(C):
            retained[c] = np.concatenate([retained[c], new])
        if R.n_aged_blocks(e, block_size, window) == 0:
            continue
        logits = (Qg[e - 1] @ Kg[:e].T) * float(scale)            # [G, e]
        mx = logits.max(axis=1, keepdims=True)
        ex = np.exp(logits - mx)                                  # shared by all candidates
        for c in range(C):
            ret = retained[c]
            eR = ex[:, ret]
            # a head whose retained maximum is far below its global maximum would lose
            # precision (underflow): renormalise that head from its logits on R instead
            low = eR.max(axis=1) < 1e-250
            if low.any():
                lr = logits[low][:, ret]
                eR[low] = np.exp(lr - lr.max(axis=1, keepdims=True))
            s = (eR / eR.sum(axis=1, keepdims=True)).mean(axis=0)
            keep = _select_keep_vec(ret, s, p_list[c], k_values, block_size, window, n_sink, e,
                                    alpha)
            evict[c, ret[~keep]] = j
            retained[c] = ret[keep]
    return evict


def chunked_probe_coverage(Qg, Kg, evict, probe_pos, ubatch: int = 512,
                           scale: Optional[float] = None,
                           chunk: Optional[int] = None) -> np.ndarray:
    """Coverage of each probe query against the retained set after its ubatch's compaction.

    ``evict``: ``[C, n]`` from ``chunked_evictions`` (same ``ubatch``). Probe q lies in
    ubatch j = q // ubatch; its coverage under candidate c is the share of its pooled dense
    softmax mass ``a = mean_h softmax(Qg[q, h] . Kg[:q+1]^T * scale)`` on keys still
    retained after ubatch j's compaction: ``1 - sum_{i <= q, evict[c, i] <= j} a_i``
    (exactly 1.0 when nothing visible has been evicted). Probes are grouped by ubatch and
    processed in chunks: O(chunk * G * n) memory, never n x n.

    Returns float64 ``[C, n_probe]`` aligned with ``probe_pos``.
    """
    Qg, Kg = _as_qk(Qg, Kg)
    n, G, d = Qg.shape
    evict = np.atleast_2d(np.asarray(evict, dtype=np.int64))
    if evict.shape[1] != Kg.shape[0]:
        raise ValueError("evict must have one column per key")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    probe_pos = np.asarray(probe_pos, dtype=np.int64)
    C = evict.shape[0]
    cov = np.ones((C, probe_pos.size), dtype=np.float64)
    if chunk is None:
        chunk = max(1, (1 << 22) // max(1, G * n))
    ub_of = probe_pos // int(ubatch)
    for j in np.unique(ub_of):
        sel = np.nonzero(ub_of == j)[0]
        e = int(probe_pos[sel].max()) + 1                      # keys beyond are invisible
        ev = (evict[:, :e] <= j)                               # [C, e]
        if not ev.any():
            continue                                           # nothing evicted yet: 1.0
        evf = ev.T.astype(np.float64)                          # [e, C]
        for a in range(0, sel.size, chunk):
            z = sel[a:a + chunk]
            qp = probe_pos[z]
            logits = (Qg[qp].reshape(-1, d) @ Kg[:e].T).reshape(qp.size, G, e) * float(scale)
            logits = np.where((np.arange(e)[None, :] <= qp[:, None])[:, None, :], logits,
                              -np.inf)
            pooled = R._softmax_rows(logits).mean(axis=1)        # [c, e]
            cov[:, z] = (1.0 - pooled @ evf).T
    return cov


def chunked_candidate_coverages(Qg, Kg, p_list, k_values, block_size: int, window: int,
                                n_sink: int, alpha: float, probe_pos, ubatch: int = 512,
                                scale: Optional[float] = None):
    """Chunked-prefill counterpart of ``candidate_coverages``.

    Returns ``(evict [C, n] int64 (see chunked_evictions), coverage [C])``, coverage being
    the mean over ``probe_pos`` of ``chunked_probe_coverage``.
    """
    evict = chunked_evictions(Qg, Kg, p_list, k_values, block_size, window, n_sink, alpha,
                              ubatch, scale)
    cov = chunked_probe_coverage(Qg, Kg, evict, probe_pos, ubatch, scale)
    return evict, cov.mean(axis=1)


def _grid_lists(block_size, mu, sigma, k_values):
    if mu is None or sigma is None or k_values is None:
        g_mu, g_sigma, g_k = candidate_grid(block_size)
        mu = g_mu if mu is None else mu
        sigma = g_sigma if sigma is None else sigma
        k_values = g_k if k_values is None else k_values
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), mu.shape)
    p_list = [R.log_gaussian_p(k_values, m_, s_) for m_, s_ in zip(mu, sigma)]
    t = np.array([R.expected_tokens(p, k_values) for p in p_list])
    return p_list, t, k_values


def _pick_sparsest(p_list, t, cov, k_values, tau):
    b = float(np.max(np.asarray(k_values)))
    for c in np.argsort(t, kind="stable"):
        if cov[c] >= tau:
            return int(c), p_list[c], float(t[c] / b), float(cov[c])
    return -1, R.dense_p(k_values), 1.0, 1.0


def calibrate_head_chunked(Qg, Kg, tau: float = 0.9, block_size: int = 128, window: int = 4096,
                           n_sink: int = 4, alpha: float = 0.5, mu=None, sigma=None,
                           k_values=None, scale: Optional[float] = None, ubatch: int = 512,
                           n_probe_last: int = 256, n_probe_random: int = 256, seed: int = 0):
    """Design §4 for one KV head, simulating the chunked prefill that inference runs.

    Like ``calibrate_head`` (same grid, probes, selection rule and return convention), but
    each candidate budget is applied the way ``TCALayerState.prefill_ubatch`` applies it:
    the text is prefilled in ubatches of ``ubatch`` tokens and after every ubatch (once any
    block is aged) all aged blocks are re-selected with that ubatch's last query over the
    retained keys; evictions are final (``chunked_evictions``). A probe query's coverage is
    the share of its pooled dense softmax mass (keys <= q) on the keys retained after the
    compaction that follows its own ubatch -- the set the next ubatch and later decode
    steps see (``chunked_probe_coverage``). The sparsest candidate (smallest t; ties lower
    index) whose mean coverage reaches tau wins; none -> dense (index -1).

    Returns ``(candidate_index, p, density = t / b, coverage)``; dense: ``dense_p``, 1.0, 1.0.
    """
    p_list, t, k_values = _grid_lists(block_size, mu, sigma, k_values)
    n = np.asarray(Kg).shape[0]
    probes = probe_positions(n, n_probe_last, n_probe_random, seed)
    _, cov = chunked_candidate_coverages(Qg, Kg, p_list, k_values, block_size, window, n_sink,
                                         alpha, probes, ubatch, scale)
    return _pick_sparsest(p_list, t, cov, k_values, tau)


# --------------------------------------------------------------------------- final (hold) calibration
@dataclass
class Episode:
    """One simulated prompt of the "hold" retention on a captured sequence.

    The prompt is positions [0, ``end``): its last ubatch attends every row, then the final
    selection, scored by the queries at [end - n_obs, end), decides what stays. ``probes`` are
    query positions scored against what is retained when they run. Positions >= end are decode
    steps (an answer): they see the final selection and the decode rule's cuts of the steps
    before them. Positions < end (inside the prompt) are scored against the final selection as
    if they ran after it -- an upper bound on what a prompt query loses, since in inference the
    prompt's last ubatch attends every row.
    """
    end: int
    probes: np.ndarray

    def __post_init__(self):
        self.end = int(self.end)
        self.probes = np.asarray(self.probes, dtype=np.int64).reshape(-1)
        if self.end < 1:
            raise ValueError("an episode's prompt must hold at least one token")
        if self.probes.size and self.probes.min() < 0:
            raise ValueError("probe positions must be >= 0")

    @property
    def upto(self) -> int:
        """Positions the episode reads: the prompt and every probe."""
        return max(self.end, int(self.probes.max()) + 1) if self.probes.size else self.end


def final_scores(Qg, Kg, end: int, n_obs: int = 32, scale: Optional[float] = None) -> np.ndarray:
    """Pooled importance of a final selection: the mean over the prompt's last ``n_obs`` queries
    (positions [end - n_obs, end), fewer if the prompt is shorter) of each query's
    ``reference.pooled_importance`` over every row [0, end) -- no causal mask inside the window,
    as in `reference.TCALayerState` (retention "hold"). Float64 [end]."""
    Qg, Kg = _as_qk(Qg, Kg[:end])
    _, G, d = Qg.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    n_o = max(1, min(int(n_obs), int(end)))
    acc = np.zeros(int(end), dtype=np.float64)
    step = max(1, (1 << 22) // max(1, G * int(end)))
    for a in range(end - n_o, end, step):
        z = min(a + step, end)
        lg = (Qg[a:z].reshape(-1, d) @ Kg.T) * float(scale)
        acc += R._softmax_rows(lg).reshape(z - a, G, -1).mean(axis=1).sum(axis=0)
    return acc / n_o


def _cut_decode_blocks(ret, s, lo: int, F: int, kt: int, block_size: int) -> np.ndarray:
    """The decode rule on one head: rows of ``ret`` (ascending positions) in [lo, F) keep, per
    block, their ``kt`` rows of largest pooled score (`reference.pool_scores`; ties: lower
    position first). Returns the positions cut."""
    b = int(block_size)
    idx = np.nonzero((ret >= lo) & (ret < F))[0]
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    rank, _ = _rank_in_block(ret[idx], s[idx], b)
    return ret[idx[rank >= kt]]


def final_evictions(Qg, Kg, p_list, k_values, block_size: int, window: int, n_sink: int,
                    alpha: float, episode: Episode, n_obs: int = 32, n_whole: int = 4,
                    scale: Optional[float] = None) -> np.ndarray:
    """Replay the "hold" retention of one KV head for one episode, every budget at once.

    After the prompt [0, end): if any block is aged (N = n_aged_blocks(end) > 0), the rows kept
    are ``select_keep`` over every row with the scores of `final_scores` and the budget
    ``reference.whole_budget(p, k_values, N, n_whole)`` (what `reference.TCALayerState` does
    with retention "hold" on a prompt's last ubatch). Then the decode steps end .. upto-1: a
    step whose token makes a block age cuts the block(s) that left the window to floor(t)
    rows by its own query over the rows retained then (`TCAHeadState.compact_decode`).

    Returns int64 ``[C, upto]``: for candidate c and key i, the position of the step after
    which key i is gone (end - 1 for the final selection, the decode step's position for a
    cut), or ``np.iinfo(np.int64).max`` if it stays. A probe at q sees key i <= q iff
    ``evict[c, i] >= max(q, end)`` (a step attends before its own cut).
    """
    Qg, Kg = _as_qk(Qg, Kg)
    e, upto = episode.end, episode.upto
    if upto > min(Qg.shape[0], Kg.shape[0]):
        raise ValueError(f"episode reads {upto} positions, the capture holds {Kg.shape[0]}")
    b = int(block_size)
    C = len(p_list)
    evict = np.full((C, upto), _NEVER, dtype=np.int64)
    N = R.n_aged_blocks(e, b, window)
    if N > 0:
        s = final_scores(Qg, Kg, e, n_obs, scale)
        pos = np.arange(e, dtype=np.int64)
        for c, p in enumerate(p_list):
            pw = R.whole_budget(p, k_values, N, n_whole)
            keep = _select_keep_vec(pos, s, pw, k_values, b, window, n_sink, e, alpha)
            evict[c, :e][~keep] = e - 1
    frontier = N * b
    for q in range(e, upto):
        F = R.n_aged_blocks(q + 1, b, window) * b
        if F <= frontier:
            continue
        for c, p in enumerate(p_list):
            kt = max(1, int(math.floor(R.expected_tokens(p, k_values) + 1e-9)))
            ret = np.nonzero(evict[c, :q + 1] == _NEVER)[0]
            s = R.pooled_importance(Qg[q], Kg[ret], scale)
            evict[c, _cut_decode_blocks(ret, s, max(frontier, int(n_sink)), F, kt, b)] = q
        frontier = F
    return evict


def final_probe_coverage(Qg, Kg, evict, episode: Episode, scale: Optional[float] = None,
                         chunk: Optional[int] = None) -> np.ndarray:
    """Coverage of each probe of ``episode``: the share of its pooled dense softmax mass
    (``mean_h softmax(Qg[q, h] . Kg[:q+1]^T * scale)``) on keys it still sees (``evict`` from
    `final_evictions`: key i <= q is seen iff ``evict[c, i] >= max(q, end)``). Window and sinks
    are never evicted, so they count as kept. Float64 ``[C, n_probe]``; O(chunk * G * n)
    memory."""
    Qg, Kg = _as_qk(Qg, Kg)
    _, G, d = Qg.shape
    evict = np.atleast_2d(np.asarray(evict, dtype=np.int64))
    C = evict.shape[0]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    probes = episode.probes
    cov = np.ones((C, probes.size), dtype=np.float64)
    if probes.size == 0:
        return cov
    thr = np.maximum(probes, episode.end)
    m_all = int(probes.max()) + 1
    if chunk is None:
        chunk = max(1, (1 << 22) // max(1, (G + C) * m_all))
    for a in range(0, probes.size, chunk):
        qp = probes[a:a + chunk]
        m = int(qp.max()) + 1
        lg = (Qg[qp].reshape(-1, d) @ Kg[:m].T).reshape(qp.size, G, m) * float(scale)
        lg = np.where((np.arange(m)[None, :] <= qp[:, None])[:, None, :], lg, -np.inf)
        pooled = R._softmax_rows(lg).mean(axis=1)                       # [c, m]
        gone = evict[:, None, :m] < thr[a:a + chunk][None, :, None]     # [C, c, m]
        cov[:, a:a + chunk] = 1.0 - np.einsum("qm,cqm->cq", pooled, gone.astype(np.float64))
    return cov


def final_candidate_coverages(Qg, Kg, p_list, k_values, block_size: int, window: int,
                              n_sink: int, alpha: float, episodes: Sequence[Episode],
                              n_obs: int = 32, n_whole: int = 4,
                              scale: Optional[float] = None) -> np.ndarray:
    """Every episode's final selection and probe coverage for every budget in ``p_list``.

    Returns float64 ``[C, total probes]``, the episodes' probes concatenated in order."""
    out = []
    for ep in episodes:
        ev = final_evictions(Qg, Kg, p_list, k_values, block_size, window, n_sink, alpha, ep,
                             n_obs, n_whole, scale)
        out.append(final_probe_coverage(Qg, Kg, ev, ep, scale))
    if not out:
        return np.zeros((len(p_list), 0))
    return np.concatenate(out, axis=1)


def tail_episode(n: int, n_tail: int = 256) -> Episode:
    """Without questions in the text: a prompt of ``n - n_tail`` tokens whose last ``n_tail``
    tokens are decoded (the probes)."""
    n_tail = max(1, min(int(n_tail), int(n) - 1))
    return Episode(int(n) - n_tail, np.arange(int(n) - n_tail, int(n)))


def calibrate_head_final(Qg, Kg, episodes: Optional[Sequence[Episode]] = None, tau: float = 0.9,
                         block_size: int = 128, window: int = 4096, n_sink: int = 4,
                         alpha: float = 0.5, mu=None, sigma=None, k_values=None,
                         scale: Optional[float] = None, n_obs: int = 32, n_whole: int = 4):
    """Design §4 for one KV head, for the "hold" retention.

    For every candidate budget of the grid (as ``calibrate_head``) and every episode: the
    final selection at the episode's prompt end (`final_evictions`), then each probe's
    coverage against what it sees (`final_probe_coverage`). Coverage = mean over all
    probes of all episodes; the sparsest candidate (smallest t; ties lower index) reaching
    tau wins, none -> dense (index -1). ``episodes`` defaults to `tail_episode` of the whole
    capture.

    Returns ``(candidate_index, p, density = t / b, coverage)``; dense: ``dense_p``, 1.0, 1.0.
    """
    p_list, t, k_values = _grid_lists(block_size, mu, sigma, k_values)
    if episodes is None:
        episodes = [tail_episode(np.asarray(Kg).shape[0])]
    cov = final_candidate_coverages(Qg, Kg, p_list, k_values, block_size, window, n_sink, alpha,
                                    episodes, n_obs, n_whole, scale)
    if cov.shape[1] == 0:
        raise ValueError("no probe queries: the episodes hold no probe positions")
    return _pick_sparsest(p_list, t, cov.mean(axis=1), k_values, tau)
