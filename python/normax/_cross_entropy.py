"""cross_entropy, linear_cross_entropy and their ``_with_grad`` forms: the NumPy-first API."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _core
from ._arrays import as_input, contiguous, scalar_0d
from ._ce_stats import mean_denominator, stats_buffers, stats_fields, z_loss_term
from ._options import (
    CeOptions,
    ce_inputs,
    ce_options,
    ce_results,
    ce_targets,
    check_chunk_size,
    class_indices,
    class_weights,
    grad_output_rows,
    index_error,
    linear_logits_shape,
    softcap_dtype,
    token_weights,
)
from ._stablemax import check_normalizer

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class CrossEntropyStats(NamedTuple):
    """Per-row metrics of a cross-entropy, from the same pass over the logits as the loss
    (``return_stats=True``). Metrics only: no gradient flows through them.

    Attributes
    ----------
    lse : array
        Per row (the per-row loss's shape): the log-sum-exp of the logits the loss uses (divided
        by the temperature, then softcapped; StableMax: of ``log s(x / T)``). float32 for
        float16, bfloat16 and float32 inputs, float64 for float64. 0 for ignored rows.
    entropy : array
        Per row: ``-sum p log p`` of that distribution, computed as ``sum_c p_c (lse - z_c)``
        (every term >= 0; a class of probability 0 adds 0, also at a logit of -inf). Dtype as
        `lse`. 0 for ignored rows.
    correct : array of bool
        Per row: the argmax over the class axis of the logits as given equals the target
        (``np.argmax`` ties: the first maximum, or the first NaN); for probability targets,
        the argmax of the target row. False for ignored rows.
    z_loss : scalar
        ``z_loss * sum_r token_weight[r] * lse_r**2`` over the rows not ignored, reduced as the
        loss (divided by the mean's denominator for "mean"); 0 when ``z_loss=0``.
    """

    lse: object
    entropy: object
    correct: object
    z_loss: object


def make_stats(lse, entropy, correct, row_shape, dtype, z_loss) -> CrossEntropyStats:
    """The public :class:`CrossEntropyStats` from the kernel's per-row buffers."""
    return CrossEntropyStats(*stats_fields(lse, entropy, correct, row_shape, dtype, z_loss))


def _fast_rows(logits, target, axis, weight, opts, grad_output, inplace: bool):
    """The common call straight to the kernel, or None: (rows, classes) contiguous float32/float64
    logits over their last axis, (rows,) int64 class indices, no or a matching class weight, a
    softcap the dtype holds. No conversion, no copy (about 10 µs less than the general path at
    training-step sizes)."""
    if not (
        type(logits) is np.ndarray
        and logits.ndim == 2
        and type(axis) is int
        and axis in (-1, 1)
        and logits.dtype in _FAST_DTYPES
        and logits.flags.carray  # C-contiguous, aligned, writeable (read-only input: the general path)
        and logits.dtype.isnative
        and logits.shape[1]
        and type(target) is np.ndarray
        and target.dtype == np.int64
        and target.shape == logits.shape[:1]
        and (
            weight is None
            or (type(weight) is np.ndarray and weight.dtype == logits.dtype and weight.shape == logits.shape[1:])
        )
        and (opts.softcap is None or softcap_dtype(opts.softcap, logits.dtype) == logits.dtype)
    ):
        return None
    rows, classes = logits.shape
    t = np.ascontiguousarray(target)
    w = None if weight is None else np.ascontiguousarray(weight)
    loss = np.empty(rows if opts.reduction == "none" else 1, logits.dtype)
    grad = None if grad_output is None else (logits if inplace else np.empty_like(logits))
    try:
        _core.cross_entropy(logits, t, w, opts, loss, grad, 1.0 if grad_output is None else grad_output)
    except IndexError:
        raise index_error(t, classes, opts.ignore_index) from None
    out = loss if opts.reduction == "none" else loss[0]
    return out if grad is None else (out, grad)


def checked_cross_entropy(
    logits,
    target,
    axis,
    weight,
    opts: CeOptions,
    stable: bool,
    with_grad: bool,
    grad_output=1.0,
    inplace=False,
    token_weight=None,
    return_stats=False,
):
    """The cross-entropy of options already checked (`opts` from ``ce_options``, `stable` from
    ``check_normalizer``): the route of the public functions and of the framework adapters.
    Returns as the public functions, with a :class:`CrossEntropyStats` last when `return_stats`."""
    if stable:  # StableMax: in the Rust row kernels (CeOptions.stablemax)
        opts = opts.replace(stablemax=True)
    plain = token_weight is None and not return_stats
    if plain and (not with_grad or type(grad_output) is float or type(grad_output) is int):
        fast = _fast_rows(logits, target, axis, weight, opts, float(grad_output) if with_grad else None, inplace)
        if fast is not None:
            return fast
    reduction = opts.reduction
    x, result_dtype, ax, t, soft, w = ce_inputs(logits, target, axis, weight, inplace)
    work_dtype = softcap_dtype(opts.softcap, x.dtype)
    if work_dtype != x.dtype:  # a cap float32 cannot hold: the loss is computed in float64
        x = x.astype(work_dtype)
        t = t.astype(work_dtype) if soft else t
        w = None if w is None else w.astype(work_dtype)
    shape = x.shape
    classes = shape[ax]
    row_shape = shape[:ax] + shape[ax + 1 :]

    # Classes last, rows contiguous: a view when the logits already are, else one copy.
    last = ax == x.ndim - 1
    work = contiguous(x if last else np.moveaxis(x, ax, -1))
    tk = contiguous(t if (last or not soft) else np.moveaxis(t, ax, -1))
    if not soft:
        tk = tk.astype(np.int64, copy=False)
    tw = token_weights(token_weight, row_shape, work.dtype)
    rows = work.size // classes
    loss = np.empty(rows if reduction == "none" else 1, work.dtype)
    stats = stats_buffers(rows, work.dtype) if return_stats else None

    grad = None
    go = 1.0
    if with_grad:
        go = grad_output_rows(grad_output, reduction, row_shape, work.dtype)
        # In place: `work` is either the caller's array itself (float32/float64, classes last,
        # contiguous) or already a private copy, written in place and copied back below.
        grad = work if inplace else np.empty_like(work)
    weights = w if tw is None else (w, tw)
    out = loss if stats is None else (loss, *stats)
    try:
        _core.cross_entropy(
            work.reshape(rows, classes), tk, weights, opts, out, None if grad is None else grad.reshape(rows, classes), go
        )
    except IndexError:
        raise index_error(t, classes, opts.ignore_index) from None

    if grad is not None and not last:
        grad = np.moveaxis(grad, -1, ax)
    results = ce_results(loss, grad, logits, inplace, reduction, row_shape, result_dtype)
    if stats is None:
        return results
    denom = 1.0
    if reduction == "mean" and opts.z_loss != 0.0:
        denom = mean_denominator(tk, soft, w, tw, opts.ignore_index, rows)
    z = z_loss_term(stats[0], tw, opts, denom)
    st = make_stats(*stats, row_shape, result_dtype, z)
    return (*results, st) if grad is not None else (results, st)


def cross_entropy(
    logits,
    target,
    *,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    normalizer="softmax",
    temperature=1.0,
    token_weight=None,
    return_stats=False,
):
    """Cross-entropy loss between `logits` and `target`, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    logits : array_like
        Unnormalized scores; `axis` holds the classes. float32 and float64 are computed as
        themselves; float16 and bfloat16 (ml_dtypes) in float32 with the loss in their dtype;
        integers and bool become float64.
    target : array_like
        Either integer class indices shaped like `logits` without the class axis (any integer
        dtype, ml_dtypes' ``int4`` included; compared as int64, as torch's), or class
        probabilities (a float array) shaped like `logits`.
    axis : int, default -1
        The class axis of `logits` (torch puts it at 1; NumPy-first, ours is last by default).
    weight : array_like, optional
        One weight per class, as torch's `weight`.
    ignore_index : int, default -100
        Class index whose rows are left out of the loss and of the mean's denominator (hard
        targets only; must be negative with probability targets, as in torch).
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides the summed loss by the summed weight of the rows not ignored (their
        number without `weight`; the number of rows for probability targets); "none" returns one
        loss per row.
    label_smoothing : float, default 0.0
        In [0, 1]: the target mixes with the uniform distribution, ``(1 - s) * target + s / C``,
        combined with `weight` exactly as torch does.
    z_loss : float, default 0.0
        PaLM's auxiliary loss: ``z_loss * lse**2`` is added to each row's loss (rows not ignored),
        lse being the row's log-sum-exp; with `weight` a row's loss is ``w[y] * ce + z_loss *
        lse**2`` and the mean still divides by the summed ``w[y]``.
    softcap : float, optional
        Gemma 2's cap: logits become ``softcap * tanh(logits / softcap)`` first. At least
        float64's smallest normal number (2.2e-308). float32 logits with a cap float32 cannot
        hold (>= 2**128 - 2**103, which float32 rounds to inf, or below its smallest normal,
        1.2e-38) are computed in float64 and the results rounded to float32: the float64
        ``softcap * tanh(x / softcap)`` reference, not NaN.
    normalizer : {"softmax", "stablemax"}, default "softmax"
        What turns the (softcapped) logits into probabilities: softmax, or StableMax (Prieto et
        al. 2025; :func:`normax.stablemax`), whose loss is ``-log_stablemax(x)[y]`` with every
        other option (weights, smoothing, probability targets, reductions) as for softmax and
        ``z_loss`` applied to ``log(sum(s(x)))``. Anything else raises ValueError.
    temperature : float, default 1.0
        The logits are divided by it before everything else (before `softcap`; StableMax:
        ``s(x / T)``); the gradient carries the ``1 / T``. Must be finite and > 0.
    token_weight : array_like, optional
        One weight per row, shaped like the per-row loss (the logits without the class axis),
        any real dtype: multiplies each row's loss (z-loss included) and its gradient. With
        ``reduction="mean"`` the divisor becomes the sum over the rows not ignored of
        ``token_weight * weight[target]`` (``sum(token_weight)`` for probability targets); a
        zero divisor gives NaN, as torch's weighted mean. Not differentiated (no gradient is
        computed for it).
    return_stats : bool, default False
        Also return a :class:`CrossEntropyStats` (per-row lse, entropy and argmax correctness,
        and the z-loss term), from the same pass over the logits. Metrics: no gradient flows
        through them.

    Returns
    -------
    loss : numpy scalar or ndarray
        A scalar of the logits' dtype for "mean" and "sum"; for "none", an array shaped like the
        logits without the class axis (a NumPy scalar for 1-d logits: one row, as every
        NumPy-first normax function returns 0-d results).
    stats : CrossEntropyStats
        Only with ``return_stats=True``: ``(loss, stats)`` is returned.

    Raises
    ------
    IndexError
        For a class index outside [0, C) that is not `ignore_index`, a uint64 index above
        2**63 - 1 included (it does not fit in int64: cast, ``2**64 - 100`` would wrap around onto
        ignore_index -100); the message names the value and its position.
    ValueError
        For a `target`, `weight` or `token_weight` of the wrong shape, an empty class axis,
        `label_smoothing` outside [0, 1], a negative `z_loss`, a `softcap` or `temperature` that
        is not positive and finite, an unknown `reduction` or `normalizer`, or `ignore_index` >= 0
        with probability targets.
    TypeError
        For complex, string, object or bool targets or logits, a non-integer `axis`, or a
        `label_smoothing`, `z_loss`, `softcap` or `temperature` that is not a real number (a
        string such as ``'0.1'`` or a bool included).
    numpy.exceptions.AxisError
        If `axis` is out of range.

    Notes
    -----
    Each row's log-sum-exp comes from the softmax family's machinery (two-pass or in-cache sums
    of exp(x) as mantissa/exponent pairs, exact float64 fallback for rows with NaN, inf or huge
    values), in float64 per row; losses add up in float64 in a fixed order, so the result does
    not depend on the thread count. Special values follow torch: a -inf logit off the target is
    fine, a -inf target logit gives +inf, a row with NaN or +inf (or nothing but -inf) gives NaN,
    and a mean over zero targets (every row ignored) is NaN.

    Softmax Collapse (Prieto et al. 2025): where the target's probability rounds to 1 (a margin
    above ~17 in float32), the peers' loss and target gradient are exactly 0 and learning stops.
    Here the loss is ``log1p(sum of the other classes' exp relative to the target)`` and the
    target's gradient entry ``-(sum of the other probabilities)`` (times its scale), both within
    a few ULP of the float64 value up to margins of ~87 in float32 (the exp range).

    ``normalizer="stablemax"`` computes the softmax cross-entropy of ``phi = log s(x) =
    sign(x) * log1p(|x|)`` (``softmax(phi) = stablemax(x)``) in the same Rust row passes. With
    class targets and no smoothing, softcap or statistics, the loss needs only ``sum(s(x))`` and
    ``s(x[y])``, and the gradient ``p * phi'(x)`` is ``m**2 / sum(s(x))`` with ``m = 1 / (1 -
    min(x, 0))``: one division per element, no log or exp. Other rows (and the other options)
    form phi in the logits' dtype on a SIMD log1p (float32: within 1 ULP of the correctly
    rounded value) and chain the gradient through ``phi'(x) = 1 / (1 + |x|) = exp(-|phi|)``.
    A dominant target keeps its loss either way: the other classes' sum is kept apart.

    Examples
    --------
    >>> import numpy as np, normax
    >>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> round(float(normax.cross_entropy(logits, np.array([0, 2]))), 6)
    0.669079
    >>> normax.cross_entropy(logits, np.array([0, -100]), reduction="none")
    array([0.23954477, 0.        ])
    >>> loss, stats = normax.cross_entropy(logits, np.array([0, 2]), return_stats=True)
    >>> stats.correct
    array([ True, False])
    """
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    stable = check_normalizer(normalizer)
    return checked_cross_entropy(
        logits, target, axis, weight, opts, stable, False, token_weight=token_weight, return_stats=bool(return_stats)
    )


def cross_entropy_with_grad(
    logits,
    target,
    *,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    grad_output=1.0,
    inplace=False,
    normalizer="softmax",
    temperature=1.0,
    token_weight=None,
    return_stats=False,
):
    """:func:`cross_entropy` and its gradient with respect to `logits`, fused.

    Parameters
    ----------
    logits, target, axis, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, normalizer
        As in :func:`cross_entropy`.
    temperature, token_weight, return_stats
        As in :func:`cross_entropy`.
    grad_output : float or array_like, default 1.0
        The gradient is that of ``grad_output * loss``. With ``reduction="none"`` it may be an
        array broadcasting to the per-row loss shape.
    inplace : bool, default False
        Write the gradient into `logits` (a writeable floating-point ndarray) and return it: no
        second logits-sized buffer when `logits` is float32/float64 with the class axis last and
        contiguous (otherwise the gradient is formed in one working copy and copied back).

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`cross_entropy`.
    dlogits : ndarray
        d(grad_output * loss)/d(logits), shaped like `logits` (`logits` itself with
        ``inplace=True``).
    stats : CrossEntropyStats
        Only with ``return_stats=True``: ``(loss, dlogits, stats)`` is returned.

    Raises
    ------
    IndexError, ValueError, TypeError, numpy.exceptions.AxisError
        As :func:`cross_entropy`; also ValueError for ``inplace=True`` on anything but a writeable
        floating-point ndarray, and for a `grad_output` that is not a number (reductions "mean"
        and "sum") or does not broadcast to the per-row loss. Nothing is written before the
        input is checked.

    Notes
    -----
    One read of each row builds its log-sum-exp, a second writes the gradient
    ``softmax(x) * A - w * (label_smoothing / C + (1 - label_smoothing) * t)`` (A collects the
    target weight, smoothing and ``2 * z_loss * lse``; t is the one-hot or probability target),
    times ``1 - (x / softcap)**2`` with a softcap, times ``token_weight / temperature`` (x being
    the logits divided by the temperature). Rows left out by `ignore_index` get a zero gradient
    without being read (torch gives NaN there when such a row holds NaN or inf).

    Examples
    --------
    >>> import numpy as np, normax
    >>> loss, dlogits = normax.cross_entropy_with_grad(np.zeros((1, 4)), np.array([1]))
    >>> dlogits
    array([[ 0.25, -0.75,  0.25,  0.25]])
    """
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    stable = check_normalizer(normalizer)
    return checked_cross_entropy(
        logits, target, axis, weight, opts, stable, True, grad_output, bool(inplace), token_weight, bool(return_stats)
    )


_DEFAULT_CHUNK = 2**24  # logits held at once by default: 64 MiB of float32


def _linear(
    hidden,
    linear_weight,
    target,
    linear_bias,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    with_grad,
    grad_output=1.0,
    temperature=1.0,
    token_weight=None,
    return_stats=False,
):
    h, h_dtype = as_input(hidden, "hidden")
    w, w_dtype = as_input(linear_weight, "linear_weight")
    b, b_dtype = as_input(linear_bias, "linear_bias") if linear_bias is not None else (None, w_dtype)
    logits_shape = linear_logits_shape(h.shape, w.shape, None if b is None else b.shape)
    batched = h.ndim == 2
    n = h.shape[0] if batched else 1
    classes, out_features = w.shape[0], w.shape[1:-1]
    # The logits' class axis: 1 for (N, H) hidden, 0 for (H,), as torch's reference.
    t, soft = ce_targets(target, logits_shape, int(batched), h.dtype)
    if soft and ignore_index is not None:
        raise ValueError("ignore_index: cannot be given with probability targets (as in torch)")
    # None: -100 for class indices, as torch's linear_cross_entropy.
    opts = ce_options(
        -100 if ignore_index is None else ignore_index, reduction, label_smoothing, z_loss, softcap, temperature
    )
    work = softcap_dtype(opts.softcap, np.result_type(h.dtype, w.dtype))
    result_dtype = np.result_type(h_dtype, w_dtype, b_dtype)
    chunk_size = check_chunk_size(chunk_size)
    cw = class_weights(weight, classes, work)
    row_shape = logits_shape[:1] + logits_shape[2:] if batched else ()
    h = contiguous(h.reshape(n, h.shape[-1]), work)
    w = contiguous(w.reshape(math.prod(w.shape[:-1]), w.shape[-1]), work)
    b = None if b is None else contiguous(b.reshape(-1), work)
    tw = token_weights(token_weight, row_shape, work)
    t = t if batched else t[None]
    if soft:
        t = t.astype(work, copy=False)
    fused = not soft and cw is None and not out_features
    run = _linear_fused if fused else _linear_blocks
    extra = (tw, bool(return_stats))
    loss, dh, dw, db, stats = run(h, w, b, t, cw, classes, opts, chunk_size, with_grad, grad_output, row_shape, work, extra)
    if opts.reduction == "none":
        out = scalar_0d(loss.reshape(row_shape).astype(result_dtype, copy=False))
    else:
        out = loss.astype(result_dtype)[()]
    if stats is not None:
        lse, ent, correct = stats
        denom = 1.0
        if opts.reduction == "mean" and opts.z_loss != 0.0:
            denom = mean_denominator(t, soft, cw, tw, opts.ignore_index, len(lse))
        stats = make_stats(lse, ent, correct, row_shape, result_dtype, z_loss_term(lse, tw, opts, denom))
    if not with_grad:
        return out if stats is None else (out, stats)

    def cast(a, shape):
        return None if a is None else a.astype(result_dtype, copy=False).reshape(shape)

    grads = cast(dh, np.shape(hidden)), cast(dw, np.shape(linear_weight)), cast(db, np.shape(linear_bias))
    return (out, *grads) if stats is None else (out, *grads, stats)


def _linear_fused(h, w, b, t, cw, classes, opts, chunk_size, with_grad, grad_output, row_shape, work, extra):
    # Class indices, (C, H) weight, no class weights: the Rust kernels (GEMMs and fused rows).
    tw, return_stats = extra
    n = h.shape[0]
    tk = contiguous(class_indices(t))
    loss = np.empty(n if opts.reduction == "none" else 1, work)
    stats = stats_buffers(n, work) if return_stats else None
    dh = dw = db = grads = None
    go = 1.0
    if with_grad:
        go = grad_output_rows(grad_output, opts.reduction, row_shape, work)
        dh = np.empty_like(h)
        dw = np.empty_like(w)
        db = np.empty(classes, work) if b is not None else None
        grads = (dh, dw, db)
    labels = tk if tw is None else (tk, tw)
    out = loss if stats is None else (loss, *stats)
    try:
        _core.linear_cross_entropy((h, w, b), labels, opts, chunk_size, out, grads, go)
    except IndexError:
        raise index_error(t, classes, opts.ignore_index) from None
    return (loss if opts.reduction == "none" else loss[0]), dh, dw, db, stats


def _linear_blocks(h, w, b, t, cw, classes, opts, chunk_size, with_grad, grad_output, row_shape, work, extra):
    # Class weights, probability targets or a K-dimensional loss: blocks of rows, each block's
    # logits from one GEMM and its loss (and gradient, in place) from the cross-entropy kernel.
    tw, return_stats = extra
    ignore_index, reduction = opts.ignore_index, opts.reduction
    n, v = h.shape[0], w.shape[0]
    soft = t.dtype.kind == "f"
    losses_shape = t.shape[:1] + t.shape[2:] if soft else t.shape  # (N, d1, ..., dK)
    if not soft:
        t = class_indices(t)
        bad = (t != ignore_index) & ((t < 0) | (t >= classes))
        if bad.any():
            raise index_error(t if row_shape else t[0], classes, ignore_index)
    # The mean's denominator is over all blocks, so it comes first: the summed class weight of
    # the kept targets (their number without weights), or the number of rows for probabilities.
    rows_total = t.size // classes if soft else t.size
    if reduction != "mean":
        denom = np.float64(1.0)
    else:
        denom = np.float64(mean_denominator(t, soft, cw, tw, ignore_index, rows_total))
    # Per-row token weights and statistics in the blocks' row layout (N, d1, ..., dK).
    tw_rows = None if tw is None else tw.reshape(losses_shape)
    stats = stats_buffers(rows_total, work) if return_stats else None
    stat_rows = None if stats is None else tuple(a.reshape(losses_shape) for a in stats)
    grad_rows = None
    if with_grad:
        go = grad_output_rows(grad_output, reduction, row_shape, work)
        with np.errstate(divide="ignore"):  # a mean over nothing: NaN loss, as torch
            grad_rows = go / denom if np.ndim(go) == 0 else go.reshape(losses_shape)
        dh = np.empty_like(h)
        dw = np.zeros_like(w)
        db = None if b is None else np.zeros(v, np.float64)
    rows = max(1, (chunk_size or _DEFAULT_CHUNK) // v)
    losses = np.empty(losses_shape, work)
    per_row = opts.replace(reduction="none")
    for r0 in range(0, n, rows):
        hb, tb = h[r0 : r0 + rows], t[r0 : r0 + rows]
        lg = hb @ w.T
        if b is not None:
            lg += b
        lg = lg.reshape((len(hb), classes) + losses.shape[1:])
        twb = None if tw_rows is None else tw_rows[r0 : r0 + rows]
        go = 1.0
        if with_grad:
            go = grad_rows if np.ndim(grad_rows) == 0 else grad_rows[r0 : r0 + rows]
        res = checked_cross_entropy(lg, tb, 1, cw, per_row, False, with_grad, go, with_grad, twb, return_stats)
        if return_stats:
            *res, st = res
            for dst, src in zip(stat_rows, st[:3]):
                dst[r0 : r0 + rows] = src
        if not with_grad:
            losses[r0 : r0 + rows] = res[0] if return_stats else res
            continue
        losses[r0 : r0 + rows], g = res
        g = g.reshape(len(hb), v)
        dh[r0 : r0 + rows] = g @ w
        dw += g.T @ hb
        if db is not None:
            db += g.sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = losses if reduction == "none" else losses.sum(dtype=np.float64) / denom
    if not with_grad:
        return loss, None, None, None, stats
    return loss, dh, dw, db, stats


def linear_cross_entropy(
    hidden,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    chunk_size=None,
    temperature=1.0,
    token_weight=None,
    return_stats=False,
):
    """Cross-entropy of ``hidden @ linear_weight.T + linear_bias`` without ever holding the logits.

    The semantics and parameter names of ``torch.nn.functional.linear_cross_entropy`` (torch 2.15).

    Parameters
    ----------
    hidden : array_like
        (N, H) hidden states, or (H,) for one sample.
    linear_weight : array_like
        (C, H) classifier weight, as ``torch.nn.Linear.weight``; or (C, d1, ..., dK, H) for a
        K-dimensional loss (batched `hidden` only): the logits are then (N, C, d1, ..., dK).
    target : array_like
        Integer class indices, shaped like the logits without the class axis ((N,), (N, d1, ...,
        dK), or () for one sample), or class probabilities (a float array) shaped like the logits.
    linear_bias : array_like, optional
        (C,) or (C, d1, ..., dK) bias of the logits.
    weight : array_like, optional
        (C,) class weights, as in :func:`cross_entropy`.
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :func:`cross_entropy`; "none" gives one loss per row (shaped like the class
        indices).
    ignore_index : int, optional
        Class index to leave out; None means -100 for class indices, as torch. Cannot be given
        with probability targets (ValueError; torch raises RuntimeError).
    label_smoothing, z_loss, softcap
        As in :func:`cross_entropy`.
    chunk_size : int, optional
        Most logits held at once, in elements (rows x classes). None picks 2**24 (64 MiB of
        float32), or all of them when there are fewer. On CUDA arrays blocks are whole rows
        (a `chunk_size` below the vocabulary still holds one row) and None picks blocks of at
        most 256 MiB of logits, whole multiples of 128 rows where they allow.
    temperature : float, default 1.0
        The logits (bias included) are divided by it first, as in :func:`cross_entropy`; on the
        CPU the division is folded into the GEMM's output scaling.
    token_weight : array_like, optional
        One weight per row (shaped like the per-row loss), as in :func:`cross_entropy`.
    return_stats : bool, default False
        Also return a :class:`CrossEntropyStats`, as in :func:`cross_entropy` (`correct`
        compares the argmax of the logits as the GEMM computes them).

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`cross_entropy`: a scalar, or one loss per row for ``reduction="none"``. On
        CUDA arrays float32 for float16/bfloat16 inputs (the kernels' float32 loss, unrounded).
    stats : CrossEntropyStats
        Only with ``return_stats=True``: ``(loss, stats)`` is returned.

    Raises
    ------
    IndexError
        For a class index outside [0, C) that is not `ignore_index` (or a uint64 index that does
        not fit in int64), named with its position.
    ValueError
        For shapes that do not fit, an empty class axis, a `chunk_size` below 1, `ignore_index`
        with probability targets, or options as in :func:`cross_entropy`.
    TypeError
        For unsupported dtypes.

    Notes
    -----
    Equivalent to torch's reference: ``cross_entropy(logits, target, ...)`` with the logits of
    ``hidden @ linear_weight.reshape(-1, H).T + linear_bias.reshape(-1)`` reshaped to (N, C,
    d1, ..., dK). Class indices with a (C, H) weight and no class weights run the fused kernels:
    blocks of rows (and, when a block of whole rows would exceed `chunk_size`, blocks of the
    vocabulary) get their logits from a GEMM (the ``gemm`` crate); each row's log-sum-exp is
    combined across vocabulary blocks as a (mantissa, exponent) sum, so the result equals the
    one-block result to rounding. Class weights, probability targets and K-dimensional losses
    take blocks of whole rows (NumPy's matmul, then :func:`cross_entropy_with_grad`'s kernel on
    each block); the mean's denominator is taken over all rows first.

    Examples
    --------
    >>> import numpy as np, normax
    >>> hidden, linear_weight = np.eye(2), np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> round(float(normax.linear_cross_entropy(hidden, linear_weight, np.array([0, 1]))), 6)
    0.551445
    """
    return _linear(
        hidden,
        linear_weight,
        target,
        linear_bias,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        chunk_size,
        False,
        temperature=temperature,
        token_weight=token_weight,
        return_stats=return_stats,
    )


def linear_cross_entropy_with_grad(
    hidden,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    chunk_size=None,
    grad_output=1.0,
    temperature=1.0,
    token_weight=None,
    return_stats=False,
):
    """:func:`linear_cross_entropy` and its gradients, still without the N x C logits.

    Parameters
    ----------
    hidden, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size
        As in :func:`linear_cross_entropy`.
    temperature, token_weight, return_stats
        As in :func:`linear_cross_entropy`.
    grad_output : float or array_like, default 1.0
        The gradients are those of ``grad_output * loss``; with ``reduction="none"`` an array
        broadcasting to the per-row loss.

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`linear_cross_entropy`.
    dhidden : ndarray
        Shaped like `hidden`.
    dlinear_weight : ndarray
        Shaped like `linear_weight`.
    dlinear_bias : ndarray or None
        Shaped like `linear_bias`, or None when `linear_bias` is None.
    stats : CrossEntropyStats
        Only with ``return_stats=True``: ``(loss, dhidden, dlinear_weight, dlinear_bias,
        stats)`` is returned.

    Raises
    ------
    IndexError, ValueError, TypeError
        As :func:`linear_cross_entropy`, and for a `grad_output` as in
        :func:`cross_entropy_with_grad`.

    Notes
    -----
    Each logits block becomes its gradient in place (the fused row kernel of
    :func:`cross_entropy_with_grad`), then feeds ``dhidden += G @ W`` and ``dweight += G.T @ hidden``
    (GEMMs) and the bias's column sums (float64). With one vocabulary block per row block that is
    three GEMMs in all, as for matmul + cross_entropy + backward; with vocabulary blocks the
    logits are computed twice (once for the log-sum-exps, once for the gradients). No gradient
    of the class weights or of probability targets (``normax.torch`` gives the targets' one).

    Examples
    --------
    >>> import numpy as np, normax
    >>> loss, dh, dw, db = normax.linear_cross_entropy_with_grad(
    ...     np.ones((1, 2)), np.zeros((2, 2)), np.array([0]), linear_bias=np.zeros(2))
    >>> db
    array([-0.5,  0.5])
    """
    return _linear(
        hidden,
        linear_weight,
        target,
        linear_bias,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        chunk_size,
        True,
        grad_output,
        temperature,
        token_weight,
        return_stats,
    )
