"""cross_entropy and linear_cross_entropy: custom ops, fake kernels, autograd, CUDA kernels, public functions.

Every op takes the loss options as the fields of :class:`normax._options.CeOptions`, in its order,
checked once by ``ce_options`` (the NumPy API's checks and messages).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _cross_entropy as cpu
from .._backends import cuda
from .._options import CeOptions, ce_options
from .._stablemax import check_normalizer
from ._convert import absent, check_float, dense, host, host_opt, needs_grad, to_tensor
from ._softmax import _log_softmax_op
from ._stablemax import stablemax_logits

_FNAME = "normax.torch.cross_entropy"
_LINEAR_FNAME = "normax.torch.linear_cross_entropy"


@torch.compiler.assume_constant_result
def _checked_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> CeOptions:
    # Python scalars in, a constant out: torch.compile runs the NumPy API's checks once while
    # tracing instead of tracing into them.
    return ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)


def _loss_shape(input: Tensor, axis: int, reduction: str) -> list[int]:
    if reduction != "none":
        return []
    return [s for i, s in enumerate(input.shape) if i != axis]


# ---------------------------------------------------------------------------------------------
# cross_entropy


@torch.library.custom_op("normax::cross_entropy", mutates_args=())
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
    opts = CeOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)._asdict()
    loss = cpu.cross_entropy(host(input), host(target), axis=axis, weight=host_opt(weight), **opts)
    return to_tensor(loss, input.dtype)


@_cross_entropy_op.register_fake
def _cross_entropy_fake(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    return input.new_empty(_loss_shape(input, axis, reduction))


@torch.library.custom_op("normax::cross_entropy_with_grad", mutates_args=())
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
    opts = CeOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)._asdict()
    loss, dlogits = cpu.cross_entropy_with_grad(
        host(input), host(target), axis=axis, weight=host_opt(weight), **opts
    )
    return to_tensor(loss, input.dtype), to_tensor(dlogits, input.dtype)


@_cross_entropy_with_grad_op.register_fake
def _cross_entropy_with_grad_fake(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    return input.new_empty(_loss_shape(input, axis, reduction)), input.new_empty(input.shape)


@torch.library.custom_op("normax::scale_grad", mutates_args=())
def _scale_grad_op(g: Tensor, scale: Tensor, dim: int, anchor: Tensor) -> Tensor:
    """``g * scale``, `scale` 0-d or shaped like `g` without `dim` (a per-row loss's gradient).

    `g` is a gradient the forward formed (saved, so no longer connected to the forward's input).
    `anchor` is that input, unused here: under ``create_graph=True`` it makes the result depend
    on it through this op, which has no autograd formula, so a second derivative raises instead
    of silently missing this term.
    """
    if scale.ndim:
        scale = scale.unsqueeze(dim)
    return (g * scale).to(g.dtype)


@_scale_grad_op.register_fake
def _scale_grad_fake(g, scale, dim, anchor):
    return g.new_empty(g.shape)


def _with_grad_setup(ctx, inputs, output) -> None:
    ctx.axis = inputs[3]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], inputs[0])


def _with_grad_grad(ctx, grad_loss: Tensor, _grad_dlogits):
    dlogits, input = ctx.saved_tensors
    # The per-row gradient is linear in the row's loss gradient: scale the one formed in the forward.
    return (_scale_grad_op(dlogits, grad_loss, ctx.axis, input),) + (None,) * 8


_cross_entropy_with_grad_op.register_autograd(_with_grad_grad, setup_context=_with_grad_setup)


@torch.library.custom_op("normax::cross_entropy_backward", mutates_args=())
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
    opts = CeOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)._asdict()
    _, dlogits = cpu.cross_entropy_with_grad(
        host(input), host(target), axis=axis, weight=host_opt(weight), grad_output=host(grad_loss), **opts
    )
    return to_tensor(dlogits, input.dtype)


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
    g = _log_softmax_op(x, axis) * -(1.0 - label_smoothing)
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
def _cross_entropy_cuda(input, target, weight, axis, *opts):
    loss = cuda.cross_entropy_rows(_FNAME, input, target, axis, weight, *opts, False, sync_check=False)
    return dense(loss)


@_cross_entropy_with_grad_op.register_kernel("cuda")
def _cross_entropy_with_grad_cuda(input, target, weight, axis, *opts):
    loss, grad = cuda.cross_entropy_rows(_FNAME, input, target, axis, weight, *opts, True, sync_check=False)
    return dense(loss), dense(grad)


@_cross_entropy_backward_op.register_kernel("cuda")
def _cross_entropy_backward_cuda(input, target, weight, grad_loss, axis, *opts):
    # grad_loss stays on the device: the kernel reads its scale from there (no sync).
    _, grad = cuda.cross_entropy_rows(
        _FNAME, input, target, axis, weight, *opts, True, grad_loss, sync_check=False
    )
    return dense(grad)


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
    opts = _checked_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if check_normalizer(normalizer):
        phi = stablemax_logits(input, opts.softcap)
        loss = cross_entropy(
            phi,
            target,
            weight,
            ignore_index=opts.ignore_index,
            reduction=opts.reduction,
            label_smoothing=opts.label_smoothing,
            z_loss=opts.z_loss,
        )
        return loss.to(input.dtype)
    axis = 1 if input.ndim >= 2 else 0
    if needs_grad(input) and not input.is_cuda and not needs_grad(target):
        # CPU: loss and gradient in one pass over the logits; the backward only scales it. (A
        # target that requires grad takes the other op: its backward differentiates both, and a
        # second derivative through the target then raises instead of missing that term.)
        loss, _ = _cross_entropy_with_grad_op(input, target, weight, axis, *opts)
        return loss
    # CUDA (or no gradient): the loss alone; its backward writes the scaled gradient in one
    # kernel, which is fewer passes over the logits than forming it here and scaling it later.
    return _cross_entropy_op(input, target, weight, axis, *opts)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy


@torch.library.custom_op("normax::linear_cross_entropy", mutates_args=())
def _linear_ce_op(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> Tensor:
    opts = CeOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)._asdict()
    loss = cpu.linear_cross_entropy(
        host(input), host(weight), host(target), bias=host_opt(bias), chunk_size=chunk_size, **opts
    )
    return to_tensor(loss, input.dtype)


def _linear_loss_fake(input: Tensor, reduction: str) -> Tensor:
    return input.new_empty([input.shape[0]] if reduction == "none" else [])


@_linear_ce_op.register_fake
def _linear_ce_fake(
    input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size
):
    return _linear_loss_fake(input, reduction)


@torch.library.custom_op("normax::linear_cross_entropy_with_grad", mutates_args=())
def _linear_ce_with_grad_op(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    grad_output: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = CeOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)._asdict()
    loss, dh, dw, db = cpu.linear_cross_entropy_with_grad(
        host(input),
        host(weight),
        host(target),
        bias=host_opt(bias),
        chunk_size=chunk_size,
        grad_output=1.0 if grad_output is None else host(grad_output),
        **opts,
    )
    db = absent(input) if db is None else to_tensor(db, bias.dtype)
    return to_tensor(loss, input.dtype), to_tensor(dh, input.dtype), to_tensor(dw, weight.dtype), db


@_linear_ce_with_grad_op.register_fake
def _linear_ce_with_grad_fake(
    input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size,
    grad_output,
):  # fmt: skip
    db = absent(input) if bias is None else bias.new_empty(bias.shape)
    return (
        _linear_loss_fake(input, reduction),
        input.new_empty(input.shape),
        weight.new_empty(weight.shape),
        db,
    )


def _linear_ce_with_grad_setup(ctx, inputs, output) -> None:
    # Scalar reductions: the forward formed the gradients (for grad_output = 1); keep them.
    ctx.has_bias = inputs[3] is not None
    for t in output[1:]:
        ctx.mark_non_differentiable(t)
    ctx.save_for_backward(*output[1:], inputs[0], inputs[1])


def _linear_ce_with_grad_grad(ctx, grad_loss, *_):
    dh, dw, db, input, weight = ctx.saved_tensors
    scaled = [_scale_grad_op(g, grad_loss, 0, anchor) for g, anchor in ((dh, weight), (dw, input))]
    dbias = _scale_grad_op(db, grad_loss, 0, input) if ctx.has_bias else None
    return (scaled[0], scaled[1], None, dbias) + (None,) * 7


_linear_ce_with_grad_op.register_autograd(_linear_ce_with_grad_grad, setup_context=_linear_ce_with_grad_setup)


def _linear_ce_setup(ctx, inputs, output) -> None:
    # reduction="none": each row's gradient is scaled before the GEMMs, so the backward recomputes.
    ctx.args = inputs[4:]
    ctx.has_bias = inputs[3] is not None
    ctx.save_for_backward(*inputs[:3], inputs[3] if inputs[3] is not None else absent(inputs[0]))


def _linear_ce_grad(ctx, grad_loss):
    input, weight, target, bias = ctx.saved_tensors
    _, dh, dw, db = _linear_ce_with_grad_op(
        input, weight, target, bias if ctx.has_bias else None, *ctx.args, grad_loss
    )
    return (dh, dw, None, db if ctx.has_bias else None) + (None,) * 6


_linear_ce_op.register_autograd(_linear_ce_grad, setup_context=_linear_ce_setup)


# CUDA: blocked GEMMs and cross-entropy rows on the device; bad class indices fail a device-side
# assertion, as in torch: no host sync.


@_linear_ce_op.register_kernel("cuda")
def _linear_ce_cuda(input, weight, target, bias, *opts_and_chunk):
    loss = cuda.linear_blocks(
        _LINEAR_FNAME, input, weight, target, bias, *opts_and_chunk, False, sync_check=False
    )
    return loss.to(input.dtype)


@_linear_ce_with_grad_op.register_kernel("cuda")
def _linear_ce_with_grad_cuda(input, weight, target, bias, *opts_and_chunk_and_grad):
    *opts_and_chunk, grad_output = opts_and_chunk_and_grad
    g = 1.0 if grad_output is None else grad_output
    loss, dh, dw, db = cuda.linear_blocks(
        _LINEAR_FNAME, input, weight, target, bias, *opts_and_chunk, True, g, sync_check=False
    )
    db = absent(input) if db is None else db.to(bias.dtype)
    return loss.to(input.dtype), dh.to(input.dtype), dw.to(weight.dtype), db


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``cross_entropy(input @ weight.T + bias, target)`` without ever holding the logits.

    Parameters
    ----------
    input : Tensor
        (..., H) hidden states.
    weight : Tensor
        (V, H) classifier weight, as ``torch.nn.Linear.weight``.
    target : Tensor
        (...) class indices.
    bias : Tensor, optional
        (V,) classifier bias.
    ignore_index, reduction, label_smoothing, z_loss, softcap
        As in :func:`cross_entropy` (no class weights).
    chunk_size : int, optional
        Most logits held at once, in elements; see :func:`normax.linear_cross_entropy`.

    Returns
    -------
    Tensor
        0-d, or shaped like `target` for ``reduction="none"``.

    Notes
    -----
    Blocked GEMMs and the fused cross-entropy rows of :func:`normax.linear_cross_entropy`. With
    "mean" or "sum" the forward also forms dinput, dweight and dbias (for a unit loss gradient) and
    the backward scales them; with "none" the backward recomputes with the per-row gradients.
    torch >= 2.11 has ``torch.nn.functional.linear_cross_entropy(input, linear_weight, target, *,
    linear_bias=None, weight=None, ...)``: positional calls agree; there the bias is keyword-only
    ``linear_bias`` and ``weight=`` means class weights, which this op does not take.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.linear_cross_entropy(torch.ones(2, 3), torch.zeros(4, 3), torch.tensor([0, 1]))
    tensor(1.3863)
    """
    check_float(input, _LINEAR_FNAME)
    check_float(weight, _LINEAR_FNAME, "weight")
    if input.ndim < 1 or weight.ndim != 2:
        raise ValueError(
            f"{_LINEAR_FNAME}: expected input (..., H) and weight (V, H), got {tuple(input.shape)}, {tuple(weight.shape)}"
        )
    lead = input.shape[:-1]
    if tuple(target.shape) != tuple(lead):
        raise ValueError(
            f"{_LINEAR_FNAME}: target shape {tuple(target.shape)} does not match input's {tuple(lead)}"
        )
    opts = _checked_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if chunk_size is not None:
        chunk_size = int(chunk_size)
    h = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    if opts.reduction != "none" and needs_grad(input, weight, bias):
        loss = _linear_ce_with_grad_op(h, weight, t, bias, *opts, chunk_size, None)[0]
    else:
        loss = _linear_ce_op(h, weight, t, bias, *opts, chunk_size)
    return loss.reshape(lead) if opts.reduction == "none" else loss
