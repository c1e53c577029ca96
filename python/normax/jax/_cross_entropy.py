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
from ._args import is_complex, neg_axes, stats_of, token_weight_operand
from ._norms import inexact_dtypes

_TARGET = "normax_cross_entropy"


class _Config(NamedTuple):
    """The loss options as the target's attributes (hashable: a static argument)."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float  # 0.0: none
    stablemax: bool
    temperature: float
    stats: bool  # the call also gives each row's lse, entropy and correct

    def attrs(self, with_grad: bool) -> dict:
        return {
            "ignore_index": np.int64(self.ignore_index),
            "label_smoothing": np.float64(self.label_smoothing),
            "z_loss": np.float64(self.z_loss),
            "softcap": np.float64(self.softcap),
            "stablemax": self.stablemax,
            "temperature": np.float64(self.temperature),
            "with_grad": with_grad,
            "with_stats": self.stats,
        }


@_ffi.host_impl(_TARGET)
def _host(logits, target, weight, token_weight, *, ignore_index, label_smoothing, z_loss, softcap,
          stablemax, temperature, with_grad, with_stats):  # fmt: skip
    """The target on NumPy arrays: (N, C) logits, (N,) class ids or (N, C) probabilities, (C,) or
    (0,) class weights, (N,) or (0,) token weights; extra leading batch dimensions on all of them
    (a batched class weight applies to its own batch element). Results: the losses, with
    `with_grad` their gradient, with `with_stats` each row's lse, entropy and correct."""
    opts = ce_options(int(ignore_index), "none", float(label_smoothing), float(z_loss),
                      float(softcap) or None, temperature=float(temperature))  # fmt: skip
    batch = logits.shape[:-2]
    probs = (logits.shape[-1],) if target.dtype.kind == "f" else ()  # a probability row's shape
    rows = logits.shape[:-1]

    def one(x, t, w, tw):
        x2 = x.reshape(-1, x.shape[-1])
        r = cpu.checked_cross_entropy(
            x2, t.reshape((-1,) + probs), -1, w, opts, bool(stablemax), bool(with_grad),
            token_weight=None if tw.shape[-1] == 0 else tw.reshape(-1), return_stats=bool(with_stats),
        )  # fmt: skip
        r = r if isinstance(r, tuple) else (r,)
        if not with_stats:
            return r
        *main, stats = r
        return (*main, stats.lse, stats.entropy, stats.correct)

    shapes = [(rows, logits.dtype)] + [(logits.shape, logits.dtype)] * bool(with_grad)
    shapes += [(rows, logits.dtype), (rows, logits.dtype), (rows, np.bool_)] * bool(with_stats)
    if weight.shape[-1] == 0 or weight.ndim == 1:
        out = one(logits, target, weight if weight.shape[-1] else None, token_weight)
        return tuple(np.asarray(a, d).reshape(s) for a, (s, d) in zip(out, shapes))
    out = tuple(np.empty(s, d) for s, d in shapes)
    tws = np.broadcast_to(token_weight, batch + token_weight.shape[-1:])
    for i in np.ndindex(*batch):
        for o, r in zip(out, one(logits[i], target[i], weight[i], tws[i])):
            o[i] = r.reshape(o[i].shape)
    return out


def _call(logits, target, weight, token_weight, cfg: _Config, with_grad: bool):
    """The target's results: the losses, with `with_grad` their gradient, then with ``cfg.stats``
    each row's lse, entropy and correct."""
    rows, dt = logits.shape[:-1], logits.dtype
    results = [jax.ShapeDtypeStruct(rows, dt)]
    if with_grad:
        results.append(jax.ShapeDtypeStruct(logits.shape, dt))
    if cfg.stats:
        results += [jax.ShapeDtypeStruct(rows, dt)] * 2 + [jax.ShapeDtypeStruct(rows, jnp.bool_)]
    return _ffi.call(_TARGET, results, logits, target, weight, token_weight, **cfg.attrs(with_grad))


def _stats_tangents(stats):
    """No derivative flows through the statistics (documented): zero tangents, float0 for bools."""
    lse, entropy, correct = stats
    return jnp.zeros_like(lse), jnp.zeros_like(entropy), np.zeros(correct.shape, jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _loss_rows(logits, target, weight, token_weight, cfg):
    """(losses,) or (losses, lse, entropy, correct) with ``cfg.stats``."""
    return _call(logits, target, weight, token_weight, cfg, False)


@_loss_rows.defjvp
def _loss_rows_jvp(cfg, primals, tangents):
    # Labels, class and token weights get no derivative (documented): their tangents are not read.
    loss, grad, *stats = _loss_and_grad(*primals, cfg)
    dloss = jnp.sum(grad * tangents[0], axis=-1)
    return (loss, *stats), (dloss, *(_stats_tangents(stats) if stats else ()))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _loss_and_grad(logits, target, weight, token_weight, cfg):
    return _call(logits, target, weight, token_weight, cfg, True)


@_loss_and_grad.defjvp
def _loss_and_grad_jvp(cfg, primals, tangents):
    logits, target, weight, token_weight = primals
    dlogits = tangents[0]
    loss, grad, *stats = _loss_and_grad(logits, target, weight, token_weight, cfg)

    def reference(x):
        return _reference_grad(x, target, weight, token_weight, cfg)

    _, dgrad = jax.jvp(reference, (logits,), (dlogits,))
    out = (loss, grad, *stats)
    return out, (jnp.sum(grad * dlogits, axis=-1), dgrad, *(_stats_tangents(stats) if stats else ()))


def _reference_rows(x, target, weight, token_weight, cfg: _Config):
    """The per-row losses in jnp, (N, C) logits: the formula the kernels compute, differentiated
    only for the gradient's own tangent."""
    x = x / cfg.temperature
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
    rows = jnp.where(counted, rows + cfg.z_loss * lse * lse, 0)
    return rows * token_weight if token_weight.shape[-1] else rows


def _reference_grad(x, target, weight, token_weight, cfg):
    return jax.grad(lambda a: jnp.sum(_reference_rows(a, target, weight, token_weight, cfg)))(x)


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
    temperature=1.0,
    token_weight=None,
    return_stats=False,
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
    temperature : float, default 1.0
        The logits are divided by it before everything else (before `softcap`); the gradient
        carries the 1/T. Finite and > 0.
    token_weight : array_like, optional
        One weight per example (shaped like `logits` without `axis`, any real dtype) multiplying
        its loss and gradient. The mean divides by the sum over counted examples of token weight
        times the class weight of the label (class probabilities: the sum of the token weights);
        a zero sum gives NaN. No derivative flows to it (as ``jax.lax.stop_gradient``).
    return_stats : bool, default False
        Also return :class:`normax.jax.CrossEntropyStats` from the same pass over the logits.

    Returns
    -------
    jax.Array
        Per-example losses (shaped like `logits` without `axis`), or a scalar; in the logits'
        (promoted) dtype.
    CrossEntropyStats
        With ``return_stats=True``: per example ``lse`` (the log-sum-exp of the tempered,
        capped logits) and ``entropy`` of their softmax (float32, float64 for float64 logits),
        ``correct`` (bool: the argmax of `logits` is the label; class probabilities: the
        argmax of the label row), each 0 / False where the label is `ignore_index`, and the
        scalar ``z_loss`` term (``z_loss * sum(token_weight * lse**2)``, over the mean's
        divisor for ``reduction="mean"``). Metrics: their tangents are zero.

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
    `weight` applies per batch element). No gradient flows to `labels`, `weight` or
    `token_weight`; the statistics come from the same call as the loss (and its gradient).

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> nj.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))
    Array([1.3862944, 1.3862944], dtype=float32)
    """
    fname = "normax.jax.cross_entropy"
    options = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature=temperature)
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
    tw = token_weight_operand(token_weight, row_shape, work, fname)
    cfg = _Config(
        options.ignore_index, options.label_smoothing, options.z_loss, options.softcap or 0.0, stable,
        options.temperature, bool(return_stats),
    )  # fmt: skip
    rows, *stats = _loss_rows(x, t, w, tw, cfg)
    rows = rows.reshape(row_shape)
    if options.reduction == "none":
        loss, denom = rows, None
    elif options.reduction == "sum":
        loss, denom = jnp.sum(rows), None
    else:
        denom = _mean_divisor(labels, w, tw, soft, options.ignore_index, rows.size, work)
        loss = jnp.sum(rows) / denom
    loss = loss.astype(out_dtype)
    if not return_stats:
        return loss
    lse, entropy, correct = (s.reshape(row_shape) for s in stats)
    return loss, stats_of(lse, entropy, correct, tw, options.z_loss, denom)


def _mean_divisor(labels, w, tw, soft: bool, ignore_index: int, rows: int, dtype):
    """torch's weighted mean's divisor: over counted rows, the sum of token weight times the class
    weight of the label (probability targets: the token weights' sum, or the row count)."""
    if soft:
        return jnp.sum(tw) if tw.shape[-1] else jnp.asarray(rows, dtype)
    flat = labels.reshape(-1)
    info = jnp.iinfo(flat.dtype)
    if info.min <= ignore_index <= info.max:
        counted = flat != ignore_index
    else:  # no label can equal it
        counted = jnp.ones(flat.shape, bool)
    per_row = counted.astype(dtype)
    if w.shape[-1]:
        per_row = jnp.where(counted, w[jnp.where(counted, flat, 0)], 0)
    if tw.shape[-1]:
        per_row = per_row * tw
    return jnp.sum(per_row)
