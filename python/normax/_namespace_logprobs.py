"""logprobs and linear_logprobs in any array-API namespace, for arrays normax cannot read on the
CPU (see :mod:`normax._namespace_ops`, whose ``OPS`` lists them).

The plain formulas in the logits' dtype on their device: z = logits / T, the log-probabilities
``z - logsumexp(z)`` (max-shifted) at the targets, and the entropy ``-sum p log p`` (p = 0 terms
add 0); ignored rows 0. Options are checked by the same helpers as the NumPy-first functions, so
argument errors are the same. Sums run in the logits' dtype and there is none of the kernels' care
for a dominant target (its logprob rounds to 0 past a margin of ~17 in float32). The linear form
computes all logits at once with the namespace's matmul (`chunk_size` is checked, not used).
"""

from __future__ import annotations

import math

from array_api_compat import device as _device

from ._logprobs import logprob_options
from ._namespace_ce import _as_array, _class_indices
from ._options import check_chunk_size, class_axis, linear_shapes


def _rows(xp, logits, target, axis, opts, return_entropy):
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"logits: unsupported dtype {logits.dtype}")
    shape = tuple(logits.shape)
    ax = class_axis(axis, shape)
    classes = shape[ax]
    row_shape = shape[:ax] + shape[ax + 1 :]
    t = _as_array(xp, target, logits)
    if not xp.isdtype(t.dtype, "integral"):
        raise TypeError(f"target: expected integer class indices, got dtype {t.dtype}")
    if tuple(t.shape) != row_shape:
        raise ValueError(
            f"target: expected shape {row_shape}, the logits' shape without the class axis; got {tuple(t.shape)}"
        )
    t, kept = _class_indices(xp, t, classes, opts.ignore_index)
    z = xp.moveaxis(logits, ax, -1) / opts.temperature
    m = xp.max(z, axis=-1, keepdims=True)
    # Rows of nothing but -inf: log(0) - log(0), NaN as torch; a +inf max makes its row NaN too.
    m = xp.where(m == -math.inf, xp.zeros_like(m), m)
    logp = z - (xp.log(xp.sum(xp.exp(z - m), axis=-1, keepdims=True)) + m)
    onehot = xp.arange(classes, device=_device(logits)) == xp.where(kept, t, 0)[..., None]
    zero = xp.zeros_like(logp)
    lp = xp.where(kept, xp.sum(xp.where(onehot, logp, zero), axis=-1), zero[..., 0])
    if not return_entropy:
        return lp
    p = xp.exp(logp)
    h = -xp.sum(xp.where(p == 0, zero, p * logp), axis=-1)
    return lp, xp.where(kept, h, zero[..., 0])


def logprobs(xp, logits, target, *, axis=-1, temperature=1.0, ignore_index=-100, return_entropy=True):
    opts = logprob_options(ignore_index, temperature)
    return _rows(xp, logits, target, axis, opts, return_entropy)


def linear_logprobs(
    xp,
    hidden,
    linear_weight,
    target,
    *,
    linear_bias=None,
    temperature=1.0,
    ignore_index=-100,
    chunk_size=None,
    return_entropy=True,
):
    opts = logprob_options(ignore_index, temperature)
    lw = _as_array(xp, linear_weight, hidden)
    b = None if linear_bias is None else _as_array(xp, linear_bias, hidden)
    t = _as_array(xp, target, hidden)
    integer = xp.isdtype(t.dtype, "integral")
    bias_shape = None if b is None else tuple(b.shape)
    linear_shapes(tuple(hidden.shape), tuple(lw.shape), bias_shape, tuple(t.shape), integer, t.dtype)
    check_chunk_size(chunk_size)
    logits = hidden @ xp.matrix_transpose(lw)
    if b is not None:
        logits = logits + b
    return _rows(xp, logits, t, -1, opts, return_entropy)


OPS = {"logprobs": logprobs, "linear_logprobs": linear_logprobs}
