"""The final-selection calibration (calibration.calibrate_head_final, design §4): the replay equals
the "hold" retention of reference.TCALayerState, it sees what a question retrieves, and the
calibration text it reads. Synthetic Q/K in NumPy; no model, no native library."""
import math
import re

import numpy as np
import pytest

from tca_ggml import calibration as CAL
from tca_ggml import reference as R


def _grid(b):
    mu, sigma, k = CAL.candidate_grid(b)
    return [R.log_gaussian_p(k, m_, s_) for m_, s_ in zip(mu, sigma)], k


# --------------------------------------------------------------------------- exact replay
def _brute_force(Qg, Kg, p, k, b, w, n_sink, alpha, ubatch, ep, n_obs, n_whole):
    """The episode through TCALayerState (retention "hold", one KV head): the prompt in
    ubatches (the last one final), then one decode step per position up to the last probe.
    Each probe's coverage against the rows it attends (prompt probes: the final selection)."""
    n, G, d = Qg.shape
    V = np.random.default_rng(5).normal(size=(n, 1, d))
    st = R.TCALayerState(G, 1, d, p, k, b, w, n_sink, alpha, v_dim=d, retention="hold",
                         n_obs=n_obs, n_whole=n_whole)
    e = ep.end
    for a in range(0, e, ubatch):
        z = min(a + ubatch, e)
        st.prefill_ubatch(Qg[a:z], Kg[a:z, None], V[a:z], final=z == e)
    seen = {}
    after_final = st.heads[0].pos.copy()
    for q in range(e, ep.upto):
        seen[q] = np.concatenate([st.heads[0].pos, [q]])          # attended before its own cut
        st.decode_step(Qg[q], Kg[q, None], V[q])
    cov = []
    for q in ep.probes:
        keep = np.zeros(n, dtype=bool)
        keep[seen[q] if q >= e else after_final] = True
        cov.append(CAL.coverage_of_kept(Qg, Kg, keep, [q])[0])
    return after_final, seen, np.array(cov)


@pytest.mark.parametrize("n,G,d,b,w,ubatch,e,n_sink,alpha,n_whole,seed", [
    (700, 2, 8, 16, 64, 100, 600, 4, 0.5, 4, 0),    # 100 decode steps: blocks age while decoding
    (520, 3, 16, 16, 96, 64, 448, 2, 0.3, 2, 1),    # prompt a multiple of ubatch
    (400, 1, 8, 8, 40, 400, 380, 4, 1.0, 0, 2),     # one ubatch, no whole blocks, w % b != 0
])
def test_final_replay_equals_hold_retention(n, G, d, b, w, ubatch, e, n_sink, alpha, n_whole, seed):
    rng = np.random.default_rng(seed)
    Qg = rng.normal(size=(n, G, d)) * 2.0
    Kg = rng.normal(size=(n, d))
    p_list, k = _grid(b)
    probes = np.concatenate([[e - 40, e - 1], np.arange(e, n, 3)])   # two inside the prompt
    ep = CAL.Episode(e, probes)
    ev = CAL.final_evictions(Qg, Kg, p_list, k, b, w, n_sink, alpha, ep, n_obs=32, n_whole=n_whole)
    cov = CAL.final_probe_coverage(Qg, Kg, ev, ep, chunk=5)
    n_cut = 0
    for c, p in enumerate(p_list):
        after_final, seen, bcov = _brute_force(Qg, Kg, p, k, b, w, n_sink, alpha, ubatch, ep, 32, n_whole)
        assert np.array_equal(np.nonzero(ev[c, :e] >= e)[0], after_final), c   # not gone at e - 1
        for q, s in seen.items():
            got = np.nonzero((np.arange(ev.shape[1]) <= q) & (ev[c] >= max(q, e)))[0]
            assert np.array_equal(got, s), (c, q)
        np.testing.assert_allclose(cov[c], bcov, rtol=0, atol=1e-12)
        n_cut += int(((ev[c] >= e) & (ev[c] != np.iinfo(np.int64).max)).sum())
    assert (ev[:, :e] == e - 1).any()                          # the final selection evicts
    if n - e > b:
        assert n_cut > 0                                       # and so does the decode rule
    agg = CAL.final_candidate_coverages(Qg, Kg, p_list, k, b, w, n_sink, alpha, [ep, ep],
                                        n_obs=32, n_whole=n_whole)
    np.testing.assert_allclose(agg, np.concatenate([cov, cov], axis=1), rtol=0, atol=1e-15)


def test_final_scores_are_the_mean_over_the_window():
    rng = np.random.default_rng(3)
    Qg = rng.normal(size=(300, 2, 8))
    Kg = rng.normal(size=(300, 8))
    s = CAL.final_scores(Qg, Kg, 250, n_obs=32)
    exp = np.mean([R.pooled_importance(Qg[j], Kg[:250]) for j in range(218, 250)], axis=0)
    np.testing.assert_allclose(s, exp, rtol=1e-12, atol=1e-15)
    assert CAL.final_scores(Qg, Kg, 10, n_obs=32).shape == (10,)   # shorter prompt: fewer queries


# --------------------------------------------------------------------------- what it sees
def _head(n=1536, G=2, d=16, far_blocks=(20,), question=40, local_question=False, amp=40.0, seed=0):
    """A head that reads locally (keys and queries on a circle in dims 0-1, angle 2 pi i / 2048:
    a query's softmax is a ~25-token-wide bump behind it) everywhere but in the last ``question``
    positions, whose queries instead match the keys of ``far_blocks`` (16-token blocks) in
    dim 2 -- a question asking for facts planted far back. ``local_question``: the question
    queries read locally too (a purely local head)."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    th = 2 * np.pi * i / 2048
    Kg = np.zeros((n, d))
    Kg[:, 3:] = 0.1 * rng.normal(size=(n, d - 3))
    Kg[:, 0], Kg[:, 1] = 20 * np.cos(th), 20 * np.sin(th)
    Qg = np.zeros((n, G, d))
    Qg[:, :, 3:] = 0.1 * rng.normal(size=(n, G, d - 3))
    Qg[:, :, 0] = (34 * np.cos(th))[:, None]
    Qg[:, :, 1] = (34 * np.sin(th))[:, None]
    for j in far_blocks:
        Kg[j * 16:(j + 1) * 16, 2] = 1.0
    if not local_question:
        Qg[n - question:, :, :2] = 0.0
        Qg[n - question:, :, 2] = amp
    return Qg, Kg


def test_final_keeps_the_block_the_question_reads_chunked_evicts_it():
    b, w, n_sink, n = 16, 128, 4, 1536
    Qg, Kg = _head(far_blocks=(20,))
    p_list, k = _grid(b)
    sparsest = [p_list[0]]
    planted = np.arange(320, 336)
    # the old calibration: filler queries select, evictions final, filler probes -> sparsest,
    # and the planted block is cut before the question arrives
    idx, _, _, cov = CAL.calibrate_head_chunked(Qg, Kg, tau=0.9, block_size=b, window=w, ubatch=64)
    assert idx == 0 and cov >= 0.9
    ev = CAL.chunked_evictions(Qg, Kg, sparsest, k, b, w, n_sink, 0.5, ubatch=64)
    gone = ev[0, planted] != np.iinfo(np.int64).max
    assert gone.sum() >= 8 and ev[0, planted][gone].max() < (n - 40) // 64
    # the final selection, scored by the question's queries, keeps it whole at the same budget
    ep = CAL.Episode(n - 8, np.arange(n - 8, n))      # obs window: the question's first 32 queries
    fev = CAL.final_evictions(Qg, Kg, sparsest, k, b, w, n_sink, 0.5, ep)
    assert (fev[0, planted] == np.iinfo(np.int64).max).all()
    assert (fev[0, :n - 8 - w] != np.iinfo(np.int64).max).sum() > 1000      # and evicts the rest
    fcov = CAL.final_probe_coverage(Qg, Kg, fev, ep)
    assert fcov.min() > 0.99
    # the chunked replay loses most of what those answer queries read
    ccov = CAL.chunked_probe_coverage(Qg, Kg, ev, ep.probes, ubatch=64)
    assert ccov.mean() < 0.6


def test_final_budget_denser_for_a_head_that_looks_far_back():
    b, w, n = 16, 128, 1536
    far = tuple(range(10, 70, 3))                     # 20 blocks, more than the 4 kept whole
    eps = [CAL.Episode(n - 8, np.arange(n - 8, n))]
    kw = dict(tau=0.9, block_size=b, window=w)
    Qr, Kr = _head(far_blocks=far)
    Ql, Kl = _head(far_blocks=far, local_question=True)
    ir, pr, dr, cr = CAL.calibrate_head_final(Qr, Kr, eps, **kw)
    il, pl, dl, cl = CAL.calibrate_head_final(Ql, Kl, eps, **kw)
    assert il == 0 and cl > 0.99                      # local: the sparsest budget covers it
    assert ir != 0 and dr > 2 * dl and cr >= 0.9     # far-reading: a denser budget
    # the chunked mode with filler probes cannot tell the two apart
    assert CAL.calibrate_head_chunked(Qr, Kr, ubatch=64, **kw)[0] == 0


def test_calibrate_head_final_defaults_and_dense():
    rng = np.random.default_rng(9)
    Qg = rng.normal(size=(600, 2, 8)) * 2
    Kg = rng.normal(size=(600, 8))
    a = CAL.calibrate_head_final(Qg, Kg, tau=0.8, block_size=16, window=64)
    b = CAL.calibrate_head_final(Qg, Kg, [CAL.tail_episode(600)], tau=0.8, block_size=16, window=64)
    assert a[0] == b[0] and a[3] == b[3] and np.array_equal(a[1], b[1])
    idx, p, dens, cov = CAL.calibrate_head_final(Qg, Kg, tau=1.0, block_size=16, window=64)
    assert idx == -1 and dens == 1.0 and cov == 1.0
    # nothing aged (prompt within w + b) and probes within the window: the sparsest covers all
    idx, _, _, cov = CAL.calibrate_head_final(Qg, Kg, [CAL.Episode(70, np.arange(70, 75))], tau=1.0,
                                              block_size=16, window=64)
    assert idx == 0 and cov == 1.0
    with pytest.raises(ValueError, match="probe"):
        CAL.calibrate_head_final(Qg, Kg, [CAL.Episode(100, [])], block_size=16, window=64)


# --------------------------------------------------------------------------- the calibration text
class _WordTokenizer:
    """Deterministic stand-in: words, single spaces+word, digits one by one, punctuation, newlines."""
    _re = re.compile(r" ?[A-Za-z]+|\d| |\n|[^\sA-Za-z\d]")

    def __init__(self):
        self.vocab, self.inv = {}, {0: ""}

    def __call__(self, text, bos):
        out = [0] if bos else []
        for m in self._re.findall(text):
            if m not in self.vocab:
                self.vocab[m] = len(self.vocab) + 1
                self.inv[self.vocab[m]] = m
            out.append(self.vocab[m])
        return out

    def decode(self, toks):
        return "".join(self.inv[t] for t in toks)


def test_calibration_text_has_facts_questions_and_answer_probes():
    calibrate = pytest.importorskip("tca_ggml.calibrate")
    hay = "\n".join(f"Paragraph {i} talks about startups, essays and the craft of writing code."
                    for i in range(3000))
    tok = _WordTokenizer()
    n_ctx = 4096
    ct = calibrate.build_calibration_text(tok, n_ctx, haystack=hay, haystack_name="lorem", seed=3)
    slack = max(8, min(64, n_ctx // 128))
    assert n_ctx - slack <= len(ct.tokens) <= n_ctx
    assert tok.decode(ct.tokens) == ct.text
    assert len(ct.facts) == len(ct.episodes) == calibrate.default_n_facts(n_ctx) == 4
    assert ct.name.startswith("lorem + 4 planted facts")
    asked = []
    for ep in ct.episodes:
        prompt = tok.decode(ct.tokens[:ep.end])
        answer = tok.decode([ct.tokens[q] for q in ep.probes])
        assert prompt.endswith("?\nA:") and np.array_equal(ep.probes, np.arange(ep.end, ep.end + ep.probes.size))
        assert re.fullmatch(r" \d{7}\.", answer), answer
        m = re.fullmatch(r"What is the (.+) for (.+)\?\nA:", prompt.rsplit("Q: ", 1)[1])
        assert m, prompt[-80:]
        asked.append(m.group(2))
        # the fact is planted once in the document, before the questions
        doc = ct.text[:ct.text.index("Answer each question")]
        assert doc.count(f"The {m.group(1)} for {m.group(2)} is{answer}") == 1
    assert sorted(asked) == sorted(f[0] for f in ct.facts)
    depths = [f[3] for f in ct.facts]
    assert min(depths) < 0.1 and max(depths) > 0.9
    # deterministic; another seed, other facts
    again = calibrate.build_calibration_text(_WordTokenizer(), n_ctx, haystack=hay, haystack_name="lorem", seed=3)
    assert again.text == ct.text
    other = calibrate.build_calibration_text(_WordTokenizer(), n_ctx, haystack=hay, seed=4)
    assert other.facts != ct.facts
    with pytest.raises(calibrate.CalibrationError, match="fewer"):
        calibrate.build_calibration_text(_WordTokenizer(), n_ctx, haystack=hay[:5000])


def test_calib_tool_and_version_of_the_final_mode():
    calibrate = pytest.importorskip("tca_ggml.calibrate")
    from tca_ggml import __version__, gguf_meta as gm
    assert calibrate.calib_tool_string("final", n_obs=32, n_whole=4) == \
        f"tca_ggml {__version__} (final, n_obs 32, whole 4)"
    for bad in (dict(n_obs=0), dict(n_whole=-1), dict(n_facts=99), dict(mode="hold")):
        with pytest.raises(calibrate.CalibrationError):
            calibrate.calibrate("/nonexistent.gguf", **bad)
    b = gm.make_random_budgets(2, 2, block_size=16, window=32)
    assert b.version == 2 and gm.KNOWN_VERSIONS == (1, 2)
    b.version = 1
    b.validate()
    b.version = 3
    with pytest.raises(gm.TCAMetadataError, match="version"):
        b.validate()
