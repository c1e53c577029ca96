"""cross_entropy, linear_cross_entropy and their ``_with_grad`` forms in any array-API namespace,
for arrays normax cannot read on the CPU (see :mod:`normax._namespace_ops`, whose ``OPS`` lists
them).

``torch.nn.functional.cross_entropy``'s semantics from the plain formulas, in the logits' dtype
on their device: the log-probabilities ``z - logsumexp(z)`` (max-shifted) of the (softcapped)
logits z, or for ``normalizer="stablemax"`` of ``phi = sign(z) * log1p(|z|)`` with the gradient
chained by ``1 / (1 + |z|)``. Options are checked by the same helpers as the NumPy-first
functions, so argument errors are the same. Sums run in the logits' dtype (the kernels add up in
float64), and there is none of the kernels' care for Softmax Collapse. `temperature` and
`token_weight` as the kernels; ``return_stats=True`` raises NotImplementedError. The linear forms compute
all logits at once with the namespace's matmul (`chunk_size` is checked, not used).
"""

from __future__ import annotations

import math

import numpy as np
from array_api_compat import device as _device

from ._options import (
    ce_options,
    check_chunk_size,
    class_axis,
    linear_logits_shape,
    number,
    softcap_dtype,
    target_kind,
)
from ._stablemax import check_normalizer

_INT64_MAX = 2**63 - 1


def _as_array(xp, a, like):
    """`a` as an array of `like`'s namespace on its device (a NumPy array or list is uploaded)."""
    return xp.asarray(a, device=_device(like))


def _holds_values(a) -> bool:
    """False for arrays that carry shapes only (torch's ``meta`` device): no value can be read."""
    return not getattr(a, "is_meta", False)


def _kind(xp, dtype) -> str:
    """A target dtype's kind for :func:`normax._options.target_kind`."""
    if xp.isdtype(dtype, "integral"):
        return "i"
    return "f" if xp.isdtype(dtype, "real floating") else "other"


def _first_true(xp, flags, shape):
    """Position (an int for 1-d, else a tuple) of the first True of `flags`, and the flat index."""
    flat = int(xp.argmax(xp.astype(xp.reshape(flags, (-1,)), xp.int8)))
    pos = tuple(int(p) for p in np.unravel_index(flat, shape))
    return (pos[0] if len(pos) == 1 else pos), flat


def _class_indices(xp, t, classes: int, ignore_index: int):
    """Class indices as int64, and which rows count; IndexError for an index out of range that is
    not ignore_index, named by value and position as the NumPy-first functions do. The check
    reads one flag from the device (as the CUDA path does), and the value only when it fails."""
    if _holds_values(t) and t.dtype == xp.uint64 and bool(xp.any(t > _INT64_MAX)):
        where, flat = _first_true(xp, t > _INT64_MAX, tuple(t.shape))
        value = int(xp.reshape(t, (-1,))[flat])
        raise IndexError(
            f"target: class index {value} at position {where} is out of range: it does not fit in "
            f"int64, in which class indices are compared (a cast would wrap it around to {value - 2**64})"
        )
    t = xp.astype(t, xp.int64)
    kept = t != ignore_index
    bad = kept & ((t < 0) | (t >= classes))
    if _holds_values(t) and bool(xp.any(bad)):
        where, flat = _first_true(xp, bad, tuple(t.shape))
        raise IndexError(
            f"target: class index {int(xp.reshape(t, (-1,))[flat])} at position {where} is out of range "
            f"[0, {classes}) and is not ignore_index ({ignore_index})"
        )
    return t, kept


def _grad_scale(xp, grad_output, reduction: str, row_shape: tuple, like):
    """`grad_output` as a Python float, or an array of `like`'s dtype on its device: 0-d (read
    there, never on the host), or one per row for reduction "none"."""
    host_value = isinstance(grad_output, (np.ndarray, np.generic)) or not hasattr(grad_output, "shape")
    if host_value and np.ndim(grad_output) == 0:
        return number(grad_output, "grad_output")
    g = _as_array(xp, grad_output, like)
    if not xp.isdtype(g.dtype, ("real floating", "integral")):
        raise TypeError(f"grad_output: expected a real number or array, got dtype {g.dtype}")
    if g.ndim and reduction != "none":
        raise ValueError(
            f"grad_output: must be a number for reduction={reduction!r}, got shape {tuple(g.shape)}"
        )
    if reduction == "none":
        try:
            g = xp.broadcast_to(g, row_shape)
        except (ValueError, RuntimeError):
            raise ValueError(
                f"grad_output: shape {tuple(g.shape)} does not broadcast to the per-row loss shape {row_shape}"
            ) from None
    return xp.astype(g, like.dtype)


def _refuse_stats(fname: str, return_stats) -> None:
    if return_stats:
        raise NotImplementedError(
            f"{fname}: return_stats=True has no version in the array's own namespace; move the "
            "arrays to the CPU first"
        )


def _token_weights(xp, token_weight, row_shape: tuple, like, work):
    """(N,)-shaped token weights as `like`'s namespace holds them, in `work`, or None."""
    if token_weight is None:
        return None
    tw = _as_array(xp, token_weight, like)
    if not xp.isdtype(tw.dtype, ("real floating", "integral", "bool")):
        raise TypeError(f"token_weight: unsupported dtype {tw.dtype}")
    if tuple(tw.shape) != row_shape:
        raise ValueError(
            f"token_weight: expected shape {row_shape}, one per row (the per-row loss's shape); got {tuple(tw.shape)}"
        )
    return xp.astype(tw, work)


def _cross_entropy(
    xp, logits, target, axis, weight, opts, stable: bool, with_grad: bool, grad_output=1.0, token_weight=None
):
    """(loss, gradient shaped like `logits` or None), both in the logits' dtype."""
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"logits: unsupported dtype {logits.dtype}")
    shape = tuple(logits.shape)
    ax = class_axis(axis, shape)
    classes = shape[ax]
    row_shape = shape[:ax] + shape[ax + 1 :]
    t = _as_array(xp, target, logits)
    soft = target_kind(tuple(t.shape), _kind(xp, t.dtype), t.dtype, shape, ax)
    if soft and opts.ignore_index >= 0:
        raise ValueError("ignore_index is not supported with class-probability targets")
    w = None
    if weight is not None:
        w = _as_array(xp, weight, logits)
        if not xp.isdtype(w.dtype, ("real floating", "integral", "bool")):
            raise TypeError(f"weight: unsupported dtype {w.dtype}")
        if tuple(w.shape) != (classes,):
            raise ValueError(f"weight: expected shape ({classes},), one per class; got {tuple(w.shape)}")
    go = _grad_scale(xp, grad_output, opts.reduction, row_shape, logits) if with_grad else None
    # float32 logits with a cap float32 cannot hold are computed in float64, as the kernels.
    work = logits.dtype
    if logits.dtype == xp.float32 and softcap_dtype(opts.softcap, np.dtype(np.float32)) != np.float32:
        work = xp.float64

    z = xp.moveaxis(xp.astype(logits, work), ax, -1)  # classes last
    tw = _token_weights(xp, token_weight, row_shape, logits, work)
    chain = None
    if opts.temperature != 1.0:
        z = z / opts.temperature
        chain = xp.full_like(z[..., :1], 1 / opts.temperature)
    if opts.softcap is not None:
        u = xp.tanh(z / opts.softcap)
        z = opts.softcap * u
        chain = 1 - u * u if chain is None else chain * (1 - u * u)
    if stable:
        r = 1 / (1 + xp.abs(z))
        z = xp.sign(z) * xp.log1p(xp.abs(z))
        chain = r if chain is None else chain * r
    m = xp.max(z, axis=-1, keepdims=True)
    # Rows of nothing but -inf: log(0) - log(0), NaN as torch; a +inf max makes its row NaN too.
    m = xp.where(m == -math.inf, xp.zeros_like(m), m)
    lse = xp.log(xp.sum(xp.exp(z - m), axis=-1, keepdims=True)) + m
    logp = z - lse

    s = opts.label_smoothing
    cw = None if w is None else xp.astype(w, work)
    if soft:
        q = (1 - s) * xp.moveaxis(xp.astype(t, work), ax, -1) + s / classes
        kept = None
        # The mean is over rows for probabilities (their token weights with them).
        denom = math.prod(row_shape) if tw is None else xp.sum(tw)
    else:
        t, kept = _class_indices(xp, t, classes, opts.ignore_index)
        onehot = xp.astype(
            xp.arange(classes, device=_device(logits)) == xp.where(kept, t, 0)[..., None], work
        )
        q = (1 - s) * onehot + s / classes
    if cw is not None:
        q = q * cw
    if not soft:
        q = xp.where(kept[..., None], q, xp.zeros_like(q))
        # The mean divides by the summed weight of the counted targets (their number unweighted).
        row_weight = xp.sum(onehot if cw is None else onehot * cw, axis=-1)
        row_weight = row_weight if tw is None else row_weight * tw
        denom = xp.sum(xp.where(kept, row_weight, xp.zeros_like(row_weight)))
    # A class with no target mass adds nothing, even where its log-probability is -inf.
    loss = -xp.sum(xp.where(q == 0, xp.zeros_like(q), q * logp), axis=-1)
    lse = lse[..., 0]
    if opts.z_loss:
        loss = loss + opts.z_loss * lse * lse
    if tw is not None:
        loss = loss * tw
    if kept is not None:
        loss = xp.where(kept, loss, xp.zeros_like(loss))
    if opts.reduction == "none":
        out = xp.reshape(loss, row_shape)
    else:
        out = xp.sum(loss)
        if opts.reduction == "mean":
            out = out / denom  # NaN for a mean over nothing, as torch
    out = xp.astype(out, logits.dtype)
    if not with_grad:
        return out, None

    total = xp.sum(q, axis=-1, keepdims=True)
    if opts.z_loss:
        total = total + 2 * opts.z_loss * lse[..., None]
    grad = xp.exp(logp) * total - q
    if tw is not None:
        grad = grad * tw[..., None]
    if opts.reduction == "none":
        grad = grad * (go[..., None] if hasattr(go, "shape") else go)
    elif opts.reduction == "mean":
        grad = grad * go / denom
    else:
        grad = grad * go
    if chain is not None:
        grad = grad * chain
    if kept is not None:  # rows left out get a zero gradient, whatever they hold
        grad = xp.where(kept[..., None], grad, xp.zeros_like(grad))
    return out, xp.astype(xp.moveaxis(grad, -1, ax), logits.dtype)


def cross_entropy(
    xp,
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
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    stable = check_normalizer(normalizer)
    _refuse_stats("normax.cross_entropy", return_stats)
    return _cross_entropy(xp, logits, target, axis, weight, opts, stable, False, token_weight=token_weight)[0]


def cross_entropy_with_grad(
    xp,
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
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    stable = check_normalizer(normalizer)
    _refuse_stats("normax.cross_entropy_with_grad", return_stats)
    if inplace and not xp.isdtype(logits.dtype, "real floating"):
        raise ValueError("logits: inplace=True needs writeable floating-point logits")
    loss, grad = _cross_entropy(xp, logits, target, axis, weight, opts, stable, True, grad_output, token_weight)
    if not inplace:
        return loss, grad
    try:
        logits[...] = grad
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        raise ValueError(
            f"logits: inplace=True needs writeable floating-point logits; {type(logits).__name__} "
            "arrays cannot be written in place (nothing was written)"
        ) from None
    return loss, logits


def _linear(xp, hidden, linear_weight, target, linear_bias, weight, ignore_index, reduction,
            label_smoothing, z_loss, softcap, chunk_size, with_grad, grad_output=1.0,
            extra=(1.0, None, False)):  # fmt: skip
    temperature, token_weight, return_stats = extra
    _refuse_stats("normax.linear_cross_entropy" + ("_with_grad" if with_grad else ""), return_stats)
    h, lw = hidden, _as_array(xp, linear_weight, hidden)
    b = None if linear_bias is None else _as_array(xp, linear_bias, hidden)
    for a, name in ((h, "hidden"), (lw, "linear_weight"), (b, "linear_bias")):
        if a is not None and not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(f"{name}: unsupported dtype {a.dtype}")
    logits_shape = linear_logits_shape(tuple(h.shape), tuple(lw.shape), None if b is None else tuple(b.shape))
    if lw.ndim > 2:
        fname = "normax.linear_cross_entropy" + ("_with_grad" if with_grad else "")
        raise NotImplementedError(
            f"{fname}: a K-dimensional loss (linear_weight of shape {tuple(lw.shape)}) has no version "
            "in the array's own namespace (a (C, H) linear_weight has); move the arrays to the CPU first"
        )
    batched = h.ndim == 2
    t = _as_array(xp, target, hidden)
    soft = target_kind(tuple(t.shape), _kind(xp, t.dtype), t.dtype, logits_shape, int(batched))
    if soft and ignore_index is not None:
        raise ValueError("ignore_index: cannot be given with probability targets (as in torch)")
    # None: -100 for class indices, as torch's linear_cross_entropy.
    opts = ce_options(
        -100 if ignore_index is None else ignore_index, reduction, label_smoothing, z_loss, softcap, temperature
    )
    check_chunk_size(chunk_size)
    work = xp.result_type(h.dtype, lw.dtype) if b is None else xp.result_type(h.dtype, lw.dtype, b.dtype)
    h, lw = xp.astype(h, work), xp.astype(lw, work)
    logits = xp.matmul(h, xp.matrix_transpose(lw))
    if b is not None:
        logits = logits + xp.astype(b, work)
    loss, g = _cross_entropy(xp, logits, t, -1, weight, opts, False, with_grad, grad_output, token_weight)
    if not with_grad:
        return loss
    dh = xp.matmul(g, lw)
    if batched:
        dw = xp.matmul(xp.matrix_transpose(g), h)
        db = None if b is None else xp.sum(g, axis=0)
    else:
        dw = g[:, None] * h[None, :]
        db = None if b is None else g
    return loss, dh, dw, db


def linear_cross_entropy(
    xp,
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
    return _linear(xp, hidden, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                   label_smoothing, z_loss, softcap, chunk_size, False,
                   extra=(temperature, token_weight, return_stats))  # fmt: skip


def linear_cross_entropy_with_grad(
    xp,
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
    return _linear(xp, hidden, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                   label_smoothing, z_loss, softcap, chunk_size, True, grad_output,
                   (temperature, token_weight, return_stats))  # fmt: skip


OPS = {
    "cross_entropy": cross_entropy,
    "cross_entropy_with_grad": cross_entropy_with_grad,
    "linear_cross_entropy": linear_cross_entropy,
    "linear_cross_entropy_with_grad": linear_cross_entropy_with_grad,
}
