"""linear_cross_entropy (and the targets vocab_parallel_linear_cross_entropy shares): the
cross-entropy of ``hidden @ linear_weight.T + linear_bias`` without the (N, V) logits ever
existing in XLA.

A ``jax.custom_vjp``, not a ``custom_jvp``: a tangent rule would have to contract the logits'
softmax with the tangents of the hidden states and the weight, i.e. form the (N, V) logits the op
exists to avoid. Reverse mode (grad, value_and_grad, vjp) works; forward mode (jvp, jacfwd,
hessian) raises JAX's custom_vjp error.

Targets (normax/jax/_ffi.py; each also has its NumPy host implementation here, the fallback).
Absent operands are (0,); every operand may carry the same leading batch dims (vmap).

- ``normax_linear_cross_entropy``: hidden (N, H), weight (V, H), bias (V,), target (N,) int32 or
  int64, class weight (V,), token weight (N,); attributes ignore_index, label_smoothing, z_loss,
  softcap (0.0: none), temperature, stablemax (False), reduction, chunk_size (0: the kernels'
  choice), with_grad, with_stats; results the loss ((N,) for "none", else ()), with
  ``with_grad`` d hidden, d weight, d bias ((0,) without a bias), with ``with_stats`` each row's
  lse, entropy and correct (bool), in one pass over blocks of the logits
  (``normax.linear_cross_entropy_with_grad``). For the mean and sum, ``value_and_grad``'s forward
  makes this one call and the backward scales its gradients by the cotangent.
- ``normax_vocab_parallel_linear_stats``: hidden, weight shard (V_local, H), bias shard, target,
  class weight (all V), vocab_start (() int32: traced under shard_map, so an operand, not an
  attribute); attributes as above without reduction/with_grad/with_stats; result the packed row
  statistics (N, fields) (``normax._vocab_parallel.linear_stats``).
- ``normax_vocab_parallel_linear_backward``: hidden, weight shard, bias shard, target, class
  weight, lse (N, 2), denom (), grad_output (() or (N,)), vocab_start; attributes as above plus
  classes (V) and reduction; results d hidden (this shard's part), d weight shard, d bias shard
  (``normax._vocab_parallel.linear_backward``).

``linear_cross_entropy`` with ``reduction="none"`` backpropagates through the last two with the
whole vocabulary as one shard: a per-row cotangent cannot scale weight gradients already summed
over the rows, and their backward takes one cotangent per row (times the row's token weight: the
vocabulary-parallel targets take no token weights, which scale each row's loss and gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .. import _cross_entropy as cpu
from .. import _vocab_parallel as vocab_parallel
from .._options import ce_options, check_chunk_size
from . import _ffi
from ._args import stats_of, token_weight_operand

_FNAME = "normax.jax.linear_cross_entropy"


# -- Host implementations of the targets (the pure_callback route): NumPy arrays with the same
# operands, attributes and results as the FFI handlers. Absent operands are (0,)-shaped; every
# operand may carry the same leading batch dimensions (vmap), which loop here.


def present(a):
    return None if a.shape[-1] == 0 else a


def _softcap(value: float):
    return None if value == 0.0 else value


def _chunk(value: int):
    return None if value == 0 else int(value)


def _batched(base_ndim: int, fn, results, *arrays):
    """Run ``fn`` on each element of the leading batch dimensions of ``arrays`` (the first one's
    beyond its `base_ndim`), stacking the results: ``results`` gives each result's base ndim."""
    batch = arrays[0].shape[: arrays[0].ndim - base_ndim]
    if not batch:
        return fn(*arrays)
    arrays = [np.broadcast_to(a, batch + a.shape[len(batch) :]) for a in arrays]
    outs = [fn(*(a[idx] for a in arrays)) for idx in np.ndindex(*batch)]
    return tuple(np.stack([o[k] for o in outs]).reshape(batch + outs[0][k].shape) for k in range(results))


@_ffi.host_impl("normax_linear_cross_entropy")
def _linear_host(hidden, weight, bias, target, class_weight, token_weight, *, ignore_index, label_smoothing,
                 z_loss, softcap, temperature, stablemax, reduction, chunk_size, with_grad, with_stats):  # fmt: skip
    del stablemax  # always False: the linear loss is a softmax cross-entropy
    kwargs = {
        "reduction": str(reduction),
        "ignore_index": int(ignore_index),
        "label_smoothing": float(label_smoothing),
        "z_loss": float(z_loss),
        "softcap": _softcap(float(softcap)),
        "temperature": float(temperature),
        "chunk_size": _chunk(chunk_size),
        "return_stats": bool(with_stats),
    }

    def one(h, w, b, t, cw, tw):
        b, cw, tw = present(b), present(cw), present(tw)
        fn = cpu.linear_cross_entropy_with_grad if with_grad else cpu.linear_cross_entropy
        out = fn(h, w, t, linear_bias=b, weight=cw, token_weight=tw, **kwargs)
        out = list(out) if isinstance(out, tuple) else [out]
        if with_stats:
            stats = out.pop()
            out += [stats.lse, stats.entropy, stats.correct]
        if with_grad and out[3] is None:
            out[3] = np.empty(0, out[1].dtype)
        return [np.asarray(out[0]), *out[1:]]

    results = 1 + 3 * bool(with_grad) + 3 * bool(with_stats)
    return _batched(2, one, results, hidden, weight, bias, target, class_weight, token_weight)


def _vp_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature):
    return ce_options(int(ignore_index), str(reduction), float(label_smoothing), float(z_loss),
                      _softcap(float(softcap)), temperature=float(temperature))  # fmt: skip


@_ffi.host_impl("normax_vocab_parallel_linear_stats")
def _vp_stats_host(hidden, weight_shard, bias_shard, target, class_weight, vocab_start, *, ignore_index,
                   label_smoothing, z_loss, softcap, temperature, chunk_size):  # fmt: skip
    opts = _vp_options(ignore_index, "none", label_smoothing, z_loss, softcap, temperature)

    def one(h, w, b, t, cw, start):
        packed = np.empty((h.shape[0], vocab_parallel.fields(opts)), vocab_parallel.stats_dtype(h.dtype))
        vocab_parallel.linear_stats(h, w, present(b), t, present(cw), packed, int(start), opts,
                                    _chunk(chunk_size))  # fmt: skip
        return (packed,)

    return _batched(2, one, 1, hidden, weight_shard, bias_shard, target, class_weight, vocab_start)


@_ffi.host_impl("normax_vocab_parallel_linear_backward")
def _vp_backward_host(hidden, weight_shard, bias_shard, target, class_weight, lse, denom, grad_output,
                      vocab_start, *, classes, reduction, ignore_index, label_smoothing, z_loss, softcap,
                      temperature, chunk_size):  # fmt: skip
    opts = _vp_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)

    def one(h, w, b, t, cw, lse, denom, go, start):
        dh, dw, db = vocab_parallel.linear_backward(
            h, w, present(b), t, present(cw), lse, float(denom), go if go.ndim else float(go), int(start),
            int(classes), opts, _chunk(chunk_size),
        )  # fmt: skip
        return dh, dw, np.empty(0, dh.dtype) if db is None else db

    args = (hidden, weight_shard, bias_shard, target, class_weight, lse, denom, grad_output, vocab_start)
    return _batched(2, one, 3, *args)


# -- The traced side.


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _absent(dtype):
    return jnp.zeros((0,), dtype)


def _inexact(x, name: str, fname: str):
    """`x` as a real floating array: integers and booleans become jax's default float type, as in
    jax.nn (no mixing with a float in jnp.result_type, which strict promotion refuses)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{fname}: {name} is complex ({x.dtype}); normax's kernels are real")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jax.dtypes.canonicalize_dtype(np.float64))
    return x


def _compute_dtype(dtype):
    """float64 stays; float32, float16 and bfloat16 are computed in float32."""
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _labels(labels, shape, fname: str):
    t = jnp.asarray(labels)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"{fname}: labels must be integer class ids, got {t.dtype}")
    if t.shape != tuple(shape):
        raise ValueError(
            f"{fname}: labels have shape {t.shape}; expected {tuple(shape)} (hidden without its last axis)"
        )
    return t.reshape(-1) if t.dtype in (jnp.int32, jnp.int64) else t.reshape(-1).astype(jnp.int32)


def class_weight_operand(weight, classes: int, dtype, fname: str):
    if weight is None:
        return _absent(dtype)
    w = jnp.asarray(weight)
    if jnp.issubdtype(w.dtype, jnp.complexfloating):
        raise TypeError(f"{fname}: weight is complex ({w.dtype})")
    if w.shape != (classes,):
        raise ValueError(f"{fname}: weight has shape {w.shape}; expected ({classes},), one per class")
    return w.astype(dtype)


def ce_attrs(opts):
    """The loss options as the targets' attributes (softcap 0.0: none)."""
    return {
        "ignore_index": np.int64(opts.ignore_index),
        "label_smoothing": np.float64(opts.label_smoothing),
        "z_loss": np.float64(opts.z_loss),
        "softcap": np.float64(opts.softcap or 0.0),
        "temperature": np.float64(opts.temperature),
    }


def _linear_call(h, w, b, t, cw, tw, config, with_grad):
    """The loss, with `with_grad` d hidden, d weight, d bias, with stats each row's lse, entropy
    and correct."""
    opts, chunk, stats = config
    n, dt = h.shape[0], h.dtype
    results = [spec((n,) if opts.reduction == "none" else (), dt)]
    if with_grad:
        results += [spec(h.shape, dt), spec(w.shape, dt), spec(b.shape, dt)]
    if stats:
        results += [spec((n,), dt), spec((n,), dt), spec((n,), jnp.bool_)]
    return _ffi.call(
        "normax_linear_cross_entropy", results, h, w, b, t, cw, tw, **ce_attrs(opts), stablemax=False,
        reduction=opts.reduction, chunk_size=np.int64(chunk), with_grad=with_grad, with_stats=stats,
    )  # fmt: skip


def _varying(a, axes):
    """`a` typed varying over `axes` too (a no-op at run time)."""
    missing = axes - jax.typeof(a).manual_axis_type.varying
    return jax.lax.pcast(a, tuple(sorted(missing, key=str)), to="varying") if missing else a


def _manual_call(target, shapes, operands, **attrs):
    """:func:`_ffi.call` inside or outside ``shard_map``. Inside, an FFI call needs its operands
    typed varying over the same mesh axes (the replicated hidden states meet the weight shard)
    and its results typed so; the pure_callback route returns them invariant: cast back."""
    mats = [getattr(jax.typeof(a), "manual_axis_type", None) for a in operands]
    axes = frozenset().union(*(m.varying for m in mats if m is not None))
    if not axes:
        return _ffi.call(
            target, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes], *operands, **attrs
        )
    operands = [_varying(a, axes) for a in operands]
    aval = jax.typeof(operands[0])
    typed = {
        "sharding": NamedSharding(aval.sharding.mesh, PartitionSpec()),
        "manual_axis_type": aval.manual_axis_type,
    }
    results = [jax.ShapeDtypeStruct(shape, dtype, **typed) for shape, dtype in shapes]
    return tuple(_varying(r, axes) for r in _ffi.call(target, results, *operands, **attrs))


def vp_stats(h, w, b, t, cw, start, opts, chunk):
    """The packed row statistics of the shard [start, start + V_local) (`start`: () int32)."""
    (packed,) = _manual_call(
        "normax_vocab_parallel_linear_stats", [((h.shape[0], vocab_parallel.fields(opts)), h.dtype)],
        [h, w, b, t, cw, start], **ce_attrs(opts), chunk_size=np.int64(chunk),
    )  # fmt: skip
    return packed


def vp_backward(h, w, b, t, cw, lse, g, start, classes, opts, chunk):
    """(d hidden: this shard's part, d weight shard, d bias shard) of sum(g * per-row losses)."""
    dt = h.dtype
    return _manual_call(
        "normax_vocab_parallel_linear_backward", [(a.shape, dt) for a in (h, w, b)],
        [h, w, b, t, cw, lse.astype(dt), jnp.ones((), dt), g.astype(dt), start], classes=np.int64(classes),
        reduction="none", **ce_attrs(opts), chunk_size=np.int64(chunk),
    )  # fmt: skip


def mean_divisor(t, cw, tw, ignore_index):
    """torch's weighted mean's divisor: over the kept rows, token weight times the class weight
    of the label (absent weights: 1)."""
    kept = t != ignore_index
    counted = kept if cw.shape[0] == 0 else jnp.where(kept, cw[jnp.where(kept, t, 0)], 0)
    counted = counted.astype(tw.dtype)
    return jnp.sum(counted * tw if tw.shape[0] else counted)


def reduce_rows(rows, t, cw, tw, reduction, ignore_index):
    """The reduction of per-row losses (token weights already applied): torch's mean divides by
    :func:`mean_divisor`."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / mean_divisor(t, cw, tw, ignore_index).astype(total.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _linear_ce(h, w, b, t, cw, tw, config):
    """(loss,) or (loss, lse, entropy, correct) with stats (config: options, chunk, stats)."""
    return _linear_call(h, w, b, t, cw, tw, config, False)


def _linear_ce_fwd(h, w, b, t, cw, tw, config):
    if config[0].reduction == "none":
        return _linear_call(h, w, b, t, cw, tw, config, False), (h, w, b, t, cw, tw)
    loss, dh, dw, db, *stats = _linear_call(h, w, b, t, cw, tw, config, True)
    return (loss, *stats), (dh, dw, db)


def _linear_ce_bwd(config, res, g):
    opts, chunk, _ = config
    g = g[0]  # the statistics are metrics: their cotangents are not read (documented)
    if opts.reduction != "none":
        # A scalar loss: its gradients, formed by the forward's call, scale by the cotangent.
        return (*(d * g.astype(d.dtype) for d in res), None, None, None)
    # One cotangent per row cannot scale weight gradients already summed over the rows: the
    # vocabulary as one shard, whose statistics give each row's log-sum-exp (hi, lo) and whose
    # backward kernel takes per-row cotangents (times the row's token weight).
    h, w, b, t, cw, tw = res
    start = jnp.zeros((), jnp.int32)
    lse = vp_stats(h, w, b, t, cw, start, opts, chunk)[:, :2]
    g = g * tw if tw.shape[0] else g
    return (*vp_backward(h, w, b, t, cw, lse, g, start, w.shape[0], opts, chunk), None, None, None)


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)


def _check_linear(hidden, linear_weight, linear_bias, fname, weight_name, bias_name):
    if hidden.ndim < 1:
        raise ValueError(f"{fname}: hidden must have a feature axis, got shape {hidden.shape}")
    if linear_weight.ndim != 2 or linear_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{fname}: {weight_name} must have shape (V, {hidden.shape[-1]}) for hidden of shape "
            f"{hidden.shape}, got {linear_weight.shape}"
        )
    if linear_weight.shape[0] == 0:
        raise ValueError(f"{fname}: {weight_name} has no classes")
    if linear_bias is not None and linear_bias.shape != linear_weight.shape[:1]:
        raise ValueError(
            f"{fname}: {bias_name} must have shape ({linear_weight.shape[0]},), got {linear_bias.shape}"
        )


def linear_inputs(hidden, linear_weight, linear_bias, labels, fname, weight_name, bias_name):
    """The arrays as the targets take them: (rows, H) hidden, weight and bias (or the absent
    (0,)) in the compute dtype, flat labels; and the result dtype."""
    h = _inexact(hidden, "hidden", fname)
    w = _inexact(linear_weight, weight_name, fname)
    b = None if linear_bias is None else _inexact(linear_bias, bias_name, fname)
    _check_linear(h, w, b, fname, weight_name, bias_name)
    # Mixed float dtypes promote as jnp's matmul would (and are refused where it refuses them).
    dtype = jnp.result_type(h, w, *([] if b is None else [b]))
    dt = _compute_dtype(dtype)
    t = _labels(labels, h.shape[:-1], fname)
    h2 = h.reshape(-1, h.shape[-1]).astype(dt)
    b2 = _absent(dt) if b is None else b.astype(dt)
    return h2, w.astype(dt), b2, t, dtype


def linear_cross_entropy(
    hidden,
    linear_weight,
    labels,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    chunk_size=None,
    temperature=1.0,
    token_weight=None,
    return_stats=False,
):
    """Cross-entropy of ``hidden @ linear_weight.T + linear_bias`` without forming the logits.

    Parameters
    ----------
    hidden : array_like
        (..., H) hidden states (the LM head's input).
    linear_weight : array_like
        (V, H) classifier weight, as ``flax.linen.Dense``'s kernel transposed (torch's layout).
    labels : array_like
        Integer class ids shaped like `hidden` without its last axis.
    linear_bias : array_like, optional
        (V,) bias of the logits.
    weight : array_like, optional
        (V,) class weights, as torch's (no gradient flows to them).
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" is torch's: the summed loss over the summed class weight of the counted rows;
        "none" gives one loss per row, shaped like `labels`.
    ignore_index : int, default -100
        Label whose rows get loss 0 and are left out of the mean.
    label_smoothing, z_loss, softcap
        As in :func:`normax.jax.cross_entropy`.
    chunk_size : int, optional
        Most logits held at once, in elements; None lets the kernels choose (at most 2**24).
    temperature, token_weight, return_stats
        As in :func:`normax.jax.cross_entropy` (the bias is divided by `temperature` too;
        `token_weight` is shaped like `labels`).

    Returns
    -------
    jax.Array
        A scalar, or the per-row losses; in the promoted dtype of `hidden`, `linear_weight` and
        `linear_bias` (float16 and bfloat16 are computed in float32).
    CrossEntropyStats
        With ``return_stats=True``, as :func:`normax.jax.cross_entropy`'s (per row: shaped like
        `labels`), from the same pass over the logits blocks.

    Raises
    ------
    ValueError, TypeError
        For shapes that do not fit, or options as in :func:`normax.jax.cross_entropy`.
    jax.errors.JaxRuntimeError
        For a class id outside [0, V) other than `ignore_index` (the message names it), when
        the computation runs.

    Notes
    -----
    One kernel call (``normax.linear_cross_entropy_with_grad``'s: GEMMs over blocks of rows and,
    for large vocabularies, of classes, each block's log-sum-exps combined exactly) gives the
    loss and, under ``jax.grad`` / ``jax.value_and_grad``, the gradients with respect to
    `hidden`, `linear_weight` and `linear_bias` in the same pass; the backward only scales them
    by the cotangent. With ``reduction="none"`` the backward recomputes the logits block by block
    to weigh each row by its own cotangent. The compiled program holds no (N, V) buffer
    (``jax.jit(...).lower(...).compile().memory_analysis()`` shows it).

    A ``jax.custom_vjp``: forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``)
    is not available, since its tangent rule would need the logits. Under ``jax.vmap`` the
    batch goes to the kernel call as leading dimensions.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, normax.jax as nj
    >>> hidden, linear_weight = jnp.eye(2), jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> round(float(nj.linear_cross_entropy(hidden, linear_weight, jnp.array([0, 1]))), 6)
    0.551445
    >>> dh, dw = jax.grad(nj.linear_cross_entropy, argnums=(0, 1))(hidden, linear_weight, jnp.array([0, 1]))
    >>> dw.shape
    (3, 2)
    """
    fname = _FNAME
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature=temperature)
    chunk = check_chunk_size(chunk_size) or 0
    h, w, b, t, dtype = linear_inputs(
        hidden, linear_weight, linear_bias, labels, fname, "linear_weight", "linear_bias"
    )
    cw = class_weight_operand(weight, w.shape[0], h.dtype, fname)
    row_shape = jnp.shape(hidden)[:-1]
    tw = token_weight_operand(token_weight, row_shape, h.dtype, fname)
    loss, *stats = _linear_ce(h, w, b, t, cw, tw, (opts, chunk, bool(return_stats)))
    if opts.reduction == "none":
        loss = loss.reshape(row_shape)
    loss = loss.astype(dtype)
    if not return_stats:
        return loss
    denom = mean_divisor(t, cw, tw, opts.ignore_index) if opts.reduction == "mean" else None
    lse, entropy, correct = (s.reshape(row_shape) for s in stats)
    return loss, stats_of(lse, entropy, correct, tw, opts.z_loss, denom)
