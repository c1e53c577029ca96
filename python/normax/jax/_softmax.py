"""softmax, log_softmax and logsumexp: XLA FFI calls of normax's kernels, each a ``jax.custom_jvp``.

An array reaches its target in the targets' layout (outer, L, inner), L the reduced length: a
reshape where the reduced axes are adjacent, a transpose moving them last otherwise. The
``custom_jvp`` functions take rows: (outer, L) reduced over axis -1 where inner is 1 (XLA's CPU
reductions over a non-minor axis of an (outer, L, 1) array are ~5x slower: the tangent rules
run in this shape; the target gets it with a unit inner axis, a bitcast), else (outer, L, inner)
reduced over axis -2. Under ``vmap`` the batch dimensions lead, so these axes hold, and the
tangent rules are plain jnp code of the FFI outputs, linear in the tangent: reverse mode is JAX's
transpose of it, and second derivatives differentiate the rule (whose primal is the FFI call
again). Without the FFI the targets run as
``jax.pure_callback`` of the host implementations registered here (see :mod:`normax.jax._ffi`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# jax's own functions, bound once: where= and complex input go to them even where a harness puts
# normax's functions into jax.nn (tests/conformance/jax_swap.py runs JAX's tests that way).
from jax.nn import log_softmax as jax_log_softmax
from jax.nn import logsumexp as jax_logsumexp
from jax.nn import softmax as jax_softmax

from .. import _softmax as cpu
from . import _ffi
from ._args import floating, inexact_dtype, is_complex, neg_axes

# ---------------------------------------------------------------------------------------------
# The (outer, L, inner) layout


class Layout(NamedTuple):
    """How an array of `shape` reduced over some axes maps to rows (see the module docstring)."""

    shape: tuple[int, ...]
    perm: tuple[int, ...] | None  # moves the reduced axes last; None where they are adjacent
    dims: tuple[int, ...]  # (outer, L), or (outer, L, inner) where inner > 1
    reduced_shape: tuple[int, ...]  # the kept axes, in order
    keepdims_shape: tuple[int, ...]  # the same with the reduced axes as ones


def layout_of(shape: tuple[int, ...], axes: tuple[int, ...]) -> Layout:
    """The layout of an array of `shape` reduced over `axes` (negative, sorted, no repeats)."""
    ndim = len(shape)
    reduced = [a + ndim for a in axes]
    kept = [i for i in range(ndim) if i not in reduced]
    outer = math.prod(shape[i] for i in kept)
    length = math.prod(shape[i] for i in reduced)
    first, last = (reduced[0], reduced[-1] + 1) if reduced else (ndim, ndim)
    if last - first == len(reduced):
        perm, inner = None, math.prod(shape[last:])
        dims = (math.prod(shape[:first]), length) + ((inner,) if inner > 1 else ())
    else:
        perm, dims = tuple(kept + reduced), (outer, length)
    keepdims = tuple(1 if i in reduced else s for i, s in enumerate(shape))
    return Layout(tuple(shape), perm, dims, tuple(shape[i] for i in kept), keepdims)


def to_rows(x: jax.Array, layout: Layout) -> jax.Array:
    if layout.perm is not None:
        x = jnp.transpose(x, layout.perm)
    return x.reshape(layout.dims)


def from_rows(y: jax.Array, layout: Layout) -> jax.Array:
    """The inverse of :func:`to_rows` for a row map's result."""
    if layout.perm is None:
        return y.reshape(layout.shape)
    y = y.reshape(tuple(layout.shape[i] for i in layout.perm))
    return jnp.transpose(y, np.argsort(layout.perm))


def map_rows(op, x, axis, fname: str):
    """``op`` (a ``custom_jvp`` of rows into rows of their shape) applied to `x` over `axis`;
    float16 and bfloat16 are computed in float32. A 0-d `x` is one row of one element."""
    x = floating(x, fname)
    if x.size == 0:
        return x
    layout = layout_of(x.shape, neg_axes(axis, x.ndim, fname) if x.ndim else ())
    return from_rows(op(to_rows(x, layout).astype(kernel_dtype(x.dtype))), layout).astype(x.dtype)


def kernel_dtype(dtype) -> np.dtype:
    """The targets take float32 and float64: float16 and bfloat16 are computed in float32 (a
    dtype-level rule: ``promote_types`` would refuse bfloat16 with float32 under strict promotion)."""
    return np.dtype(np.float32) if jnp.finfo(dtype).bits < 32 else np.dtype(dtype)


def reduced_axis(rows) -> int:
    """The axis `rows` are reduced over: -1 of (outer, L), -2 of (outer, L, inner)."""
    return -1 if rows.ndim == 2 else -2


def operand(rows):
    """The targets' (outer, L, inner) operand of `rows`."""
    return rows[..., None] if rows.ndim == 2 else rows


def call_rows(target: str, rows):
    """`target` (a row map: one operand, one result like it) on `rows`."""
    x = operand(rows)
    y = _ffi.call(target, [jax.ShapeDtypeStruct(x.shape, x.dtype)], x)[0]
    return y[..., 0] if rows.ndim == 2 else y


def over_rows(fn, x: np.ndarray) -> np.ndarray:
    """Host side: ``fn(x, axis=...)`` over axis -2 of (..., outer, L, inner) rows; where inner is
    1 (a reduction over the last axes) as the last axis, the kernels' fastest call."""
    if x.shape[-1] == 1:
        return fn(x[..., 0], axis=-1)[..., None]
    return fn(x, axis=-2)


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax


@jax.custom_jvp
def _softmax_rows(x):
    return call_rows("normax_softmax", x)


@_softmax_rows.defjvp
def _softmax_rows_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _softmax_rows(x)
    return y, y * (dx - jnp.sum(y * dx, axis=reduced_axis(x), keepdims=True))


@jax.custom_jvp
def _log_softmax_rows(x):
    return call_rows("normax_log_softmax", x)


@_log_softmax_rows.defjvp
def _log_softmax_rows_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _log_softmax_rows(x)
    return y, dx - jnp.sum(jnp.exp(y) * dx, axis=reduced_axis(x), keepdims=True)


@_ffi.host_impl("normax_softmax")
def _softmax_host(x):
    return (over_rows(cpu.softmax, x),)


@_ffi.host_impl("normax_log_softmax")
def _log_softmax_host(x):
    return (over_rows(cpu.log_softmax, x),)


def softmax(x, axis=-1, where=None):
    """``jax.nn.softmax`` computed by normax's softmax kernel.

    Parameters
    ----------
    x : array_like
        Input; bool and integers are promoted as ``jax.scipy.special.logsumexp`` promotes them
        (float32, 64-bit integers float64); float16 and bfloat16 are computed in float32.
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
    One ``normax_softmax`` FFI call, a ``jax.custom_jvp`` with jax.nn's tangent
    ``y * (dx - sum(y * dx))``: jvp, grad, jacfwd, hessian, vmap and jit all apply. Complex `x` is
    computed by ``jax.nn.softmax`` itself (normax's kernels are real), with its gradient.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.softmax(jnp.array([0.0, jnp.log(3.0)]))
    Array([0.25, 0.75], dtype=float32)
    """
    if where is not None or is_complex(x):
        return jax_softmax(jnp.asarray(x), axis, where)
    return map_rows(_softmax_rows, x, axis, "normax.jax.softmax")


def log_softmax(x, axis=-1, where=None):
    """``jax.nn.log_softmax`` computed by normax's log_softmax kernel.

    Parameters
    ----------
    x : array_like
        Input; dtypes as :func:`softmax`.
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
    One ``normax_log_softmax`` FFI call, a ``jax.custom_jvp`` with tangent
    ``dx - sum(exp(y) * dx)``. Complex `x` is computed by ``jax.nn.log_softmax`` itself, with its
    gradient.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.log_softmax(jnp.zeros(2))
    Array([-0.6931472, -0.6931472], dtype=float32)
    """
    if where is not None or is_complex(x):
        return jax_log_softmax(jnp.asarray(x), axis, where)
    return map_rows(_log_softmax_rows, x, axis, "normax.jax.log_softmax")


# ---------------------------------------------------------------------------------------------
# logsumexp


def _logsumexp_call(a, b):
    """The target on rows `a` with weights `b` of the same shape, or (0,) for none."""
    a3 = operand(a)
    b3 = b if b.ndim == 1 else operand(b)  # an absent b stays (0,)
    out = jax.ShapeDtypeStruct(a3.shape[:-2] + a3.shape[-1:], a.dtype)
    lse, sign = _ffi.call("normax_logsumexp", [out, out], a3, b3)
    return (lse[..., 0], sign[..., 0]) if a.ndim == 2 else (lse, sign)


@jax.custom_jvp
def _logsumexp_rows(a):
    return _logsumexp_call(a, jnp.zeros((0,), a.dtype))


@_logsumexp_rows.defjvp
def _logsumexp_rows_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    lse, sign = _logsumexp_rows(a)
    axis = reduced_axis(a)
    # d log(sum exp(a)) = sum(exp(a - lse) * da); the sign is piecewise constant.
    dlse = jnp.sum(jnp.exp(a - jnp.expand_dims(lse, axis)) * da, axis=axis)
    return (lse, sign), (dlse, jnp.zeros_like(sign))


@jax.custom_jvp
def _weighted_logsumexp_rows(a, b):
    return _logsumexp_call(a, b)


@_weighted_logsumexp_rows.defjvp
def _weighted_logsumexp_rows_jvp(primals, tangents):
    (a, b), (da, db) = primals, tangents
    lse, sign = _weighted_logsumexp_rows(a, b)
    # With s = sum(b * exp(a)) and lse = log|s|: d lse = ds / s, ds = sum(exp(a) * (b * da + db))
    # and 1 / s = sign / exp(lse).
    axis = reduced_axis(a)
    dlse = sign * jnp.sum(jnp.exp(a - jnp.expand_dims(lse, axis)) * (b * da + db), axis=axis)
    return (lse, sign), (dlse, jnp.zeros_like(sign))


@_ffi.host_impl("normax_logsumexp")
def _logsumexp_host(a, b):
    # An absent b is (0,) (with the batch dimensions in front under vmap): never a's shape.
    weights = b if b.shape == a.shape else None
    if a.shape[-1] == 1:
        a, weights = a[..., 0], None if weights is None else weights[..., 0]
        res, sign = cpu.logsumexp(a, axis=-1, b=weights, return_sign=True)
        return res[..., None], sign[..., None]
    return cpu.logsumexp(a, axis=-2, b=weights, return_sign=True)


def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, where=None):
    """``jax.nn.logsumexp`` (= ``jax.scipy.special.logsumexp``) computed by normax's kernel.

    Parameters
    ----------
    a : array_like
        Input; bool and integers are promoted as jax promotes them (float32, 64-bit integers
        float64); float16 and bfloat16 are computed in float32.
    axis : int, tuple of int or None, default None
        Axes to reduce; None means all (as JAX and SciPy; :func:`normax.logsumexp` defaults to -1).
    b : array_like, optional
        Weights; `a` and `b` broadcast together (as in JAX, `axis` counts the broadcast shape's
        axes); the result is ``log|sum(b * exp(a))|``. The dtype is jax's
        ``jnp.result_type(a, b)`` made inexact: under ``jax_numpy_dtype_promotion="strict"``
        differing dtypes raise jax's TypePromotionError, as ``jax.scipy.special.logsumexp``.
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
    One ``normax_logsumexp`` FFI call, a ``jax.custom_jvp`` with tangent
    ``sign * sum(exp(a - lse) * (b * da + db))`` (``sum(exp(a - lse) * da)`` without `b`): forward
    and reverse mode, second derivatives, with respect to `a` and `b`. Complex `a` or `b` is
    computed by ``jax.nn.logsumexp`` itself (complex result, its gradient; normax's kernels are
    real).

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.logsumexp(jnp.zeros(4))
    Array(1.3862944, dtype=float32)
    """
    fname = "normax.jax.logsumexp"
    if where is not None or is_complex(a) or is_complex(b):
        b = None if b is None else jnp.asarray(b)
        return jax_logsumexp(jnp.asarray(a), axis, b, keepdims, return_sign, where)
    if b is None:
        a = floating(a, fname)
    else:
        a, b = jnp.asarray(a), jnp.asarray(b)
        dtype = inexact_dtype(jnp.result_type(a, b))
        try:
            shape = jnp.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ValueError(
                f"{fname}: a of shape {a.shape} and b of shape {b.shape} do not broadcast"
            ) from None
        # As jax: both broadcast (the result may be larger than `a`); broadcast_to's transpose
        # sums each gradient back to its argument's shape.
        a, b = jnp.broadcast_to(a.astype(dtype), shape), jnp.broadcast_to(b.astype(dtype), shape)
    layout = layout_of(a.shape, neg_axes(axis, a.ndim, fname) if a.ndim else ())
    out_shape = layout.keepdims_shape if keepdims else layout.reduced_shape
    if a.size == 0:  # an empty sum: log(0), sign 0, as jax
        res, sign = jnp.full(out_shape, -jnp.inf, a.dtype), jnp.zeros(out_shape, a.dtype)
    else:
        work = kernel_dtype(a.dtype)
        a3 = to_rows(a, layout).astype(work)
        if b is None:
            res, sign = _logsumexp_rows(a3)
        else:
            res, sign = _weighted_logsumexp_rows(a3, to_rows(b, layout).astype(work))
        res, sign = res.reshape(out_shape).astype(a.dtype), sign.reshape(out_shape).astype(a.dtype)
    if return_sign:
        return res, sign
    if b is None:
        return res
    # NaN where the weighted sum is negative, last and with debug_nans off, as jax does: under
    # jax.debug_nans (checked op by op under disable_jit) only a NaN result can trip it.
    with jax.debug_nans(False):
        return jnp.where(sign < 0, jnp.nan, res)
