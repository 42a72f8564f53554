"""Fidelity of the retention policy on real weights (issue 15): a needle early in an 8K document,
a small forced window. The old rule ("stream": every prefill ubatch evicts for good what its own
last query did not read) loses the needle before the question arrives; "hold" keeps every row
until the prompt's last ubatch, which attends them all and selects what stays by its last
queries, so the answer is exact."""
import pytest

from tca_ggml import Llama, texts

NEEDLE_VALUE = "7392841"
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."


def _document(model, n_tokens, depth):
    with Llama(model, vocab_only=True, verbose=False) as tok:
        toks = tok.tokenize(texts.haystack(n_tokens * 6).encode(), add_bos=False)[:n_tokens]
        hay = tok.detokenize(toks).decode("utf-8", "ignore")
    i = hay.find(". ", int(depth * len(hay))) + 2
    return hay[:i] + f"The special magic number is {NEEDLE_VALUE}. " + hay[i:]


def _answer(model, doc, retention):
    with Llama(model, n_ctx=8192, n_threads=2, verbose=False, tca=True, tca_density=0.1, tca_window=512,
               tca_block=64, tca_retention=retention) as llm:
        r = llm.create_chat_completion([{"role": "user", "content": doc + "\n\n" + QUESTION}],
                                       max_tokens=10, temperature=0)
        return r["choices"][0]["message"]["content"], llm.tca_stats()


@pytest.mark.slow
def test_early_needle_survives_until_the_question(default_model):
    doc = _document(default_model, 7600, 0.1)
    hold, st = _answer(default_model, doc, "hold")
    assert st["n_final"] == 1 and st["rows_held"] > st["rows_kept"] > 0
    assert st["bytes_hold"] > 0 and st["bytes_fast"] < st["bytes_dense"]
    assert NEEDLE_VALUE in hold, hold
    # the old rule loses it: the test can tell the two apart
    stream, st_s = _answer(default_model, doc, "stream")
    assert st_s["n_final"] == 0 and st_s["bytes_hold"] == 0
    assert NEEDLE_VALUE not in stream, stream
