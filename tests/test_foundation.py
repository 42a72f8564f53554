"""Foundation: native library, bindings, Llama surface, upstream equality, bad input."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import tca_ggml
from tca_ggml import (ContextError, ContextOverflowError, Llama, ModelLoadError, TCAConfigError,
                      TCAError)


# ---------------------------------------------------------------- library and build
def _readelf_dynamic(path):
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    needed = [l.split("[")[1].split("]")[0] for l in out.splitlines() if "(NEEDED)" in l]
    soname = [l.split("[")[1].split("]")[0] for l in out.splitlines() if "(SONAME)" in l]
    return needed, soname


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_library_names_cannot_collide_with_llama_cpp_python(native_lib, llama_simple):
    assert native_lib.name == "libtca_ggml.so"
    needed, soname = _readelf_dynamic(native_lib)
    assert soname == ["libtca_ggml.so"]
    # ggml and llama are inside: nothing named like llama-cpp-python's libraries is needed
    assert not [n for n in needed if n.startswith(("libllama", "libggml", "libmtmd"))], needed
    pkg = native_lib.parent.parent
    shipped = [p.name for p in pkg.rglob("*.so*")]
    assert not [n for n in shipped if n.startswith(("libllama", "libggml"))], shipped
    needed_simple, _ = _readelf_dynamic(llama_simple)
    assert "libtca_ggml.so" in needed_simple
    # -Bsymbolic: our llama binds to our ggml even if another libggml is loaded globally
    flags = subprocess.run(["readelf", "-d", str(native_lib)], capture_output=True, text=True).stdout
    assert "SYMBOLIC" in flags


def test_abi_declarations_match_library(native_lib):
    from tca_ggml import _native
    _native._check_abi(_native.lib())  # raises NativeLibraryError on any mismatch
    assert _native.ffi.sizeof("struct llama_context_params") == \
        _native.lib().tca_abi_layout(b"llama_context_params", _native.ffi.NULL)


@pytest.mark.parametrize("gtype,tol", [(0, 1e-3), (1, 0.05), (8, 0.5), (12, 2.0)])
def test_cpu_matmul_runs_and_is_correct(native_lib, gtype, tol):
    """A real matmul through the CPU backend (guards the AMX-path SIGSEGV of native builds).
    Reference: double-precision product of the dequantized weight; q8_0/q4_K also quantize
    the activations to 8 bits, hence the looser bounds (|sum| over k=512 terms of ~U(-1,1)^2)."""
    from tca_ggml import _native
    err = _native.lib().tca_selftest_matmul(gtype, 64, 512, 7, 2)
    assert 0.0 <= err < tol, err


# ---------------------------------------------------------------- Llama surface
def test_load_and_generate(smol):
    out = smol("The capital of France is", max_tokens=8, temperature=0)
    assert out["object"] == "text_completion"
    ch = out["choices"][0]
    assert isinstance(ch["text"], str) and len(ch["text"]) > 0
    assert ch["finish_reason"] in ("length", "stop")
    assert out["usage"]["prompt_tokens"] == len(smol.tokenize(b"The capital of France is", special=True))
    assert out["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize("text", ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines",
                                  "unicode: héllo wörld — 日本語 🎉", "def f(x):\n    return x ** 2\n"])
def test_tokenize_detokenize_round_trip(smol, text):
    toks = smol.tokenize(text.encode(), add_bos=False)
    assert all(isinstance(t, int) for t in toks) and toks
    assert smol.detokenize(toks).decode("utf-8") == text


def test_tokenize_special_and_bounds(smol):
    with pytest.raises(tca_ggml.TokenizeError):
        smol.detokenize([smol.n_vocab() + 5])
    with pytest.raises(TypeError):
        smol.tokenize(12345)


def test_chat_template_matches_upstream_rendering(default_model):
    """The GGUF's template, applied as llama.cpp does (ChatML for Qwen2.5), and identical to
    a Jinja2 rendering of the same template string when jinja2 is present."""
    with Llama(default_model, n_ctx=256, verbose=False) as llm:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        got = llm.apply_chat_template(msgs)
        assert got == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                       "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
        tmpl = llm.chat_template()
        assert tmpl and "im_start" in tmpl
        jinja2 = pytest.importorskip("jinja2")
        env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=False, lstrip_blocks=False)
        ref = env.from_string(tmpl).render(messages=msgs, add_generation_prompt=True)
        assert got == ref


def test_stream_chunks_concatenate_to_non_stream(smol):
    kw = dict(max_tokens=24, temperature=0)
    smol.reset()
    full = smol("Once upon a time", **kw)["choices"][0]["text"]
    smol.reset()
    chunks = list(smol("Once upon a time", stream=True, **kw))
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_strings_cut_output(smol):
    smol.reset()
    full = smol("1, 2, 3, 4,", max_tokens=20, temperature=0)["choices"][0]["text"]
    assert "," in full.strip(), full
    stop = full.strip()[full.strip().index(","):][:2] if "," in full.strip() else ","
    smol.reset()
    out = smol("1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[","])["choices"][0]
    assert "," not in out["text"] and out["finish_reason"] == "stop"
    assert full.startswith(out["text"])
    smol.reset()
    streamed = "".join(c["choices"][0]["text"] for c in smol("1, 2, 3, 4,", max_tokens=20, temperature=0,
                                                              stop=[","], stream=True))
    assert streamed == out["text"]


def test_seeded_sampling_is_reproducible(smol):
    kw = dict(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    smol.reset()
    a = smol("My favourite animal is", **kw)["choices"][0]["text"]
    smol.reset()
    b = smol("My favourite animal is", **kw)["choices"][0]["text"]
    assert a == b


def test_chat_completion_shape(default_model):
    with Llama(default_model, n_ctx=512, verbose=False, flash_attn=True) as llm:
        out = llm.create_chat_completion([{"role": "user", "content": "What is 2+2? Reply with a digit."}],
                                         temperature=0, max_tokens=8)
        assert out["object"] == "chat.completion"
        assert "4" in out["choices"][0]["message"]["content"]
        chunks = list(llm.create_chat_completion([{"role": "user", "content": "Say hi."}],
                                                 temperature=0, max_tokens=8, stream=True))
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_metadata_includes_arrays(smol):
    md = smol.metadata
    assert md["general.architecture"] == "llama"
    toks = md["tokenizer.ggml.tokens"]
    assert isinstance(toks, list) and len(toks) == smol.n_vocab()
    assert md["llama.block_count"] == 30


def test_context_manager_and_close(smol_model):
    with Llama(smol_model, n_ctx=128, verbose=False) as llm:
        assert llm.n_ctx() >= 128
    with pytest.raises(ContextError):
        llm("hi", max_tokens=1)
    llm.close()  # idempotent


def test_progress_callback_called_and_exceptions_propagate(smol_model):
    seen = []
    with Llama(smol_model, n_ctx=128, verbose=False, progress=lambda p: seen.append(p)) as _:
        pass
    assert seen and seen[-1] == pytest.approx(1.0)

    class Boom(Exception):
        pass

    def bad(p):
        raise Boom("from the callback")
    with pytest.raises(Boom):
        Llama(smol_model, n_ctx=128, verbose=False, progress=bad)


def test_memory_report(smol):
    m = smol.memory_bytes()
    assert m["model"] > 50 * 2**20 and m["kv"] > 0


# ---------------------------------------------------------------- bad input
def test_missing_file():
    with pytest.raises(ModelLoadError, match="not found"):
        Llama("/nonexistent/model.gguf", verbose=False)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("this is not a model\n" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        Llama(str(p), verbose=False)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError):
        Llama(str(p), verbose=False)


@pytest.mark.parametrize("keep", [8, 1000, 3_000_000, -4096])
def test_truncated_gguf(smol_model, tmp_path, keep):
    data = Path(smol_model).read_bytes()
    p = tmp_path / "trunc.gguf"
    p.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(ModelLoadError):
        Llama(str(p), verbose=False)


def test_prompt_longer_than_context(smol_model):
    with Llama(smol_model, n_ctx=64, verbose=False) as llm:
        long_prompt = "word " * (llm.n_ctx() + 10)
        with pytest.raises(ContextOverflowError, match="exceed context window"):
            llm(long_prompt, max_tokens=4)
        with pytest.raises(ValueError):  # ContextOverflowError is a ValueError, like llama-cpp-python's
            llm(long_prompt, max_tokens=4)
        with pytest.raises(ContextOverflowError):
            llm.create_chat_completion([{"role": "user", "content": long_prompt}])
        # still usable afterwards
        assert llm("Hello", max_tokens=2, temperature=0)["choices"][0]["text"] is not None


def test_n_ctx_zero_means_model_default_and_negative_is_rejected(smol_model):
    # llama-cpp-python semantics: n_ctx=0 takes the model's training context (8192 here)
    with Llama(smol_model, n_ctx=0, verbose=False) as llm:
        assert llm.n_ctx() == 8192
    with pytest.raises(ValueError, match="n_ctx"):
        Llama(smol_model, n_ctx=-1, verbose=False)
    with pytest.raises(TypeError, match="n_ctx"):
        Llama(smol_model, n_ctx="big", verbose=False)


def test_unknown_kwarg_raises_type_error(smol_model):
    with pytest.raises(TypeError, match="n_ctxx"):
        Llama(smol_model, n_ctxx=128, verbose=False)
    with Llama(smol_model, n_ctx=64, verbose=False) as llm:
        with pytest.raises(TypeError, match="max_tokenz"):
            llm("hi", max_tokenz=3)


def test_invalid_parameters(smol_model):
    with pytest.raises(ValueError, match="type_k"):
        Llama(smol_model, type_k=99, verbose=False)
    with pytest.raises(ValueError, match="n_batch"):
        Llama(smol_model, n_batch=0, verbose=False)
    with pytest.raises(TCAConfigError):
        Llama(smol_model, tca_density=0.2, verbose=False)  # needs tca=True
    with pytest.raises(ValueError, match="tca_block"):
        Llama(smol_model, tca=True, tca_block=100, verbose=False)
    with pytest.raises(ValueError, match="tca_density"):
        Llama(smol_model, tca=True, tca_density=0.0, verbose=False)


def test_all_errors_share_one_base():
    for cls in (ModelLoadError, ContextError, ContextOverflowError, TCAConfigError):
        assert issubclass(cls, TCAError)
