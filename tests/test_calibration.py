"""Calibration end to end on a real model (SmolLM2-135M, small lengths for CI), the native
reader of the tca.* keys, and quantization keeping the budgets."""
import struct

import numpy as np
import pytest

from tca_ggml import Llama, TCAConfigError, _native, calibrate, gguf_meta as gm

import test_gguf_meta as tgm  # hostile-metadata generators

CTX, W, B = 1024, 256, 64


@pytest.fixture(scope="module")
def calibrated(smol_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    out1, out2 = d / "a.tca.gguf", d / "b.tca.gguf"
    b1 = calibrate.calibrate(smol_model, str(out1), n_ctx=CTX, window=W, block=B, n_threads=2, progress=False)
    b2 = calibrate.calibrate(smol_model, str(out2), n_ctx=CTX, window=W, block=B, n_threads=2, progress=False)
    return out1, out2, b1, b2


def test_calibration_is_deterministic(calibrated):
    out1, out2, b1, b2 = calibrated
    assert gm.read_budgets(out1) == gm.read_budgets(out2)
    assert b1 == b2


def test_calibrated_budgets_are_sane(calibrated):
    _, _, b, _ = calibrated
    assert b.n_layer == 30 and b.n_head_kv == [3] * 30
    dens = np.asarray(b.density)
    assert 0 < dens.min() and dens.max() <= 1
    cov = np.asarray(b.coverage)
    dense = np.asarray(b.candidate) < 0
    # every non-dense head reached tau on the calibration text
    assert (cov[~dense] >= b.tau - 1e-6).all()
    assert dens.mean() < 0.95  # something is actually sparse on real weights
    # the default mode: planted facts and questions, sized to the context, budgets for "hold"
    assert CTX - 8 <= b.calib_n_tokens <= CTX and len(b.calib_text_sha256) == 64
    assert b.version == 2 and b.calib_tool.endswith("(final, n_obs 32, whole 4)")
    assert "4 planted facts" in b.calib_text_name


def test_chunked_mode_still_calibrates(smol_model, tmp_path):
    b = calibrate.calibrate(smol_model, str(tmp_path / "c.tca.gguf"), n_ctx=CTX, window=W, block=B,
                            n_threads=2, progress=False, mode="chunked")
    assert b.version == 1 and b.calib_tool.endswith("(chunked, ubatch 512)") and b.calib_n_tokens == CTX
    assert gm.read_budgets(tmp_path / "c.tca.gguf") == b
    rc, err, r = _native_read(tmp_path / "c.tca.gguf")
    assert rc == 0, err


def _native_read(path):
    L, ffi = _native.lib(), _native.ffi
    out = ffi.new("struct tca_budgets *")
    err = ffi.new("char[512]")
    rc = L.tca_budgets_read(str(path).encode(), out, err, 512)
    res = None
    if rc == 0:
        n_k, H = out.n_k, out.n_heads
        res = dict(block=out.block, window=out.window, n_sink=out.n_sink, tau=out.tau, alpha=out.alpha,
                   k_values=np.frombuffer(ffi.buffer(out.k_values, 4 * n_k), np.uint32).copy(),
                   n_head_kv=np.frombuffer(ffi.buffer(out.n_head_kv, 4 * out.n_layer), np.uint32).copy(),
                   candidate=np.frombuffer(ffi.buffer(out.candidate, 4 * H), np.int32).copy(),
                   p=np.frombuffer(ffi.buffer(out.p, 4 * H * n_k), np.float32).reshape(H, n_k).copy(),
                   density=np.frombuffer(ffi.buffer(out.density, 4 * H), np.float32).copy(),
                   coverage=np.frombuffer(ffi.buffer(out.coverage, 4 * H), np.float32).copy(),
                   text_sha256=ffi.string(out.text_sha256).decode(), n_tokens=out.n_tokens)
        L.tca_budgets_free(out)
    return rc, ffi.string(err).decode(), res


def test_native_reader_round_trip(calibrated):
    out1, _, b, _ = calibrated
    rc, err, r = _native_read(out1)
    assert rc == 0, err
    assert (r["block"], r["window"], r["n_sink"]) == (b.block_size, b.window, b.n_sink)
    assert r["tau"] == b.tau and r["alpha"] == b.alpha
    assert np.array_equal(r["k_values"], b.k_values)
    assert r["n_head_kv"].tolist() == b.n_head_kv
    assert np.array_equal(r["candidate"], b.candidate)
    assert np.array_equal(r["p"], b.p) and np.array_equal(r["density"], b.density)
    assert np.array_equal(r["coverage"], b.coverage)
    assert r["text_sha256"] == b.calib_text_sha256 and r["n_tokens"] == b.calib_n_tokens


def test_native_reader_without_tca(smol_model):
    rc, _, _ = _native_read(smol_model)
    assert rc == 1


@pytest.mark.parametrize("case", sorted(tgm.HOSTILE))
def test_native_reader_hostile(tmp_path, case):
    """Never a crash; where the native reader rejects, it names the key. (These fake models are
    often unreadable for upstream's gguf; that the native reader refuses what the Python validator
    refuses is tests/test_reliability.py::test_native_budget_reader_refuses_what_the_python_validator_refuses.)"""
    key, make = tgm.HOSTILE[case]
    b = tgm._b()
    path = tgm.build_model(tmp_path / f"{case}.gguf", tgm.items_with(b, make(b)))
    rc, err, _ = _native_read(path)
    assert rc in (0, -1)
    if rc == -1:
        assert key in err or "not a readable GGUF" in err, err


def test_native_reader_huge_array_declared(tmp_path):
    path = tgm.build_model(tmp_path / "huge.gguf", tgm.items_with(tgm._b()))
    off = tgm._count_offset(path, "tca.budget.density")
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", 2**40))
    with tgm.deadline():
        rc, err, _ = _native_read(path)
    assert rc == -1


def test_calibrated_model_runs_with_tca(calibrated):
    out1, _, b, _ = calibrated
    with Llama(str(out1), n_ctx=2048, n_threads=2, verbose=False, tca=True) as llm:
        st = llm.tca_stats()
        assert st["active"] and "calibrated" in st["label"]
        from tca_ggml import texts
        toks = llm.tokenize(texts.haystack(6000))[:1500]
        text = llm(toks, max_tokens=8, temperature=0)["choices"][0]["text"]
        assert isinstance(text, str)
        st = llm.tca_stats()
        assert st["n_compactions"] > 0 and st["rows_kept"] < len(toks) * 90
        # the fast tier is budgeted; with retention "hold" (the default) the hold tier is dense-sized
        assert st["bytes_fast"] < st["bytes_dense"] and st["bytes_alloc"] == st["bytes_fast"] + st["bytes_hold"]
    # stock llama.cpp loading (our dense path = upstream) still reads the file
    with Llama(str(out1), n_ctx=256, verbose=False) as llm:
        assert llm("Hello", max_tokens=2, temperature=0)["choices"][0]["text"] is not None


def test_hostile_metadata_is_a_clear_error(smol_model, tmp_path):
    b = gm.make_random_budgets(30, 3, block_size=64, window=256, seed=1)
    good = tmp_path / "good.gguf"
    gm.write_calibrated(smol_model, good, b)
    # corrupt one value in place: a p row no longer sums to 1 (same length, same offsets)
    data = bytearray(good.read_bytes())
    row = b.p[0].astype("<f4").tobytes()
    i = data.find(row)
    assert i > 0
    data[i:i + 4] = struct.pack("<f", 5.0)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(TCAConfigError, match="tca.budget.p"):
        Llama(str(bad), n_ctx=2048, tca=True, verbose=False)


def test_quantize_keeps_budgets(calibrated, tmp_path):
    """llama_model_quantize (the code of llama-quantize) copies the tca.* keys."""
    out1, _, b, _ = calibrated
    dst = tmp_path / "q8.gguf"
    LLAMA_FTYPE_MOSTLY_Q8_0 = 7
    rc = _native.lib().tca_quantize(str(out1).encode(), str(dst).encode(), LLAMA_FTYPE_MOSTLY_Q8_0, 1, 2)
    assert rc == 0
    assert gm.read_budgets(dst) == b
