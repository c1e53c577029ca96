"""normax's functions in any array-API namespace, for arrays normax cannot read on the CPU.

An array on another device (array_api_strict's ``Device("device1")``, a torch tensor on MPS or
``meta``) is computed with its own namespace's functions (through array-api-compat), on its
device: never refused, never copied to the host. :data:`OPS` lists the functions that have such a
version, the one table :func:`normax._dispatch.array_api` reads. This module holds the softmax
and StableMax families: the max-shifted formulas SciPy uses (and StableMax's definition), not
normax's kernels, with normax's conventions (default axis, ``out=``, special values).
:mod:`normax._namespace_norms` holds the norms, :mod:`normax._namespace_ce` the
cross-entropies and :mod:`normax._namespace_logprobs` the log-probabilities. ``power_norm`` (and its backward) has none: its running statistics live in the
host float64 buffers of a :class:`normax.PowerNormState`, updated by every call, so a device
version would have to copy them to and from the host each call; it raises NotImplementedError.

The arguments arrive in their namespace's promoted dtype (:func:`normax._convert.promote`).
"""

from __future__ import annotations

import math

from array_api_compat import device as _device

from . import _namespace_ce, _namespace_logprobs, _namespace_norms
from ._arrays import normalize_axes


def _rows(xp, x, axis):
    """`x` and its reduced axes; a 0-d `x` as shape (1,) (it reduces over its one element)."""
    axes = normalize_axes(axis, x.ndim)
    if x.ndim == 0:
        return xp.reshape(x, (1,)), (0,)
    return x, axes


def _real_part(xp, x):
    return xp.real(x) if xp.isdtype(x.dtype, "complex floating") else x


def _finished(xp, y, shape, out):
    """`y` in the caller's `shape`, written to `out` (checked first) when given."""
    y = xp.reshape(y, shape)
    if out is None:
        return y
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out: shape {tuple(out.shape)} does not match the result shape {tuple(shape)}")
    if out.dtype != y.dtype:
        raise TypeError(f"out: dtype {out.dtype} does not match the result dtype {y.dtype}")
    out[...] = y
    return out


def softmax(xp, x, axis=-1, *, out=None):
    shape = x.shape
    a, axes = _rows(xp, x, axis)
    if math.prod(a.shape) == 0:
        return _finished(xp, xp.zeros_like(a), shape, out)
    # +inf in a row makes its max inf and the row NaN, as the kernels do.
    e = xp.exp(a - xp.max(_real_part(xp, a), axis=axes, keepdims=True))
    return _finished(xp, e / xp.sum(e, axis=axes, keepdims=True), shape, out)


def log_softmax(xp, x, axis=-1, *, out=None):
    shape = x.shape
    a, axes = _rows(xp, x, axis)
    if math.prod(a.shape) == 0:
        return _finished(xp, xp.zeros_like(a), shape, out)
    m = xp.max(_real_part(xp, a), axis=axes, keepdims=True)
    if xp.isdtype(a.dtype, "complex floating"):
        m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))  # SciPy's branch for the imaginary parts
    shifted = a - m
    y = shifted - xp.log(xp.sum(xp.exp(shifted), axis=axes, keepdims=True))
    return _finished(xp, y, shape, out)


def _nonzero_finite(b) -> bool:
    try:
        return b != 0 and math.isfinite(b)
    except OverflowError:  # an int beyond float64
        return True


def logsumexp(xp, x, axis=-1, *, b=None, keepdims=False, return_sign=False):
    device = _device(x)
    a = x
    if isinstance(b, (int, float)) and _nonzero_finite(b) and not xp.isdtype(a.dtype, "complex floating"):
        # A real Python number: log|b| added, never rounded to x's dtype (b=1e300 is no inf in float32).
        res, sgn = logsumexp(xp, x, axis, keepdims=keepdims, return_sign=True)
        res = res + math.log(abs(b))
        sgn = -sgn if b < 0 else sgn
        return (res, sgn) if return_sign else xp.where(sgn < 0, xp.full_like(res, math.nan), res)
    if b is not None:
        if isinstance(b, (int, float, complex)):  # weak, as in the NumPy-first function
            dtype = a.dtype
            if isinstance(b, complex) and not xp.isdtype(dtype, "complex floating"):
                dtype = xp.complex64 if dtype == xp.float32 else xp.complex128
                a = xp.astype(a, dtype)
            b = xp.full(a.shape, b, dtype=dtype, device=device)
        try:
            a, b = xp.broadcast_arrays(a, b)
        except (ValueError, RuntimeError):
            raise ValueError(f"b: shape {tuple(b.shape)} does not broadcast with x shape {tuple(a.shape)}") from None
        a = xp.where(b == 0, xp.asarray(-math.inf, dtype=a.dtype, device=device), a)  # left out
    full_shape = a.shape
    a, axes = _rows(xp, a, axis)
    b = None if b is None else xp.reshape(b, a.shape)
    if len(full_shape) == 0:
        shape = ()
    elif keepdims:
        shape = tuple(1 if i in axes else n for i, n in enumerate(a.shape))
    else:
        shape = tuple(n for i, n in enumerate(a.shape) if i not in axes)
    complex_ = xp.isdtype(a.dtype, "complex floating")
    real_dtype = (xp.float32 if a.dtype == xp.complex64 else xp.float64) if complex_ else a.dtype
    if math.prod(a.shape[i] for i in axes) == 0:  # an empty sum: log(0)
        res = xp.full(shape, -math.inf, dtype=real_dtype if return_sign else a.dtype, device=device)
        return (res, xp.zeros(shape, dtype=a.dtype, device=device)) if return_sign else res
    m = xp.max(_real_part(xp, a), axis=axes, keepdims=True)
    nothing = m == -math.inf  # only -inf (or left-out elements): log(0), whatever the weights
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    e = xp.exp(a - m)
    if b is not None:
        e = e * b
    sgn = None
    if complex_:
        s = xp.sum(e, axis=axes, keepdims=True)
        if return_sign:
            size = xp.abs(s)
            sgn = xp.where(size == 0, xp.zeros_like(s), s / xp.astype(size, s.dtype))
            res = xp.log(size) + m
        else:
            res = xp.log(s) + xp.astype(m, s.dtype)
    else:
        # The row's largest terms (exp(0) each, times their weights) apart from the rest, so that
        # log(top + rest) = log|top| + log1p(rest / top) keeps a result near 0 accurate.
        at_max = a == m
        zeros = xp.zeros_like(a)
        top = xp.sum(xp.where(at_max, xp.ones_like(a) if b is None else b, zeros), axis=axes, keepdims=True)
        rest = xp.sum(xp.where(at_max, zeros, e), axis=axes, keepdims=True)
        s = top + rest
        ratio = rest / xp.where(top == 0, xp.ones_like(top), top)
        split = (top != 0) & (ratio > -1)
        res = xp.where(split, xp.log(xp.abs(top)) + xp.log1p(ratio), xp.log(xp.abs(s))) + m
        sgn = xp.sign(s)
        if not return_sign:
            res = xp.where(s < 0, xp.full_like(res, math.nan), res)  # the log of a negative sum
    res = xp.where(nothing, xp.full_like(res, -math.inf), res)
    res = xp.reshape(res, shape)
    if not return_sign:
        return res
    return res, xp.reshape(xp.where(nothing, xp.zeros_like(sgn), sgn), shape)


def _backward_inputs(xp, y, dy, axis):
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy: shape {tuple(dy.shape)} does not match y shape {tuple(y.shape)}")
    shape = y.shape
    y, axes = _rows(xp, y, axis)
    return y, xp.reshape(dy, y.shape), axes, shape


def softmax_backward(xp, y, dy, axis=-1):
    y, dy, axes, shape = _backward_inputs(xp, y, dy, axis)
    return xp.reshape(y * (dy - xp.sum(dy * y, axis=axes, keepdims=True)), shape)


def log_softmax_backward(xp, y, dy, axis=-1):
    y, dy, axes, shape = _backward_inputs(xp, y, dy, axis)
    return xp.reshape(dy - xp.exp(y) * xp.sum(dy, axis=axes, keepdims=True), shape)


def _stablemax_parts(xp, x, axis):
    """`x` as rows, its axes, s(x) (x + 1 from 0 up, 1 / (1 - x) below) and where a row holds NaN
    or +inf (all NaN there, as the kernels)."""
    if xp.isdtype(x.dtype, "complex floating"):
        raise TypeError(f"x: unsupported dtype {x.dtype}; StableMax is defined for real input only")
    a, axes = _rows(xp, x, axis)
    s = xp.where(a >= 0, a + 1, 1 / (1 - a))
    bad = xp.any(xp.isnan(a) | (a == math.inf), axis=axes, keepdims=True)
    return a, axes, s, bad


def stablemax(xp, x, axis=-1, *, out=None):
    a, axes, s, bad = _stablemax_parts(xp, x, axis)
    if math.prod(a.shape) == 0:
        return _finished(xp, xp.zeros_like(a), x.shape, out)
    y = s / xp.sum(s, axis=axes, keepdims=True)
    return _finished(xp, xp.where(bad, xp.full_like(y, math.nan), y), x.shape, out)


def log_stablemax(xp, x, axis=-1, *, out=None):
    a, axes, s, bad = _stablemax_parts(xp, x, axis)
    if math.prod(a.shape) == 0:
        return _finished(xp, xp.zeros_like(a), x.shape, out)
    phi = xp.sign(a) * xp.log1p(xp.abs(a))  # log s(x), accurate near 0
    y = phi - xp.log(xp.sum(s, axis=axes, keepdims=True))
    return _finished(xp, xp.where(bad, xp.full_like(y, math.nan), y), x.shape, out)


def _scaled(xp, backward, y, dy, x, axis):
    """softmax's `backward` of (y, dy), times s'(x) / s(x) = 1 / (1 + |x|)."""
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"x: shape {tuple(x.shape)} does not match y shape {tuple(y.shape)}")
    if xp.isdtype(x.dtype, "complex floating"):
        raise TypeError(f"x: unsupported dtype {x.dtype}; StableMax is defined for real input only")
    dx = backward(xp, y, dy, axis)
    return dx / (1 + xp.abs(xp.astype(x, dx.dtype)))


def stablemax_backward(xp, y, dy, x, axis=-1):
    return _scaled(xp, softmax_backward, y, dy, x, axis)


def log_stablemax_backward(xp, y, dy, x, axis=-1):
    return _scaled(xp, log_softmax_backward, y, dy, x, axis)


# Every public function with a version in the array's own namespace, for arrays on a device normax
# cannot read (the norms, cross-entropies and log-probabilities from their modules).
OPS = {
    "softmax": softmax,
    "log_softmax": log_softmax,
    "logsumexp": logsumexp,
    "softmax_backward": softmax_backward,
    "log_softmax_backward": log_softmax_backward,
    "stablemax": stablemax,
    "log_stablemax": log_stablemax,
    "stablemax_backward": stablemax_backward,
    "log_stablemax_backward": log_stablemax_backward,
    **_namespace_norms.OPS,
    **_namespace_ce.OPS,
    **_namespace_logprobs.OPS,
}
