"""The helpers of the cross-entropy's ``return_stats``: buffers, the z-loss term and the public
fields (``CrossEntropyStats`` itself lives in ``_cross_entropy``)."""

from __future__ import annotations

import numpy as np

from ._arrays import scalar_0d


def stats_dtype(dtype) -> np.dtype:
    """The dtype of `lse` and `entropy` for a loss computed from `dtype` inputs."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def stats_buffers(rows: int, dtype):
    """The kernels' per-row outputs: lse, entropy (in the kernel `dtype`) and correct."""
    return np.empty(rows, dtype), np.empty(rows, dtype), np.empty(rows, np.bool_)


def z_loss_term(lse, token_weight, opts, denom):
    """The stats' z_loss scalar from the rows' lse (ignored rows hold 0)."""
    if opts.z_loss == 0.0:
        return 0.0
    sq = lse.astype(np.float64).reshape(-1) ** 2
    if token_weight is None:
        total = float(sq.sum())
    else:
        # Only the kept rows' weights (ignored rows hold lse 0): an ignored row's inf or NaN
        # weight must not make the term NaN, as it does not make the loss NaN.
        kept = sq != 0.0
        total = float(np.dot(sq[kept], token_weight.astype(np.float64).reshape(-1)[kept]))
    total *= opts.z_loss
    if opts.reduction != "mean":
        return total
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.float64(total) / np.float64(denom))


def mean_denominator(t, soft, weight, token_weight, ignore_index, rows):
    """The mean's denominator: the summed token weight x class weight of the kept rows."""
    if soft:
        return rows if token_weight is None else float(token_weight.sum(dtype=np.float64))
    t = t.reshape(-1)
    kept = t != ignore_index
    w = np.ones(kept.sum()) if weight is None else weight[t[kept]].astype(np.float64)
    if token_weight is not None:
        w = w * token_weight[kept]
    return float(w.sum(dtype=np.float64))


def stats_fields(lse, entropy, correct, row_shape, dtype, z_loss) -> tuple:
    """The fields of ``CrossEntropyStats`` from the kernel's per-row buffers: per-row arrays
    shaped `row_shape` and the z-loss scalar, in the stats dtype of a loss of `dtype` inputs."""
    dtype = stats_dtype(dtype)

    def rows(a, dt):
        return scalar_0d(a.reshape(row_shape).astype(dt, copy=False))

    return rows(lse, dtype), rows(entropy, dtype), rows(correct, np.bool_), dtype.type(z_loss)
