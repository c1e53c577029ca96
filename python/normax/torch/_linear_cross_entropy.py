"""linear_cross_entropy: custom ops, fake kernels, autograd, CUDA kernels and the public function.

Signature and semantics of torch 2.15's ``torch.nn.functional.linear_cross_entropy``; the ops
take the loss options as the fields of :class:`normax._options.CeOptions`, in its order, except
that ``ignore_index`` may be None (torch's default: -100 for class indices, none for
probabilities).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _cross_entropy as cpu
from .._backends import cuda
from .._cross_entropy import CrossEntropyStats
from .._options import check_accumulation, check_chunk_size, linear_logits_shape, target_kind
from ._ce_options import (
    as_stats,
    check_extras,
    checked_options,
    options_chunk,
    options_of,
    refuse_on_cuda,
    stat_dtype,
    stats_fake,
    stats_tensors,
)
from ._convert import absent, check_float, host, host_opt, needs_grad, to_tensor
from ._cross_entropy import cross_entropy, scale_grad_op
from ._op import op

_FNAME = "normax.torch.linear_cross_entropy"


def _loss_dtype(input: Tensor) -> torch.dtype:
    """float32 on CUDA for float16/bfloat16 input (the kernels' float32 loss, not rounded to 16
    bits); the input's dtype otherwise, as torch."""
    return torch.float32 if input.is_cuda and input.dtype in (torch.float16, torch.bfloat16) else input.dtype


def _loss_shape(target: Tensor, reduction: str) -> list[int]:
    if reduction != "none":
        return []
    shape = list(target.shape)
    return shape[:1] + shape[2:] if target.is_floating_point() else shape


def _cpu(tensors, options, temperature, token_weight, with_grad: bool, grad_output=None, stats=False):
    """The NumPy-first linear cross-entropy on the tensors' memory: (loss, (dinput, dlinear_weight,
    dlinear_bias) or None, stats or None); `tensors` the ops' (input ... weight), `options` their
    (ignore_index ... chunk_size)."""
    input, linear_weight, target, linear_bias, weight = tensors
    ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size = options
    fn = cpu.linear_cross_entropy_with_grad if with_grad else cpu.linear_cross_entropy
    grad_output = {"grad_output": 1.0 if grad_output is None else host(grad_output)} if with_grad else {}
    r = fn(
        host(input), host(linear_weight), host(target), linear_bias=host_opt(linear_bias), weight=host_opt(weight),
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, chunk_size=chunk_size, temperature=temperature, token_weight=host_opt(token_weight),
        return_stats=stats, **grad_output,
    )  # fmt: skip
    r = r if with_grad or stats else (r,)
    grads = None
    if with_grad:
        dh, dw, db = r[1:4]
        db = absent(input) if db is None else to_tensor(db, linear_bias.dtype)
        grads = to_tensor(dh, input.dtype), to_tensor(dw, linear_weight.dtype), db
    stats = stats_tensors(r[-1], stat_dtype(input, linear_weight)) if stats else None
    return to_tensor(r[0], input.dtype), grads, stats


# The ops' schemas end with `temperature` and `token_weight` (defaults 1.0 and None: calls that
# predate them still work); _LEAD: the inputs before them (before grad_output in the with_grad op).
_LEAD = 12


@op("normax::linear_cross_entropy")
def _linear_ce_op(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None, weight: Tensor | None,
    ignore_index: int | None, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
    chunk_size: int | None, accumulation: str, temperature: float = 1.0, token_weight: Tensor | None = None,
) -> Tensor:  # fmt: skip
    # `accumulation` chooses the CUDA kernels' dweight sums; the CPU kernels sum in their own way.
    tensors = (input, linear_weight, target, linear_bias, weight)
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    return _cpu(tensors, options, temperature, token_weight, False)[0]


@_linear_ce_op.register_fake
def _linear_ce_fake(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, *_):
    return input.new_empty(_loss_shape(target, reduction), dtype=_loss_dtype(input))


@op("normax::linear_cross_entropy_with_grad")
def _linear_ce_with_grad_op(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None, weight: Tensor | None,
    ignore_index: int | None, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
    chunk_size: int | None, accumulation: str, grad_output: Tensor | None, temperature: float = 1.0,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    tensors = (input, linear_weight, target, linear_bias, weight)
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    loss, grads, _ = _cpu(tensors, options, temperature, token_weight, True, grad_output)
    return (loss, *grads)


def _grads_fake(input, linear_weight, linear_bias) -> tuple[Tensor, Tensor, Tensor]:
    db = absent(input) if linear_bias is None else linear_bias.new_empty(linear_bias.shape)
    return input.new_empty(input.shape), linear_weight.new_empty(linear_weight.shape), db


@_linear_ce_with_grad_op.register_fake
def _linear_ce_with_grad_fake(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, *_):
    loss = input.new_empty(_loss_shape(target, reduction), dtype=_loss_dtype(input))
    return (loss, *_grads_fake(input, linear_weight, linear_bias))


@op("normax::linear_cross_entropy_stats")
def _linear_ce_stats_op(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None, weight: Tensor | None,
    ignore_index: int | None, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
    chunk_size: int | None, accumulation: str, temperature: float, token_weight: Tensor | None, with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(loss, dinput, dlinear_weight, dlinear_bias, lse, entropy, correct, z_loss): the gradients
    (for a unit loss gradient) with `with_grad` only, else empty; the statistics from the same pass."""
    tensors = (input, linear_weight, target, linear_bias, weight)
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    loss, grads, stats = _cpu(tensors, options, temperature, token_weight, with_grad, stats=True)
    return (loss, *(grads or (absent(input), absent(input), absent(input))), *stats)


@_linear_ce_stats_op.register_fake
def _linear_ce_stats_fake(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, *args):
    loss = input.new_empty(_loss_shape(target, reduction), dtype=_loss_dtype(input))
    grads = (
        _grads_fake(input, linear_weight, linear_bias) if args[-1] else tuple(absent(input) for _ in range(3))
    )
    stats = stats_fake(input, _loss_shape(target, "none"), stat_dtype(input, linear_weight))
    return (loss, *grads, *stats)


def _with_grad_setup(ctx, inputs, output) -> None:
    # Scalar reductions: the forward formed the gradients (for grad_output = 1); keep them.
    ctx.has_bias = inputs[3] is not None
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:4], inputs[0], inputs[1])


def _scaled(grads, grad_loss, input, linear_weight, has_bias, num_inputs):
    # The anchors: under create_graph=True a second derivative raises (see scale_grad_op).
    dh, dw, db = grads
    dh = scale_grad_op(dh, grad_loss, 0, linear_weight)
    dw = scale_grad_op(dw, grad_loss, 0, input)
    db = scale_grad_op(db, grad_loss, 0, input) if has_bias else None
    return (dh, dw, None, db) + (None,) * (num_inputs - 4)


def _with_grad_grad(ctx, grad_loss, *_):
    dh, dw, db, input, linear_weight = ctx.saved_tensors
    return _scaled((dh, dw, db), grad_loss, input, linear_weight, ctx.has_bias, ctx.num_inputs)


# The direct (eager) route hands the gradients over instead: kept off save_for_backward, so that
# the backward can drop them, scale them in place and let autograd take them as .grad without a
# copy. A second backward through the graph (retain_graph=True) recomputes them.


def _with_grad_direct_setup(ctx, inputs, output, tail: int = _LEAD + 1) -> None:
    # `tail`: where temperature and token_weight are (the statistics op has no grad_output).
    ctx.has_bias = inputs[3] is not None
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    ctx.grads = output[1:4]
    ctx.inputs = inputs[:_LEAD], inputs[tail : tail + 2]
    ctx.stats = tail == _LEAD


def _with_grad_direct_grad(ctx, grad_loss, *_):
    lead, tail = ctx.inputs
    grads, ctx.grads = ctx.grads, None
    if grads is None and not ctx.stats:  # handed over already: recomputed for this grad_loss
        grads = _linear_ce_with_grad_op(*lead, grad_loss, *tail)[1:]
    else:
        if grads is None:  # recomputed as the forward formed them: the same bits as the first backward
            grads = _linear_ce_stats_op(*lead, *tail, True)[1:4]
        if torch.is_grad_enabled():  # create_graph=True: the custom op, which raises when differentiated
            return _scaled(grads, grad_loss, *lead[:2], ctx.has_bias, ctx.num_inputs)
        for g in grads[: 3 if ctx.has_bias else 2]:
            g.mul_(grad_loss)
    dh, dw, db = grads
    return (dh, dw, None, db if ctx.has_bias else None) + (None,) * (ctx.num_inputs - 4)


_linear_ce_with_grad_op.register_autograd(
    _with_grad_grad, setup_context=_with_grad_setup, direct=(_with_grad_direct_setup, _with_grad_direct_grad)
)


def _setup(ctx, inputs, output) -> None:
    # reduction="none" or a target that requires grad: the backward recomputes, with the
    # incoming gradient (each row's scale enters before the GEMMs).
    ctx.args, ctx.temperature = inputs[5:_LEAD], inputs[_LEAD]
    ctx.num_inputs = len(inputs)
    tensors = (*inputs[:5], inputs[_LEAD + 1])  # ..., weight, token_weight
    ctx.present = [t is not None for t in tensors]
    if isinstance(output, tuple):  # the statistics op's: only the loss is differentiable
        ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*(t if t is not None else absent(inputs[0]) for t in tensors))


def _target_grad(input, linear_weight, target, linear_bias, weight, token_weight, ctx, grad_loss) -> Tensor:
    # d loss / d target (probabilities): that of cross_entropy at these logits, which are then
    # formed (they are no larger than the target itself).
    _, reduction, label_smoothing, z_loss, softcap = ctx.args[:5]
    logits = input @ linear_weight.reshape(-1, input.shape[-1]).T
    if linear_bias is not None:
        logits = logits + linear_bias.reshape(-1)
    logits = logits.reshape(target.shape)
    with torch.enable_grad():
        t = target.detach().requires_grad_()
        loss = cross_entropy(
            logits.detach(), t, weight, reduction=reduction, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, temperature=ctx.temperature, token_weight=token_weight,
        )  # fmt: skip
        (g,) = torch.autograd.grad(loss, t, grad_loss)
    return g


def _grad(ctx, grad_loss, *_):
    saved = [t if present else None for t, present in zip(ctx.saved_tensors, ctx.present)]
    input, linear_weight, target, linear_bias, weight, token_weight = saved
    dh = dw = db = dt = None
    if any(ctx.needs_input_grad[i] for i in (0, 1, 3)):
        _, dh, dw, db = _linear_ce_with_grad_op(
            input,
            linear_weight,
            target,
            linear_bias,
            weight,
            *ctx.args,
            grad_loss,
            ctx.temperature,
            token_weight,
        )
        db = db if linear_bias is not None else None
    if ctx.needs_input_grad[2]:
        dt = _target_grad(input, linear_weight, target, linear_bias, weight, token_weight, ctx, grad_loss)
    return (dh, dw, dt, db) + (None,) * (ctx.num_inputs - 4)


_linear_ce_op.register_autograd(_grad, setup_context=_setup)


def _stats_setup(ctx, inputs, output, direct=False) -> None:
    ctx.with_grad = inputs[-1]
    if not ctx.with_grad:
        _setup(ctx, inputs, output)
    elif direct:
        _with_grad_direct_setup(ctx, inputs, output, _LEAD)
    else:
        _with_grad_setup(ctx, inputs, output)


def _stats_grad(ctx, grad_loss, *_):
    return (_with_grad_grad if ctx.with_grad else _grad)(ctx, grad_loss)


def _stats_direct_grad(ctx, grad_loss, *_):
    return (_with_grad_direct_grad if ctx.with_grad else _grad)(ctx, grad_loss)


_linear_ce_stats_op.register_autograd(
    _stats_grad,
    setup_context=_stats_setup,
    direct=(lambda ctx, inputs, output: _stats_setup(ctx, inputs, output, True), _stats_direct_grad),
)


# CUDA: blocked GEMMs and cross-entropy rows on the device; bad class indices fail a device-side
# assertion, as in torch: no host sync. The kernels take class indices and a (C, H) weight only.


def _cuda_options(linear_weight, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """The checked options object of the CUDA kernels (which take class indices, a (C, H) weight
    and no class weights only)."""
    if weight is not None or target.is_floating_point() or linear_weight.ndim != 2:
        raise NotImplementedError(
            f"{_FNAME}: no CUDA kernel for class weights, probability targets or a K-dimensional "
            "linear_weight (CPU tensors take them)"
        )
    ignore_index = -100 if ignore_index is None else ignore_index
    return options_of(ignore_index, reduction, label_smoothing, z_loss, softcap, 1.0)


@_linear_ce_op.register_kernel("cuda")
def _linear_ce_cuda(
    input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss,
    softcap, chunk_size, accumulation, temperature=1.0, token_weight=None,
):  # fmt: skip
    refuse_on_cuda("linear_cross_entropy", temperature, token_weight, False)
    opts = _cuda_options(
        linear_weight, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    # The loss is float32 (_loss_dtype: the CUDA inputs are float32, float16 or bfloat16).
    return cuda.linear_blocks(
        _FNAME, input, linear_weight, target, linear_bias, opts, chunk_size, False, sync_check=False,
        accumulation=accumulation,
    )  # fmt: skip


@_linear_ce_with_grad_op.register_kernel("cuda")
def _linear_ce_with_grad_cuda(
    input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss,
    softcap, chunk_size, accumulation, grad_output, temperature=1.0, token_weight=None,
):  # fmt: skip
    refuse_on_cuda("linear_cross_entropy", temperature, token_weight, False)
    opts = _cuda_options(
        linear_weight, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    g = 1.0 if grad_output is None else grad_output
    loss, dh, dw, db = cuda.linear_blocks(
        _FNAME, input, linear_weight, target, linear_bias, opts, chunk_size, True, g, sync_check=False,
        accumulation=accumulation,
    )  # fmt: skip
    db = absent(input) if db is None else db.to(linear_bias.dtype)
    return loss, dh.to(input.dtype), dw.to(linear_weight.dtype), db


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: torch.nn.LinearCrossEntropyOptions | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    accumulation: str = "float32",
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """``torch.nn.functional.linear_cross_entropy`` without ever holding all the logits.

    Parameters
    ----------
    input : Tensor
        (H,) or (N, H) hidden states. normax also takes (..., H) with a (C, H) `linear_weight`
        (the classes last; torch refuses more than 2 dimensions).
    linear_weight : Tensor
        (C, H), or (C, d1, ..., dK, H) for a K-dimensional loss (batched `input` only).
    target : Tensor
        Class indices, shaped like the logits (N, C, d1, ..., dK) without C, or class
        probabilities (floating, shaped like the logits), as torch.
    linear_bias : Tensor, optional
        (C,) or (C, d1, ..., dK).
    weight : Tensor, optional
        (C,) class weights.
    reduction, label_smoothing
        As in torch.
    ignore_index : int, optional
        As torch: None means -100 for class indices; not allowed with probability targets
        (ValueError; torch raises RuntimeError).
    options : torch.nn.LinearCrossEntropyOptions, optional
        Torch's chunking options. normax always works in blocks of rows; where torch would chunk,
        its ``batch_chunk_size`` (resolved as torch resolves ``chunking_method`` and
        ``acc_policy``, with torch's ValueError when the two disagree) sets the rows per block,
        and an ``acc_dtype`` torch does not support raises RuntimeError, as in torch.
        float16/bfloat16 GEMMs and rows always sum in float32 (`accumulation` sets what
        dlinear_weight is summed in across the blocks); ``allow_retain_graph`` is always granted
        (see Notes).
    z_loss : float, default 0.0
        PaLM's auxiliary term ``z_loss * lse**2``, per counted row (normax only).
    softcap : float, optional
        Logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2; normax only).
    chunk_size : int, optional
        Most logits held at once, in elements; see :func:`normax.linear_cross_entropy`. Takes
        precedence over `options`. None on CUDA: blocks of at most 256 MiB of logits (128 MiB
        with ``accumulation="input"``), see
        ``normax._backends.cuda.cross_entropy.linear_block_rows``.
    accumulation : {"float32", "input"}, default "float32"
        On CUDA, what dlinear_weight is summed in across the blocks of rows: a float32 buffer
        (4 x C x H bytes more while it runs, cast to the weight's dtype at the end), or
        ``"input"``, the inputs' dtype, added to in place (the low-memory mode for
        float16/bfloat16: no float32 (C, H) buffer, one 16-bit rounding per block). One block
        (all rows fit) needs neither: its GEMM writes dlinear_weight. The same for float32
        inputs; dlinear_bias is always summed in float32 (C values). CPU tensors ignore it
        (the CPU kernels' own sums).
    temperature, token_weight, return_stats
        As in :func:`cross_entropy` (normax only): the logits (bias included) are divided by
        `temperature`; `token_weight` is shaped like the per-row loss; CPU tensors only for now.

    Returns
    -------
    Tensor
        0-d, or the per-row losses for ``reduction="none"`` (shaped like class-index targets).
        float32 on CUDA for float16/bfloat16 inputs (the kernels' float32 loss; torch rounds it
        to the input's dtype); the input's dtype otherwise, as torch.
    CrossEntropyStats
        With `return_stats` only: as :func:`cross_entropy`'s, per row of the logits, from the
        same pass over each logits block; no gradient flows through them.

    Notes
    -----
    Blocked GEMMs and the fused cross-entropy rows of :func:`normax.linear_cross_entropy`. With
    "mean" or "sum" the forward also forms dinput, dlinear_weight and dlinear_bias (for a unit
    loss gradient) and the backward scales them; with "none", or a probability target that
    requires grad, the backward recomputes. On the eager path the scalar reductions' backward hands
    over the gradients the forward formed, scaled in place (no copy, no (N, H) or (C, H) zeros for
    the outputs without a gradient); a second backward through the same graph (retain_graph=True)
    recomputes them. A probability target's gradient is torch's
    (``-(1 - label_smoothing) * weight * log_softmax(logits)``, scaled by the reduction); no
    gradient flows to `weight`. On CUDA tensors, class indices with a (C, H) weight and no
    class weights run on the GPU; the rest raises NotImplementedError.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.linear_cross_entropy(torch.ones(2, 3), torch.zeros(4, 3), torch.tensor([0, 1]))
    tensor(1.3863)
    """
    check_float(input, _FNAME)
    check_float(linear_weight, _FNAME, "linear_weight")
    if not isinstance(target, Tensor):
        raise TypeError(f"{_FNAME}: target must be a torch.Tensor, got {type(target).__name__}")
    check_extras(_FNAME, token_weight, return_stats)
    lead = tuple(input.shape[:-1])
    if input.ndim > 2 and linear_weight.ndim == 2:  # normax's (..., H): rows of the classes last
        input = input.reshape(-1, input.shape[-1])
        target = target.reshape(-1, *target.shape[len(lead) :])
        if token_weight is not None and tuple(token_weight.shape[: len(lead)]) == lead:  # else refused below
            token_weight = token_weight.reshape(-1, *token_weight.shape[len(lead) :])
    bias_shape = None if linear_bias is None else tuple(linear_bias.shape)
    logits_shape = linear_logits_shape(tuple(input.shape), tuple(linear_weight.shape), bias_shape)
    integer = not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
    kind = "f" if target.is_floating_point() else "i" if integer else "?"
    soft = target_kind(tuple(target.shape), kind, target.dtype, logits_shape, input.ndim - 1)
    if soft and ignore_index is not None:
        raise ValueError(f"{_FNAME}: ignore_index cannot be given with probability targets (as in torch)")
    checked = checked_options(
        -100 if ignore_index is None else ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        temperature,
    )
    reduction, label_smoothing, z_loss, softcap, temperature = checked[1:]
    if input.is_cuda:
        refuse_on_cuda("linear_cross_entropy", temperature, token_weight, return_stats)
    chunk_size = check_chunk_size(chunk_size)
    accumulation = check_accumulation(accumulation)
    if options is not None:
        chunk = options_chunk(_FNAME, options, input, linear_weight, target, reduction, label_smoothing, soft)
        chunk_size = chunk if chunk_size is None else chunk_size
    unbatched = input.ndim == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
        token_weight = (
            token_weight if token_weight is None or token_weight.ndim else token_weight.unsqueeze(0)
        )
    # The ops take torch's ignore_index (None: -100 for class indices) and the checked fields.
    ignore = None if ignore_index is None else checked[0]
    args = (
        linear_bias,
        weight,
        ignore,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        chunk_size,
        accumulation,
    )
    with_grad = (
        reduction != "none" and needs_grad(input, linear_weight, linear_bias) and not needs_grad(target)
    )
    row_shape = () if unbatched else lead + tuple(logits_shape[2:])
    if return_stats:
        out = _linear_ce_stats_op(input, linear_weight, target, *args, temperature, token_weight, with_grad)
        lse, entropy, correct, z = as_stats(out)
        stats = CrossEntropyStats(
            lse.reshape(row_shape), entropy.reshape(row_shape), correct.reshape(row_shape), z
        )
        return out[0] if reduction != "none" else out[0].reshape(row_shape), stats
    if with_grad:
        return _linear_ce_with_grad_op(input, linear_weight, target, *args, None, temperature, token_weight)[
            0
        ]
    loss = _linear_ce_op(input, linear_weight, target, *args, temperature, token_weight)
    return loss if reduction != "none" else loss.reshape(row_shape)
