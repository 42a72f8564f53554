"""`tca-ggml run` and `tca-ggml chat` (python/tca_ggml/cli.py), run as a user runs them: a
subprocess, the prompt on the command line or the chat on stdin, the text on stdout (timings and
TCA's figures on stderr). On a tiny random-weight GGUF with TCA on at a forced density and a small
window / block (every prompt is compacted); greedy, so stdout must be exactly what
tca_ggml.Llama gives in-process with the same settings.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from _helpers import tiny_gguf

N_CTX = 1024
TCA_ARGS = ["--tca-density", "0.25", "--tca-window", "64", "--tca-block", "16"]
TCA_KW = dict(tca=True, tca_density=0.25, tca_window=64, tca_block=16)
PROMPT = "9 " + " ".join(f"w{(k * 13) % 89}" for k in range(60))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_gguf(tmp_path_factory, "cli", seed=11)


def _cli(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "tca_ggml.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def _llama(model):
    from tca_ggml import Llama
    return Llama(model, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False, chat_format="chatml", **TCA_KW)


def test_run_streams_the_completion(tiny):
    r = _cli("run", "-m", tiny, "-p", PROMPT, "-n", "12", "--temp", "0", "-c", str(N_CTX), "-t", "1", "-tb", "1",
             *TCA_ARGS)
    assert r.returncode == 0, r.stderr
    with _llama(tiny) as llm:
        want = llm(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert r.stdout == want + "\n"
    m = re.search(r"\[12 tokens, .* TCA kept ([0-9.]+) of (\d+) rows a head", r.stderr)
    assert m and float(m.group(1)) < 1, r.stderr   # compacted: below the whole sequence


def test_run_bad_input(tiny, tmp_path):
    r = _cli("run", "-m", str(tmp_path / "none.gguf"), "-p", "hi")
    assert r.returncode == 2 and "model not found" in r.stderr
    r = _cli("run", "-m", tiny)
    assert r.returncode == 2 and "-p" in r.stderr
    r = _cli("run", "-m", tiny, "-p", "hi", "--tca-density", "1.5")
    assert r.returncode == 2 and "tca_density" in r.stderr and "Traceback" not in r.stderr
    r = _cli("run", "-m", tiny, "-p", "x " * 600, "-c", "256", "-t", "1")
    assert r.returncode == 2 and "exceed context window" in r.stderr


def test_chat_history_reset_exit(tiny):
    stdin = f"{PROMPT}\nand then?\n/nope\n/reset\n{PROMPT}\n/exit\nnever read\n"
    r = _cli("chat", "-m", tiny, "-n", "8", "--temp", "0", "-c", str(N_CTX), "-t", "1", "-tb", "1",
             "--chat-format", "chatml", *TCA_ARGS, stdin=stdin)
    assert r.returncode == 0, r.stderr
    with _llama(tiny) as llm:   # the same conversation in one context, in-process
        msgs = [{"role": "user", "content": PROMPT}]
        a = llm.create_chat_completion(msgs, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
        msgs += [{"role": "assistant", "content": a}, {"role": "user", "content": "and then?"}]
        b = llm.create_chat_completion(msgs, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
    assert r.stdout == f"{a}\n{b}\n{a}\n"   # after /reset the first answer again
    assert "[history cleared]" in r.stderr and "unknown command /nope" in r.stderr
    cached = [int(x) for x in re.findall(r"prompt \d+ new \+ (\d+) cached", r.stderr)]
    assert len(cached) == 3 and cached[1] > 0 and cached[2] == 0   # turn 2 reuses turn 1's cache


def test_chat_ends_at_eof_and_serve_help(tiny):
    r = _cli("chat", "-m", tiny, "-n", "4", "-c", "512", "-t", "1", "--chat-format", "chatml", stdin="hello\n")
    assert r.returncode == 0 and r.stdout.count("\n") >= 1, r.stderr
    r = _cli("serve", "--help")
    assert r.returncode == 0 and "--parallel" in r.stdout and "--tca-density" in r.stdout
