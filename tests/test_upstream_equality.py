"""Greedy generation through tca_ggml.Llama equals upstream's own program.

The reference is upstream's examples/simple (llama-simple) compiled from the same pinned
sources and installed as tca_ggml/bin/tca-llama-simple. It uses flash attention 'auto'
(on, for the CPU), the greedy sampler, add_special=true, parse_special=true.
"""
import subprocess

import pytest

from tca_ggml import Llama, texts

N_PREDICT = 24


def _prompts():
    long_text = texts.haystack(15000)  # ~2.3K tokens
    return [
        ("short", "The capital of France is"),
        ("code", "def quicksort(arr):\n    \"\"\"Sort a list.\"\"\"\n"),
        pytest.param("long", long_text + "\n\nSummary of the essays above in one sentence:", marks=pytest.mark.slow),
    ]


@pytest.fixture(scope="module")
def dense(default_model):
    llm = Llama(default_model, n_ctx=4096, n_batch=512, flash_attn=True, n_threads=2,
                n_threads_batch=2, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("name,prompt", _prompts(), ids=["short", "code", "long"])
def test_greedy_identical_to_llama_simple(dense, default_model, llama_simple, name, prompt):
    toks = dense.tokenize(prompt.encode(), add_bos=True, special=True)
    if name == "long":
        assert len(toks) > 2048, len(toks)
    r = subprocess.run([str(llama_simple), "-m", default_model, "-n", str(N_PREDICT), prompt],
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    prompt_echo = b"".join(dense._piece(t, special=True) for t in toks)
    assert r.stdout.startswith(prompt_echo)
    upstream = r.stdout[len(prompt_echo):]
    assert upstream.endswith(b"\n")  # llama-simple ends with a newline of its own
    upstream = upstream[:-1]
    dense.reset()
    gen = list(dense.generate_tokens(toks, N_PREDICT, temperature=0.0))
    ours = b"".join(dense._piece(t, special=True) for t in gen)
    assert len(gen) > 0
    # llama-simple prints tokens until EOG (not printed) or n_predict: same bytes = same tokens
    assert ours == upstream, (ours, upstream)
