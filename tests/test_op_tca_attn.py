"""GGML_OP_TCA_ATTN (native/ggml-cpu/tca-attn.cpp) against a float64 NumPy reference.

test-backend-ops style: each case builds fresh seeded inputs, runs the op through a ggml
graph on the CPU backend (via ``tca_test_tca_attn`` of the test library,
native/tests/tca_test_ops.h, which poisons the output with NaN first) and compares with the
exact semantics of the op (ggml.h, design §3):

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
import numpy as np
import pytest

from tca_ggml import reference as R

from _helpers import KV_TYPES, blind_queries_case, f32, i32, make_case, nmse, ptr, reference, run_op, stored

NMSE_MAX = {"f32": 1e-10, "f16": 1e-6, "q8_0": 1e-6}   # vs the reference on stored values
# vs the reference on the unrounded f32 inputs: only a sanity check that the type is used
NMSE_RAW_MAX = {"f32": 1e-10, "f16": 1e-5, "q8_0": 1e-3}


# ------------------------------------------------------------------------ accuracy
CASES = [(kv, d, g, t) for kv in KV_TYPES for d in (64, 128, 256) for g in (1, 2, 7, 8) for t in (1, 5, 64)]


@pytest.mark.parametrize("kv_type,d,gqa,n_tokens", CASES)
def test_matches_reference(ops, kv_type, d, gqa, n_tokens):
    seed = d * 1000 + gqa * 100 + n_tokens + 7 * list(KV_TYPES).index(kv_type)
    q, k, v, kpos, meta, qpos, scale = make_case(seed, d, gqa, n_tokens, empty_head=(d != 128))
    rc, out = run_op(ops, q, k, v, kpos, meta, qpos, scale, kv_type)
    assert rc == 0
    assert not np.isnan(out).any(), "poisoned output survived (an element was not written)"
    ref = reference(q, stored(ops, kv_type, k, meta), stored(ops, kv_type, v, meta), kpos, meta, qpos, scale)
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
def test_unsorted_rows_large_logits_and_long_heads(ops, kv_type):
    # rows not in position order; q scaled so that softmax is peaked (online-max rescaling);
    # heads longer than one 64-row chunk with masks inside chunks
    q, k, v, kpos, meta, qpos, scale = make_case(99, 128, 4, 37, n_head_kv=2, empty_head=False,
                                                 shuffle_rows=True, qscale=4.0)
    rc, out = run_op(ops, q, k, v, kpos, meta, qpos, scale, kv_type, n_threads=2)
    assert rc == 0 and not np.isnan(out).any()
    ref = reference(q, stored(ops, kv_type, k, meta), stored(ops, kv_type, v, meta), kpos, meta, qpos, scale)
    assert nmse(out, ref) <= NMSE_MAX[kv_type]


def test_queries_that_see_nothing_give_zero(ops):
    q, k, v, kpos, meta, qpos, scale = blind_queries_case(2)
    rc, out = run_op(ops, q, k, v, kpos, meta, qpos, scale, "f32")
    assert rc == 0
    assert np.all(out[:2] == 0.0)
    # a query seeing exactly one key returns that key's value row
    np.testing.assert_allclose(out[2, 0], v[0], rtol=1e-6, atol=1e-6)
    ref = reference(q, k, v, kpos, meta, qpos, scale)
    assert nmse(out, ref) <= NMSE_MAX["f32"]


def test_no_slots_at_all(ops):
    q = np.ones((4, 3, 64), np.float32)
    empty = np.zeros((0, 64), np.float32)
    rc, out = run_op(ops, q, empty, empty, np.zeros(0), np.array([0, 0, 0, 0]), np.array([0, 1, 2]), 0.125, "f16")
    assert rc == 0
    assert np.all(out == 0.0)


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_bit_identical_for_any_thread_count(ops, kv_type):
    q, k, v, kpos, meta, qpos, scale = make_case(7, 64, 7, 19, n_head_kv=2, empty_head=False)
    outs = []
    for nt in (1, 2, 3, 8):
        rc, out = run_op(ops, q, k, v, kpos, meta, qpos, scale, kv_type, n_threads=nt)
        assert rc == 0
        outs.append(out)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_nmse_thresholds_are_meaningful(ops):
    # a wrong GQA mapping (h % n_head_kv instead of h // G) must be far above every threshold
    q, k, v, kpos, meta, qpos, scale = make_case(11, 64, 2, 5, n_head_kv=3, empty_head=False)
    rc, out = run_op(ops, q, k, v, kpos, meta, qpos, scale, "f32")
    assert rc == 0
    n_head = q.shape[0]
    perm = np.array([(h % 3) * 2 + (h // 3) for h in range(n_head)])   # scrambles the group map
    wrong = reference(q[perm], k, v, kpos, meta, qpos, scale)[:, np.argsort(perm)]
    assert nmse(out, wrong) > 1e-2


# ------------------------------------------------------------------------ bad arguments
def test_bad_arguments_return_error_codes(ops):
    ffi, lib = ops
    q, k, v, kpos, meta, qpos, scale = make_case(3, 64, 2, 5, n_head_kv=2, empty_head=False)
    good = dict(q=q, k=k, v=v, kpos=kpos, meta=meta, qpos=qpos, scale=scale, kv_type="f32")
    rc, _ = run_op(ops, **good)
    assert rc == 0

    def rc_of(**over):
        a = dict(good)
        a.update(over)
        return run_op(ops, **a)[0]

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
    assert run_op(ops, **good, n_threads=0)[0] < 0
    # q8_0 needs d % 32 == 0
    q48 = np.zeros((2, 1, 48), np.float32)
    k48 = np.zeros((4, 48), np.float32)
    assert run_op(ops, q48, k48, k48, np.arange(4), np.array([0, 4]), np.array([9]), 0.1, "q8_0")[0] < 0
    assert run_op(ops, q48, k48, k48, np.arange(4), np.array([0, 4]), np.array([9]), 0.1, "f16")[0] == 0

    # raw calls: NULL pointers and non-positive sizes
    d, T, S = 64, 5, k.shape[0]
    kp, mp, qp = i32(kpos), i32(meta), i32(qpos)
    qf, kf, vf = f32(q), f32(k), f32(v)
    out = np.zeros((T, 4, d), np.float32)
    P = lambda a, t="float *": ptr(ffi, a, t)  # noqa: E731
    I = lambda a: ptr(ffi, a, "int32_t *")     # noqa: E731
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


def test_reference_agrees_with_tca_ggml_reference():
    """The in-test reference and tca_ggml.reference.sparse_attention state the same math."""
    q, k, v, kpos, meta, qpos, scale = make_case(21, 64, 7, 5, n_head_kv=3, empty_head=True)
    ours = reference(q, k, v, kpos, meta, qpos, scale)
    G = 7
    for g in range(3):
        off, ln = int(meta[2 * g]), int(meta[2 * g + 1])
        theirs = R.sparse_attention(np.transpose(q[g * G:(g + 1) * G], (1, 0, 2)), k[off:off + ln],
                                    v[off:off + ln], qpos, kpos[off:off + ln], scale)
        np.testing.assert_allclose(ours[:, g * G:(g + 1) * G], theirs, rtol=1e-12, atol=1e-12)
