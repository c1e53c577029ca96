"""rms_norm, layer_norm, crms_norm and their backwards: the NumPy-first API (PowerNorm is in _power_norm)."""

from __future__ import annotations

import math

import numpy as np

from . import _core
from ._arrays import (
    Plan,
    as_backward_inputs,
    as_input,
    check_out,
    contiguous,
    direct_output,
    finish,
    scalar_0d,
)
from ._options import machine_eps, norm_axes, norm_options, param

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FAST_EPS = {d: float(np.finfo(d).eps) for d in _FAST_DTYPES}  # rms_norm's default eps


def _stat(s, name: str, shape: tuple[int, ...]):
    """A saved statistic (mean or rstd) as contiguous float64 of the rows' shape."""
    if s is None:
        return None
    a = np.asarray(s)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(
            f"{name}: shape {a.shape} does not match the rows' shape {shape} (x.shape without axis)"
        )
    return contiguous(a, np.float64)


def _is_param(p, dtype) -> bool:
    return p is None or (type(p) is np.ndarray and p.dtype == dtype)


def _is_stat(s, rows: tuple) -> bool:
    return s is None or (type(s) is np.ndarray and s.dtype == np.float64 and s.shape == rows and s.flags.c_contiguous)


def _flat(p: np.ndarray) -> np.ndarray:
    """A parameter as the kernels' contiguous vector (itself where it already is one)."""
    return np.ascontiguousarray(p) if p.ndim == 1 else np.ascontiguousarray(p).reshape(-1)


def _matrix(a: np.ndarray, shape: tuple) -> np.ndarray:
    """A contiguous array as (rows, normalized elements): the kernels' rows are its last axis."""
    n = math.prod(shape)
    return a.reshape(a.size // n, n)


def _trailing(axis, ndim: int) -> int:
    """How many trailing axes `axis` names in its common forms (-1, or (-k, ..., -1) as the torch
    adapter passes them); 0 for any other form, which the general path checks."""
    if type(axis) is int:
        return 1 if axis == -1 else 0
    if type(axis) is not tuple or not 0 < len(axis) <= ndim:
        return 0
    return len(axis) if axis == (-1,) or axis == tuple(range(-len(axis), 0)) else 0


def _forward(norm, x, weight, bias, eps, axis, out, return_stats):
    # The common call straight to the kernel: contiguous float32/float64 over trailing axes, fresh
    # output (the torch adapter's calls included).
    k = (
        (1 if axis == -1 else _trailing(axis, x.ndim))
        if out is None
        and type(x) is np.ndarray
        and x.dtype in _FAST_DTYPES
        and x.ndim
        and x.flags.c_contiguous
        and x.dtype.isnative
        and x.size
        and (weight is None or (type(weight) is np.ndarray and weight.dtype == x.dtype))
        and (bias is None or (type(bias) is np.ndarray and bias.dtype == x.dtype))
        else 0
    )
    if k:
        shape = x.shape[x.ndim - k :]
        for p, name in ((weight, "weight"), (bias, "bias")):
            if p is not None and p.shape != shape:
                raise ValueError(
                    f"{name}: shape {p.shape} does not match the normalized shape {shape} (x.shape[axis])"
                )
        w = None if weight is None else _flat(weight)
        b = None if bias is None else _flat(bias)
        options = norm_options(norm, _FAST_EPS[x.dtype] if eps is None else eps)
        mean = rstd = None
        if return_stats:
            rstd = np.empty(x.shape[: x.ndim - k], np.float64)
            mean = np.empty_like(rstd) if norm == "layer" else None
        y = np.empty_like(x)
        xm, ym = (x, y) if k == 1 else (_matrix(x, shape), _matrix(y, shape))
        try:
            _core.norm_forward(options, xm, w, b, ym, mean, rstd)
        except ValueError:
            # The kernel refuses a misaligned array before writing: the general path copies it.
            if all(a is None or a.flags.aligned for a in (x, w, b)):
                raise
        else:
            if not return_stats:
                return y
            rstd = scalar_0d(rstd)  # one row (x normalized over all its axes): NumPy scalars
            return (y, scalar_0d(mean), rstd) if norm == "layer" else (y, rstd)

    a, result_dtype = as_input(x)
    axes = norm_axes(axis, a.ndim)
    shape = a.shape[axes[0] :]
    options = norm_options(norm, machine_eps(result_dtype) if eps is None else eps)
    w = param(weight, "weight", shape, a.dtype)
    b = param(bias, "bias", shape, a.dtype)
    if out is not None:
        check_out(out, a.shape, result_dtype)
    plan = Plan(a.shape, axes)
    work = contiguous(a)
    y = direct_output(out, work, plan) if out is not None else None
    if y is None:
        y = np.empty_like(work)
    mean = rstd = None
    if return_stats:
        rstd = np.empty(plan.reduced_shape, np.float64)
        mean = np.empty(plan.reduced_shape, np.float64) if norm == "layer" else None
    if work.size:
        rows = (work.size // plan.len, plan.len)
        _core.norm_forward(options, work.reshape(rows), w, b, y.reshape(rows), mean, rstd)
    elif plan.len == 0:
        # Statistics of empty rows, as NumPy's mean of nothing.
        for s in (mean, rstd):
            if s is not None:
                s.fill(np.nan)
    y = finish(y, result_dtype, out)
    if not return_stats:
        return y
    rstd = scalar_0d(rstd)  # one row (x normalized over all its axes): NumPy scalars
    return (y, scalar_0d(mean), rstd) if norm == "layer" else (y, rstd)


def _fast_backward(norm, dy, x, weight, bias, eps, axis, mean, rstd):
    """(dx, dweight, dbias) straight from the kernel for the common call (contiguous float32/float64
    dy and x of one dtype and shape over trailing axes, float64 statistics of the rows' shape), or
    None."""
    if not (type(x) is np.ndarray and type(dy) is np.ndarray and x.dtype in _FAST_DTYPES and x.ndim and x.size):
        return None
    k = _trailing(axis, x.ndim)
    rows, shape = x.shape[: x.ndim - k], x.shape[x.ndim - k :]
    if not (
        k
        and dy.dtype == x.dtype
        and dy.shape == x.shape
        and x.flags.c_contiguous
        and dy.flags.c_contiguous
        and x.dtype.isnative
        and dy.dtype.isnative
        and _is_param(weight, x.dtype)
        and (weight is None or weight.shape == shape)
        and _is_param(bias, x.dtype)
        and (bias is None or bias.shape == shape)
        and _is_stat(mean, rows)
        and _is_stat(rstd, rows)
        and (norm != "layer" or (mean is None) == (rstd is None))
    ):
        return None
    options = norm_options(norm, _FAST_EPS[x.dtype] if eps is None else eps)
    dx = np.empty_like(x)
    dw = None if weight is None else np.zeros(shape, x.dtype)
    db = None if bias is None else np.zeros(shape, x.dtype)
    w = None if weight is None else _flat(weight)
    rows = (dy, x, dx) if k == 1 else tuple(_matrix(a, shape) for a in (dy, x, dx))
    try:
        _core.norm_backward(options, rows[0], rows[1], w, (mean, rstd), rows[2], (dw, db))
    except ValueError:
        if all(a is None or a.flags.aligned for a in (x, dy, w)):
            raise
        return None  # misaligned: the general path copies
    return dx, dw, db


def _backward(norm, dy, x, weight, bias, eps, axis, mean, rstd):
    fast = _fast_backward(norm, dy, x, weight, bias, eps, axis, mean, rstd)
    if fast is not None:
        return fast if norm == "layer" else fast[:2]
    xa, x_dtype, dya, work_dtype, result_dtype = as_backward_inputs(x, "x", dy)
    axes = norm_axes(axis, xa.ndim)
    shape = xa.shape[axes[0] :]
    options = norm_options(norm, machine_eps(x_dtype) if eps is None else eps)
    w = param(weight, "weight", shape, work_dtype)
    param(bias, "bias", shape, work_dtype)  # only its shape matters: dbias = sum(dy)
    plan = Plan(xa.shape, axes)
    if norm == "layer" and (mean is None) != (rstd is None):
        missing = "mean" if mean is None else "rstd"
        raise ValueError(f"{missing}: give both saved statistics (mean and rstd) or neither")
    mean = _stat(mean, "mean", plan.reduced_shape)
    rstd = _stat(rstd, "rstd", plan.reduced_shape)
    wx = contiguous(xa, work_dtype)
    wdy = contiguous(dya, work_dtype)
    dx = np.empty_like(wx)
    dw = np.zeros(shape, work_dtype) if weight is not None else None
    db = np.zeros(shape, work_dtype) if bias is not None else None
    if wx.size:
        rows = (wx.size // plan.len, plan.len)
        _core.norm_backward(options, wdy.reshape(rows), wx.reshape(rows), w, (mean, rstd), dx.reshape(rows), (dw, db))
    dx = finish(dx, result_dtype, None)
    dw = None if dw is None else finish(dw, result_dtype, None)
    if norm == "layer":
        return dx, dw, (None if db is None else finish(db, result_dtype, None))
    return dx, dw


def rms_norm(x, weight=None, *, eps=None, axis=-1, out=None, return_stats=False):
    """RMSNorm: ``x / sqrt(mean(x**2, axis) + eps) * weight``.

    Parameters
    ----------
    x : array_like
        Input. float32 and float64 are computed as themselves; float16, bfloat16 (ml_dtypes) are
        computed in float32 and returned in their dtype; integers (ml_dtypes' ``int4`` and the
        like included) and bool become float64; any other dtype is a TypeError. Any layout
        (strided, byte-swapped, misaligned) is read, copied once where needed.
    weight : array_like, optional
        Elementwise scale of shape ``x.shape[axis]`` (the normalized shape); None means ones.
    eps : float, optional
        Added to the mean square. None means ``np.finfo(x.dtype).eps``, as
        ``torch.nn.functional.rms_norm``. A real number (a string such as ``'1e-6'`` is a
        TypeError).
    axis : int or tuple of int, default -1
        The normalized axes; they must be the trailing axes of `x` (torch's ``normalized_shape`` is
        ``x.shape[axis]``).
    out : ndarray, optional
        Writeable array of the result's shape and dtype to write into; may be `x` itself. A
        misaligned `out` is written through an aligned buffer.
    return_stats : bool, default False
        Also return ``rstd = 1 / sqrt(mean(x**2) + eps)`` per row (float64, shaped like `x` without
        the normalized axes), which :func:`rms_norm_backward` accepts to skip recomputing it.

    Returns
    -------
    y : ndarray
        Same shape and dtype as `x` (float64 for integer input).
    rstd : ndarray or scalar
        Only with ``return_stats=True``; a NumPy scalar when `x` is one row (0-d statistics, as
        every NumPy-first normax function returns 0-d results).

    Raises
    ------
    ValueError
        If `axis` is not a set of trailing axes, `weight` is not of the normalized shape, `eps` is
        negative or not finite, or `out` has the wrong shape or is read-only.
    numpy.exceptions.AxisError
        If an axis is out of range.
    TypeError
        For complex, string, object or other unknown dtypes, an `out` of the wrong dtype, or an
        `eps` that is not a real number.

    Notes
    -----
    One fused pass per row while it sits in cache: the sum of squares is accumulated in short
    float32 partial sums folded into float64, the scale is formed in float64, then
    ``y = x * rstd * weight``. float32 results are within a few ULP of the float64 result. A row of
    zeros gives zeros (not NaN) for any eps > 0, however small. Rows are spread over threads.

    Any magnitude: a row whose squares overflow or underflow the dtype (float32 ``|x|`` past
    ~1.8e19 / sqrt(n), or rows of subnormals with a tiny eps) is normalized from a copy scaled
    by a power of two (exact), eps scaled to match; the statistics are those of the row itself.
    The same holds for :func:`layer_norm`, :func:`crms_norm` and the backward passes, which are
    finite wherever the float64 gradient fits the dtype. A row holding inf gives NaN where
    torch's does (``inf * 0``), and its rstd is 0 (LayerNorm: mean and rstd NaN, as
    ``torch.native_layer_norm``).

    Examples
    --------
    >>> import numpy as np, normax
    >>> normax.rms_norm(np.array([3.0, 4.0]), eps=0.0)
    array([0.84852814, 1.13137085])
    """
    return _forward("rms", x, weight, None, eps, axis, out, return_stats)


def rms_norm_backward(dy, x, weight=None, *, eps=None, axis=-1, rstd=None):
    """Gradient of :func:`rms_norm`.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to the output; shaped like `x`.
    x : array_like
        The forward's input.
    weight : array_like, optional
        The forward's weight; None means ones (and no `dweight` is returned).
    eps, axis
        As in the forward.
    rstd : array_like, optional
        The forward's saved ``rstd`` (``return_stats=True``); recomputed from `x` when None, in
        which case `eps` must be the forward's.

    Returns
    -------
    dx : ndarray
        Shaped like `x`, in the promoted dtype of `x` and `dy`.
    dweight : ndarray or None
        ``sum(dy * x * rstd)`` over the rows, of the normalized shape; None if `weight` is None.

    Raises
    ------
    ValueError
        If `dy` is not shaped like `x`, `rstd` is not of the rows' shape, or as the forward.
    numpy.exceptions.AxisError, TypeError
        As :func:`rms_norm`.

    Notes
    -----
    ``dx = rstd * g - x * rstd**3 * mean(g * x)`` with ``g = dy * weight``. dweight is summed over
    rows in fixed blocks (float32 partial sums of 16 rows folded into float64, the blocks added in
    order), so it is the same whatever the thread count.

    Examples
    --------
    >>> import numpy as np, normax
    >>> x = np.array([[3.0, 4.0]])
    >>> dx, dw = normax.rms_norm_backward(np.ones_like(x), x, np.ones(2), eps=0.0)
    >>> dx, dw
    (array([[ 0.04525483, -0.03394113]]), array([0.84852814, 1.13137085]))
    """
    return _backward("rms", dy, x, weight, None, eps, axis, None, rstd)


def layer_norm(x, weight=None, bias=None, *, eps=1e-5, axis=-1, out=None, return_stats=False):
    """LayerNorm: ``(x - mean) / sqrt(var + eps) * weight + bias`` over `axis` (biased variance).

    Parameters
    ----------
    x : array_like
        Input; dtype rules as in :func:`rms_norm`.
    weight, bias : array_like, optional
        Of the normalized shape ``x.shape[axis]``; None means ones and zeros.
    eps : float, default 1e-5
        Added to the variance.
    axis : int or tuple of int, default -1
        The normalized axes, which must be the trailing axes of `x`.
    out : ndarray, optional
        Writeable array of the result's shape and dtype; may be `x` itself.
    return_stats : bool, default False
        Also return each row's ``mean`` and ``rstd = 1 / sqrt(var + eps)`` (float64, shaped like `x`
        without the normalized axes), which :func:`layer_norm_backward` accepts. They are float64
        so a saved mean keeps the precision the centering needs when ``|mean| >> std``.

    Returns
    -------
    y : ndarray
        Same shape and dtype as `x`.
    mean, rstd : ndarray or scalar
        Only with ``return_stats=True``; NumPy scalars when `x` is one row (as :func:`rms_norm`).

    Raises
    ------
    ValueError, numpy.exceptions.AxisError, TypeError
        As :func:`rms_norm` (`bias` is checked as `weight`).

    Notes
    -----
    The variance is computed stably, never as ``E[x^2] - E[x]^2``: a first pass gives the mean,
    which is rounded to the element type (m0); a second sums ``d = x - m0`` and ``d**2`` (exact
    differences near the mean); then ``mean = m0 + mean(d)`` and ``var = mean(d**2) - mean(d)**2``,
    where ``mean(d)`` is tiny. Rows with mean 1e4 and spread 1e-2 keep full float32 accuracy.
    Same as ``torch.nn.functional.layer_norm(x, x.shape[axis], weight, bias, eps)``.

    Examples
    --------
    >>> import numpy as np, normax
    >>> normax.layer_norm(np.array([1.0, 2.0, 3.0]), eps=0.0)
    array([-1.22474487,  0.        ,  1.22474487])
    """
    return _forward("layer", x, weight, bias, eps, axis, out, return_stats)


def layer_norm_backward(dy, x, weight=None, bias=None, *, eps=1e-5, axis=-1, mean=None, rstd=None):
    """Gradient of :func:`layer_norm`.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to the output; shaped like `x`.
    x : array_like
        The forward's input.
    weight, bias : array_like, optional
        The forward's; `bias` only decides whether `dbias` is returned.
    eps, axis
        As in the forward.
    mean, rstd : array_like, optional
        The forward's saved statistics (``return_stats=True``), both or neither; recomputed from `x`
        when not given.

    Returns
    -------
    dx : ndarray
        Shaped like `x`, in the promoted dtype of `x` and `dy`.
    dweight : ndarray or None
        ``sum(dy * xhat)`` over the rows; None if `weight` is None.
    dbias : ndarray or None
        ``sum(dy)`` over the rows; None if `bias` is None.

    Raises
    ------
    ValueError
        If `dy` is not shaped like `x`, only one of `mean`/`rstd` is given or either has the wrong
        shape, or as the forward.
    numpy.exceptions.AxisError, TypeError
        As :func:`layer_norm`.

    Notes
    -----
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * weight``; dweight and
    dbias are reduced over the rows deterministically, as in :func:`rms_norm_backward`.

    Examples
    --------
    >>> import numpy as np, normax
    >>> x = np.array([[1.0, 2.0, 3.0]])
    >>> dx, dw, db = normax.layer_norm_backward(np.array([[0.0, 0.0, 1.0]]), x, np.ones(3), np.zeros(3))
    >>> db
    array([0., 0., 1.])
    """
    return _backward("layer", dy, x, weight, bias, eps, axis, mean, rstd)


def crms_norm(x, weight=None, *, eps=1e-6, axis=-1, out=None, return_stats=False):
    """CRMSNorm: RMSNorm of a zero-mean vector stored compressed (Pre-CRMSNorm Transformers).

    A zero-mean vector of dimension ``d`` is stored as its first ``d - 1`` entries ``x`` (the last
    is ``-sum(x)``). ``crms_norm(x) = x / sqrt((sum(x**2) + sum(x)**2) / d + eps) * weight`` with
    ``d = x.shape[axis] + 1``: exactly RMSNorm of the full vector, restricted to the stored entries.

    Parameters
    ----------
    x : array_like
        Input; dtype rules as in :func:`rms_norm`.
    weight : array_like, optional
        Of the normalized shape ``x.shape[axis]``; None means ones.
    eps : float, default 1e-6
        Added to the mean square.
    axis : int or tuple of int, default -1
        The normalized (trailing) axes; with several, d is their total size plus one.
    out : ndarray, optional
        Writeable array of the result's shape and dtype; may be `x` itself.
    return_stats : bool, default False
        Also return ``rstd`` per row (float64), which :func:`crms_norm_backward` accepts.

    Returns
    -------
    y : ndarray
        Same shape and dtype as `x`.
    rstd : ndarray or scalar
        Only with ``return_stats=True``; a NumPy scalar when `x` is one row (0-d statistics, as
        every NumPy-first normax function returns 0-d results).

    Raises
    ------
    ValueError, numpy.exceptions.AxisError, TypeError
        As :func:`rms_norm`.

    Notes
    -----
    One pass sums x and x**2 (short float32 partials folded into float64), then
    ``y = x * rstd * weight``.

    Examples
    --------
    >>> import numpy as np, normax
    >>> full = np.array([1.0, 2.0, -3.0])  # zero mean: stored as its first two entries
    >>> normax.crms_norm(full[:2], eps=0.0)
    array([0.46291005, 0.9258201 ])
    >>> normax.rms_norm(full, eps=0.0)[:2]
    array([0.46291005, 0.9258201 ])
    """
    return _forward("crms", x, weight, None, eps, axis, out, return_stats)


def crms_norm_backward(dy, x, weight=None, *, eps=1e-6, axis=-1, rstd=None):
    """Gradient of :func:`crms_norm`.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to the output; shaped like `x`.
    x : array_like
        The forward's input.
    weight : array_like, optional
        The forward's weight; None means ones (and no `dweight` is returned).
    eps, axis
        As in the forward.
    rstd : array_like, optional
        The forward's saved ``rstd``; recomputed from `x` when None.

    Returns
    -------
    dx : ndarray
        Shaped like `x`, in the promoted dtype of `x` and `dy`.
    dweight : ndarray or None
        ``sum(dy * x * rstd)`` over the rows; None if `weight` is None.

    Raises
    ------
    ValueError, numpy.exceptions.AxisError, TypeError
        As :func:`rms_norm_backward`.

    Notes
    -----
    ``dx = rstd * g - (x + sum(x)) * rstd**3 * sum(g * x) / d`` with ``g = dy * weight`` and
    ``d = x.shape[axis] + 1`` (the gradient through the implicit last entry ``-sum(x)`` included).

    Examples
    --------
    >>> import numpy as np, normax
    >>> x = np.array([[1.0, 2.0]])
    >>> dx, _ = normax.crms_norm_backward(np.zeros_like(x), x, eps=0.0)
    >>> dx
    array([[0., 0.]])
    """
    return _backward("crms", dy, x, weight, None, eps, axis, None, rstd)
