"""rms_norm, layer_norm and crms_norm on the ``normax_norm_forward`` target.

The target returns the normalized rows and their statistics (mean, rstd); each op is a
``jax.custom_jvp`` whose tangent is linear jnp code of those statistics (derivatives with respect
to x, weight and bias). The statistics carry tangents of their own, so the rule differentiates
again (``jax.hessian``). The transpose of the tangent is the backward: XLA sums the parameter
gradients over the rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _norms as cpu
from . import _ffi
from ._args import is_complex, neg_axes

_TARGET = "normax_norm_forward"
_NUMPY = {"rms": cpu.rms_norm, "layer": cpu.layer_norm, "crms": cpu.crms_norm}


@_ffi.host_impl(_TARGET)
def _host(x, weight, bias, *, kind, eps):
    """The target on NumPy arrays: (N, L) rows, (L,) or (0,) weight and bias, extra leading batch
    dimensions on all of them (batched parameters apply to their own batch element)."""

    def one(a, w, b):
        params = (w if w.size else None, b if b.size else None)
        out = _NUMPY[kind](a, *params[: 2 if kind == "layer" else 1], eps=float(eps), return_stats=True)
        y, *stats = out
        mean = stats[0] if kind == "layer" else np.zeros(a.shape[:-1])
        return y, mean, stats[-1]

    batch = x.shape[:-2]
    shapes = (x.shape, x.shape[:-1], x.shape[:-1])
    if weight.ndim == 1 and bias.ndim == 1:
        out = one(x.reshape(-1, x.shape[-1]), weight, bias)
        return tuple(np.asarray(a, x.dtype).reshape(s) for a, s in zip(out, shapes))
    w = np.broadcast_to(weight, batch + weight.shape[-1:])
    b = np.broadcast_to(bias, batch + bias.shape[-1:])
    out = tuple(np.empty(s, x.dtype) for s in shapes)
    for i in np.ndindex(*batch):
        for o, r in zip(out, one(x[i], w[i], b[i])):
            o[i] = r
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _normalize(x, weight, bias, kind, eps):
    """(y, mean, rstd) of (N, L) rows; absent parameters are (0,)."""
    stat = jax.ShapeDtypeStruct(x.shape[:-1], x.dtype)
    results = [jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat]
    return _ffi.call(_TARGET, results, x, weight, bias, kind=kind, eps=np.float64(eps))


@_normalize.defjvp
def _normalize_jvp(kind, eps, primals, tangents):
    x, weight, bias = primals
    dx, dweight, dbias = tangents
    y, mean, rstd = _normalize(x, weight, bias, kind, eps)
    r = rstd[:, None]
    if kind == "layer":
        centered = x - mean[:, None]
        # One correction step: the kernel's mean is rounded to x's dtype, and its error would
        # shift every centered value where |mean| >> std.
        centered = centered - jnp.mean(centered, axis=-1, keepdims=True)
        xhat = centered * r
        dmean = jnp.mean(dx, axis=-1)
        drstd = -rstd * rstd * jnp.mean(xhat * dx, axis=-1)
        dxhat = r * (dx - dmean[:, None]) + centered * drstd[:, None]
    else:
        xhat = x * r
        dmean = jnp.zeros_like(mean)
        if kind == "rms":
            drstd = -rstd * rstd * jnp.mean(xhat * dx, axis=-1)
        else:  # crms: the mean square of the full vector, (sum x**2 + (sum x)**2) / (L + 1)
            d = x.shape[-1] + 1
            dms = (jnp.sum(x * dx, axis=-1) + jnp.sum(x, axis=-1) * jnp.sum(dx, axis=-1)) / d
            drstd = -rstd * rstd * rstd * dms
        dxhat = dx * r + x * drstd[:, None]
    dy = dxhat
    if weight.shape[-1]:
        dy = dxhat * weight + xhat * dweight
    if bias.shape[-1]:
        dy = dy + dbias
    return (y, mean, rstd), (dy, dmean, drstd)


def inexact_dtypes(dtype) -> tuple[np.dtype, np.dtype]:
    """(result dtype, compute dtype) of input of `dtype`, as jax.nn and jax.scipy.special: bool and
    integers of up to 32 bits become float32, 64-bit integers float64 (float32 without x64; no
    int/float mixing, which strict promotion refuses); float16 and bfloat16 compute in float32.
    The compute dtype is the targets' operand dtype, float32 or float64."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype.itemsize == 8 else jnp.float32)
    return dtype, (jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype)


def _trailing(axis, ndim: int, fname: str) -> tuple[int, ...]:
    axes = neg_axes(axis, ndim, fname)
    if axes != tuple(range(-len(axes), 0)):
        raise ValueError(f"{fname}: axis {axis!r} must name trailing axes (the normalized shape)")
    return axes


def _norm(kind, fname, x, weight, bias, eps, axis):
    x = jnp.asarray(x)
    if is_complex(x):
        raise TypeError(f"{fname}: complex input ({x.dtype}) is not supported; normax's kernels are real")
    out_dtype, work = inexact_dtypes(x.dtype)
    axes = _trailing(axis, x.ndim, fname)
    shape = x.shape[x.ndim - len(axes) :]
    length = math.prod(shape)
    params = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            params.append(jnp.zeros((0,), work))  # absent
            continue
        if is_complex(p):
            raise TypeError(f"{fname}: complex {name} is not supported")
        p = jnp.asarray(p)
        if p.shape != shape:
            raise ValueError(f"{fname}: {name} shape {p.shape} does not match the normalized shape {shape}")
        params.append(p.astype(work).reshape(length))
    rows = x.astype(work).reshape(math.prod(x.shape[: x.ndim - len(axes)]), length)
    y = _normalize(rows, params[0], params[1], kind, float(eps))[0]
    return y.reshape(x.shape).astype(out_dtype)


def rms_norm(x, weight=None, *, eps=1e-6, axis=-1):
    """RMSNorm, ``x / sqrt(mean(x**2) + eps) * weight``, computed by normax's kernels.

    Parameters
    ----------
    x : array_like
        Input. Integers and bool become floating as in jax.nn (float32, or float64 for
        64-bit integers with x64); float16 and bfloat16 are computed in float32.
    weight : array_like, optional
        Of the normalized shape ``x.shape[axis]``.
    eps : float, default 1e-6
        Added to the mean square (flax's RMSNorm default).
    axis : int or tuple of int, default -1
        The normalized (trailing) axes.

    Returns
    -------
    jax.Array
        Shaped like `x`, in its (promoted) dtype.

    Notes
    -----
    The ``normax_norm_forward`` XLA FFI target (``jax.pure_callback`` of :func:`normax.rms_norm`
    where jaxlib has no FFI) returns the rows and their rstd; the op is a ``jax.custom_jvp``
    whose tangent (with respect to `x` and `weight`) is jnp code of rstd, so ``jax.jvp``,
    ``jax.grad`` and ``jax.hessian`` work. Under ``jax.vmap`` the batch is extra rows of one
    call (a batched `weight` applies per batch element).

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.rms_norm(jnp.array([3.0, 4.0]), eps=0.0)
    Array([0.84852815, 1.1313709 ], dtype=float32)
    """
    return _norm("rms", "normax.jax.rms_norm", x, weight, None, eps, axis)


def layer_norm(x, weight=None, bias=None, *, eps=1e-5, axis=-1):
    """LayerNorm, ``(x - mean) / sqrt(var + eps) * weight + bias``, computed by normax's kernels.

    Parameters
    ----------
    x : array_like
        Input; dtypes as in :func:`rms_norm`.
    weight, bias : array_like, optional
        Of the normalized shape.
    eps : float, default 1e-5
        Added to the (biased) variance.
    axis : int or tuple of int, default -1
        The normalized (trailing) axes.

    Returns
    -------
    jax.Array
        Shaped like `x`, in its (promoted) dtype.

    Notes
    -----
    As :func:`rms_norm`: a ``jax.custom_jvp`` over the ``normax_norm_forward`` target, whose
    tangent (with respect to `x`, `weight` and `bias`) is jnp code of the rows' mean and rstd.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.layer_norm(jnp.array([1.0, 2.0, 3.0]), eps=0.0)
    Array([-1.2247449,  0.       ,  1.2247449], dtype=float32)
    """
    return _norm("layer", "normax.jax.layer_norm", x, weight, bias, eps, axis)


def crms_norm(x, weight=None, *, eps=1e-6, axis=-1):
    """CRMSNorm (Pre-CRMSNorm Transformers): RMSNorm of a zero-mean vector stored compressed.

    A zero-mean vector of dimension ``d`` is stored as its first ``d - 1`` entries `x` (the last is
    ``-sum(x)``): ``crms_norm(x) = x / sqrt((sum(x**2) + sum(x)**2) / d + eps) * weight`` with ``d``
    the normalized size plus one, as :func:`normax.crms_norm`.

    Parameters
    ----------
    x : array_like
        Input; dtypes as in :func:`rms_norm`.
    weight : array_like, optional
        Of the normalized shape.
    eps : float, default 1e-6
        Added to the mean square.
    axis : int or tuple of int, default -1
        The normalized (trailing) axes.

    Returns
    -------
    jax.Array
        Shaped like `x`, in its (promoted) dtype.

    Notes
    -----
    As :func:`rms_norm`: a ``jax.custom_jvp`` over the ``normax_norm_forward`` target.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.crms_norm(jnp.array([1.0, -1.0]), eps=0.0)
    Array([ 1.2247449, -1.2247449], dtype=float32)
    """
    return _norm("crms", "normax.jax.crms_norm", x, weight, None, eps, axis)
