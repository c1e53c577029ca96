"""The column kernels: a reduction over an axis that is not the last (axis=0 or 1 of a 3-D array)
runs one column per SIMD lane, not the row kernels. Against float64 (long double) references, on
every ISA, at shapes whose inner size exercises vector tails, several vector groups, several
column blocks and blocks of rows, with the row path's bounds (TOL, BACKWARD_C)."""

from __future__ import annotations

import normax
import numpy as np
import pytest
from accuracy import UNIT_ROUNDOFF, rel_error

from .softmax_reference import (
    BACKWARD_C,
    F32,
    F64,
    TOL,
    check_forward,
    log_softmax_grad_ref,
    rng_for,
    softmax_grad_ref,
)
from .test_stablemax import RTOL, log_stablemax_ref, stablemax_ref

# (outer, len, inner) once moved to 3-D: inner 37 (tails), 300 (several vector groups and an
# unaligned head block), 1029 (several column blocks); len 1, 2, 130 (blocks of 64 rows + tail).
SHAPES = [(3, 130, 37), (2, 2, 300), (1, 1, 1029), (2, 70, 1029), (1, 257, 64)]


def _columns(dtype, shape, axis, seed):
    """A 3-D array whose `axis` has the shape's `len`: (len, outer * inner) laid out (outer, len,
    inner) when axis=1, (len, a, b) when axis=0."""
    outer, n, inner = shape
    full = (n, outer, inner) if axis == 0 else (outer, n, inner)
    return rng_for("columns", str(dtype), shape, axis, seed).normal(0, 5, full).astype(dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_against_reference(isa, dtype, axis, shape):
    x = _columns(dtype, shape, axis, 0)
    check_forward(x, dtype, axis=axis, what=f"{shape} axis={axis}")
    # Increasing columns: the running max rises in every block of rows.
    along = [1, 1, 1]
    along[axis] = -1
    ramp = (np.arange(x.shape[axis]) * 0.37).reshape(along) + x * 0.01
    check_forward(ramp.astype(dtype), dtype, axis=axis, what=f"{shape} ramp")
    # In place (out is x) as out of place.
    for f in (normax.softmax, normax.log_softmax):
        y = f(x, axis=axis)
        z = x.copy()
        assert f(z, axis=axis, out=z) is z
        np.testing.assert_array_equal(z, y)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("axis", [0, 1])
def test_special_columns(isa, dtype, axis):
    """NaN, +inf, all -inf, one -inf, huge and far-negative columns beside ordinary ones: the
    special ones as the row path gives them (the last axis of the transposed data), the others
    untouched by them."""
    x = _columns(dtype, (2, 130, 40), axis, 1)
    cols = np.moveaxis(x, axis, -1)  # a view: writes land in x
    big = 1e30 if dtype == F32 else 1e200
    cols[:, 1, 65] = np.nan
    cols[:, 2, -1] = np.inf
    cols[:, 3, :] = -np.inf
    cols[:, 4, 0] = -np.inf
    cols[:, 5, :] *= big
    cols[:, 6, :] -= 5000.0 if dtype == F32 else 1e5
    rows = np.ascontiguousarray(cols)
    for f in (normax.softmax, normax.log_softmax, normax.stablemax, normax.log_stablemax):
        got = np.moveaxis(f(x, axis=axis), axis, -1)
        want = f(rows, axis=-1)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f.__name__)
        keep = ~np.isnan(want)
        assert rel_error(got[keep], want[keep], 1e-300) <= 4 * TOL[dtype], f.__name__
    l, s = normax.logsumexp(x, axis=axis, return_sign=True)
    lr, sr = normax.logsumexp(rows, axis=-1, return_sign=True)
    np.testing.assert_array_equal(np.isnan(l), np.isnan(lr))
    np.testing.assert_array_equal(s, sr)
    keep = np.isfinite(lr)
    np.testing.assert_array_equal(l[~keep], lr[~keep])
    assert rel_error(l[keep], lr[keep]) <= 4 * TOL[dtype]
    # Column 6 is below the exp's range: finite results, the exact path's.
    assert np.all(np.isfinite(np.moveaxis(normax.log_softmax(x, axis=axis), axis, -1)[:, 6]))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stablemax_against_reference(isa, dtype, axis, shape):
    x = _columns(dtype, shape, axis, 2)
    rtol = RTOL[dtype]  # the row path's (test_stablemax.py)
    np.testing.assert_allclose(normax.stablemax(x, axis=axis), stablemax_ref(x, axis), rtol=rtol, atol=0)
    np.testing.assert_allclose(
        normax.log_stablemax(x, axis=axis), log_stablemax_ref(x, axis), rtol=rtol, atol=0
    )


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_against_formula(isa, dtype, axis, shape):
    x = _columns(dtype, shape, axis, 3)
    dy = _columns(dtype, shape, axis, 4) / 5
    for fwd, bwd, ref_f in (
        (normax.softmax, normax.softmax_backward, softmax_grad_ref),
        (normax.log_softmax, normax.log_softmax_backward, log_softmax_grad_ref),
    ):
        y = fwd(x, axis=axis)
        dx = bwd(y, dy, axis=axis)
        assert dx.dtype == dtype and dx.shape == x.shape
        ref, bound = ref_f(y, dy, axis)
        err = np.abs(dx.astype(ref.dtype) - ref) - BACKWARD_C * UNIT_ROUNDOFF[dtype] * bound
        assert np.max(err) <= 0, (bwd.__name__, shape, axis)
