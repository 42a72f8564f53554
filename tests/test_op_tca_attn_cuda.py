"""GGML_OP_TCA_ATTN on the CUDA backend (native/ggml-cuda/tca-attn.cu) against the CPU op.

Each case builds fresh seeded inputs (the generator of tests/test_op_tca_attn.py: ragged heads
with gaps, an empty head, NaN in the unused slots between heads, heads stored out of order,
query positions crossing the stored ones), runs the op through a ggml graph on the CUDA backend
(``tca_test_tca_attn_backend("CUDA0", ...)``: inputs uploaded to a CUDA buffer, output poisoned
with NaN) and on the CPU (``tca_test_tca_attn``), both from the same stored K/V values, and
compares. The CPU op itself is checked against a float64 reference in tests/test_op_tca_attn.py.

Every CUDA kernel is exercised, whatever the dispatcher would pick (TCA_CUDA_ATTN=ffma|mma|vec, read
by the op per call), and the dispatch of a GPU without the tensor-core path (sm_75: TCA_CUDA_ATTN=nomma,
TCA_CUDA_SMPBO=65536):
  ffma  f32 arithmetic throughout (every type; the decode path for f32 and q8_0 K/V)
  vec   f16 K/V, f32 arithmetic, rows streamed into registers per warp (the decode path for f16)
  mma1  the single-buffered tensor-core kernel (the default for q8_0, and for f16 with d = 256)
  mma2t1, mma2t2  the double-buffered one (cp.async; f16, d <= 128) with one or two 16-query tiles
        a warp (the default for f16 prefill: two tiles when a KV head has >= 128 queries)
  mma   tensor cores, f16/q8_0 K/V only: q, K and the probabilities are rounded to f16 for the
        products (as upstream's flash attention does); scores, softmax, sums are f32.

Error metric: NMSE = sum((cuda - cpu)^2) / sum(cpu^2). Thresholds, per case (NMSE_MAX):
f32 <= 1e-10, f16 <= 1e-6, q8_0 <= 1e-6; for the one peaked-softmax case (q x 4, logits 4x
larger, so the f16 rounding of q/K in the mma path is amplified 16x in NMSE) f16 <= 2e-6,
q8_0 <= 5e-6. Elements the CPU leaves exactly 0 (empty head, queries that see nothing) must be
exactly 0 on CUDA too, and no NaN may survive the poisoning.

Without a CUDA backend in the build (CI has no GPU) the CUDA tests skip; the CPU-backend
checks of the entry point itself always run.
"""
import os

import numpy as np
import pytest

import _helpers as H
from _helpers import CUDA as BACKEND, KV_TYPES

NMSE_MAX = {"f32": 1e-10, "f16": 1e-6, "q8_0": 1e-6}
NMSE_MAX_PEAKED = {"f32": 1e-10, "f16": 2e-6, "q8_0": 5e-6}


def run_backend(ops, backend, q, k, v, kpos, meta, qpos, scale, kv_type, n_threads=4, n_head_kv=None):
    ffi, lib = ops
    n_head, n_tokens, d = q.shape
    if n_head_kv is None:
        n_head_kv = len(meta) // 2
    q, k, v = H.f32(q), H.f32(k), H.f32(v)
    kpos, meta, qpos = H.i32(kpos), H.i32(meta), H.i32(qpos)
    out = np.full((n_tokens, n_head, d), 12345.0, dtype=np.float32)
    rc = lib.tca_test_tca_attn_backend(backend.encode(), d, n_head, n_head_kv, n_tokens, k.shape[0],
                                       KV_TYPES.get(kv_type, kv_type),
                                       H.ptr(ffi, q, "float *"), H.ptr(ffi, k, "float *"), H.ptr(ffi, v, "float *"),
                                       H.ptr(ffi, kpos, "int32_t *"), H.ptr(ffi, meta, "int32_t *"),
                                       H.ptr(ffi, qpos, "int32_t *"), float(scale), n_threads,
                                       H.ptr(ffi, out, "float *"))
    return rc, out


@pytest.fixture
def kernel(request, monkeypatch):
    """which CUDA kernel: 'auto' (the dispatcher), 'ffma', 'mma', 'mma1', 'mma2', 'mma2t1', 'mma2t2' or 'vec'
    (TCA_CUDA_ATTN, read per call)"""
    which = getattr(request, "param", "auto")
    if which == "auto":
        monkeypatch.delenv("TCA_CUDA_ATTN", raising=False)
    else:
        monkeypatch.setenv("TCA_CUDA_ATTN", which)
    return which


_NMSE = {}   # (kv_type, kernel) -> NMSEs seen, reported when TCA_NMSE_REPORT names a file


@pytest.fixture(scope="module", autouse=True)
def _nmse_report():
    yield
    path = os.environ.get("TCA_NMSE_REPORT")
    if path and _NMSE:
        with open(path, "a") as f:
            for (kv, which), es in sorted(_NMSE.items()):
                es = np.array(es)
                f.write(f"{kv:5s} {which:5s} cases={len(es):3d} NMSE(cuda, cpu) max={es.max():.2e} "
                        f"median={np.median(es):.2e}\n")


def compare(ops, case, kv_type, limits=NMSE_MAX):
    q, k, v, kpos, meta, qpos, scale = case
    rc, cpu = H.run_op(ops, q, k, v, kpos, meta, qpos, scale, kv_type, n_threads=4)
    assert rc == 0
    rc, gpu = run_backend(ops, BACKEND, q, k, v, kpos, meta, qpos, scale, kv_type)
    assert rc == 0, f"CUDA rc {rc}"
    assert not np.isnan(gpu).any(), "poisoned output survived on CUDA (an element was not written)"
    zero = cpu == 0.0
    assert np.all(gpu[zero] == 0.0), "an output the CPU leaves exactly 0 is not 0 on CUDA"
    e = H.nmse(gpu, cpu.astype(np.float64))
    _NMSE.setdefault((kv_type, os.environ.get("TCA_CUDA_ATTN", "auto")), []).append(e)
    assert e <= limits[kv_type], f"NMSE(cuda, cpu) {e:.3e} > {limits[kv_type]:.0e}"
    return e, cpu, gpu


def _paths(kv):
    return ["auto"] if kv == "f32" else ["ffma", "mma1", "mma2t1", "mma2t2", "vec"] if kv == "f16" else ["ffma", "mma"]


# ------------------------------------------------------------------------ accuracy
CASES = [(kv, path, d, g, t) for kv in KV_TYPES for path in _paths(kv)
         for d in (64, 128, 256) for g in (1, 2, 7, 8) for t in (1, 5, 64, 300)]


@pytest.mark.parametrize("kv_type,kernel,d,gqa,n_tokens", CASES, indirect=["kernel"])
def test_cuda_matches_cpu(cuda, kernel, kv_type, d, gqa, n_tokens):
    seed = d * 1000 + gqa * 100 + n_tokens + 7 * list(KV_TYPES).index(kv_type)
    case = H.make_case(seed, d, gqa, n_tokens, empty_head=(d != 128))
    compare(cuda, case, kv_type)


def make_long_case(seed, d, gqa, n_tokens, lens, qscale=1.0):
    """Long ragged heads (split-K over many chunks), one of them possibly empty, a sparse aged
    part and a dense tail; slots between heads hold NaN."""
    rng = np.random.default_rng(seed)
    n_head_kv = len(lens)
    P = max(lens) + n_tokens + 50
    qpos = np.arange(P - n_tokens, P)
    rows_pos = []
    for ln in lens:
        if ln == 0:
            rows_pos.append(np.zeros(0, np.int64))
            continue
        tail = min(ln // 3, 300)
        aged = np.sort(rng.choice(P - tail, size=ln - tail, replace=False))
        rows_pos.append(np.concatenate([aged, np.arange(P - tail, P)]))
    return H.pack_case(rng, rows_pos, rng.permutation(n_head_kv), 3, 40, -3, d, gqa * n_head_kv, qpos, qscale)


LONG = [(kv, path, d, t) for kv in KV_TYPES for path in _paths(kv) for d in (64, 128) for t in (1, 3, 64)]


@pytest.mark.parametrize("kv_type,kernel,d,n_tokens", LONG, indirect=["kernel"])
def test_cuda_long_ragged_heads_split(cuda, kernel, kv_type, d, n_tokens):
    case = make_long_case(d + n_tokens, d, 4, n_tokens, lens=[3000, 0, 777, 6100])
    compare(cuda, case, kv_type)


@pytest.mark.parametrize("kernel", ["auto", "ffma", "mma", "mma1", "mma2t1", "mma2t2", "vec"], indirect=True)
@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_cuda_unsorted_rows_large_logits(cuda, kernel, kv_type):
    case = H.make_case(99, 128, 4, 37, n_head_kv=2, empty_head=False, shuffle_rows=True, qscale=4.0)
    compare(cuda, case, kv_type, NMSE_MAX_PEAKED)


@pytest.mark.parametrize("kernel", ["ffma", "mma", "mma1", "mma2t1", "mma2t2", "vec"], indirect=True)
def test_cuda_queries_that_see_nothing_give_zero(cuda, kernel):
    case = H.blind_queries_case(16)                       # 16 query heads: the mma kernel can run
    v = case[2]
    for kv in ("f32", "f16"):
        _, cpu, gpu = compare(cuda, case, kv)
        assert np.all(gpu[:2] == 0.0)
        if kv == "f32":   # one visible key: that key's value row
            np.testing.assert_allclose(gpu[2, 0], v[0], rtol=1e-6, atol=1e-6)


def test_cuda_no_slots_at_all(cuda):
    q = np.ones((4, 3, 64), np.float32)
    empty = np.zeros((0, 64), np.float32)
    rc, out = run_backend(cuda, BACKEND, q, empty, empty, np.zeros(0), np.array([0, 0, 0, 0]),
                          np.array([0, 1, 2]), 0.125, "f16")
    assert rc == 0
    assert np.all(out == 0.0)


@pytest.mark.parametrize("kernel,kv", [("ffma", "q8_0"), ("mma", "q8_0"), ("mma1", "f16"), ("mma2t1", "f16"), ("mma2t2", "f16"), ("vec", "f16")], indirect=["kernel"])
def test_cuda_deterministic(cuda, kernel, kv):
    case = make_long_case(3, 128, 8, 5, lens=[900, 2000])
    q, k, v, kpos, meta, qpos, scale = case
    a = run_backend(cuda, BACKEND, q, k, v, kpos, meta, qpos, scale, kv)
    b = run_backend(cuda, BACKEND, q, k, v, kpos, meta, qpos, scale, kv)
    assert a[0] == 0 and b[0] == 0
    assert np.array_equal(a[1], b[1])


def test_cuda_unsupported_shapes_are_refused(cuda):
    # d = 48: the CPU op runs it, the CUDA backend must refuse it (the scheduler keeps it on the CPU)
    q = np.zeros((2, 1, 48), np.float32)
    k = np.zeros((4, 48), np.float32)
    args = (q, k, k, np.arange(4), np.array([0, 4]), np.array([9]), 0.1, "f16")
    assert H.run_op(cuda, *args)[0] == 0
    assert run_backend(cuda, BACKEND, *args)[0] == cuda[1].TCA_TEST_E_UNSUPP


# ------------------------------------------------------------------------ GPUs without the tensor-core path
@pytest.fixture
def sm75(monkeypatch):
    """the dispatcher as on an sm_75 GPU (RTX 20xx) on whatever GPU runs the tests: no tensor-core
    kernels (TCA_CUDA_ATTN=nomma: the vector kernel for f16 decode, FFMA otherwise) and 64 KiB of
    shared memory a block (TCA_CUDA_SMPBO), so the FFMA query tile shrinks (d = 128: 32 -> 8 queries)"""
    monkeypatch.setenv("TCA_CUDA_ATTN", "nomma")
    monkeypatch.setenv("TCA_CUDA_SMPBO", "65536")


SM75 = [(kv, d, g, t) for kv in KV_TYPES for d in (64, 128) for g in (1, 8) for t in (1, 64, 300)]


@pytest.mark.parametrize("kv_type,d,gqa,n_tokens", SM75)
def test_cuda_sm75_dispatch_matches_cpu(cuda, sm75, kv_type, d, gqa, n_tokens):
    seed = 5000 + d * 10 + gqa * 100 + n_tokens + 7 * list(KV_TYPES).index(kv_type)
    compare(cuda, H.make_case(seed, d, gqa, n_tokens, empty_head=True), kv_type)


def test_cuda_sm75_refuses_d256(cuda, sm75):
    # d = 256: the FFMA tile needs 67 KiB of shared memory, over sm_75's 64 KiB: refused (a
    # TCAConfigError at context creation, never a launch that fails)
    q = np.zeros((2, 1, 256), np.float32)
    k = np.zeros((4, 256), np.float32)
    args = (q, k, k, np.arange(4), np.array([0, 4]), np.array([9]), 0.1, "f16")
    assert run_backend(cuda, BACKEND, *args)[0] == cuda[1].TCA_TEST_E_UNSUPP


# ------------------------------------------------------------------------ the entry point (no GPU needed)
def test_backend_entry_on_cpu_matches_direct_cpu_op(ops):
    for kv in KV_TYPES:
        q, k, v, kpos, meta, qpos, scale = H.make_case(17, 64, 7, 5, n_head_kv=3, empty_head=True)
        rc0, direct = H.run_op(ops, q, k, v, kpos, meta, qpos, scale, kv, n_threads=2)
        rc1, viabe = run_backend(ops, "CPU", q, k, v, kpos, meta, qpos, scale, kv, n_threads=2)
        assert rc0 == 0 and rc1 == 0
        assert np.array_equal(direct, viabe)


def test_backend_entry_errors(ops):
    q, k, v, kpos, meta, qpos, scale = H.make_case(3, 64, 2, 5, n_head_kv=2, empty_head=False)
    assert run_backend(ops, "NO-SUCH-BACKEND", q, k, v, kpos, meta, qpos, scale, "f32")[0] == ops[1].TCA_TEST_E_BACKEND
    bad = meta.copy()
    bad[3] = k.shape[0]
    assert run_backend(ops, "CPU", q, k, v, kpos, bad, qpos, scale, "f32")[0] < 0
    assert run_backend(ops, "CPU", q, k, v, kpos, meta, qpos, scale, 2)[0] < 0   # q4_0
