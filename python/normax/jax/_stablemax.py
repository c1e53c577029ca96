"""stablemax and log_stablemax: ``custom_vjp`` over callbacks into :mod:`normax._stablemax`."""

from __future__ import annotations

import functools

import jax

from .. import _stablemax as cpu
from ._callback import bind, call, map_axes, spec


def _stable_row_map(fn, backward):
    """custom_vjp of y = fn(x) whose backward takes (y, dy, x): StableMax's gradient needs x."""

    def forward(x, axes):
        return call(bind(fn, axis=axes), [spec(x.shape, x.dtype)], (x,), (x.ndim,), (0,))[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def op(x, axes):
        return forward(x, axes)

    def fwd(x, axes):
        y = forward(x, axes)
        return y, (y, x)

    def bwd(axes, res, dy):
        y, x = res
        dy = dy.astype(y.dtype)
        specs = [spec(y.shape, y.dtype)]
        n = y.ndim
        return (call(bind(backward, axis=axes), specs, (y, dy, x), (n, n, n), (0, 1, 2))[0],)

    op.defvjp(fwd, bwd)
    return op


_stablemax_vjp = _stable_row_map(cpu.stablemax, cpu.stablemax_backward)
_log_stablemax_vjp = _stable_row_map(cpu.log_stablemax, cpu.log_stablemax_backward)


def stablemax(x, axis=-1):
    """StableMax (Prieto et al. 2025) computed by :func:`normax.stablemax`, with ``custom_vjp``.

    Parameters
    ----------
    x : array_like
        Real input; integers are promoted to the default float dtype; complex raises TypeError.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over (None: all).

    Returns
    -------
    jax.Array
        ``s(x) / sum(s(x), axis)`` with s(x) = x + 1 for x >= 0, 1 / (1 - x) below; same shape
        and dtype as `x`.

    Notes
    -----
    Backward: ``y * (dy - sum(dy * y)) / (1 + |x|)`` (:func:`normax.stablemax_backward`).

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.stablemax(jnp.array([-1.0, 0.0, 1.0]))
    Array([0.14285715, 0.2857143 , 0.5714286 ], dtype=float32)
    """
    return map_axes(_stablemax_vjp, x, axis, "normax.jax.stablemax")


def log_stablemax(x, axis=-1):
    """log of :func:`stablemax`, computed by :func:`normax.log_stablemax`, with ``custom_vjp``.

    Parameters
    ----------
    x : array_like
        Real input.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over (None: all).

    Returns
    -------
    jax.Array
        ``log s(x) - log(sum(s(x), axis))``; same shape and dtype as `x`.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.log_stablemax(jnp.zeros(2))
    Array([-0.6931472, -0.6931472], dtype=float32)
    """
    return map_axes(_log_stablemax_vjp, x, axis, "normax.jax.log_stablemax")
