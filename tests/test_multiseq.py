"""Many sequences in one context (issue 16; native/llama/llama-tca-seqs.h): n_seq_max > 1 gives each
sequence its own retention memory of n_ctx / n_seq_max tokens; a ubatch is cut by sequence and every
sequence's tokens attend only that sequence's rows, all in one graph. The reference is each prompt
alone in a one-sequence context of the same per-sequence size: the same greedy tokens and the same
retained rows (the per-sequence policy -- prompt end, final selection, hold decode, decode rule --
is the one-sequence policy). Small model, forced density, small window: the prompts are 4-5x the
window, so rows are evicted."""
import numpy as np
import pytest

from tca_ggml import ContextOverflowError, Llama, texts

KW = dict(n_batch=256, n_ubatch=256, n_threads=2, verbose=False, tca=True, tca_density=0.2, tca_window=256,
          tca_block=64)
N_SEQ, N_CTX_SEQ, N_GEN = 4, 2048, 40   # N_GEN > tca_hold_decode (32): the decode rule runs too


@pytest.fixture(scope="module")
def prompts(smol_model):
    with Llama(smol_model, vocab_only=True, verbose=False) as tok:
        toks = tok.tokenize(texts.haystack(12000).encode(), add_bos=True)
    # different lengths, so the sequences reach their prompt ends, frontiers and compactions at
    # different steps, and sequences end at different times
    return [toks[:1000], toks[500:1700], toks[1000:1900], toks[200:1500]]


@pytest.fixture(scope="module")
def alone(smol_model, prompts):
    """Each prompt alone: greedy tokens and per-sequence statistics."""
    out = []
    for p in prompts:
        with Llama(smol_model, n_ctx=N_CTX_SEQ, **KW) as llm:
            toks = list(llm.generate_tokens(p, N_GEN, temperature=0))
            out.append((toks, llm.tca_stats()))
    return out


@pytest.mark.slow
def test_sequences_decoded_together_equal_each_alone(smol_model, prompts, alone):
    with Llama(smol_model, n_ctx=N_SEQ * N_CTX_SEQ, n_seq_max=N_SEQ, **KW) as llm:
        outs = llm.generate_batch(prompts, N_GEN)
        per_seq = [llm.tca_stats(seq=i) for i in range(N_SEQ)]
        total = llm.tca_stats()
    for i, (toks, st) in enumerate(alone):
        assert outs[i] == toks, f"sequence {i}"
        # memory per sequence follows the budgets: the same rows as the one-sequence context
        assert per_seq[i]["rows_kept"] == st["rows_kept"] and per_seq[i]["rows_cap"] == st["rows_cap"]
        assert per_seq[i]["n_seen"] == st["n_seen"] == len(prompts[i]) + N_GEN - 1
        assert per_seq[i]["bytes_alloc"] == st["bytes_alloc"]
        assert 0 < per_seq[i]["rows_kept"] < per_seq[i]["rows_held"]   # rows were evicted
        assert per_seq[i]["n_final"] == 1
    assert total["rows_kept"] == sum(s["rows_kept"] for s in per_seq)
    assert total["n_seen"] == sum(s["n_seen"] for s in per_seq)
    assert len(total["retained"]) == N_SEQ * len(alone[0][1]["retained"])  # heads, sequence after sequence


@pytest.mark.slow
def test_a_finished_sequence_frees_its_rows_for_the_next(smol_model, prompts, alone):
    """Two rounds in one context: the second round's prompts take the sequences the first round
    used (generate_batch clears them first), and give what they give alone; fewer prompts than
    sequences leave the others empty."""
    with Llama(smol_model, n_ctx=N_SEQ * N_CTX_SEQ, n_seq_max=N_SEQ, **KW) as llm:
        llm.generate_batch(prompts[2:], 8)
        outs = llm.generate_batch(prompts[::-1][:3], N_GEN)
        assert outs == [alone[3][0], alone[2][0], alone[1][0]]
        assert llm.tca_stats(seq=3)["n_seen"] == 0 and llm.tca_stats(seq=3)["rows_kept"] == 0


@pytest.mark.slow
def test_dense_sequences_decoded_together_equal_each_alone(smol_model, prompts):
    """The same API on upstream's dense KV cache (one stream a sequence)."""
    kw = {k: v for k, v in KW.items() if not k.startswith("tca")}
    ref = []
    for p in prompts[:2]:
        with Llama(smol_model, n_ctx=N_CTX_SEQ, **kw) as llm:
            ref.append(list(llm.generate_tokens(p, 12, temperature=0)))
    with Llama(smol_model, n_ctx=2 * N_CTX_SEQ, n_seq_max=2, **kw) as llm:
        assert llm.generate_batch(prompts[:2], 12) == ref


def _step(m, seqs, tok, pos):
    """One llama_decode of token `tok` at `pos` in each of `seqs`; their logits."""
    b = m._batch
    b.n_tokens = len(seqs)
    for i, s in enumerate(seqs):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, 1
        b.seq_id[i][0] = s
    assert m._L.llama_decode(m._ctx, b) == 0
    n = m.n_vocab()
    return [np.frombuffer(m._ffi.buffer(m._L.llama_get_logits_ith(m._ctx, i), 4 * n), np.float32).copy()
            for i in range(len(seqs))]


@pytest.mark.slow
def test_sequence_copy_and_state(smol_model, prompts):
    """seq_cp copies a whole sequence's retention memory (rows, positions, hold tier, the step after
    the prompt end): both then give the same next logits, which are those of the original alone. The
    context's state (every sequence) saved and loaded into a new context holds the same rows. A part
    of a sequence is not copied."""
    p = prompts[1]
    with Llama(smol_model, n_ctx=N_CTX_SEQ, **KW) as ref:
        ref._decode(list(p), 0)
        (want,) = _step(ref, [0], 42, len(p))
    with Llama(smol_model, n_ctx=2 * N_CTX_SEQ, n_seq_max=2, **KW) as llm:
        L = llm._L
        llm._decode(list(p), 0, seq_id=0)
        mem = L.llama_get_memory(llm._ctx)
        L.llama_memory_seq_cp(mem, 0, 1, 0, 100)           # a part: refused (logged), nothing copied
        assert L.llama_memory_seq_pos_max(mem, 1) == -1
        L.llama_memory_seq_cp(mem, 0, 1, -1, -1)
        assert L.llama_memory_seq_pos_max(mem, 1) == len(p) - 1
        st = [llm.tca_stats(seq=i) for i in range(2)]
        assert st[0]["rows_kept"] == st[1]["rows_kept"] > 0 and st[0]["n_seen"] == st[1]["n_seen"] == len(p)
        state = llm.save_state()
        a, b = _step(llm, [0, 1], 42, len(p))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, want)
    with Llama(smol_model, n_ctx=2 * N_CTX_SEQ, n_seq_max=2, **KW) as llm2:
        llm2.load_state(state)
        assert [llm2.tca_stats(seq=i)["rows_kept"] for i in range(2)] == [s["rows_kept"] for s in st]
        c, d = _step(llm2, [0, 1], 42, len(p))
        np.testing.assert_array_equal(c, d)


def test_parameter_errors(smol_model, prompts):
    with Llama(smol_model, n_ctx=2 * N_CTX_SEQ, n_seq_max=2, **KW) as llm:
        with pytest.raises(ValueError, match="n_seq_max"):
            llm.generate_batch(prompts[:3], 4)
        with pytest.raises(ContextOverflowError):
            llm.generate_batch([prompts[0] * 3], 4)
        with pytest.raises(ValueError, match="empty"):
            llm.generate_batch([[]], 4)
        with pytest.raises(ValueError):
            llm.generate_batch(prompts[:1], 0)
        assert llm.generate_batch([], 4) == []
        # still serving
        assert len(llm.generate_batch(prompts[:1], 3)[0]) <= 3
    with pytest.raises(ValueError):
        Llama(smol_model, n_ctx=512, n_seq_max=0, verbose=False)


@pytest.mark.slow
def test_a_long_prompt_does_not_pause_the_generating_sequences(smol_model, prompts, alone):
    """A sequence view's prompt is decoded chunk by chunk (n_batch tokens a llama_decode) and the
    decode steps of the other generating sequences run between its chunks
    (batching.Batcher.let_steps_through): a sequence keeps producing tokens while another's long
    prompt is evaluated (llama-server interleaves prompt chunks with the running slots' steps the
    same way), and both give the tokens they give alone."""
    import threading
    import time
    with Llama(smol_model, n_ctx=2 * N_CTX_SEQ, n_seq_max=2, **KW) as llm:
        va, vb = llm.sequence(0), llm.sequence(1)
        stamps, toks_a, started = [], [], threading.Event()

        def run_a():
            for t in va.generate_tokens(prompts[0], N_GEN, temperature=0):
                toks_a.append(t)
                stamps.append(time.monotonic())
                if len(toks_a) == 2:
                    started.set()
                    time.sleep(0.05)   # B's prompt has started before A asks for its next step

        th = threading.Thread(target=run_a)
        th.start()
        assert started.wait(120)
        t0 = time.monotonic()
        it = vb.generate_tokens(prompts[1], N_GEN, temperature=0)
        toks_b = [next(it)]                      # B's prompt: 1200 tokens, 5 chunks of <= 256
        t1 = time.monotonic()
        toks_b += list(it)
        th.join(120)
        during = sum(t0 < s < t1 for s in stamps)
        n_chunks = -(-len(prompts[1]) // KW["n_batch"])
        # one step of A between each two of B's chunks (each chunk is ~0.1 s of work; A asks for
        # its next step within a millisecond of the last)
        assert during >= n_chunks - 2, (during, n_chunks)
        assert toks_a == alone[0][0] and toks_b == alone[1][0]
        va.close()
        vb.close()
