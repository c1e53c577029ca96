"""rms_norm, layer_norm, crms_norm and their backwards, and PowerNorm: the NumPy-first API."""

from __future__ import annotations

import math

import numpy as np

from . import _core
from ._arrays import Plan, as_input, check_out, compute_dtype, direct_output, finish, normalize_axes

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _norm_axes(axis, ndim: int) -> tuple[int, ...]:
    """The normalized axes: sorted, non-negative, and the trailing ones."""
    if axis is None:
        raise TypeError("axis: expected an int or a tuple of trailing axes, got None")
    axes = normalize_axes(axis, ndim)
    if not axes:
        raise ValueError("axis: name at least one axis")
    if axes != tuple(range(ndim - len(axes), ndim)):
        raise ValueError(
            f"axis: {axis!r} is not a set of trailing axes of the {ndim}-d input; the normalized "
            "shape is x.shape[axis:] (torch's normalized_shape): move the axes last with numpy.moveaxis"
        )
    return axes


def _eps(eps) -> float:
    if isinstance(eps, (bool, np.bool_)):
        raise TypeError("eps: expected a real number, got a bool")
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps: expected a real number, got {eps!r}") from None
    if not (0.0 <= e < math.inf):
        raise ValueError(f"eps: must be finite and >= 0, got {eps!r}")
    return e


def _machine_eps(dtype: np.dtype) -> float:
    """eps of a result dtype (rms_norm's default, as torch): float16 and ml_dtypes floats included."""
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        import ml_dtypes  # only ml_dtypes floats get here

        return float(ml_dtypes.finfo(dtype).eps)


def _param(p, name: str, shape: tuple[int, ...], dtype: np.dtype):
    """weight/bias as a flat contiguous array in the kernel dtype, or None."""
    if p is None:
        return None
    a = np.asarray(p)
    compute_dtype(a.dtype, name)  # TypeError for complex, string, object
    if a.shape != shape:
        raise ValueError(
            f"{name}: shape {a.shape} does not match the normalized shape {shape} (x.shape[axis])"
        )
    return np.ascontiguousarray(a.astype(dtype, copy=False)).reshape(-1)


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
    return np.ascontiguousarray(a, dtype=np.float64)


def _forward(norm, x, weight, bias, eps, axis, out, return_stats):
    # Fast path for the common call: contiguous float32/float64 over the last axis, fresh output.
    if (
        out is None
        and not return_stats
        and axis == -1
        and type(x) is np.ndarray
        and x.dtype in _FAST_DTYPES
        and x.ndim
        and x.flags.c_contiguous
        and x.dtype.isnative
        and x.size
        and (weight is None or (type(weight) is np.ndarray and weight.dtype == x.dtype))
        and (bias is None or (type(bias) is np.ndarray and bias.dtype == x.dtype))
    ):
        n = x.shape[-1]
        for p, name in ((weight, "weight"), (bias, "bias")):
            if p is not None and p.shape != (n,):
                raise ValueError(
                    f"{name}: shape {p.shape} does not match the normalized shape {(n,)} (x.shape[axis])"
                )
        w = None if weight is None else np.ascontiguousarray(weight)
        b = None if bias is None else np.ascontiguousarray(bias)
        e = _eps(np.finfo(x.dtype).eps if eps is None else eps)
        y = np.empty_like(x)
        _core.norm_forward(norm, x, w, b, y, None, None, n, e)
        return y

    a, result_dtype = as_input(x)
    axes = _norm_axes(axis, a.ndim)
    shape = a.shape[axes[0] :]
    e = _eps(_machine_eps(result_dtype) if eps is None else eps)
    w = _param(weight, "weight", shape, a.dtype)
    b = _param(bias, "bias", shape, a.dtype)
    if out is not None:
        check_out(out, a.shape, result_dtype)
    plan = Plan(a.shape, axes)
    work = np.ascontiguousarray(a)
    y = direct_output(out, work, plan) if out is not None else None
    if y is None:
        y = np.empty_like(work)
    mean = rstd = None
    if return_stats:
        rstd = np.empty(plan.reduced_shape, np.float64)
        mean = np.empty(plan.reduced_shape, np.float64) if norm == "layer" else None
    if work.size:
        _core.norm_forward(norm, work, w, b, y, mean, rstd, plan.len, e)
    elif plan.len == 0:
        # Statistics of empty rows, as NumPy's mean of nothing.
        for s in (mean, rstd):
            if s is not None:
                s.fill(np.nan)
    y = finish(y, result_dtype, out)
    if not return_stats:
        return y
    return (y, mean, rstd) if norm == "layer" else (y, rstd)


def _backward(norm, dy, x, weight, bias, eps, axis, mean, rstd):
    xa, x_dtype = as_input(x, "x")
    dya, dy_dtype = as_input(dy, "dy")
    if dya.shape != xa.shape:
        raise ValueError(f"dy: shape {dya.shape} does not match x shape {xa.shape}")
    work_dtype = np.result_type(xa.dtype, dya.dtype)
    result_dtype = np.result_type(x_dtype, dy_dtype)
    axes = _norm_axes(axis, xa.ndim)
    shape = xa.shape[axes[0] :]
    e = _eps(_machine_eps(x_dtype) if eps is None else eps)
    w = _param(weight, "weight", shape, work_dtype)
    _param(bias, "bias", shape, work_dtype)  # only its shape matters: dbias = sum(dy)
    plan = Plan(xa.shape, axes)
    if norm == "layer" and (mean is None) != (rstd is None):
        missing = "mean" if mean is None else "rstd"
        raise ValueError(f"{missing}: give both saved statistics (mean and rstd) or neither")
    mean = _stat(mean, "mean", plan.reduced_shape)
    rstd = _stat(rstd, "rstd", plan.reduced_shape)
    wx = np.ascontiguousarray(xa, dtype=work_dtype)
    wdy = np.ascontiguousarray(dya, dtype=work_dtype)
    dx = np.empty_like(wx)
    dw = np.zeros(shape, work_dtype) if weight is not None else None
    db = np.zeros(shape, work_dtype) if bias is not None else None
    if wx.size:
        _core.norm_backward(norm, wdy, wx, w, mean, rstd, dx, dw, db, plan.len, e)
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
        computed in float32 and returned in their dtype; integers and bool become float64.
    weight : array_like, optional
        Elementwise scale of shape ``x.shape[axis]`` (the normalized shape); None means ones.
    eps : float, optional
        Added to the mean square. None means ``np.finfo(x.dtype).eps``, as
        ``torch.nn.functional.rms_norm``.
    axis : int or tuple of int, default -1
        The normalized axes; they must be the trailing axes of `x` (torch's ``normalized_shape`` is
        ``x.shape[axis]``).
    out : ndarray, optional
        Writeable array of the result's shape and dtype to write into; may be `x` itself.
    return_stats : bool, default False
        Also return ``rstd = 1 / sqrt(mean(x**2) + eps)`` per row (float64, shaped like `x` without
        the normalized axes), which :func:`rms_norm_backward` accepts to skip recomputing it.

    Returns
    -------
    y : ndarray
        Same shape and dtype as `x` (float64 for integer input).
    rstd : ndarray
        Only with ``return_stats=True``.

    Raises
    ------
    ValueError
        If `axis` is not a set of trailing axes, `weight` is not of the normalized shape, `eps` is
        negative or not finite, or `out` has the wrong shape or is read-only.
    numpy.exceptions.AxisError
        If an axis is out of range.
    TypeError
        For complex, string or object input, or an `out` of the wrong dtype.

    Notes
    -----
    One fused pass per row while it sits in cache: the sum of squares is accumulated in short
    float32 partial sums folded into float64, the scale is formed in float64, then
    ``y = x * rstd * weight``. float32 results are within a few ULP of the float64 result. A row of
    zeros gives zeros (not NaN) for eps > 0. Rows are spread over threads.

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
    mean, rstd : ndarray
        Only with ``return_stats=True``.

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
    rstd : ndarray
        Only with ``return_stats=True``.

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


class PowerNormState:
    """The settings and running buffers of one PowerNorm layer (Shen et al. 2020, MaskPowerNorm).

    PowerNorm is stateful: a training forward updates the running second moment ``running_phi``
    and counts ``iters``; a training backward updates ``ema_gz``. Those buffers (float64, shape
    ``(num_features,)``), the iteration count and the layer's settings live here; the learnable
    ``weight`` and ``bias`` stay with the caller, as parameters of the op. One state per layer.

    Parameters
    ----------
    num_features : int
        C, the channel count (the last axis of the input).
    eps : float, default 1e-5
        Added to every second moment (group scaling, batch and running statistics).
    alpha_fwd : float, default 0.9
        Decay of ``running_phi``.
    alpha_bkw : float, default 0.9
        Decay in the approximate backward: ``g_hat = g - (1 - alpha_bkw) * ema_gz * z``.
    warmup_iters : int, default 10000
        Up to this iteration the forward normalizes by the batch statistics and ``running_phi`` is
        also averaged over the iterations so far; afterwards it normalizes by ``running_phi``.
    group_num : int, default 1
        Channel groups of the group scaling; must divide `num_features`.

    Attributes
    ----------
    running_phi : ndarray
        Running second moment per channel, initially ones.
    ema_gz : ndarray
        Running mean of ``g_hat * z`` per channel, initially zeros.
    iters : int
        Training forward calls so far.

    Raises
    ------
    ValueError
        For a non-positive `num_features`, a `group_num` that does not divide it, an alpha outside
        [0, 1], a negative `warmup_iters` or `eps`.

    Examples
    --------
    >>> import normax
    >>> state = normax.PowerNormState(8, warmup_iters=100, group_num=2)
    >>> state.iters, state.running_phi.shape
    (0, (8,))
    """

    def __init__(
        self, num_features, *, eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.9, warmup_iters=10000, group_num=1
    ):
        c = _count(num_features, "num_features", 1)
        g = _count(group_num, "group_num", 1)
        if c % g:
            raise ValueError(f"group_num: {g} does not divide num_features {c}")
        for value, name in ((alpha_fwd, "alpha_fwd"), (alpha_bkw, "alpha_bkw")):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value!r}")
        self.num_features = c
        self.group_num = g
        self.eps = _eps(eps)
        self.alpha_fwd = float(alpha_fwd)
        self.alpha_bkw = float(alpha_bkw)
        self.warmup_iters = _count(warmup_iters, "warmup_iters", 0)
        self.running_phi = np.ones(c)
        self.ema_gz = np.zeros(c)
        self.iters = 0

    def copy(self) -> PowerNormState:
        """An independent copy (buffers copied)."""
        new = PowerNormState.__new__(PowerNormState)
        new.__dict__.update(self.__dict__)
        new.running_phi = self.running_phi.copy()
        new.ema_gz = self.ema_gz.copy()
        return new

    def __repr__(self) -> str:
        return (
            f"PowerNormState(num_features={self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
            f"alpha_bkw={self.alpha_bkw}, warmup_iters={self.warmup_iters}, group_num={self.group_num}; "
            f"iters={self.iters})"
        )


def _count(v, name: str, minimum: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return int(v)


class PowerNormSaved:
    """What :func:`power_norm_backward` needs from one :func:`power_norm` call.

    Returned by ``power_norm(..., return_saved=True)``. It holds the forward's input (the array
    itself, not a copy: do not modify it before the backward), the weight, and per channel the
    factor z was formed with and the batch factor 1/sqrt(var + eps) (float64 arrays ``zscale``,
    ``dscale``). The group scaling is recomputed from the input in the backward.
    """

    __slots__ = (
        "dscale",
        "dtype",
        "eps",
        "group_num",
        "has_bias",
        "shape",
        "training",
        "weight",
        "x",
        "zscale",
    )

    def __init__(self, **fields):
        for k, v in fields.items():
            setattr(self, k, v)


def _pad_tokens(pad_mask, shape):
    """pad_mask as one flag per token in the kernel's token order (t * B + b), or None."""
    if pad_mask is None:
        return None
    m = np.asarray(pad_mask)
    if m.dtype != np.bool_:
        raise TypeError(f"pad_mask: expected a boolean array (True = padding), got dtype {m.dtype}")
    if len(shape) == 3:
        t, b = shape[0], shape[1]
        if m.shape != (b, t):
            raise ValueError(f"pad_mask: shape {m.shape} is not (B, T) = {(b, t)} for x of shape {shape}")
        return np.ascontiguousarray(m.T).reshape(-1)
    n = shape[0]
    if m.shape not in ((n, 1), (n,)):
        raise ValueError(f"pad_mask: shape {m.shape} is not (N, 1) = {(n, 1)} for x of shape {shape}")
    return np.ascontiguousarray(m).reshape(-1)


def power_norm(x, weight, bias, state, *, training=True, pad_mask=None, return_saved=False):
    """PowerNorm forward (Shen et al. 2020), as MaskPowerNorm of the paper's official code.

    Parameters
    ----------
    x : array_like
        Shape (T, B, C) or (N, C), channels last, ``C = state.num_features``. dtype rules as in
        :func:`rms_norm` (float16 computed in float32).
    weight, bias : array_like or None
        Shape (C,); None means ones and zeros (and no gradient for it).
    state : PowerNormState
        The layer's settings and buffers; a training call updates it (see Notes).
    training : bool, default True
        Training (batch statistics, state updated) or evaluation (running statistics, no change).
    pad_mask : array_like of bool, optional
        Shape (B, T) for (T, B, C) input, (N, 1) or (N,) for (N, C) input; True marks padding,
        which is left out of the batch statistics (its outputs are still computed).
    return_saved : bool, default False
        Also return a :class:`PowerNormSaved` for :func:`power_norm_backward`.

    Returns
    -------
    y : ndarray
        Shaped like `x`, in its dtype.
    saved : PowerNormSaved
        Only with ``return_saved=True``.

    Raises
    ------
    ValueError
        If `x` is not (T, B, C) or (N, C) with C = ``state.num_features``, `weight`/`bias` are not
        (C,), or `pad_mask` has the wrong shape.
    TypeError
        If `state` is not a :class:`PowerNormState`, `pad_mask` is not boolean, or for
        unsupported dtypes.

    Notes
    -----
    1. Group scaling: each token's channels are split into ``group_num`` groups, each divided by
       ``sqrt(mean(x**2 over the group) + eps)``, giving u.
    2. Training: ``iters += 1``; ``var = mean of u**2 over the non-padded tokens`` per channel;
       ``z = u / sqrt(var + eps)`` while ``iters <= warmup_iters``, else
       ``z = u / sqrt(running_phi + eps)``; then, while ``iters < warmup_iters``,
       ``running_phi = running_phi * (iters - 1) / iters + var / iters``, and always
       ``running_phi = alpha_fwd * running_phi + (1 - alpha_fwd) * var``.
       Evaluation: ``z = u / sqrt(running_phi + eps)``, no state change.
    3. ``y = weight * z + bias`` for every token, padded ones too.

    The passes over the tokens run in Rust (group scaling fused with the channel sums of u**2,
    which are reduced deterministically, and with the output once the scale is known: after
    warmup and in evaluation a single read of x); the O(C) bookkeeping is NumPy on float64 buffers.
    If every token is padded the batch variance is NaN, as in the reference.

    Examples
    --------
    >>> import numpy as np, normax
    >>> state = normax.PowerNormState(4, warmup_iters=10)
    >>> x = np.arange(24.0).reshape(3, 2, 4)
    >>> y, saved = normax.power_norm(x, np.ones(4), np.zeros(4), state, return_saved=True)
    >>> y.shape, state.iters
    ((3, 2, 4), 1)
    >>> dx, dw, db = normax.power_norm_backward(np.ones_like(y), saved, state)
    >>> db
    array([6., 6., 6., 6.])
    """
    if not isinstance(state, PowerNormState):
        raise TypeError(f"state: expected a normax.PowerNormState, got {type(state).__name__}")
    a, result_dtype = as_input(x)
    c = state.num_features
    if a.ndim not in (2, 3) or a.shape[-1] != c:
        raise ValueError(f"x: shape {a.shape} is not (T, B, C) or (N, C) with C = num_features = {c}")
    w = _param(weight, "weight", (c,), a.dtype)
    b = _param(bias, "bias", (c,), a.dtype)
    pad = _pad_tokens(pad_mask, a.shape)
    work = np.ascontiguousarray(a).reshape(-1, c)
    tokens = work.shape[0]
    w64 = np.ones(c) if w is None else w.astype(np.float64)
    b64 = np.zeros(c) if b is None else b.astype(np.float64)
    shift = b64.astype(a.dtype)
    y = np.empty_like(work)
    eps, groups = state.eps, state.group_num

    def run(pad, sumsq, zscale, y):
        scale = None if zscale is None else (w64 * zscale).astype(a.dtype)
        _core.power_norm_forward(work, c, groups, eps, pad, sumsq, scale, None if y is None else shift, y)

    if training:
        state.iters += 1
        it = state.iters
        sumsq = np.empty(c)
        count = tokens - (int(np.count_nonzero(pad)) if pad is not None else 0)
        if it <= state.warmup_iters:
            run(pad, sumsq, None, None)
            with np.errstate(invalid="ignore", divide="ignore"):
                var = sumsq / count
            zscale = 1.0 / np.sqrt(var + eps)
            run(None, None, zscale, y)
        else:
            zscale = 1.0 / np.sqrt(state.running_phi + eps)
            run(pad, sumsq, zscale, y)
            with np.errstate(invalid="ignore", divide="ignore"):
                var = sumsq / count
        phi = state.running_phi
        if it < state.warmup_iters:
            phi[...] = phi * (it - 1) / it + var / it
        phi[...] = state.alpha_fwd * phi + (1.0 - state.alpha_fwd) * var
        dscale = 1.0 / np.sqrt(var + eps)
    else:
        zscale = 1.0 / np.sqrt(state.running_phi + eps)
        run(None, None, zscale, y)
        dscale = zscale
    y = finish(y.reshape(a.shape), result_dtype, None)
    if not return_saved:
        return y
    saved = PowerNormSaved(
        x=work,
        shape=a.shape,
        dtype=result_dtype,
        weight=w,
        has_bias=b is not None,
        zscale=zscale,
        dscale=dscale,
        training=bool(training),
        eps=eps,
        group_num=groups,
    )
    return y, saved


def power_norm_backward(dy, saved, state):
    """PowerNorm backward: the paper's approximate gradient in training, the exact one in evaluation.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to the forward's output; shaped like it.
    saved : PowerNormSaved
        From ``power_norm(..., return_saved=True)``.
    state : PowerNormState
        The same state as the forward; a training backward updates ``state.ema_gz`` (so call it
        once per forward).

    Returns
    -------
    dx : ndarray
        Shaped like the forward's `x`, in the promoted dtype of `x` and `dy`.
    dweight : ndarray or None
        ``sum(dy * z)`` over all tokens; None if the forward's weight was None.
    dbias : ndarray or None
        ``sum(dy)`` over all tokens; None if the forward's bias was None.

    Raises
    ------
    ValueError
        If `dy` is not shaped like the forward's input.
    TypeError
        If `saved` or `state` has the wrong type.

    Notes
    -----
    Training (MaskPowerNorm's PowerFunction.backward): ``g = dy * weight``,
    ``g_hat = g - (1 - alpha_bkw) * ema_gz * z``, then ``ema_gz += mean(g_hat * z)`` over all
    tokens (padded ones included), ``du = g_hat / sqrt(var + eps)`` with the batch variance (also
    after warmup), and du goes back through the group scaling exactly:
    ``dx = s * (du - u * mean(du * u over the group))`` with s the group's scale.
    Evaluation: the exact gradient of the evaluation forward, ``du = g / sqrt(running_phi + eps)``,
    no state change. One Rust pass over (dy, x) writes dx and reduces the three per-channel sums
    deterministically.
    """
    if not isinstance(saved, PowerNormSaved):
        raise TypeError(f"saved: expected a normax.PowerNormSaved, got {type(saved).__name__}")
    if not isinstance(state, PowerNormState):
        raise TypeError(f"state: expected a normax.PowerNormState, got {type(state).__name__}")
    dya, dy_dtype = as_input(dy, "dy")
    if dya.shape != saved.shape:
        raise ValueError(f"dy: shape {dya.shape} does not match the forward's x shape {saved.shape}")
    work = saved.x
    tokens, c = work.shape
    if c != state.num_features:
        raise ValueError(f"state: num_features {state.num_features} does not match the forward's {c}")
    dyw = np.ascontiguousarray(dya, dtype=work.dtype).reshape(work.shape)
    ema = (1.0 - state.alpha_bkw) * state.ema_gz if saved.training else np.zeros(c)
    dx = np.empty_like(work)
    sums = np.empty(3 * c)
    _core.power_norm_backward(
        dyw,
        work,
        c,
        saved.group_num,
        saved.eps,
        saved.weight,
        saved.zscale.astype(work.dtype),
        ema.astype(work.dtype),
        saved.dscale.astype(work.dtype),
        dx,
        sums,
    )
    if saved.training and tokens:
        state.ema_gz += sums[:c] / tokens
    result_dtype = np.result_type(saved.dtype, dy_dtype)
    dx = finish(dx.reshape(saved.shape), result_dtype, None)
    dweight = None if saved.weight is None else finish(sums[c : 2 * c], result_dtype, None)
    dbias = finish(sums[2 * c :], result_dtype, None) if saved.has_bias else None
    return dx, dweight, dbias
