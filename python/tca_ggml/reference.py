"""NumPy reference of the TCA math (docs/design.md §3).

This module is the executable statement of what the C ggml operator must compute. It needs
only NumPy (no native library), works in float64 throughout, and favours clarity over
speed. Notation (design §3):

    b        block size; block j holds positions [j*b, (j+1)*b)
    w        local window (tokens)
    n_sink   positions pos < n_sink are sinks, never evicted
    alpha    importance / diversity weight
    k_values allowed kept tokens per block, 1, 2, 4, ..., b (ascending)
    p        a head's budget: p[i] = share of aged blocks that keep k_values[i] tokens
    t        expected kept tokens per aged block, t = sum_k k p_k

Per layer and per KV head g (query-head group G(g), GQA: query head h uses KV head
h // (n_head // n_head_kv)) the operator keeps a *retained list* of positions with their
K/V rows: sinks, the compacted tokens of *aged* blocks, and the exact *live* region
pos >= F (the compaction frontier, a multiple of b).

After n = p_last + 1 tokens have been seen, block j is aged iff (j+1)*b <= n - w, so the
number of aged blocks is

    n_aged(n) = max(0, floor((n - w) / b)),      F = n_aged(n) * b.

Compaction with the last query q_last (design §3, steps 1-4):

    1. s_h = softmax(q_last,h . K_R^T * scale) over the retained set R;  s = mean_{h in G(g)} s_h
    2. for every aged block j holding non-sink tokens:
           m_j = sum_{i in j} s_i
           c_j = 1 - sum_{i in j} s_i^2 / m_j^2          (0 if m_j = 0)
           h_j = (1 - alpha) * m_j / M + alpha * c_j     M = max_j m_j
    3. rank blocks by h_j descending (ties: lower block first); with k sorted descending,
       k_(0) = b > k_(1) > ..., C_i = sum_{i' <= i} p_(i'), the block of rank r among N gets
       k_(i) for the smallest i with (r + 0.5)/N < C_i (the smallest k if none)
    4. block j keeps its min(k_j, |j|) tokens of largest s (ties: lower position first);
       the rest are evicted for good.  F advances to n_aged(n) * b.

Pooled coverage of q_last reported for a compaction: the share of s on the tokens kept,
computed as 1 - sum_{evicted} s_i (so it is exactly 1.0 when nothing is evicted).

Error bound (TCA-SPEC): if a query's attended set holds softmax mass 1 - gamma, then
|o_sparse - o_dense| <= 2 * gamma * max|V| per coordinate.

When compaction runs (see `TCALayerState`):
    * prefill: after every ubatch (its attention is computed first, over the retained
      list including the ubatch's own tokens), provided at least one block is aged;
    * decode (one token per step): only when the step makes a new block age, i.e. when
      n_aged(n) grows; then only the block(s) that left the window, [F_old, F), are
      compressed, each to its floor(t) tokens of largest s (t = sum_k k p_k, at least 1;
      ties: lower position first) -- TCA-SPEC's decode rule. Older blocks stay as they are.

The calibration search (design §4) replays this math on captured Q/K: `tca_ggml.calibration`.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "log_gaussian_p", "expected_tokens", "dense_p", "forced_budget", "n_aged_blocks",
    "assign_k", "pooled_importance", "block_scores", "aged_rows", "select_keep", "sparse_attention",
    "dense_attention", "TCAHeadState", "TCALayerState", "simulate_prefill",
    "simulate_decode_step",
]


# --------------------------------------------------------------------------- budgets
def log_gaussian_p(k_values, mu: float, sigma: float) -> np.ndarray:
    """Budget distribution over k: ``p_k ∝ exp(-(log2 k - mu)^2 / (2 sigma^2))``.

    Returns float64 probabilities aligned with ``k_values``, summing to 1.
    """
    k = np.asarray(k_values, dtype=np.float64)
    if k.ndim != 1 or k.size == 0 or np.any(k <= 0):
        raise ValueError("k_values must be a non-empty 1-D array of positive values")
    if not sigma > 0:
        raise ValueError("sigma must be > 0")
    z = (np.log2(k) - float(mu)) ** 2 / (2.0 * float(sigma) ** 2)
    w = np.exp(-(z - z.min()))          # shift for stability; the argmin gets weight 1
    return w / w.sum()


def expected_tokens(p, k_values) -> float:
    """Expected kept tokens per aged block, ``t = sum_k k p_k``."""
    return float(np.dot(np.asarray(p, np.float64), np.asarray(k_values, np.float64)))


def dense_p(k_values) -> np.ndarray:
    """The dense budget: one-hot at k = b (= max(k_values)); every block keeps everything."""
    k = np.asarray(k_values)
    p = np.zeros(k.size, dtype=np.float64)
    p[int(np.argmax(k))] = 1.0
    return p


def forced_budget(density: float, k_values) -> np.ndarray:
    """A uniform budget with expected kept share `density` of each aged block: a mix of the
    two powers of two around density*b (one-hot when it is one). The reference of the native
    tca_forced_budget (native/include/tca_ggml.h), which tca_context_create uses for a forced
    density (Llama(..., tca_density=X))."""
    k = np.asarray(k_values, dtype=np.float64)
    b = k.max()
    t = min(max(density * b, k.min()), b)
    p = np.zeros(k.size)
    hi = int(np.searchsorted(k, t))
    if k[hi] == t:
        p[hi] = 1.0
    else:
        lo = hi - 1
        w = (t - k[lo]) / (k[hi] - k[lo])
        p[hi], p[lo] = w, 1.0 - w
    return p


def n_aged_blocks(n_seen: int, block_size: int, window: int) -> int:
    """Number of aged blocks after ``n_seen`` tokens: blocks j with (j+1)*b <= n_seen - w.

    Equals ``max(0, floor((n_seen - w) / b))``; aged blocks are always a prefix 0..N-1, so
    the frontier is ``F = n_aged_blocks(...) * b``. Nothing is aged while n_seen < w + b.
    """
    return max(0, (int(n_seen) - int(window)) // int(block_size))


def assign_k(h, p, k_values) -> np.ndarray:
    """Tokens each aged block may keep (design §3 step 3).

    ``h[j]`` is the score of the j-th aged block (array order = ascending block index).
    Blocks are ranked by h descending, ties lower index first (rank r = 0 is the best).
    With k sorted descending, ``k_(0) > k_(1) > ...`` and ``C_i = sum_{i'<=i} p_(i')``,
    rank r of N gets ``k_(i)`` for the smallest i with ``(r + 0.5) / N < C_i``, or the
    smallest k if there is none. The number of blocks given each k then differs from
    ``N p_k`` by less than 1 (cumulative counts are N*C_i rounded).

    Returns an int64 array aligned with ``h``.
    """
    h = np.asarray(h, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    k = np.asarray(k_values).astype(np.int64)
    if p.shape != k.shape:
        raise ValueError("p and k_values must have the same length")
    n = h.size
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    desc = np.argsort(-k, kind="stable")          # k_(0) = largest
    k_desc = k[desc]
    cum = np.cumsum(p[desc])                      # C_i
    order = np.argsort(-h, kind="stable")         # rank -> block; ties lower index first
    for r, j in enumerate(order):
        u = (r + 0.5) / n
        hits = np.nonzero(u < cum)[0]
        out[j] = k_desc[hits[0]] if hits.size else k_desc[-1]
    return out


# --------------------------------------------------------------------------- scoring
def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64; -inf entries get 0; an all -inf row gives all zeros."""
    mx = np.max(logits, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(logits - mx)
    tot = e.sum(axis=-1, keepdims=True)
    return np.divide(e, tot, out=np.zeros_like(e), where=tot > 0)


def pooled_importance(q_last, K, scale: Optional[float] = None) -> np.ndarray:
    """Pooled importance ``s = mean_h softmax(q_last,h . K^T * scale)`` (design §3 step 1).

    ``q_last``: [G, d] (or [d]) queries of the group's heads at the last position;
    ``K``: [n, d] keys of the retained tokens. ``scale`` defaults to 1/sqrt(d).
    Returns float64 [n], summing to 1.
    """
    q = np.atleast_2d(np.asarray(q_last, dtype=np.float64))
    K = np.asarray(K, dtype=np.float64)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if K.shape[0] == 0:
        return np.zeros(0)
    return _softmax_rows((q @ K.T) * float(scale)).mean(axis=0)


def block_scores(s, block_ids, alpha: float):
    """Block scores of design §3 step 2.

    ``s``: pooled importance of the candidate tokens (the non-sink retained tokens of aged
    blocks); ``block_ids``: their block index (pos // b). Outputs are aligned with the
    distinct block ids in ascending order (``np.unique(block_ids)``):

        m_j = sum_{i in j} s_i                       (block mass)
        c_j = 1 - sum_{i in j} s_i^2 / m_j^2         (diversity, 1 - HHI; 0 if m_j = 0)
        h_j = (1 - alpha) * m_j / M + alpha * c_j    M = max_j m_j  (m/M := 0 if M = 0)

    Returns ``(h, m, c)``, float64 arrays.
    """
    s = np.asarray(s, dtype=np.float64)
    ids = np.asarray(block_ids)
    if s.shape != ids.shape:
        raise ValueError("s and block_ids must have the same shape")
    if s.size == 0:
        z = np.zeros(0)
        return z, z.copy(), z.copy()
    _, inv = np.unique(ids, return_inverse=True)
    inv = inv.reshape(-1)
    m = np.bincount(inv, weights=s)
    sq = np.bincount(inv, weights=s * s)
    safe = np.where(m > 0, m, 1.0)
    c = np.where(m > 0, 1.0 - sq / (safe * safe), 0.0)
    M = float(m.max())
    mass = m / M if M > 0 else np.zeros_like(m)
    h = (1.0 - alpha) * mass + alpha * c
    return h, m, c


# Within-block ranking key (design §3 step 4): each token's s is replaced by the largest s of the
# candidate tokens of its block within POOL_RADIUS positions (a max-pool, as SnapKV clusters its
# scores), so a token the query reads pulls its immediate neighbours along -- e.g. the digits of a
# number, which Qwen's tokenizer splits one per token. Block scores and coverage use plain s.
# TCA_GGML_POOL overrides the radius (0: off); the C retention reads the same variable.
POOL_RADIUS = int(os.environ.get("TCA_GGML_POOL", "3"))


def pool_scores(pos, s, block_size: int, radius: Optional[int] = None) -> np.ndarray:
    """Max of s over tokens of the same block within ``radius`` positions (pos ascending)."""
    pos = np.asarray(pos, dtype=np.int64)
    s = np.asarray(s, dtype=np.float64)
    r = POOL_RADIUS if radius is None else int(radius)
    out = s.copy()
    blk = pos // int(block_size)
    n = pos.size
    for o in range(1, r + 1):
        if o >= n:
            break
        ok = (pos[o:] - pos[:-o] <= r) & (blk[o:] == blk[:-o])
        out[:-o] = np.where(ok, np.maximum(out[:-o], s[o:]), out[:-o])
        out[o:] = np.where(ok, np.maximum(out[o:], s[:-o]), out[o:])
    return out


def aged_rows(pos, s, block_size: int, window: int, n_sink: int, n_seen: int, alpha: float):
    """The first steps of ``select_keep`` (design §3 steps 2-3), shared with its vectorised
    twin ``calibration._select_keep_vec``: ``(pos int64, s float64, keep, idx, bid, h)`` with
    ``keep`` all True, ``idx`` the rows in aged blocks that are not sinks, ``bid`` their block
    ids and ``h`` the block scores (``block_scores``) -- ``h`` None when no row is aged."""
    pos = np.asarray(pos, dtype=np.int64)
    s = np.asarray(s, dtype=np.float64)
    if pos.shape != s.shape:
        raise ValueError("pos and s must have the same shape")
    b = int(block_size)
    F = n_aged_blocks(n_seen, b, window) * b
    keep = np.ones(pos.shape, dtype=bool)
    idx = np.nonzero((pos >= n_sink) & (pos < F))[0]
    if idx.size == 0:
        return pos, s, keep, idx, None, None
    bid = pos[idx] // b
    h, _, _ = block_scores(s[idx], bid, alpha)
    return pos, s, keep, idx, bid, h


def select_keep(pos, s, p, k_values, block_size: int, window: int, n_sink: int,
                n_seen: int, alpha: float) -> np.ndarray:
    """Which retained tokens survive one compaction (design §3 steps 2-4).

    ``pos``: a head's retained positions (ascending ints); ``s``: pooled importance over
    exactly those tokens (``pooled_importance`` of q_last against their keys);
    ``n_seen = p_last + 1``.

    Kept: sinks (pos < n_sink); the live region pos >= F = n_aged_blocks(n_seen) * b; and
    in every aged block j with non-sink tokens, its min(k_j, |j|) tokens of largest s
    (ties: lower position first), k_j from ``assign_k`` on the block scores. Aged blocks
    holding only sinks take no part (they are not counted in N).

    Returns a bool mask aligned with ``pos``.
    """
    pos, s, keep, idx, bid, h = aged_rows(pos, s, block_size, window, n_sink, n_seen, alpha)
    if h is None:
        return keep
    b = int(block_size)
    blocks = np.unique(bid)
    kj = assign_k(h, p, k_values)
    sp = np.zeros_like(s)
    sp[idx] = pool_scores(pos[idx], s[idx], b)
    keep[idx] = False
    for j, kk in zip(blocks, kj):
        members = idx[bid == j]
        # largest pooled s first; ties: lower position first
        order = np.lexsort((pos[members], -sp[members]))
        keep[members[order[:min(int(kk), members.size)]]] = True
    return keep


# --------------------------------------------------------------------------- attention
def sparse_attention(Q, K, V, q_pos, k_pos, scale: Optional[float] = None) -> np.ndarray:
    """Causal attention of a query group over one KV head's (possibly sparse) key set.

    ``Q``: [n_q, H, d]; ``K``, ``V``: [n_k, d]; ``q_pos`` [n_q], ``k_pos`` [n_k]. Key i is
    allowed for query row r iff ``k_pos[i] <= q_pos[r]``; for each allowed set
    ``o = softmax(q . K^T * scale) V`` (scale defaults to 1/sqrt(d)). Rows with no allowed
    key give zeros. Float64; returns [n_q, H, d_v].
    """
    Q = np.asarray(Q, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    q_pos = np.asarray(q_pos, dtype=np.int64)
    k_pos = np.asarray(k_pos, dtype=np.int64)
    n_q, H, d = Q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = np.zeros((n_q, H, V.shape[-1]), dtype=np.float64)
    if K.shape[0] == 0 or n_q == 0:
        return out
    chunk = max(1, (1 << 21) // max(1, H * K.shape[0]))
    for a in range(0, n_q, chunk):
        z = slice(a, a + chunk)
        logits = np.einsum("qhd,kd->qhk", Q[z], K) * float(scale)
        allowed = k_pos[None, :] <= q_pos[z, None]                 # [c, n_k]
        logits = np.where(allowed[:, None, :], logits, -np.inf)
        out[z] = np.einsum("qhk,kd->qhd", _softmax_rows(logits), V)
    return out


def dense_attention(Q, K, V, n_head_kv: int, scale: Optional[float] = None) -> np.ndarray:
    """Full causal GQA attention in float64 (the thing TCA approximates).

    ``Q``: [n, n_head, d]; ``K``, ``V``: [n, n_head_kv, d]; token i is at position i.
    Query head h uses KV head h // (n_head // n_head_kv). Returns [n, n_head, d_v].
    """
    Q = np.asarray(Q, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    n, n_head, d = Q.shape
    G = _group_size(n_head, n_head_kv)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = np.zeros((n, n_head, V.shape[-1]), dtype=np.float64)
    causal = np.tril(np.ones((n, n), dtype=bool))
    for g in range(n_head_kv):
        hs = slice(g * G, (g + 1) * G)
        logits = np.einsum("qhd,kd->hqk", Q[:, hs], K[:, g]) * float(scale)
        logits = np.where(causal[None], logits, -np.inf)
        out[:, hs] = np.einsum("hqk,kd->qhd", _softmax_rows(logits), V[:, g])
    return out


def _group_size(n_head: int, n_head_kv: int) -> int:
    if n_head_kv < 1 or n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    return n_head // n_head_kv


# --------------------------------------------------------------------------- online simulation
class TCAHeadState:
    """Retained list of one KV head: ascending positions with their K and V rows."""

    def __init__(self, head_dim: int, v_dim: Optional[int] = None):
        self.pos = np.zeros(0, dtype=np.int64)
        self.k = np.zeros((0, head_dim), dtype=np.float64)
        self.v = np.zeros((0, head_dim if v_dim is None else v_dim), dtype=np.float64)
        self.coverage = 1.0          # pooled coverage of q_last at the last compaction
        self.n_compactions = 0

    def append(self, pos, k, v) -> None:
        self.pos = np.concatenate([self.pos, np.asarray(pos, dtype=np.int64)])
        self.k = np.concatenate([self.k, np.asarray(k, dtype=np.float64)])
        self.v = np.concatenate([self.v, np.asarray(v, dtype=np.float64)])

    def compact_decode(self, q_last, n_seen, frontier, p, k_values, block_size, window, n_sink,
                       scale=None) -> float:
        """Decode rule: the blocks in [frontier, F) keep their floor(t) tokens of largest s."""
        s = pooled_importance(q_last, self.k, scale)
        b = int(block_size)
        F = n_aged_blocks(n_seen, b, window) * b
        kt = max(1, int(math.floor(expected_tokens(p, k_values) + 1e-9)))
        keep = np.ones(self.pos.shape, dtype=bool)
        cand = (self.pos >= max(int(frontier), int(n_sink))) & (self.pos < F)
        idx = np.nonzero(cand)[0]
        bid = self.pos[idx] // b
        sp = np.zeros_like(s)
        sp[idx] = pool_scores(self.pos[idx], s[idx], b)
        for j in np.unique(bid):
            members = idx[bid == j]
            if members.size > kt:
                order = np.lexsort((self.pos[members], -sp[members]))
                keep[members[order[kt:]]] = False
        self.coverage = float(1.0 - s[~keep].sum())
        self.n_compactions += 1
        self.pos, self.k, self.v = self.pos[keep], self.k[keep], self.v[keep]
        return self.coverage

    def attend(self, Qg, q_pos, scale=None) -> np.ndarray:
        """Causal attention of ``Qg`` [n_q, G, d] over the retained list."""
        return sparse_attention(Qg, self.k, self.v, q_pos, self.pos, scale)

    def compact(self, q_last, n_seen, p, k_values, block_size, window, n_sink, alpha,
                scale=None) -> float:
        """One compaction with ``q_last`` [G, d]; evicts for good; returns the coverage."""
        s = pooled_importance(q_last, self.k, scale)
        keep = select_keep(self.pos, s, p, k_values, block_size, window, n_sink, n_seen, alpha)
        self.coverage = float(1.0 - s[~keep].sum())
        self.n_compactions += 1
        self.pos, self.k, self.v = self.pos[keep], self.k[keep], self.v[keep]
        return self.coverage


class TCALayerState:
    """One layer's TCA state (all KV heads), fed token by token in position order.

    ``p_per_head``: [n_head_kv, len(k_values)] budgets (a single row is broadcast); a dense
    head is ``dense_p(k_values)``. Token i is at position i.

    ``prefill_ubatch`` appends the ubatch's K/V to every head, computes the ubatch's
    attention over the retained lists (causal), then, if any block is aged, compacts with
    the ubatch's last query. ``decode_step`` does the same for a single token, but
    compacts only when that token makes a new block age (n_aged grows), and then only the
    newly aged block(s), each to floor(t) tokens (``TCAHeadState.compact_decode``).

    ``retention="hold"`` (docs/design.md "Retention"): every row is also kept in a hold list.
    A *final* ubatch (a prompt's last: ``prefill_ubatch(..., final=True)``) attends the hold
    list instead of the retained one, and then, if any block is aged, the retained list is
    rebuilt from the hold list by one selection (``final_keep``) scored by the mean pooled
    importance of the ubatch's last ``n_obs`` queries, with the top ``n_whole`` ranked blocks
    kept whole (``whole_budget``). Other ubatches and decode steps behave as in "stream",
    except that with ``prefill="dense"`` (hold only: ``tca_prefill="dense"``, and the early
    layers of ``"early"``) every prefill ubatch attends the hold list, as the final one does,
    and the first ``hold_decode`` decode steps after a final ubatch attend the hold list too
    (``tca_hold_decode``: the answer's start; 0 = the kept rows from the first step).
    """

    def __init__(self, n_head: int, n_head_kv: int, head_dim: int, p_per_head, k_values,
                 block_size: int, window: int, n_sink: int, alpha: float,
                 scale: Optional[float] = None, v_dim: Optional[int] = None,
                 retention: str = "stream", n_obs: int = 32, n_whole: int = 4, prefill: str = "sparse",
                 hold_decode: int = 0):
        if retention not in ("stream", "hold"):
            raise ValueError(f"retention must be 'stream' or 'hold', got {retention!r}")
        if prefill not in ("sparse", "dense") or (prefill == "dense" and retention != "hold"):
            raise ValueError(f"prefill must be 'sparse' or 'dense' (dense with retention='hold'), got {prefill!r}")
        self.dense_prefill = prefill == "dense"
        self.retention, self.n_obs, self.n_whole = retention, int(n_obs), int(n_whole)
        self.hold_decode = int(hold_decode) if retention == "hold" else 0
        self.n_decode_after_final = self.hold_decode   # no prompt end yet
        self.n_head, self.n_head_kv = int(n_head), int(n_head_kv)
        self.G = _group_size(self.n_head, self.n_head_kv)
        self.k_values = np.asarray(k_values)
        p = np.asarray(p_per_head, dtype=np.float64)
        self.p = np.broadcast_to(p, (self.n_head_kv, self.k_values.size)).copy()
        self.block_size, self.window, self.n_sink = int(block_size), int(window), int(n_sink)
        self.alpha = float(alpha)
        self.scale = scale
        self.n_seen = 0
        self.frontier = 0                       # F, a multiple of b
        self.heads = [TCAHeadState(head_dim, v_dim) for _ in range(self.n_head_kv)]
        self.held = ([TCAHeadState(head_dim, v_dim) for _ in range(self.n_head_kv)]
                     if retention == "hold" else None)

    def _step(self, Q, K, V, always: bool, final: bool = False) -> np.ndarray:
        Q, K, V = (np.asarray(a, dtype=np.float64) for a in (Q, K, V))
        u = Q.shape[0]
        pos = np.arange(self.n_seen, self.n_seen + u, dtype=np.int64)
        self.n_seen += u
        n_aged = n_aged_blocks(self.n_seen, self.block_size, self.window)
        compact = n_aged > 0 if always else n_aged * self.block_size > self.frontier
        final = bool(final) and self.held is not None
        hold_step = not always and not final and self.n_decode_after_final < self.hold_decode
        if final:
            self.n_decode_after_final = 0
        elif not always:
            self.n_decode_after_final += hold_step
        else:
            self.n_decode_after_final = self.hold_decode
        out = np.zeros((u, self.n_head, V.shape[-1]), dtype=np.float64)
        for g, st in enumerate(self.heads):
            hs = slice(g * self.G, (g + 1) * self.G)
            st.append(pos, K[:, g], V[:, g])
            if self.held is not None:
                self.held[g].append(pos, K[:, g], V[:, g])
            if final:
                hd = self.held[g]
                out[:, hs] = hd.attend(Q[:, hs], pos, self.scale)
                if n_aged > 0:
                    n_o = min(max(1, self.n_obs), u)
                    s = np.mean([pooled_importance(Q[u - n_o + j, hs], hd.k, self.scale) for j in range(n_o)], axis=0)
                    pw = whole_budget(self.p[g], self.k_values, n_aged, self.n_whole)
                    keep = select_keep(hd.pos, s, pw, self.k_values, self.block_size, self.window, self.n_sink,
                                       self.n_seen, self.alpha)
                    st.pos, st.k, st.v = hd.pos[keep], hd.k[keep], hd.v[keep]
                    st.coverage = float(1.0 - s[~keep].sum())
                    st.n_compactions += 1
                continue
            if (self.dense_prefill and always) or hold_step:
                out[:, hs] = self.held[g].attend(Q[:, hs], pos, self.scale)
            else:
                out[:, hs] = st.attend(Q[:, hs], pos, self.scale)
            if compact and not always:
                st.compact_decode(Q[-1, hs], self.n_seen, self.frontier, self.p[g], self.k_values,
                                  self.block_size, self.window, self.n_sink, self.scale)
            elif compact:
                st.compact(Q[-1, hs], self.n_seen, self.p[g], self.k_values, self.block_size,
                           self.window, self.n_sink, self.alpha, self.scale)
        if compact:
            self.frontier = n_aged * self.block_size
        return out

    def prefill_ubatch(self, Q, K, V, final: bool = False) -> np.ndarray:
        """Q [u, n_head, d], K/V [u, n_head_kv, d] -> output [u, n_head, d]. ``final``: a
        prompt's last ubatch (only meaningful with retention="hold")."""
        return self._step(Q, K, V, always=True, final=final)

    def decode_step(self, q, k, v) -> np.ndarray:
        """q [n_head, d] (or [1, n_head, d]), k/v [n_head_kv, d] -> output [n_head, d]."""
        q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
        if q.ndim == 2:
            q, k, v = q[None], k[None], v[None]
        return self._step(q, k, v, always=False)[0]

    def kept_positions(self) -> List[np.ndarray]:
        return [st.pos.copy() for st in self.heads]

    def coverage(self) -> np.ndarray:
        return np.array([st.coverage for st in self.heads])


def whole_budget(p, k_values, n_aged: int, n_whole: int) -> np.ndarray:
    """The budget of a final selection (retention "hold"): the head's ``p`` (aligned with
    ascending ``k_values``) with its top ``W = min(n_whole, N)`` ranks at k = b over ``N = n_aged``
    blocks: p'_b = (W + p_b (N - W)) / N, p'_k = p_k (N - W) / N otherwise."""
    p = np.asarray(p, dtype=np.float64)
    N = float(n_aged)
    W = min(float(n_whole), N)
    if N <= 0 or W <= 0:
        return p.copy()
    out = p * (N - W) / N
    out[int(np.argmax(np.asarray(k_values)))] += W / N
    return out


def simulate_prefill(Q, K, V, n_head_kv: int, p_per_head, k_values, block_size: int,
                     window: int, n_sink: int, alpha: float, ubatch: int,
                     scale: Optional[float] = None, n_decode: int = 0,
                     retention: str = "stream", n_obs: int = 32, n_whole: int = 4, prefill: str = "sparse"):
    """Simulate one layer of TCA over a whole sequence (design §3).

    ``Q``: [n, n_head, d]; ``K``, ``V``: [n, n_head_kv, d]; token i at position i. The
    first ``n - n_decode`` tokens are prefilled in ubatches of ``ubatch`` tokens (the last
    one may be shorter): append to every head's retained list, attend (causal) over it,
    compact with the ubatch's last query whenever a block is aged. The last ``n_decode``
    tokens are then processed as decode steps (``TCALayerState.decode_step``: compaction
    only when a block newly ages). ``ubatch=1`` with ``n_decode=0`` is *prefill* in
    one-token ubatches (compacting after every token once blocks are aged), which is not
    the decode rule.

    With ``retention="hold"`` the prompt's last ubatch is final (it asks for logits: attends
    every row, then the retained lists are selected from every row by its last ``n_obs``
    queries; see ``TCALayerState``). ``prefill="dense"``: every prefill ubatch attends every row.

    Returns ``(O [n, n_head, d_v], kept_positions_per_kv_head, coverage_per_kv_head)``:
    the final retained positions of each KV head and each head's pooled coverage of q_last
    at its last compaction (1.0 if none ran).
    """
    Q = np.asarray(Q, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    n, n_head, d = Q.shape
    if ubatch < 1:
        raise ValueError("ubatch must be >= 1")
    if not 0 <= n_decode <= n:
        raise ValueError("n_decode must be in [0, n]")
    st = TCALayerState(n_head, n_head_kv, d, p_per_head, k_values, block_size, window, n_sink,
                       alpha, scale, v_dim=V.shape[-1], retention=retention, n_obs=n_obs, n_whole=n_whole,
                       prefill=prefill)
    out = np.zeros((n, n_head, V.shape[-1]), dtype=np.float64)
    n_pre = n - n_decode
    for a in range(0, n_pre, ubatch):
        e = min(a + ubatch, n_pre)
        out[a:e] = st.prefill_ubatch(Q[a:e], K[a:e], V[a:e], final=e == n_pre)
    for i in range(n_pre, n):
        out[i] = st.decode_step(Q[i], K[i], V[i])
    return out, st.kept_positions(), st.coverage()


def simulate_decode_step(state: TCALayerState, q, k, v) -> np.ndarray:
    """One decode step on a ``TCALayerState`` (see ``TCALayerState.decode_step``)."""
    return state.decode_step(q, k, v)
