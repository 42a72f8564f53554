#!/usr/bin/env python3
"""Fuzz target: Llama.load_state with mutated states, into a TCA context and a dense one.

Input layout (seeds: tests/fuzz_corpus/state/, written by ``--make-seeds``): one byte picks the
context (even: TCA, forced density 0.25, block 16, window 32, n_ctx 128, so that the states hold
compacted heads; odd: dense), a little-endian u16 n and n u16 token ids (LlamaState.input_ids),
then the state bytes (save_state's envelope + upstream's state). The model is the micro model
(micro.tca.gguf, written into .cache/fuzz/micro/ by common.ensure_models): the envelope records its
sha256, so the seeds stay valid only while that file is byte for byte the same (common.MICRO_SHA256,
checked on every run; after an intended change, remake the seeds with --make-seeds).
Mutations: libFuzzer's, and mostly edits of the state after save_state's envelope, which is
kept so that the edit reaches upstream's reader and the TCA memory (``custom_mutator``).
Allowed outcomes: the state loads, or ContextError (TypeError/TokenizeError for ids out of
range). Findings: any other exception, a native abort, a hang; after a refused state, a cache
that is not empty or a context that cannot evaluate a fresh prompt; after an accepted state, a
context that cannot evaluate one more token on top of it.

    .venv/bin/python scripts/fuzz/fuzz_state.py -runs=100000 [-seed=N] [CORPUS_DIR ...]
    .venv/bin/python scripts/fuzz/fuzz_state.py --regressions   # replay tests/fuzz_corpus/regressions/state-*
    .venv/bin/python scripts/fuzz/fuzz_state.py --make-seeds
"""
import os
import random
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import atheris  # noqa: E402

with atheris.instrument_imports(include=["tca_ggml"]):
    from tca_ggml import Llama
    from tca_ggml.errors import ContextError, TokenizeError
    from tca_ggml.llama import LlamaState, _STATE_IDENT, _STATE_MAGIC

ENVELOPE = len(_STATE_MAGIC) + _STATE_IDENT.size

KW = dict(n_ctx=128, n_batch=32, n_ubatch=32, n_threads=1, n_threads_batch=1, verbose=False)
TCA_KW = dict(KW, tca=True, tca_density=0.25, tca_block=16, tca_window=32)
CTX = []


class Finding(Exception):
    """A property of the harness does not hold (not an exception of the library)."""


def contexts():
    model = common.ensure_models()["tca"]
    return [Llama(model, **TCA_KW), Llama(model, **KW)]


def encode(which: int, state: LlamaState) -> bytes:
    ids = state.input_ids
    return bytes([which]) + struct.pack(f"<H{len(ids)}H", len(ids), *ids) + bytes(state.llama_state)


def decode(data: bytes):
    if len(data) < 3:
        return None
    which, n = data[0] & 1, struct.unpack_from("<H", data, 1)[0]
    if len(data) < 3 + 2 * n:
        return None
    ids = list(struct.unpack_from(f"<{n}H", data, 3))
    state = data[3 + 2 * n:]
    return which, LlamaState(ids, n, state, len(state))


def one_input(data: bytes) -> None:
    got = decode(data)
    if got is None:
        return
    which, state = got
    llm = CTX[which]
    llm.reset()
    try:
        llm.load_state(state)
    except (ContextError, TokenizeError):
        if llm._tokens:
            raise Finding(f"a refused state left {len(llm._tokens)} tokens")
        llm.eval_prompt([258, 104, 105])         # still usable
        if llm._tokens != [258, 104, 105]:
            raise Finding("the context does not hold the fresh prompt after a refused state")
        return
    if len(llm._tokens) != state.n_tokens:
        raise Finding("the accepted state's token count differs from input_ids")
    if state.n_tokens and state.n_tokens < KW["n_ctx"]:
        llm.eval_prompt(list(state.input_ids) + [104])  # one more token on top of the state
        if len(llm._tokens) != state.n_tokens + 1:
            raise Finding("the context does not hold one more token after an accepted state")


_U32 = (0, 1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 48, 64, 100, 127, 128, 129, 255, 256, 0x7FFFFFFF, 0x80000000,
        0xFFFFFFFE, 0xFFFFFFFF)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """A quarter of the time libFuzzer's own mutations of the whole input; otherwise the context
    byte, the token ids and save_state's envelope (magic, model identity) are kept, so that the
    state reaches upstream's reader and the TCA memory's, and its bytes are mutated: by libFuzzer,
    or by setting 32-bit fields near its start (lengths, counts, the frontier, positions) to
    boundary values and flipping bytes."""
    rng = random.Random(seed)
    got = decode(data)
    if got is None or rng.random() < 0.25:
        return atheris.Mutate(data, max_size)
    n = struct.unpack_from("<H", data, 1)[0]
    keep = 3 + 2 * n + (ENVELOPE if data[3 + 2 * n:].startswith(_STATE_MAGIC) else 0)
    head, tail = data[:keep], bytearray(data[keep:])
    if len(tail) < 8 or rng.random() < 0.4:
        tail = bytearray(atheris.Mutate(bytes(tail), max(max_size - keep, 1)))
    else:
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(0, max(min(len(tail), 512) - 4, 1)) & ~3
            if rng.random() < 0.6:
                v = rng.choice(_U32) if rng.random() < 0.7 else (struct.unpack_from("<I", tail, at)[0] + rng.choice((-1, 1))) & 0xFFFFFFFF
                tail[at:at + 4] = struct.pack("<I", v)
            else:
                i = rng.randrange(len(tail))
                tail[i] ^= 1 << rng.randrange(8)
    return (head + bytes(tail))[:max_size]


def make_seeds(out=common.CORPUS / "state") -> None:
    out.mkdir(parents=True, exist_ok=True)
    ctxs = contexts()
    text = "the quick brown fox jumps over the lazy dog. "
    for which, llm in enumerate(ctxs):
        for n in ((5, 100) if which == 0 else (40,)):
            toks = llm.tokenize((text * 3)[:n], add_bos=True)[:n]
            llm.reset()
            llm.eval_prompt(toks)
            st = llm.save_state()
            name = f"{'tca' if which == 0 else 'dense'}-{len(toks)}.input"
            (out / name).write_bytes(encode(which, st))
            print(name, st.llama_state_size, llm.tca_stats()["active"], llm.tca_stats()["n_compactions"])


def main():
    if sys.argv[1:] == ["--make-seeds"]:
        make_seeds()
        return
    CTX.extend(contexts())
    common.fuzz("state", sys.argv, one_input, custom_mutator)


if __name__ == "__main__":
    main()
