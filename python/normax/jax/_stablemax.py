"""stablemax and log_stablemax: XLA FFI calls of normax's StableMax kernels, each a
``jax.custom_jvp``, on :mod:`._softmax`'s rows.

StableMax is softmax of ``phi(x) = log s(x)`` with ``phi'(x) = 1 / (1 + |x|)``, so the tangent
rules are softmax's and log_softmax's of ``dx / (1 + |x|)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _stablemax as cpu
from . import _ffi
from ._softmax import call_rows, map_rows, over_rows, reduced_axis


def _phi_tangent(x, dx):
    return dx / (1 + jnp.abs(x))


@jax.custom_jvp
def _stablemax_rows(x):
    return call_rows("normax_stablemax", x)


@_stablemax_rows.defjvp
def _stablemax_rows_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _stablemax_rows(x)
    g = _phi_tangent(x, dx)
    return y, y * (g - jnp.sum(y * g, axis=reduced_axis(x), keepdims=True))


@jax.custom_jvp
def _log_stablemax_rows(x):
    return call_rows("normax_log_stablemax", x)


@_log_stablemax_rows.defjvp
def _log_stablemax_rows_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _log_stablemax_rows(x)
    g = _phi_tangent(x, dx)
    return y, g - jnp.sum(jnp.exp(y) * g, axis=reduced_axis(x), keepdims=True)


@_ffi.host_impl("normax_stablemax")
def _stablemax_host(x):
    return (over_rows(cpu.stablemax, x),)


@_ffi.host_impl("normax_log_stablemax")
def _log_stablemax_host(x):
    return (over_rows(cpu.log_stablemax, x),)


def stablemax(x, axis=-1):
    """StableMax (Prieto et al. 2025) computed by normax's stablemax kernel.

    Parameters
    ----------
    x : array_like
        Real input; bool and integers are promoted as :func:`normax.jax.softmax` promotes them;
        float16 and bfloat16 are computed in float32; complex raises TypeError.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over (None: all).

    Returns
    -------
    jax.Array
        ``s(x) / sum(s(x), axis)`` with s(x) = x + 1 for x >= 0, 1 / (1 - x) below; same shape
        and dtype as `x`.

    Notes
    -----
    One ``normax_stablemax`` FFI call, a ``jax.custom_jvp`` with tangent
    ``y * (g - sum(y * g))``, ``g = dx / (1 + |x|)``: jvp, grad, jacfwd, hessian, vmap and jit
    all apply.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.stablemax(jnp.array([-1.0, 0.0, 1.0]))
    Array([0.14285715, 0.2857143 , 0.5714286 ], dtype=float32)
    """
    return map_rows(_stablemax_rows, x, axis, "normax.jax.stablemax")


def log_stablemax(x, axis=-1):
    """log of :func:`stablemax`, computed by normax's log_stablemax kernel.

    Parameters
    ----------
    x : array_like
        Real input; dtypes as :func:`stablemax`.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over (None: all).

    Returns
    -------
    jax.Array
        ``log s(x) - log(sum(s(x), axis))``; same shape and dtype as `x`.

    Notes
    -----
    One ``normax_log_stablemax`` FFI call, a ``jax.custom_jvp`` with tangent
    ``g - sum(exp(y) * g)``, ``g = dx / (1 + |x|)``.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.log_stablemax(jnp.zeros(2))
    Array([-0.6931472, -0.6931472], dtype=float32)
    """
    return map_rows(_log_stablemax_rows, x, axis, "normax.jax.log_stablemax")
