"""GGML_OP_TCA_ATTN (native/ggml-cpu/tca-attn.cpp) against a float64 NumPy reference.

test-backend-ops style: each case builds fresh seeded inputs, runs the op through a ggml
graph on the CPU backend (via ``tca_test_tca_attn`` in native/src/tca_test_ops.cpp, which
poisons the output with NaN first) and compares with the exact semantics of the op
(ggml.h, design §3):

    query head h reads KV head g = h // (n_head // n_head_kv), whose rows are the slots
    meta[2g] .. meta[2g] + meta[2g+1] - 1; key j is visible to token t iff
    kpos[j] <= qpos[t]; o = softmax(scale * q . K^T) V over the visible rows, 0 if none.

The reference uses the K/V values exactly as stored (rounded through the KV type by
``tca_test_tca_attn_dequant``), so any error left is the kernel's f32 arithmetic.

Error metric: NMSE = sum((out - ref)^2) / sum(ref^2). Thresholds, per case: f32 <= 1e-10,
f16 <= 1e-6, q8_0 <= 1e-6 against the reference on the stored values (NMSE_MAX); against the
unrounded inputs only a loose sanity bound (NMSE_RAW_MAX). No NaN may survive the poisoning,
and bad arguments must return a negative code, never abort.
"""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

cffi = pytest.importorskip("cffi")

NMSE_MAX = {"f32": 1e-10, "f16": 1e-6, "q8_0": 1e-6}   # vs the reference on stored values
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
# vs the reference on the unrounded f32 inputs: only a sanity check that the type is used
NMSE_RAW_MAX = {"f32": 1e-10, "f16": 1e-5, "q8_0": 1e-3}

_CDEF = """
int tca_test_tca_attn(int d, int n_head, int n_head_kv, int n_tokens, int n_slots, int kv_type,
                      const float * q, const float * k, const float * v, const int32_t * kpos,
                      const int32_t * meta, const int32_t * qpos, float scale, int n_threads,
                      float * out);
int tca_test_tca_attn_dequant(int kv_type, int d, int n_rows, const float * src, float * dst);
"""


def _lib_path() -> Path:
    env = os.environ.get("TCA_GGML_LIB")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("tca_ggml")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("tca_ggml is not importable and TCA_GGML_LIB is not set")
    return Path(list(spec.submodule_search_locations)[0]) / "lib" / "libtca_ggml.so"


@pytest.fixture(scope="module")
def op():
    path = _lib_path()
    if not path.exists():
        if os.environ.get("TCA_GGML_LIB"):
            pytest.fail(f"TCA_GGML_LIB={path} does not exist")
        pytest.fail(f"native library not built ({path}): the package must ship it")
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    lib = ffi.dlopen(str(path))
    return ffi, lib


# ------------------------------------------------------------------------ helpers
def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


def _ptr(ffi, a, ctype):
    if a is None:
        return ffi.NULL
    return ffi.cast(ctype, ffi.from_buffer(a))


def run_op(op, q, k, v, kpos, meta, qpos, scale, kv_type, n_threads=2, n_head_kv=None):
    """q [n_head, n_tokens, d]; k, v [n_slots, d]; returns (rc, out [n_tokens, n_head, d])."""
    ffi, lib = op
    n_head, n_tokens, d = q.shape
    n_slots = k.shape[0]
    if n_head_kv is None:
        n_head_kv = len(meta) // 2
    q, k, v = _f32(q), _f32(k), _f32(v)
    kpos, meta, qpos = _i32(kpos), _i32(meta), _i32(qpos)
    out = np.full((n_tokens, n_head, d), 12345.0, dtype=np.float32)
    rc = lib.tca_test_tca_attn(d, n_head, n_head_kv, n_tokens, n_slots, KV_TYPES.get(kv_type, kv_type),
                               _ptr(ffi, q, "float *"), _ptr(ffi, k, "float *"), _ptr(ffi, v, "float *"),
                               _ptr(ffi, kpos, "int32_t *"), _ptr(ffi, meta, "int32_t *"),
                               _ptr(ffi, qpos, "int32_t *"), float(scale), n_threads,
                               _ptr(ffi, out, "float *"))
    return rc, out


def dequant(op, kv_type, x):
    ffi, lib = op
    x = _f32(x)
    y = np.empty_like(x)
    rc = lib.tca_test_tca_attn_dequant(KV_TYPES[kv_type], x.shape[1], x.shape[0],
                                       _ptr(ffi, x, "float *"), _ptr(ffi, y, "float *"))
    assert rc == 0
    return y


def reference(q, k, v, kpos, meta, qpos, scale):
    """float64 statement of the op. q [n_head, T, d]; k, v [n_slots, d] -> [T, n_head, d]."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    n_head, T, d = q.shape
    n_head_kv = len(meta) // 2
    G = n_head // n_head_kv
    out = np.zeros((T, n_head, d))
    for h in range(n_head):
        g = h // G
        off, ln = int(meta[2 * g]), int(meta[2 * g + 1])
        K, V, kp = k[off:off + ln], v[off:off + ln], np.asarray(kpos[off:off + ln], np.int64)
        if ln == 0:
            continue
        # np.einsum (optimize=False) never calls BLAS: BLAS threads would fight the
        # library's spinning OpenMP workers for the cores and slow every case down ~100x
        logits = np.einsum("td,kd->tk", q[h], K) * scale               # [T, ln]
        vis = kp[None, :] <= np.asarray(qpos, np.int64)[:, None]
        logits = np.where(vis, logits, -np.inf)
        m = logits.max(axis=1, keepdims=True)
        ok = np.isfinite(m[:, 0])
        p = np.where(vis, np.exp(logits - np.where(ok[:, None], m, 0.0)), 0.0)
        s = p.sum(axis=1, keepdims=True)
        o = np.einsum("tk,kd->td", p, V) / np.where(s > 0, s, 1.0)
        out[:, h] = np.where(ok[:, None], o, 0.0)
    return out


def nmse(out, ref):
    den = float(np.sum(ref * ref))
    return float(np.sum((out.astype(np.float64) - ref) ** 2)) / max(den, 1e-300)


def make_case(seed, d, gqa, n_tokens, n_head_kv=3, empty_head=True, shuffle_rows=False, qscale=1.0):
    """Ragged retained sets with gaps, a possibly empty head, unused (NaN) slots between heads,
    heads stored out of order, and query positions crossing the stored positions."""
    rng = np.random.default_rng(seed)
    n_head = gqa * n_head_kv
    P = int(rng.integers(150, 260))                     # tokens seen
    qpos = np.arange(P - n_tokens, P)                   # the ubatch: last n_tokens positions
    rows_pos = []
    for g in range(n_head_kv):
        if empty_head and g == 1:
            rows_pos.append(np.zeros(0, np.int64))
            continue
        dens = rng.uniform(0.05, 0.6)                   # sparse aged part with gaps
        aged = np.flatnonzero(rng.random(P) < dens)
        live0 = P - n_tokens - int(rng.integers(0, 40))  # dense live region (crosses qpos)
        pos = np.union1d(aged[aged < live0], np.arange(max(live0, 0), P))
        pos = np.union1d(pos, np.arange(min(4, P)))      # sinks
        if shuffle_rows:
            pos = rng.permutation(pos)
        rows_pos.append(pos)
    # slot layout: heads in a random order, random unused gaps between them (NaN there)
    order = rng.permutation(n_head_kv)
    meta = np.zeros(2 * n_head_kv, np.int64)
    cursor = int(rng.integers(0, 7))
    for g in order:
        meta[2 * g], meta[2 * g + 1] = cursor, len(rows_pos[g])
        cursor += len(rows_pos[g]) + int(rng.integers(0, 9))
    n_slots = cursor
    k = np.full((n_slots, d), np.nan, np.float32)
    v = np.full((n_slots, d), np.nan, np.float32)
    kpos = np.full(n_slots, -7, np.int64)
    for g in range(n_head_kv):
        off, ln = meta[2 * g], meta[2 * g + 1]
        k[off:off + ln] = rng.normal(size=(ln, d))
        v[off:off + ln] = rng.normal(size=(ln, d))
        kpos[off:off + ln] = rows_pos[g]
    q = (rng.normal(size=(n_head, n_tokens, d)) * qscale).astype(np.float32)
    return q, k, v, kpos, meta, qpos, 1.0 / np.sqrt(d)


def _stored(op, kv_type, x, meta):
    """x rounded through the KV type, head by head (unused NaN slots stay NaN)."""
    y = x.copy()
    for g in range(len(meta) // 2):
        off, ln = int(meta[2 * g]), int(meta[2 * g + 1])
        if ln:
            y[off:off + ln] = dequant(op, kv_type, x[off:off + ln])
    return y


# ------------------------------------------------------------------------ accuracy
CASES = [(kv, d, g, t) for kv in KV_TYPES for d in (64, 128, 256) for g in (1, 2, 7, 8) for t in (1, 5, 64)]


@pytest.mark.parametrize("kv_type,d,gqa,n_tokens", CASES)
def test_matches_reference(op, kv_type, d, gqa, n_tokens):
    seed = d * 1000 + gqa * 100 + n_tokens + 7 * list(KV_TYPES).index(kv_type)
    q, k, v, kpos, meta, qpos, scale = make_case(seed, d, gqa, n_tokens, empty_head=(d != 128))
    rc, out = run_op(op, q, k, v, kpos, meta, qpos, scale, kv_type)
    assert rc == 0
    assert not np.isnan(out).any(), "poisoned output survived (an element was not written)"
    ref = reference(q, _stored(op, kv_type, k, meta), _stored(op, kv_type, v, meta), kpos, meta, qpos, scale)
    e = nmse(out, ref)
    assert e <= NMSE_MAX[kv_type], f"NMSE {e:.3e} > {NMSE_MAX[kv_type]:.0e}"
    raw = nmse(out, reference(q, k, v, kpos, meta, qpos, scale))
    assert raw <= NMSE_RAW_MAX[kv_type], f"NMSE vs unrounded inputs {raw:.3e}"
    # the empty head's query group and fully masked queries are exactly zero
    G = q.shape[0] // (len(meta) // 2)
    for g in range(len(meta) // 2):
        if meta[2 * g + 1] == 0:
            assert np.all(out[:, g * G:(g + 1) * G] == 0.0)


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_unsorted_rows_large_logits_and_long_heads(op, kv_type):
    # rows not in position order; q scaled so that softmax is peaked (online-max rescaling);
    # heads longer than one 64-row chunk with masks inside chunks
    q, k, v, kpos, meta, qpos, scale = make_case(99, 128, 4, 37, n_head_kv=2, empty_head=False,
                                                 shuffle_rows=True, qscale=4.0)
    rc, out = run_op(op, q, k, v, kpos, meta, qpos, scale, kv_type, n_threads=2)
    assert rc == 0 and not np.isnan(out).any()
    ref = reference(q, _stored(op, kv_type, k, meta), _stored(op, kv_type, v, meta), kpos, meta, qpos, scale)
    assert nmse(out, ref) <= NMSE_MAX[kv_type]


def test_queries_that_see_nothing_give_zero(op):
    d, T = 64, 6
    rng = np.random.default_rng(5)
    k = rng.normal(size=(10, d)).astype(np.float32)
    v = rng.normal(size=(10, d)).astype(np.float32)
    kpos = np.arange(100, 110)
    meta = np.array([0, 10])
    qpos = np.array([50, 99, 100, 104, 109, 2**31 - 1])    # the first two see no key; int32 max sees all
    q = rng.normal(size=(2, T, d)).astype(np.float32)
    rc, out = run_op(op, q, k, v, kpos, meta, qpos, 0.125, "f32")
    assert rc == 0
    assert np.all(out[:2] == 0.0)
    # a query seeing exactly one key returns that key's value row
    np.testing.assert_allclose(out[2, 0], v[0], rtol=1e-6, atol=1e-6)
    ref = reference(q, k, v, kpos, meta, qpos, 0.125)
    assert nmse(out, ref) <= NMSE_MAX["f32"]


def test_no_slots_at_all(op):
    q = np.ones((4, 3, 64), np.float32)
    empty = np.zeros((0, 64), np.float32)
    rc, out = run_op(op, q, empty, empty, np.zeros(0), np.array([0, 0, 0, 0]), np.array([0, 1, 2]), 0.125, "f16")
    assert rc == 0
    assert np.all(out == 0.0)


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_bit_identical_for_any_thread_count(op, kv_type):
    q, k, v, kpos, meta, qpos, scale = make_case(7, 64, 7, 19, n_head_kv=2, empty_head=False)
    outs = []
    for nt in (1, 2, 3, 8):
        rc, out = run_op(op, q, k, v, kpos, meta, qpos, scale, kv_type, n_threads=nt)
        assert rc == 0
        outs.append(out)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_nmse_thresholds_are_meaningful(op):
    # a wrong GQA mapping (h % n_head_kv instead of h // G) must be far above every threshold
    q, k, v, kpos, meta, qpos, scale = make_case(11, 64, 2, 5, n_head_kv=3, empty_head=False)
    rc, out = run_op(op, q, k, v, kpos, meta, qpos, scale, "f32")
    assert rc == 0
    n_head = q.shape[0]
    perm = np.array([(h % 3) * 2 + (h // 3) for h in range(n_head)])   # scrambles the group map
    wrong = reference(q[perm], k, v, kpos, meta, qpos, scale)[:, np.argsort(perm)]
    assert nmse(out, wrong) > 1e-2


# ------------------------------------------------------------------------ bad arguments
def test_bad_arguments_return_error_codes(op):
    ffi, lib = op
    q, k, v, kpos, meta, qpos, scale = make_case(3, 64, 2, 5, n_head_kv=2, empty_head=False)
    good = dict(q=q, k=k, v=v, kpos=kpos, meta=meta, qpos=qpos, scale=scale, kv_type="f32")
    rc, _ = run_op(op, **good)
    assert rc == 0

    def rc_of(**over):
        a = dict(good)
        a.update(over)
        return run_op(op, **a)[0]

    assert rc_of(n_head_kv=3) < 0                          # n_head % n_head_kv != 0
    assert rc_of(n_head_kv=0) < 0
    assert rc_of(kv_type=2) < 0                            # q4_0: not an accepted KV type
    assert rc_of(kv_type=99) < 0
    bad = meta.copy(); bad[3] = k.shape[0]                 # head range past n_slots
    assert rc_of(meta=bad) < 0
    bad = meta.copy(); bad[0] = -1
    assert rc_of(meta=bad) < 0
    bad = meta.copy(); bad[1] = -5
    assert rc_of(meta=bad) < 0
    assert rc_of(scale=float("nan")) < 0
    assert rc_of(scale=float("inf")) < 0
    assert run_op(op, **good, n_threads=0)[0] < 0
    # q8_0 needs d % 32 == 0
    q48 = np.zeros((2, 1, 48), np.float32)
    k48 = np.zeros((4, 48), np.float32)
    assert run_op(op, q48, k48, k48, np.arange(4), np.array([0, 4]), np.array([9]), 0.1, "q8_0")[0] < 0
    assert run_op(op, q48, k48, k48, np.arange(4), np.array([0, 4]), np.array([9]), 0.1, "f16")[0] == 0

    # raw calls: NULL pointers and non-positive sizes
    d, T, S = 64, 5, k.shape[0]
    kp, mp, qp = _i32(kpos), _i32(meta), _i32(qpos)
    qf, kf, vf = _f32(q), _f32(k), _f32(v)
    out = np.zeros((T, 4, d), np.float32)
    P = lambda a, t="float *": _ptr(ffi, a, t)  # noqa: E731
    I = lambda a: _ptr(ffi, a, "int32_t *")     # noqa: E731
    call = lambda *a: lib.tca_test_tca_attn(*a)  # noqa: E731
    assert call(d, 4, 2, T, S, 0, P(qf), P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) == 0
    assert call(d, 4, 2, T, S, 0, ffi.NULL, P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) < 0
    assert call(d, 4, 2, T, S, 0, P(qf), ffi.NULL, P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) < 0
    assert call(d, 4, 2, T, S, 0, P(qf), P(kf), P(vf), ffi.NULL, I(mp), I(qp), scale, 2, P(out)) < 0
    assert call(d, 4, 2, T, S, 0, P(qf), P(kf), P(vf), I(kp), ffi.NULL, I(qp), scale, 2, P(out)) < 0
    assert call(d, 4, 2, T, S, 0, P(qf), P(kf), P(vf), I(kp), I(mp), ffi.NULL, scale, 2, P(out)) < 0
    assert call(d, 4, 2, T, S, 0, P(qf), P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, ffi.NULL) < 0
    assert call(0, 4, 2, T, S, 0, P(qf), P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) < 0
    assert call(-64, 4, 2, T, S, 0, P(qf), P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) < 0
    assert call(d, 0, 2, T, S, 0, P(qf), P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) < 0
    assert call(d, 4, 2, 0, S, 0, P(qf), P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) < 0
    assert call(d, 4, 2, T, -1, 0, P(qf), P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) < 0
    assert call(d, 4, -2, T, S, 0, P(qf), P(kf), P(vf), I(kp), I(mp), I(qp), scale, 2, P(out)) < 0
    # dequant helper
    x = np.zeros((2, 48), np.float32)
    assert lib.tca_test_tca_attn_dequant(8, 48, 2, P(x), P(x)) < 0
    assert lib.tca_test_tca_attn_dequant(0, 0, 2, P(x), P(x)) < 0
    assert lib.tca_test_tca_attn_dequant(0, 48, -1, P(x), P(x)) < 0
    assert lib.tca_test_tca_attn_dequant(0, 48, 2, ffi.NULL, P(x)) < 0
    assert lib.tca_test_tca_attn_dequant(5, 48, 2, P(x), P(x)) < 0


def test_reference_agrees_with_tca_ggml_reference(op):
    """The in-test reference and tca_ggml.reference.sparse_attention state the same math."""
    p = Path(__file__).resolve().parent.parent / "python" / "tca_ggml" / "reference.py"
    spec = importlib.util.spec_from_file_location("_tca_reference_for_op_test", p)
    R = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(R)
    q, k, v, kpos, meta, qpos, scale = make_case(21, 64, 7, 5, n_head_kv=3, empty_head=True)
    ours = reference(q, k, v, kpos, meta, qpos, scale)
    G = 7
    for g in range(3):
        off, ln = int(meta[2 * g]), int(meta[2 * g + 1])
        theirs = R.sparse_attention(np.transpose(q[g * G:(g + 1) * G], (1, 0, 2)), k[off:off + ln],
                                    v[off:off + ln], qpos, kpos[off:off + ln], scale)
        np.testing.assert_allclose(ours[:, g * G:(g + 1) * G], theirs, rtol=1e-12, atol=1e-12)
