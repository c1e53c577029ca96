"""cross_entropy: one callback into :mod:`normax._cross_entropy` forms the per-example losses and
their gradient; the reduction is jnp code."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _cross_entropy as cpu
from .._options import ce_options
from .._stablemax import check_normalizer
from ._callback import bind, call, floating, is_complex, neg_axes, spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce_rows(logits, labels, weight, opts):
    return _ce_forward(logits, labels, weight, opts, False)[0]


def _ce_impl(x, t, w=None, *, opts, with_grad):
    axis, options, stable = opts
    r = cpu.checked_cross_entropy(x, t, axis, w, options, stable, with_grad)
    return r if with_grad else (r,)


def _ce_forward(logits, labels, weight, opts, with_grad):
    axis = opts[0]
    row_shape = tuple(s for i, s in enumerate(logits.shape) if i - logits.ndim != axis)
    specs = [spec(row_shape, logits.dtype)]
    if with_grad:
        specs.append(spec(logits.shape, logits.dtype))
    args = (logits, labels, weight)
    ndims = (logits.ndim, labels.ndim, 1)
    return call(bind(_ce_impl, opts=opts, with_grad=with_grad), specs, args, ndims, (0, 1))


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
    stable = check_normalizer(normalizer)
    logits = floating(logits, fname)
    labels = jnp.asarray(labels)
    if is_complex(labels) or is_complex(weight):
        raise TypeError(f"{fname}: complex labels or weight are not supported")
    if logits.ndim == 0:
        raise ValueError(f"{fname}: logits must have a class axis")
    (ax,) = neg_axes(axis, logits.ndim, fname)
    soft = jnp.issubdtype(labels.dtype, jnp.floating)
    if soft:
        labels = labels.astype(logits.dtype)
    if weight is not None:
        weight = jnp.asarray(weight).astype(logits.dtype)
    # The kernel returns per-example losses; the reduction is jnp code (it batches under vmap).
    rows = _ce_rows(logits, labels, weight, (ax, options.replace(reduction="none"), stable))
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
