"""stablemax and log_stablemax (custom op, fake kernel, autograd, CUDA kernel, public functions),
and the StableMax cross-entropy as the softmax one of phi = log s(x) (see normax._stablemax)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _stablemax as cpu
from .._backends import cuda
from ._convert import check_float, dense, host, to_tensor
from ._softmax import check_dim


@torch.library.custom_op("normax::stablemax", mutates_args=())
def _stablemax_op(x: Tensor, dim: int, log: bool) -> Tensor:
    fn = cpu.log_stablemax if log else cpu.stablemax
    return to_tensor(fn(host(x), axis=dim), x.dtype)


@_stablemax_op.register_fake
def _stablemax_fake(x: Tensor, dim: int, log: bool) -> Tensor:
    return x.new_empty(x.shape)


@_stablemax_op.register_kernel("cuda")
def _stablemax_cuda(x, dim, log):
    return dense((cuda.log_stablemax if log else cuda.stablemax)(x, axis=dim))


def _setup(ctx, inputs, output) -> None:
    ctx.dim, ctx.log = inputs[1], inputs[2]
    ctx.save_for_backward(inputs[0], output)


def _backward(y: Tensor, dy: Tensor, x: Tensor, dim: int, log: bool) -> Tensor:
    """softmax's backward in y, times s'(x) / s(x) = 1 / (1 + |x|); torch ops (any device, and
    differentiable again), float16/bfloat16 in float32."""
    work = torch.promote_types(y.dtype, torch.float32)
    y, dy, x = y.to(work), dy.to(work), x.to(work)
    if log:
        g = dy - y.exp() * dy.sum(dim, keepdim=True)
    else:
        g = y * (dy - (dy * y).sum(dim, keepdim=True))
    return g / (1 + x.abs())


def _grad(ctx, grad: Tensor):
    x, y = ctx.saved_tensors
    return _backward(y, grad, x, ctx.dim, ctx.log).to(x.dtype), None, None


_stablemax_op.register_autograd(_grad, setup_context=_setup)


def _public(input: Tensor, dim: int, dtype, log: bool, fname: str) -> Tensor:
    if dtype is not None:
        input = input.to(dtype)
    check_float(input, fname)
    if input.is_complex():
        raise TypeError(f"{fname}: complex input is not supported (StableMax is defined for real x)")
    return _stablemax_op(input, check_dim(dim, input.ndim, fname), log)


def stablemax(input: Tensor, dim: int = -1, *, dtype: torch.dtype | None = None) -> Tensor:
    """StableMax (Prieto et al. 2025) computed by :func:`normax.stablemax`, with autograd.

    Parameters
    ----------
    input : Tensor
        Floating-point CPU or CUDA tensor, any strides.
    dim : int, default -1
        Dimension the result sums to one over.
    dtype : torch.dtype, optional
        Cast `input` to this dtype first, as ``torch.softmax`` does.

    Returns
    -------
    Tensor
        ``s(x) / sum(s(x), dim)``, s(x) = x + 1 for x >= 0, 1 / (1 - x) below; same shape and
        dtype as `input`.

    Notes
    -----
    The backward is ``y * (dy - sum(dy * y)) / (1 + |x|)`` in torch ops (so a second derivative
    works), float16/bfloat16 in float32.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.stablemax(torch.tensor([-1.0, 0.0, 1.0]))
    tensor([0.1429, 0.2857, 0.5714])
    """
    return _public(input, dim, dtype, False, "normax.torch.stablemax")


def log_stablemax(input: Tensor, dim: int = -1, *, dtype: torch.dtype | None = None) -> Tensor:
    """log of :func:`stablemax`, computed by :func:`normax.log_stablemax`, with autograd.

    Parameters
    ----------
    input : Tensor
        Floating-point CPU or CUDA tensor.
    dim : int, default -1
        Dimension to normalize over.
    dtype : torch.dtype, optional
        Cast `input` to this dtype first.

    Returns
    -------
    Tensor
        ``log s(x) - log(sum(s(x), dim))``; same shape and dtype as `input`.

    Notes
    -----
    The backward is ``(dy - exp(y) * sum(dy)) / (1 + |x|)`` in torch ops.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.log_stablemax(torch.zeros(2))
    tensor([-0.6931, -0.6931])
    """
    return _public(input, dim, dtype, True, "normax.torch.log_stablemax")


def stablemax_logits(input: Tensor, softcap: float | None, temperature: float = 1.0) -> Tensor:
    """phi = log s(x') (x' the logits divided by `temperature`, then softcapped) in torch ops: the
    softmax cross-entropy of phi is the StableMax one, and autograd chains its gradient through
    phi' = 1 / (1 + |x'|).

    CPU tensors are taken to float64 first (as the NumPy path does: phi's rounding must not reach
    the loss of a dominant target); CUDA tensors to float32 (the CUDA kernels' arithmetic).
    """
    x = input.to(torch.float32 if input.is_cuda else torch.float64)
    if temperature != 1.0:
        x = x / temperature
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    # where() picks the branch whose derivative is right at 0 (1, not sign(0) = 0); the clamps keep
    # the other branch finite, so its zero cotangent never meets an infinite derivative.
    return torch.where(x >= 0, torch.log1p(x.clamp(min=0)), -torch.log1p((-x).clamp(min=0)))
