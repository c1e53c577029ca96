"""logprobs and linear_logprobs: custom ops, fake kernels, autograd and the public functions.

Both outputs are differentiable. The forward saves its inputs only (the backward recomputes each
row's statistics, see ``normax._logprobs``); the backward skips the terms of an output whose
gradient is None (autograd hands None, never zeros: ``set_materialize_grads(False)``), and of an
entropy the forward did not return.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _logprobs as cpu
from .._backends import cuda
from .._backends.cuda.logprobs import linear_logprobs_grad, logprobs_grad
from .._options import check_chunk_size, linear_shapes
from ._convert import absent, check_float, host, host_opt, to_tensor
from ._op import op

_FNAME = "normax.torch.logprobs"
_LINEAR = "normax.torch.linear_logprobs"


@functools.lru_cache(maxsize=256, typed=True)  # typed: True and 1 are different options
def _cached_options(ignore_index, temperature) -> cpu.LogprobOptions:
    return cpu.logprob_options(ignore_index, temperature)


@torch.compiler.assume_constant_result
def checked_options(ignore_index, temperature) -> tuple:
    # Python scalars in, a constant tuple out: torch.compile runs the NumPy API's checks once
    # while tracing, and an eager loop checks its (unchanging) options once.
    try:
        opts = _cached_options(ignore_index, temperature)
    except TypeError:  # unhashable arguments: checked uncached (and most likely refused)
        opts = cpu.logprob_options(ignore_index, temperature)
    return opts.ignore_index, opts.temperature


def _check_target(target, fname: str) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{fname}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{fname}: target: expected integer class indices, got {target.dtype}")


def _class_axis(axis, shape) -> int:
    """The class axis as a non-negative int, checked as :func:`normax.logprobs` checks it (in plain
    Python: torch.compile traces it without NumPy)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis: expected an int (the class axis), got {axis!r}")
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: {axis} is out of bounds for logits of {ndim} dimensions")
    ax = axis % ndim
    if shape[ax] == 0:
        raise ValueError(f"logits: the class axis {ax} is empty")
    return ax


def _entropy_out(like: Tensor, rows, entropy: bool) -> Tensor:
    return like.new_empty(rows) if entropy else absent(like)


# ---------------------------------------------------------------------------------------------
# Rows: (N, C) logits, classes last.


@op("normax::logprobs")
def _logprobs_op(
    logits: Tensor, target: Tensor, temperature: float, ignore_index: int, entropy: bool
) -> tuple[Tensor, Tensor]:
    r = cpu.logprobs(
        host(logits), host(target), temperature=temperature, ignore_index=ignore_index, return_entropy=entropy
    )
    lp, h = r if entropy else (r, None)
    return to_tensor(lp, logits.dtype), absent(logits) if h is None else to_tensor(h, logits.dtype)


@_logprobs_op.register_fake
def _logprobs_fake(logits, target, temperature, ignore_index, entropy):
    rows = logits.shape[:1]
    return logits.new_empty(rows), _entropy_out(logits, rows, entropy)


@op("normax::logprobs_backward")
def _logprobs_backward_op(
    logits: Tensor,
    target: Tensor,
    grad_logprob: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
) -> Tensor:
    g = cpu.logprobs_backward(
        host(logits), host(target), host_opt(grad_logprob), host_opt(grad_entropy),
        temperature=temperature, ignore_index=ignore_index,
    )  # fmt: skip
    return to_tensor(g, logits.dtype)


@_logprobs_backward_op.register_fake
def _logprobs_backward_fake(logits, *_):
    return logits.new_empty(logits.shape)


def _setup(ctx, inputs, output) -> None:
    logits, target, temperature, ignore_index, entropy = inputs
    ctx.set_materialize_grads(False)
    if not entropy:
        ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, target)
    ctx.options = (temperature, ignore_index)
    ctx.entropy = entropy


def _grad(ctx, grad_logprob, grad_entropy):
    grad_entropy = grad_entropy if ctx.entropy else None
    if (grad_logprob is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
        return (None,) * 5
    logits, target = ctx.saved_tensors
    dx = _logprobs_backward_op(logits, target, grad_logprob, grad_entropy, *ctx.options)
    return (dx,) + (None,) * 4


_logprobs_op.register_autograd(_grad, setup_context=_setup)


@_logprobs_op.register_kernel("cuda")
def _logprobs_cuda(logits, target, temperature, ignore_index, entropy):
    r = cuda.logprobs(
        logits, target, temperature=temperature, ignore_index=ignore_index, return_entropy=entropy
    )
    return r if entropy else (r, absent(logits))


@_logprobs_backward_op.register_kernel("cuda")
def _logprobs_backward_cuda(logits, target, grad_logprob, grad_entropy, temperature, ignore_index):
    return logprobs_grad(
        logits, target, grad_logprob, grad_entropy, temperature=temperature, ignore_index=ignore_index
    )


def logprobs(
    logits: Tensor, target: Tensor, *, axis=-1, temperature=1.0, ignore_index=-100, return_entropy=True
):
    """:func:`normax.logprobs` with autograd: the log-probabilities of the targets and the
    entropies of ``softmax(logits / temperature)``, both differentiable.

    Parameters
    ----------
    logits : Tensor
        Floating-point scores; `axis` holds the classes.
    target : Tensor
        Integer class indices shaped like `logits` without the class axis.
    axis, temperature, ignore_index, return_entropy
        As in :func:`normax.logprobs`.

    Returns
    -------
    logprob : Tensor
        Per row (`target`'s shape), in the logits' dtype (float16/bfloat16 computed in float32).
    entropy : Tensor
        Per row; only with ``return_entropy=True``.

    Notes
    -----
    The gradient is ``(1/T) [g_logp (onehot - p) - g_H p (z - lse + H)]`` with z = logits / T;
    an output whose gradient is None (unused in the loss) costs nothing in the backward, and the
    backward recomputes the rows' statistics from the saved logits (nothing else is saved). A
    registered custom op with a fake kernel: ``torch.compile(fullgraph=True)`` traces it. CUDA
    tensors run normax's CUDA kernels (the backward recomputes the rows' statistics there too).
    Double backward is not supported.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> x = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    >>> lp, h = nt.logprobs(x, torch.tensor([0]))
    >>> (lp - 0.1 * h).sum().backward()
    >>> x.grad
    tensor([[ 0.2465, -0.1233, -0.1233]])
    """
    check_float(logits, _FNAME, "logits")
    _check_target(target, _FNAME)
    ignore, temp = checked_options(ignore_index, temperature)
    ax = _class_axis(axis, tuple(logits.shape))
    x = logits.movedim(ax, -1)
    row_shape = tuple(x.shape[:-1])
    if tuple(target.shape) != row_shape:
        raise ValueError(
            f"{_FNAME}: target: expected shape {row_shape}, the logits' shape without the class axis; "
            f"got {tuple(target.shape)}"
        )
    entropy = bool(return_entropy)
    lp, h = _logprobs_op(x.reshape(-1, x.shape[-1]), target.reshape(-1), temp, ignore, entropy)
    return (lp.reshape(row_shape), h.reshape(row_shape)) if entropy else lp.reshape(row_shape)


# ---------------------------------------------------------------------------------------------
# Linear: (N, H) hidden, (V, H) weight, (V,) bias or None.


@op("normax::linear_logprobs")
def _linear_op(
    hidden: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int | None,
    entropy: bool,
) -> tuple[Tensor, Tensor]:
    r = cpu.linear_logprobs(
        host(hidden), host(linear_weight), host(target), linear_bias=host_opt(linear_bias),
        temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size, return_entropy=entropy,
    )  # fmt: skip
    lp, h = r if entropy else (r, None)
    return to_tensor(lp, hidden.dtype), absent(hidden) if h is None else to_tensor(h, hidden.dtype)


@_linear_op.register_fake
def _linear_fake(hidden, linear_weight, target, linear_bias, temperature, ignore_index, chunk_size, entropy):
    rows = hidden.shape[:1]
    return hidden.new_empty(rows), _entropy_out(hidden, rows, entropy)


@op("normax::linear_logprobs_backward")
def _linear_backward_op(
    hidden: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    grad_logprob: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = cpu.linear_logprobs_backward(
        host(hidden), host(linear_weight), host(target), host_opt(grad_logprob), host_opt(grad_entropy),
        linear_bias=host_opt(linear_bias), temperature=temperature, ignore_index=ignore_index,
        chunk_size=chunk_size,
    )  # fmt: skip
    db = absent(hidden) if db is None else to_tensor(db, linear_bias.dtype)
    return to_tensor(dh, hidden.dtype), to_tensor(dw, linear_weight.dtype), db


@_linear_backward_op.register_fake
def _linear_backward_fake(hidden, linear_weight, target, linear_bias, *_):
    db = absent(hidden) if linear_bias is None else linear_bias.new_empty(linear_bias.shape)
    return hidden.new_empty(hidden.shape), linear_weight.new_empty(linear_weight.shape), db


def _linear_setup(ctx, inputs, output) -> None:
    hidden, linear_weight, target, linear_bias, temperature, ignore_index, chunk_size, entropy = inputs
    ctx.set_materialize_grads(False)
    if not entropy:
        ctx.mark_non_differentiable(output[1])
    ctx.has_bias = linear_bias is not None
    ctx.save_for_backward(
        hidden, linear_weight, target, absent(hidden) if linear_bias is None else linear_bias
    )
    ctx.options = (temperature, ignore_index, chunk_size)
    ctx.entropy = entropy


def _linear_grad(ctx, grad_logprob, grad_entropy):
    grad_entropy = grad_entropy if ctx.entropy else None
    needs = ctx.needs_input_grad
    if (grad_logprob is None and grad_entropy is None) or not (needs[0] or needs[1] or needs[3]):
        return (None,) * 8
    hidden, linear_weight, target, linear_bias = ctx.saved_tensors
    bias = linear_bias if ctx.has_bias else None
    dh, dw, db = _linear_backward_op(
        hidden, linear_weight, target, bias, grad_logprob, grad_entropy, *ctx.options
    )
    return (dh if needs[0] else None, dw if needs[1] else None, None, db if needs[3] else None) + (None,) * 4


_linear_op.register_autograd(_linear_grad, setup_context=_linear_setup)


@_linear_op.register_kernel("cuda")
def _linear_cuda(hidden, linear_weight, target, linear_bias, temperature, ignore_index, chunk_size, entropy):
    r = cuda.linear_logprobs(
        hidden, linear_weight, target, linear_bias=linear_bias, temperature=temperature,
        ignore_index=ignore_index, chunk_size=chunk_size, return_entropy=entropy,
    )  # fmt: skip
    lp, h = r if entropy else (r, None)
    return lp.to(hidden.dtype), absent(hidden) if h is None else h.to(hidden.dtype)


@_linear_backward_op.register_kernel("cuda")
def _linear_backward_cuda(
    hidden,
    linear_weight,
    target,
    linear_bias,
    grad_logprob,
    grad_entropy,
    temperature,
    ignore_index,
    chunk_size,
):
    dh, dw, db = linear_logprobs_grad(
        hidden, linear_weight, target, linear_bias, grad_logprob, grad_entropy, temperature=temperature,
        ignore_index=ignore_index, chunk_size=chunk_size,
    )  # fmt: skip
    db = absent(hidden) if db is None else db.to(linear_bias.dtype)
    return dh.to(hidden.dtype), dw.to(linear_weight.dtype), db


def linear_logprobs(
    hidden: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature=1.0,
    ignore_index=-100,
    chunk_size=None,
    return_entropy=True,
):
    """:func:`normax.linear_logprobs` with autograd: logprobs and entropies of
    ``(hidden @ linear_weight.T + linear_bias) / temperature`` without ever holding the logits,
    both differentiable with respect to `hidden`, `linear_weight` and `linear_bias`.

    Parameters
    ----------
    hidden : Tensor
        (N, H) hidden states, or (..., H) with `target` shaped (...).
    linear_weight : Tensor
        (V, H), of `hidden`'s dtype.
    target : Tensor
        Integer class indices, one per row of `hidden`.
    linear_bias : Tensor, optional
        (V,), of `hidden`'s dtype.
    temperature, ignore_index, chunk_size, return_entropy
        As in :func:`normax.linear_logprobs`.

    Returns
    -------
    logprob : Tensor
        Per row (`target`'s shape), in `hidden`'s dtype.
    entropy : Tensor
        Per row; only with ``return_entropy=True``.

    Notes
    -----
    The forward keeps nothing but its inputs; the backward recomputes each block of logits once
    (three GEMMs per block in all, with whole rows per block) and skips the terms of an output
    whose gradient is None. A registered custom op with a fake kernel
    (``torch.compile(fullgraph=True)``). CUDA tensors run torch GEMM blocks into normax's CUDA
    kernels (the backward recomputes each block's statistics first: one more GEMM pass). Double
    backward is not supported.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> h = torch.ones(2, 3, requires_grad=True)
    >>> lp, ent = nt.linear_logprobs(h, torch.eye(4, 3), torch.tensor([0, 3]))
    >>> lp.detach()
    tensor([-1.2143, -2.2143])
    """
    check_float(hidden, _LINEAR, "hidden")
    check_float(linear_weight, _LINEAR, "linear_weight")
    _check_target(target, _LINEAR)
    for name, p in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if p is not None and p.dtype != hidden.dtype:
            raise TypeError(f"{_LINEAR}: {name} must have hidden's dtype {hidden.dtype}, got {p.dtype}")
    ignore, temp = checked_options(ignore_index, temperature)
    chunk_size = check_chunk_size(chunk_size)
    row_shape = tuple(hidden.shape[:-1])
    if hidden.ndim != 2 and tuple(target.shape) == row_shape:  # (..., H): rows of the classes last
        hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    bias_shape = None if linear_bias is None else tuple(linear_bias.shape)
    linear_shapes(
        tuple(hidden.shape), tuple(linear_weight.shape), bias_shape, tuple(target.shape), True, None
    )
    entropy = bool(return_entropy)
    lp, h = _linear_op(hidden, linear_weight, target, linear_bias, temp, ignore, chunk_size, entropy)
    return (lp.reshape(row_shape), h.reshape(row_shape)) if entropy else lp.reshape(row_shape)
