"""The softmax family's references, tolerances and forward check, shared by the softmax test files
(the tolerances are explained in test_softmax.py's docstring, the backward's bound at BACKWARD_C)."""

from __future__ import annotations

import zlib

import ml_dtypes
import normax
import numpy as np
from accuracy import LONGDOUBLE_IS_EXTENDED, UNIT_ROUNDOFF, rel_error, scaled_error

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
BF16 = np.dtype(ml_dtypes.bfloat16)

# Relative tolerance per kernel dtype, explained in test_softmax.py's docstring.
TOL = {F32: 1e-6, F64: 32 * UNIT_ROUNDOFF[F64] if LONGDOUBLE_IS_EXTENDED else 1e-13}
# Smallest reference value whose relative error is measured (see test_softmax.py's docstring).
TINY = {F32: 1e-30, F64: 1e-290}
# normax vs scipy.special in float64: SciPy's own x - max rounding (~40 u) dominates.
SCIPY_RTOL = 1e-13

FORWARD = {"softmax": normax.softmax, "log_softmax": normax.log_softmax}


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from `key` (stable across runs, unlike hash())."""
    return np.random.default_rng([zlib.crc32(repr(k).encode()) for k in key])


def reference(x, axis=-1):
    """(softmax, log_softmax, logsumexp with keepdims) of x: in long double (x86: 64-bit mantissa)
    for float64 input, in float64 for narrower input (its ~1e-15 error is nothing next to 1e-6).

    For inputs without NaN/+inf and with at least one finite element per reduction (-inf entries
    allowed): the max is subtracted in the wide type, where that subtraction is exact or nearly so.
    """
    x = np.asarray(x)
    wide = np.longdouble if x.dtype.itemsize >= 8 else np.float64
    xl = x.astype(np.float64).astype(wide)
    m = np.max(xl, axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        e = np.exp(xl - m)
        s = np.sum(e, axis=axis, keepdims=True)
        # log(s) as log1p of the terms below the max (plus extra ties), not of s - 1: near a
        # dominant element the rest would be rounded away in s.
        below = np.sum(np.where(xl < m, e, 0), axis=axis, keepdims=True)
        ties = np.sum(xl == m, axis=axis, keepdims=True)
        log_s = np.log1p(below + (ties - 1))
        return e / s, (xl - m) - log_s, m + log_s


def log_scale(lsm_ref, lse_ref):
    """The operands' magnitude for log-domain error bounds: max(1, |result|, |lse|)."""
    return np.maximum(1.0, np.maximum(np.abs(lsm_ref), np.abs(lse_ref)))


def check_forward(x, dtype, axis=-1, what="", tol=None):
    """Runs softmax, log_softmax, logsumexp on x (already `dtype`) and checks all three."""
    dtype = np.dtype(dtype)
    tol = TOL[dtype] if tol is None else tol
    sm, lsm, lse = reference(x, axis)
    y = normax.softmax(x, axis=axis)
    ly = normax.log_softmax(x, axis=axis)
    l = normax.logsumexp(x, axis=axis, keepdims=True)
    for name, got in (("softmax", y), ("log_softmax", ly), ("logsumexp", l)):
        assert got.dtype == dtype, (what, name, got.dtype)
    assert y.shape == ly.shape == np.shape(x)
    errs = {
        "softmax": rel_error(y, sm, TINY[dtype]),
        "log_softmax": scaled_error(ly, lsm, log_scale(lsm, lse)),
        "logsumexp": scaled_error(l, lse, np.maximum(1.0, np.abs(lse))),
    }
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{what}: errors above {tol:.3g}: {bad}"


def _wide(*arrays):
    """Long double for float64 inputs, float64 for narrower ones (as `reference`)."""
    wide = np.longdouble if max(np.asarray(a).dtype.itemsize for a in arrays) >= 8 else np.float64
    return [np.asarray(a).astype(np.float64).astype(wide) for a in arrays]


def softmax_grad_ref(y, dy, axis):
    y, dy = _wide(y, dy)
    s = np.sum(y * dy, axis=axis, keepdims=True)
    bound = y * (np.abs(dy) + np.sum(np.abs(y * dy), axis=axis, keepdims=True))
    return y * (dy - s), bound


def log_softmax_grad_ref(y, dy, axis):
    y, dy = _wide(y, dy)
    s = np.sum(dy, axis=axis, keepdims=True)
    bound = np.abs(dy) + np.exp(y) * np.sum(np.abs(dy), axis=axis, keepdims=True)
    return dy - np.exp(y) * s, bound


# Backward error: the sum s carries a few u of sum|terms| (f32 partial sums folded into f64), the
# subtraction and products one u each, exp(y) <= 2 ULP; so |dx - ref| <= c * u * bound with the
# bound above (the magnitudes that enter, not the possibly cancelled result). c = 16.
BACKWARD_C = 16
