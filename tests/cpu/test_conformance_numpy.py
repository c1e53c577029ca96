"""Issue 12, NumPy-first API against scipy.special: complex softmax / log_softmax / logsumexp
(item 1), logsumexp's result dtype with ``b=`` (item 7), 0-d results as NumPy scalars (item 9).

Tolerances (u = 2**-53, the float64 unit roundoff; references in mpmath at 300 bits):

* complex logsumexp: |got - ref| <= 4 u max(|ref|, cond), cond = sum|b e^x| / |sum b e^x| the
  condition number of the sum (1 for positive real terms; complex or negative terms cancel, and
  any working-precision sum then errs by u * cond absolute in the log). The terms, the complex
  log1p and the final additions cost a few roundings each (measured <= 1.2 u on the random set).
  The sign is the phase exp(i arg S): arg carries a few u of pi absolute (the reduction into
  (-pi, pi]), so 16 u. SciPy is compared only where it is exact enough (its log1p of a complex
  value loses a small sum entirely, its float 2*pi wrap loses large imaginary parts: up to
  1.3e8 ULP on this random set).
* complex log_softmax: x - lse is a difference, so the error is a few u of the operands'
  magnitude max(|x - max|, |lse|, cond), as the real log_softmax's tolerance (8 u).
* complex softmax: the same algorithm as SciPy's, so equal to SciPy within 1e-13 relative (a few
  roundings of a different summation order).
* complex64 is computed in complex128 and rounded once: within 1 ULP of complex64 (2**-24
  relative to |ref|, here 2 * 2**-24 to allow for the rounding of both parts).
"""

from __future__ import annotations

import itertools
import warnings

import mpmath as mp
import normax
import numpy as np
import pytest
import scipy.special as sps

U = 2.0**-53
INF, NAN = np.inf, np.nan


def _mpc(v):
    return mp.mpc(complex(v))


def _ref_lse(a, b=None, *, cond=False):
    """log(sum(b * exp(a))) of 1-d `a` (and `b`) in mpmath, principal branch (and the sum's
    condition number)."""
    with mp.workprec(300):
        b = np.ones(len(a)) if b is None else b
        terms = [_mpc(w) * mp.exp(_mpc(v) - _mpc(np.max(a.real))) for v, w in zip(a, b)]
        total = mp.fsum(terms)
        ref = complex(mp.log(total) + _mpc(np.max(a.real)))
        return (ref, float(mp.fsum(abs(t) for t in terms) / abs(total))) if cond else ref


def _ref_log_softmax(a):
    """SciPy's branch: (x - m) - log(sum(exp(x - m))), m NumPy's (lexicographic) max."""
    with mp.workprec(300):
        m = _mpc(np.max(a))
        terms = [mp.exp(_mpc(v) - m) for v in a]
        lse = mp.log(mp.fsum(terms))
        cond = float(mp.fsum(abs(t) for t in terms) / abs(mp.fsum(terms)))
        return np.array([complex(_mpc(v) - m - lse) for v in a]), max(abs(complex(lse)), cond)


def _random_complex(rng, t):
    n = int(rng.integers(1, 16))
    scale = (3.0, 1e3, 1e8)[t % 3]  # imaginary parts past pi, far past it
    a = rng.normal(0, 5, n) + 1j * rng.normal(0, scale, n)
    if t % 4 == 0:
        a[0] = a.real.max() + 35 + 1j  # one dominant element: a result near 0 + i*arg
    b = None
    if t % 2:
        b = rng.normal(0, 1, n) + (1j * rng.normal(0, 1, n) if t % 5 == 0 else 0)
    return a, b


# ---------------------------------------------------------------------------------------------
# Item 1: complex input


def test_complex_logsumexp_accuracy_against_mpmath():
    rng = np.random.default_rng(1201)
    for t in range(300):
        a, b = _random_complex(rng, t)
        ref, cond = _ref_lse(a, b, cond=True)
        if not np.isfinite(ref):
            continue
        got = normax.logsumexp(a, b=b)
        assert isinstance(got, np.complex128)
        assert abs(got - ref) <= 4 * U * max(abs(ref), cond), (t, a, b, got, ref)
        assert -np.pi < got.imag <= np.pi
        v, s = normax.logsumexp(a, b=b, return_sign=True)
        assert isinstance(v, np.float64) and isinstance(s, np.complex128)
        assert abs(v - ref.real) <= 4 * U * max(abs(ref), cond)
        assert abs(s - np.exp(1j * ref.imag)) <= 16 * U


def test_complex_logsumexp_small_result_keeps_relative_accuracy():
    # log(1 + e^(-40 + i)): scipy (np.log1p of a complex) returns a real part of exactly 0.
    a = np.array([0, -40 + 1j])
    ref = _ref_lse(a)
    got = normax.logsumexp(a)
    assert abs(got - ref) <= 2 * U * abs(ref)
    # scipy's own regression case (gh-21709): a small imaginary part keeps its precision.
    got = normax.logsumexp(np.array([0, 2.2204460492503132e-17j]))
    assert got.real == pytest.approx(0.6931471805599453, rel=1e-15)
    assert got.imag == pytest.approx(1.1102230246251566e-17, rel=1e-15)


@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None], ids=repr)
@pytest.mark.parametrize("keepdims", [False, True])
def test_complex_logsumexp_matches_scipy(axis, keepdims):
    rng = np.random.default_rng(1202)
    a = rng.normal(0, 2, (3, 4, 5)) + 1j * rng.normal(0, 2, (3, 4, 5))
    for b in (None, rng.normal(0, 1, (4, 5)), rng.normal(0, 1, (4, 1)) + 1j, 2.0):
        got = normax.logsumexp(a, axis=axis, b=b, keepdims=keepdims)
        ref = sps.logsumexp(a, axis=axis, b=b, keepdims=keepdims)
        assert got.dtype == ref.dtype == np.complex128 and np.shape(got) == np.shape(ref)
        np.testing.assert_allclose(got, ref, rtol=1e-13)
        v, s = normax.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=True)
        rv, rs = sps.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=True)
        assert v.dtype == rv.dtype == np.float64 and s.dtype == rs.dtype == np.complex128
        np.testing.assert_allclose(v, rv, rtol=1e-13)
        np.testing.assert_allclose(s, rs, rtol=1e-13)


def test_complex_logsumexp_real_a_complex_b_and_complex64():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    b = np.array([1j, -1, 2], np.complex64)
    got = normax.logsumexp(a, b=b)
    assert isinstance(got, np.complex64)
    ref = _ref_lse(a, b)
    assert abs(got - ref) <= 2 * 2.0**-24 * abs(ref)
    ref = sps.logsumexp(a, b=b)
    assert ref.dtype == np.complex64  # the same dtype as scipy
    z = np.array([[1 + 2j, 3 - 1j, 0.5 + 4j]], np.complex64)
    got = normax.logsumexp(z)
    assert got.dtype == np.complex64
    ref = _ref_lse(z[0])
    assert abs(got[0] - ref) <= 2 * 2.0**-24 * abs(ref)


# scipy's gh-22601 grid: real and complex infinities in every quadrant.
_INFS = [-INF, INF] + [complex(r, i) for r in (-INF, INF) for i in (0.0, -0.0, INF, -INF)]
_INFS += [complex(r, i) for r in (-INF, INF) for i in (0.7533, 2.3562, 3.9270, 5.4978)]


def test_complex_logsumexp_infinities_as_scipy():
    for x, y in itertools.product(_INFS, repeat=2):
        a = np.array([x, y], complex)
        with np.errstate(all="ignore"):
            ref = np.log(np.sum(np.exp(a)))
        np.testing.assert_array_equal(normax.logsumexp(a), ref, err_msg=f"{x}, {y}")


def test_complex_logsumexp_special_values():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for a in ([INF, 1], [complex(1, NAN), 1], [NAN, 1], [1j, 1j], [0, np.pi * 1j], [100j, 0]):
            a = np.array(a, complex)
            for b in (None, [1, -1], [0, 1], [1j, 2]):
                np.testing.assert_allclose(normax.logsumexp(a, b=b), sps.logsumexp(a, b=b), rtol=1e-14)
    # b == 0 leaves an infinite or NaN element out, as scipy.
    assert normax.logsumexp(np.array([complex(INF, 1), 1j]), b=[0, 1]) == 1j
    # An empty reduction: -inf (sign 0, where scipy gives NaN).
    np.testing.assert_array_equal(normax.logsumexp(np.zeros((2, 0), complex), axis=1), [-INF, -INF])
    v, s = normax.logsumexp(np.zeros((2, 0), complex), axis=1, return_sign=True)
    np.testing.assert_array_equal(v, [-INF, -INF])
    np.testing.assert_array_equal(s, [0, 0])
    # The sign of +inf is +1 (scipy's gh-23548 for reals; the phase of the infinite sum).
    assert normax.logsumexp(np.array([INF, 1], complex), return_sign=True) == (INF, 1)


@pytest.mark.parametrize("fname", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None], ids=repr)
def test_complex_softmax_matches_scipy(fname, axis):
    rng = np.random.default_rng(1203)
    a = rng.normal(0, 3, (3, 4, 5)) + 1j * rng.normal(0, 3, (3, 4, 5))
    got = getattr(normax, fname)(a, axis=axis)
    ref = getattr(sps, fname)(a, axis=axis)
    assert got.dtype == np.complex128 and got.shape == a.shape
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13 if fname == "log_softmax" else 0)
    out = np.empty_like(a)
    assert getattr(normax, fname)(a, axis=axis, out=out) is out
    np.testing.assert_array_equal(out, got)
    got64 = getattr(normax, fname)(a.astype(np.complex64), axis=axis)
    assert got64.dtype == np.complex64
    np.testing.assert_allclose(got64, got.astype(np.complex64), rtol=2 * 2.0**-24, atol=1e-6)


def test_complex_log_softmax_accuracy_against_mpmath():
    # scipy's log(sum) of 1 + tiny loses the tiny part (relative error ~1e16 ULP on the dominant
    # element); normax keeps the max term out and takes an accurate log1p.
    rng = np.random.default_rng(1204)
    for t in range(200):
        n = int(rng.integers(1, 12))
        a = rng.normal(0, 5, n) + 1j * rng.normal(0, 3, n)
        if t % 3 == 0:
            a[0] = a.real.max() + 35
        ref, lse_cond = _ref_log_softmax(a)
        got = normax.log_softmax(a)
        scale = np.maximum(np.abs(ref), lse_cond)
        assert np.all(np.abs(got - ref) <= 8 * U * np.maximum(scale, np.abs(a - np.max(a)))), (t, a)
    got = normax.log_softmax(np.array([0, -40 + 1j]))
    ref, _ = _ref_log_softmax(np.array([0, -40 + 1j]))
    assert abs(got[0] - ref[0]) <= 2 * U * abs(ref[0])


def test_complex_through_torch_and_jax():
    torch = pytest.importorskip("torch")
    a = np.array([[1 + 2j, 3 - 1j, 0.5 + 4j]])
    t = torch.from_numpy(a)
    for f in (normax.softmax, normax.log_softmax, normax.logsumexp):
        got = f(t)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.complex128
        np.testing.assert_array_equal(got.numpy(), f(a))
    # A lazily conjugated tensor is read as its values.
    np.testing.assert_array_equal(normax.logsumexp(t.conj()).numpy(), normax.logsumexp(a.conj()))
    jnp = pytest.importorskip("jax.numpy")
    got = normax.logsumexp(jnp.asarray(a.astype(np.complex64)))
    assert got.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(got), sps.logsumexp(a, axis=-1), rtol=1e-6)


def test_complex_has_no_backward():
    ok = np.array([0.5, 0.5])
    z = np.array([1j, 2])
    for f in (normax.softmax_backward, normax.log_softmax_backward):
        with pytest.raises(TypeError, match="y: unsupported dtype complex128"):
            f(z, ok)
        with pytest.raises(TypeError, match="dy: unsupported dtype complex128"):
            f(ok, z)


# ---------------------------------------------------------------------------------------------
# Item 7: logsumexp's result dtype with b=


@pytest.mark.parametrize(
    "a_dtype, b, expect",
    [
        (np.float32, np.int32([1, -1]), np.float64),  # the issue's case
        (np.float16, np.float32([1, -1]), np.float32),  # the issue's case
        (np.float16, np.int8([1, -1]), np.float16),
        (np.float16, np.int16([1, -1]), np.float32),
        (np.float32, np.float64([1, -1]), np.float64),
        (np.float32, np.float64(2.0), np.float64),  # a NumPy scalar is not weak
        (np.float32, 2.0, np.float32),  # a Python scalar is (NEP 50)
        (np.float32, 2, np.float32),
        (np.float64, np.float32([1, -1]), np.float64),
        (np.int8, np.int8([1, 2]), np.float64),
        (np.bool_, True, np.float64),
        (np.float32, np.complex64([1, 1j]), np.complex64),
        (np.float64, np.complex64([1, 1j]), np.complex128),
    ],
    ids=repr,
)
def test_logsumexp_weights_promote_as_scipy(a_dtype, b, expect):
    a = np.array([2, 1]).astype(a_dtype)
    got = normax.logsumexp(a, b=b, return_sign=True)
    ref = sps.logsumexp(a, b=b, return_sign=True)
    assert got[0].dtype == ref[0].dtype == np.finfo(expect).dtype
    assert got[1].dtype == ref[1].dtype == np.dtype(expect)
    # Computed in the promoted dtype: float32 a with int32 b is the float64 value, not float32's.
    exact = _ref_lse(a.astype(np.float64), np.broadcast_to(b, a.shape))
    eps = np.finfo(expect).eps
    assert abs(got[0] - exact.real) <= eps * max(1, abs(exact))
    np.testing.assert_allclose(got[0], ref[0], rtol=4 * eps)


def test_logsumexp_weights_issue_value():
    got = normax.logsumexp(np.float32([2, 1]), b=np.int32([1, -1]))
    assert isinstance(got, np.float64)
    assert got == pytest.approx(np.log(np.exp(2.0) - np.exp(1.0)), rel=4 * U)


def test_logsumexp_weights_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    a = np.array([2, 1], bf16)
    # NumPy cannot promote bfloat16 with integers (and makes float64 of it with a Python float):
    # it promotes as float16 does there (issue 21: int64 weights give float64, computed so), a
    # Python float is weak; with a float array the usual rule.
    got = normax.logsumexp(a, b=np.int64([1, 2]))
    assert got.dtype == np.float64 and got == pytest.approx(np.log(np.exp(2.0) + 2 * np.exp(1.0)), rel=4 * U)
    assert normax.logsumexp(np.int32([2, 1]), b=np.array([1, 2], bf16)).dtype == np.float64
    assert normax.logsumexp(a, b=np.int16([1, 2])).dtype == np.float32
    assert normax.logsumexp(a, b=np.int8([1, 2])).dtype == bf16
    assert normax.logsumexp(a, b=2.0).dtype == bf16
    assert normax.logsumexp(a, b=np.float32([1, 2])).dtype == np.float32
    assert normax.logsumexp(a, b=np.float16([1, 2])).dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Item 9: 0-d results are NumPy scalars


@pytest.mark.parametrize(
    "value", [np.float64(3), np.array(3.0), 3.0, 3, np.float32(3), np.complex128(1 + 2j)], ids=repr
)
def test_zero_d_forward_results_are_numpy_scalars_like_scipy(value):
    for name in ("softmax", "log_softmax", "logsumexp"):
        got = getattr(normax, name)(value)
        ref = getattr(sps, name)(value)
        assert type(got) is type(ref), (name, value)
        assert got == ref
    v, s = normax.logsumexp(value, return_sign=True)
    assert isinstance(v, np.generic) and isinstance(s, np.generic)


def test_zero_d_other_functions_are_numpy_scalars():
    x = np.array(0.5)
    for f in (normax.softmax_backward, normax.log_softmax_backward):
        assert isinstance(f(x, x), np.float64)
        assert isinstance(f(np.float32(0.5), np.float32(1)), np.float32)
    # One unbatched row with reduction="none": a 0-d loss.
    loss = normax.cross_entropy(np.zeros(3), np.array(1), reduction="none")
    assert isinstance(loss, np.float64) and loss == pytest.approx(np.log(3), rel=4 * U)
    loss, grad = normax.cross_entropy_with_grad(np.zeros(3), np.array(1), reduction="none")
    assert isinstance(loss, np.float64) and grad.shape == (3,)
    # The statistics of one row, which the backwards take back.
    x = np.array([1.0, 2.0, 3.0])
    _, mean, rstd = normax.layer_norm(x, return_stats=True)
    assert isinstance(mean, np.float64) and isinstance(rstd, np.float64) and mean == 2.0
    dx = normax.layer_norm_backward(np.ones(3), x, mean=mean, rstd=rstd)[0]
    np.testing.assert_array_equal(dx, normax.layer_norm_backward(np.ones(3), x)[0])
    for norm in (normax.rms_norm, normax.crms_norm):
        assert isinstance(norm(x, return_stats=True)[1], np.float64)


def test_zero_d_out_is_returned_as_given():
    out = np.empty(())
    assert normax.softmax(np.float64(3), out=out) is out and out[()] == 1.0
    assert normax.log_softmax(np.array(3.0), out=out) is out and out[()] == 0.0


def test_zero_d_torch_and_jax_stay_their_types():
    torch = pytest.importorskip("torch")
    for f in (normax.softmax, normax.log_softmax, normax.logsumexp):
        got = f(torch.tensor(3.0))
        assert isinstance(got, torch.Tensor) and got.ndim == 0 and got.dtype == torch.float32
    jnp = pytest.importorskip("jax.numpy")
    for f in (normax.softmax, normax.log_softmax, normax.logsumexp):
        got = f(jnp.float32(3.0))
        assert type(got).__module__.startswith("jax") and got.shape == () and got.dtype == jnp.float32
