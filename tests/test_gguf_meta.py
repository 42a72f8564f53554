"""tca.* GGUF metadata: round trip, byte-exact copies, strip, hostile files (design.md section 2).

All fixtures are tiny GGUFs built with gguf.GGUFWriter in tmp_path; hostile tca.* keys are
written as raw keys through the writer (add_uint32 / add_string / add_array / add_key_value) so
that the reading side is exercised, not just TCABudgets.validate().
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGUFReader, GGUFWriter, GGUFEndian, GGUFValueType as VT, GGMLQuantizationType  # noqa: E402

import tca_ggml.gguf_meta as gm  # noqa: E402

TCAMetadataError = gm.TCAMetadataError
GGUFError = gm.GGUFError

N_LAYER, N_HEAD_KV, N_HEAD, N_EMBD = 3, 2, 4, 16
TOKENS = ["<unk>", "<s>", "</s>", "hello", " wörld", "✓", "\n", "", "a" * 300]


@contextmanager
def deadline(seconds=20):
    """Fail instead of hanging (GGUFReader alone loops ~forever on a huge declared array)."""
    def on_alarm(*_):
        raise TimeoutError(f"took more than {seconds}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def build_model(path, tca_items=None, *, n_layer=N_LAYER, head_count_kv=N_HEAD_KV, alignment=None,
                endianess=GGUFEndian.LITTLE, seed=0, extra=None):
    """A fake 'llama' GGUF: various KV types incl. a token list, f32/f16/q8_0 tensors."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("tiny-test-model")
    w.add_string("general.description", "ünïcödé ✓ test")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(head_count_kv)           # int or per-layer list
    w.add_layer_norm_rms_eps(1e-5)
    w.add_key_value("test.u8", 7, VT.UINT8)
    w.add_key_value("test.i8", -7, VT.INT8)
    w.add_key_value("test.u16", 65535, VT.UINT16)
    w.add_key_value("test.i16", -300, VT.INT16)
    w.add_key_value("test.u64", 2**40 + 3, VT.UINT64)
    w.add_key_value("test.i64", -(2**40), VT.INT64)
    w.add_key_value("test.f64", math.pi, VT.FLOAT64)
    w.add_key_value("test.bool", True, VT.BOOL)
    w.add_array("test.nested", [[1, 2, 3], [4]])
    w.add_array("test.f32s", [0.5, -1.25, 3.0])
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([float(-i) for i in range(len(TOKENS))])
    w.add_token_types([1] * len(TOKENS))
    for key, vtype, value, sub in tca_items or []:
        w.add_key_value(key, value, vtype, sub_type=sub)
    if extra is not None:
        extra(w)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(TOKENS), N_EMBD)).astype(np.float32))
    for layer in range(n_layer):
        w.add_tensor(f"blk.{layer}.attn_q.weight", rng.standard_normal((N_EMBD, N_EMBD)).astype(np.float16))
        w.add_tensor(f"blk.{layer}.attn_k.weight", rng.standard_normal((8, N_EMBD)).astype(np.float16))
    w.add_tensor("odd.weight", rng.standard_normal(7).astype(np.float32))          # needs padding
    q8 = rng.integers(0, 256, size=(2, 34), dtype=np.uint8)                         # 2 rows x 32 q8_0
    w.add_tensor("q8.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("big.weight", rng.standard_normal(3000).astype(np.float32))        # > test chunk size
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def budgets(seed=0, **kw):
    return gm.make_random_budgets(N_LAYER, N_HEAD_KV, block_size=kw.pop("block_size", 64),
                                  window=kw.pop("window", 256), seed=seed, **kw)


def items_with(b, replace=None, drop=()):
    """tca_kv_items(b) with some keys replaced {key: (vtype, value, sub)} or dropped."""
    out = []
    for key, vtype, value, sub in gm.tca_kv_items(b):
        if key in drop:
            continue
        if replace and key in replace:
            vtype, value, sub = replace[key]
        out.append((key, vtype, value, sub))
    return out


def field_record_bytes(field):
    return b"".join(p.tobytes() for p in field.parts)


def reader_snapshot(path, with_tca=False):
    """Independent view through GGUFReader: ordered KV (types + record bytes) and tensors."""
    r = GGUFReader(str(path))
    kv = [(name, [int(t) for t in f.types], field_record_bytes(f)) for name, f in r.fields.items()
          if not name.startswith("GGUF.") and (with_tca or not name.startswith("tca."))]
    tensors = [(t.name, int(t.tensor_type), t.shape.tolist(), t.n_bytes,
                hashlib.sha256(np.asarray(r.data[t.data_offset:t.data_offset + t.n_bytes]).tobytes()).hexdigest())
               for t in r.tensors]
    return kv, tensors


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path):
    return build_model(tmp_path / "model.gguf")


# ------------------------------------------------------------------------------------------
# budgets object

def test_random_budgets_valid_and_grid():
    b = budgets()
    b.validate(model_n_layer=N_LAYER, model_n_head_kv=N_HEAD_KV)
    b.validate(model_n_layer=N_LAYER, model_n_head_kv=[N_HEAD_KV] * N_LAYER)
    k, mu, sig, P = gm.log_gaussian_grid(64)
    assert k.tolist() == [1, 2, 4, 8, 16, 32, 64]
    assert mu.shape == sig.shape == (14,) and mu[0] == 0 and mu[-1] == 6 and np.all(sig == 1)
    assert np.allclose(P.sum(axis=1), 1, atol=1e-6)
    assert np.argmax(P[0]) == 0 and np.argmax(P[-1]) == 6          # sparsest .. densest
    assert b.n_heads_total == N_LAYER * N_HEAD_KV and b.head_offset == [0, 2, 4, 6]
    assert b.p.shape == (6, 7)
    assert np.allclose(b.density, b.expected_density(), atol=1e-6)
    assert gm.make_random_budgets(2, [1, 3], block_size=128, seed=1).n_heads_total == 4


def test_summary_and_json():
    b = budgets(seed=3, dense_fraction=0.5)
    s = b.per_layer_summary()
    assert [r["layer"] for r in s] == [0, 1, 2] and all(r["n_head_kv"] == 2 for r in s)
    for layer, r in enumerate(s):
        d = b.density[2 * layer:2 * layer + 2]
        assert r["density_min"] == pytest.approx(float(d.min()))
        assert r["density_max"] == pytest.approx(float(d.max()))
        assert r["density_mean"] == pytest.approx(float(d.mean()))
        assert r["n_dense"] == int(np.sum(b.candidate[2 * layer:2 * layer + 2] == -1))
    d = json.loads(b.to_json(summary=True))
    assert d["block_size"] == 64 and len(d["p"]) == 6 and len(d["per_layer_summary"]) == 3
    assert gm.TCABudgets.from_dict(json.loads(b.to_json())) == b


def test_error_types():
    e = TCAMetadataError("tca.window", "bad")
    assert isinstance(e, ValueError) and "tca.window" in str(e) and e.key == "tca.window"
    g = GGUFError("/x/y.gguf", "truncated")
    assert isinstance(g, ValueError) and "/x/y.gguf" in str(g)


# ------------------------------------------------------------------------------------------
# read_kv: every KV pair (what Llama.metadata returns)

def _reader_values(path):
    """{key: value} through gguf.GGUFReader (the independent parser), strings decoded."""
    r = GGUFReader(str(path))
    return {n: f.contents() for n, f in r.fields.items() if not n.startswith("GGUF.")}


@pytest.mark.parametrize("kw", [{}, dict(endianess=GGUFEndian.BIG), dict(alignment=64)])
def test_read_kv_matches_reader(tmp_path, kw):
    path = build_model(tmp_path / "m.gguf", gm.tca_kv_items(budgets()), **kw)
    md = gm.read_kv(path)
    want = _reader_values(path)
    assert list(md) == list(want)
    nested = md.pop("test.nested")
    assert nested == [[1, 2, 3], [4]]                     # (GGUFReader flattens nested arrays)
    want.pop("test.nested")
    for k, v in want.items():
        assert md[k] == v and type(md[k]) is type(v), k
        if isinstance(v, list):
            assert [type(x) for x in md[k]] == [type(x) for x in v], k
    assert md["tokenizer.ggml.tokens"] == TOKENS and md["test.bool"] is True
    assert md["test.u64"] == 2**40 + 3 and md["llama.block_count"] == N_LAYER
    assert md["tca.budget.p"] == pytest.approx(budgets().p.reshape(-1).tolist())


def test_read_kv_invalid_utf8_replaced(tmp_path):
    path = build_model(tmp_path / "m.gguf", extra=lambda w: w.add_key_value("x.s", b"\xff ok", VT.STRING))
    assert gm.read_kv(path)["x.s"] == "\ufffd ok"


# ------------------------------------------------------------------------------------------
# round trip and byte-exact copies

def test_no_tca_returns_none(model):
    assert gm.read_budgets(model) is None
    assert gm.read_model_shape(model) == ("llama", N_LAYER, [N_HEAD_KV] * N_LAYER)


def test_round_trip_and_preservation(model, tmp_path, monkeypatch):
    monkeypatch.setattr(gm, "_COPY_CHUNK", 1000)       # force the multi-chunk streaming path
    b = budgets(seed=1)
    dst = tmp_path / "cal.gguf"
    gm.write_calibrated(model, dst, b)
    got = gm.read_budgets(dst, cross_check=True)
    assert got == b
    assert got.to_json() == b.to_json()
    kv_src, t_src = reader_snapshot(model)
    kv_dst, t_dst = reader_snapshot(dst)
    assert kv_dst == kv_src                            # order, types, exact record bytes
    assert t_dst == t_src                              # names, types, shapes, data bytes
    r = GGUFReader(str(dst))
    tca = [n for n in r.fields if n.startswith("tca.")]
    assert tca == [k for k, _, _, _ in gm.SCHEMA]
    assert r.fields["tca.block_size"].types == [VT.UINT32]
    assert r.fields["tca.budget.candidate"].types == [VT.ARRAY, VT.INT32]
    assert r.fields["tca.calib.tool"].contents().startswith("tca_ggml ")
    assert gm.list_tca_keys(dst) == tca
    assert os.stat(dst).st_mode & 0o777 == os.stat(model).st_mode & 0o777
    # strip gives back the original file exactly
    gm.strip(dst, tmp_path / "plain.gguf")
    assert sha(tmp_path / "plain.gguf") == sha(model)


def test_replace_existing_tca(model, tmp_path):
    a, b = budgets(seed=1), budgets(seed=2, block_size=32, window=64)
    gm.write_calibrated(model, tmp_path / "a.gguf", a)
    gm.write_calibrated(tmp_path / "a.gguf", tmp_path / "b.gguf", b)
    assert gm.read_budgets(tmp_path / "b.gguf") == b
    r = GGUFReader(str(tmp_path / "b.gguf"))
    assert sum(n.startswith("tca.") for n in r.fields) == len(gm.SCHEMA)
    assert reader_snapshot(tmp_path / "b.gguf") == reader_snapshot(model)
    # in place, with overwrite
    gm.write_calibrated(tmp_path / "b.gguf", tmp_path / "b.gguf", a, overwrite=True)
    assert gm.read_budgets(tmp_path / "b.gguf") == a


def test_overwrite_guard_and_no_leftovers(model, tmp_path, monkeypatch):
    dst = tmp_path / "cal.gguf"
    gm.write_calibrated(model, dst, budgets())
    before = sha(dst)
    with pytest.raises(FileExistsError):
        gm.write_calibrated(model, dst, budgets(seed=5))
    assert sha(dst) == before

    def boom(*a, **k):
        raise GGUFError("tmp", "injected verification failure")
    monkeypatch.setattr(gm, "_verify_copy", boom)
    with pytest.raises(GGUFError):
        gm.write_calibrated(model, tmp_path / "other.gguf", budgets())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.gguf", "model.gguf"]


@pytest.mark.parametrize("where", ["tensor", "kv"])
def test_verification_catches_corruption(model, tmp_path, monkeypatch, where):
    real = gm._verify_copy

    def corrupt_then_verify(src, layout, tmp, *a, **k):
        r = GGUFReader(tmp)
        if where == "tensor":
            off = r.tensors[-1].data_offset + 5
        else:                                          # a byte inside the general.description string
            off = r.fields["general.description"].offset + 40
        del r
        with open(tmp, "r+b") as f:
            f.seek(off)
            c = f.read(1)
            f.seek(off)
            f.write(bytes([c[0] ^ 0x01]))
        return real(src, layout, tmp, *a, **k)

    monkeypatch.setattr(gm, "_verify_copy", corrupt_then_verify)
    with pytest.raises(GGUFError, match="verification"):
        gm.write_calibrated(model, tmp_path / "c.gguf", budgets())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_strip_removes_only_tca(model, tmp_path):
    cal = tmp_path / "cal.gguf"
    gm.write_calibrated(model, cal, budgets())
    gm.strip(cal, tmp_path / "s.gguf")
    assert gm.read_budgets(tmp_path / "s.gguf") is None
    r = GGUFReader(str(tmp_path / "s.gguf"))
    assert not any(n.startswith("tca.") for n in r.fields)
    assert reader_snapshot(tmp_path / "s.gguf") == reader_snapshot(model)
    # stripping a file without tca keys is a plain (byte-identical) copy
    gm.strip(model, tmp_path / "s2.gguf")
    assert sha(tmp_path / "s2.gguf") == sha(model)


def test_strip_hostile_tca(tmp_path):
    b = budgets()
    src = build_model(tmp_path / "h.gguf", items_with(b, {"tca.block_size": (VT.STRING, "64", None)}))
    with pytest.raises(TCAMetadataError):
        gm.read_budgets(src)
    gm.strip(src, tmp_path / "s.gguf")
    assert gm.read_budgets(tmp_path / "s.gguf") is None
    gm.write_calibrated(src, tmp_path / "fixed.gguf", b)   # replacing broken keys works too
    assert gm.read_budgets(tmp_path / "fixed.gguf") == b


@pytest.mark.parametrize("variant", ["align64", "big_endian", "per_layer_heads"])
def test_variants(tmp_path, variant):
    kw = {"align64": dict(alignment=64), "big_endian": dict(endianess=GGUFEndian.BIG),
          "per_layer_heads": dict(head_count_kv=[2, 1, 2])}[variant]
    src = build_model(tmp_path / "m.gguf", **kw)
    heads = kw.get("head_count_kv", [N_HEAD_KV] * N_LAYER)
    assert gm.read_model_shape(src) == ("llama", N_LAYER, heads)
    b = gm.make_random_budgets(N_LAYER, heads, block_size=16, window=32, seed=7)
    gm.write_calibrated(src, tmp_path / "c.gguf", b)
    assert gm.read_budgets(tmp_path / "c.gguf") == b
    assert reader_snapshot(tmp_path / "c.gguf") == reader_snapshot(src)
    gm.strip(tmp_path / "c.gguf", tmp_path / "s.gguf")
    assert sha(tmp_path / "s.gguf") == sha(src)


def test_writer_helper(tmp_path):
    b = budgets(seed=4)
    p = tmp_path / "w.gguf"
    build_model(p, extra=lambda w: gm.add_to_writer(w, b))
    assert gm.read_budgets(p) == b


# ------------------------------------------------------------------------------------------
# hostile tca.* keys (each written raw with GGUFWriter)

def _b():
    return budgets(seed=11, dense_fraction=0.3)


def _p_rows(b):
    return b.p.copy()


def _case_p_sum(b):
    p = _p_rows(b)
    p[0] *= 0.5
    return {"tca.budget.p": (VT.ARRAY, p.reshape(-1).tolist(), VT.FLOAT32)}


def _case_p_negative(b):
    p = _p_rows(b)
    p[1, 0] -= 0.25
    p[1, 1] += 0.25
    return {"tca.budget.p": (VT.ARRAY, p.reshape(-1).tolist(), VT.FLOAT32)}


def _case_dense_not_onehot(b):
    cand = b.candidate.copy()
    cand[0] = -1
    p = _p_rows(b)
    p[0] = 0
    p[0, 0] = 1.0
    dens = b.density.copy()
    dens[0] = 1.0 / 64
    return {"tca.budget.candidate": (VT.ARRAY, cand.tolist(), VT.INT32),
            "tca.budget.p": (VT.ARRAY, p.reshape(-1).tolist(), VT.FLOAT32),
            "tca.budget.density": (VT.ARRAY, dens.tolist(), VT.FLOAT32)}


def _arr(key, b, attr, fn, sub):
    a = np.asarray(getattr(b, attr)).reshape(-1).copy()
    return {key: (VT.ARRAY, fn(a).tolist() if isinstance(fn(a), np.ndarray) else fn(a), sub)}


def _set(a, i, v):
    a = a.copy()
    a[i] = v
    return a


HOSTILE = {
    "block_size_as_string": ("tca.block_size", lambda b: {"tca.block_size": (VT.STRING, "64", None)}),
    "version_99": ("tca.version", lambda b: {"tca.version": (VT.UINT32, 99, None)}),
    "version_as_i32": ("tca.version", lambda b: {"tca.version": (VT.INT32, 1, None)}),
    "tau_as_f64": ("tca.tau", lambda b: {"tca.tau": (VT.FLOAT64, 0.9, None)}),
    "tau_zero": ("tca.tau", lambda b: {"tca.tau": (VT.FLOAT32, 0.0, None)}),
    "tau_nan": ("tca.tau", lambda b: {"tca.tau": (VT.FLOAT32, float("nan"), None)}),
    "alpha_above_1": ("tca.alpha", lambda b: {"tca.alpha": (VT.FLOAT32, 1.5, None)}),
    "block_size_not_pow2": ("tca.block_size", lambda b: {"tca.block_size": (VT.UINT32, 96, None)}),
    "block_size_too_big": ("tca.block_size", lambda b: {"tca.block_size": (VT.UINT32, 8192, None)}),
    "window_not_multiple": ("tca.window", lambda b: {"tca.window": (VT.UINT32, 100, None)}),
    "k_values_as_i32": ("tca.k_values", lambda b: {"tca.k_values": (VT.ARRAY, [int(k) for k in b.k_values], None)}),
    "k_values_wrong": ("tca.k_values", lambda b: {"tca.k_values": (VT.ARRAY, [1, 2, 4, 8, 16, 32, 128], VT.UINT32)}),
    "k_values_not_ending_at_b": ("tca.k_values", lambda b: {"tca.k_values": (VT.ARRAY, [1, 2, 4, 8, 16, 32, 48], VT.UINT32)}),
    "mu_inf": ("tca.grid.mu", lambda b: _arr("tca.grid.mu", b, "grid_mu", lambda a: _set(a, 3, np.inf), VT.FLOAT32)),
    "sigma_len": ("tca.grid.sigma", lambda b: {"tca.grid.sigma": (VT.ARRAY, [1.0] * 13, VT.FLOAT32)}),
    "n_head_kv_len": ("tca.n_head_kv", lambda b: {"tca.n_head_kv": (VT.ARRAY, [2, 2, 2, 0], VT.UINT32)}),
    "candidate_short": ("tca.budget.candidate", lambda b: _arr("tca.budget.candidate", b, "candidate", lambda a: a[:-1], VT.INT32)),
    "candidate_out_of_range": ("tca.budget.candidate", lambda b: _arr("tca.budget.candidate", b, "candidate", lambda a: _set(a, 2, 14), VT.INT32)),
    "candidate_below_dense": ("tca.budget.candidate", lambda b: _arr("tca.budget.candidate", b, "candidate", lambda a: _set(a, 2, -2), VT.INT32)),
    "p_long": ("tca.budget.p", lambda b: _arr("tca.budget.p", b, "p", lambda a: np.append(a, 0.0), VT.FLOAT32)),
    "p_short": ("tca.budget.p", lambda b: _arr("tca.budget.p", b, "p", lambda a: a[:-7], VT.FLOAT32)),
    "p_rows_not_sum_1": ("tca.budget.p", _case_p_sum),
    "p_negative": ("tca.budget.p", _case_p_negative),
    "p_nan": ("tca.budget.p", lambda b: _arr("tca.budget.p", b, "p", lambda a: _set(a, 5, np.nan), VT.FLOAT32)),
    "dense_not_onehot": ("tca.budget.p", _case_dense_not_onehot),
    "density_nan": ("tca.budget.density", lambda b: _arr("tca.budget.density", b, "density", lambda a: _set(a, 1, np.nan), VT.FLOAT32)),
    "density_zero": ("tca.budget.density", lambda b: _arr("tca.budget.density", b, "density", lambda a: _set(a, 1, 0.0), VT.FLOAT32)),
    "density_inconsistent": ("tca.budget.density", lambda b: _arr("tca.budget.density", b, "density", lambda a: _set(a, 1, a[1] * 0.5), VT.FLOAT32)),
    "density_as_f64": ("tca.budget.density", lambda b: {"tca.budget.density": (VT.ARRAY, b.density.tolist(), VT.FLOAT64)}),
    "coverage_inf": ("tca.coverage", lambda b: _arr("tca.coverage", b, "coverage", lambda a: _set(a, 0, np.inf), VT.FLOAT32)),
    "coverage_above_1": ("tca.coverage", lambda b: _arr("tca.coverage", b, "coverage", lambda a: _set(a, 0, 1.5), VT.FLOAT32)),
    "sha_not_hex": ("tca.calib.text_sha256", lambda b: {"tca.calib.text_sha256": (VT.STRING, "not-a-hash", None)}),
    "name_not_utf8": ("tca.calib.text_name", lambda b: {"tca.calib.text_name": (VT.STRING, b"\xff\xfe bad", None)}),
    "n_tokens_as_u64": ("tca.calib.n_tokens", lambda b: {"tca.calib.n_tokens": (VT.UINT64, 4096, None)}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_value(tmp_path, case):
    key, make = HOSTILE[case]
    b = _b()
    path = build_model(tmp_path / f"{case}.gguf", items_with(b, make(b)))
    with pytest.raises(TCAMetadataError) as ei:
        gm.read_budgets(path, cross_check=True)
    assert ei.value.key == key, str(ei.value)
    assert key in str(ei.value) and str(path) in str(ei.value)


@pytest.mark.parametrize("key", ["tca.coverage", "tca.budget.p", "tca.calib.tool", "tca.n_layer"])
def test_hostile_missing_key(tmp_path, key):
    path = build_model(tmp_path / "m.gguf", items_with(_b(), drop=(key,)))
    with pytest.raises(TCAMetadataError) as ei:
        gm.read_budgets(path)
    assert ei.value.key == key and "missing" in str(ei.value)


def _count_offset(path, key):
    """File offset of the u64 element count of array KV `key` (via GGUFReader's parts)."""
    f = GGUFReader(str(path)).fields[key]
    return f.offset + sum(int(p.nbytes) for p in f.parts[:4])   # key len, key, type, subtype


@pytest.mark.parametrize("count", [2**24 + 1, 2**40, 2**64 - 1])
def test_hostile_huge_array_declared(tmp_path, count):
    path = build_model(tmp_path / "huge.gguf", items_with(_b()))
    off = _count_offset(path, "tca.budget.density")
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", count))
    with deadline():
        with pytest.raises(TCAMetadataError) as ei:
            gm.read_budgets(path)
    assert ei.value.key == "tca.budget.density" and "limit" in str(ei.value)
    with deadline(), pytest.raises(GGUFError):      # copying it: structurally corrupt, no hang
        gm.strip(path, tmp_path / "s.gguf")
    with deadline(), pytest.raises(GGUFError):
        gm.read_kv(path)


def test_huge_non_tca_array_declared(model, tmp_path):
    off = _count_offset(model, "tokenizer.ggml.tokens")
    with open(model, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", 2**40))
    with deadline():
        for fn in (gm.read_budgets, gm.read_model_shape, gm.read_kv):
            with pytest.raises(GGUFError):
                fn(model)


# ------------------------------------------------------------------------------------------
# model shape mismatches

def test_validate_against_model_shape():
    b = budgets()
    with pytest.raises(TCAMetadataError) as ei:
        b.validate(model_n_layer=4)
    assert ei.value.key == "tca.n_layer"
    with pytest.raises(TCAMetadataError) as ei:
        b.validate(model_n_layer=3, model_n_head_kv=4)
    assert ei.value.key == "tca.n_head_kv"
    with pytest.raises(TCAMetadataError) as ei:
        b.validate(model_n_head_kv=[2, 2, 1])
    assert ei.value.key == "tca.n_head_kv"


def test_write_rejects_wrong_shape(model, tmp_path):
    with pytest.raises(TCAMetadataError) as ei:
        gm.write_calibrated(model, tmp_path / "x.gguf", gm.make_random_budgets(4, 2, block_size=64, window=256))
    assert ei.value.key == "tca.n_layer"
    with pytest.raises(TCAMetadataError) as ei:
        gm.write_calibrated(model, tmp_path / "x.gguf", gm.make_random_budgets(3, [2, 2, 3], block_size=64, window=256))
    assert ei.value.key == "tca.n_head_kv"
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("n_layer,heads,key", [(4, 2, "tca.n_layer"), (3, [2, 2, 3], "tca.n_head_kv"),
                                               (2, 2, "tca.n_layer")])
def test_read_rejects_wrong_shape(tmp_path, n_layer, heads, key):
    b = gm.make_random_budgets(n_layer, heads, block_size=64, window=256)
    path = build_model(tmp_path / "m.gguf", gm.tca_kv_items(b))
    with pytest.raises(TCAMetadataError) as ei:
        gm.read_budgets(path)
    assert ei.value.key == key
    assert gm.read_budgets(path, check_model=False) == b


def test_invalid_budgets_not_written(model, tmp_path):
    b = budgets()
    b.window = 100
    with pytest.raises(TCAMetadataError, match="tca.window"):
        gm.write_calibrated(model, tmp_path / "x.gguf", b)
    with pytest.raises(TCAMetadataError, match="tca.budget.candidate"):
        gm.TCABudgets.from_dict({**budgets().to_dict(), "candidate": [0.5] * 6})


# ------------------------------------------------------------------------------------------
# corrupt / truncated / not GGUF

def _cut_points(path):
    r = GGUFReader(str(path))
    kv_mid = r.fields["tokenizer.ggml.tokens"].offset + 40
    tca_mid = r.fields["tca.budget.p"].offset + 60
    ti = r.tensors[0].field.offset + 5
    last = max(r.tensors, key=lambda t: t.data_offset)
    return {"empty": 0, "magic_only": 4, "header_part": 20, "header_only": 24, "kv_mid": kv_mid,
            "tca_mid": tca_mid, "tensor_info": ti, "before_data": r.data_offset,
            "last_tensor": last.data_offset + last.n_bytes - 1}


@pytest.mark.parametrize("where", ["empty", "magic_only", "header_part", "header_only", "kv_mid",
                                   "tca_mid", "tensor_info", "before_data", "last_tensor"])
def test_truncated(model, tmp_path, where):
    cal = tmp_path / "cal.gguf"
    gm.write_calibrated(model, cal, budgets())
    n = _cut_points(cal)[where]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(cal.read_bytes()[:n])
    with deadline():
        for fn in (gm.read_budgets, gm.read_model_shape, gm.read_kv, lambda p: gm.strip(p, tmp_path / "o.gguf"),
                   lambda p: gm.write_calibrated(p, tmp_path / "o.gguf", budgets())):
            with pytest.raises(GGUFError) as ei:
                fn(bad)
            assert str(bad) in str(ei.value)
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("content", [b"not a gguf at all, just some text" * 4,
                                     b"GGUF" + struct.pack("<I", 3) + os.urandom(200),
                                     b"GGUF" + struct.pack("<I", 99) + bytes(100),
                                     b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 5) + b"k.x.y"
                                     + struct.pack("<I", 77) + bytes(16),
                                     bytes(4096)])
def test_not_gguf(tmp_path, content):
    p = tmp_path / "junk.gguf"
    p.write_bytes(content)
    with deadline():
        for fn in (gm.read_budgets, gm.read_model_shape, gm.read_kv):
            with pytest.raises(GGUFError):
                fn(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        gm.read_budgets(tmp_path / "nope.gguf")


# ------------------------------------------------------------------------------------------
# real model (if fetched): streamed copy, strip back to the identical file

_REAL = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not _REAL.exists(), reason="models/SmolLM2-135M-Instruct.Q4_1.gguf not fetched")
def test_real_model(tmp_path):
    arch, n_layer, heads = gm.read_model_shape(_REAL)
    b = gm.make_random_budgets(n_layer, heads, block_size=64, window=1024, seed=9)
    gm.write_calibrated(_REAL, tmp_path / "cal.gguf", b)
    assert gm.read_budgets(tmp_path / "cal.gguf") == b
    gm.strip(tmp_path / "cal.gguf", tmp_path / "plain.gguf")
    assert sha(tmp_path / "plain.gguf") == sha(_REAL)
