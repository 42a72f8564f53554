"""TCA through ggml RPC (issue 18, CPU part; docs/design.md "RPC").

Upstream's rpc-server, built from the pinned patched upstream and linked to libtca_ggml
(tca_ggml/bin/tca-rpc-server, `python -m tca_ggml.rpc_server`), runs on 127.0.0.1 with its CPU
backend; `Llama(..., rpc_servers=..., n_gpu_layers=N, tca=True)` puts the layers (all, or the last
half) and their TCA retention buffers there. Greedy tokens and the kept rows of every (layer, KV
head) must be those of the local run, with a forced density and with (random) calibrated budgets,
small block and window so that TCA compacts in prefill and decode. The RPC client's counters
(native/patches/0006) give the round trips per decode step. A server that is not there at load, or
is killed mid-decode, is an RPCError within a bounded time, never a hang or an abort.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

KW = dict(n_ctx=512, n_batch=64, n_ubatch=64, n_threads=1, n_threads_batch=1, verbose=False, seed=1,
          tca=True, tca_block=16, tca_window=32)
PROMPT = list(range(1, 200))   # 199 tokens of the tiny vocabulary: 4 ubatches, several compactions
N_GEN = 40                     # decode ages two more blocks


@pytest.fixture(autouse=True)
def _tca_on_rpc_devices(monkeypatch):
    # an RPC device reports itself as a GPU, and short contexts on a GPU keep upstream's dense cache
    # (TCA_GGML_GPU_MIN_CTX, 8192 by default): TCA at any length here
    monkeypatch.setenv("TCA_GGML_GPU_MIN_CTX", "0")


def _server_bin():
    from tca_ggml.errors import NativeLibraryError
    from tca_ggml.rpc_server import server_path
    try:
        return server_path()
    except NativeLibraryError as e:
        pytest.skip(f"rpc-server not built (-DTCA_GGML_RPC=OFF?): {e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(_server_bin()), "-H", "127.0.0.1", "-p", str(self.port), "-t", "1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rpc-server exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                # a bare connect, no HELLO: the server drops it and accepts the next client
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() - t0 > 20:
                    self.kill()
                    raise RuntimeError("rpc-server did not listen within 20 s")
                time.sleep(0.05)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 layers (so half of them can be remote); no tca.* keys (tca_density forces the budget)."""
    from tca_ggml.random_model import write_random_gguf
    p = str(tmp_path_factory.mktemp("rpc") / "tiny4.gguf")
    write_random_gguf(p, "tiny", "f32", seed=11, n_layer=4)
    return p


@pytest.fixture(scope="module")
def tiny_calibrated(tiny, tmp_path_factory):
    """The same model with random calibrated budgets (tca.*) at block 16, window 32."""
    from tca_ggml import gguf_meta
    p = str(tmp_path_factory.mktemp("rpc") / "tiny4.tca.gguf")
    gguf_meta.write_calibrated(tiny, p, gguf_meta.make_random_budgets(4, 2, block_size=16, window=32, seed=3))
    return p


def _stats(endpoint=None):
    from tca_ggml import _native
    st = _native.ffi.new("struct tca_rpc_stats *")
    _native.lib().tca_rpc_get_stats(endpoint.encode() if endpoint else _native.ffi.NULL, st)
    return st.n_round_trips, st.n_cmds, st.bytes_sent + st.bytes_recv, st.n_failures


def _run(model, prompt, n_gen, n_layer, n_head_kv, **kw):
    """Greedy tokens, kept rows of every (layer, KV head), round trips of every decode step."""
    from tca_ggml import Llama
    with Llama(model, **{**KW, **kw}) as llm:
        g = llm.generate_tokens(prompt, n_gen, temperature=0.0)
        toks = [next(g)]                  # the prompt's evaluation and the first token
        rt = [_stats()[0]]
        for t in g:                       # each further token: one decode step
            toks.append(t)
            rt.append(_stats()[0])
        rows = {(il, h): llm.tca_retained_positions(il, h).tolist() for il in range(n_layer) for h in range(n_head_kv)}
        label = llm.tca_label
    return toks, rows, [b - a for a, b in zip(rt, rt[1:])], label


@pytest.mark.parametrize("budgets", ["forced", "calibrated"])
@pytest.mark.parametrize("remote", ["all", "half"])
def test_same_tokens_and_rows_as_local(server, tiny, tiny_calibrated, budgets, remote):
    kw = dict(tca_density=0.25) if budgets == "forced" else {}
    if budgets == "calibrated":
        tiny = tiny_calibrated
    toks0, rows0, _, label = _run(tiny, PROMPT, N_GEN, 4, 2, **kw)
    assert ("forced" in label) == (budgets == "forced"), label
    n_seen = len(PROMPT) + N_GEN - 1
    assert any(len(r) < n_seen for r in rows0.values()), "TCA evicted nothing: the test would prove little"
    n0 = _stats(server.endpoint)[1]
    toks, rows, rt, _ = _run(tiny, PROMPT, N_GEN, 4, 2, rpc_servers=server.endpoint,
                             n_gpu_layers=-1 if remote == "all" else 2, **kw)
    assert _stats(server.endpoint)[1] > n0, "nothing went through the RPC server"
    assert toks == toks0
    assert rows == rows0
    # round trips per decode step: 1 (the logits) on most steps, a few more on a step that ages a
    # block (the selection's read-back), never one per layer and head
    rt.sort()
    assert rt[len(rt) // 2] == 1, rt
    # the step that runs the prompt's final selection, where one does (+ first allocations); with every
    # step holding (an RPC device counts as the CPU: the default) it waits for the statistics at the end
    assert rt[-1] <= 2 + 2 * 4, rt
    print(f"\n[rpc] {budgets}/{remote}: round trips per decode step: median {rt[len(rt) // 2]}, "
          f"max {rt[-1]}, mean {sum(rt) / len(rt):.2f}")


def test_tensor_split_over_two_servers(server, tiny):
    """All layers remote, split 1:1 over two rpc-servers (tensor_split)."""
    second = Server()
    try:
        toks0, rows0, _, _ = _run(tiny, PROMPT, 16, 4, 2, tca_density=0.25)
        toks, rows, _, _ = _run(tiny, PROMPT, 16, 4, 2, tca_density=0.25, n_gpu_layers=-1,
                                rpc_servers=f"{server.endpoint},{second.endpoint}", tensor_split=[1, 1])
        assert _stats(second.endpoint)[1] > 0
        assert toks == toks0
        assert rows == rows0
    finally:
        second.kill()


def test_smol_all_remote(server, smol_model):
    """A real model (SmolLM2-135M, 30 layers): the same greedy tokens and kept rows over RPC."""
    from tca_ggml import Llama
    with Llama(smol_model, n_ctx=512, vocab_only=True, verbose=False) as v:
        prompt = v.tokenize(("The quick brown fox jumps over the lazy dog. " * 30).encode())[:300]
    kw = dict(tca_density=0.25, n_batch=128, n_ubatch=128, n_threads=2, n_threads_batch=2)
    toks0, rows0, _, _ = _run(smol_model, prompt, 12, 30, 3, **kw)
    toks, rows, rt, _ = _run(smol_model, prompt, 12, 30, 3, rpc_servers=server.endpoint, n_gpu_layers=-1, **kw)
    assert any(len(r) < len(prompt) for r in rows0.values())
    assert toks == toks0
    assert rows == rows0


def test_unreachable_server_is_an_error_at_load(tiny):
    from tca_ggml import Llama, RPCError
    _server_bin()
    ep = f"127.0.0.1:{_free_port()}"   # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RPCError, match="cannot reach an rpc-server at " + ep):
        Llama(tiny, rpc_servers=ep, n_gpu_layers=-1, **KW)
    assert time.monotonic() - t0 < 5
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", ":50052", "a b:1"):
        with pytest.raises(RPCError, match="not host:port"):
            Llama(tiny, rpc_servers=bad, n_gpu_layers=-1, **KW)
    with pytest.raises(ValueError):
        Llama(tiny, rpc_servers=" , ", n_gpu_layers=-1, **KW)


def test_server_killed_mid_decode(tiny):
    """SIGKILL between two decode steps: the next step raises RPCError at once (the connection is
    reset), every later call too; close() works and the process goes on."""
    from tca_ggml import Llama, RPCError
    srv = Server()
    try:
        llm = Llama(tiny, rpc_servers=srv.endpoint, n_gpu_layers=-1, tca_density=0.25, **KW)
        g = llm.generate_tokens(PROMPT, 200, temperature=0.0)
        n = 0
        with pytest.raises(RPCError, match="lost"):
            for _ in g:
                n += 1
                if n == 10:
                    srv.proc.send_signal(signal.SIGKILL)   # not waited for: dies while we decode
                    t_kill = time.monotonic()
        assert time.monotonic() - t_kill < 10
        assert 10 <= n < 20   # a step or two may finish while SIGKILL lands; none after
        with pytest.raises(RPCError):
            llm.eval_prompt(PROMPT)
        with pytest.raises(RPCError):
            llm.tca_retained_positions(0, 0)
        llm.close()
    finally:
        srv.kill()
    # the endpoint can be used again once a server is back (a failed connection is not reused)
    srv2 = Server()
    try:
        toks, _, _, _ = _run(tiny, PROMPT, 4, 4, 2, tca_density=0.25, rpc_servers=srv2.endpoint, n_gpu_layers=-1)
        assert len(toks) == 4
    finally:
        srv2.kill()
