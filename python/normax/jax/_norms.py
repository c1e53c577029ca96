"""rms_norm and layer_norm: ``custom_vjp`` over callbacks into :mod:`normax._norms`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _norms as cpu
from ._callback import bind, call, floating, is_complex, neg_axes, spec


def _trailing(axis, ndim: int, fname: str) -> tuple[int, ...]:
    axes = neg_axes(axis, ndim, fname)
    if axes != tuple(range(-len(axes), 0)):
        raise ValueError(f"{fname}: axis {axis!r} must name trailing axes (the normalized shape)")
    return axes


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _norm_vjp(x, weight, bias, opts):
    return _norm_forward(x, weight, bias, opts)


def _norm_fwd_impl(a, w=None, b=None, *, opts):
    kind, eps, axes = opts
    if kind == "rms":
        return cpu.rms_norm(a, w, eps=eps, axis=axes)
    return cpu.layer_norm(a, w, b, eps=eps, axis=axes)


def _norm_bwd_impl(g, a, w=None, b=None, *, opts):
    # The statistics are recomputed from x (one more read) rather than saved: JAX without x64
    # could only keep them in float32, too coarse for a saved mean when |mean| >> std.
    kind, eps, axes = opts
    if kind == "rms":
        dx, dw = cpu.rms_norm_backward(g, a, w, eps=eps, axis=axes)
        db = None
    else:
        dx, dw, db = cpu.layer_norm_backward(g, a, w, b, eps=eps, axis=axes)
    return (dx,) + tuple(d for d in (dw, db) if d is not None)


def _norm_forward(x, weight, bias, opts):
    k = len(opts[2])
    args = (x, weight, bias)
    return call(bind(_norm_fwd_impl, opts=opts), [spec(x.shape, x.dtype)], args, (x.ndim, k, k), (0,))[0]


def _norm_fwd(x, weight, bias, opts):
    return _norm_forward(x, weight, bias, opts), (x, weight, bias)


def _norm_bwd(opts, saved, dy):
    x, weight, bias = saved
    k = len(opts[2])
    specs = [spec(x.shape, x.dtype)]
    specs += [spec(p.shape, p.dtype) for p in (weight, bias) if p is not None]
    # Without parameters the backward is row-wise; dweight/dbias sum over rows: one call per example.
    row_args = (0, 1) if weight is None and bias is None else None
    args = (dy.astype(x.dtype), x, weight, bias)
    out = call(bind(_norm_bwd_impl, opts=opts), specs, args, (x.ndim, x.ndim, k, k), row_args)
    dx, rest = out[0], list(out[1:])
    dw = rest.pop(0) if weight is not None else None
    db = rest.pop(0) if bias is not None else None
    return dx, dw, db


_norm_vjp.defvjp(_norm_fwd, _norm_bwd)


def _norm(kind, fname, x, weight, bias, eps, axis):
    x = floating(x, fname)
    axes = _trailing(axis, x.ndim, fname)
    shape = x.shape[x.ndim - len(axes) :]
    params = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            if is_complex(p):
                raise TypeError(f"{fname}: complex {name} is not supported")
            p = jnp.asarray(p).astype(x.dtype)
            if p.shape != shape:
                raise ValueError(
                    f"{fname}: {name} shape {p.shape} does not match the normalized shape {shape}"
                )
        params.append(p)
    return _norm_vjp(x, params[0], params[1], (kind, float(eps), axes))


def rms_norm(x, weight=None, *, eps=1e-6, axis=-1):
    """RMSNorm, ``x / sqrt(mean(x**2) + eps) * weight``, computed by :func:`normax.rms_norm`.

    Parameters
    ----------
    x : array_like
        Input.
    weight : array_like, optional
        Of the normalized shape ``x.shape[axis]``.
    eps : float, default 1e-6
        Added to the mean square (flax's RMSNorm default).
    axis : int or tuple of int, default -1
        The normalized (trailing) axes.

    Returns
    -------
    jax.Array
        Shaped like `x`, in its dtype.

    Notes
    -----
    Gradients with respect to `x` and `weight`; the backward recomputes the row statistics.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.rms_norm(jnp.array([3.0, 4.0]), eps=0.0)
    Array([0.84852815, 1.1313709 ], dtype=float32)
    """
    return _norm("rms", "normax.jax.rms_norm", x, weight, None, eps, axis)


def layer_norm(x, weight=None, bias=None, *, eps=1e-5, axis=-1):
    """LayerNorm, ``(x - mean) / sqrt(var + eps) * weight + bias``, computed by :func:`normax.layer_norm`.

    Parameters
    ----------
    x : array_like
        Input.
    weight, bias : array_like, optional
        Of the normalized shape.
    eps : float, default 1e-5
        Added to the (biased) variance.
    axis : int or tuple of int, default -1
        The normalized (trailing) axes.

    Returns
    -------
    jax.Array
        Shaped like `x`, in its dtype.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.layer_norm(jnp.array([1.0, 2.0, 3.0]), eps=0.0)
    Array([-1.2247449,  0.       ,  1.2247449], dtype=float32)
    """
    return _norm("layer", "normax.jax.layer_norm", x, weight, bias, eps, axis)
