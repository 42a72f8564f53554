#!/usr/bin/env python3
"""Fuzz target: a GGUF file (with or without tca.* keys) through every reader a user's file meets.

Each input is the bytes of a GGUF (seeds: the micro model with and without tca.* keys, written
at run time into .cache/fuzz/micro/ by common.ensure_models; no GGUF is committed). It is written
to a scratch file and read by:
- tca_ggml.gguf_meta: read_kv, list_tca_keys, read_model_shape, read_budgets (the Python parsers);
- the native tca_gguf_check and tca_budgets_read;
- Llama(path, tca=True, ...) and, when it loads, two greedy tokens; with forced density when the
  file has no calibration.
Mutations: libFuzzer's, and half of the time edits of the header that keep the file's length
(``custom_mutator``), so that most inputs still reach the loader and a context.
Allowed outcomes: success, or the documented errors (GGUFError / TCAMetadataError from
gguf_meta, a TCAError from Llama). Anything else is a finding: another Python exception, a native
abort or crash (libFuzzer's deadly-signal report), a hang (-timeout), and the two native/Python
budget readers disagreeing on a file both parse (docs/reliability.md).

    .venv/bin/python scripts/fuzz/fuzz_gguf.py -runs=100000 [-seed=N] [CORPUS_DIR ...]
    .venv/bin/python scripts/fuzz/fuzz_gguf.py --regressions   # replay common.GGUF_MUTATIONS' inputs
"""
import os
import random
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import atheris  # noqa: E402

with atheris.instrument_imports(include=["tca_ggml"]):
    from tca_ggml import Llama, _native, gguf_meta as gm
    from tca_ggml.errors import TCAError

L, ffi = _native.lib(), _native.ffi
PATH = common.scratch_path("input.gguf")
KW = dict(n_ctx=128, n_batch=32, n_ubatch=32, n_threads=1, n_threads_batch=1, verbose=False)


class Finding(Exception):
    """A property of the harness does not hold (not an exception of the library)."""


def native_budgets(path):
    out, err = ffi.new("struct tca_budgets *"), ffi.new("char[512]")
    rc = L.tca_budgets_read(path.encode(), out, err, 512)
    L.tca_budgets_free(out)
    return rc, _native.err_text(err)


def one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    parsed = True
    try:
        gm.read_kv(PATH)
        gm.list_tca_keys(PATH)
    except gm.GGUFError:
        parsed = False
    try:
        gm.read_model_shape(PATH)
    except gm.GGUFError:
        pass
    py_budgets = "error"
    try:
        py_budgets = "none" if gm.read_budgets(PATH, check_model=False) is None else "ok"
    except (gm.GGUFError, gm.TCAMetadataError):
        pass
    err = ffi.new("char[512]")
    check_rc = L.tca_gguf_check(PATH.encode(), err, 512)
    nat_rc, nat_err = native_budgets(PATH)
    # both parsers read the file: the two budget validators must agree
    if parsed and check_rc == 0:
        want = {"ok": 0, "none": 1, "error": -1}[py_budgets]
        if nat_rc != want and not (want == -1 and py_budgets == "error" and _py_structural_only()):
            raise Finding(f"budget readers disagree: python {py_budgets}, native {nat_rc} ({nat_err})")
    try:
        kw = dict(KW, tca=True)
        if nat_rc != 0:
            kw["tca_density"] = 0.5
            kw.update(tca_block=16, tca_window=32)
        llm = Llama(PATH, **kw)
        try:
            llm("ab", max_tokens=2, temperature=0)
        finally:
            llm.close()
    except TCAError:
        pass


def _py_structural_only() -> bool:
    """read_budgets refused for a reason outside the tca.* schema (its bounds-checked scan is
    stricter than upstream's reader: that is not a budget disagreement)."""
    try:
        gm.read_budgets(PATH, check_model=False)
    except gm.GGUFError:
        return True
    except gm.TCAMetadataError:
        return False
    return False


# values that break counts, lengths, types and floats when written over a header field
_INTERESTING = [struct.pack("<Q", v) for v in (0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                                               1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)] + \
               [struct.pack("<f", v) + b"\0\0\0\0" for v in (float("nan"), float("inf"), -1.0, 0.0, 1e30, 1e-30)]


def _header_end(data: bytes) -> int:
    """Where the tensor data of a GGUF starts, roughly (the end of the tensor infos): the last
    tensor name's end; the whole input when it cannot be told."""
    i = data.rfind(b"ffn_up.weight")
    return min(len(data), i + 64) if i > 0 else len(data)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Half of the time libFuzzer's own mutations; otherwise a few edits inside the header (KV
    section and tensor infos) that keep the length, so that the file still has its tensor data
    and the edit reaches the model loader and the context: a byte or bit, or an 8-byte field set
    to a boundary value (count, length, type id, NaN/inf float)."""
    rng = random.Random(seed)
    if rng.random() < 0.5 or len(data) < 64:
        return atheris.Mutate(data, max_size)
    b = bytearray(data)
    end = _header_end(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(0, max(end - 8, 1))
        op = rng.random()
        if op < 0.4:
            b[at] = rng.randrange(256)
        elif op < 0.6:
            b[at] ^= 1 << rng.randrange(8)
        else:
            v = rng.choice(_INTERESTING)[: rng.choice((1, 2, 4, 8))]
            b[at:at + len(v)] = v
    return bytes(b[:max_size])


def main():
    common.ensure_models()
    common.fuzz("gguf", sys.argv, one_input, custom_mutator)


if __name__ == "__main__":
    main()
