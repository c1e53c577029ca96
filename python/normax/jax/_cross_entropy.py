"""cross_entropy on the ``normax_cross_entropy`` target: one call forms the per-example losses
(and, when differentiated, their gradient); the reduction is jnp code.

Autodiff is a ``jax.custom_jvp``: the tangent of a row's loss is ``sum(grad * dlogits)`` over its
classes, ``grad`` from the same target called with ``with_grad``. That gradient is itself a
``custom_jvp`` whose tangent is the jvp of a jnp reference of the gradient, so second derivatives
(``jax.hessian``) are exact too. Undifferentiated calls take the loss-only call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _cross_entropy as cpu
from .._options import ce_options, target_kind
from .._stablemax import check_normalizer
from . import _ffi
from ._args import is_complex, neg_axes
from ._norms import inexact_dtypes

_TARGET = "normax_cross_entropy"


class _Config(NamedTuple):
    """The loss options as the target's attributes (hashable: a static argument)."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float  # 0.0: none
    stablemax: bool

    def attrs(self, with_grad: bool) -> dict:
        return {
            "ignore_index": np.int64(self.ignore_index),
            "label_smoothing": np.float64(self.label_smoothing),
            "z_loss": np.float64(self.z_loss),
            "softcap": np.float64(self.softcap),
            "stablemax": self.stablemax,
            "with_grad": with_grad,
        }


@_ffi.host_impl(_TARGET)
def _host(logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, stablemax, with_grad):
    """The target on NumPy arrays: (N, C) logits, (N,) class ids or (N, C) probabilities, (C,) or
    (0,) class weights; extra leading batch dimensions on all of them (a batched weight applies
    to its own batch element)."""
    opts = ce_options(
        int(ignore_index), "none", float(label_smoothing), float(z_loss), float(softcap) or None
    )
    batch = logits.shape[:-2]
    probs = (logits.shape[-1],) if target.dtype.kind == "f" else ()  # a probability row's shape

    def one(x, t, w):
        x2 = x.reshape(-1, x.shape[-1])
        r = cpu.checked_cross_entropy(
            x2, t.reshape((-1,) + probs), -1, w, opts, bool(stablemax), bool(with_grad)
        )
        return r if with_grad else (r,)

    shapes = (logits.shape[:-1], logits.shape)[: 1 + bool(with_grad)]
    if weight.shape[-1] == 0 or weight.ndim == 1:
        out = one(logits, target, weight if weight.shape[-1] else None)
        return tuple(np.asarray(a, logits.dtype).reshape(s) for a, s in zip(out, shapes))
    out = tuple(np.empty(s, logits.dtype) for s in shapes)
    for i in np.ndindex(*batch):
        for o, r in zip(out, one(logits[i], target[i], weight[i])):
            o[i] = r.reshape(o[i].shape)
    return out


def _call(logits, target, weight, cfg: _Config, with_grad: bool):
    results = [jax.ShapeDtypeStruct(logits.shape[:-1], logits.dtype)]
    if with_grad:
        results.append(jax.ShapeDtypeStruct(logits.shape, logits.dtype))
    return _ffi.call(_TARGET, results, logits, target, weight, **cfg.attrs(with_grad))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _loss_rows(logits, target, weight, cfg):
    return _call(logits, target, weight, cfg, False)[0]


@_loss_rows.defjvp
def _loss_rows_jvp(cfg, primals, tangents):
    # Labels and class weights get no derivative (documented): their tangents are not read.
    loss, grad = _loss_and_grad(*primals, cfg)
    return loss, jnp.sum(grad * tangents[0], axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _loss_and_grad(logits, target, weight, cfg):
    return _call(logits, target, weight, cfg, True)


@_loss_and_grad.defjvp
def _loss_and_grad_jvp(cfg, primals, tangents):
    logits, target, weight = primals
    dlogits = tangents[0]
    loss, grad = _loss_and_grad(logits, target, weight, cfg)
    _, dgrad = jax.jvp(lambda x: _reference_grad(x, target, weight, cfg), (logits,), (dlogits,))
    return (loss, grad), (jnp.sum(grad * dlogits, axis=-1), dgrad)


def _reference_rows(x, target, weight, cfg: _Config):
    """The per-row losses in jnp, (N, C) logits: the formula the kernels compute, differentiated
    only for the gradient's own tangent."""
    if cfg.softcap:
        x = cfg.softcap * jnp.tanh(x / cfg.softcap)
    if cfg.stablemax:
        # log s(x), written so that its derivative at 0 is 1 (sign(x) * log1p(|x|) would give 0).
        x = jnp.where(x >= 0, jnp.log1p(jnp.maximum(x, 0)), -jnp.log1p(jnp.maximum(-x, 0)))
    lse = jax.nn.logsumexp(x, axis=-1)
    logp = x - lse[:, None]
    w = weight if weight.shape[-1] else jnp.ones(x.shape[-1], x.dtype)
    eps = cfg.label_smoothing
    smooth = -jnp.sum(w * logp, axis=-1) / x.shape[-1]
    if jnp.issubdtype(target.dtype, jnp.floating):
        rows = (1 - eps) * -jnp.sum(w * target * logp, axis=-1) + eps * smooth
        counted = jnp.ones(rows.shape, bool)
    else:
        counted = target != cfg.ignore_index
        safe = jnp.where(counted, target, 0)
        nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0] * w[safe]
        rows = (1 - eps) * nll + eps * smooth
    return jnp.where(counted, rows + cfg.z_loss * lse * lse, 0)


def _reference_grad(x, target, weight, cfg):
    return jax.grad(lambda a: jnp.sum(_reference_rows(a, target, weight, cfg)))(x)


def _class_ids(labels):
    """Integer labels as int32 or int64, the target's class-id types."""
    if labels.dtype in (jnp.int32, jnp.int64):
        return labels
    wide = labels.dtype.itemsize >= 4  # uint32 and up: int64 where x64 allows it
    return labels.astype(jax.dtypes.canonicalize_dtype(jnp.int64) if wide else jnp.int32)


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
        Scores; `axis` holds the classes. Integer and boolean logits become floating as in
        jax.nn (float32, or float64 for 64-bit integers with x64); float16 and bfloat16 are
        computed in float32.
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
        ``log_stablemax``).

    Returns
    -------
    jax.Array
        Per-example losses (shaped like `logits` without `axis`), or a scalar; in the logits'
        (promoted) dtype.

    Raises
    ------
    ValueError, TypeError
        For bad options or shapes, when called. A class index outside [0, C) that is not
        `ignore_index` is found by the kernel: jax raises its error (``JaxRuntimeError``) naming
        the index, at the call or when the result is awaited.

    Notes
    -----
    The ``normax_cross_entropy`` XLA FFI target forms the per-example losses inside the compiled
    program (``jax.pure_callback`` of the NumPy implementation where jaxlib has no FFI). The op
    is a ``jax.custom_jvp``: each loss's tangent is ``sum(grad * dlogits)`` with ``grad`` from the
    same target called with the gradient, so ``jax.grad`` costs one fused call; that gradient's own
    tangent is the jvp of a jnp reference, so ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` work.
    The reduction is jnp code. Under ``jax.vmap`` the batch is extra rows of one call (a batched
    `weight` applies per batch element). No gradient flows to `labels` or `weight`.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))
    Array([1.3862944, 1.3862944], dtype=float32)
    """
    fname = "normax.jax.cross_entropy"
    options = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    stable = check_normalizer(normalizer)
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if is_complex(logits) or is_complex(labels) or is_complex(weight):
        raise TypeError(f"{fname}: complex logits, labels or weight are not supported")
    if logits.ndim == 0:
        raise ValueError(f"{fname}: logits must have a class axis")
    (ax,) = neg_axes(axis, logits.ndim, fname)
    classes = logits.shape[ax]
    if classes == 0:
        raise ValueError(f"{fname}: the class axis {ax} of logits is empty")
    kind = "i" if jnp.issubdtype(labels.dtype, jnp.integer) else "f"
    if labels.dtype == jnp.bool_:
        kind = "b"
    soft = target_kind(labels.shape, kind, labels.dtype, logits.shape, logits.ndim + ax)
    if soft and options.ignore_index >= 0:
        raise ValueError(f"{fname}: ignore_index is not supported with class-probability targets")
    out_dtype, work = inexact_dtypes(logits.dtype)
    x = jnp.moveaxis(logits.astype(work), ax, -1)
    row_shape = x.shape[:-1]
    x = x.reshape(-1, classes)
    if soft:
        t = jax.lax.stop_gradient(jnp.moveaxis(labels.astype(work), ax, -1).reshape(-1, classes))
    else:
        labels = _class_ids(labels)
        t = labels.reshape(-1)
    if weight is None:
        w = jnp.zeros((0,), work)  # absent
    else:
        w = jax.lax.stop_gradient(jnp.asarray(weight).astype(work))
        if w.shape != (classes,):
            raise ValueError(f"{fname}: weight has shape {w.shape}; expected ({classes},), one per class")
    cfg = _Config(
        options.ignore_index, options.label_smoothing, options.z_loss, options.softcap or 0.0, stable
    )
    rows = _loss_rows(x, t, w, cfg).reshape(row_shape)
    if options.reduction == "none":
        return rows.astype(out_dtype)
    total = jnp.sum(rows)
    if options.reduction == "sum":
        return total.astype(out_dtype)
    if soft:
        return (total / rows.size).astype(out_dtype)
    info = jnp.iinfo(labels.dtype)
    if info.min <= options.ignore_index <= info.max:
        counted = labels != options.ignore_index
    else:  # no label can equal it
        counted = jnp.ones(labels.shape, bool)
    if weight is None:
        denom = jnp.sum(counted).astype(work)
    else:
        denom = jnp.sum(jnp.where(counted, w[jnp.where(counted, labels, 0)], 0))
    return (total / denom).astype(out_dtype)
