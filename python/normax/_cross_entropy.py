"""cross_entropy, linear_cross_entropy and their ``_with_grad`` forms: the NumPy-first API."""

from __future__ import annotations

import numpy as np

from . import _core, _stablemax
from ._arrays import as_input, contiguous, is_int_dtype
from ._options import (
    ce_inputs,
    ce_options,
    ce_results,
    check_chunk_size,
    class_indices,
    grad_output_rows,
    index_error,
    linear_shapes,
    softcap_dtype,
)


def _cross_entropy(
    logits,
    target,
    axis,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    with_grad,
    grad_output=1.0,
    inplace=False,
    normalizer="softmax",
):
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    stable = _stablemax.check_normalizer(normalizer)
    ignore_index, reduction = opts.ignore_index, opts.reduction
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
    chain = None
    if stable:
        # StableMax: the softmax cross-entropy of phi = log s(x), in float64 (see _stablemax).
        work, chain = _stablemax.ce_logits(work, opts.softcap)
        opts = opts._replace(softcap=None)
        tk = tk.astype(np.float64) if soft else tk
        w = None if w is None else w.astype(np.float64)
    rows = work.size // classes
    loss = np.empty(rows if reduction == "none" else 1, work.dtype)

    grad = grad_rows = None
    grad_scalar = 0.0
    if with_grad:
        grad_rows, grad_scalar = grad_output_rows(grad_output, reduction, row_shape, work.dtype)
        # In place: `work` is either the caller's array itself (float32/float64, classes last,
        # contiguous) or already a private copy, written in place and copied back below.
        grad = work if inplace else np.empty_like(work)
    try:
        _core.cross_entropy(work, tk, w, loss, grad, grad_rows, grad_scalar, rows, classes, *opts)
    except IndexError:
        raise index_error(t, classes, ignore_index) from None
    if chain is not None and grad is not None:
        grad = (grad * chain).astype(x.dtype, copy=False)

    if grad is not None and not last:
        grad = np.moveaxis(grad, -1, ax)
    return ce_results(loss, grad, logits, inplace, reduction, row_shape, result_dtype)


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

    Returns
    -------
    loss : numpy scalar or ndarray
        A scalar of the logits' dtype for "mean" and "sum"; for "none", an array shaped like the
        logits without the class axis (a NumPy scalar for 1-d logits: one row, as every
        NumPy-first normax function returns 0-d results).

    Raises
    ------
    IndexError
        For a class index outside [0, C) that is not `ignore_index`, a uint64 index above
        2**63 - 1 included (it does not fit in int64: cast, ``2**64 - 100`` would wrap around onto
        ignore_index -100); the message names the value and its position.
    ValueError
        For a `target` or `weight` of the wrong shape, an empty class axis, `label_smoothing`
        outside [0, 1], a negative `z_loss`, a `softcap` that is not positive, an unknown
        `reduction` or `normalizer`, or `ignore_index` >= 0 with probability targets.
    TypeError
        For complex, string, object or bool targets or logits, a non-integer `axis`, or a
        `label_smoothing`, `z_loss` or `softcap` that is not a real number (a string such as
        ``'0.1'`` or a bool included).
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
    sign(x) * log1p(|x|)`` in float64 (``softmax(phi) = stablemax(x)``) and chains the gradient
    through ``phi'(x) = 1 / (1 + |x|)``: results are rounded once to the logits' dtype.

    Examples
    --------
    >>> import numpy as np, normax
    >>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> round(float(normax.cross_entropy(logits, np.array([0, 2]))), 6)
    0.669079
    >>> normax.cross_entropy(logits, np.array([0, -100]), reduction="none")
    array([0.23954477, 0.        ])
    """
    return _cross_entropy(
        logits,
        target,
        axis,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        False,
        normalizer=normalizer,
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
):
    """:func:`cross_entropy` and its gradient with respect to `logits`, fused.

    Parameters
    ----------
    logits, target, axis, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, normalizer
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
    times ``1 - (x / softcap)**2`` with a softcap. Rows left out by `ignore_index` get a zero
    gradient without being read (torch gives NaN there when such a row holds NaN or inf).

    Examples
    --------
    >>> import numpy as np, normax
    >>> loss, dlogits = normax.cross_entropy_with_grad(np.zeros((1, 4)), np.array([1]))
    >>> dlogits
    array([[ 0.25, -0.75,  0.25,  0.25]])
    """
    return _cross_entropy(
        logits,
        target,
        axis,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        True,
        grad_output,
        bool(inplace),
        normalizer,
    )


def _linear(
    hidden,
    weight,
    target,
    bias,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    with_grad,
    grad_output=1.0,
):
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    ignore_index, reduction = opts.ignore_index, opts.reduction
    h, h_dtype = as_input(hidden, "hidden")
    w, w_dtype = as_input(weight, "weight")
    b, b_dtype = as_input(bias, "bias") if bias is not None else (None, w_dtype)
    t = np.asarray(target)
    b_shape = None if b is None else b.shape
    n, hd, v = linear_shapes(h.shape, w.shape, b_shape, t.shape, is_int_dtype(t.dtype), t.dtype)
    work = softcap_dtype(opts.softcap, np.result_type(h.dtype, w.dtype))
    result_dtype = np.result_type(h_dtype, w_dtype, b_dtype)
    if b is not None:
        b = contiguous(b, work)
    chunk_size = check_chunk_size(chunk_size)
    h = contiguous(h, work)
    w = contiguous(w, work)
    tk = contiguous(class_indices(t))
    loss = np.empty(n if reduction == "none" else 1, work)
    dh = dw = db = grad_rows = None
    grad_scalar = 0.0
    if with_grad:
        grad_rows, grad_scalar = grad_output_rows(grad_output, reduction, (n,), work)
        dh = np.empty_like(h)
        dw = np.empty_like(w)
        db = np.empty(v, work) if b is not None else None
    try:
        _core.linear_cross_entropy(
            h, w, b, tk, loss, dh, dw, db, grad_rows, grad_scalar, n, hd, v, *opts, chunk_size
        )
    except IndexError:
        raise index_error(t, v, ignore_index) from None
    out = ce_results(loss, None, None, False, reduction, (n,), result_dtype)
    if not with_grad:
        return out

    def cast(a):
        return None if a is None else a.astype(result_dtype, copy=False)

    return out, cast(dh), cast(dw), cast(db)


def linear_cross_entropy(
    hidden,
    weight,
    target,
    *,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    chunk_size=None,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` without ever holding those N x V logits.

    Parameters
    ----------
    hidden : array_like
        (N, H) hidden states.
    weight : array_like
        (V, H) classifier weight, as ``torch.nn.Linear.weight``.
    target : array_like
        (N,) integer class indices.
    bias : array_like, optional
        (V,) classifier bias.
    ignore_index, reduction, label_smoothing, z_loss, softcap
        As in :func:`cross_entropy` (no class weights here).
    chunk_size : int, optional
        Most logits held at once, in elements (rows x vocabulary). None picks 2**24 (64 MiB of
        float32), or all of them when there are fewer. On CUDA arrays blocks are whole rows
        (a `chunk_size` below the vocabulary still holds one row) and None picks about an eighth
        of the rows (at least 2**20 elements): GEMMs of few rows would leave a GPU idle.

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`cross_entropy`: a scalar, or (N,) for ``reduction="none"``.

    Raises
    ------
    IndexError
        For a class index outside [0, V) that is not `ignore_index` (or a uint64 index that does
        not fit in int64), named with its position.
    ValueError
        For shapes that do not fit ((N, H), (V, H), (V,), (N,)), an empty vocabulary, a
        `chunk_size` below 1, or options as in :func:`cross_entropy`.
    TypeError
        For non-integer targets or unsupported dtypes.

    Notes
    -----
    Blocks of rows (and, when a block of whole rows would exceed `chunk_size`, blocks of the
    vocabulary) get their logits from a GEMM (the ``gemm`` crate); each row's log-sum-exp is
    combined across vocabulary blocks as a (mantissa, exponent) sum, so the result equals the
    one-block result to rounding. Equivalent to ``cross_entropy(hidden @ weight.T + bias,
    target, ...)``.

    Examples
    --------
    >>> import numpy as np, normax
    >>> hidden, weight = np.eye(2), np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> round(float(normax.linear_cross_entropy(hidden, weight, np.array([0, 1]))), 6)
    0.551445
    """
    return _linear(
        hidden,
        weight,
        target,
        bias,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        chunk_size,
        False,
    )


def linear_cross_entropy_with_grad(
    hidden,
    weight,
    target,
    *,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    chunk_size=None,
    grad_output=1.0,
):
    """:func:`linear_cross_entropy` and its gradients, still without the N x V logits.

    Parameters
    ----------
    hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size
        As in :func:`linear_cross_entropy`.
    grad_output : float or array_like, default 1.0
        The gradients are those of ``grad_output * loss``; an (N,)-broadcastable array with
        ``reduction="none"``.

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`linear_cross_entropy`.
    dhidden : ndarray
        (N, H).
    dweight : ndarray
        (V, H).
    dbias : ndarray or None
        (V,), or None when `bias` is None.

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
    logits are computed twice (once for the log-sum-exps, once for the gradients).

    Examples
    --------
    >>> import numpy as np, normax
    >>> loss, dh, dw, db = normax.linear_cross_entropy_with_grad(
    ...     np.ones((1, 2)), np.zeros((2, 2)), np.array([0]), bias=np.zeros(2))
    >>> db
    array([-0.5,  0.5])
    """
    return _linear(
        hidden,
        weight,
        target,
        bias,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        chunk_size,
        True,
        grad_output,
    )
