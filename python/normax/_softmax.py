"""softmax, log_softmax, logsumexp and their backwards: the NumPy-first API."""

from __future__ import annotations

import numpy as np

from . import _core
from ._arrays import Plan, as_backward_inputs, as_input, check_out, direct_output, finish, normalize_axes

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_fast(x) -> bool:
    """A C-contiguous native float32/float64 ndarray with at least one axis: no conversion needed."""
    return (
        type(x) is np.ndarray
        and x.dtype in _FAST_DTYPES
        and x.ndim > 0
        and x.flags.c_contiguous
        and x.dtype.isnative
    )


def _map(kernel, kernel_last, x, axis, out):
    """Runs a row-to-row kernel (softmax, log_softmax) on `x` over `axis`."""
    # The common call in one crossing into Rust: a contiguous float32/float64 array over its last
    # axis into a fresh array (None back for anything else).
    if axis == -1 and out is None:
        y = kernel_last(x)
        if y is not None:
            return y
    # Into itself, or a separate contiguous array of its dtype.
    if (
        axis == -1
        and _is_fast(x)
        and (
            out is x
            or (
                type(out) is np.ndarray
                and out.dtype == x.dtype
                and out.shape == x.shape
                and out.flags.c_contiguous
                and out.flags.writeable
                and not np.may_share_memory(out, x)
            )
        )
    ):
        n = x.shape[-1]
        if n:
            kernel(x, out, x.size // n, n, 1)
        return out

    a, result_dtype = as_input(x)
    if out is not None:
        check_out(out, a.shape, result_dtype)
    axes = normalize_axes(axis, a.ndim)
    plan = Plan(a.shape, axes)
    if a.ndim == 0:
        a = a.reshape(1)
    work = plan.arrange(a)
    y = direct_output(out, work, plan) if out is not None else None
    if y is None:
        y = np.empty_like(work)
    if work.size:
        kernel(work, y, plan.outer, plan.len, plan.inner)
    return finish(plan.restore(y).reshape(plan.shape), result_dtype, out)


def softmax(x, axis=-1, *, out=None):
    """Softmax: ``exp(x) / sum(exp(x), axis)``.

    Parameters
    ----------
    x : array_like
        Input. float32 and float64 are computed as themselves; float16, bfloat16 (ml_dtypes) are
        computed in float32 and returned in their dtype; integers and bool become float64.
    axis : int, tuple of int or None, default -1
        Axis or axes the probabilities sum to one over; None means all axes.
    out : ndarray, optional
        Writeable array of the result's shape and dtype to write into; may be `x` itself.

    Returns
    -------
    ndarray
        Same shape as `x`.

    Raises
    ------
    numpy.exceptions.AxisError
        If an axis is out of range.
    TypeError
        For complex, string or object input, or an `out` of the wrong dtype.
    ValueError
        For an `out` of the wrong shape, or a read-only one.

    Notes
    -----
    Two-pass algorithm (Dukhan & Ablavatski, 2020): exp(x) is evaluated as ``m * 2**n`` from x
    itself, and the row's sum is kept as a (mantissa, exponent) pair, so nothing overflows and no
    ``x - max`` rounding enters the result: float32 results are within a few ULP of the correctly
    rounded value. Short rows use an in-cache variant (max pass, exp pass, scale pass) with the
    same accuracy. A row holding NaN or +inf, or only -inf, is all NaN (as ``torch.softmax`` and
    ``scipy.special.softmax``). Unlike ``scipy.special.softmax`` (default ``axis=None``), the
    default axis is the last one, as in ``torch.softmax`` and ``jax.nn.softmax``.

    Examples
    --------
    >>> import numpy as np, normax
    >>> normax.softmax(np.array([0.0, np.log(3.0)]))
    array([0.25, 0.75])
    """
    return _map(_core.softmax, _core.softmax_last, x, axis, out)


def log_softmax(x, axis=-1, *, out=None):
    """Log-softmax: ``x - logsumexp(x, axis, keepdims=True)``.

    Parameters
    ----------
    x : array_like
        Input; dtype rules as in :func:`softmax`.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over; None means all axes.
    out : ndarray, optional
        Writeable array of the result's shape and dtype; may be `x` itself.

    Returns
    -------
    ndarray
        Same shape as `x`.

    Raises
    ------
    numpy.exceptions.AxisError, TypeError, ValueError
        As :func:`softmax`.

    Notes
    -----
    The log-sum-exp is formed in float64 from the two-pass sum and split into a high and a low
    part, so ``x - lse`` is exact where x is close to lse (the cancellation case). A row holding
    NaN or +inf, or only -inf, is all NaN; -inf entries of other rows give -inf.

    Examples
    --------
    >>> import numpy as np, normax
    >>> normax.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return _map(_core.log_softmax, _core.log_softmax_last, x, axis, out)


def logsumexp(x, axis=-1, *, b=None, keepdims=False, return_sign=False):
    """``log(sum(b * exp(x), axis))``, computed without overflow.

    Parameters
    ----------
    x : array_like
        Input; dtype rules as in :func:`softmax`.
    axis : int, tuple of int or None, default -1
        Axis or axes to reduce; None means all.
    b : array_like, optional
        Weights broadcast against `x`, as in ``scipy.special.logsumexp``. Elements with b == 0 are
        left out (so x = inf there does not make the result inf or NaN).
    keepdims : bool, default False
        Keep the reduced axes with length one.
    return_sign : bool, default False
        Also return the sign of the weighted sum (+1, -1, 0 for an empty or zero sum).

    Returns
    -------
    res : ndarray or scalar
        ``log(abs(sum(b * exp(x))))``. Without `return_sign`, NaN where the weighted sum is
        negative (as SciPy). A 0-d result is returned as a NumPy scalar.
    sgn : ndarray or scalar
        The sign, only with ``return_sign=True``.

    Raises
    ------
    numpy.exceptions.AxisError
        If an axis is out of range.
    ValueError
        If `b` does not broadcast against `x`.
    TypeError
        For complex, string or object input or weights.

    Notes
    -----
    Differences from ``scipy.special.logsumexp``: the default axis is -1 (SciPy: None), and
    float32 input gives a float32 result (integer and Python-scalar weights keep it so; float64
    weights promote to float64). NaN anywhere in a reduced row gives NaN; +inf (and no NaN) gives
    +inf; an empty reduction or a row of only -inf gives -inf.

    Examples
    --------
    >>> import numpy as np, normax
    >>> float(normax.logsumexp(np.log(np.array([1.0, 2.0, 3.0]))))
    1.791759469228055
    """
    if b is None and not keepdims and not return_sign and axis == -1 and _is_fast(x) and x.ndim > 1:
        n = x.shape[-1]
        res = np.empty(x.shape[:-1], x.dtype)
        if res.size:
            _core.logsumexp(x, None, res, None, res.size, n, 1)
        return res
    a, result_dtype = as_input(x)
    if b is not None:
        b_arr = np.asarray(b)
        if b_arr.dtype.kind not in "fiub" and not (b_arr.dtype.kind == "V"):
            raise TypeError(f"b: unsupported dtype {b_arr.dtype}; expected a real array")
        if b_arr.dtype.kind == "f" and not isinstance(b, (float, int)):
            work_dtype = np.result_type(a.dtype, b_arr.dtype)
            if work_dtype != a.dtype:
                a = a.astype(work_dtype)
                result_dtype = np.result_type(result_dtype, b_arr.dtype)
        try:
            a, b_arr = np.broadcast_arrays(a, b_arr)
        except ValueError:
            raise ValueError(f"b: shape {b_arr.shape} does not broadcast with x shape {a.shape}") from None
        b_arr = b_arr.astype(a.dtype)
    axes = normalize_axes(axis, a.ndim)
    plan = Plan(a.shape, axes)
    if a.ndim == 0:
        a = a.reshape(1)
        b_arr = b_arr.reshape(1) if b is not None else None
    work = plan.arrange(a)
    wb = plan.arrange(b_arr) if b is not None else None
    res = np.empty(plan.reduced_shape, a.dtype)
    sign = np.empty(plan.reduced_shape, a.dtype) if (return_sign or b is not None) else None
    if res.size:
        _core.logsumexp(work, wb, res, sign, plan.outer, plan.len, plan.inner)
    if b is not None and not return_sign:
        res[sign < 0] = np.nan
    if keepdims:
        res = res.reshape(plan.keepdims_shape)
        sign = sign.reshape(plan.keepdims_shape) if sign is not None else None
    res = finish(res, result_dtype, None)
    res = res[()] if res.ndim == 0 else res
    if return_sign:
        sign = finish(sign, result_dtype, None)
        return res, (sign[()] if sign.ndim == 0 else sign)
    return res


def _backward(kernel, y, dy, axis):
    if axis == -1 and _is_fast(y) and _is_fast(dy) and y.dtype == dy.dtype and y.shape == dy.shape:
        dx = np.empty_like(y)
        n = y.shape[-1]
        if n:
            kernel(y, dy, dx, y.size // n, n, 1)
        return dx
    ya, _, dya, work_dtype, result_dtype = as_backward_inputs(y, "y", dy)
    axes = normalize_axes(axis, ya.ndim)
    plan = Plan(ya.shape, axes)
    if ya.ndim == 0:
        ya, dya = ya.reshape(1), dya.reshape(1)
    wy = plan.arrange(ya.astype(work_dtype, copy=False))
    wdy = plan.arrange(dya.astype(work_dtype, copy=False))
    dx = np.empty_like(wy)
    if dx.size:
        kernel(wy, wdy, dx, plan.outer, plan.len, plan.inner)
    return finish(plan.restore(dx).reshape(plan.shape), result_dtype, None)


def softmax_backward(y, dy, axis=-1):
    """Gradient of :func:`softmax`: ``dx = y * (dy - sum(dy * y, axis))``.

    Parameters
    ----------
    y : array_like
        The forward output, ``softmax(x, axis)``.
    dy : array_like
        Gradient of the loss with respect to `y`; same shape as `y`.
    axis : int, tuple of int or None, default -1
        The axis (or axes) the forward normalized over.

    Returns
    -------
    ndarray
        dx, the gradient with respect to x, shaped like `y`, in the promoted dtype of `y`, `dy`.

    Raises
    ------
    ValueError
        If `dy` is not shaped like `y`.
    numpy.exceptions.AxisError, TypeError
        As :func:`softmax`.

    Examples
    --------
    >>> import numpy as np, normax
    >>> y = normax.softmax(np.array([1.0, 2.0]))
    >>> normax.softmax_backward(y, np.array([1.0, 1.0]))
    array([0., 0.])
    """
    return _backward(_core.softmax_backward, y, dy, axis)


def log_softmax_backward(y, dy, axis=-1):
    """Gradient of :func:`log_softmax`: ``dx = dy - exp(y) * sum(dy, axis)``.

    Parameters
    ----------
    y : array_like
        The forward output, ``log_softmax(x, axis)``.
    dy : array_like
        Gradient of the loss with respect to `y`; same shape as `y`.
    axis : int, tuple of int or None, default -1
        The axis (or axes) the forward normalized over.

    Returns
    -------
    ndarray
        dx, shaped like `y`, in the promoted dtype of `y`, `dy`.

    Raises
    ------
    ValueError
        If `dy` is not shaped like `y`.
    numpy.exceptions.AxisError, TypeError
        As :func:`softmax`.

    Examples
    --------
    >>> import numpy as np, normax
    >>> y = normax.log_softmax(np.array([0.0, 0.0]))
    >>> normax.log_softmax_backward(y, np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """
    return _backward(_core.log_softmax_backward, y, dy, axis)
