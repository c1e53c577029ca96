"""The softmax family's backwards (softmax_backward, log_softmax_backward) against their formulas
and torch autograd, and the family's properties (hypothesis): rows sum to one, shift invariance,
log_softmax = log(softmax), logsumexp >= max, gradients vs finite differences.

The backward's error bound is at BACKWARD_C (softmax_reference.py); the forward tolerances TOL
are explained in test_softmax.py's docstring.
"""

from __future__ import annotations

import normax
import numpy as np
import pytest
from accuracy import UNIT_ROUNDOFF
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .softmax_reference import (
    BACKWARD_C,
    BF16,
    F32,
    F64,
    TOL,
    log_softmax_grad_ref,
    rng_for,
    softmax_grad_ref,
)

# ---------------------------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("axis", [-1, 0, 1, (0, 2), None], ids=repr)
def test_backward_vs_formula(isa, dtype, axis):
    rng = rng_for("bwd", str(dtype), str(axis))
    for shape in [(3, 4, 5), (2, 3, 67), (2, 2, 1000)]:
        x = rng.normal(0, 5, shape).astype(dtype)
        dy = rng.normal(0, 1, shape).astype(dtype)
        y = normax.softmax(x, axis=axis)
        ly = normax.log_softmax(x, axis=axis)
        for f, ref_f, yy in (
            (normax.softmax_backward, softmax_grad_ref, y),
            (normax.log_softmax_backward, log_softmax_grad_ref, ly),
        ):
            dx = f(yy, dy, axis=axis)
            assert dx.dtype == dtype and dx.shape == shape
            ref, bound = ref_f(yy, dy, axis)
            err = np.abs(dx.astype(ref.dtype) - ref) - BACKWARD_C * UNIT_ROUNDOFF[dtype] * bound
            assert np.max(err) <= 0, (f.__name__, shape, axis)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("dim", [-1, 0, 1], ids=str)
def test_backward_vs_torch_autograd(isa, dtype, dim):
    import torch

    rng = rng_for("torch", str(dtype), dim)
    x = rng.normal(0, 5, (6, 7, 70)).astype(dtype)
    dy = rng.normal(0, 1, x.shape).astype(dtype)
    for tf, nf, ref_f in (
        (torch.softmax, normax.softmax_backward, softmax_grad_ref),
        (torch.log_softmax, normax.log_softmax_backward, log_softmax_grad_ref),
    ):
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = tf(xt, dim)
        yt.backward(torch.from_numpy(dy))
        y = yt.detach().numpy()
        dx = nf(y, dy, axis=dim)
        assert dx.dtype == dtype
        # Both normax and torch are within c u * bound of the exact gradient of the same y: so
        # within 2 c u * bound of each other.
        _, bound = ref_f(y, dy, dim)
        err = np.abs(dx.astype(bound.dtype) - xt.grad.numpy()) - 2 * BACKWARD_C * UNIT_ROUNDOFF[dtype] * bound
        assert np.max(err) <= 0, nf.__name__
        # And the forward agrees with torch's forward to the forward tolerances.
        fwd = (normax.softmax if tf is torch.softmax else normax.log_softmax)(x, axis=dim)
        np.testing.assert_allclose(
            fwd, y, rtol=1e-5 if dtype == F32 else 1e-12, atol=1e-5 if dtype == F32 else 1e-12
        )


def test_backward_dtypes_and_shapes():
    y32 = normax.softmax(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    dy64 = np.ones((3, 4))
    assert normax.softmax_backward(y32, y32).dtype == np.float32
    assert normax.softmax_backward(y32, dy64).dtype == np.float64  # promoted
    assert normax.log_softmax_backward(y32.astype(np.float16), y32.astype(np.float16)).dtype == np.float16
    assert normax.softmax_backward(y32.astype(BF16), y32.astype(BF16)).dtype == BF16
    for f in (normax.softmax_backward, normax.log_softmax_backward):
        for bad in (np.ones((4, 3)), np.ones((3, 4, 1)), np.ones(12), np.ones((3, 1))):
            with pytest.raises(ValueError):
                f(y32, bad)
        assert f(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0, 4)
    # A constant upstream gradient has zero softmax gradient (rows sum to 1).
    np.testing.assert_allclose(normax.softmax_backward(y32, np.full((3, 4), 3.0, np.float32)), 0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis)

# derandomize: the same examples every run (CI-stable); database=None: nothing written to disk.
PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def float_rows(dtype=np.float64, lo=-200.0, hi=200.0, max_len=40):
    return hnp.arrays(
        dtype,
        st.tuples(st.integers(1, 4), st.integers(1, max_len)),
        elements=st.floats(lo, hi, allow_nan=False, width=np.dtype(dtype).itemsize * 8),
    )


@PROPS
@given(x=float_rows(), dtype=st.sampled_from([np.float32, np.float64]))
def test_property_rows_sum_to_one(x, dtype):
    x = x.astype(dtype)
    y = normax.softmax(x)
    # Each y_i is within TOL relative of the exact value, so the sum (taken in float64) is within
    # TOL of 1, plus the float64 summation's n u64.
    np.testing.assert_allclose(y.astype(np.float64).sum(-1), 1.0, rtol=0, atol=TOL[np.dtype(dtype)] + 1e-13)
    assert np.all(y >= 0) and np.all(y <= 1)


@PROPS
@given(x=float_rows(lo=-100, hi=100), c=st.integers(-60, 60))
def test_property_shift_invariance(x, c):
    # Inputs on a 2**-20 grid, |x| <= 100: x + c is exact in float64, so both calls see the same
    # mathematical softmax and each is within TOL of it.
    x = np.round(x * 2.0**20) / 2.0**20
    np.testing.assert_allclose(normax.softmax(x + c), normax.softmax(x), rtol=2 * TOL[F64], atol=1e-300)
    np.testing.assert_allclose(
        normax.log_softmax(x + c), normax.log_softmax(x), rtol=0, atol=2 * TOL[F64] * 300
    )
    np.testing.assert_allclose(
        normax.logsumexp(x + c) - c, normax.logsumexp(x), rtol=0, atol=2 * TOL[F64] * 300
    )


@PROPS
@given(x=float_rows())
def test_property_log_softmax_is_log_of_softmax(x):
    y, ly = normax.softmax(x), normax.log_softmax(x)
    keep = y > 1e-290  # where log(softmax) is finite and y is not subnormal
    with np.errstate(divide="ignore"):
        ref = np.log(y)
    # log(y) carries y's relative error (<= TOL) as an absolute one; ly is within TOL of the
    # operands' scale max(1, |ly|, |lse|) (see test_softmax.py's docstring).
    lse = normax.logsumexp(x, keepdims=True)
    scale = np.maximum(1, np.maximum(np.abs(ly), np.abs(lse)))
    assert np.all(np.abs(ref - ly)[keep] <= 2 * TOL[F64] * scale[keep])


@PROPS
@given(x=float_rows(), dtype=st.sampled_from([np.float32, np.float64]))
@example(x=np.array([[2.0]]), dtype=np.float64)
@example(x=np.array([[0.1]]), dtype=np.float32)
def test_property_logsumexp_at_least_max(x, dtype):
    """log(sum(exp(x))) >= max(x) exactly: the true value is >= max(x), max(x) is representable,
    and rounding is monotone, so a result within rounding of the true value cannot fall below.
    Likewise log_softmax(x) <= 0: a log-probability is never positive (0 is representable)."""
    x = x.astype(dtype)
    l = normax.logsumexp(x)
    m = x.max(-1)
    bad = l < m
    assert not np.any(bad), f"logsumexp {l[bad]!r} < max {m[bad]!r}"
    ly = normax.log_softmax(x)
    assert np.all(ly <= 0), f"log_softmax positive: {ly[ly > 0]!r}"
    # And at most max + log(n).
    assert np.all(l <= m + np.log(x.shape[-1]) * (1 + 1e-6) + 1e-6 * np.maximum(1, np.abs(m)))


def _central_difference(f, x, h):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


@PROPS
@given(
    x=hnp.arrays(np.float64, st.integers(1, 8), elements=st.floats(-20, 20)),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_gradients_vs_finite_differences(x, seed):
    """Central differences with h = 1e-5: truncation ~h**2 * |f'''| and rounding ~u|f|/h, both
    well under 1e-7 for |x| <= 20 and |dy| <= 1."""
    dy = np.random.default_rng(seed).uniform(-1, 1, x.shape)
    h = 1e-5
    g = normax.softmax_backward(normax.softmax(x), dy)
    np.testing.assert_allclose(
        g, _central_difference(lambda v: np.dot(dy, normax.softmax(v)), x, h), atol=1e-7
    )
    g = normax.log_softmax_backward(normax.log_softmax(x), dy)
    np.testing.assert_allclose(
        g, _central_difference(lambda v: np.dot(dy, normax.log_softmax(v)), x, h), atol=1e-6
    )
    # d logsumexp / dx = softmax(x).
    np.testing.assert_allclose(
        normax.softmax(x), _central_difference(lambda v: normax.logsumexp(v), x, h), atol=1e-7
    )
