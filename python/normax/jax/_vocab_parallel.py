"""Vocabulary-parallel cross-entropy for JAX: ``normax.jax.vocab_parallel_cross_entropy``.

For use inside ``jax.shard_map`` (or ``pmap``) with the class axis split over the mapped axis
``axis_name``: the normax kernels reduce each row of the local shard to a few numbers (see
normax._vocab_parallel, which owns the packed rows and the combine), ONE
``jax.lax.all_gather`` brings every device's numbers to every device, and each combines them in
device order: the same per-example losses everywhere. The backward (``jax.custom_vjp``) needs no
collective: the gradient of a shard needs only each row's global log-sum-exp, kept from the
forward. The kernels run as ``jax.pure_callback`` calls on the host, as the rest of normax.jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _vocab_parallel as vocab_parallel
from .._options import ce_options


def _combine(gathered, t, w, *, opts, length: int):
    world = gathered.shape[0]
    packed = np.ascontiguousarray(gathered).reshape(world, -1)
    shards = [(k * length, length) for k in range(world)]
    loss, lse, _ = vocab_parallel.combine(packed, shards, t, w, opts)
    # hi is exact in the element type and lo small beside it: both keep their value in it.
    return loss, lse.astype(packed.dtype)


def _backward(x, t, w, start, lse, g, *, opts, classes: int):
    # reduction "none" (the adapter reduces): one gradient per row, denominator 1.
    return vocab_parallel.backward(x, t, w, lse, 1.0, g, int(start), classes, opts).astype(x.dtype)


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _callback(fn, specs, *args):
    # Row-local host work with no collective inside: under vmap it may simply run per element.
    return jax.pure_callback(fn, specs, *args, vmap_method="sequential")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rows(x, t, w, axis_name, opts):
    return _rows_fwd(x, t, w, axis_name, opts)[0]


def _rows_fwd(x, t, w, axis_name, opts):
    rows, length = x.shape
    dt = vocab_parallel.stats_dtype(x.dtype)
    start = jax.lax.axis_index(axis_name) * length
    stats = functools.partial(vocab_parallel.stats, opts=opts)
    packed = _callback(
        lambda x, t, start, w=None: stats(x, t, w, int(start)),
        _spec((rows, vocab_parallel.fields(opts)), dt),
        x,
        t,
        start,
        *([] if w is None else [w]),
    )
    gathered = jax.lax.all_gather(packed, axis_name)
    world = gathered.shape[0]
    combine = functools.partial(_combine, opts=opts, length=length)
    loss, lse = _callback(
        lambda g, t, w=None: combine(g, t, w),
        (_spec((rows,), dt), _spec((rows, 2), dt)),
        gathered,
        t,
        *([] if w is None else [w]),
    )
    return loss.astype(x.dtype), (x, t, w, start, lse, world * length)


def _rows_bwd(axis_name, opts, res, g):
    x, t, w, start, lse, classes = res
    backward = functools.partial(_backward, opts=opts, classes=classes)
    dx = _callback(
        lambda x, t, start, lse, g, w=None: backward(x, t, w, start, lse, g),
        _spec(x.shape, x.dtype),
        x,
        t,
        start,
        lse,
        g,
        *([] if w is None else [w]),
    )
    return _varying(dx, axis_name), None, None


def _varying(y, axis_name):
    """`y` typed as varying over `axis_name`, as the shard it is the gradient of: under shard_map a
    callback's result is typed invariant, which custom_vjp rejects for a varying input."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    mat = getattr(jax.typeof(y), "manual_axis_type", None)
    if mat is None or not hasattr(jax.lax, "pcast"):
        return y
    missing = tuple(n for n in names if n not in mat.varying)
    return jax.lax.pcast(y, missing, to="varying") if missing else y


_rows.defvjp(_rows_fwd, _rows_bwd)


def vocab_parallel_cross_entropy(
    logits_shard,
    labels,
    axis_name,
    *,
    weight=None,
    ignore_index=-100,
    reduction="none",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
):
    """Cross-entropy of logits whose class axis is split over the mapped axis `axis_name`.

    Call it inside ``jax.shard_map`` / ``pmap``: `logits_shard` (..., V_local) is this device's
    slice of the classes (device i holds classes [i * V_local, (i + 1) * V_local)), `labels` (...)
    the global integer class ids (the same on every device). Returns what
    :func:`normax.jax.cross_entropy` returns on the whole logits (per example by default), the same
    on every device; ``jax.grad`` gives each device the gradient of its own shard.

    Options (`weight`: all V class weights, the same on every device) are
    :func:`normax.jax.cross_entropy`'s. One ``jax.lax.all_gather`` of 3 values per row (5 with
    label smoothing) per forward; none in the backward.
    """
    opts = ce_options(ignore_index, "none", label_smoothing, z_loss, softcap)
    red = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap).reduction
    x = jnp.asarray(logits_shard)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"logits_shard: expected a floating array with a class axis, got {x.dtype}{x.shape}")
    t = jnp.asarray(labels)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"labels: expected integer class ids, got {t.dtype}")
    if t.shape != x.shape[:-1]:
        raise ValueError(
            f"labels: shape {t.shape}; expected {x.shape[:-1]} (logits_shard without the class axis)"
        )
    w = None if weight is None else jnp.asarray(weight, vocab_parallel.stats_dtype(x.dtype))
    losses = _rows(x.reshape(-1, x.shape[-1]), t.reshape(-1), w, axis_name, opts).reshape(t.shape)
    if red == "none":
        return losses
    if red == "sum":
        return losses.sum()
    kept = t != ignore_index
    counted = jnp.where(kept, 1.0 if w is None else w[jnp.where(kept, t, 0)], 0.0)
    return losses.sum() / counted.sum().astype(losses.dtype)
