"""Chunked-prefill calibration (calibration.calibrate_head_chunked, design §4): the fast replay
must equal a brute-force replay through TCALayerState, position for position."""
import math

import numpy as np
import pytest

from tca_ggml import reference as R

from tca_ggml import calibration as CAL  # noqa: E402  (the calibration search)

from _helpers import peaked_attention  # noqa: E402


def _grid(b):
    mu, sigma, k = CAL.candidate_grid(b)
    return [R.log_gaussian_p(k, m_, s_) for m_, s_ in zip(mu, sigma)], k


def _brute_force(Qg, Kg, p, k, b, w, n_sink, alpha, ubatch, probes):
    """Replay through TCALayerState (one KV head, G query heads): the retained positions
    after every ubatch, and each probe's coverage against the set after its ubatch."""
    n, G, d = Qg.shape
    V = np.random.default_rng(123).normal(size=(n, 1, d))
    st = R.TCALayerState(G, 1, d, p, k, b, w, n_sink, alpha, v_dim=d)
    after = []
    for a in range(0, n, ubatch):
        e = min(a + ubatch, n)
        st.prefill_ubatch(Qg[a:e], Kg[a:e, None], V[a:e])
        after.append(st.heads[0].pos.copy())
    cov = np.empty(len(probes))
    for i, q in enumerate(probes):
        keep = np.zeros(n, dtype=bool)
        keep[after[q // ubatch]] = True
        cov[i] = CAL.coverage_of_kept(Qg, Kg, keep, [q])[0]
    return after, cov


@pytest.mark.parametrize("n,G,d,b,w,ubatch,n_sink,alpha,seed", [
    (700, 2, 8, 16, 64, 50, 4, 0.5, 0),     # ubatch not a multiple of b, short last ubatch
    (640, 3, 16, 16, 32, 64, 4, 0.5, 1),    # ubatch = 4 blocks, n a multiple of ubatch
    (500, 1, 8, 8, 40, 1 << 10, 2, 0.3, 2),  # one ubatch = single shot (w not a multiple of b)
    (420, 2, 8, 16, 48, 17, 0, 1.0, 3),     # tiny ubatches, no sinks, pure diversity
])
def test_chunked_replay_equals_brute_force(n, G, d, b, w, ubatch, n_sink, alpha, seed):
    rng = np.random.default_rng(seed)
    Qg = rng.normal(size=(n, G, d)) * 2.0
    Kg = rng.normal(size=(n, d))
    p_list, k = _grid(b)
    probes = CAL.probe_positions(n, 40, 60, seed=seed)
    evict = CAL.chunked_evictions(Qg, Kg, p_list, k, b, w, n_sink, alpha, ubatch)
    cov = CAL.chunked_probe_coverage(Qg, Kg, evict, probes, ubatch, chunk=7)
    ends = [min(a + ubatch, n) for a in range(0, n, ubatch)]
    n_evicted = 0
    for c, p in enumerate(p_list):
        after, bcov = _brute_force(Qg, Kg, p, k, b, w, n_sink, alpha, ubatch, probes)
        for j, e in enumerate(ends):
            got = np.nonzero((np.arange(n) < e) & (evict[c] > j))[0]
            assert np.array_equal(got, after[j]), (c, j)
        np.testing.assert_allclose(cov[c], bcov, rtol=0, atol=1e-12)
        n_evicted += int((evict[c] != np.iinfo(np.int64).max).sum())
    assert n_evicted > 0                       # the case actually evicts something
    # the aggregate helper and the head calibration use the same numbers
    _, mean_cov = CAL.chunked_candidate_coverages(Qg, Kg, p_list, k, b, w, n_sink, alpha,
                                                probes, ubatch)
    np.testing.assert_allclose(mean_cov, cov.mean(axis=1), rtol=0, atol=1e-15)


def test_select_keep_vec_equals_select_keep():
    rng = np.random.default_rng(7)
    p_list, k = _grid(16)
    for trial in range(60):
        n_seen = int(rng.integers(20, 400))
        pos = np.sort(rng.choice(n_seen, size=int(rng.integers(1, n_seen)), replace=False))
        s = rng.random(pos.size) ** 3
        if trial % 3 == 0:
            s = np.round(s * 4) / 4                # many ties, zeros
        s = s / s.sum() if s.sum() > 0 else s
        p = p_list[trial % len(p_list)]
        args = (pos, s, p, k, 16, int(rng.integers(0, 64)), int(rng.integers(0, 6)), n_seen,
                float(rng.choice([0.0, 0.5, 1.0])))
        assert np.array_equal(CAL._select_keep_vec(*args), R.select_keep(*args)), trial


def test_chunked_deterministic():
    rng = np.random.default_rng(18)
    Qg = rng.normal(size=(900, 3, 8)) * 2
    Kg = rng.normal(size=(900, 8))
    r1 = CAL.calibrate_head_chunked(Qg, Kg, tau=0.6, block_size=16, window=64, ubatch=64, seed=5)
    r2 = CAL.calibrate_head_chunked(Qg, Kg, tau=0.6, block_size=16, window=64, ubatch=64, seed=5)
    assert r1[0] == r2[0] and r1[2] == r2[2] and r1[3] == r2[3] and np.array_equal(r1[1], r2[1])
    assert 0 <= r1[0] < 14 and r1[3] >= 0.6


def test_chunked_dense_when_tau_one_and_sparsest_when_short():
    rng = np.random.default_rng(16)
    n, G, d, b, w = 600, 2, 16, 16, 32
    Qg = rng.normal(size=(n, G, d))
    Kg = rng.normal(size=(n, d))
    idx, p, density, cov = CAL.calibrate_head_chunked(Qg, Kg, tau=1.0, block_size=b, window=w,
                                                    ubatch=64)
    assert idx == -1 and density == 1.0 and cov == 1.0
    assert np.array_equal(p, R.dense_p(CAL.candidate_grid(b)[2]))
    # short text: nothing ever ages -> every candidate covers everything -> sparsest
    idx, _, _, cov = CAL.calibrate_head_chunked(Qg[:40], Kg[:40], tau=1.0, block_size=b,
                                              window=w, ubatch=16)
    assert idx == 0 and cov == 1.0


def test_chunked_peaked_attention_picks_sparsest():
    n, b, w, n_sink = 800, 16, 32, 4
    Qg, Kg = peaked_attention(n, n_sink=n_sink)   # one dominant token, not a sink, in aged block 0
    idx, p, density, cov = CAL.calibrate_head_chunked(Qg, Kg, tau=0.99, block_size=b, window=w,
                                                    n_sink=n_sink, ubatch=64)
    p_list, k = _grid(b)
    t = [R.expected_tokens(q, k) for q in p_list]
    assert idx == int(np.argmin(t)) == 0
    assert cov > 0.999 and density == pytest.approx(t[0] / b)


def _drifting_head(n=2048, G=2, d=16, b=16, period=2048, lag=192, amp=9.0, seed=0):
    """One token per block (offset b/2) is a 'marker' key on a circle in dims (0, 1) at angle
    theta(i) = 2 pi i / period; the other keys are small noise in the other dims. The query at t points at angle
    theta(t - lag), i.e. at the markers just beyond the window: the focus drifts slowly
    (a ubatch moves it by 2 pi * ubatch / period) and neighbouring queries want the same keys.
    A marker is the top token of its block for any query within 90 degrees of it and the
    bottom one beyond, so
      * chunked: each probe is judged by the set its own ubatch's last query selected, whose
        focus is within a few degrees of the probe's; every earlier selector looked at those
        markers from < 90 degrees too, so even k = 1 per block keeps them -> sparsest budget;
      * single shot: one selection with the final query; a random early probe's markers are
        up to 180 degrees away from its focus, sit at the bottom of their blocks and are
        evicted unless whole blocks are kept -> a much denser budget."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    Kg = np.zeros((n, d))
    Kg[:, 2:] = 0.1 * rng.normal(size=(n, d - 2))
    m = i[(i % b) == b // 2]                      # one marker per block
    th = 2 * np.pi * m / period
    Kg[m, 0], Kg[m, 1] = amp * np.cos(th), amp * np.sin(th)
    tq = 2 * np.pi * (i - lag) / period
    Qg = 0.01 * rng.normal(size=(n, G, d))
    Qg[:, :, 0] += amp * np.cos(tq)[:, None]
    Qg[:, :, 1] += amp * np.sin(tq)[:, None]
    return Qg, Kg


def test_chunked_is_not_denser_than_single_shot_when_queries_drift(monkeypatch):
    # the calibration logic itself, on the plain within-block rule (the pooled ranking moves
    # which tokens a block keeps, not how many; with it on, this synthetic case flips)
    monkeypatch.setattr(R, "POOL_RADIUS", 0)
    b, w, u = 16, 128, 64
    Qg, Kg = _drifting_head(b=b)
    single = CAL.calibrate_head(Qg, Kg, tau=0.9, block_size=b, window=w)
    chunked = CAL.calibrate_head_chunked(Qg, Kg, tau=0.9, block_size=b, window=w, ubatch=u)
    assert chunked[2] <= single[2]
    assert chunked[0] == 0 and chunked[3] > 0.99      # sparsest budget, near-full coverage
    assert single[2] > 3 * chunked[2]                   # the single shot needs far more


def test_calib_tool_records_the_mode():
    calibrate = pytest.importorskip("tca_ggml.calibrate")
    from tca_ggml import __version__
    assert calibrate.calib_tool_string("chunked", 512) == f"tca_ggml {__version__} (chunked, ubatch 512)"
    assert calibrate.calib_tool_string("single") == f"tca_ggml {__version__} (single-shot)"
    with pytest.raises(calibrate.CalibrationError, match="mode"):
        calibrate.calibrate("/nonexistent.gguf", mode="both")
    with pytest.raises(calibrate.CalibrationError, match="ubatch"):
        calibrate.calibrate("/nonexistent.gguf", ubatch=0)


def test_one_ubatch_is_the_single_shot():
    """With one ubatch covering the whole text, the replay is the single-shot selection and
    every probe is scored against the final set: both calibrations agree."""
    rng = np.random.default_rng(21)
    Qg = rng.normal(size=(800, 2, 8)) * 1.5
    Kg = rng.normal(size=(800, 8))
    p_list, k = _grid(16)
    probes = CAL.probe_positions(800)
    masks, cs = CAL.candidate_coverages(Qg, Kg, p_list, k, 16, 64, 4, 0.5, probes)
    evict, cc = CAL.chunked_candidate_coverages(Qg, Kg, p_list, k, 16, 64, 4, 0.5, probes,
                                              ubatch=800)
    assert np.array_equal(evict == np.iinfo(np.int64).max, masks)
    np.testing.assert_allclose(cc, cs, rtol=0, atol=1e-12)
    a = CAL.calibrate_head(Qg, Kg, tau=0.6, block_size=16, window=64)
    b = CAL.calibrate_head_chunked(Qg, Kg, tau=0.6, block_size=16, window=64, ubatch=4096)
    assert a[0] == b[0] and a[2] == b[2] and abs(a[3] - b[3]) < 1e-12
