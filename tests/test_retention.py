"""Retention policies (docs/design.md "Retention"): the hold tier's bookkeeping, recall of rows a
first prompt's selection dropped by a second prompt, the hold tier's type, states and parameter
errors. Small model, forced densities, small windows: fast."""
import numpy as np
import pytest

from tca_ggml import ContextError, Llama, TCAConfigError, texts
from tca_ggml.llama import GGML_TYPE_Q8_0

KW = dict(n_ctx=2048, n_batch=256, n_ubatch=256, n_threads=2, verbose=False, tca=True, tca_density=0.2,
          tca_window=256, tca_block=64)


@pytest.fixture(scope="module")
def doc_tokens(smol_model):
    with Llama(smol_model, vocab_only=True, verbose=False) as tok:
        toks = tok.tokenize(texts.haystack(9000).encode(), add_bos=True)
    assert len(toks) > 1500
    return toks


def _held_positions(llm, n_layer, n_kv):
    return {(l, g): set(llm.tca_retained_positions(l, g).tolist()) for l in range(n_layer) for g in range(n_kv)}


def test_hold_tier_bookkeeping(smol_model, doc_tokens):
    toks = doc_tokens[:1200]
    with Llama(smol_model, **KW) as llm:
        llm.eval_prompt(toks)
        st = llm.tca_stats()
        assert st["retention"] == "hold" and st["n_final"] == 1
        assert st["rows_held"] == len(toks) * len(set(zip(st["layer"], st["kv_head"])))
        # the hold tier is dense-sized (same K/V type); the fast tier follows the budget
        assert st["bytes_hold"] == pytest.approx(st["bytes_dense"], rel=0.03)  # + positions (f32 a row)
        assert st["bytes_fast"] < 0.8 * st["bytes_dense"]
        assert 0 < st["rows_kept"] < st["rows_held"]
        # decode steps are not prompt ends: no new final selection (the same prompt again is one:
        # its last ubatch is evaluated again, test_same_prompt_twice_gives_the_same_answer)
        for t in llm.generate_tokens(toks, 8, temperature=0):
            pass
        assert llm.tca_stats()["n_final"] == 2
    with Llama(smol_model, **KW, tca_retention="stream") as llm:
        llm.eval_prompt(toks)
        st = llm.tca_stats()
        assert st["retention"] == "stream" and st["n_final"] == 0 and st["bytes_hold"] == 0 and st["rows_held"] == 0


def test_second_prompt_recalls_rows_the_first_selection_dropped(smol_model, doc_tokens):
    """Turn 2's final selection is made over every row ever seen: positions of turn 1's document
    that turn 1's selection evicted come back when turn 2's queries want them (on 'stream' an
    evicted row never returns)."""
    first, second = doc_tokens[:1200], doc_tokens[1200:1500]
    with Llama(smol_model, **KW) as llm:
        llm.eval_prompt(first)
        n_layer = int(max(llm.tca_stats()["layer"])) + 1
        n_kv = int(max(llm.tca_stats()["kv_head"])) + 1
        after1 = _held_positions(llm, n_layer, n_kv)
        llm.eval_prompt(first + second)          # prefix reuse: only `second` is evaluated
        assert llm.tca_stats()["n_final"] == 2
        after2 = _held_positions(llm, n_layer, n_kv)
    recalled = sum(len({p for p in after2[h] if p < len(first)} - after1[h]) for h in after1)
    assert recalled > 0
    with Llama(smol_model, **KW, tca_retention="stream") as llm:
        llm.eval_prompt(first)
        s1 = _held_positions(llm, n_layer, n_kv)
        llm.eval_prompt(first + second)
        s2 = _held_positions(llm, n_layer, n_kv)
    assert all({p for p in s2[h] if p < len(first)} <= s1[h] for h in s1)


def test_q8_0_hold_tier(smol_model, doc_tokens):
    toks = doc_tokens[:1200]
    with Llama(smol_model, **KW) as llm:
        ref = llm.eval_logits(toks)
        f16 = llm.tca_stats()
    with Llama(smol_model, **KW, tca_hold_type=GGML_TYPE_Q8_0) as llm:
        lg = llm.eval_logits(toks)
        q8 = llm.tca_stats()
    assert q8["bytes_hold"] < 0.6 * f16["bytes_hold"]
    # the last ubatch reads q8_0 rows: close to the f16 hold tier, not equal
    cos = float(np.dot(ref, lg) / np.linalg.norm(ref) / np.linalg.norm(lg))
    assert cos > 0.99 and int(np.argmax(ref)) == int(np.argmax(lg))


def test_state_carries_the_hold_tier(smol_model, doc_tokens):
    toks = doc_tokens[:1200]
    with Llama(smol_model, **KW) as a:
        a.eval_prompt(toks)
        st = a.save_state()
        want = list(a.generate_tokens(toks, 8, temperature=0))
        more = toks + want
        a.eval_prompt(more + doc_tokens[1200:1400])   # a second prompt: needs the hold tier
        pos_a = a.tca_retained_positions(5, 0).tolist()
    with Llama(smol_model, **KW) as b:
        b.load_state(st)
        assert b.tca_stats()["rows_held"] == a_rows_held(st, b)
        got = list(b.generate_tokens(toks, 8, temperature=0))
        assert got == want
        b.eval_prompt(more + doc_tokens[1200:1400])
        assert b.tca_retained_positions(5, 0).tolist() == pos_a
    with Llama(smol_model, **KW, tca_retention="stream") as c:
        with pytest.raises(ContextError):
            c.load_state(st)


def a_rows_held(st, llm):
    s = llm.tca_stats()
    return st.n_tokens * len(s["layer"])


@pytest.mark.parametrize("kw,exc", [(dict(tca_retention="lazy"), ValueError), (dict(tca_obs=0), ValueError),
                                    (dict(tca_obs=1.5), TypeError), (dict(tca_whole=-1), ValueError),
                                    (dict(tca_hold_type=2), ValueError), (dict(tca_prefill="full"), ValueError),
                                    (dict(tca_prefill="dense", tca_retention="stream"), ValueError)])
def test_retention_parameter_errors(smol_model, kw, exc):
    with pytest.raises(exc):
        Llama(smol_model, **KW, **kw)


def test_retention_parameters_need_tca(smol_model):
    with pytest.raises(TCAConfigError):
        Llama(smol_model, n_ctx=512, verbose=False, tca_retention="stream")


def test_whole_blocks_fit_the_fast_tier(smol_model, doc_tokens):
    """The fast tier is sized for the final selection's n_whole whole blocks: many whole blocks at
    a small density kept every one of them (before the sizing counted them, this overflowed the
    fast tier inside llama_decode and aborted the process)."""
    toks = doc_tokens[:1900]
    kw = dict(KW, tca_density=0.05, tca_whole=16)
    with Llama(smol_model, **kw) as llm:
        llm.eval_prompt(toks)
        st = llm.tca_stats()
        assert st["n_final"] == 1
        n_aged = (len(toks) - 256) // 64
        assert n_aged > 16
        # per head: at least the 16 whole blocks and the live window
        assert (st["retained"] >= 16 * 64 + 256).all()
        assert (st["retained"] < len(toks)).all()
        for _ in llm.generate_tokens(toks, 4, temperature=0):
            pass


def test_dense_prefill_is_dense_until_the_prompt_ends(smol_model, doc_tokens):
    """tca_prefill="dense": every ubatch of a prompt attends every held row, so the prompt's last
    logits are those of TCA at density 1.0 (nothing evicted, same kernel and row order: equal up to
    rounding) and close to upstream dense's, far closer than the sparse prefill's; the budgets still
    apply from the prompt's end (same rows kept as sparse's count)."""
    toks = doc_tokens[:1200]
    kw = dict(KW, tca_density=0.05)

    def nmse(a, b):
        return float(np.mean((a - b) ** 2) / np.mean(b ** 2))

    with Llama(smol_model, **{k: v for k, v in kw.items() if not k.startswith("tca")}) as llm:
        llm.eval_prompt(toks)
        ref = np.asarray(llm._logits_last(), dtype=np.float64)
    with Llama(smol_model, **dict(kw, tca_density=1.0)) as llm:
        llm.eval_prompt(toks)
        full = np.asarray(llm._logits_last(), dtype=np.float64)
        assert llm.tca_stats()["rows_kept"] >= 0.999 * llm.tca_stats()["rows_held"]   # (almost) nothing evicted
    out = {}
    for prefill in ("sparse", "dense", "early"):
        with Llama(smol_model, **kw, tca_prefill=prefill) as llm:
            llm.eval_prompt(toks)
            lg = np.asarray(llm._logits_last(), dtype=np.float64)
            st = llm.tca_stats()
            assert st["prefill"] == prefill and st["n_final"] == 1
            assert ("dense prefill" in st["label"]) == (prefill != "sparse")
            out[prefill] = (lg, st)
            for _ in llm.generate_tokens(toks, 4, temperature=0):
                pass
    (lg_d, st_d), (lg_s, st_s), (lg_e, st_e) = out["dense"], out["sparse"], out["early"]
    # "early": the first half of the layers dense, the rest sparse: neither of the two (on this tiny
    # model its logits are not closer to dense's than sparse's: NMSE 2.0e-4 vs 1.2e-4)
    assert nmse(lg_e, full) > 1e-7 and nmse(lg_e, lg_s) > 1e-7
    assert st_e["rows_kept"] == pytest.approx(st_s["rows_kept"], rel=0.01)
    assert nmse(lg_d, full) < 1e-10, nmse(lg_d, full)
    assert nmse(lg_s, full) > 1e-7, nmse(lg_s, full)     # the sparse prefill is not dense
    assert nmse(lg_d, ref) < 1e-3                         # upstream's flash-vs-TCA-kernel band
    # what stays after the prompt follows the budgets either way (a block holding the sinks has fewer
    # candidates than its rank's k: which block that is moves the count by a few rows)
    assert st_d["rows_kept"] == pytest.approx(st_s["rows_kept"], rel=0.01)
    assert st_d["rows_kept"] < st_d["rows_held"]
    assert st_d["bytes_resident"] < 0.5 * st_d["bytes_dense"]


def test_logits_on_every_chunk_make_one_prompt_end(smol_model, doc_tokens):
    """llama-cli and llama-bench decode a prompt in n_batch chunks and ask for the logits of each
    chunk's last token. Such a token is a prompt end only if the prompt stops there: a chunk
    followed by more of the prompt compacts as any prefill ubatch, and the final selection runs
    once, at the real end. With dense prefill (every ubatch attends the hold tier either way) the
    chunked prompt gives the kept rows and logits of the one-call prompt; before, every chunk ran a
    final selection (n_final 5 for 5 chunks)."""
    toks = doc_tokens[:1200]
    kw = dict(KW, tca_prefill="dense")
    with Llama(smol_model, **kw) as llm:
        llm.eval_prompt(toks)
        one = np.asarray(llm._logits_last(), dtype=np.float64)
        st = llm.tca_stats()
        n_layer, n_kv = int(max(st["layer"])) + 1, int(max(st["kv_head"])) + 1
        kept_one = _held_positions(llm, n_layer, n_kv)
    with Llama(smol_model, **kw) as llm:
        for off in range(0, len(toks), 256):          # logits asked for at every chunk's last token
            llm._decode(toks[off: off + 256], off, want_last_logits=True)
        chunked = np.asarray(llm._logits_last(), dtype=np.float64)
        assert llm.tca_stats()["n_final"] == 1
        assert _held_positions(llm, n_layer, n_kv) == kept_one
    np.testing.assert_allclose(chunked, one, rtol=0, atol=1e-5)
    # the default prefill: one final selection too, and then decode as usual
    with Llama(smol_model, **KW) as llm:
        for off in range(0, len(toks), 256):
            llm._decode(toks[off: off + 256], off, want_last_logits=True)
        assert llm.tca_stats()["n_final"] == 1
        for _ in llm.generate_tokens(toks, 4, temperature=0):   # the same prompt: one prompt end more
            pass
        assert llm.tca_stats()["n_final"] == 2


def test_prompt_after_truncation_equals_a_fresh_prompt(smol_model, doc_tokens):
    """A prompt re-evaluated after the cache was cut back to its first token (another prompt ran in
    between) is cut into the same ubatches as a fresh one (batches start at multiples of n_ubatch),
    so the sparse prefill compacts at the same places: same logits, same kept rows."""
    a = doc_tokens[:1400]
    b = doc_tokens[:1] + doc_tokens[2000:3300]
    with Llama(smol_model, **KW) as llm:
        fresh = llm.eval_logits(a)
        n_layer = int(max(llm.tca_stats()["layer"])) + 1
        n_kv = int(max(llm.tca_stats()["kv_head"])) + 1
        kept_fresh = _held_positions(llm, n_layer, n_kv)
        llm.eval_prompt(b)
        assert llm.eval_prompt(a) == 1                  # only the first token reused
        again = llm._logits_last()
        kept_again = _held_positions(llm, n_layer, n_kv)
    assert kept_again == kept_fresh
    np.testing.assert_allclose(again, fresh, rtol=0, atol=1e-4)


@pytest.mark.parametrize("n_prompt", [1400, 1290])   # the last ubatch: 120 tokens / 10 (< n_obs 32)
def test_same_prompt_twice_gives_the_same_answer(smol_model, doc_tokens, n_prompt):
    """The same prompt again after a generation (the cache holds all of it): its end is a prompt
    end again -- the last ubatch attends every held row and its queries make the final selection --
    so greedy tokens, logits and kept rows equal the first time's. Re-evaluating only the last token
    (what a dense cache needs) made it a decode step over the kept rows: other tokens."""
    p = doc_tokens[:n_prompt]
    with Llama(smol_model, **KW) as llm:
        first = list(llm.generate_tokens(p, 12, temperature=0))
        reused = llm.eval_prompt(p)                     # a fresh evaluation's last ubatch again
        assert reused == min((n_prompt - 1) // 256 * 256, n_prompt - 32)   # >= n_obs queries at the end
        logits_again = llm._logits_last()
        second = list(llm.generate_tokens(p, 12, temperature=0))
    with Llama(smol_model, **KW) as fresh:
        logits_fresh = fresh.eval_logits(p)
    assert second == first
    np.testing.assert_allclose(logits_again, logits_fresh, rtol=0, atol=1e-4)


@pytest.mark.parametrize("n_prompt", [1281, 1290, 1400, 20])
def test_prompt_end_has_n_obs_queries(smol_model, doc_tokens, n_prompt):
    """The final selection is made by the prompt's last n_obs queries: a prompt whose last ubatch
    would be shorter (1281 = 5 x 256 + 1: one query) is cut so that it has n_obs tokens; a follow-up
    of 3 new tokens re-evaluates cached ones to have them too. A prompt shorter than n_obs has all
    its tokens."""
    p = doc_tokens[:n_prompt]
    with Llama(smol_model, **dict(KW, n_ctx=2048)) as llm:
        llm.eval_prompt(p)
        st = llm.tca_stats()
        want = min(32, n_prompt)
        if st["frontier"]:   # a selection ran (the prompt reaches past the window)
            assert st["n_obs_last"] == want and st["n_final"] == 1
        q = doc_tokens[:n_prompt + 3]
        assert llm.eval_prompt(q) == max(0, len(q) - 32)
        st = llm.tca_stats()
        if st["frontier"]:
            assert st["n_obs_last"] == min(32, len(q))
    with Llama(smol_model, **dict(KW, tca_obs=64)) as llm:
        llm.eval_prompt(doc_tokens[:1281])
        assert llm.tca_stats()["n_obs_last"] == 64


def test_hold_decode_attends_every_row_for_the_first_steps(smol_model, doc_tokens):
    """tca_hold_decode=N: the first N decode steps after a prompt's end attend every held row (the
    answer's start copies from the prompt), later ones the kept rows. With a dense prefill the
    reference is TCA at density 1.0 (nothing evicted, same kernel): equal up to rounding for N
    steps, then not; with N = 0 the first step already differs; with N = -1 every step is equal."""
    toks = doc_tokens[:1200]
    N = 6

    def nmse(a, b):
        return float(np.mean((a - b) ** 2) / np.mean(b ** 2))

    def steps(llm, n):   # the logits of n greedy decode steps after the prompt
        llm.eval_prompt(toks)
        out, tok = [], int(llm._logits_last().argmax())
        for _ in range(n):
            llm._decode([tok], len(llm._tokens))
            lg = np.asarray(llm._logits_last(), dtype=np.float64)
            out.append(lg)
            tok = int(lg.argmax())
        return out

    with Llama(smol_model, **dict(KW, tca_density=1.0, tca_prefill="dense")) as llm:
        full = steps(llm, N + 4)
    with Llama(smol_model, **dict(KW, tca_density=0.05, tca_prefill="dense", tca_hold_decode=N)) as llm:
        hd = steps(llm, N + 4)
        st = llm.tca_stats()
        assert st["hold_decode"] == N and st["rows_kept"] < 0.75 * st["rows_held"]   # evicted
    with Llama(smol_model, **dict(KW, tca_density=0.05, tca_prefill="dense", tca_hold_decode=0)) as llm:
        h0 = steps(llm, 2)
    for i in range(N):
        assert nmse(hd[i], full[i]) < 1e-10, (i, nmse(hd[i], full[i]))
    for i in range(N, N + 4):
        assert nmse(hd[i], full[i]) > 1e-7, i
    assert nmse(h0[0], full[0]) > 1e-7
    with Llama(smol_model, **KW) as llm:
        # the default (TCA_HOLD_DECODE_AUTO): every step with the KV cache on the CPU, 32 on a GPU
        assert llm.tca_stats()["hold_decode"] == -1
    with Llama(smol_model, **dict(KW, tca_hold_decode=-2)) as llm:   # auto, asked for by name
        assert llm.tca_stats()["hold_decode"] == -1
    # -1: every decode step attends every held row (decode fidelity first): all steps equal full
    with Llama(smol_model, **dict(KW, tca_density=0.05, tca_prefill="dense", tca_hold_decode=-1)) as llm:
        ha = steps(llm, N + 4)
        assert llm.tca_stats()["hold_decode"] == -1
    for i in range(N + 4):
        assert nmse(ha[i], full[i]) < 1e-10, (i, nmse(ha[i], full[i]))
    for bad in (-3, 1 << 21):
        with pytest.raises(TCAConfigError, match="tca_hold_decode"):
            Llama(smol_model, **dict(KW, tca_hold_decode=bad))


def test_final_selection_waits_for_the_ubatch_that_reads_it(smol_model, doc_tokens):
    """A prompt's final selection (the kept set, from the hold tier) is not read by decode steps
    that attend the hold tier, so it runs before the first ubatch that reads it: a step after the
    hold-decode steps, the next prompt, or a flush (statistics). The logits are those of the eager
    order (statistics after every step force the selection at once), the kept rows after a
    follow-up prompt too; n_final_lazy counts the deferred selections. The wait ends at the latest
    before the step that ages a block after the prompt's end (the fast tier never overflows)."""
    toks, more = doc_tokens[:1200], doc_tokens[1200:1300]

    def run(hold_decode, n, eager):
        with Llama(smol_model, **dict(KW, tca_density=0.05, tca_hold_decode=hold_decode)) as llm:
            llm.eval_prompt(toks)
            if eager:
                llm.tca_stats()
            out, tok = [], int(llm._logits_last().argmax())
            for _ in range(n):
                llm._decode([tok], len(llm._tokens))
                lg = np.asarray(llm._logits_last(), dtype=np.float64)
                out.append(lg)
                tok = int(lg.argmax())
                if eager:
                    llm.tca_stats()
            st1 = llm.tca_stats()
            llm.eval_prompt(list(llm._tokens) + more)   # a follow-up prompt on the same context
            out.append(np.asarray(llm._logits_last(), dtype=np.float64))
            st2 = llm.tca_stats()
            n_layer, n_kv = int(max(st2["layer"])) + 1, int(max(st2["kv_head"])) + 1
            return out, st1, st2, _held_positions(llm, n_layer, n_kv)

    # -1 over 80 steps: a block ages after the prompt's end (window 256, block 64), so the deferred
    # selection runs before that step and the decode rule after it, as in the eager order
    for hd, n in ((-1, 80), (3, 6)):
        lazy, st1, st2, kept = run(hd, n, eager=False)
        eager, e1, e2, kept_e = run(hd, n, eager=True)
        assert st1["n_final"] == 1 and st1["n_final_lazy"] == 1, (hd, st1["n_final_lazy"])
        assert e1["n_final"] == 1 and e1["n_final_lazy"] == 0
        assert st2["n_final"] == 2 and st2["n_final_lazy"] == 1 and st2["n_obs_last"] == e2["n_obs_last"]
        for i, (a, b) in enumerate(zip(lazy, eager)):
            np.testing.assert_array_equal(a, b, err_msg=f"hold_decode={hd} step {i}")
        assert kept == kept_e
        assert st2["rows_kept"] < 0.75 * st2["rows_held"]   # the selection evicted rows
    # without hold-decode steps the first step reads the kept set: the selection runs before it
    _, st1, _, _ = run(0, 2, eager=False)
    assert st1["n_final"] == 1 and st1["n_final_lazy"] == 0


def test_refresh_after_the_hold_decode_steps_is_their_final_selection(smol_model, doc_tokens, monkeypatch):
    """After the last hold-decode step the kept set is selected again from every held row, by the
    queries of the hold-decode steps (TCA_GGML_REFRESH=1, an experiment: off by default). Reference: the prompt end a
    prompt of the same tokens makes -- the document, then the tokens those steps decoded, its last
    n_obs queries being theirs -- with every prefill ubatch attending every row (tca_prefill="dense"),
    so that both compute the same K/V and queries: the same kept rows (up to near-ties of the
    batched vs one-token arithmetic). Off, there is no second selection."""
    toks = doc_tokens[:1200]
    N = 8
    kw = dict(KW, tca_density=0.1, tca_prefill="dense", tca_hold_decode=N, tca_obs=N)
    monkeypatch.setenv("TCA_GGML_REFRESH", "1")

    def kept(llm):
        st = llm.tca_stats()
        return st, {(l, g): set(llm.tca_retained_positions(l, g).tolist())
                    for l, g in zip(st["layer"].tolist(), st["kv_head"].tolist())}

    with Llama(smol_model, **kw) as llm:
        llm.eval_prompt(toks)
        fed, tok = [], int(llm._logits_last().argmax())
        for _ in range(N):
            fed.append(tok)
            llm._decode([tok], len(llm._tokens))
            tok = int(llm._logits_last().argmax())
        st1, p1 = kept(llm)
    assert st1["n_refresh"] == 1 and st1["n_final"] == 1 and st1["n_seen"] == len(toks) + N
    with Llama(smol_model, **kw) as llm:
        llm.eval_prompt(toks + fed)
        st2, p2 = kept(llm)
    assert st2["n_refresh"] == 0 and st2["n_final"] == 1 and st2["n_seen"] == st1["n_seen"]
    same = sum(len(p1[h] & p2[h]) for h in p1)
    total = sum(len(p2[h]) for h in p2)
    assert same / total >= 0.97, same / total
    monkeypatch.delenv("TCA_GGML_REFRESH")   # the default: off
    with Llama(smol_model, **kw) as llm:
        llm.eval_prompt(toks)
        for t in fed:
            llm._decode([t], len(llm._tokens))
        st3, p3 = kept(llm)
    assert st3["n_refresh"] == 0
    # without it the rows after the prompt are the prompt's selection: not the reference's
    assert sum(len(p3[h] & p2[h]) for h in p2) / total < same / total



@pytest.mark.slow
def test_decode_recall_brings_the_step_close_to_full_attention(smol_model, doc_tokens, monkeypatch):
    """TCA_GGML_RECALL=r (an experiment, off by default): each decode step after the hold-decode
    steps also attends, per KV head, the r held rows outside its fast tier that its own query scores
    highest. Reference: TCA at density 1.0 (nothing evicted, same kernel), the same tokens fed to
    every run (teacher forcing: no run drifts onto other tokens). With r at least the rows a head
    evicted, every held row is attended again: the steps come close to full attention (not bit-equal:
    the recalled rows are summed after the fast tier's, in score order, and this small model's first
    layers amplify that rounding -- layers 2-29 alone give bit-equal logits, measured); a small r lands
    in between, closer with more rows. Measured (sum of the logits' NMSE over 10 steps): no recall
    0.068, r=4 0.041, r=16 0.012, every row 0.0096; by blocks of 16 rows: 4 blocks 0.027, all 0.012."""
    toks = doc_tokens[:1200]
    N, S = 2, 10

    def nmse(a, b):
        return float(np.mean((a - b) ** 2) / np.mean(b ** 2))

    def steps(kw, recall=None, feed=None):
        monkeypatch.delenv("TCA_GGML_RECALL", raising=False)
        monkeypatch.delenv("TCA_GGML_RECALL_BLOCKS", raising=False)
        if isinstance(recall, str):     # "bK": by blocks of 16 rows, K blocks
            monkeypatch.setenv("TCA_GGML_RECALL_BLOCKS", recall[1:])
        elif recall is not None:
            monkeypatch.setenv("TCA_GGML_RECALL", str(recall))
        with Llama(smol_model, **kw) as llm:
            llm.eval_prompt(toks)
            out, fed, tok = [], [], int(llm._logits_last().argmax())
            for i in range(N + S):
                tok = feed[i] if feed is not None else tok
                fed.append(tok)
                llm._decode([tok], len(llm._tokens))
                lg = np.asarray(llm._logits_last(), dtype=np.float64)
                out.append(lg)
                tok = int(lg.argmax())
            st = llm.tca_stats()
        return out, fed, st

    full, fed, _ = steps(dict(KW, tca_density=1.0, tca_prefill="dense"))
    sparse = dict(KW, tca_density=0.05, tca_prefill="dense", tca_hold_decode=N)
    gap = {}
    for r in (None, 4, 16, 1024, "b4", "b128"):   # 1024 > any head's evicted rows (1200 tokens, window 256)
        out, _, st = steps(sparse, r, fed)
        assert st["rows_kept"] < 0.6 * st["rows_held"]   # most rows evicted
        for i in range(N):   # the hold-decode steps attend every row, recall or not
            assert nmse(out[i], full[i]) < 1e-10
        gap[r] = sum(nmse(out[i], full[i]) for i in range(N, N + S))
    assert gap[1024] < 0.25 * gap[None], gap
    assert gap[16] < 0.5 * gap[None], gap
    assert gap[4] < gap[None], gap
    # by blocks (TCA_GGML_RECALL_BLOCKS=kb): every block (128 x 16 rows = n_ctx) is every row again;
    # 4 blocks, ranked by Quest's bound on per-block K summaries, land in between
    assert gap["b128"] < 0.25 * gap[None], gap
    assert gap["b4"] < gap[None], gap
    monkeypatch.setenv("TCA_GGML_RECALL", "-1")
    with pytest.raises(TCAConfigError, match="TCA_GGML_RECALL"):
        Llama(smol_model, **sparse)
    monkeypatch.setenv("TCA_GGML_RECALL", "8")
    monkeypatch.setenv("TCA_GGML_RECALL_BLOCKS", "8")
    with pytest.raises(TCAConfigError, match="exclude each other"):
        Llama(smol_model, **sparse)
    monkeypatch.delenv("TCA_GGML_RECALL")
    monkeypatch.setenv("TCA_GGML_RECALL_BS", "12")
    with pytest.raises(TCAConfigError, match="power of 2"):
        Llama(smol_model, **sparse)
