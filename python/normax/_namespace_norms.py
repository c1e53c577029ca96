"""RMSNorm, LayerNorm and CRMSNorm (forward and backward) in any array-API namespace, for arrays
normax cannot read on the CPU (see :mod:`normax._namespace_ops`, whose ``OPS`` lists them).

The plain formulas in the array's own dtype, on its device: LayerNorm's variance in two passes
(the mean, then the squared deviations from it, with the mean of the deviations folded back in),
never ``E[x^2] - E[x]^2``. Unlike the kernels there is no rescaling of rows whose squares overflow
or underflow the dtype. The saved statistics (``return_stats``) are in the array's dtype (the
NumPy-first functions give float64, which devices such as MPS lack) and 0-d for one row; the
backwards accept them in any real floating dtype.
"""

from __future__ import annotations

import math

from array_api_compat import device as _device

from . import _namespace_ops
from ._options import check_eps, norm_axes


def _as_array(xp, a, like):
    """`a` as an array of `like`'s namespace on its device (a NumPy array or list is uploaded)."""
    return xp.asarray(a, device=_device(like))


def _check_real(xp, dtype, name: str) -> None:
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"{name}: unsupported dtype {dtype}; expected a real floating or integer dtype")


def _prepared(xp, x, axis):
    """`x` checked, its normalized axes, the normalized shape and the rows' shape."""
    _check_real(xp, x.dtype, "x")
    axes = norm_axes(axis, x.ndim)
    return axes, tuple(x.shape[axes[0] :]), tuple(x.shape[: axes[0]])


def _param(xp, p, name: str, shape: tuple, x):
    """weight/bias in `x`'s dtype, or None; of the normalized `shape`."""
    if p is None:
        return None
    a = _as_array(xp, p, x)
    if not xp.isdtype(a.dtype, ("real floating", "integral", "bool")):
        raise TypeError(f"{name}: unsupported dtype {a.dtype}")
    if tuple(a.shape) != shape:
        raise ValueError(
            f"{name}: shape {tuple(a.shape)} does not match the normalized shape {shape} (x.shape[axis])"
        )
    return xp.astype(a, x.dtype)


def _saved(xp, s, name: str, rows: tuple, x):
    """A saved statistic with the rows' shape, broadcasting against `x` (keepdims form), or None."""
    if s is None:
        return None
    a = _as_array(xp, s, x)
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{name}: expected a floating array, got dtype {a.dtype}")
    if tuple(a.shape) != rows:
        raise ValueError(
            f"{name}: shape {tuple(a.shape)} does not match the rows' shape {rows} (x.shape without axis)"
        )
    return xp.reshape(xp.astype(a, x.dtype), rows + (1,) * (x.ndim - len(rows)))


def _eps(xp, norm: str, eps, dtype) -> float:
    # rms_norm's None: the dtype's machine eps, as torch.nn.functional.rms_norm.
    return float(xp.finfo(dtype).eps) if eps is None else check_eps(eps)


def _statistics(xp, norm: str, x, axes, eps: float):
    """(mean or None, rstd, x centered or x itself) of each row, keepdims, in `x`'s dtype."""
    if norm == "layer":
        m0 = xp.mean(x, axis=axes, keepdims=True)
        d = x - m0
        md = xp.mean(d, axis=axes, keepdims=True)  # tiny: the rounding of m0
        var = xp.mean(d * d, axis=axes, keepdims=True) - md * md
        # x - mean as d - md: the rounding of m0 + md would shift every element of the row.
        return m0 + md, 1 / xp.sqrt(var + eps), d - md
    if norm == "crms":
        d = math.prod(x.shape[i] for i in axes) + 1  # the stored entries and the implicit -sum(x)
        s = xp.sum(x, axis=axes, keepdims=True)
        return None, 1 / xp.sqrt((xp.sum(x * x, axis=axes, keepdims=True) + s * s) / d + eps), x
    return None, 1 / xp.sqrt(xp.mean(x * x, axis=axes, keepdims=True) + eps), x


def _forward(xp, norm, x, weight, bias, eps, axis, out, return_stats):
    axes, shape, rows = _prepared(xp, x, axis)
    eps = _eps(xp, norm, eps, x.dtype)
    w = _param(xp, weight, "weight", shape, x)
    b = _param(xp, bias, "bias", shape, x)
    mean, rstd, centered = _statistics(xp, norm, x, axes, eps)
    y = centered * rstd
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    y = _namespace_ops._finished(xp, y, x.shape, out)
    if not return_stats:
        return y
    rstd = xp.reshape(rstd, rows)
    return (y, xp.reshape(mean, rows), rstd) if norm == "layer" else (y, rstd)


def _backward(xp, norm, dy, x, weight, bias, eps, axis, mean, rstd):
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: shape {tuple(dy.shape)} does not match x shape {tuple(x.shape)}")
    axes, shape, rows = _prepared(xp, x, axis)
    _check_real(xp, dy.dtype, "dy")
    eps = _eps(xp, norm, eps, x.dtype)
    w = _param(xp, weight, "weight", shape, x)
    _param(xp, bias, "bias", shape, x)  # only its shape matters: dbias = sum(dy)
    if norm == "layer" and (mean is None) != (rstd is None):
        missing = "mean" if mean is None else "rstd"
        raise ValueError(f"{missing}: give both saved statistics (mean and rstd) or neither")
    mean = _saved(xp, mean, "mean", rows, x)
    rstd = _saved(xp, rstd, "rstd", rows, x)
    if rstd is None:
        mean, rstd, centered = _statistics(xp, norm, x, axes, eps)
    else:
        centered = x if mean is None else x - mean
    g = dy if w is None else dy * w
    if norm == "layer":
        xhat = centered * rstd
        gm = xp.mean(g, axis=axes, keepdims=True)
        dx = rstd * (g - gm - xhat * xp.mean(g * xhat, axis=axes, keepdims=True))
        scaled = xhat
    elif norm == "crms":
        d = math.prod(shape) + 1
        s = xp.sum(x, axis=axes, keepdims=True)
        dx = rstd * g - (x + s) * rstd**3 * xp.sum(g * x, axis=axes, keepdims=True) / d
        scaled = x * rstd
    else:
        dx = rstd * g - x * rstd**3 * xp.mean(g * x, axis=axes, keepdims=True)
        scaled = x * rstd

    def over_rows(a):
        return xp.sum(a, axis=tuple(range(len(rows)))) if rows else a

    dw = None if weight is None else over_rows(dy * scaled)
    if norm != "layer":
        return dx, dw
    return dx, dw, (None if bias is None else over_rows(dy))


def rms_norm(xp, x, weight=None, *, eps=None, axis=-1, out=None, return_stats=False):
    return _forward(xp, "rms", x, weight, None, eps, axis, out, return_stats)


def rms_norm_backward(xp, dy, x, weight=None, *, eps=None, axis=-1, rstd=None):
    return _backward(xp, "rms", dy, x, weight, None, eps, axis, None, rstd)


def layer_norm(xp, x, weight=None, bias=None, *, eps=1e-5, axis=-1, out=None, return_stats=False):
    return _forward(xp, "layer", x, weight, bias, eps, axis, out, return_stats)


def layer_norm_backward(xp, dy, x, weight=None, bias=None, *, eps=1e-5, axis=-1, mean=None, rstd=None):
    return _backward(xp, "layer", dy, x, weight, bias, eps, axis, mean, rstd)


def crms_norm(xp, x, weight=None, *, eps=1e-6, axis=-1, out=None, return_stats=False):
    return _forward(xp, "crms", x, weight, None, eps, axis, out, return_stats)


def crms_norm_backward(xp, dy, x, weight=None, *, eps=1e-6, axis=-1, rstd=None):
    return _backward(xp, "crms", dy, x, weight, None, eps, axis, None, rstd)


OPS = {
    "rms_norm": rms_norm,
    "rms_norm_backward": rms_norm_backward,
    "layer_norm": layer_norm,
    "layer_norm_backward": layer_norm_backward,
    "crms_norm": crms_norm,
    "crms_norm_backward": crms_norm_backward,
}
