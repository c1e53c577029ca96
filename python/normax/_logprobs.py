"""logprobs and linear_logprobs (log-probabilities of targets and entropies, as RL trainers use
them) and their backward functions: the NumPy-first API and the adapters' route."""

from __future__ import annotations

import numpy as np

from . import _core
from ._arrays import as_input, compute_dtype, contiguous, is_int_dtype, scalar_0d
from ._options import (
    ce_options,
    check_chunk_size,
    check_temperature,
    class_axis,
    class_indices,
    index_error,
    linear_shapes,
)

# The checked options of the log-probabilities (fields ignore_index, temperature): one immutable
# object, the one form in which they reach the kernels.
LogprobOptions = _core.LogprobOptions


def logprob_options(ignore_index, temperature) -> LogprobOptions:
    """The options checked (ignore_index as the cross-entropy checks it) as one object."""
    ignore_index = ce_options(ignore_index, "none", 0.0, 0.0, None).ignore_index
    return LogprobOptions(ignore_index, check_temperature(temperature))


def _class_targets(target, row_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(the caller's targets as an array, int64 and contiguous): integer class indices shaped like
    the logits without the class axis."""
    t = np.asarray(target)
    if not is_int_dtype(t.dtype):
        raise TypeError(f"target: expected integer class indices, got dtype {t.dtype}")
    if t.shape != row_shape:
        raise ValueError(
            f"target: expected shape {row_shape}, the logits' shape without the class axis; got {t.shape}"
        )
    return t, contiguous(class_indices(t))


def _row_grad(g, name: str, row_shape: tuple, work: np.dtype):
    """An incoming gradient (None, or an array broadcasting to the per-row results) as contiguous
    rows in `work`."""
    if g is None:
        return None
    a = np.asarray(g)
    compute_dtype(a.dtype, name)
    try:
        a = np.broadcast_to(a, row_shape)
    except ValueError:
        raise ValueError(
            f"{name}: shape {a.shape} does not broadcast to the per-row shape {row_shape}"
        ) from None
    return contiguous(a, work).reshape(-1)


class _Rows:
    """The checked rows of a `logprobs` call: (rows, classes) contiguous logits, int64 targets."""

    def __init__(self, logits, target, axis):
        x, self.result_dtype = as_input(logits, "logits")
        self.axis = class_axis(axis, x.shape)
        self.shape = x.shape
        self.row_shape = x.shape[: self.axis] + x.shape[self.axis + 1 :]
        self.target, tk = _class_targets(target, self.row_shape)
        self.classes = x.shape[self.axis]
        self.last = self.axis == x.ndim - 1
        work = contiguous(x if self.last else np.moveaxis(x, self.axis, -1))
        self.x = work.reshape(-1, self.classes)
        self.t = tk.reshape(-1)

    def index_error(self, opts) -> IndexError:
        return index_error(self.target, self.classes, opts.ignore_index)

    def per_row(self, a: np.ndarray):
        return scalar_0d(a.reshape(self.row_shape).astype(self.result_dtype, copy=False))


def logprobs(logits, target, *, axis=-1, temperature=1.0, ignore_index=-100, return_entropy=True):
    """Log-probability of each target and entropy of each row of ``softmax(logits / temperature)``.

    What a reinforcement-learning trainer asks of a policy's logits (PPO's probability ratio,
    its entropy bonus), reading each row of logits from memory once.

    Parameters
    ----------
    logits : array_like
        Unnormalized scores; `axis` holds the classes.
    target : array_like
        Integer class indices shaped like `logits` without the class axis.
    axis : int, default -1
        The class axis.
    temperature : float, default 1.0
        T: the logits are divided by it first. Finite and > 0.
    ignore_index : int, default -100
        Rows whose target is this give 0 and 0 (and a zero gradient).
    return_entropy : bool, default True
        Also return the entropies (SciPy's convention for optional outputs).

    Returns
    -------
    logprob : ndarray or numpy scalar
        ``log softmax(logits / T)`` at the target, one per row (`target`'s shape), in the
        logits' result dtype (float16 and bfloat16 computed in float32).
    entropy : ndarray or numpy scalar
        ``H = -sum_c p_c log p_c`` of ``p = softmax(logits / T)``, one per row; only with
        ``return_entropy=True``.

    Raises
    ------
    IndexError
        For a class index outside [0, C) that is not `ignore_index`, named with its position.
    TypeError
        For float targets, a non-number temperature, unsupported dtypes.
    ValueError
        For a temperature that is not finite and > 0, a target of the wrong shape, an empty class
        axis.

    Notes
    -----
    With z = logits / T, lse = logsumexp(z): logprob = z_y - lse and H = sum_c p_c (lse - z_c),
    every term >= 0 (no cancellation; p_c = 0 adds 0, also for z_c = -inf). The log-sum-exp is
    kept in two parts and refined where one class dominates, so a confident target's logprob
    (-1e-20, say) is accurate to a few ULP instead of rounding to 0. A row holding NaN or +inf,
    or only -inf, gives NaN (as torch's log_softmax). Equivalent to torch's
    ``F.log_softmax(logits / T, -1).gather(-1, target[..., None])`` and
    ``-(p * log p).sum(-1)``. The gradient of both outputs is in :mod:`normax.torch`
    (:func:`normax.torch.logprobs`) and :mod:`normax.jax`.

    Examples
    --------
    >>> import numpy as np, normax
    >>> lp, h = normax.logprobs(np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([0, 1]))
    >>> lp.round(4), h.round(4)
    (array([-0.6931, -2.1269]), array([0.6931, 0.3653]))
    """
    opts = logprob_options(ignore_index, temperature)
    r = _Rows(logits, target, axis)
    rows = r.t.size
    lp = np.empty(rows, r.x.dtype)
    h = np.empty(rows, r.x.dtype) if return_entropy else None
    try:
        _core.logprobs(r.x, r.t, opts, lp, h)
    except IndexError:
        raise r.index_error(opts) from None
    return (r.per_row(lp), r.per_row(h)) if return_entropy else r.per_row(lp)


def logprobs_backward(
    logits, target, grad_logprob, grad_entropy, *, axis=-1, temperature=1.0, ignore_index=-100
):
    """The gradient of ``sum(grad_logprob * logprob + grad_entropy * entropy)`` of
    :func:`logprobs` with respect to `logits` (shaped like them, in their result dtype): the
    backward of the framework adapters. Either incoming gradient may be None (zero: its terms
    are skipped, and without `grad_entropy` so is the entropy pass)."""
    opts = logprob_options(ignore_index, temperature)
    r = _Rows(logits, target, axis)
    work = r.x.dtype
    grads = (_row_grad(grad_logprob, "grad_logprob", r.row_shape, work),
             _row_grad(grad_entropy, "grad_entropy", r.row_shape, work))  # fmt: skip
    grad = np.empty_like(r.x)
    try:
        _core.logprobs_backward(r.x, r.t, opts, grads, grad)
    except IndexError:
        raise r.index_error(opts) from None
    grad = grad.reshape(r.shape[: r.axis] + r.shape[r.axis + 1 :] + (r.classes,))
    if not r.last:
        grad = np.moveaxis(grad, -1, r.axis)
    return grad.astype(r.result_dtype, copy=False)


class _Linear:
    """The checked inputs of a `linear_logprobs` call: (N, H) hidden, (V, H) linear weight, (V,)
    bias or None, contiguous in one kernel dtype, (N,) int64 targets."""

    def __init__(self, hidden, linear_weight, target, linear_bias, chunk_size):
        h, h_dtype = as_input(hidden, "hidden")
        w, w_dtype = as_input(linear_weight, "linear_weight")
        b, b_dtype = as_input(linear_bias, "linear_bias") if linear_bias is not None else (None, w_dtype)
        t = np.asarray(target)
        linear_shapes(
            h.shape, w.shape, None if b is None else b.shape, t.shape, is_int_dtype(t.dtype), t.dtype
        )
        work = np.result_type(h.dtype, w.dtype, *(() if b is None else (b.dtype,)))
        self.result_dtype = np.result_type(h_dtype, w_dtype, b_dtype)
        self.chunk_size = check_chunk_size(chunk_size)
        self.target, self.t = t, contiguous(class_indices(t))
        self.h, self.w = contiguous(h, work), contiguous(w, work)
        self.b = None if b is None else contiguous(b, work)

    def index_error(self, opts) -> IndexError:
        return index_error(self.target, self.w.shape[0], opts.ignore_index)

    def result(self, a):
        return None if a is None else a.astype(self.result_dtype, copy=False)


def linear_logprobs(
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
    """:func:`logprobs` of ``hidden @ linear_weight.T + linear_bias`` without ever holding the
    logits.

    Parameters
    ----------
    hidden : array_like
        (N, H) hidden states.
    linear_weight : array_like
        (V, H) output projection, as ``torch.nn.Linear.weight``.
    target : array_like
        (N,) integer class indices.
    linear_bias : array_like, optional
        (V,) bias of the logits.
    temperature : float, default 1.0
        The logits (bias included) are divided by it. Finite and > 0.
    ignore_index : int, default -100
        Rows whose target is this give 0 and 0.
    chunk_size : int, optional
        Most logits held at once, in elements (rows x classes), as in
        :func:`linear_cross_entropy`: None picks 2**24 (64 MiB of float32).
    return_entropy : bool, default True
        Also return the entropies.

    Returns
    -------
    logprob : ndarray
        (N,) log-probabilities of the targets, in the inputs' result dtype.
    entropy : ndarray
        (N,) entropies; only with ``return_entropy=True``.

    Raises
    ------
    IndexError, TypeError, ValueError
        As :func:`logprobs`, and for shapes that do not fit or a `chunk_size` below 1.

    Notes
    -----
    Blocks of rows (and, where a block of whole rows would pass `chunk_size`, of the
    vocabulary) get their logits from a GEMM; each row's log-sum-exp and entropy are combined
    across vocabulary blocks exactly (the entropy of a union of blocks is their entropies
    weighted by probability mass, plus each block's log-sum-exp distance to the whole: all terms
    >= 0). The backward (:func:`linear_logprobs_backward`, the adapters' route) recomputes each
    block once and applies ``g_logp (onehot - p) + g_H (-p (z - lse + H))`` (times 1/T) before
    the GEMMs into dhidden and dlinear_weight; with vocabulary blocks the statistics take one
    more sweep of GEMMs first.

    Examples
    --------
    >>> import numpy as np, normax
    >>> lp, h = normax.linear_logprobs(np.eye(2), np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([0, 1]))
    >>> lp.round(4), h.round(4)
    (array([-0.3133, -0.6931]), array([0.5822, 0.6931]))
    """
    opts = logprob_options(ignore_index, temperature)
    a = _Linear(hidden, linear_weight, target, linear_bias, chunk_size)
    n = a.h.shape[0]
    lp = np.empty(n, a.h.dtype)
    h = np.empty(n, a.h.dtype) if return_entropy else None
    try:
        _core.linear_logprobs((a.h, a.w, a.b), a.t, opts, a.chunk_size, lp, h)
    except IndexError:
        raise a.index_error(opts) from None
    return (a.result(lp), a.result(h)) if return_entropy else a.result(lp)


def linear_logprobs_backward(
    hidden,
    linear_weight,
    target,
    grad_logprob,
    grad_entropy,
    *,
    linear_bias=None,
    temperature=1.0,
    ignore_index=-100,
    chunk_size=None,
):
    """The gradients of ``sum(grad_logprob * logprob + grad_entropy * entropy)`` of
    :func:`linear_logprobs`: (dhidden, dlinear_weight, dlinear_bias or None), shaped like the
    inputs, in their result dtype; the backward of the framework adapters. Either incoming
    gradient may be None (zero; its terms are skipped)."""
    opts = logprob_options(ignore_index, temperature)
    a = _Linear(hidden, linear_weight, target, linear_bias, chunk_size)
    work, n = a.h.dtype, a.h.shape[0]
    grads = (_row_grad(grad_logprob, "grad_logprob", (n,), work),
             _row_grad(grad_entropy, "grad_entropy", (n,), work))  # fmt: skip
    out = (np.empty_like(a.h), np.empty_like(a.w), None if a.b is None else np.empty_like(a.b))
    try:
        _core.linear_logprobs_backward((a.h, a.w, a.b), a.t, opts, a.chunk_size, grads, out)
    except IndexError:
        raise a.index_error(opts) from None
    return tuple(a.result(g) for g in out)
