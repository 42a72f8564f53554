"""NumPy reference of the TCA math (python/tca_ggml/reference.py, docs/design.md §3-4)."""
import math

import numpy as np
import pytest

from tca_ggml import reference as R

from tca_ggml import calibration as CAL  # noqa: E402  (the calibration search)

from _helpers import peaked_attention  # noqa: E402


def _qkv(n, n_head, n_head_kv, d, seed=0, qscale=1.0):
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(n, n_head, d)) * qscale
    K = rng.normal(size=(n, n_head_kv, d))
    V = rng.normal(size=(n, n_head_kv, d))
    return Q, K, V


def _k(b):
    return (2 ** np.arange(int(math.log2(b)) + 1)).astype(np.uint32)


def _onehot(k_values, kk):
    p = np.zeros(len(k_values))
    p[list(k_values).index(kk)] = 1.0
    return p


# --------------------------------------------------------------------------- budgets
def test_log_gaussian_p_normalised_and_unimodal():
    k = _k(128)
    lk = np.log2(k.astype(float))
    for mu in [0.0, 1.3, 3.0, 5.5, 7.0]:
        for sigma in [0.5, 1.0, 2.0]:
            p = R.log_gaussian_p(k, mu, sigma)
            assert p.dtype == np.float64 and p.shape == k.shape
            assert abs(p.sum() - 1.0) < 1e-12 and np.all(p > 0)
            left, right = lk <= mu, lk >= mu
            assert np.all(np.diff(p[left]) > 0)       # increasing up to mu
            assert np.all(np.diff(p[right]) < 0)      # decreasing after mu
    p = R.log_gaussian_p(k, 3.0, 1.0)
    assert int(k[np.argmax(p)]) == 8
    # exact formula
    w = np.exp(-(lk - 3.0) ** 2 / 2)
    np.testing.assert_allclose(p, w / w.sum(), rtol=1e-14)
    # symmetric around mu
    assert p[2] == pytest.approx(p[4], rel=1e-14)


def test_candidate_grid():
    mu, sigma, k = CAL.candidate_grid()
    assert mu.dtype == np.float32 and sigma.dtype == np.float32 and k.dtype == np.uint32
    assert len(mu) == len(sigma) == 14
    assert mu[0] == 0.0 and mu[-1] == 7.0 and np.all(np.diff(mu) > 0)
    assert np.all(sigma == 1.0)
    assert list(k) == [1, 2, 4, 8, 16, 32, 64, 128]
    mu, sigma, k = CAL.candidate_grid(16, m=5, sigma=0.5)
    np.testing.assert_allclose(mu, [0, 1, 2, 3, 4])
    assert np.all(sigma == 0.5) and list(k) == [1, 2, 4, 8, 16]
    # expected tokens grow with mu: the grid is ordered sparsest first
    t = [R.expected_tokens(R.log_gaussian_p(k, m_, s_), k) for m_, s_ in zip(mu, sigma)]
    assert np.all(np.diff(t) > 0)
    with pytest.raises(ValueError):
        CAL.candidate_grid(12)


def test_expected_tokens_and_dense_p():
    k = _k(16)
    assert R.expected_tokens(R.dense_p(k), k) == 16.0
    assert R.expected_tokens(_onehot(k, 1), k) == 1.0
    assert R.expected_tokens([0.5, 0, 0, 0, 0.5], k) == 8.5


def test_n_aged_blocks_boundaries():
    b, w = 16, 32
    assert R.n_aged_blocks(0, b, w) == 0
    assert R.n_aged_blocks(w + b - 1, b, w) == 0
    assert R.n_aged_blocks(w + b, b, w) == 1        # block 0 ends exactly where the window starts
    assert R.n_aged_blocks(w + 2 * b - 1, b, w) == 1
    assert R.n_aged_blocks(w + 2 * b, b, w) == 2
    assert R.n_aged_blocks(40, 8, 0) == 5            # no window: every complete block is aged


# --------------------------------------------------------------------------- assign_k
def test_assign_k_one_hot():
    k = _k(32)
    rng = np.random.default_rng(1)
    for kk in k:
        h = rng.random(23)
        assert np.all(R.assign_k(h, _onehot(k, int(kk)), k) == kk)
    assert R.assign_k(np.zeros(0), _onehot(k, 4), k).size == 0


def test_assign_k_counts_match_p():
    k = _k(128)
    rng = np.random.default_rng(2)
    for trial in range(60):
        p = rng.dirichlet(np.ones(len(k)) * rng.uniform(0.2, 3))
        if trial % 3 == 0:
            p = R.log_gaussian_p(k, rng.uniform(0, 7), rng.uniform(0.5, 2))
        N = int(rng.integers(1, 300))
        kj = R.assign_k(rng.random(N), p, k)
        assert set(np.unique(kj)) <= set(int(x) for x in k)
        counts = np.array([(kj == kk).sum() for kk in k])
        assert counts.sum() == N
        assert np.all(np.abs(counts - p * N) <= 1.0 + 1e-9), (counts, p * N)
        # total kept within b/2 of N*t
        assert abs(kj.sum() - N * R.expected_tokens(p, k)) <= 128 / 2 + 1e-6


def test_assign_k_rank_order_and_ties():
    k = _k(16)
    p = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    h = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    kj = R.assign_k(h, p, k)
    # rank: block1 (0.9) -> 16, block3 -> 8, block2 -> 4, block4 -> 2, block0 -> 1
    assert list(kj) == [1, 16, 4, 8, 2]
    # higher score never gets fewer tokens
    rng = np.random.default_rng(3)
    h = rng.random(50)
    kj = R.assign_k(h, R.log_gaussian_p(k, 2, 1), k)
    o = np.argsort(-h)
    assert np.all(np.diff(kj[o]) <= 0)
    # ties: lower index first
    kj = R.assign_k(np.ones(5), p, k)
    assert list(kj) == [16, 8, 4, 2, 1]
    # rule (r + 0.5) / N < C_i with N = 2, p = [0.25 at k=16, 0.75 at k=1]
    p2 = np.array([0.75, 0, 0, 0, 0.25])
    assert list(R.assign_k([0.2, 0.8], p2, k)) == [1, 1]      # 0.5/2 = 0.25 is not < 0.25
    assert list(R.assign_k([0.2, 0.8, 0.5], p2, k)) == [1, 16, 1]   # 0.5/3 < 0.25
    # probabilities that do not reach 1 fall back to the smallest k
    assert list(R.assign_k([3, 2, 1], [0, 0, 0, 0, 0.4], k)) == [16, 1, 1]


# --------------------------------------------------------------------------- scores
def test_pooled_importance():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(3, 8))
    K = rng.normal(size=(20, 8))
    s = R.pooled_importance(q, K)
    assert s.dtype == np.float64 and abs(s.sum() - 1) < 1e-14
    ref = np.zeros(20)
    for h in range(3):
        lg = [float(np.dot(q[h], K[i])) / math.sqrt(8) for i in range(20)]
        e = np.exp(np.array(lg) - max(lg))
        ref += e / e.sum() / 3
    np.testing.assert_allclose(s, ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(R.pooled_importance(q, K, scale=0.3),
                               np.mean([np.exp(q[h] @ K.T * 0.3) / np.exp(q[h] @ K.T * 0.3).sum()
                                        for h in range(3)], axis=0), rtol=1e-12)
    # a single head as a vector
    np.testing.assert_allclose(R.pooled_importance(q[0], K),
                               R.pooled_importance(q[:1], K), rtol=0, atol=0)
    # float32 input is computed in float64
    s32 = R.pooled_importance(q.astype(np.float32), K.astype(np.float32))
    assert s32.dtype == np.float64


def test_block_scores_by_hand():
    s = np.array([0.1, 0.3, 0.2, 0.2, 0.0, 0.0, 0.2])
    ids = np.array([2, 2, 5, 5, 7, 7, 9])
    h, m, c = R.block_scores(s, ids, 0.25)
    np.testing.assert_allclose(m, [0.4, 0.4, 0.0, 0.2])
    np.testing.assert_allclose(c, [1 - (0.01 + 0.09) / 0.16, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(h, 0.75 * m / 0.4 + 0.25 * c)
    # alpha = 0: pure normalised mass, max block gets 1
    h0, _, _ = R.block_scores(s, ids, 0.0)
    np.testing.assert_allclose(h0, [1, 1, 0, 0.5])
    # alpha = 1: pure diversity
    h1, _, c1 = R.block_scores(s, ids, 1.0)
    np.testing.assert_allclose(h1, c1)
    # all-zero mass gives zeros, not NaN
    hz, mz, cz = R.block_scores(np.zeros(4), np.array([0, 0, 1, 1]), 0.5)
    assert np.all(hz == 0) and np.all(cz == 0) and np.all(mz == 0)


def test_select_keep_by_hand(monkeypatch):
    monkeypatch.setattr(R, "POOL_RADIUS", 0)   # the plain rule; pooling: test_pooled_ranking
    b, w, n_sink = 4, 8, 2
    k = _k(4)                                   # 1, 2, 4
    n_seen = 20                                 # aged: (j+1)*4 <= 12 -> blocks 0, 1, 2; F = 12
    pos = np.arange(n_seen)
    rng = np.random.default_rng(5)
    s = rng.random(n_seen)
    s /= s.sum()
    keep = R.select_keep(pos, s, _onehot(k, 1), k, b, w, n_sink, n_seen, 0.5)
    assert keep[:2].all()                        # sinks
    assert keep[12:].all()                       # live region
    # block 0 has 2 non-sink tokens (2, 3), blocks 1 and 2 have 4: each keeps its top-1
    for j, lo in [(0, 2), (1, 4), (2, 8)]:
        members = np.arange(lo, (j + 1) * b)
        assert keep[members].sum() == 1
        assert keep[members[np.argmax(s[members])]]
    # dense budget keeps everything
    assert R.select_keep(pos, s, R.dense_p(k), k, b, w, n_sink, n_seen, 0.5).all()
    # k = 2: each aged block keeps min(2, |j|)
    keep2 = R.select_keep(pos, s, _onehot(k, 2), k, b, w, n_sink, n_seen, 0.5)
    assert keep2.sum() == 2 + 2 + 2 + 2 + 8
    # ties: lower position first
    s_eq = np.full(n_seen, 1.0 / n_seen)
    keep_eq = R.select_keep(pos, s_eq, _onehot(k, 1), k, b, w, n_sink, n_seen, 0.5)
    assert list(np.nonzero(keep_eq)[0][:5]) == [0, 1, 2, 4, 8]
    # sparse retained list (earlier compactions): blocks holding fewer tokens than k keep all
    pos_r = np.array([0, 1, 3, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    s_r = rng.random(pos_r.size)
    keep_r = R.select_keep(pos_r, s_r, _onehot(k, 2), k, b, w, n_sink, n_seen, 0.5)
    assert keep_r[[0, 1, 2, 3]].all()            # block 0 holds only 3, block 1 only 6
    assert keep_r[4:7].sum() == 2
    assert keep_r[7:].all()
    # nothing aged: all kept
    assert R.select_keep(pos[:11], s[:11], _onehot(k, 1), k, b, w, n_sink, 11, 0.5).all()
    # blocks that hold only sinks are not candidates (b <= n_sink)
    keep_s = R.select_keep(pos, s, _onehot(k, 1), k, b, w, 4, n_seen, 0.5)
    assert keep_s[:4].all() and keep_s[4:8].sum() == 1 and keep_s[8:12].sum() == 1


def test_select_keep_mixed_budget_follows_scores():
    # with alpha = 0 the highest-mass block gets the largest k
    b, w, n_sink = 8, 0, 0
    k = _k(8)
    pos = np.arange(32)
    s = np.full(32, 0.01)
    s[16:24] = 0.08                              # block 2 is the heaviest
    s /= s.sum()
    p = np.array([0.75, 0, 0, 0.25])             # one of 4 blocks keeps 8, three keep 1
    keep = R.select_keep(pos, s, p, k, b, w, n_sink, 32, 0.0)
    assert keep[16:24].all()
    assert [keep[j * 8:(j + 1) * 8].sum() for j in (0, 1, 3)] == [1, 1, 1]


# --------------------------------------------------------------------------- attention
def _naive_attention(Q, K, V, q_pos, k_pos, scale):
    n_q, H, d = Q.shape
    out = np.zeros((n_q, H, V.shape[1]))
    for r in range(n_q):
        for h in range(H):
            idx = [i for i in range(len(k_pos)) if k_pos[i] <= q_pos[r]]
            if not idx:
                continue
            lg = np.array([sum(Q[r, h, t] * K[i, t] for t in range(d)) * scale for i in idx])
            e = np.exp(lg - lg.max())
            a = e / e.sum()
            for j, i in enumerate(idx):
                out[r, h] += a[j] * V[i]
    return out


def test_sparse_attention_matches_naive_loop():
    rng = np.random.default_rng(6)
    d = 5
    k_pos = np.array([0, 1, 4, 9, 10, 11, 17, 30])
    q_pos = np.array([0, 3, 10, 12, 40, 9])
    K = rng.normal(size=(8, d))
    V = rng.normal(size=(8, d))
    Q = rng.normal(size=(6, 3, d)) * 2
    for scale in (None, 0.7):
        got = R.sparse_attention(Q, K, V, q_pos, k_pos, scale)
        exp = _naive_attention(Q, K, V, q_pos, k_pos, 1 / math.sqrt(d) if scale is None else scale)
        np.testing.assert_allclose(got, exp, rtol=1e-12, atol=1e-14)
    # rows with no allowed key are zero
    got = R.sparse_attention(Q[:3], K[2:], V[2:], np.array([0, 3, 5]), k_pos[2:])
    assert np.all(got[:2] == 0) and np.any(got[2] != 0)
    assert np.all(R.sparse_attention(Q, K[:0], V[:0], q_pos, k_pos[:0]) == 0)


def test_dense_attention_matches_naive():
    Q, K, V = _qkv(9, 6, 2, 4, seed=7)
    got = R.dense_attention(Q, K, V, 2)
    pos = np.arange(9)
    for h in range(6):
        g = h // 3
        exp = _naive_attention(Q[:, h:h + 1], K[:, g], V[:, g], pos, pos, 0.5)
        np.testing.assert_allclose(got[:, h:h + 1], exp, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        R.dense_attention(Q, K, V, 4)


# --------------------------------------------------------------------------- simulation
@pytest.mark.parametrize("n_head,n_head_kv", [(2, 2), (4, 2), (7, 1), (14, 2)])
@pytest.mark.parametrize("ubatch", [1, 3, 64])
def test_dense_budget_equals_dense_attention(n_head, n_head_kv, ubatch):
    b, w, n = 16, 32, 150
    k = _k(b)
    Q, K, V = _qkv(n, n_head, n_head_kv, 8, seed=n_head * 100 + ubatch, qscale=2.0)
    O, kept, cov = R.simulate_prefill(Q, K, V, n_head_kv, R.dense_p(k), k, b, w, 4, 0.5, ubatch)
    np.testing.assert_allclose(O, R.dense_attention(Q, K, V, n_head_kv), rtol=0, atol=1e-12)
    assert all(np.array_equal(kp, np.arange(n)) for kp in kept)
    assert np.all(cov == 1.0)


def test_dense_budget_with_decode_equals_dense():
    b, w, n = 8, 16, 70
    k = _k(b)
    Q, K, V = _qkv(n, 4, 2, 6, seed=8)
    O, kept, cov = R.simulate_prefill(Q, K, V, 2, R.dense_p(k), k, b, w, 4, 0.5, 16, n_decode=30)
    np.testing.assert_allclose(O, R.dense_attention(Q, K, V, 2), rtol=0, atol=1e-12)
    assert all(len(kp) == n for kp in kept)


def test_short_context_is_dense_and_boundary():
    b, w = 16, 32
    k = _k(b)
    sparsest = _onehot(k, 1)
    for n in (1, 20, w, w + b - 1):
        for ub in (1, 5, 64):
            Q, K, V = _qkv(n, 4, 2, 8, seed=n + ub)
            O, kept, cov = R.simulate_prefill(Q, K, V, 2, sparsest, k, b, w, 4, 0.5, ub)
            assert all(np.array_equal(kp, np.arange(n)) for kp in kept)
            assert np.all(cov == 1.0)
            np.testing.assert_allclose(O, R.dense_attention(Q, K, V, 2), rtol=0, atol=1e-12)
    # at n = w + b block 0 has left the window and is compacted (n_sink = 4 kept + top-1)
    n = w + b
    Q, K, V = _qkv(n, 4, 2, 8, seed=9)
    _, kept, cov = R.simulate_prefill(Q, K, V, 2, sparsest, k, b, w, 4, 0.5, 64)
    assert all(len(kp) == n - (b - 4 - 1) for kp in kept)
    assert all(np.array_equal(kp[5:], np.arange(b, n)) for kp in kept)
    assert np.all(cov < 1.0)


def test_mixed_dense_and_sparse_heads():
    b, w, n = 8, 16, 100
    k = _k(b)
    Q, K, V = _qkv(n, 4, 2, 8, seed=10)
    p = np.stack([R.dense_p(k), _onehot(k, 2)])
    O, kept, cov = R.simulate_prefill(Q, K, V, 2, p, k, b, w, 2, 0.5, 10)
    dense = R.dense_attention(Q, K, V, 2)
    assert np.array_equal(kept[0], np.arange(n)) and cov[0] == 1.0
    np.testing.assert_allclose(O[:, :2], dense[:, :2], rtol=0, atol=1e-12)
    assert len(kept[1]) < n and cov[1] < 1.0
    assert not np.allclose(O[:, 2:], dense[:, 2:])


def test_single_shot_equals_select_keep():
    # one ubatch over everything = one selection with the last query over the whole text
    b, w, n, G = 16, 32, 200, 3
    k = _k(b)
    Q, K, V = _qkv(n, 2 * G, 2, 8, seed=11, qscale=2.0)
    p = R.log_gaussian_p(k, 1.5, 1.0)
    O, kept, cov = R.simulate_prefill(Q, K, V, 2, p, k, b, w, 4, 0.5, n)
    np.testing.assert_allclose(O, R.dense_attention(Q, K, V, 2), rtol=0, atol=1e-12)
    for g in range(2):
        s = R.pooled_importance(Q[-1, g * G:(g + 1) * G], K[:, g])
        keep = R.select_keep(np.arange(n), s, p, k, b, w, 4, n, 0.5)
        assert np.array_equal(kept[g], np.nonzero(keep)[0])
        assert cov[g] == pytest.approx(s[keep].sum(), abs=1e-12)


def _run_steps(Q, K, V, n_head_kv, p, k, b, w, n_sink, alpha, ubatch, n_decode=0):
    n, n_head, d = Q.shape
    st = R.TCALayerState(n_head, n_head_kv, d, p, k, b, w, n_sink, alpha)
    states = []
    n_pre = n - n_decode
    for a in range(0, n_pre, ubatch):
        e = min(a + ubatch, n_pre)
        st.prefill_ubatch(Q[a:e], K[a:e], V[a:e])
        states.append((st.n_seen, st.kept_positions(), e - a))
    for i in range(n_pre, n):
        R.simulate_decode_step(st, Q[i], K[i], V[i])
        states.append((st.n_seen, st.kept_positions(), 1))
    return st, states


@pytest.mark.parametrize("ubatch,n_decode", [(1, 0), (5, 0), (37, 0), (64, 80)])
def test_memory_bound_and_permanent_eviction(ubatch, n_decode):
    b, w, n_sink, n = 16, 32, 4, 400
    k = _k(b)
    Q, K, V = _qkv(n, 4, 2, 8, seed=12 + ubatch, qscale=2.0)
    ps = np.stack([R.log_gaussian_p(k, 1.0, 1.0), R.log_gaussian_p(k, 2.5, 0.7)])
    t = [R.expected_tokens(p_, k) for p_ in ps]
    st, states = _run_steps(Q, K, V, 2, ps, k, b, w, n_sink, 0.5, ubatch, n_decode)
    prev = [np.arange(0)] * 2
    prev_seen = 0
    for n_seen, kept, u in states:
        N = R.n_aged_blocks(n_seen, b, w)
        for g in range(2):
            kp = kept[g]
            assert np.all(np.diff(kp) > 0) and kp[-1] == n_seen - 1
            assert len(kp) <= N * t[g] + 2 * b + w + u + n_sink
            assert np.all(np.isin(np.arange(min(n_sink, n_seen)), kp))         # sinks stay
            F = N * b
            assert np.all(np.isin(np.arange(F, n_seen), kp))                   # live region exact
            # permanent eviction: old positions are a subset of what was retained before
            old = kp[kp < prev_seen]
            assert np.all(np.isin(old, prev[g]))
            # this step's own tokens may already be compacted if they reach below F
            assert np.array_equal(kp[kp >= max(prev_seen, F)], np.arange(max(prev_seen, F), n_seen))
        prev, prev_seen = kept, n_seen
    assert all(len(kp) < n * 0.6 for kp in st.kept_positions())


def test_decode_compacts_only_on_new_aged_block():
    b, w, n_sink = 8, 16, 2
    k = _k(b)
    n = 120
    Q, K, V = _qkv(n, 2, 1, 8, seed=13, qscale=3.0)
    p = _onehot(k, 1)
    st, states = _run_steps(Q, K, V, 1, p, k, b, w, n_sink, 0.5, ubatch=40, n_decode=80)
    for (n0, kept0, _), (n1, kept1, _) in zip(states, states[1:]):
        if n1 <= 40:
            continue
        new_block = R.n_aged_blocks(n1, b, w) > R.n_aged_blocks(n0, b, w)
        evicted = np.setdiff1d(kept0[0], kept1[0])
        assert ((n1 - w) % b == 0) == new_block
        if not new_block:
            assert evicted.size == 0
            assert np.array_equal(kept1[0], np.append(kept0[0], n1 - 1))
        else:
            # the block that just left the window is compacted to 1 token
            j = R.n_aged_blocks(n1, b, w) - 1
            assert np.isin(kept1[0], np.arange(j * b, (j + 1) * b)).sum() == 1
    assert st.heads[0].n_compactions == 1 + 80 // b
    # contrast: the same tokens prefilled one at a time compact after every token
    st2, _ = _run_steps(Q, K, V, 1, p, k, b, w, n_sink, 0.5, ubatch=1)
    assert st2.heads[0].n_compactions == n - (w + b) + 1


def test_error_bound_after_one_compaction():
    # prefill n-1 tokens in one ubatch (one compaction), then decode the last token without
    # a new block ageing, so exactly one compaction happened before the last query attends.
    b, w, n_sink, d = 16, 32, 4, 16
    n = 200                                      # (200 - 32) % 16 = 8: no new block at the end
    k = _k(b)
    for G, seed in [(1, 0), (3, 1)]:
        rng = np.random.default_rng(100 + seed)
        Q = rng.normal(size=(n, G, d)) * 1.5
        K = rng.normal(size=(n, 1, d))
        V = rng.normal(size=(n, 1, d))
        p = R.log_gaussian_p(k, 1.0, 1.0)
        st, _ = _run_steps(Q, K, V, 1, p, k, b, w, n_sink, 0.5, ubatch=n - 1, n_decode=1)
        assert st.heads[0].n_compactions == 1
        O, kept, cov = R.simulate_prefill(Q, K, V, 1, p, k, b, w, n_sink, 0.5, n - 1, n_decode=1)
        assert np.array_equal(kept[0], st.heads[0].pos)
        dense = R.dense_attention(Q, K, V, 1)
        vmax = np.abs(V).max()
        S = kept[0]
        # reported coverage: pooled share of q_{n-2}'s mass on what the compaction kept
        s = R.pooled_importance(Q[n - 2], K[:n - 1, 0])
        assert cov[0] == pytest.approx(s[S[S < n - 1]].sum(), abs=1e-12)
        gamma_sel = 1.0 - cov[0]
        assert 0.05 < gamma_sel < 0.9            # the bound is exercised, not vacuous
        if G == 1:
            # the selecting query itself, re-attending over the kept set
            o_sel = R.sparse_attention(Q[n - 2:n - 1], K[S[S < n - 1], 0], V[S[S < n - 1], 0],
                                       [n - 2], S[S < n - 1])
            err = np.abs(o_sel[0] - dense[n - 2]).max()
            assert 0 < err <= 2 * gamma_sel * vmax + 1e-12
        # the last query, per head, with its own gamma over the set it attended
        for h in range(G):
            a = R.pooled_importance(Q[n - 1, h], K[:, 0])
            gamma = 1.0 - a[S].sum()
            err = np.abs(O[n - 1, h] - dense[n - 1, h]).max()
            assert err <= 2 * gamma * vmax + 1e-12
            assert err > 0
            # the output equals renormalised attention over the kept set
            ref = (a[S][:, None] * V[S, 0]).sum(0) / a[S].sum()
            np.testing.assert_allclose(O[n - 1, h], ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- calibration
def test_probe_positions():
    pp = CAL.probe_positions(2000, seed=3)
    assert pp.size == 512 and np.all(np.diff(pp) > 0)
    assert np.array_equal(pp[-256:], np.arange(1744, 2000))
    assert np.array_equal(pp, CAL.probe_positions(2000, seed=3))
    assert not np.array_equal(pp, CAL.probe_positions(2000, seed=4))
    assert np.array_equal(CAL.probe_positions(300), np.arange(300))
    assert np.array_equal(CAL.probe_positions(100), np.arange(100))
    assert CAL.probe_positions(600, 10, 20).size == 30


def test_coverage_of_kept_matches_full_matrix():
    rng = np.random.default_rng(15)
    n, G, d = 90, 3, 8
    Qg = rng.normal(size=(n, G, d)) * 2
    Kg = rng.normal(size=(n, d))
    keep = rng.random(n) < 0.4
    keep2 = rng.random(n) < 0.7
    probes = np.array([0, 5, 40, 41, 89])
    # full n x n reference, fine at this size
    lg = np.einsum("qhd,kd->hqk", Qg, Kg) / math.sqrt(d)
    lg = np.where(np.tril(np.ones((n, n), bool))[None], lg, -np.inf)
    a = np.exp(lg - lg.max(-1, keepdims=True))
    a = (a / a.sum(-1, keepdims=True)).mean(0)
    exp = np.array([a[q, :q + 1][keep[:q + 1]].sum() for q in probes])
    got = CAL.coverage_of_kept(Qg, Kg, keep, probes, chunk=2)
    np.testing.assert_allclose(got, exp, rtol=0, atol=1e-12)
    both = CAL.coverage_of_kept(Qg, Kg, np.stack([keep, keep2]), probes)
    assert both.shape == (2, 5)
    np.testing.assert_allclose(both[0], got, atol=1e-12)
    assert np.all(CAL.coverage_of_kept(Qg, Kg, np.ones(n, bool), probes) == 1.0)


def test_calibrate_head_dense_when_tau_one():
    rng = np.random.default_rng(16)
    n, G, d, b, w = 300, 2, 16, 16, 32
    Qg = rng.normal(size=(n, G, d))
    Kg = rng.normal(size=(n, d))
    idx, p, density, cov = CAL.calibrate_head(Qg, Kg, tau=1.0, block_size=b, window=w)
    assert idx == -1 and density == 1.0 and cov == 1.0
    assert np.array_equal(p, R.dense_p(_k(b)))
    # a reachable tau on the same data gives a real candidate that meets it
    idx, p, density, cov = CAL.calibrate_head(Qg, Kg, tau=0.7, block_size=b, window=w)
    assert 0 <= idx < 14 and cov >= 0.7 and 0 < density < 1
    mu, sigma, k = CAL.candidate_grid(b)
    np.testing.assert_allclose(p, R.log_gaussian_p(k, mu[idx], sigma[idx]))
    assert density == pytest.approx(R.expected_tokens(p, k) / b)
    # it is the sparsest one that reaches tau
    probes = CAL.probe_positions(n)
    ps = [R.log_gaussian_p(k, m_, s_) for m_, s_ in zip(mu, sigma)]
    _, covs = CAL.candidate_coverages(Qg, Kg, ps, k, b, w, 4, 0.5, probes)
    ok = [c for c in range(14) if covs[c] >= 0.7]
    assert idx == min(ok, key=lambda c: R.expected_tokens(ps[c], k))
    assert covs[idx] == pytest.approx(cov)
    # short text: nothing is aged, every candidate covers everything -> sparsest
    idx, _, _, cov = CAL.calibrate_head(Qg[:40], Kg[:40], tau=1.0, block_size=b, window=w)
    assert idx == 0 and cov == 1.0


def test_calibrate_head_peaked_attention_picks_sparsest():
    n, b, w, n_sink = 600, 16, 32, 4
    Qg, Kg = peaked_attention(n, n_sink=n_sink)   # one dominant token, not a sink, in aged block 0
    idx, p, density, cov = CAL.calibrate_head(Qg, Kg, tau=0.99, block_size=b, window=w,
                                            n_sink=n_sink)
    mu, sigma, k = CAL.candidate_grid(b)
    t = [R.expected_tokens(R.log_gaussian_p(k, m_, s_), k) for m_, s_ in zip(mu, sigma)]
    assert idx == int(np.argmin(t)) == 0
    assert cov > 0.999 and density == pytest.approx(t[0] / b)
    # deterministic
    again = CAL.calibrate_head(Qg, Kg, tau=0.99, block_size=b, window=w, n_sink=n_sink)
    assert again[0] == idx and again[2] == density and again[3] == cov
    assert np.array_equal(again[1], p)


def test_calibrate_head_deterministic_random():
    rng = np.random.default_rng(18)
    Qg = rng.normal(size=(700, 3, 8)) * 2
    Kg = rng.normal(size=(700, 8))
    r1 = CAL.calibrate_head(Qg, Kg, tau=0.85, block_size=16, window=64, seed=5)
    r2 = CAL.calibrate_head(Qg, Kg, tau=0.85, block_size=16, window=64, seed=5)
    assert r1[0] == r2[0] and r1[2] == r2[2] and r1[3] == r2[3] and np.array_equal(r1[1], r2[1])


def test_pooled_ranking_keeps_neighbours_of_what_the_query_reads():
    """Within a block the ranking key is the max of s over same-block candidates within
    POOL_RADIUS positions: the neighbours of a peak outrank isolated middling tokens."""
    b, w, n_sink, n_seen = 16, 16, 0, 48               # F = 32: blocks 0 and 1 aged
    k = _k(16)
    pos = np.arange(n_seen)
    s = np.full(n_seen, 1e-4)
    s[20] = 0.5                                        # the query reads token 20 of block 1
    s[[2, 28]] = 0.01                                  # isolated middling tokens
    s /= s.sum()
    assert R.POOL_RADIUS == 3
    sp = R.pool_scores(pos, s, b)
    assert np.all(sp[17:24] == s[20]) and sp[16] == s[16] and sp[24] == s[24] and sp[28] == s[28]
    # block boundaries stop the pool: token 15 (block 0) does not see token 16
    s2 = s.copy(); s2[16] = 0.3
    assert R.pool_scores(pos, s2, b)[15] == s2[15]
    keep = R.select_keep(pos, s, _onehot(k, 8), k, b, w, n_sink, n_seen, 0.5)
    assert keep[17:24].all()                           # the peak and its 3 + 3 neighbours
    assert not keep[28]                                # the middling one lost its seat (k = 8: 7 + 1 more)
    # the vectorised form agrees
    assert np.array_equal(keep, CAL._select_keep_vec(pos, s, _onehot(k, 8), k, b, w, n_sink, n_seen, 0.5))


def test_hold_decode_steps_attend_every_held_row():
    """retention="hold" with hold_decode=N: the N decode steps after a prompt's final ubatch attend
    every row (dense attention over the sequence so far), the ones after them the kept rows; a new
    prompt end starts the count again; non-final prefill ubatches do not."""
    b, w, n_sink, N = 16, 32, 4, 5
    k = _k(b)
    Q, K, V = _qkv(260, 4, 2, 8, seed=21, qscale=2.0)
    p = R.log_gaussian_p(k, 0.5, 1.0)
    st = R.TCALayerState(4, 2, 8, p, k, b, w, n_sink, 0.5, retention="hold", hold_decode=N)
    st.prefill_ubatch(Q[:100], K[:100], V[:100])
    st.prefill_ubatch(Q[100:200], K[100:200], V[100:200], final=True)
    assert sum(len(x) for x in st.kept_positions()) < 2 * 200   # the final selection evicted
    for i in range(200, 200 + N + 3):
        out = st.decode_step(Q[i], K[i], V[i])
        dense = R.dense_attention(Q[:i + 1], K[:i + 1], V[:i + 1], 2)[-1]
        if i < 200 + N:
            np.testing.assert_allclose(out, dense, rtol=0, atol=1e-12)
        else:
            assert np.abs(out - dense).max() > 1e-6, i
    st.prefill_ubatch(Q[208:230], K[208:230], V[208:230], final=True)   # a new prompt end
    np.testing.assert_allclose(st.decode_step(Q[230], K[230], V[230]),
                               R.dense_attention(Q[:231], K[:231], V[:231], 2)[-1], rtol=0, atol=1e-12)
    st.prefill_ubatch(Q[231:240], K[231:240], V[231:240])               # a prompt that goes on
    out = st.decode_step(Q[240], K[240], V[240])
    assert np.abs(out - R.dense_attention(Q[:241], K[:241], V[:241], 2)[-1]).max() > 1e-6
