"""GGML_OP_TCA_SCORE (the importance the retention cache selects with) and the f32 form of
GGML_OP_TCA_ATTN's kpos (the retention cache's layout).

- CPU op vs a float64 NumPy reference on the stored (type-rounded) K: for each KV head g and
  row r of g, s[r] = mean over g's query heads of softmax_r(scale * q_h . k_r); 0 elsewhere.
- CUDA op vs the CPU op on the same inputs (skipped without a CUDA backend: CI has no GPU).
- tca_attn with kpos as f32 equals tca_attn with kpos as i32, bit for bit (CPU and CUDA).
Cases reuse the op tests' generator (tests/_helpers.py make_case): ragged heads with gaps, an
empty head, NaN in the unused slots, heads stored out of order.
"""
import numpy as np
import pytest

import _helpers as H
from _helpers import CUDA


def score(ops, backend, q1, k, meta, scale, kv_type, n_threads=2):
    ffi, L = ops
    n_head, d = q1.shape
    q1, k, meta = H.f32(q1), H.f32(k), H.i32(meta)
    out = np.full(k.shape[0], 12345.0, np.float32)
    rc = L.tca_test_tca_score_backend(backend.encode(), d, n_head, len(meta) // 2, k.shape[0], H.KV_TYPES[kv_type],
                                      H.ptr(ffi, q1, "float *"), H.ptr(ffi, k, "float *"),
                                      H.ptr(ffi, meta, "int32_t *"), float(scale), n_threads,
                                      H.ptr(ffi, out, "float *"))
    return rc, out


def attn(ops, backend, case, kv_type, kpos_f32, n_threads=2):
    ffi, L = ops
    q, k, v, kpos, meta, qpos, scale = case
    n_head, n_tokens, d = q.shape
    q, k, v = H.f32(q), H.f32(k), H.f32(v)
    kpos, meta, qpos = H.i32(kpos), H.i32(meta), H.i32(qpos)
    out = np.full((n_tokens, n_head, d), 12345.0, np.float32)
    P = lambda a, t="float *": H.ptr(ffi, a, t)  # noqa: E731
    rc = L.tca_test_tca_attn_backend_ex(backend.encode(), d, n_head, len(meta) // 2, n_tokens, k.shape[0],
                                        H.KV_TYPES[kv_type], P(q), P(k), P(v), P(kpos, "int32_t *"),
                                        P(meta, "int32_t *"), P(qpos, "int32_t *"), float(scale), n_threads,
                                        int(kpos_f32), P(out))
    return rc, out


def reference(q1, k_stored, meta, scale):
    n_head = q1.shape[0]
    n_kv = len(meta) // 2
    G = n_head // n_kv
    s = np.zeros(k_stored.shape[0])
    for g in range(n_kv):
        off, ln = int(meta[2 * g]), int(meta[2 * g + 1])
        if ln == 0:
            continue
        K = k_stored[off:off + ln].astype(np.float64)
        acc = np.zeros(ln)
        for j in range(G):
            lg = K @ q1[g * G + j].astype(np.float64) * scale
            e = np.exp(lg - lg.max())
            acc += e / e.sum()
        s[off:off + ln] = acc / G
    return s


def _case(seed, d, gqa, qscale=1.0):
    q, k, v, kpos, meta, qpos, scale = H.make_case(seed, d, gqa, 1, qscale=qscale)
    return q[:, -1, :], k, meta, scale


def test_score_cpu_many_query_heads_in_chunks(ops):
    """The hold retention's final selection passes its observation window as one node: n_head x
    n_obs query heads (here 2 KV heads x 7 x 32 = 448) over long ranges, so the f32 logits (448 x
    40000 x 4 B = 72 MB) go in two chunks of query heads; the result is still the reference's."""
    rng = np.random.default_rng(7)
    d, n_kv, G, n_slots = 64, 2, 7 * 32, 40000
    q1 = rng.standard_normal((n_kv * G, d)).astype(np.float32) * 2.0
    k = rng.standard_normal((n_slots, d)).astype(np.float32)
    meta = np.array([0, 19000, 20000, 19500], np.int32)     # a gap after each head
    scale = 1.0 / np.sqrt(d)
    rc, out = score(ops, "CPU", q1, k, meta, scale, "f16")
    assert rc == 0
    ref = reference(q1, H.stored(ops, "f16", k, meta), meta, scale)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-10)
    assert (out[19000:20000] == 0).all() and (out[39500:] == 0).all()


SCORE_CASES = [(kv, d, g) for kv in H.KV_TYPES for d in (64, 128) for g in (1, 4, 7)]


@pytest.mark.parametrize("kv_type,d,gqa", SCORE_CASES)
def test_score_cpu_matches_reference(ops, kv_type, d, gqa):
    q1, k, meta, scale = _case(d * 31 + gqa + 3 * list(H.KV_TYPES).index(kv_type), d, gqa, qscale=2.0)
    rc, out = score(ops, "CPU", q1, k, meta, scale, kv_type)
    assert rc == 0
    ref = reference(q1, H.stored(ops, kv_type, k, meta), meta, scale)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-9)
    # every head's probabilities sum to 1 (an empty head contributes nothing)
    for g in range(len(meta) // 2):
        off, ln = int(meta[2 * g]), int(meta[2 * g + 1])
        if ln:
            assert abs(out[off:off + ln].sum() - 1.0) < 1e-5
    # outside every head: exactly 0
    inside = np.zeros(len(out), bool)
    for g in range(len(meta) // 2):
        inside[int(meta[2 * g]):int(meta[2 * g]) + int(meta[2 * g + 1])] = True
    assert (out[~inside] == 0).all()


def test_score_reference_is_sensitive(ops):
    """The check above can fail: a one-row change of K moves the scores beyond its tolerance."""
    q1, k, meta, scale = _case(5, 64, 4, qscale=2.0)
    k2 = k.copy()
    off = int(meta[0])
    k2[off] += 0.5
    rc, out = score(ops, "CPU", q1, k2, meta, scale, "f32")
    assert rc == 0
    ref = reference(q1, k, meta, scale)
    assert np.abs(out - ref).max() > 1e-4


def test_score_bad_arguments(ops):
    ffi, L = ops
    q1, k, meta, scale = _case(1, 64, 2)
    meta_bad = meta.copy()
    meta_bad[1] = k.shape[0] + 5
    assert score(ops, "CPU", q1, k, meta_bad, scale, "f32")[0] == L.TCA_TEST_E_META
    assert score(ops, "NoSuchBackend", q1, k, meta, scale, "f32")[0] == L.TCA_TEST_E_BACKEND


@pytest.mark.parametrize("kv_type", list(H.KV_TYPES))
def test_attn_kpos_f32_equals_i32_cpu(ops, kv_type):
    case = H.make_case(11, 64, 4, 9)
    rc_i, out_i = attn(ops, "CPU", case, kv_type, False)
    rc_f, out_f = attn(ops, "CPU", case, kv_type, True)
    assert rc_i == rc_f == 0
    assert np.array_equal(out_i, out_f)


# ---------------------------------------------------------------------------------- CUDA
@pytest.mark.parametrize("kv_type,d,gqa", SCORE_CASES + [("f16", 256, 4), ("q8_0", 128, 8)])
def test_score_cuda_matches_cpu(cuda, kv_type, d, gqa):
    q1, k, meta, scale = _case(d * 17 + gqa, d, gqa, qscale=2.0)
    rc_c, out_c = score(cuda, "CPU", q1, k, meta, scale, kv_type)
    rc_g, out_g = score(cuda, CUDA, q1, k, meta, scale, kv_type)
    assert rc_c == rc_g == 0
    assert np.isfinite(out_g).all()
    # f32 dots and exponentials on the GPU vs double on the CPU
    np.testing.assert_allclose(out_g, out_c, rtol=2e-5, atol=1e-8)
    assert ((out_c == 0) == (out_g == 0)).all()


@pytest.mark.parametrize("kv_type", list(H.KV_TYPES))
def test_attn_kpos_f32_cuda(cuda, kv_type):
    case = H.make_case(13, 128, 4, 33)
    rc_i, out_i = attn(cuda, CUDA, case, kv_type, False)
    rc_f, out_f = attn(cuda, CUDA, case, kv_type, True)
    assert rc_i == rc_f == 0
    assert np.array_equal(out_i, out_f)
