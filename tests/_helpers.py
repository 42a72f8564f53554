"""Helpers shared by the tests (imported as a module: pytest puts tests/ on sys.path).

The test library: libtca_ggml_test.so (native/tests/tca_test_ops.cpp), the test and benchmark
entry points of the TCA graph ops, built beside libtca_ggml.so (CMake option TCA_GGML_BUILD_TESTS,
on by default; installed in tca_ggml/lib/). Its cffi declarations are read from its header,
native/tests/tca_test_ops.h, by the same code that reads tca_ggml.h for the package
(``_native.cdef_from_header``). The ``ops`` fixture (conftest.py) is ``(ffi, lib)`` of it.

The op helpers (``run_op``, ``make_case``, the float64 ``reference`` of GGML_OP_TCA_ATTN, ...) are
shared by tests/test_op_tca_*.py and tests/test_tca_cuda_e2e.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TEST_HEADER = REPO / "native" / "tests" / "tca_test_ops.h"
TEST_LIB_NAME = "libtca_ggml_test.so"
CUDA = os.environ.get("TCA_CUDA_BACKEND", "CUDA0")   # the CUDA backend the CUDA cases run on
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


# ------------------------------------------------------------------------ the test library
def ops_library_path() -> Path:
    """TCA_GGML_TEST_LIB, else libtca_ggml_test.so beside the libtca_ggml.so the package loads
    (tca_ggml/lib/, or the directory of TCA_GGML_LIB)."""
    env = os.environ.get("TCA_GGML_TEST_LIB")
    if env:
        return Path(env)
    from tca_ggml import _native
    return _native.library_path().with_name(TEST_LIB_NAME)


def open_ops_library():
    """(ffi, lib) of the test library, declarations from native/tests/tca_test_ops.h. The package's
    library is loaded first, so that the test library binds to that very libtca_ggml.so."""
    from tca_ggml import _native
    _native.lib()
    return _native.open_library(ops_library_path(), TEST_HEADER)


def has_backend(ops, backend: str) -> bool:
    """Whether this build and machine have the ggml backend `backend` (e.g. "CUDA0")."""
    ffi, lib = ops
    q, k, m, o = f32(np.zeros(64)), f32(np.zeros(64)), i32([0, 1]), f32(np.zeros(1))
    rc = lib.tca_test_tca_score_backend(backend.encode(), 64, 1, 1, 1, 0, ptr(ffi, q, "float *"),
                                        ptr(ffi, k, "float *"), ptr(ffi, m, "int32_t *"), 1.0, 1,
                                        ptr(ffi, o, "float *"))
    return rc != lib.TCA_TEST_E_BACKEND


# ------------------------------------------------------------------------ arrays
def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


def ptr(ffi, a, ctype):
    if a is None:
        return ffi.NULL
    return ffi.cast(ctype, ffi.from_buffer(a))


# ------------------------------------------------------------------------ GGML_OP_TCA_ATTN
def run_op(ops, q, k, v, kpos, meta, qpos, scale, kv_type, n_threads=2, n_head_kv=None):
    """q [n_head, n_tokens, d]; k, v [n_slots, d]; returns (rc, out [n_tokens, n_head, d])."""
    ffi, lib = ops
    n_head, n_tokens, d = q.shape
    n_slots = k.shape[0]
    if n_head_kv is None:
        n_head_kv = len(meta) // 2
    q, k, v = f32(q), f32(k), f32(v)
    kpos, meta, qpos = i32(kpos), i32(meta), i32(qpos)
    out = np.full((n_tokens, n_head, d), 12345.0, dtype=np.float32)
    rc = lib.tca_test_tca_attn(d, n_head, n_head_kv, n_tokens, n_slots, KV_TYPES.get(kv_type, kv_type),
                               ptr(ffi, q, "float *"), ptr(ffi, k, "float *"), ptr(ffi, v, "float *"),
                               ptr(ffi, kpos, "int32_t *"), ptr(ffi, meta, "int32_t *"),
                               ptr(ffi, qpos, "int32_t *"), float(scale), n_threads,
                               ptr(ffi, out, "float *"))
    return rc, out


def dequant(ops, kv_type, x):
    ffi, lib = ops
    x = f32(x)
    y = np.empty_like(x)
    rc = lib.tca_test_tca_attn_dequant(KV_TYPES[kv_type], x.shape[1], x.shape[0],
                                       ptr(ffi, x, "float *"), ptr(ffi, y, "float *"))
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
    return pack_case(rng, rows_pos, order, int(rng.integers(0, 7)), 9, -7, d, n_head, qpos, qscale)


def pack_case(rng, rows_pos, order, first, max_gap, unused_pos, d, n_head, qpos, qscale=1.0):
    """An op case from each KV head's retained positions ``rows_pos[g]``: the heads' rows stored
    in ``order`` from slot ``first`` on, a random gap of [0, max_gap) unused slots after each
    (K/V NaN, position ``unused_pos``); random K/V rows and queries (``n_head`` heads, one token
    a position of ``qpos``, scaled by ``qscale``). Returns (q, k, v, kpos, meta, qpos, scale)."""
    n_head_kv = len(rows_pos)
    meta = np.zeros(2 * n_head_kv, np.int64)
    cursor = first
    for g in order:
        meta[2 * g], meta[2 * g + 1] = cursor, len(rows_pos[g])
        cursor += len(rows_pos[g]) + int(rng.integers(0, max_gap))
    k = np.full((cursor, d), np.nan, np.float32)
    v = np.full((cursor, d), np.nan, np.float32)
    kpos = np.full(cursor, unused_pos, np.int64)
    for g in range(n_head_kv):
        off, ln = meta[2 * g], meta[2 * g + 1]
        k[off:off + ln] = rng.normal(size=(ln, d))
        v[off:off + ln] = rng.normal(size=(ln, d))
        kpos[off:off + ln] = rows_pos[g]
    q = (rng.normal(size=(n_head, len(qpos), d)) * qscale).astype(np.float32)
    return q, k, v, kpos, meta, qpos, 1.0 / np.sqrt(d)


def blind_queries_case(n_head):
    """Queries at positions 50 and 99 see no key (keys at 100..109), 100 sees exactly one,
    int32 max sees all: (q, k, v, kpos, meta, qpos, scale) with one KV head of 10 rows."""
    d, T = 64, 6
    rng = np.random.default_rng(5)
    k = rng.normal(size=(10, d)).astype(np.float32)
    v = rng.normal(size=(10, d)).astype(np.float32)
    kpos = np.arange(100, 110)
    meta = np.array([0, 10])
    qpos = np.array([50, 99, 100, 104, 109, 2**31 - 1])
    q = rng.normal(size=(n_head, T, d)).astype(np.float32)
    return q, k, v, kpos, meta, qpos, 0.125


def peaked_attention(n, G=2, d=16, n_sink=4, seed=17):
    """(Qg [n, G, d], Kg [n, d]) where every query attends almost only to one token (position
    n_sink, not a sink, in aged block 0): the sparsest candidate covers it."""
    rng = np.random.default_rng(seed)
    u = np.zeros(d)
    u[0] = 1.0
    Kg = rng.normal(size=(n, d))
    Kg[:, 0] = 0.0
    Kg[n_sink] = 20 * u
    Qg = rng.normal(size=(n, G, d)) * 0.1 + 20 * u
    return Qg, Kg


def stored(ops, kv_type, x, meta):
    """x rounded through the KV type, head by head (unused NaN slots stay NaN)."""
    y = x.copy()
    for g in range(len(meta) // 2):
        off, ln = int(meta[2 * g]), int(meta[2 * g + 1])
        if ln:
            y[off:off + ln] = dequant(ops, kv_type, x[off:off + ln])
    return y


def tiny_gguf(tmp_path_factory, tag: str, seed: int, **kw) -> str:
    """A tiny random-weight f32 GGUF (tca_ggml.random_model's "tiny" shape) in a fresh temp folder."""
    from tca_ggml.random_model import write_random_gguf
    path = str(tmp_path_factory.mktemp(tag) / "tiny.gguf")
    write_random_gguf(path, "tiny", "f32", seed=seed, **kw)
    return path
