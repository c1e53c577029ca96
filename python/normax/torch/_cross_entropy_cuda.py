"""cross_entropy's CUDA thin path, for class-index targets: a forward kernel that reduces the loss
on the device and saves each row's float32 log-sum-exp, and a backward kernel that streams the
gradient from it. One ``_core`` call each; the ops exist on CUDA only (``nt.cross_entropy`` routes
them there)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _cuda
from ._ce_options import options_of
from ._convert import needs_grad
from ._op import op


@op("normax::cross_entropy_cuda")
def ce_cuda_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, workspace) of contiguous (N, C) or (C,) CUDA logits and int64 class indices.

    `lse` holds each row's float32 log-sum-exp, `workspace` the mean's denominator (float32, empty
    for reduction="none"): both are saved for the backward.
    """
    _cuda_only(input, "cross_entropy_cuda")
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _cuda.ce_forward(input, target, weight, opts)


def _cuda_only(input: Tensor, name: str) -> None:
    # The kernels read device addresses: a host tensor's would be an illegal address there.
    if not _cuda.on_cuda(input):
        raise NotImplementedError(f"normax::{name} takes CUDA tensors, got one on {input.device}")


@ce_cuda_op.register_fake
def _ce_cuda_fake(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    return _cuda.ce_forward_shapes(input, target, reduction)


@op("normax::cross_entropy_cuda_backward")
def _ce_cuda_backward_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    lse: Tensor,
    workspace: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Tensor:
    """d loss / d input from the forward's saved `lse` and `workspace`, scaled by `grad_loss`."""
    _cuda_only(input, "cross_entropy_cuda_backward")
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _cuda.ce_backward(input, target, weight, lse, workspace, grad_loss, opts)


@_ce_cuda_backward_op.register_fake
def _ce_cuda_backward_fake(
    input,
    target,
    weight,
    lse,
    workspace,
    grad_loss,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
):
    return input.new_empty(input.shape)


def _ce_cuda_setup(ctx, inputs, output) -> None:
    input, target, weight = inputs[:3]
    ctx.options = inputs[3:]
    ctx.has_weight = weight is not None
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(input, target, output[1], output[2], *(() if weight is None else (weight,)))


def _ce_cuda_grad(ctx, grad_loss, _grad_lse, _grad_workspace):
    input, target, lse, workspace, *weight = ctx.saved_tensors
    weight = weight[0] if ctx.has_weight else None
    dlogits = _ce_cuda_backward_op(input, target, weight, lse, workspace, grad_loss, *ctx.options)
    return (dlogits,) + (None,) * 7


ce_cuda_op.register_autograd(_ce_cuda_grad, setup_context=_ce_cuda_setup)


def thin_cuda_route(input: Tensor, target: Tensor) -> bool:
    """Whether a call takes the CUDA thin path: contiguous-able (N, C) or (C,) logits of a kernel
    dtype, int64 class indices that need no gradient."""
    return (
        _cuda.on_cuda(input)
        and input.ndim <= 2
        and input.dtype in _cuda.KERNEL_DTYPES
        and target.dtype == torch.int64
        and not needs_grad(target)
    )
