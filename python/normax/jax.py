"""normax for JAX: ``jax.nn``-style functions that work under jit, grad, value_and_grad and vmap.

    import normax.jax as nj
    y = nj.softmax(x, axis=-1)
    losses = nj.cross_entropy(logits, labels)            # per example, as optax's integer-label loss
    y = jax.jit(lambda x, w: nj.rms_norm(x, w))(x, w)

Each op is a ``jax.custom_vjp`` whose forward and backward are ``jax.pure_callback`` calls into the
NumPy-first functions (inputs read in place through NumPy views of JAX's CPU buffers). The
callbacks batch with ``vmap_method="expand_dims"``: under ``vmap`` one call sees the whole batch as
extra leading dimensions. Row-wise work (softmax rows, per-example losses, normalized rows) then
runs as one kernel call over all rows; work that reduces over rows into a per-example result
(weight gradients, PowerNorm statistics) loops over the batch inside the callback.

Notes
-----
- CPU only: the callbacks run on the host, so arrays on a GPU would be copied; normax has no GPU
  backend yet.
- The callbacks are opaque to XLA: no fusion across them, and ``jax.jvp`` (forward mode) is not
  available (``custom_vjp`` defines reverse mode only), nor are second derivatives (differentiating
  a backward reaches a callback: JAX raises "Pure callbacks do not support JVP").
- dtypes: float32, float64 (with ``jax_enable_x64``), float16 and bfloat16 (computed in float32
  inside the kernels).

This module imports jax; ``import normax`` alone does not.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _cross_entropy, _norms, _power_norm, _softmax, _stablemax
from ._jax_vocab_parallel import vocab_parallel_cross_entropy
from ._options import ce_options

__all__ = [
    "PowerNormState",
    "cross_entropy",
    "layer_norm",
    "log_softmax",
    "log_stablemax",
    "logsumexp",
    "power_norm",
    "power_norm_init",
    "rms_norm",
    "softmax",
    "stablemax",
    "vocab_parallel_cross_entropy",
]


# ---------------------------------------------------------------------------------------------
# Callbacks and their batching


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _call(impl, specs, args, base_ndims, row_args, vmap_method="expand_dims"):
    """``pure_callback`` of ``impl`` (NumPy arrays in, a tuple of arrays out) with explicit batching.

    Under vmap each argument arrives with extra leading dimensions (size 1 when not batched). If
    only the `row_args` are batched and every output is a row output (its leading dimensions are
    the rows'), they are broadcast to the batch shape and `impl` runs once; otherwise (`row_args`
    None, or a parameter batched) it runs once per batch element and the results are stacked.

    `impl` must be the same object for the same computation (see :func:`_bind`): JAX caches the
    compiled callback by its identity, and a fresh closure per call would recompile every eager call.
    """
    present = tuple(i for i, a in enumerate(args) if a is not None)
    key = tuple((tuple(s.shape), jnp.dtype(s.dtype)) for s in specs)
    host = _host(impl, key, tuple(base_ndims), row_args, present, len(args))
    return jax.pure_callback(host, tuple(specs), *[args[i] for i in present], vmap_method=vmap_method)


@functools.cache
def _bind(fn, **static):
    """``fn`` with static keyword arguments, one object per distinct value (a stable callback)."""
    return functools.partial(fn, **static)


@functools.cache
def _host(impl, spec_key, base_ndims, row_args, present, nargs):
    specs = [_spec(shape, dtype) for shape, dtype in spec_key]

    def host(*arrays):
        full = [None] * nargs
        for i, a in zip(present, arrays):
            full[i] = np.asarray(a)
        extra = {i: full[i].ndim - base_ndims[i] for i in present}
        if not any(extra.values()):
            return _outputs(impl(*full), specs)
        batch = np.broadcast_shapes(*(full[i].shape[: extra[i]] for i in present))
        params_batched = any(
            any(s != 1 for s in full[i].shape[: extra[i]]) for i in present if i not in (row_args or ())
        )
        if row_args is not None and not params_batched:
            call = list(full)
            for i in present:
                if i in row_args:
                    call[i] = np.broadcast_to(full[i], batch + full[i].shape[extra[i] :])
                else:
                    call[i] = full[i].reshape(full[i].shape[extra[i] :])
            return _outputs(impl(*call), [_spec(batch + s.shape, s.dtype) for s in specs])
        results = []
        for idx in np.ndindex(*batch):
            one = list(full)
            for i in present:
                e = extra[i]
                sub = tuple(0 if full[i].shape[k] == 1 else idx[len(batch) - e + k] for k in range(e))
                one[i] = full[i][sub]
            results.append(_outputs(impl(*one), specs))
        return tuple(
            np.stack([r[k] for r in results]).reshape(batch + tuple(specs[k].shape))
            for k in range(len(specs))
        )

    return host


def _outputs(result, specs):
    result = result if isinstance(result, tuple) else (result,)
    out = []
    for r, s in zip(result, specs):
        r = np.asarray(r, dtype=s.dtype)
        if r.shape != tuple(s.shape):  # a batched call: the spec's shape has the batch in front
            r = r.reshape(s.shape)
        out.append(r)
    return tuple(out)


def _neg_axes(axis, ndim: int, fname: str) -> tuple[int, ...]:
    """Axes as sorted negative ints (so a vmapped call's leading batch dimensions don't move them)."""
    if axis is None:
        return tuple(range(-ndim, 0))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"{fname}: axis {axis!r} is out of range for a {ndim}-d array")
        out.append(a % ndim - ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fname}: axis {axis!r} repeats an axis")
    return tuple(sorted(out))


def _is_complex(x) -> bool:
    return x is not None and jnp.iscomplexobj(x)


def _floating(x, fname):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        # Casting would drop the imaginary part: a silent wrong answer.
        raise TypeError(f"{fname}: complex input ({x.dtype}) is not supported; normax's kernels are real")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax


def _row_map(fn, backward):
    """custom_vjp of a row-to-row map y = fn(x) whose backward takes (y, dy)."""

    def forward(x, axes):
        return _call(_bind(fn, axis=axes), [_spec(x.shape, x.dtype)], (x,), (x.ndim,), (0,))[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def op(x, axes):
        return forward(x, axes)

    def fwd(x, axes):
        y = forward(x, axes)
        return y, y

    def bwd(axes, y, dy):
        dy = dy.astype(y.dtype)
        spec = [_spec(y.shape, y.dtype)]
        return (_call(_bind(backward, axis=axes), spec, (y, dy), (y.ndim, y.ndim), (0, 1))[0],)

    op.defvjp(fwd, bwd)
    return op


_softmax_vjp = _row_map(_softmax.softmax, _softmax.softmax_backward)
_log_softmax_vjp = _row_map(_softmax.log_softmax, _softmax.log_softmax_backward)


def _map(op, x, axis, fname):
    x = _floating(x, fname)
    if x.ndim == 0:
        return op(x.reshape(1), (-1,)).reshape(())
    return op(x, _neg_axes(axis, x.ndim, fname))


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
    if where is not None or _is_complex(x):
        return jax.nn.softmax(jnp.asarray(x), axis, where)
    return _map(_softmax_vjp, x, axis, "normax.jax.softmax")


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
    if where is not None or _is_complex(x):
        return jax.nn.log_softmax(jnp.asarray(x), axis, where)
    return _map(_log_softmax_vjp, x, axis, "normax.jax.log_softmax")


# ---------------------------------------------------------------------------------------------
# stablemax, log_stablemax


def _stable_row_map(fn, backward):
    """custom_vjp of y = fn(x) whose backward takes (y, dy, x): StableMax's gradient needs x."""

    def forward(x, axes):
        return _call(_bind(fn, axis=axes), [_spec(x.shape, x.dtype)], (x,), (x.ndim,), (0,))[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def op(x, axes):
        return forward(x, axes)

    def fwd(x, axes):
        y = forward(x, axes)
        return y, (y, x)

    def bwd(axes, res, dy):
        y, x = res
        dy = dy.astype(y.dtype)
        spec = [_spec(y.shape, y.dtype)]
        n = y.ndim
        return (_call(_bind(backward, axis=axes), spec, (y, dy, x), (n, n, n), (0, 1, 2))[0],)

    op.defvjp(fwd, bwd)
    return op


_stablemax_vjp = _stable_row_map(_stablemax.stablemax, _stablemax.stablemax_backward)
_log_stablemax_vjp = _stable_row_map(_stablemax.log_stablemax, _stablemax.log_stablemax_backward)


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
    return _map(_stablemax_vjp, x, axis, "normax.jax.stablemax")


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
    return _map(_log_stablemax_vjp, x, axis, "normax.jax.log_stablemax")


# ---------------------------------------------------------------------------------------------
# logsumexp


def _lse_impl(a, b=None, *, axes):
    return _softmax.logsumexp(a, axis=axes, b=b, keepdims=True, return_sign=True)


def _lse_forward(a, b, axes):
    shape = tuple(1 if i - a.ndim in axes else s for i, s in enumerate(a.shape))
    specs = [_spec(shape, a.dtype), _spec(shape, a.dtype)]
    args = (a,) if b is None else (a, b)
    return _call(_bind(_lse_impl, axes=axes), specs, args, (a.ndim,) * len(args), tuple(range(len(args))))


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
    if where is not None or _is_complex(a) or _is_complex(b):
        b = None if b is None else jnp.asarray(b)
        return jax.nn.logsumexp(jnp.asarray(a), axis, b, keepdims, return_sign, where)
    a = _floating(a, fname)
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
    axes = (-1,) if squeeze else _neg_axes(axis, a.ndim, fname)
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


# ---------------------------------------------------------------------------------------------
# cross_entropy


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce_rows(logits, labels, weight, opts):
    return _ce_forward(logits, labels, weight, opts, False)[0]


def _ce_impl(x, t, w=None, *, opts, with_grad):
    axis, options, normalizer = opts
    kw = {"axis": axis, "weight": w, "normalizer": normalizer, **options._asdict()}
    if with_grad:
        return _cross_entropy.cross_entropy_with_grad(x, t, **kw)
    return (_cross_entropy.cross_entropy(x, t, **kw),)


def _ce_forward(logits, labels, weight, opts, with_grad):
    axis = opts[0]
    row_shape = tuple(s for i, s in enumerate(logits.shape) if i - logits.ndim != axis)
    specs = [_spec(row_shape, logits.dtype)]
    if with_grad:
        specs.append(_spec(logits.shape, logits.dtype))
    args = (logits, labels, weight)
    ndims = (logits.ndim, labels.ndim, 1)
    return _call(_bind(_ce_impl, opts=opts, with_grad=with_grad), specs, args, ndims, (0, 1))


def _ce_fwd(logits, labels, weight, opts):
    loss, dlogits = _ce_forward(logits, labels, weight, opts, True)
    return loss, dlogits


def _ce_bwd(opts, dlogits, g):
    # Each row's gradient is linear in that row's loss cotangent: scale the one the forward formed.
    return (dlogits * jnp.expand_dims(g, opts[0]).astype(dlogits.dtype), None, None)


_ce_rows.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy(
    logits,
    labels,
    *,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="none",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    normalizer="softmax",
):
    """Softmax cross-entropy, per example by default (``optax.softmax_cross_entropy_with_integer_labels``).

    Parameters
    ----------
    logits : array_like
        Scores; `axis` holds the classes.
    labels : array_like
        Integer class indices shaped like `logits` without `axis`, or class probabilities (floating,
        shaped like `logits`).
    axis : int, default -1
        The class axis.
    weight : array_like, optional
        (C,) class weights, as torch's.
    ignore_index : int, default -100
        Label whose examples get loss 0 and are left out of the mean.
    reduction : {"none", "mean", "sum"}, default "none"
        "mean" is torch's: the summed loss over the summed weight of the counted examples.
    label_smoothing, z_loss, softcap, normalizer
        As in :func:`normax.cross_entropy` (``normalizer="stablemax"``: the loss of
        ``log_stablemax``; its gradient comes from the same normax call).

    Returns
    -------
    jax.Array
        Per-example losses (shaped like `logits` without `axis`), or a scalar.

    Notes
    -----
    One normax call forms the per-example losses and their gradient with respect to `logits`
    (residual for the backward, which scales it by the incoming cotangent); the reduction is jnp
    code, so it batches correctly under vmap. No gradient flows to `labels` or `weight`.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))
    Array([1.3862944, 1.3862944], dtype=float32)
    """
    fname = "normax.jax.cross_entropy"
    options = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    _stablemax.check_normalizer(normalizer)
    logits = _floating(logits, fname)
    labels = jnp.asarray(labels)
    if _is_complex(labels) or _is_complex(weight):
        raise TypeError(f"{fname}: complex labels or weight are not supported")
    if logits.ndim == 0:
        raise ValueError(f"{fname}: logits must have a class axis")
    (ax,) = _neg_axes(axis, logits.ndim, fname)
    soft = jnp.issubdtype(labels.dtype, jnp.floating)
    if soft:
        labels = labels.astype(logits.dtype)
    if weight is not None:
        weight = jnp.asarray(weight).astype(logits.dtype)
    # The kernel returns per-example losses; the reduction is jnp code (it batches under vmap).
    rows = _ce_rows(logits, labels, weight, (ax, options._replace(reduction="none"), normalizer))
    if options.reduction == "none":
        return rows
    total = jnp.sum(rows)
    if options.reduction == "sum":
        return total
    if soft:
        return total / rows.size
    counted = labels != options.ignore_index
    if weight is None:
        denom = jnp.sum(counted).astype(rows.dtype)
    else:
        w = weight[jnp.where(counted, labels, 0)]
        denom = jnp.sum(jnp.where(counted, w, 0)).astype(rows.dtype)
    return total / denom


# ---------------------------------------------------------------------------------------------
# rms_norm, layer_norm


def _trailing(axis, ndim: int, fname: str) -> tuple[int, ...]:
    axes = _neg_axes(axis, ndim, fname)
    if axes != tuple(range(-len(axes), 0)):
        raise ValueError(f"{fname}: axis {axis!r} must name trailing axes (the normalized shape)")
    return axes


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _norm_vjp(x, weight, bias, opts):
    return _norm_forward(x, weight, bias, opts)


def _norm_fwd_impl(a, w=None, b=None, *, opts):
    kind, eps, axes = opts
    if kind == "rms":
        return _norms.rms_norm(a, w, eps=eps, axis=axes)
    return _norms.layer_norm(a, w, b, eps=eps, axis=axes)


def _norm_bwd_impl(g, a, w=None, b=None, *, opts):
    # The statistics are recomputed from x (one more read) rather than saved: JAX without x64
    # could only keep them in float32, too coarse for a saved mean when |mean| >> std.
    kind, eps, axes = opts
    if kind == "rms":
        dx, dw = _norms.rms_norm_backward(g, a, w, eps=eps, axis=axes)
        db = None
    else:
        dx, dw, db = _norms.layer_norm_backward(g, a, w, b, eps=eps, axis=axes)
    return (dx,) + tuple(d for d in (dw, db) if d is not None)


def _norm_forward(x, weight, bias, opts):
    k = len(opts[2])
    args = (x, weight, bias)
    return _call(_bind(_norm_fwd_impl, opts=opts), [_spec(x.shape, x.dtype)], args, (x.ndim, k, k), (0,))[0]


def _norm_fwd(x, weight, bias, opts):
    return _norm_forward(x, weight, bias, opts), (x, weight, bias)


def _norm_bwd(opts, saved, dy):
    x, weight, bias = saved
    k = len(opts[2])
    specs = [_spec(x.shape, x.dtype)]
    specs += [_spec(p.shape, p.dtype) for p in (weight, bias) if p is not None]
    # Without parameters the backward is row-wise; dweight/dbias sum over rows: one call per example.
    row_args = (0, 1) if weight is None and bias is None else None
    args = (dy.astype(x.dtype), x, weight, bias)
    out = _call(_bind(_norm_bwd_impl, opts=opts), specs, args, (x.ndim, x.ndim, k, k), row_args)
    dx, rest = out[0], list(out[1:])
    dw = rest.pop(0) if weight is not None else None
    db = rest.pop(0) if bias is not None else None
    return dx, dw, db


_norm_vjp.defvjp(_norm_fwd, _norm_bwd)


def _norm(kind, fname, x, weight, bias, eps, axis):
    x = _floating(x, fname)
    axes = _trailing(axis, x.ndim, fname)
    shape = x.shape[x.ndim - len(axes) :]
    params = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            if _is_complex(p):
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


# ---------------------------------------------------------------------------------------------
# PowerNorm


class PowerNormState(NamedTuple):
    """A PowerNorm layer's buffers, as a pytree: ``running_phi`` and ``ema_gz`` (C,), ``iters`` ()."""

    running_phi: jax.Array
    ema_gz: jax.Array
    iters: jax.Array


def power_norm_init(num_features, dtype=jnp.float32) -> PowerNormState:
    """The initial state: running_phi ones, ema_gz zeros, iters 0 (as MaskPowerNorm's buffers)."""
    return PowerNormState(
        jnp.ones((num_features,), dtype), jnp.zeros((num_features,), dtype), jnp.zeros((), jnp.int32)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _power_norm_vjp(x, weight, bias, ema_gz, running_phi, iters, pad_mask, opts):
    return _power_norm_forward(x, weight, bias, running_phi, iters, pad_mask, opts)[:3]


def _scale_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _power_norm_fwd_impl(a, w, b, phi, it, pad=None, *, opts):
    training, eps, alpha_fwd, alpha_bkw, warmup_iters, group_num = opts
    state = _power_norm.forward_state(
        np.array(phi, np.float64),
        int(it),
        eps=eps,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        group_num=group_num,
    )
    y, saved = _power_norm.power_norm(a, w, b, state, training=training, pad_mask=pad, return_saved=True)
    return y, state.running_phi, np.asarray(state.iters), saved.zscale, saved.dscale


def _power_norm_bwd_impl(g, a, w, ema, zs, ds, *, opts):
    training, eps, _, alpha_bkw, _, group_num = opts
    before = np.array(ema, np.float64)
    state = _power_norm.backward_state(before.copy(), eps=eps, alpha_bkw=alpha_bkw, group_num=group_num)
    saved = _power_norm.power_norm_saved(a, w, True, zs, ds, training=training, eps=eps, group_num=group_num)
    dx, dw, db = _power_norm.power_norm_backward(g, saved, state)
    return dx, dw, db, state.ema_gz - before


def _power_norm_forward(x, weight, bias, running_phi, iters, pad_mask, opts):
    c = x.shape[-1]
    sd = _scale_dtype()
    specs = [
        _spec(x.shape, x.dtype),
        _spec(running_phi.shape, running_phi.dtype),
        _spec(iters.shape, iters.dtype),
        _spec((c,), sd),
        _spec((c,), sd),
    ]
    args = (x, weight, bias, running_phi, iters, pad_mask)
    ndims = (x.ndim, 1, 1, 1, 0, None if pad_mask is None else pad_mask.ndim)
    # Batch statistics: a vmapped call is one PowerNorm call per batch element.
    return _call(_bind(_power_norm_fwd_impl, opts=opts), specs, args, ndims, None, vmap_method="sequential")


def _power_norm_fwd(x, weight, bias, ema_gz, running_phi, iters, pad_mask, opts):
    y, phi, it, zscale, dscale = _power_norm_forward(x, weight, bias, running_phi, iters, pad_mask, opts)
    return (y, phi, it), (x, weight, ema_gz, zscale, dscale)


def _power_norm_bwd(opts, saved, cts):
    x, weight, ema_gz, zscale, dscale = saved
    specs = [
        _spec(x.shape, x.dtype),
        _spec(weight.shape, weight.dtype),
        _spec(weight.shape, weight.dtype),
        _spec(ema_gz.shape, ema_gz.dtype),
    ]
    args = (cts[0].astype(x.dtype), x, weight, ema_gz, zscale, dscale)
    impl = _bind(_power_norm_bwd_impl, opts=opts)
    dx, dw, db, dema = _call(impl, specs, args, (x.ndim, x.ndim, 1, 1, 1, 1), None, vmap_method="sequential")
    return dx, dw, db, dema, None, None, None


_power_norm_vjp.defvjp(_power_norm_fwd, _power_norm_bwd)


def power_norm(
    x,
    weight,
    bias,
    state: PowerNormState,
    *,
    training=True,
    pad_mask=None,
    eps=1e-5,
    alpha_fwd=0.9,
    alpha_bkw=0.9,
    warmup_iters=10000,
    group_num=1,
):
    """PowerNorm (Shen et al. 2020, MaskPowerNorm) as a pure function of explicit state.

    Parameters
    ----------
    x : array_like
        (T, B, C) or (N, C), channels last.
    weight, bias : array_like
        (C,) affine parameters.
    state : PowerNormState
        From :func:`power_norm_init` or a previous call.
    training : bool, default True
        Batch statistics and a state update, or the running statistics.
    pad_mask : array_like of bool, optional
        (B, T) for (T, B, C) input ((N, 1) for (N, C)); True marks padding.
    eps, alpha_fwd, alpha_bkw, warmup_iters, group_num
        As MaskPowerNorm's constructor (see :class:`normax.PowerNormState`).

    Returns
    -------
    y : jax.Array
        Shaped like `x`.
    new_state : PowerNormState
        With the forward's updates (``running_phi``, ``iters``); ``ema_gz`` unchanged.

    Notes
    -----
    The paper's backward updates ``ema_gz``. A pure function cannot, so the update comes out as
    the gradient with respect to ``state.ema_gz``: differentiate with respect to it too and add
    that gradient to the state::

        def loss_fn(params, ema_gz, state, x):
            y, new_state = nj.power_norm(x, params["w"], params["b"], state._replace(ema_gz=ema_gz))
            return jnp.sum(y**2), new_state

        (loss, new_state), (g, d_ema) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
            params, state.ema_gz, state, x)
        state = new_state._replace(ema_gz=state.ema_gz + d_ema)

    Under vmap each batch element is its own PowerNorm call (its own batch statistics and state).
    """
    fname = "normax.jax.power_norm"
    x = _floating(x, fname)
    if x.ndim not in (2, 3):
        raise ValueError(f"{fname}: x must be (T, B, C) or (N, C), got shape {x.shape}")
    weight = jnp.asarray(weight).astype(x.dtype)
    bias = jnp.asarray(bias).astype(x.dtype)
    if pad_mask is not None:
        pad_mask = jnp.asarray(pad_mask).astype(bool)
    opts = (bool(training), float(eps), float(alpha_fwd), float(alpha_bkw), int(warmup_iters), int(group_num))
    y, phi, it = _power_norm_vjp(
        x, weight, bias, state.ema_gz, state.running_phi, jnp.asarray(state.iters), pad_mask, opts
    )
    return y, PowerNormState(phi, state.ema_gz, it)
