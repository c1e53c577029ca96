"""softmax, log_softmax and logsumexp: ``custom_vjp`` over callbacks into :mod:`normax._softmax`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _softmax as cpu
from ._callback import bind, call, floating, is_complex, map_axes, neg_axes, spec

# ---------------------------------------------------------------------------------------------
# softmax, log_softmax


def _row_map(fn, backward):
    """custom_vjp of a row-to-row map y = fn(x) whose backward takes (y, dy)."""

    def forward(x, axes):
        return call(bind(fn, axis=axes), [spec(x.shape, x.dtype)], (x,), (x.ndim,), (0,))[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def op(x, axes):
        return forward(x, axes)

    def fwd(x, axes):
        y = forward(x, axes)
        return y, y

    def bwd(axes, y, dy):
        dy = dy.astype(y.dtype)
        specs = [spec(y.shape, y.dtype)]
        return (call(bind(backward, axis=axes), specs, (y, dy), (y.ndim, y.ndim), (0, 1))[0],)

    op.defvjp(fwd, bwd)
    return op


_softmax_vjp = _row_map(cpu.softmax, cpu.softmax_backward)
_log_softmax_vjp = _row_map(cpu.log_softmax, cpu.log_softmax_backward)


def softmax(x, axis=-1, where=None):
    """``jax.nn.softmax`` computed by :func:`normax.softmax`.

    Parameters
    ----------
    x : array_like
        Input; integers are promoted to the default float dtype.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over (None: all).
    where : array_like of bool, optional
        Elements to include, broadcast against `x`, as ``jax.nn.softmax``: masked-out elements are
        excluded from the sum and give 0. A call with `where` is computed by ``jax.nn.softmax``
        itself (jnp ops, its gradient); the signature is exactly jax's.

    Returns
    -------
    jax.Array
        Same shape and dtype as `x`.

    Notes
    -----
    Backward: ``dx = y * (dy - sum(dy * y))`` (normax's kernel). Complex
    `x` is computed by ``jax.nn.softmax`` itself (normax's kernels are real), with its gradient.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.softmax(jnp.array([0.0, jnp.log(3.0)]))
    Array([0.25, 0.75], dtype=float32)
    """
    if where is not None or is_complex(x):
        return jax.nn.softmax(jnp.asarray(x), axis, where)
    return map_axes(_softmax_vjp, x, axis, "normax.jax.softmax")


def log_softmax(x, axis=-1, where=None):
    """``jax.nn.log_softmax`` computed by :func:`normax.log_softmax`.

    Parameters
    ----------
    x : array_like
        Input; integers are promoted to the default float dtype.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalize over (None: all).
    where : array_like of bool, optional
        Elements to include, as ``jax.nn.log_softmax``: masked-out elements are excluded and give
        -inf. A call with `where` is computed by ``jax.nn.log_softmax`` itself (jnp ops, its
        gradient); the signature is exactly jax's.

    Returns
    -------
    jax.Array
        Same shape and dtype as `x`.

    Notes
    -----
    Complex `x` is computed by ``jax.nn.log_softmax`` itself, with its gradient.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.log_softmax(jnp.zeros(2))
    Array([-0.6931472, -0.6931472], dtype=float32)
    """
    if where is not None or is_complex(x):
        return jax.nn.log_softmax(jnp.asarray(x), axis, where)
    return map_axes(_log_softmax_vjp, x, axis, "normax.jax.log_softmax")


# ---------------------------------------------------------------------------------------------
# logsumexp


def _lse_impl(a, b=None, *, axes):
    return cpu.logsumexp(a, axis=axes, b=b, keepdims=True, return_sign=True)


def _lse_forward(a, b, axes):
    shape = tuple(1 if i - a.ndim in axes else s for i, s in enumerate(a.shape))
    specs = [spec(shape, a.dtype), spec(shape, a.dtype)]
    args = (a,) if b is None else (a, b)
    return call(bind(_lse_impl, axes=axes), specs, args, (a.ndim,) * len(args), tuple(range(len(args))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lse_vjp(a, axes):
    return _lse_forward(a, None, axes)


def _lse_fwd(a, axes):
    res, sign = _lse_forward(a, None, axes)
    return (res, sign), (a, res, sign)


def _lse_bwd(axes, saved, cts):
    a, res, _ = saved
    # d log(sum exp(a)) / da = exp(a - lse) (the sum is positive).
    return (cts[0] * jnp.exp(a - res),)


_lse_vjp.defvjp(_lse_fwd, _lse_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lse_b_vjp(a, b, axes):
    return _lse_forward(a, b, axes)


def _lse_b_fwd(a, b, axes):
    res, sign = _lse_forward(a, b, axes)
    return (res, sign), (a, b, res, sign)


def _lse_b_bwd(axes, saved, cts):
    a, b, res, sign = saved
    # With s = sum(b * exp(a)) and lse = log|s|: d lse / d a = b exp(a - lse) / sign(s), d / d b =
    # exp(a - lse) / sign(s), and 1 / sign(s) = sign(s).
    e = cts[0] * jnp.exp(a - res) * sign
    return e * b, e


_lse_b_vjp.defvjp(_lse_b_fwd, _lse_b_bwd)


def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, where=None):
    """``jax.nn.logsumexp`` (= ``jax.scipy.special.logsumexp``) computed by :func:`normax.logsumexp`.

    Parameters
    ----------
    a : array_like
        Input.
    axis : int, tuple of int or None, default None
        Axes to reduce; None means all (as JAX and SciPy; :func:`normax.logsumexp` defaults to -1).
    b : array_like, optional
        Weights; `a` and `b` broadcast together (as in JAX, `axis` counts the broadcast shape's
        axes); the result is ``log|sum(b * exp(a))|``.
    keepdims : bool, default False
        Keep the reduced axes with size one.
    return_sign : bool, default False
        Also return the sign of the weighted sum; without it a negative sum gives NaN.
    where : array_like of bool, optional
        Elements to include, as ``jax.nn.logsumexp``: masked-out elements are excluded from the
        sum. A call with `where` is computed by ``jax.nn.logsumexp`` itself (jnp ops, its
        gradients); the signature is exactly jax's.

    Returns
    -------
    jax.Array or (jax.Array, jax.Array)
        The result, and its sign with ``return_sign=True``.

    Notes
    -----
    Gradients with respect to `a` and `b`; the backward is jnp code (``exp(a - lse)`` from the
    saved result). Complex `a` or `b` is computed by
    ``jax.nn.logsumexp`` itself (complex result, its gradient; normax's kernels are real).

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.logsumexp(jnp.zeros(4))
    Array(1.3862944, dtype=float32)
    """
    fname = "normax.jax.logsumexp"
    if where is not None or is_complex(a) or is_complex(b):
        b = None if b is None else jnp.asarray(b)
        return jax.nn.logsumexp(jnp.asarray(a), axis, b, keepdims, return_sign, where)
    a = floating(a, fname)
    if b is not None:
        b = jnp.asarray(b)
        dtype = jnp.result_type(a.dtype, b.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = a.dtype
        try:
            shape = jnp.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ValueError(
                f"{fname}: a of shape {a.shape} and b of shape {b.shape} do not broadcast"
            ) from None
        # As jax: both broadcast (the result may be larger than `a`); broadcast_to's transpose
        # sums each gradient back to its argument's shape.
        a, b = jnp.broadcast_to(a.astype(dtype), shape), jnp.broadcast_to(b.astype(dtype), shape)
    squeeze = a.ndim == 0
    if squeeze:
        a = a.reshape(1)
        b = None if b is None else b.reshape(1)
    axes = (-1,) if squeeze else neg_axes(axis, a.ndim, fname)
    res, sign = _lse_vjp(a, axes) if b is None else _lse_b_vjp(a, b, axes)
    if squeeze:
        res, sign = res.reshape(()), sign.reshape(())
    elif not keepdims:
        res, sign = jnp.squeeze(res, axis=axes), jnp.squeeze(sign, axis=axes)
    if return_sign:
        return res, sign
    # NaN where the weighted sum is negative, last and with debug_nans off, as jax does: under
    # jax.debug_nans (checked op by op under disable_jit) only a NaN result can trip it.
    with jax.debug_nans(False):
        return jnp.where(sign < 0, jnp.nan, res)
