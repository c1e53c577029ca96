"""stablemax, log_stablemax and their backwards: the NumPy-first API of Prieto et al. 2025,
"Grokking at the Edge of Numerical Stability".

StableMax replaces softmax's exp by s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0, so
``stablemax(x) = s(x) / sum(s(x))``. Since ``s = exp(log s)``, StableMax is softmax of
``phi(x) = log s(x) = sign(x) * log1p(|x|)``: the cross-entropy with ``normalizer="stablemax"``
is the softmax cross-entropy of phi(x) (every option carries over), with the gradient chained
through ``phi'(x) = s'(x) / s(x) = 1 / (1 + |x|)``; the Rust kernels form phi (the vector
log1p) and the chain inside the cross-entropy's row passes, or, for class targets without
smoothing, softcap or statistics, sum s(x) directly (see ``normax.cross_entropy``).
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._arrays import as_backward_inputs, as_input, finish
from ._softmax import row_backward, row_map

NORMALIZERS = ("softmax", "stablemax")


def check_normalizer(normalizer) -> bool:
    """True for "stablemax", False for "softmax"; ValueError naming `normalizer` otherwise."""
    if not isinstance(normalizer, str) or normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer: expected one of {NORMALIZERS}, got {normalizer!r}")
    return normalizer == "stablemax"


def _real(x):
    """`x` unchanged where the kernels' fast path takes it; complex input refused (StableMax has
    no complex definition; softmax's complex branch must not take it)."""
    if type(x) is np.ndarray and x.dtype.kind == "f":
        return x
    a = np.asarray(x)
    if a.dtype.kind == "c":
        raise TypeError(f"x: unsupported dtype {a.dtype}; StableMax is defined for real input only")
    return a


def stablemax(x, axis=-1, *, out=None):
    """StableMax: ``s(x) / sum(s(x), axis)`` with s(x) = x + 1 for x >= 0, 1 / (1 - x) below.

    Parameters
    ----------
    x : array_like
        Real input; dtype rules as in :func:`normax.softmax` (float16/bfloat16 computed in
        float32, integers and bool in float64). Complex input raises TypeError.
    axis : int, tuple of int or None, default -1
        Axis or axes the result sums to one over; None means all axes.
    out : ndarray, optional
        Writeable array of the result's shape and dtype; may be `x` itself.

    Returns
    -------
    ndarray or scalar
        Same shape as `x`; a 0-d result is a NumPy scalar, as :func:`normax.softmax`.

    Raises
    ------
    numpy.exceptions.AxisError, TypeError, ValueError
        As :func:`normax.softmax`.

    Notes
    -----
    The paper's remedy for Softmax Collapse: s grows linearly, so probabilities do not round to
    exactly 1 until the logits are about 2**24 times apart (float32), not 17 apart. SIMD kernel:
    one pass for the row's sum (float32 partial sums folded into float64), one for ``s(x) / sum``;
    a row whose float32 partial sums would overflow (values near 3e38) is summed in float64. A row
    holding NaN or +inf, or only -inf, is all NaN (as :func:`normax.softmax`); -inf gives 0.

    Examples
    --------
    >>> import numpy as np, normax
    >>> normax.stablemax(np.array([-1.0, 0.0, 1.0]))
    array([0.14285714, 0.28571429, 0.57142857])
    """
    return row_map(_core.stablemax, _core.stablemax_last, _real(x), axis, out)


def log_stablemax(x, axis=-1, *, out=None):
    """log of :func:`stablemax`: ``log s(x) - log(sum(s(x), axis))``.

    Parameters
    ----------
    x : array_like
        Real input; dtype rules as in :func:`stablemax`.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over; None means all axes.
    out : ndarray, optional
        Writeable array of the result's shape and dtype; may be `x` itself.

    Returns
    -------
    ndarray or scalar
        Same shape as `x`; a 0-d result is a NumPy scalar.

    Raises
    ------
    numpy.exceptions.AxisError, TypeError, ValueError
        As :func:`normax.softmax`.

    Notes
    -----
    The sums are the SIMD ones of :func:`stablemax`; each element is then ``sign(x) *
    log1p(|x|) - log(sum)`` on a SIMD log1p (float32: within 1 ULP of the correctly rounded
    log1p; float64: the C library's), the difference rounded once, and the row's largest
    element (which may be close to 0) ``-log1p(rest / s(max))`` in float64 with `rest` the sum
    of the other elements, so it keeps its relative accuracy when one element dominates.
    Along an axis other than the last the elements are written in float64 one by one.

    Examples
    --------
    >>> import numpy as np, normax
    >>> normax.log_stablemax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return row_map(_core.log_stablemax, _core.log_stablemax_last, _real(x), axis, out)


def _scaled_backward(kernel, y, dy, x, axis):
    """softmax's backward `kernel` of (y, dy), times s'(x) / s(x) = 1 / (1 + |x|)."""
    ya, _, dya, work, result = as_backward_inputs(_real(y), "y", _real(dy))
    xa, _ = as_input(_real(x), "x")
    if xa.shape != ya.shape:
        raise ValueError(f"x: shape {xa.shape} does not match y shape {ya.shape}")
    g = np.asarray(row_backward(kernel, ya.astype(work, copy=False), dya.astype(work, copy=False), axis))
    with np.errstate(invalid="ignore"):
        return finish(g / (1 + np.abs(xa.astype(work, copy=False))), result, None)


def stablemax_backward(y, dy, x, axis=-1):
    """Gradient of :func:`stablemax`: ``dx = y * (dy - sum(dy * y, axis)) / (1 + |x|)``.

    Parameters
    ----------
    y : array_like
        The forward output, ``stablemax(x, axis)``.
    dy : array_like
        Gradient of the loss with respect to `y`; same shape as `y`.
    x : array_like
        The forward input; same shape as `y`. Unlike :func:`normax.softmax_backward`, y alone
        does not determine the gradient: ``dy/dx = (s'(x) / s(x)) * (softmax's Jacobian in
        y)``, and s'(x) / s(x) = 1 / (1 + |x|) depends on x itself (stablemax is not invariant
        to shifts of x).
    axis : int, tuple of int or None, default -1
        The axis (or axes) the forward normalized over.

    Returns
    -------
    ndarray or scalar
        dx, shaped like `y`, in the promoted dtype of `y`, `dy` (a NumPy scalar for 0-d `y`).

    Raises
    ------
    ValueError
        If `dy` or `x` is not shaped like `y`.
    numpy.exceptions.AxisError, TypeError
        As :func:`normax.softmax`.

    Examples
    --------
    >>> import numpy as np, normax
    >>> x = np.array([-1.0, 1.0])
    >>> normax.stablemax_backward(normax.stablemax(x), np.array([1.0, 0.0]), x)
    array([ 0.08, -0.08])
    """
    return _scaled_backward(_core.softmax_backward, y, dy, x, axis)


def log_stablemax_backward(y, dy, x, axis=-1):
    """Gradient of :func:`log_stablemax`: ``dx = (dy - exp(y) * sum(dy, axis)) / (1 + |x|)``.

    Parameters
    ----------
    y : array_like
        The forward output, ``log_stablemax(x, axis)``.
    dy : array_like
        Gradient of the loss with respect to `y`; same shape as `y`.
    x : array_like
        The forward input; same shape as `y` (see :func:`stablemax_backward`).
    axis : int, tuple of int or None, default -1
        The axis (or axes) the forward normalized over.

    Returns
    -------
    ndarray or scalar
        dx, shaped like `y`, in the promoted dtype of `y`, `dy`.

    Raises
    ------
    ValueError
        If `dy` or `x` is not shaped like `y`.
    numpy.exceptions.AxisError, TypeError
        As :func:`normax.softmax`.

    Examples
    --------
    >>> import numpy as np, normax
    >>> x = np.array([0.0, 0.0])
    >>> normax.log_stablemax_backward(normax.log_stablemax(x), np.array([1.0, 0.0]), x)
    array([ 0.5, -0.5])
    """
    return _scaled_backward(_core.log_softmax_backward, y, dy, x, axis)
