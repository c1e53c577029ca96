"""vocab_parallel_linear_cross_entropy: :func:`normax.jax.linear_cross_entropy` inside
``jax.shard_map`` with the LM head's weight split over the vocabulary.

The forward runs the target ``normax_vocab_parallel_linear_stats`` on the local shard (see
normax/jax/_linear.py, which holds the targets' calls and host implementations), ONE
``jax.lax.all_gather`` of its packed rows, and the target ``normax_vocab_parallel_combine``
(shared with vocab_parallel_cross_entropy), which folds every device's rows in device order. The backward (``jax.custom_vjp``: a tangent rule would
need the logits) runs ``normax_vocab_parallel_linear_backward`` from each row's global
log-sum-exp and sums the shards' parts of the hidden states' gradient with one ``psum``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._options import ce_options, check_chunk_size
from . import _ffi
from ._args import token_weight_operand
from ._linear import (
    ce_attrs,
    class_weight_operand,
    linear_inputs,
    reduce_rows,
    spec,
    vp_backward,
    vp_stats,
)

_FNAME = "normax.jax.vocab_parallel_linear_cross_entropy"


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _vp_rows(h, w, b, t, cw, axis_name, config):
    return _vp_rows_fwd(h, w, b, t, cw, axis_name, config)[0]


def _vp_rows_fwd(h, w, b, t, cw, axis_name, config):
    opts, chunk = config
    rows, length = h.shape[0], w.shape[0]
    start = (jax.lax.axis_index(axis_name) * length).astype(jnp.int32)
    packed = vp_stats(h, w, b, t, cw, start, opts, chunk)
    gathered = jax.lax.all_gather(packed, axis_name)  # the forward's one collective
    results = [spec((rows,), h.dtype), spec((rows, 2), h.dtype)]
    # Folds the gathered rows in device order and checks the class ids: the same losses on every
    # device, typed so (invariant results). Its batch under vmap is not a leading dimension: one
    # call per batch element.
    loss, lse = _ffi.call(
        "normax_vocab_parallel_combine", results, gathered, t, cw, vmap_method="sequential",
        shard_length=np.int64(length), **ce_attrs(opts),
    )  # fmt: skip
    return loss, (h, w, b, t, cw, start, lse, gathered.shape[0] * length)


def _vp_rows_bwd(axis_name, config, res, g):
    opts, chunk = config
    h, w, b, t, cw, start, lse, classes = res
    dh, dw, db = vp_backward(h, w, b, t, cw, lse, g, start, classes, opts, chunk)
    # Each device holds its shard's part of d hidden: the sum is the gradient of the replicated
    # hidden states (the one collective of the backward, as a column-parallel layer's).
    # An absent bias (0,) is typed invariant under shard_map, its empty gradient varying: the
    # gradient must have the input's type.
    db = db if b.shape[0] else jnp.zeros_like(b)
    return jax.lax.psum(dh, axis_name), dw, db, None, None


_vp_rows.defvjp(_vp_rows_fwd, _vp_rows_bwd)


def vocab_parallel_linear_cross_entropy(
    hidden,
    linear_weight_shard,
    labels,
    axis_name,
    *,
    linear_bias_shard=None,
    weight=None,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    chunk_size=None,
    temperature=1.0,
    token_weight=None,
):
    """:func:`linear_cross_entropy` with the vocabulary split over the mapped axis `axis_name`.

    Call it inside ``jax.shard_map`` (the weight sharded on its first axis, e.g. ``in_specs=(P(),
    P("v", None), P())``): device i holds rows [i * V_local, (i + 1) * V_local) of the LM head.

    Parameters
    ----------
    hidden : array_like
        (..., H) hidden states, the same on every device.
    linear_weight_shard : array_like
        (V_local, H): this device's rows of the (V, H) weight.
    labels : array_like
        Global integer class ids shaped like `hidden` without its last axis, the same on every
        device.
    axis_name : hashable
        The mapped axis the vocabulary is split over.
    linear_bias_shard : array_like, optional
        (V_local,): this device's part of the bias.
    weight : array_like, optional
        All (V,) class weights, the same on every device.
    reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, temperature
        As in :func:`linear_cross_entropy` (`chunk_size` bounds the logits of the local shard
        held at once).
    token_weight : array_like, optional
        One weight per row, shaped like `labels`, the same on every device: it scales the row's
        loss and gradient (in jnp, after the kernels) and the mean divides by the sum over
        counted rows of token weight times class weight. No gradient flows to it.

    Returns
    -------
    jax.Array
        What :func:`linear_cross_entropy` returns for the whole weight, the same on every device.

    Notes
    -----
    The forward computes the local shard's statistics block by block (3 numbers per row, 5 with
    label smoothing), gathers them with ONE ``jax.lax.all_gather`` and folds them in device
    order (exactly, so every device gets the same loss), keeping each row's global
    log-sum-exp. The backward recomputes the shard's logits block by block from that
    log-sum-exp; it gives the weight and bias shards their own gradients and sums the shards'
    parts of the hidden states' gradient with one ``jax.lax.psum`` (the collective a
    column-parallel layer's backward makes anyway). A ``jax.custom_vjp``: no forward mode.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, normax.jax as nj
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(jax.devices()[:1], ("v",))
    >>> f = jax.shard_map(lambda h, w, t: nj.vocab_parallel_linear_cross_entropy(h, w, t, "v"),
    ...                   mesh=mesh, in_specs=(P(), P("v", None), P()), out_specs=P())
    >>> hidden, linear_weight = jnp.eye(2), jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> round(float(f(hidden, linear_weight, jnp.array([0, 1]))), 6)
    0.551445
    """
    fname = _FNAME
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature=temperature)
    chunk = check_chunk_size(chunk_size) or 0
    h, w, b, t, dtype = linear_inputs(
        hidden,
        linear_weight_shard,
        linear_bias_shard,
        labels,
        fname,
        "linear_weight_shard",
        "linear_bias_shard",
    )
    # Checked here, at trace time: a kernel error on one device before the all-gather would leave
    # the others waiting in it (XLA then aborts the process).
    classes = jax.lax.axis_size(axis_name) * w.shape[0]
    cw = class_weight_operand(weight, classes, h.dtype, fname)
    tw = token_weight_operand(token_weight, jnp.shape(hidden)[:-1], h.dtype, fname)
    losses = _vp_rows(h, w, b, t, cw, axis_name, (opts.replace(reduction="none"), chunk))
    losses = losses * tw if tw.shape[0] else losses
    loss = reduce_rows(losses, t, cw, tw, opts.reduction, opts.ignore_index)
    if opts.reduction == "none":
        loss = loss.reshape(jnp.shape(hidden)[:-1])
    return loss.astype(dtype)
