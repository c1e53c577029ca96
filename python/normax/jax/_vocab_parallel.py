"""Vocabulary-parallel cross-entropy for JAX: ``normax.jax.vocab_parallel_cross_entropy``.

For use inside ``jax.shard_map`` (or ``pmap``) with the class axis split over the mapped axis
``axis_name``: the normax kernels reduce each row of the local shard to a few numbers (see
python/normax/torch/_vocab_parallel.py and rust/normax-core/src/cross_entropy/shard.rs), ONE
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

from .. import _core
from .._options import CeOptions, ce_options


def _compute(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _as(a, dtype):
    return None if a is None else np.ascontiguousarray(np.asarray(a), dtype=dtype)


def _stats(x, t, w, start, *, opts: CeOptions):
    dt = _compute(x.dtype)
    rows, length = x.shape
    packed = np.empty((rows, _core.shard_fields(opts.label_smoothing)), dt)
    _core.shard_stats(
        _as(x, dt),
        _as(t, np.int64),
        _as(w, dt),
        packed,
        rows,
        int(start),
        length,
        opts.ignore_index,
        opts.label_smoothing,
        opts.softcap,
    )
    return packed


def _combine(gathered, t, w, *, opts: CeOptions, length: int):
    g = np.ascontiguousarray(gathered)
    world, rows = g.shape[0], g.shape[1]
    loss = np.empty(rows, g.dtype)
    lse = np.empty((rows, 2), np.float64)
    _core.shard_combine(
        g.reshape(world, -1),
        rows * g.shape[2],
        [k * length for k in range(world)],
        [length] * world,
        rows,
        _as(t, np.int64),
        _as(w, g.dtype),
        loss,
        lse,
        *opts,
    )
    # hi is exact in the element type and lo small beside it: both keep their value in it.
    return loss, lse.astype(g.dtype)


def _backward(x, t, w, start, lse, g, *, opts: CeOptions, classes: int):
    dt = _compute(x.dtype)
    rows, length = x.shape
    dx = np.empty((rows, length), dt)
    _core.shard_backward(
        _as(x, dt),
        _as(t, np.int64),
        _as(w, dt),
        _as(lse, np.float64),
        1.0,
        dx,
        _as(g, dt),
        0.0,
        rows,
        int(start),
        length,
        classes,
        *opts,
    )
    return dx.astype(x.dtype)


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
    dt = _compute(x.dtype)
    start = jax.lax.axis_index(axis_name) * length
    stats = functools.partial(_stats, opts=opts)
    packed = _callback(
        lambda x, t, start, w=None: stats(x, t, w, start),
        _spec((rows, _core.shard_fields(opts.label_smoothing)), dt),
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
    w = None if weight is None else jnp.asarray(weight, _compute(x.dtype))
    losses = _rows(x.reshape(-1, x.shape[-1]), t.reshape(-1), w, axis_name, opts).reshape(t.shape)
    if red == "none":
        return losses
    if red == "sum":
        return losses.sum()
    kept = t != ignore_index
    counted = jnp.where(kept, 1.0 if w is None else w[jnp.where(kept, t, 0)], 0.0)
    return losses.sum() / counted.sum().astype(losses.dtype)
