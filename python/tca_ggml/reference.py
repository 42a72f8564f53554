"""NumPy reference of the TCA math (docs/design.md §3 and §4).

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

Calibration (design §4): `calibrate_head_chunked` (the default of `calibrate.calibrate`)
replays the chunked prefill of inference for each candidate budget (`chunked_evictions`) and
scores every probe query against the set retained after its own ubatch's compaction
(`chunked_probe_coverage`); `calibrate_head` is the single-shot variant: one selection with
the last query over the whole text, every probe scored against that one set.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "log_gaussian_p", "candidate_grid", "expected_tokens", "dense_p", "n_aged_blocks",
    "assign_k", "pooled_importance", "block_scores", "select_keep", "sparse_attention",
    "dense_attention", "TCAHeadState", "TCALayerState", "simulate_prefill",
    "simulate_decode_step", "probe_positions", "coverage_of_kept", "candidate_coverages",
    "calibrate_head", "chunked_evictions", "chunked_probe_coverage",
    "chunked_candidate_coverages", "calibrate_head_chunked",
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


def candidate_grid(block_size: int = 128, m: int = 14, sigma: float = 1.0):
    """The M candidate budgets of design §4.

    ``mu`` linearly spaced over [0, log2 b] (float32, length m), ``sigma`` constant
    (float32, length m), ``k_values = 1, 2, 4, ..., b`` (uint32). Candidate c's budget is
    ``log_gaussian_p(k_values, mu[c], sigma[c])``.
    """
    b = int(block_size)
    if b < 1 or b & (b - 1):
        raise ValueError("block_size must be a power of two")
    lb = int(round(math.log2(b)))
    k_values = (2 ** np.arange(lb + 1)).astype(np.uint32)
    mu = np.linspace(0.0, float(lb), int(m)).astype(np.float32)
    sig = np.full(int(m), sigma, dtype=np.float32)
    return mu, sig, k_values


def expected_tokens(p, k_values) -> float:
    """Expected kept tokens per aged block, ``t = sum_k k p_k``."""
    return float(np.dot(np.asarray(p, np.float64), np.asarray(k_values, np.float64)))


def dense_p(k_values) -> np.ndarray:
    """The dense budget: one-hot at k = b (= max(k_values)); every block keeps everything."""
    k = np.asarray(k_values)
    p = np.zeros(k.size, dtype=np.float64)
    p[int(np.argmax(k))] = 1.0
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
    pos = np.asarray(pos, dtype=np.int64)
    s = np.asarray(s, dtype=np.float64)
    if pos.shape != s.shape:
        raise ValueError("pos and s must have the same shape")
    b = int(block_size)
    F = n_aged_blocks(n_seen, b, window) * b
    keep = np.ones(pos.shape, dtype=bool)
    cand = (pos >= n_sink) & (pos < F)
    if not cand.any():
        return keep
    idx = np.nonzero(cand)[0]
    bid = pos[idx] // b
    h, _, _ = block_scores(s[idx], bid, alpha)
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
    kept whole (``whole_budget``). Other ubatches and decode steps behave as in "stream".
    """

    def __init__(self, n_head: int, n_head_kv: int, head_dim: int, p_per_head, k_values,
                 block_size: int, window: int, n_sink: int, alpha: float,
                 scale: Optional[float] = None, v_dim: Optional[int] = None,
                 retention: str = "stream", n_obs: int = 32, n_whole: int = 4):
        if retention not in ("stream", "hold"):
            raise ValueError(f"retention must be 'stream' or 'hold', got {retention!r}")
        self.retention, self.n_obs, self.n_whole = retention, int(n_obs), int(n_whole)
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
                     retention: str = "stream", n_obs: int = 32, n_whole: int = 4):
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
    queries; see ``TCALayerState``).

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
                       alpha, scale, v_dim=V.shape[-1], retention=retention, n_obs=n_obs, n_whole=n_whole)
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


# --------------------------------------------------------------------------- calibration
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
    Qg = np.asarray(Qg, dtype=np.float64)
    Kg = np.asarray(Kg, dtype=np.float64)
    if Qg.ndim == 2:
        Qg = Qg[:, None, :]
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
        pooled = _softmax_rows(logits).mean(axis=1)            # [c, n_k]
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
    s = pooled_importance(Qg[n - 1], Kg, scale)
    masks = np.stack([select_keep(pos, s, p, k_values, block_size, window, n_sink, n, alpha)
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
    if mu is None or sigma is None or k_values is None:
        g_mu, g_sigma, g_k = candidate_grid(block_size)
        mu = g_mu if mu is None else mu
        sigma = g_sigma if sigma is None else sigma
        k_values = g_k if k_values is None else k_values
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), mu.shape)
    Kg = np.asarray(Kg)
    n = Kg.shape[0]
    p_list = [log_gaussian_p(k_values, m_, s_) for m_, s_ in zip(mu, sigma)]
    t = np.array([expected_tokens(p, k_values) for p in p_list])
    probes = probe_positions(n, n_probe_last, n_probe_random, seed)
    _, cov = candidate_coverages(Qg, Kg, p_list, k_values, block_size, window, n_sink, alpha,
                                 probes, scale)
    b = float(np.max(np.asarray(k_values)))
    for c in np.argsort(t, kind="stable"):
        if cov[c] >= tau:
            return int(c), p_list[c], float(t[c] / b), float(cov[c])
    return -1, dense_p(k_values), 1.0, 1.0


# --------------------------------------------------------------------------- chunked calibration
_NEVER = np.iinfo(np.int64).max      # eviction step of a key that is never evicted


def _select_keep_vec(pos, s, p, k_values, block_size: int, window: int, n_sink: int,
                     n_seen: int, alpha: float) -> np.ndarray:
    """Vectorised ``select_keep`` (same arguments, same result, bit for bit).

    Ranking uses ``assign_k``'s rule (stable sort of -h, ``(r + 0.5)/N < C_i`` found by
    ``searchsorted``), and the per-block top-k one global ``lexsort`` by (block, -pooled s, pos).
    """
    pos = np.asarray(pos, dtype=np.int64)
    s = np.asarray(s, dtype=np.float64)
    b = int(block_size)
    F = n_aged_blocks(n_seen, b, window) * b
    keep = np.ones(pos.shape, dtype=bool)
    cand = (pos >= n_sink) & (pos < F)
    if not cand.any():
        return keep
    idx = np.nonzero(cand)[0]
    bid = pos[idx] // b
    h, _, _ = block_scores(s[idx], bid, alpha)
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
    # top-k per block: order by (block, -s, pos); idx is ascending in pos and block
    _, inv, counts = np.unique(bid, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    o = np.lexsort((pos[idx], -pool_scores(pos[idx], s[idx], b), inv))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(idx.size) - starts[inv[o]]
    keep[idx] = False
    keep[idx[o[rank < kj[inv[o]]]]] = True
    return keep


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
    Qg = np.asarray(Qg, dtype=np.float64)
    Kg = np.asarray(Kg, dtype=np.float64)
    if Qg.ndim == 2:
        Qg = Qg[:, None, :]
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
        if n_aged_blocks(e, block_size, window) == 0:
            continue
        logits = (Qg[e - 1] @ Kg[:e].T) * float(scale)            # [G, e]
        mx = logits.max(axis=1, keepdims=True)
        ex = np.exp(logits - mx)                                  # shared by all candidates
        for c in range(C):
            R = retained[c]
            eR = ex[:, R]
            # a head whose retained maximum is far below its global maximum would lose
            # precision (underflow): renormalise that head from its logits on R instead
            low = eR.max(axis=1) < 1e-250
            if low.any():
                lr = logits[low][:, R]
                eR[low] = np.exp(lr - lr.max(axis=1, keepdims=True))
            s = (eR / eR.sum(axis=1, keepdims=True)).mean(axis=0)
            keep = _select_keep_vec(R, s, p_list[c], k_values, block_size, window, n_sink, e,
                                    alpha)
            evict[c, R[~keep]] = j
            retained[c] = R[keep]
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
    Qg = np.asarray(Qg, dtype=np.float64)
    Kg = np.asarray(Kg, dtype=np.float64)
    if Qg.ndim == 2:
        Qg = Qg[:, None, :]
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
            pooled = _softmax_rows(logits).mean(axis=1)        # [c, e]
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
    p_list = [log_gaussian_p(k_values, m_, s_) for m_, s_ in zip(mu, sigma)]
    t = np.array([expected_tokens(p, k_values) for p in p_list])
    return p_list, t, k_values


def _pick_sparsest(p_list, t, cov, k_values, tau):
    b = float(np.max(np.asarray(k_values)))
    for c in np.argsort(t, kind="stable"):
        if cov[c] >= tau:
            return int(c), p_list[c], float(t[c] / b), float(cov[c])
    return -1, dense_p(k_values), 1.0, 1.0


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
