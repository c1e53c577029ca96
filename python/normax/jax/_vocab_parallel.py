"""Vocabulary-parallel cross-entropy for JAX: ``normax.jax.vocab_parallel_cross_entropy``.

For use inside ``jax.shard_map`` (or ``pmap``) with the class axis split over the mapped axis
``axis_name``: the ``normax_vocab_parallel_stats`` target reduces each row of the local shard to
a few numbers (normax._vocab_parallel's packed rows), ONE ``jax.lax.all_gather`` brings every
device's numbers to every device, and the ``normax_vocab_parallel_combine`` target folds them in
device order: the same per-example losses everywhere, and each row's global log-sum-exp.

The op is a ``jax.custom_jvp``: the ``normax_vocab_parallel_backward`` target gives the shard's
gradient of each row's loss from that log-sum-exp alone, and the tangent is ``psum`` over the
axis of ``sum(local_grad * dlogits_shard)``. Under shard_map (its varying-value typing) reverse
mode transposes that ``psum`` into no collective at all, so ``jax.grad`` costs the forward's one
all-gather and nothing more; ``jax.jvp`` pays one ``psum`` of a value per row. Under ``pmap``,
whose ``psum`` transposes to a ``psum``, gradients follow pmap's convention for collectives, as
the same loss written with jnp collectives would: every device's copy of the loss counts, so each
shard's gradient is the axis size times its gradient under shard_map.

The shard's first class, ``axis_index * V_local``, is a run-time value (shard_map traces one
program for every device), so the targets take it as a 0-d int32 operand, not an attribute.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _vocab_parallel as vocab_parallel
from .._options import ce_options
from . import _ffi
from ._args import token_weight_operand
from ._linear import reduce_rows

_STATS = "normax_vocab_parallel_stats"
_COMBINE = "normax_vocab_parallel_combine"
_BACKWARD = "normax_vocab_parallel_backward"


class _Config(NamedTuple):
    """The loss options as the targets' attributes (hashable: a static argument)."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float  # 0.0: none
    temperature: float

    def attrs(self) -> dict:
        return {
            "ignore_index": np.int64(self.ignore_index),
            "label_smoothing": np.float64(self.label_smoothing),
            "z_loss": np.float64(self.z_loss),
            "softcap": np.float64(self.softcap),
            "temperature": np.float64(self.temperature),
        }


def _options(ignore_index, label_smoothing, z_loss, softcap, temperature):
    return ce_options(int(ignore_index), "none", float(label_smoothing), float(z_loss), float(softcap) or None,
                      temperature=float(temperature))  # fmt: skip


def _weight(w):
    return w if w.size else None


@_ffi.host_impl(_STATS)
def _stats_host(x, t, w, start, **attrs):
    """(N, Vl) shard, (N,) global class ids, (V,) or (0,) weights, () first class -> (N, fields)."""
    return (vocab_parallel.stats(x, t, _weight(w), int(start), _options(**attrs)),)


@_ffi.host_impl(_COMBINE)
def _combine_host(gathered, t, w, *, shard_length, **attrs):
    """(world, N, fields) packed rows in device order -> (loss (N,), lse (N, 2)), the shards
    [k * shard_length, (k + 1) * shard_length)."""
    world = gathered.shape[0]
    packed = np.ascontiguousarray(gathered).reshape(world, -1)
    shards = [(k * int(shard_length), int(shard_length)) for k in range(world)]
    loss, lse, _ = vocab_parallel.combine(packed, shards, t, _weight(w), _options(**attrs))
    # hi is exact in the element type and lo small beside it: both keep their value in it.
    return loss, lse.astype(packed.dtype)


@_ffi.host_impl(_BACKWARD)
def _backward_host(x, t, w, lse, grad_output, start, *, classes, **attrs):
    """The shard's gradient of sum(grad_output * loss) (reduction "none": denominator 1)."""
    opts = _options(**attrs)
    return (vocab_parallel.backward(x, t, _weight(w), lse, 1.0, grad_output, int(start), int(classes), opts),)


def _forward(x, t, w, axis_name, cfg: _Config):
    """(loss, lse, start, V) of (N, Vl) shards: the stats, the one all-gather, the combine."""
    rows, length = x.shape
    start = (jax.lax.axis_index(axis_name) * length).astype(jnp.int32)
    fields = vocab_parallel.fields(_options(**cfg._asdict()))
    # Row-local work, but the combine's batch is not a leading dimension of its operands: a
    # vmapped call is one call per batch element.
    (packed,) = _ffi.call(
        _STATS,
        [jax.ShapeDtypeStruct((rows, fields), x.dtype)],
        *_varying((x, t, w, start), axis_name),
        vmap_method="sequential",
        **cfg.attrs(),
    )
    (packed,) = _varying((packed,), axis_name)
    gathered = jax.lax.all_gather(packed, axis_name)
    results = [jax.ShapeDtypeStruct((rows,), x.dtype), jax.ShapeDtypeStruct((rows, 2), x.dtype)]
    loss, lse = _ffi.call(
        _COMBINE,
        results,
        gathered,
        t,
        w,
        vmap_method="sequential",
        shard_length=np.int64(length),
        **cfg.attrs(),
    )
    return loss, lse, start, gathered.shape[0] * length


def _varying(arrays, axis_name):
    """`arrays` typed as varying over `axis_name` under shard_map's checks: an FFI call needs its
    operands to agree (the shard's logits and first class vary, labels and weights do not), and
    its results are typed invariant, which the shard's statistics and gradient are not. Without
    those checks (pmap, check_vma=False) the arrays are returned as they are."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    out = []
    for a in arrays:
        mat = getattr(jax.typeof(a), "manual_axis_type", None)
        missing = () if mat is None else tuple(n for n in names if n not in mat.varying)
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _rows(x, t, w, axis_name, cfg):
    return _forward(x, t, w, axis_name, cfg)[0]


@_rows.defjvp
def _rows_jvp(axis_name, cfg, primals, tangents):
    # Labels and class weights get no derivative (documented): their tangents are not read.
    x, t, w = primals
    loss, lse, start, classes = _forward(x, t, w, axis_name, cfg)
    ones = jnp.ones(loss.shape, x.dtype)
    (grad,) = _ffi.call(
        _BACKWARD,
        [jax.ShapeDtypeStruct(x.shape, x.dtype)],
        *_varying((x, t, w, lse, ones, start), axis_name),
        vmap_method="sequential",
        classes=np.int64(classes),
        **cfg.attrs(),
    )
    (grad,) = _varying((grad,), axis_name)
    return loss, jax.lax.psum(jnp.sum(grad * tangents[0], axis=-1), axis_name)


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
    temperature=1.0,
    token_weight=None,
):
    """Cross-entropy of logits whose class axis is split over the mapped axis `axis_name`.

    Call it inside ``jax.shard_map`` / ``pmap``: `logits_shard` (..., V_local) is this device's
    slice of the classes (device i holds classes [i * V_local, (i + 1) * V_local)), `labels` (...)
    the global integer class ids (the same on every device). Returns what
    :func:`normax.jax.cross_entropy` returns on the whole logits (per example by default), the same
    on every device; ``jax.grad`` gives each device the gradient of its own shard.

    Options (`weight`: all V class weights, `token_weight`: one per example, both the same on
    every device) are :func:`normax.jax.cross_entropy`'s; float16 and bfloat16 shards are
    computed in float32. The targets apply `temperature`; the token weights scale each
    example's loss (and so its gradient) in jnp, and the mean divides by the sum over counted
    examples of token weight times class weight.
    One ``jax.lax.all_gather`` of 3 values per row (5 with label smoothing) per forward; none in
    the backward under shard_map. The op is a ``jax.custom_jvp`` (``jax.jvp`` adds one ``psum``
    of a value per row; under ``pmap`` the gradient is the axis size times the shard's, pmap's
    convention for a loss computed with collectives); second derivatives are not available. No
    gradient flows to `labels`, `weight` or `token_weight`.
    """
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature=temperature)
    cfg = _Config(opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap or 0.0, opts.temperature)
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
    out_dtype = x.dtype
    work = jnp.float32 if x.dtype.itemsize < 4 else x.dtype
    if t.dtype not in (jnp.int32, jnp.int64):
        t = t.astype(jnp.int32)
    w = jnp.zeros((0,), work) if weight is None else jax.lax.stop_gradient(jnp.asarray(weight).astype(work))
    tw = token_weight_operand(token_weight, t.shape, work, "normax.jax.vocab_parallel_cross_entropy")
    rows = x.astype(work).reshape(-1, x.shape[-1])
    losses = _rows(rows, t.reshape(-1), w, axis_name, cfg)
    losses = losses * tw if tw.shape[0] else losses
    loss = reduce_rows(losses, t.reshape(-1), w, tw, opts.reduction, opts.ignore_index)
    return (loss.reshape(t.shape) if opts.reduction == "none" else loss).astype(out_dtype)
