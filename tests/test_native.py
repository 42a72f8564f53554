"""The bindings' plumbing (python/tca_ggml/_native.py): declarations read from the headers, no
test code in the production library, per-instance logging, callback exceptions, error mapping."""
import re
import struct
import shutil
import subprocess

import numpy as np
import pytest

from tca_ggml import ContextError, DecodeError, Llama, LlamaState, ModelLoadError, _native

from _helpers import REPO, TEST_HEADER

HEADER = REPO / "native" / "include" / "tca_ggml.h"


def _api_names(header, macro):
    return set(re.findall(rf"^\s*{macro}\s+[^;(]*?\b(\w+)\s*\(", header.read_text(), re.M))


# ---------------------------------------------------------------- declarations from the headers
def test_every_function_of_the_header_is_bound(native_lib):
    """tca_ggml.h is the declaration: every TCA_API function is callable through the FFI, and
    every struct it defines is known with the header's fields."""
    names = _api_names(HEADER, "TCA_API")
    assert len(names) >= 15, names
    L = _native.lib()
    for n in sorted(names):
        assert callable(getattr(L, n)), n
    for struct in re.findall(r"^struct (\w+) \{", HEADER.read_text(), re.M):
        fields = [f for f, _ in _native.ffi.typeof(f"struct {struct}").fields]
        assert fields, struct
    # a field added to the header is a field of the binding: the installed copy is the header
    assert _native.header_path().read_text() == HEADER.read_text()


def test_cdef_from_header_keeps_declarations_and_line_numbers():
    text = ("// c\n#pragma once\n#include <stdint.h>\n#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
            "#define X_API __attribute__((visibility(\"default\")))\n#define X_N 7\n"
            "/* two\n lines */ struct x { int a; /* inline */ };\nX_API int x_f(struct x * p); // tail\n"
            "#ifdef __cplusplus\n}\n#endif\n")
    out = _native.cdef_from_header(text)
    assert out.count("\n") == text.count("\n")
    lines = out.split("\n")
    assert lines[7] == "#define X_N 7" and "struct x { int a;" in lines[9] and lines[10].strip() == "int x_f(struct x * p);"
    assert "extern" not in out and "X_API" not in out and "pragma" not in out
    import cffi
    f = cffi.FFI()
    f.cdef(out)
    assert f.sizeof("struct x") == 4


def test_test_library_declarations_come_from_its_header(ops):
    ffi, lib = ops
    for n in sorted(_api_names(TEST_HEADER, "TCA_TEST_API")):
        assert callable(getattr(lib, n)), n
    assert lib.TCA_TEST_E_BACKEND == -10


def _exported(path):
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not installed")
def test_no_test_entry_points_in_the_production_library(native_lib):
    syms = _exported(native_lib)
    assert "tca_context_create" in syms
    assert not [s for s in syms if s.startswith("tca_test_")]
    test_lib = native_lib.with_name("libtca_ggml_test.so")
    if test_lib.exists():  # built unless -DTCA_GGML_BUILD_TESTS=OFF
        assert _exported(test_lib) == _api_names(TEST_HEADER, "TCA_TEST_API")


# ---------------------------------------------------------------- errors, callbacks, logs
def test_check_maps_failures_and_reraises_callback_exceptions():
    s = _native.Scope()
    s.check(True, ContextError, "fine")
    with pytest.raises(ContextError, match="^what: from C$"):
        s.check(False, ContextError, "what", "from C")
    with pytest.raises(ContextError, match="^what: the default$"):
        s.check(False, ContextError, "what", default="the default")

    def boom(x):
        raise KeyError("from the callback")
    cb = s.callback("int(int)", boom, -1)
    assert _native.ffi.cast("int(*)(int)", cb)(3) == -1   # the C side sees the error value
    assert s.pending
    with pytest.raises(KeyError, match="from the callback"):
        s.check(True, ContextError, "unused")             # the stored exception wins, once
    assert not s.pending
    s.check(True, ContextError, "fine")


def test_logging_is_per_instance(smol_model, capfd):
    """One instance's verbose never affects another's: upstream's log lines go to the instance
    whose call emitted them (printed only if it is verbose), and its error lines make the
    message of its exception."""
    # a raw state (no envelope) that begins like upstream's (the architecture's name, which
    # load_state checks first) and that upstream's reader then refuses, logging an error line
    raw = struct.pack("=I", 5) + b"llama" + b"not a state"
    bad = LlamaState([], 0, raw, len(raw))
    loud = Llama(smol_model, n_ctx=128, n_threads=2, verbose=True)
    quiet = Llama(smol_model, n_ctx=128, n_threads=2, verbose=False)   # after loud: must not mute it
    try:
        capfd.readouterr()
        with pytest.raises(ContextError, match="error loading state"):
            quiet.load_state(bad)
        assert "error loading state" not in capfd.readouterr().err
        with pytest.raises(ContextError, match="error loading state"):
            loud.load_state(bad)
        assert "error loading state" in capfd.readouterr().err
    finally:
        quiet.close()
        loud.close()
    capfd.readouterr()
    with pytest.raises(ModelLoadError):
        Llama(str(REPO / "README.md"), verbose=False)
    assert capfd.readouterr().err == ""


def test_eval_callback_exception_propagates_and_keeps_the_cache_consistent(smol_model):
    class Stop(Exception):
        pass
    state = {"raise": True}

    def cb(t, ask):
        if not state["raise"]:
            return False           # no tensor wanted: the graph runs unsplit
        if ask:
            return True
        raise Stop("from the eval callback")

    with Llama(smol_model, n_ctx=256, n_threads=2, verbose=False, eval_callback=cb) as llm:
        toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog")
        with pytest.raises(Stop):
            llm.eval_prompt(toks)
        state["raise"] = False
        llm.reset()
        llm.eval_prompt(toks)                  # usable again; no stale exception re-raised
        assert np.isfinite(llm._logits_last()).all()


def test_decode_error_carries_upstreams_message(smol_model):
    with Llama(smol_model, n_ctx=64, n_threads=2, verbose=False) as llm:
        llm.eval_prompt([1, 2, 3])
        with pytest.raises(DecodeError, match="llama_decode failed with code"):
            llm._decode([4, 5], 10)           # positions not following the cache's: rejected
