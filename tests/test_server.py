"""The OpenAI-compatible server (tca_ggml.server, docs/serving.md), driven as a user drives it.

A real server (`python -m tca_ggml.server`, a subprocess on 127.0.0.1, a free port) over a tiny
random-weight GGUF (tca_ggml.random_model "tiny": text is gibberish, greedy tokens are exact) with
TCA on at a forced density and a small window / block, so that every prompt here is compacted;
4 parallel slots. The client is the real `openai` package. Skips (with the reason) where the
`server` extra or openai is not installed; scripts/setup.sh installs them.
"""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from _helpers import tiny_gguf


def _need_server_packages():
    """The server's packages and the openai client, or a skip that says which is missing."""
    for mod, pkg in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("sse_starlette", "sse-starlette"),
                     ("openai", "openai")):
        pytest.importorskip(mod, reason=f"{pkg} not installed: the server tests need the `server` extra and "
                                        f"openai (scripts/setup.sh installs them)")


try:
    import openai
except ImportError:   # the tests that need it skip (_need_server_packages)
    openai = None

PARALLEL = 4
N_CTX = 1024
TCA = ["--tca-density", "0.25", "--tca-window", "64", "--tca-block", "16"]
# distinct prompts (no common prefix but BOS), long enough to be compacted (window 64 + block 16)
PROMPTS = [f"{i} " + " ".join(f"w{(i * 37 + k * 11) % 97}" for k in range(60)) for i in range(8)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log_path, extra=()) -> tuple:
    """(process, base url) of a started server; waits until /health answers."""
    port = _free_port()
    log = open(log_path, "wb")
    p = subprocess.Popen([sys.executable, "-m", "tca_ggml.server", "-m", model, "--port", str(port),
                          "--parallel", str(PARALLEL), "-c", str(N_CTX), "-t", "1", "-tb", "1",
                          "--chat-format", "chatml", "--alias", "tiny", *TCA, *extra],
                         stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"the server exited with {p.returncode}: {open(log_path).read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return p, url
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise RuntimeError(f"the server did not come up in 60 s: {open(log_path).read()[-2000:]}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_gguf(tmp_path_factory, "server", seed=5)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    _need_server_packages()
    d = tmp_path_factory.mktemp("log")
    p, url = start_server(tiny, d / "server.log")
    yield url
    p.terminate()
    try:
        rc = p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    log = open(d / "server.log").read()
    # uvicorn shuts down gracefully, then re-raises SIGTERM (exit status -15)
    assert rc in (0, -signal.SIGTERM) and "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def _post_raw(url: str, body: bytes):
    """(status, parsed JSON) of a POST with a raw body (malformed on purpose)."""
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        c.request("POST", u.path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def _read_data_lines(r, n: int) -> None:
    """Read a raw SSE response (chunked transfer encoding: size lines between) up to its n-th data line."""
    while n > 0:
        line = r.fp.readline()
        assert line, "the stream ended"
        n -= line.startswith(b"data: {")


def _metric(url: str, name: str) -> float:
    for line in _get(url + "/metrics")[1].splitlines():
        if line.startswith(f"tca_ggml_{name} "):
            return float(line.split()[1])
    raise KeyError(name)


def _complete(client, prompt, stream=False, max_tokens=12, **kw):
    if not stream:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.model_extra["tca"], r.usage
    text, finish, tca = [], None, None
    for ch in client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        stream=True, **kw):
        if ch.choices:
            text.append(ch.choices[0].text)
            finish = ch.choices[0].finish_reason or finish
        tca = (ch.model_extra or {}).get("tca") or tca
    return "".join(text), finish, tca, None


# ------------------------------------------------------------------ slots: contexts over one model
def test_fork_shares_the_model(tiny):
    """Llama.fork: a second context over the loaded model (the server's slots), the same greedy
    text as the source; the model outlives whichever closes first; fork(vocab_only=True) has no
    context and tokenizes while the others are busy."""
    from tca_ggml import ContextError, Llama
    a = Llama(tiny, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False, tca=True, tca_density=0.25,
              tca_window=64, tca_block=16)
    b = a.fork()
    tok = a.fork(vocab_only=True)
    assert b._model == a._model and tok._model == a._model and b.n_ctx() == N_CTX and b.tca_label == a.tca_label
    want = a(PROMPTS[0], max_tokens=10, temperature=0)["choices"][0]["text"]
    assert a.tca_stats()["n_compactions"] >= 1
    a.close()   # b and tok still hold the model
    assert b(PROMPTS[0], max_tokens=10, temperature=0)["choices"][0]["text"] == want
    assert tok.tokenize(PROMPTS[0].encode()) == b.tokenize(PROMPTS[0].encode())
    with pytest.raises(ContextError):
        tok("x", max_tokens=1)
    with pytest.raises(ValueError, match="n_gpu_layers"):
        b.fork(n_gpu_layers=1)
    with pytest.raises(TypeError, match="nope"):
        b.fork(nope=1)
    c = b.fork(n_ctx=256, tca=False)   # another context size, dense
    assert c.n_ctx() == 256 and not c.tca_stats()["active"]
    for x in (b, tok, c):
        x.close()
    with pytest.raises(ContextError):
        a.fork()


# ------------------------------------------------------------------ the API
def test_models_health_metrics(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    st, body = _get(server + "/health")
    assert st == 200 and json.loads(body)["slots_idle"] == PARALLEL
    st, text = _get(server + "/metrics")
    assert st == 200 and f"tca_ggml_slots {PARALLEL}" in text and "# TYPE tca_ggml_requests_total counter" in text


def test_completion_streamed_and_not(client):
    text, finish, tca, usage = _complete(client, PROMPTS[0])
    assert text and finish == "length" and usage.completion_tokens == 12
    assert usage.prompt_tokens > 64 + 16
    # TCA's figures of the request: active, compacted (kept share below 1), KV bytes
    assert tca["active"] is True and 0 < tca["kept_share"] < 1 and tca["n_compactions"] >= 1
    assert tca["kv_bytes"] > 0 and 0 < tca["coverage_min"] <= 1 and tca["timings"]["prompt_tokens"] == usage.prompt_tokens
    text2, finish2, tca2, _ = _complete(client, PROMPTS[0], stream=True)
    assert (text2, finish2) == (text, finish)   # greedy: the stream is the same text
    assert tca2 is not None and tca2["active"] and tca2["kept_share"] < 1


def test_chat_streamed_and_not(client):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPTS[1]}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.model_extra["tca"]["active"]
    parts, roles, tca = [], set(), None
    for ch in client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            roles.add(ch.choices[0].delta.role)
        else:
            assert ch.usage.completion_tokens == 10   # the include_usage chunk
        tca = (ch.model_extra or {}).get("tca") or tca
    assert "".join(parts) == c.message.content and "assistant" in roles and tca["active"]


def test_stop_and_seed(client):
    text, _, _, _ = _complete(client, PROMPTS[2], max_tokens=20)
    stop = text[len(text) // 2:][:3]
    if stop.strip():
        cut, finish, _, _ = _complete(client, PROMPTS[2], max_tokens=20, stop=[stop])
        assert finish == "stop" and stop not in cut and text.startswith(cut)
    ids = [510] + [ord(ch) for ch in "abc"]   # token ids (the tiny vocabulary: BOS, then bytes)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3
    a = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0.9, seed=7)
    b = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_parallel_streams_equal_each_alone(server, client):
    """8 concurrent streaming requests over 4 slots (4 wait in the queue) all complete, and with
    greedy sampling each gives the text it gives alone. The slots are sequences of one context:
    their decode steps ran batched (more than one token a llama_decode on average)."""
    alone = [_complete(client, p, max_tokens=16)[0] for p in PROMPTS]

    def batched():
        m = _get(server + "/metrics")[1]
        v = {ln.split()[0]: float(ln.split()[1]) for ln in m.splitlines() if ln.startswith("tca_ggml_batched")}
        return v["tca_ggml_batched_steps_total"], v["tca_ggml_batched_step_tokens_total"]
    s0, t0 = batched()
    got, errors = [None] * len(PROMPTS), []

    def run(i):
        try:
            got[i] = _complete(client, PROMPTS[i], stream=True, max_tokens=16)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [g[0] for g in got] == alone
    assert all(g[1] == "length" and g[2]["active"] and g[2]["kept_share"] < 1 for g in got)
    assert len({g[2]["slot"] for g in got}) > 1   # spread over the slots
    assert json.loads(_get(server + "/health")[1])["slots_processing"] == 0
    s1, t1 = batched()
    assert s1 > s0 and (t1 - t0) / (s1 - s0) > 1.2, (s1 - s0, t1 - t0)


# ------------------------------------------------------------------ bad requests leave it serving
def test_bad_requests_are_openai_errors(server, client):
    st, body = _post_raw(server + "/v1/completions", b'{"prompt": "x", ')
    assert st == 400 and body["error"]["code"] == "invalid_json" and body["error"]["type"] == "invalid_request_error"
    st, body = _post_raw(server + "/v1/chat/completions", b"[1, 2]")
    assert st == 400
    with pytest.raises(openai.BadRequestError) as e:   # a prompt over the context
        client.completions.create(model="tiny", prompt="x " * N_CTX, max_tokens=4)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    assert e.value.code == "model_not_found"
    for kw in (dict(temperature=7), dict(max_tokens=0), dict(n=2), dict(logprobs=21), dict(top_p="x"),
               dict(suffix="tail"), dict(stop=5)):
        args = dict(model="tiny", prompt="hi", max_tokens=4)
        args.update(kw)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**args)
        assert e.value.status_code == 400 and e.value.param is not None, kw
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:   # (logprobs, response_format: tests/test_api_logprobs_grammar.py)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert e.value.param == "top_logprobs"
    assert _metric(server, "requests_rejected_total") >= 12
    text, finish, _, _ = _complete(client, PROMPTS[4])   # still serving
    assert text and finish == "length"


def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = _metric(server, "requests_cancelled_total")
    u = urllib.parse.urlparse(server)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    # greedy: deterministic, and this prompt's text runs to the context's end (no end-of-text token)
    body = json.dumps({"model": "tiny", "prompt": PROMPTS[5], "max_tokens": N_CTX, "temperature": 0,
                       "stream": True})
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    _read_data_lines(r, 3)   # a few chunks, then hang up
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        if _metric(server, "requests_cancelled_total") > before and \
                json.loads(_get(server + "/health")[1])["slots_processing"] == 0:
            break
        time.sleep(0.1)
    assert _metric(server, "requests_cancelled_total") == before + 1
    assert json.loads(_get(server + "/health")[1])["slots_processing"] == 0
    text, finish, _, _ = _complete(client, PROMPTS[6])   # still serving
    assert text and finish == "length"


def test_queue_beyond_the_slots_and_leaving_it(server, client):
    """With every slot busy a request waits in the queue; one that hangs up while waiting leaves it,
    and hanging up on the running ones frees their slots."""
    u = urllib.parse.urlparse(server)

    def health():
        return json.loads(_get(server + "/health")[1])

    def wait_for(cond, what):
        deadline = time.time() + 20
        while time.time() < deadline:
            h = health()
            if cond(h):
                return h
            time.sleep(0.05)
        raise AssertionError(f"{what}: {health()}")

    conns = []
    for i in range(PARALLEL + 1):   # greedy to the context's end: seconds each, far longer than this test needs
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        c.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                  body=json.dumps({"model": "tiny", "prompt": PROMPTS[i], "max_tokens": N_CTX, "temperature": 0,
                                   "stream": True}))
        conns.append((c, c.getresponse()))
        if i < PARALLEL:
            _read_data_lines(conns[-1][1], 1)   # it runs
    wait_for(lambda h: h["slots_processing"] == PARALLEL and h["requests_queued"] == 1, "one request queued")
    for c, _ in conns[PARALLEL:] + conns[:PARALLEL]:   # the queued one first
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
        if c is conns[PARALLEL][0]:
            wait_for(lambda h: h["requests_queued"] == 0 and h["slots_processing"] == PARALLEL, "left the queue")
    wait_for(lambda h: h["slots_processing"] == 0 and h["requests_queued"] == 0, "slots freed")
    text, finish, _, _ = _complete(client, PROMPTS[7])
    assert text and finish == "length"
