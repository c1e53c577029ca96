"""Error measures of the normax tests against a reference.

Error measures are stated against a higher-precision reference computed from the *same* input
values (a float32 input is converted to float64 exactly), so input rounding never counts against
the kernels: only the kernels' own rounding does.
"""

from __future__ import annotations

import numpy as np

# Unit roundoff (half an ULP at 1.0) of the kernel dtypes.
UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}

# Whether np.longdouble carries more precision than float64 (x86 80-bit extended: 64-bit mantissa).
# Where it does, float64 results are compared to a long-double reference at a few-ULP tolerance.
LONGDOUBLE_IS_EXTENDED = np.finfo(np.longdouble).eps < 2.0**-60


def assert_same_specials(actual, expected) -> None:
    """NaN where expected is NaN, and +-inf exactly where expected is +-inf."""
    a, e = _widen(actual, expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg="NaN positions differ")
    inf = np.isinf(e)
    np.testing.assert_array_equal(np.isinf(a), inf, err_msg="inf positions differ")
    np.testing.assert_array_equal(a[inf], e[inf], err_msg="infinities differ in sign")


def _widen(*arrays):
    """All as float64, or as long double where any already is one (a long-double reference for
    float64 results): wide enough to measure the error without adding any."""
    arrays = [np.asarray(v) for v in arrays]
    wide = np.longdouble if any(v.dtype == np.longdouble for v in arrays) else np.float64
    # Via float64: exact for every dtype here (ml_dtypes' bfloat16 included).
    return [v if v.dtype == wide else v.astype(np.float64).astype(wide) for v in arrays]


def _finite_pairs(actual, expected, *more):
    a, e, *more = _widen(actual, expected, *more)
    assert_same_specials(a, e)
    keep = np.isfinite(e)
    return (a[keep], e[keep], keep, *more)


def rel_error(actual, expected, tiny: float = 1e-30) -> float:
    """max |actual - expected| / |expected| over the finite entries with |expected| > tiny
    (specials must match exactly; entries at or below `tiny` are not measured)."""
    a, e, _ = _finite_pairs(actual, expected)
    keep = np.abs(e) > tiny
    if not keep.any():
        return 0.0
    return float(np.max(np.abs(a[keep] - e[keep]) / np.abs(e[keep])))


def scaled_error(actual, expected, scale) -> float:
    """max |actual - expected| / scale over the finite entries (specials must match exactly).

    For values formed as a difference (log_softmax = x - lse) or a logarithm (logsumexp) the natural
    error bound is a few roundoffs of the operands' magnitude, not of the (possibly cancelled)
    result: pass that magnitude as `scale`.
    """
    scale = np.broadcast_to(np.asarray(scale), np.shape(expected))
    a, e, keep, s = _finite_pairs(actual, expected, scale)
    s = s[keep]
    if not a.size:
        return 0.0
    return float(np.max(np.abs(a - e) / s))


def ulp_error(actual, expected, dtype) -> float:
    """rel_error in units u of `dtype`'s unit roundoff (2**-24 for float32, 2**-53 for float64),
    over entries with |expected| > 1e-30.

    One ULP is between u and 2u relative (2u at the bottom of a binade, u at its top), so a
    correctly rounded result is within 1 u, and k ULP is at most 2k u.
    """
    return rel_error(actual, expected) / UNIT_ROUNDOFF[np.dtype(dtype)]


def as_float64(v) -> np.ndarray:
    """A float64 NumPy copy of an array or a torch tensor (on any device, any float dtype)."""
    if hasattr(v, "detach"):
        v = v.detach().double().cpu().numpy()
    return np.asarray(v, np.float64)


def assert_close_to_scale(actual, expected, tol: float, floor: float = 1.0) -> None:
    """max |actual - expected| over the finite entries, relative to the largest finite |expected|
    (at least `floor`), is at most `tol`; specials must match exactly.

    One scale for the whole result: the GPU checks compare kernels that sum in another order
    against a reference, where an elementwise relative error would measure cancellation.
    """
    a, e = as_float64(actual), as_float64(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    finite = np.isfinite(e)
    scale = max(floor, float(np.abs(e[finite]).max())) if finite.any() else floor
    err = scaled_error(a, e, scale)
    assert err <= tol, f"max error {err:.2e} relative to {scale:.3g} (tolerance {tol:.1e})"
