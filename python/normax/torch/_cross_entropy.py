"""cross_entropy: custom ops, fake kernels, autograd, CUDA kernels, the public function (the CUDA
thin path's ops: ``_cross_entropy_cuda``; what linear_cross_entropy shares: ``_ce_options``).

Every op takes the loss options as the fields of :class:`normax._options.CeOptions` (Python
scalars, as custom-op schemas want), checked once by ``ce_options`` at the public function (the
NumPy API's checks and messages); the ops rebuild the options object from them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _cross_entropy as cpu
from .._backends import cuda
from .._cross_entropy import CrossEntropyStats
from .._options import CeOptions
from .._stablemax import check_normalizer
from . import _cuda
from ._ce_options import (
    as_stats,
    check_extras,
    checked_options,
    options_of,
    refuse_on_cuda,
    stat_dtype,
    stats_fake,
    stats_tensors,
)
from ._convert import absent, check_float, dense, host, host_opt, needs_grad, to_tensor
from ._cpu import cross_entropy as thin_cross_entropy
from ._cross_entropy_cuda import ce_cuda_op, thin_cuda_route
from ._op import op
from ._softmax import log_softmax_op
from ._stablemax import stablemax_logits
from ._vocab_parallel import maybe_vocab_parallel

_FNAME = "normax.torch.cross_entropy"


# Every op's schema ends with `temperature` and `token_weight` (defaults 1.0 and None: calls that
# predate them still work); the options sit between the tensors and those two, in CeOptions's order.
_CE_INPUTS = 11  # the inputs of cross_entropy and cross_entropy_with_grad


def _cpu(
    input,
    target,
    weight,
    axis,
    opts: CeOptions,
    with_grad: bool,
    grad_loss=None,
    token_weight=None,
    stats=False,
):
    """The NumPy-first op on the tensors' memory: (loss, dlogits or None, stats or None), loss and
    dlogits in the input's dtype (its common call goes straight to the kernel, see
    ``normax._cross_entropy``), stats as :func:`stats_tensors`."""
    if grad_loss is None and token_weight is None and not stats:
        thin = thin_cross_entropy(input, target, weight, axis, opts, with_grad)
        if thin is not None:
            return thin + (None,)
    grad_output = 1.0 if grad_loss is None else host(grad_loss)
    r = cpu.checked_cross_entropy(
        host(input), host(target), axis, host_opt(weight), opts, False, with_grad, grad_output,
        token_weight=host_opt(token_weight), return_stats=stats,
    )  # fmt: skip
    r = r if with_grad or stats else (r,)
    loss, grad = r[0], r[1] if with_grad else None
    return (
        to_tensor(loss, input.dtype),
        None if grad is None else to_tensor(grad, input.dtype),
        stats_tensors(r[-1], stat_dtype(input)) if stats else None,
    )


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
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
) -> Tensor:
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    return _cpu(input, target, weight, axis, opts, False, token_weight=token_weight)[0]


@_cross_entropy_op.register_fake
def _cross_entropy_fake(input, target, weight, axis, ignore_index, reduction, *_):
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
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    return _cpu(input, target, weight, axis, opts, True, token_weight=token_weight)[:2]


@_cross_entropy_with_grad_op.register_fake
def _cross_entropy_with_grad_fake(input, target, weight, axis, ignore_index, reduction, *_):
    return input.new_empty(_loss_shape(input, axis, reduction)), input.new_empty(input.shape)


@op("normax::cross_entropy_stats")
def _cross_entropy_stats_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    axis: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    temperature: float,
    token_weight: Tensor | None,
    with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dlogits, lse, entropy, correct, z_loss): cross_entropy (`with_grad` False: dlogits
    empty) or cross_entropy_with_grad, and the statistics, from the same pass over the logits."""
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    loss, grad, stats = _cpu(
        input, target, weight, axis, opts, with_grad, token_weight=token_weight, stats=True
    )
    return (loss, absent(input) if grad is None else grad, *stats)


@_cross_entropy_stats_op.register_fake
def _cross_entropy_stats_fake(input, target, weight, axis, ignore_index, reduction, *args):
    grad = input.new_empty(input.shape) if args[-1] else absent(input)
    return (input.new_empty(_loss_shape(input, axis, reduction)), grad) + stats_fake(
        input, _loss_shape(input, axis, "none"), stat_dtype(input)
    )


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
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[1], inputs[0])


def _with_grad_grad(ctx, grad_loss: Tensor, *_):
    dlogits, input = ctx.saved_tensors
    # The per-row gradient is linear in the row's loss gradient: scale the one formed in the forward.
    return (scale_grad_op(dlogits, grad_loss, ctx.axis, input),) + (None,) * (ctx.num_inputs - 1)


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
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
) -> Tensor:
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    return _cpu(input, target, weight, axis, opts, True, grad_loss, token_weight)[1]


@_cross_entropy_backward_op.register_fake
def _cross_entropy_backward_fake(input, *_):
    return input.new_empty(input.shape)


def _loss_setup(ctx, inputs, output) -> None:
    input, target, weight = inputs[:3]
    token_weight = inputs[_CE_INPUTS - 1]
    ctx.options = inputs[3 : _CE_INPUTS - 1]  # axis ... temperature
    ctx.num_inputs = len(inputs)
    ctx.has_weight, ctx.has_token_weight = weight is not None, token_weight is not None
    if isinstance(output, tuple):  # the statistics op's: only the loss is differentiable
        ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(
        input, target, *(absent(input) if t is None else t for t in (weight, token_weight))
    )  # fmt: skip


def _target_grad(input, weight, token_weight, grad_loss, options) -> Tensor:
    """d loss / d target for class probabilities, as torch differentiates them.

    Each row's loss is ``-u_r * sum_c w_c * t'_c * log_softmax(z)_c`` (z the tempered, capped
    logits, u the token weight) with ``t' = (1 - ls) * t + ls / C``, so the gradient is
    ``-(1 - ls) * u_r * w * log_softmax(z)``, scaled by the incoming gradient ("mean" divides by
    the number of rows, or the token weights' sum, with or without class weights, as torch);
    z_loss does not depend on the target. Torch ops and normax's log_softmax: differentiable again.
    """
    axis, _, reduction, label_smoothing, _, softcap, temperature = options
    x = input if temperature == 1.0 else input / temperature
    x = x if softcap is None else softcap * torch.tanh(x / softcap)
    g = log_softmax_op(x, axis) * -(1.0 - label_smoothing)
    if weight is not None:
        g = g * weight.reshape([-1 if i == axis else 1 for i in range(input.ndim)])
    if token_weight is not None:
        g = g * token_weight.unsqueeze(axis)
    if reduction == "none":
        return g * grad_loss.unsqueeze(axis)
    if reduction == "mean":
        rows = (
            input.numel() // input.shape[axis]
            if token_weight is None
            else token_weight.sum(dtype=torch.float64)
        )
        grad_loss = grad_loss / rows
    return g * grad_loss


def _loss_grad(ctx, grad_loss: Tensor, *_):
    # The gradient formed in the backward, from the loss's own gradient: one kernel writes it,
    # already scaled (the CUDA path, a target that requires grad; on the CPU, nt.cross_entropy
    # otherwise fuses it into the forward).
    input, target, weight, token_weight = ctx.saved_tensors
    weight = weight if ctx.has_weight else None
    token_weight = token_weight if ctx.has_token_weight else None
    dlogits = dtarget = None
    if ctx.needs_input_grad[0]:
        dlogits = _cross_entropy_backward_op(input, target, weight, grad_loss, *ctx.options, token_weight)
    if ctx.needs_input_grad[1]:
        dtarget = _target_grad(input, weight, token_weight, grad_loss, ctx.options).to(target.dtype)
    return (dlogits, dtarget) + (None,) * (ctx.num_inputs - 2)


_cross_entropy_op.register_autograd(_loss_grad, setup_context=_loss_setup)


def _stats_setup(ctx, inputs, output) -> None:
    ctx.with_grad = inputs[-1]
    (_with_grad_setup if ctx.with_grad else _loss_setup)(ctx, inputs, output)


def _stats_grad(ctx, grad_loss: Tensor, *_):
    return (_with_grad_grad if ctx.with_grad else _loss_grad)(ctx, grad_loss)


_cross_entropy_stats_op.register_autograd(_stats_grad, setup_context=_stats_setup)


# CUDA: bad class indices fail a device-side assertion, as in torch's own kernel: no host sync.


@_cross_entropy_op.register_kernel("cuda")
def _cross_entropy_cuda(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap, temperature=1.0,
    token_weight=None,
):  # fmt: skip
    refuse_on_cuda("cross_entropy", temperature, token_weight, False)
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    loss = cuda.cross_entropy_rows(_FNAME, input, target, axis, weight, opts, False, False, sync_check=False)
    return dense(loss)


@_cross_entropy_with_grad_op.register_kernel("cuda")
def _cross_entropy_with_grad_cuda(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap, temperature=1.0,
    token_weight=None,
):  # fmt: skip
    refuse_on_cuda("cross_entropy", temperature, token_weight, False)
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    loss, grad = cuda.cross_entropy_rows(
        _FNAME, input, target, axis, weight, opts, False, True, sync_check=False
    )
    return dense(loss), dense(grad)


@_cross_entropy_backward_op.register_kernel("cuda")
def _cross_entropy_backward_cuda(
    input, target, weight, grad_loss, axis, ignore_index, reduction, label_smoothing, z_loss, softcap,
    temperature=1.0, token_weight=None,
):  # fmt: skip
    refuse_on_cuda("cross_entropy", temperature, token_weight, False)
    # grad_loss stays on the device: the kernel reads its scale from there (no sync).
    opts = options_of(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    _, grad = cuda.cross_entropy_rows(
        _FNAME, input, target, axis, weight, opts, False, True, grad_loss, sync_check=False
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
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
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
    temperature : float, default 1.0
        The logits are divided by it before everything else (before the softcap); the gradient
        carries the 1/T. Finite and > 0 (ValueError).
    token_weight : Tensor, optional
        Per-row weights shaped like the per-row loss ((N,) for (N, C) input), any real dtype,
        multiplying each row's loss, z-loss term and gradient; "mean" then divides by the sum
        over the rows not ignored of token weight x class weight of the target (the token
        weights' sum for probability targets; a zero sum gives NaN, as torch's weighted mean).
        Not differentiable: one that requires grad raises RuntimeError, as torch does for
        ``nll_loss``'s weight.
    return_stats : bool, default False
        Also return a :class:`normax.CrossEntropyStats` of per-row metrics from the same pass
        over the logits (see Returns). No gradient flows through them.

    Returns
    -------
    Tensor
        0-d for "mean" and "sum", else shaped like `target` (hard) or `input` without the class
        dimension.
    CrossEntropyStats
        With `return_stats` only: ``lse`` and ``entropy`` per row (shaped like the per-row loss;
        float64 for float64 input, float32 otherwise) of the tempered, capped logits' softmax,
        ``correct`` (bool: the argmax of `input` over the classes equals the target, the
        target's own argmax for probabilities; False on ignored rows, where lse and entropy are
        0) and ``z_loss``, the z-loss term of the loss (0-d, reduced as the loss).
        Non-differentiable outputs.

    Notes
    -----
    When `input` requires grad, one normax call returns the loss and its gradient together (two
    reads of the logits in all); the backward only scales that gradient by the incoming one. A
    probability `target` that requires grad gets torch's gradient, ``-(1 - label_smoothing) *
    weight * log_softmax(input)`` scaled as the reduction says (then the logits' gradient is formed
    in the backward). No gradient flows to `weight`. The positional order and defaults are
    exactly torch's (``size_average`` and ``reduce`` included); ``z_loss``, ``softcap``,
    ``normalizer``, ``temperature``, ``token_weight`` and ``return_stats`` are keyword-only
    additions. CUDA tensors take neither `temperature`, `token_weight` nor `return_stats` yet
    (NotImplementedError).

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3]))
    tensor(1.3863)
    """
    check_float(input, _FNAME)
    if not isinstance(target, Tensor):
        raise TypeError(f"{_FNAME}: target must be a torch.Tensor, got {type(target).__name__}")
    check_extras(_FNAME, token_weight, return_stats)
    if size_average is not None or reduce is not None:
        # torch's own legacy mapping and its deprecation warning.
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    stablemax = check_normalizer(normalizer)
    # Logits that are a DTensor sharded on the class axis: the vocabulary-parallel loss (softmax);
    # the options it did not always take are passed only when given.
    extra = {} if temperature == 1.0 else {"temperature": temperature}
    extra.update({} if token_weight is None else {"token_weight": token_weight})
    vocab_parallel = None if stablemax else maybe_vocab_parallel(
        input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, **extra,
    )  # fmt: skip
    if vocab_parallel is not None:
        if return_stats:
            raise NotImplementedError(
                f"{_FNAME}: return_stats=True with vocabulary-parallel (DTensor) logits"
            )
        return vocab_parallel
    checked = checked_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    ignore_index, reduction, label_smoothing, z_loss, softcap, temperature = checked
    if _cuda.on_cuda(input):
        refuse_on_cuda("cross_entropy", temperature, token_weight, return_stats)
    if stablemax:
        # The softmax cross-entropy of phi(z), z the tempered, capped logits (in float64 on the CPU).
        out = cross_entropy(
            stablemax_logits(input, softcap, temperature), target, weight, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, token_weight=token_weight,
            return_stats=return_stats,
        )  # fmt: skip
        if not return_stats:
            return out.to(input.dtype)
        dtype = stat_dtype(input)
        lse, entropy, correct, z = out[1]
        return out[0].to(input.dtype), CrossEntropyStats(
            lse.to(dtype), entropy.to(dtype), correct, z.to(dtype)
        )
    if thin_cuda_route(input, target):
        input, target = input.contiguous(), target.contiguous()
        return ce_cuda_op(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)[0]
    axis = 1 if input.ndim >= 2 else 0
    args = (
        input,
        target,
        weight,
        axis,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        temperature,
    )
    # CPU with a gradient: loss and gradient in one pass over the logits; the backward only scales
    # it. (A target that requires grad takes the other ops: their backward differentiates both,
    # and a second derivative through the target then raises instead of missing that term.)
    fused = needs_grad(input) and not _cuda.on_cuda(input) and not needs_grad(target)
    if return_stats:
        out = _cross_entropy_stats_op(*args, token_weight, fused)
        return out[0], as_stats(out)
    if fused:
        return _cross_entropy_with_grad_op(*args, token_weight)[0]
    # CUDA's general path (probabilities, more dimensions) or no gradient: the loss alone; its
    # backward writes the scaled gradient in one kernel.
    return _cross_entropy_op(*args, token_weight)
