"""cross_entropy: custom ops, fake kernels, autograd, CUDA kernels, the public function.

Every op takes the loss options as the fields of :class:`normax._options.CeOptions` (Python
scalars, as custom-op schemas want), checked once by ``ce_options`` at the public function (the
NumPy API's checks and messages); the ops rebuild the options object from them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _cross_entropy as cpu
from .._backends import cuda
from .._options import CeOptions, ce_options
from .._stablemax import check_normalizer
from . import _cuda
from ._convert import absent, check_float, dense, host, host_opt, needs_grad, to_tensor
from ._op import op
from ._softmax import log_softmax_op
from ._stablemax import stablemax_logits
from ._vocab_parallel import maybe_vocab_parallel

_FNAME = "normax.torch.cross_entropy"


@functools.lru_cache(maxsize=256, typed=True)  # typed: True and 1.0 are different options
def _cached_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> CeOptions:
    return ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)


# The ops' options object from the scalars their schemas carry: one object per set of options.
options_of = functools.lru_cache(maxsize=256)(CeOptions)


@torch.compiler.assume_constant_result
def checked_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> tuple:
    # Python scalars in, a constant out: torch.compile runs the NumPy API's checks once while
    # tracing instead of tracing into them, and an eager training loop checks its (unchanging)
    # options once. A plain tuple of literals, not the CeOptions object: the custom ops' schemas
    # take Python scalars, and torch 2.11's dynamo cannot unpack a NamedTuple constant (it guards
    # on a constant source and fails the fullgraph compile) while it unpacks a tuple natively.
    try:
        opts = _cached_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    except TypeError:  # unhashable arguments: checked uncached (and most likely refused)
        opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return opts.ignore_index, opts.reduction, opts.label_smoothing, opts.z_loss, opts.softcap


def _cpu(input, target, weight, axis, opts: CeOptions, with_grad: bool, grad_loss=None):
    """The NumPy-first op on the tensors' memory: (loss, dlogits or None) as tensors of the input's
    dtype (its common call goes straight to the kernel, see ``normax._cross_entropy``)."""
    grad_output = 1.0 if grad_loss is None else host(grad_loss)
    r = cpu.checked_cross_entropy(
        host(input), host(target), axis, host_opt(weight), opts, False, with_grad, grad_output
    )
    loss, grad = r if with_grad else (r, None)
    return to_tensor(loss, input.dtype), None if grad is None else to_tensor(grad, input.dtype)


def _loss_shape(input: Tensor, axis: int, reduction: str) -> list[int]:
    if reduction != "none":
        return []
    return [s for i, s in enumerate(input.shape) if i != axis]


# ---------------------------------------------------------------------------------------------
# cross_entropy


@op("normax::cross_entropy")
def _cross_entropy_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    axis: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Tensor:
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _cpu(input, target, weight, axis, opts, False)[0]


@_cross_entropy_op.register_fake
def _cross_entropy_fake(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    return input.new_empty(_loss_shape(input, axis, reduction))


@op("normax::cross_entropy_with_grad")
def _cross_entropy_with_grad_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    axis: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _cpu(input, target, weight, axis, opts, True)


@_cross_entropy_with_grad_op.register_fake
def _cross_entropy_with_grad_fake(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    return input.new_empty(_loss_shape(input, axis, reduction)), input.new_empty(input.shape)


@op("normax::scale_grad")
def scale_grad_op(g: Tensor, scale: Tensor, dim: int, anchor: Tensor) -> Tensor:
    """``g * scale``, `scale` 0-d or shaped like `g` without `dim` (a per-row loss's gradient).

    `g` is a gradient the forward formed (saved, so no longer connected to the forward's input).
    `anchor` is that input, unused here: under ``create_graph=True`` it makes the result depend
    on it through this op, which has no autograd formula, so a second derivative raises instead
    of silently missing this term.
    """
    if scale.ndim:
        scale = scale.unsqueeze(dim)
    return (g * scale).to(g.dtype)


@scale_grad_op.register_fake
def _scale_grad_fake(g, scale, dim, anchor):
    return g.new_empty(g.shape)


def _with_grad_setup(ctx, inputs, output) -> None:
    ctx.axis = inputs[3]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], inputs[0])


def _with_grad_grad(ctx, grad_loss: Tensor, _grad_dlogits):
    dlogits, input = ctx.saved_tensors
    # The per-row gradient is linear in the row's loss gradient: scale the one formed in the forward.
    return (scale_grad_op(dlogits, grad_loss, ctx.axis, input),) + (None,) * 8


_cross_entropy_with_grad_op.register_autograd(_with_grad_grad, setup_context=_with_grad_setup)


@op("normax::cross_entropy_backward")
def _cross_entropy_backward_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad_loss: Tensor,
    axis: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Tensor:
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _cpu(input, target, weight, axis, opts, True, grad_loss)[1]


@_cross_entropy_backward_op.register_fake
def _cross_entropy_backward_fake(
    input, target, weight, grad_loss, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    return input.new_empty(input.shape)


def _loss_setup(ctx, inputs, output) -> None:
    input, target, weight = inputs[:3]
    ctx.options = inputs[3:]
    ctx.has_weight = weight is not None
    ctx.save_for_backward(input, target, weight if weight is not None else absent(input))


def _target_grad(input, weight, grad_loss, axis, reduction, label_smoothing, softcap) -> Tensor:
    """d loss / d target for class probabilities, as torch differentiates them.

    Each row's loss is ``-sum_c w_c * t'_c * log_softmax(x)_c`` with ``t' = (1 - ls) * t + ls / C``,
    so the gradient is ``-(1 - ls) * w * log_softmax(x)``, scaled by the incoming gradient ("mean"
    divides by the number of rows, with or without class weights, as torch); z_loss does not depend
    on the target. Torch ops and normax's log_softmax: differentiable again.
    """
    x = input if softcap is None else softcap * torch.tanh(input / softcap)
    g = log_softmax_op(x, axis) * -(1.0 - label_smoothing)
    if weight is not None:
        g = g * weight.reshape([-1 if i == axis else 1 for i in range(input.ndim)])
    if reduction == "none":
        return g * grad_loss.unsqueeze(axis)
    if reduction == "mean":
        grad_loss = grad_loss / (input.numel() // input.shape[axis])
    return g * grad_loss


def _loss_grad(ctx, grad_loss: Tensor):
    # The gradient formed in the backward, from the loss's own gradient: one kernel writes it,
    # already scaled (the CUDA path, a target that requires grad; on the CPU, nt.cross_entropy
    # otherwise fuses it into the forward).
    input, target, weight = ctx.saved_tensors
    weight = weight if ctx.has_weight else None
    dlogits = dtarget = None
    if ctx.needs_input_grad[0]:
        dlogits = _cross_entropy_backward_op(input, target, weight, grad_loss, *ctx.options)
    if ctx.needs_input_grad[1]:
        axis, _, reduction, label_smoothing, _, softcap = ctx.options
        g = _target_grad(input, weight, grad_loss, axis, reduction, label_smoothing, softcap)
        dtarget = g.to(target.dtype)
    return (dlogits, dtarget) + (None,) * 7


_cross_entropy_op.register_autograd(_loss_grad, setup_context=_loss_setup)


# CUDA: bad class indices fail a device-side assertion, as in torch's own kernel: no host sync.


@_cross_entropy_op.register_kernel("cuda")
def _cross_entropy_cuda(input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap):
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)
    loss = cuda.cross_entropy_rows(_FNAME, input, target, axis, weight, opts, False, False, sync_check=False)
    return dense(loss)


@_cross_entropy_with_grad_op.register_kernel("cuda")
def _cross_entropy_with_grad_cuda(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)
    loss, grad = cuda.cross_entropy_rows(_FNAME, input, target, axis, weight, opts, False, True, sync_check=False)
    return dense(loss), dense(grad)


@_cross_entropy_backward_op.register_kernel("cuda")
def _cross_entropy_backward_cuda(
    input, target, weight, grad_loss, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    # grad_loss stays on the device: the kernel reads its scale from there (no sync).
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)
    _, grad = cuda.cross_entropy_rows(
        _FNAME, input, target, axis, weight, opts, False, True, grad_loss, sync_check=False
    )
    return dense(grad)


# ---------------------------------------------------------------------------------------------
# The CUDA thin path, for class-index targets: a forward kernel that reduces the loss on the device
# and saves each row's float32 log-sum-exp, and a backward kernel that streams the gradient from
# it. One `_core` call each; the ops exist on CUDA only (the public function routes them there).


@op("normax::cross_entropy_cuda")
def _ce_cuda_op(
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


@_ce_cuda_op.register_fake
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


_ce_cuda_op.register_autograd(_ce_cuda_grad, setup_context=_ce_cuda_setup)


def _thin_cuda_route(input: Tensor, target: Tensor) -> bool:
    """Whether a call takes the CUDA thin path: contiguous-able (N, C) or (C,) logits of a kernel
    dtype, int64 class indices that need no gradient."""
    return (
        _cuda.on_cuda(input)
        and input.ndim <= 2
        and input.dtype in _cuda.KERNEL_DTYPES
        and target.dtype == torch.int64
        and not needs_grad(target)
    )


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: str = "softmax",
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` computed by :func:`normax.cross_entropy`, fused.

    Parameters
    ----------
    input : Tensor
        Logits, (C,), (N, C) or (N, C, d1, ...): the class dimension is 1 (0 for 1-d input).
    target : Tensor
        Class indices (integer, shaped like `input` without the class dimension) or class
        probabilities (floating, shaped like `input`).
    weight : Tensor, optional
        (C,) class weights.
    size_average, reduce : bool, optional
        Deprecated, as in torch: when either is not None, `reduction` is replaced by torch's
        legacy mapping (``reduce=False`` -> "none", else ``size_average=False`` -> "sum", else
        "mean"), with torch's UserWarning. Positions as in torch's signature.
    ignore_index, reduction, label_smoothing
        As in torch.
    z_loss : float, default 0.0
        PaLM's auxiliary term: ``z_loss * lse**2`` added to each counted row's loss.
    softcap : float, optional
        Logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2).
    normalizer : {"softmax", "stablemax"}, default "softmax"
        As in :func:`normax.cross_entropy`: "stablemax" is the loss of ``log_stablemax`` (Prieto
        et al. 2025), computed as the softmax cross-entropy of ``phi = sign(x) * log1p(|x|)``
        (in float64 for CPU tensors), autograd chaining the gradient through phi.

    Returns
    -------
    Tensor
        0-d for "mean" and "sum", else shaped like `target` (hard) or `input` without the class
        dimension.

    Notes
    -----
    When `input` requires grad, one normax call returns the loss and its gradient together (two
    reads of the logits in all); the backward only scales that gradient by the incoming one. A
    probability `target` that requires grad gets torch's gradient, ``-(1 - label_smoothing) *
    weight * log_softmax(input)`` scaled as the reduction says (then the logits' gradient is formed
    in the backward). No gradient flows to `weight`. The positional order and defaults are
    exactly torch's (``size_average`` and ``reduce`` included); ``z_loss`` and ``softcap`` are
    keyword-only additions.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3]))
    tensor(1.3863)
    """
    check_float(input, _FNAME)
    if not isinstance(target, Tensor):
        raise TypeError(f"{_FNAME}: target must be a torch.Tensor, got {type(target).__name__}")
    if size_average is not None or reduce is not None:
        # torch's own legacy mapping and its deprecation warning.
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    stablemax = check_normalizer(normalizer)
    # Logits that are a DTensor sharded on the class axis: the vocabulary-parallel loss (softmax).
    vocab_parallel = None if stablemax else maybe_vocab_parallel(
        input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )  # fmt: skip
    if vocab_parallel is not None:
        return vocab_parallel
    checked = checked_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    ignore_index, reduction, label_smoothing, z_loss, softcap = checked
    if stablemax:
        phi = stablemax_logits(input, softcap)
        loss = cross_entropy(
            phi,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
        )
        return loss.to(input.dtype)
    if _thin_cuda_route(input, target):
        input, target = input.contiguous(), target.contiguous()
        return _ce_cuda_op(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)[
            0
        ]
    axis = 1 if input.ndim >= 2 else 0
    if needs_grad(input) and not _cuda.on_cuda(input) and not needs_grad(target):
        # CPU: loss and gradient in one pass over the logits; the backward only scales it. (A
        # target that requires grad takes the other op: its backward differentiates both, and a
        # second derivative through the target then raises instead of missing that term.)
        loss, _ = _cross_entropy_with_grad_op(
            input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
        )
        return loss
    # CUDA's general path (probabilities, more dimensions) or no gradient: the loss alone; its
    # backward writes the scaled gradient in one kernel.
    return _cross_entropy_op(
        input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
    )
