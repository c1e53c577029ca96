"""Issue 13: inputs the kernels never see as given, handled as documented.

uint64 class indices that would wrap around (item 3), misaligned arrays and ``out=`` (item 4),
a softcap float32 cannot hold (item 5), Python-number weights in logsumexp (item 6), ml_dtypes
integers and unknown dtypes (item 10), numeric options given as strings (item 11).
"""

from __future__ import annotations

import math

import normax
import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

RNG = np.random.default_rng(13)


# ---------------------------------------------------------------------------------------------
# Item 3: class indices that do not fit in int64


@pytest.mark.parametrize("with_grad", [False, True])
def test_uint64_index_that_wraps_onto_ignore_index_is_an_index_error(with_grad):
    logits = np.zeros((2, 7), np.float32)
    target = np.array([1, 2**64 - 100], np.uint64)  # int64(2**64 - 100) == -100 == ignore_index
    f = normax.cross_entropy_with_grad if with_grad else normax.cross_entropy
    with pytest.raises(IndexError, match=r"class index 18446744073709551516 at position 1 .*int64"):
        f(logits, target, reduction="none")


def test_uint64_index_position_in_a_2d_target():
    target = np.zeros((2, 3), np.uint64)
    target[1, 2] = 2**63  # the smallest that does not fit: int64 would make it -2**63
    with pytest.raises(IndexError, match=r"9223372036854775808 at position \(1, 2\)"):
        normax.cross_entropy(np.zeros((2, 3, 5)), target)
    # Class axis first: the position is still the target's own.
    with pytest.raises(IndexError, match=r"at position \(1, 2\)"):
        normax.cross_entropy(np.zeros((5, 2, 3)), target, axis=0)


@pytest.mark.parametrize("with_grad", [False, True])
def test_uint64_index_that_wraps_in_linear_cross_entropy(with_grad):
    h, w = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    target = np.array([0, 2**64 - 100], np.uint64)
    f = normax.linear_cross_entropy_with_grad if with_grad else normax.linear_cross_entropy
    with pytest.raises(IndexError, match=r"18446744073709551516 at position 1"):
        f(h, w, target)


def test_uint64_indices_that_fit_are_used_as_int64():
    logits = RNG.standard_normal((4, 6))
    t = np.array([0, 5, 3, 2])
    u = t.astype(np.uint64)
    np.testing.assert_array_equal(
        normax.cross_entropy(logits, u, reduction="none"), normax.cross_entropy(logits, t, reduction="none")
    )
    for got, ref in zip(normax.cross_entropy_with_grad(logits, u), normax.cross_entropy_with_grad(logits, t)):
        np.testing.assert_array_equal(got, ref)
    h, w = RNG.standard_normal((4, 3)), RNG.standard_normal((6, 3))
    assert normax.linear_cross_entropy(h, w, t.astype(np.uint64)) == normax.linear_cross_entropy(h, w, t)
    # Out of range but representable: the usual out-of-range message.
    with pytest.raises(IndexError, match="class index 6 at position 0 is out of range"):
        normax.cross_entropy(logits, np.array([6, 0, 0, 0], np.uint64))


# ---------------------------------------------------------------------------------------------
# Item 4: misaligned arrays, read and written


def misaligned(a) -> np.ndarray:
    """A copy of `a` at an odd byte offset (NumPy's aligned flag off)."""
    a = np.asarray(a)
    raw = np.zeros(a.nbytes + 1, np.uint8)[1:]
    m = raw.view(a.dtype).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned and m.flags.c_contiguous
    return m


def test_issue_reproducer():
    x = np.zeros(33, np.uint8)[1:].view(np.float32)
    np.testing.assert_array_equal(normax.softmax(x), np.full(8, 0.125, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0, None])
def test_misaligned_softmax_input_and_out(dtype, name, axis):
    f = getattr(normax, name)
    x = RNG.standard_normal((5, 9)).astype(dtype)
    ref = f(x, axis=axis)
    np.testing.assert_array_equal(f(misaligned(x), axis=axis), ref)
    # A misaligned out= is written (through an aligned buffer), from aligned and misaligned x.
    for src in (x, misaligned(x)):
        out = misaligned(np.zeros_like(x))
        assert f(src, axis=axis, out=out) is out
        np.testing.assert_array_equal(out, ref)
    # In place into a misaligned x.
    m = misaligned(x)
    assert f(m, axis=axis, out=m) is m
    np.testing.assert_array_equal(m, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_logsumexp_and_backwards(dtype):
    x = RNG.standard_normal((4, 6)).astype(dtype)
    b = RNG.uniform(0.5, 2.0, (4, 6)).astype(dtype)
    np.testing.assert_array_equal(normax.logsumexp(misaligned(x)), normax.logsumexp(x))
    np.testing.assert_array_equal(normax.logsumexp(misaligned(x), axis=0), normax.logsumexp(x, axis=0))
    np.testing.assert_array_equal(
        normax.logsumexp(misaligned(x), b=misaligned(b), return_sign=True)[0],
        normax.logsumexp(x, b=b, return_sign=True)[0],
    )
    dy = RNG.standard_normal((4, 6)).astype(dtype)
    for name in ("softmax_backward", "log_softmax_backward"):
        f = getattr(normax, name)
        np.testing.assert_array_equal(f(misaligned(x), misaligned(dy)), f(x, dy))
        np.testing.assert_array_equal(f(x, misaligned(dy)), f(x, dy))
        np.testing.assert_array_equal(f(misaligned(x), dy, axis=0), f(x, dy, axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_cross_entropy(dtype):
    x = RNG.standard_normal((6, 5)).astype(dtype)
    t = RNG.integers(0, 5, 6)
    w = RNG.uniform(0.5, 1.5, 5).astype(dtype)
    p = normax.softmax(RNG.standard_normal((6, 5)).astype(dtype))
    ref = normax.cross_entropy(x, t, weight=w)
    assert normax.cross_entropy(misaligned(x), misaligned(t), weight=misaligned(w)) == ref
    assert normax.cross_entropy(misaligned(x), misaligned(p)) == normax.cross_entropy(x, p)
    loss, g = normax.cross_entropy_with_grad(x, t, reduction="none")
    gout = RNG.standard_normal(6).astype(dtype)
    loss2, g2 = normax.cross_entropy_with_grad(x, t, reduction="none", grad_output=gout)
    l3, g3 = normax.cross_entropy_with_grad(
        misaligned(x), misaligned(t), reduction="none", grad_output=misaligned(gout)
    )
    np.testing.assert_array_equal(l3, loss2)
    np.testing.assert_array_equal(g3, g2)
    # In place into misaligned logits: the gradient lands in the caller's array.
    m = misaligned(x)
    l4, g4 = normax.cross_entropy_with_grad(m, t, reduction="none", inplace=True)
    assert g4 is m
    np.testing.assert_array_equal(l4, loss)
    np.testing.assert_array_equal(m, g)


def test_misaligned_linear_cross_entropy():
    h = RNG.standard_normal((5, 4)).astype(np.float32)
    w = RNG.standard_normal((7, 4)).astype(np.float32)
    b = RNG.standard_normal(7).astype(np.float32)
    t = RNG.integers(0, 7, 5)
    ref = normax.linear_cross_entropy(h, w, t, linear_bias=b)
    assert (
        normax.linear_cross_entropy(misaligned(h), misaligned(w), misaligned(t), linear_bias=misaligned(b))
        == ref
    )
    a = normax.linear_cross_entropy_with_grad(h, w, t, linear_bias=b)
    m = normax.linear_cross_entropy_with_grad(misaligned(h), misaligned(w), t, linear_bias=misaligned(b))
    for u, v in zip(a, m):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "crms_norm"])
def test_misaligned_norms(dtype, name):
    f, bwd = getattr(normax, name), getattr(normax, name + "_backward")
    x = RNG.standard_normal((3, 8)).astype(dtype)
    w = RNG.standard_normal(8).astype(dtype)
    ref = f(x, w)
    np.testing.assert_array_equal(f(misaligned(x), misaligned(w)), ref)
    np.testing.assert_array_equal(f(x, misaligned(w)), ref)
    np.testing.assert_array_equal(f(misaligned(x), axis=(0, 1)), f(x, axis=(0, 1)))
    for src in (x, misaligned(x)):
        out = misaligned(np.zeros_like(x))
        assert f(src, w, out=out) is out
        np.testing.assert_array_equal(out, ref)
    m = misaligned(x)
    assert f(m, w, out=m) is m
    np.testing.assert_array_equal(m, ref)
    # Saved statistics and the backward.
    stats = f(x, w, return_stats=True)[1:]
    mstats = [misaligned(s) for s in stats]
    dy = RNG.standard_normal((3, 8)).astype(dtype)
    ref_b = bwd(dy, x, w)
    got_b = bwd(misaligned(dy), misaligned(x), misaligned(w))
    for u, v in zip(ref_b, got_b):
        np.testing.assert_array_equal(u, v)
    if name == "layer_norm":
        got = bwd(dy, misaligned(x), w, mean=mstats[0], rstd=mstats[1])
        ref2 = bwd(dy, x, w, mean=stats[0], rstd=stats[1])
    else:
        got = bwd(dy, misaligned(x), w, rstd=mstats[0])
        ref2 = bwd(dy, x, w, rstd=stats[0])
    for u, v in zip(ref2, got):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------------------------------------
# Item 5: a softcap float32 cannot hold


def _capped_ce_reference(x, t, s):
    """torch's ``cross_entropy(s * tanh(x / s), t)`` in float64, and its gradient."""
    x = np.asarray(x, np.float64)
    u = np.tanh(x / s)
    z = s * u
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    rows = np.arange(len(t))
    loss = np.mean(lse - z[rows, t])
    p = np.exp(z - lse[:, None])
    p[rows, t] -= 1
    return loss, p / len(t) * (1 - u * u)


@pytest.mark.parametrize("softcap", [1e39, 2.0**128 - 2.0**103, 1e300, 1e-39, 1e-45])
def test_softcap_beyond_float32(softcap):
    x = (RNG.standard_normal((4, 5)) * 3).astype(np.float32)
    x[0, 0] = 3e38  # a logit near float32's maximum: the cap is felt
    t = np.array([0, 1, 2, 3])
    ref_loss, ref_grad = _capped_ce_reference(x, t, softcap)
    loss = normax.cross_entropy(x, t, softcap=softcap)
    assert loss.dtype == np.float32 and np.isfinite(loss)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    loss, g = normax.cross_entropy_with_grad(x, t, softcap=softcap)
    assert g.dtype == np.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    np.testing.assert_allclose(g, ref_grad, rtol=2e-6, atol=1e-7)
    # The same logits through the linear form (hidden = x, weight = identity).
    loss, dh, _, _ = normax.linear_cross_entropy_with_grad(x, np.eye(5, dtype=np.float32), t, softcap=softcap)
    assert loss.dtype == dh.dtype == np.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    np.testing.assert_allclose(dh, ref_grad, rtol=2e-6, atol=1e-7)
    assert np.isfinite(normax.linear_cross_entropy(x, np.eye(5, dtype=np.float32), t, softcap=softcap))


def test_softcap_beyond_float32_in_place_and_float16():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    t = np.array([0, 1, 3])
    loss, g = normax.cross_entropy_with_grad(x, t, softcap=1e39)
    m = x.copy()
    l2, g2 = normax.cross_entropy_with_grad(m, t, softcap=1e39, inplace=True)
    assert g2 is m and l2 == loss
    np.testing.assert_array_equal(m, g)
    assert np.isfinite(normax.cross_entropy(x.astype(np.float16), t, softcap=1e39))


def test_softcap_below_float64_normal_is_a_value_error():
    with pytest.raises(ValueError, match="softcap"):
        normax.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), softcap=1e-310)


# ---------------------------------------------------------------------------------------------
# Item 6: Python-number weights in logsumexp


_WEIGHTS = {
    "1e300": 1e300,
    "1e-50": 1e-50,
    "2**200": 2**200,
    "2.0": 2.0,
    "3": 3,
    "-2.0": -2.0,
    "0.0": 0.0,
    "-2**200": -(2**200),
    "2**2000": 2**2000,
    "5e-324": 5e-324,
    "-1e300": -1e300,
    "2**64": 2**64,
}


@pytest.mark.parametrize("b", list(_WEIGHTS.values()), ids=list(_WEIGHTS))
def test_logsumexp_python_number_weight(b):
    a = np.array([1.0, 1.0, 0.5], np.float32)
    truth = math.log(float(np.sum(np.exp(a.astype(np.float64))))) + (math.log(abs(b)) if b else -math.inf)
    sign = float(np.sign(b))
    res, sgn = normax.logsumexp(a, b=b, return_sign=True)
    assert res.dtype == np.float32 and sgn.dtype == np.float32  # weak Python scalar (NEP 50)
    assert res == np.float32(truth) and sgn == sign
    plain = normax.logsumexp(a, b=b)
    assert plain.dtype == np.float32
    if b >= 0:
        assert plain == np.float32(truth)
    else:
        assert np.isnan(plain)  # a negative sum, as SciPy


def test_logsumexp_issue_values():
    one = np.ones(2, np.float32)
    lse = math.log(2) + 1  # logsumexp([1, 1])
    assert normax.logsumexp(one, b=1e300) == np.float32(lse + math.log(1e300))  # 692.4687, not inf
    assert normax.logsumexp(one, b=1e-50) == np.float32(lse + math.log(1e-50))  # -113.4361, not -inf
    assert normax.logsumexp(one, b=2**200) == np.float32(lse + 200 * math.log(2))  # not a TypeError


def test_logsumexp_python_number_weight_dtypes_and_axes():
    x = RNG.standard_normal((3, 4))
    # float64 and integer input: float64, exactly the array-weight result for a normal weight.
    assert normax.logsumexp(x, b=2.5, axis=0).dtype == np.float64
    np.testing.assert_array_equal(
        normax.logsumexp(x, b=2.5, axis=0), normax.logsumexp(x, b=np.full((3, 4), 2.5), axis=0)
    )
    assert normax.logsumexp(np.arange(4), b=1e-320).dtype == np.float64
    np.testing.assert_allclose(
        normax.logsumexp(np.arange(4), b=1e-320), math.log(np.exp(np.arange(4.0)).sum()) + math.log(1e-320)
    )
    assert normax.logsumexp(x.astype(np.float16), b=1e10).dtype == np.float16
    np.testing.assert_allclose(
        normax.logsumexp(x.astype(np.float16), b=1e10, keepdims=True),
        normax.logsumexp(x.astype(np.float16).astype(np.float64), keepdims=True) + math.log(1e10),
        rtol=1e-3,
    )
    assert normax.logsumexp(np.float32(1.0), b=1e300) == np.float32(1 + math.log(1e300))
    # A NumPy scalar weight is not weak: its own dtype.
    assert normax.logsumexp(x.astype(np.float32), b=np.float64(1e300)).dtype == np.float64


# ---------------------------------------------------------------------------------------------
# Item 10: ml_dtypes integers and unknown dtypes


@pytest.mark.parametrize("name", ["int2", "int4", "uint2", "uint4"])
def test_ml_dtypes_integers_become_float64(name):
    dt = getattr(ml_dtypes, name, None)
    if dt is None:
        pytest.skip(f"ml_dtypes has no {name}")
    v = np.array([[0, 1, 1], [1, 0, 1]], dt)
    ref = v.astype(np.int8)
    for f in (normax.softmax, normax.log_softmax, normax.logsumexp, normax.rms_norm, normax.layer_norm):
        got = f(v)
        assert got.dtype == np.float64, f
        np.testing.assert_array_equal(got, f(ref))
    np.testing.assert_array_equal(normax.softmax_backward(v, v), normax.softmax_backward(ref, ref))
    # As class indices and as weights.
    logits = RNG.standard_normal((2, 3))
    t = np.array([1, 0], dt)
    assert normax.cross_entropy(logits, t) == normax.cross_entropy(logits, np.array([1, 0]))
    h, w = RNG.standard_normal((2, 3)), RNG.standard_normal((3, 3))
    assert normax.linear_cross_entropy(h, w, t) == normax.linear_cross_entropy(h, w, np.array([1, 0]))
    assert normax.logsumexp(logits, b=v) == pytest.approx(normax.logsumexp(logits, b=ref))
    assert normax.logsumexp(np.float32(1.0), b=np.array(1, dt)).dtype == np.float32  # as int8


def test_ml_dtypes_floats_still_floats():
    x = np.array([1.0, 2.0, 3.0], ml_dtypes.bfloat16)
    assert normax.softmax(x).dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(
        normax.softmax(x).astype(np.float32), normax.softmax(x.astype(np.float32)), rtol=1e-2
    )


@pytest.mark.parametrize("dtype", [np.dtype("V4"), np.dtype([("a", np.float32)]), np.dtype("M8[s]")])
def test_unknown_dtypes_are_type_errors(dtype):
    x = np.zeros((2, 3), dtype)
    for f in (normax.softmax, normax.log_softmax, normax.logsumexp, normax.rms_norm):
        with pytest.raises(TypeError, match="^x: unsupported dtype"):
            f(x)
    with pytest.raises(TypeError, match="^logits: unsupported dtype"):
        normax.cross_entropy(x, np.array([0, 1]))
    with pytest.raises(TypeError, match="^target"):
        normax.cross_entropy(np.zeros((2, 3)), np.zeros(2, dtype))
    with pytest.raises(TypeError, match="^weight: unsupported dtype"):
        normax.rms_norm(np.zeros((2, 3)), np.zeros(3, dtype))


# ---------------------------------------------------------------------------------------------
# Item 11: numbers given as strings


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "softcap"])
@pytest.mark.parametrize("value", ["0.1", b"0.1", np.array("0.1"), np.array(True), 0.1j])
def test_loss_options_as_strings_are_type_errors(name, value):
    x, t = np.zeros((2, 3), np.float32), np.array([0, 1])
    for f in (normax.cross_entropy, normax.cross_entropy_with_grad):
        with pytest.raises(TypeError, match=f"^{name}: expected a real number"):
            f(x, t, **{name: value})
    with pytest.raises(TypeError, match=f"^{name}: expected a real number"):
        normax.linear_cross_entropy(x, np.zeros((3, 3), np.float32), t, **{name: value})


def test_eps_and_grad_output_as_strings_are_type_errors():
    x = np.ones((2, 3), np.float32)
    for f in (normax.rms_norm, normax.layer_norm, normax.crms_norm):
        with pytest.raises(TypeError, match="^eps: expected a real number"):
            f(x, eps="0.1")
        with pytest.raises(TypeError, match="^eps: expected a real number"):
            f(x.astype(np.float16), eps="1e-5")
    with pytest.raises(TypeError, match="^eps: expected a real number"):
        normax.rms_norm_backward(x, x, eps="0.1")
    with pytest.raises(TypeError, match="^grad_output: expected a real number"):
        normax.cross_entropy_with_grad(x, np.array([0, 1]), grad_output="1.0")


def test_numeric_options_still_take_numbers():
    x, t = np.ones((2, 3), np.float32), np.array([0, 1])
    ref = normax.cross_entropy(x, t, label_smoothing=0.25)
    for v in (0.25, np.float32(0.25), np.float64(0.25), np.array(0.25), np.float16(0.25)):
        assert normax.cross_entropy(x, t, label_smoothing=v) == ref
    assert normax.cross_entropy(x, t, z_loss=1) == normax.cross_entropy(x, t, z_loss=np.int64(1))
    np.testing.assert_array_equal(normax.rms_norm(x, eps=1), normax.rms_norm(x, eps=np.int32(1)))
