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
from .._options import check_accumulation, check_chunk_size, linear_logits_shape, target_kind
from ._convert import absent, check_float, host, host_opt, needs_grad, to_tensor
from ._cross_entropy import checked_options, cross_entropy, options_of, scale_grad_op
from ._op import op

_FNAME = "normax.torch.linear_cross_entropy"


def _opts(ignore_index, reduction, label_smoothing, z_loss, softcap) -> dict:
    return {
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
    }


def _loss_dtype(input: Tensor) -> torch.dtype:
    """float32 on CUDA for float16/bfloat16 input (the kernels' float32 loss, not rounded to 16
    bits); the input's dtype otherwise, as torch."""
    return torch.float32 if input.is_cuda and input.dtype in (torch.float16, torch.bfloat16) else input.dtype


def _loss_shape(target: Tensor, reduction: str) -> list[int]:
    if reduction != "none":
        return []
    shape = list(target.shape)
    return shape[:1] + shape[2:] if target.is_floating_point() else shape


@op("normax::linear_cross_entropy")
def _linear_ce_op(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    accumulation: str,
) -> Tensor:
    # `accumulation` chooses the CUDA kernels' dweight sums; the CPU kernels sum in their own way.
    loss = cpu.linear_cross_entropy(
        host(input),
        host(linear_weight),
        host(target),
        linear_bias=host_opt(linear_bias),
        weight=host_opt(weight),
        chunk_size=chunk_size,
        **_opts(ignore_index, reduction, label_smoothing, z_loss, softcap),
    )
    return to_tensor(loss, input.dtype)


@_linear_ce_op.register_fake
def _linear_ce_fake(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, *_):
    return input.new_empty(_loss_shape(target, reduction), dtype=_loss_dtype(input))


@op("normax::linear_cross_entropy_with_grad")
def _linear_ce_with_grad_op(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    accumulation: str,
    grad_output: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, dh, dw, db = cpu.linear_cross_entropy_with_grad(
        host(input),
        host(linear_weight),
        host(target),
        linear_bias=host_opt(linear_bias),
        weight=host_opt(weight),
        chunk_size=chunk_size,
        grad_output=1.0 if grad_output is None else host(grad_output),
        **_opts(ignore_index, reduction, label_smoothing, z_loss, softcap),
    )
    db = absent(input) if db is None else to_tensor(db, linear_bias.dtype)
    return to_tensor(loss, input.dtype), to_tensor(dh, input.dtype), to_tensor(dw, linear_weight.dtype), db


@_linear_ce_with_grad_op.register_fake
def _linear_ce_with_grad_fake(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, *_):
    db = absent(input) if linear_bias is None else linear_bias.new_empty(linear_bias.shape)
    return (
        input.new_empty(_loss_shape(target, reduction), dtype=_loss_dtype(input)),
        input.new_empty(input.shape),
        linear_weight.new_empty(linear_weight.shape),
        db,
    )


def _with_grad_setup(ctx, inputs, output) -> None:
    # Scalar reductions: the forward formed the gradients (for grad_output = 1); keep them.
    ctx.has_bias = inputs[3] is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:], inputs[0], inputs[1])


def _scaled(grads, grad_loss, input, linear_weight, has_bias):
    # The anchors: under create_graph=True a second derivative raises (see scale_grad_op).
    dh, dw, db = grads
    dh = scale_grad_op(dh, grad_loss, 0, linear_weight)
    dw = scale_grad_op(dw, grad_loss, 0, input)
    db = scale_grad_op(db, grad_loss, 0, input) if has_bias else None
    return (dh, dw, None, db) + (None,) * 9


def _with_grad_grad(ctx, grad_loss, *_):
    dh, dw, db, input, linear_weight = ctx.saved_tensors
    return _scaled((dh, dw, db), grad_loss, input, linear_weight, ctx.has_bias)


# The direct (eager) route hands the gradients over instead: kept off save_for_backward, so that
# the backward can drop them, scale them in place and let autograd take them as .grad without a
# copy. A second backward through the graph (retain_graph=True) recomputes them.


def _with_grad_direct_setup(ctx, inputs, output) -> None:
    ctx.has_bias = inputs[3] is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.grads = output[1:]
    ctx.inputs = inputs[:-1]  # without grad_output (None)


def _with_grad_direct_grad(ctx, grad_loss, *_):
    if ctx.grads is None:  # handed over already: recomputed for this grad_loss
        grads = _linear_ce_with_grad_op(*ctx.inputs, grad_loss)[1:]
    elif torch.is_grad_enabled():  # create_graph=True: the custom op, which raises when differentiated
        grads, ctx.grads = ctx.grads, None
        return _scaled(grads, grad_loss, *ctx.inputs[:2], ctx.has_bias)
    else:
        grads, ctx.grads = ctx.grads, None
        for g in grads[: 3 if ctx.has_bias else 2]:
            g.mul_(grad_loss)
    dh, dw, db = grads
    return (dh, dw, None, db if ctx.has_bias else None) + (None,) * 9


_linear_ce_with_grad_op.register_autograd(
    _with_grad_grad, setup_context=_with_grad_setup, direct=(_with_grad_direct_setup, _with_grad_direct_grad)
)


def _setup(ctx, inputs, output) -> None:
    # reduction="none" or a target that requires grad: the backward recomputes, with the
    # incoming gradient (each row's scale enters before the GEMMs).
    ctx.args = inputs[5:]
    ctx.has_bias, ctx.has_weight = inputs[3] is not None, inputs[4] is not None
    saved = [t if t is not None else absent(inputs[0]) for t in inputs[:5]]
    ctx.save_for_backward(*saved)


def _target_grad(input, linear_weight, target, linear_bias, weight, args, grad_loss) -> Tensor:
    # d loss / d target (probabilities): that of cross_entropy at these logits, which are then
    # formed (they are no larger than the target itself).
    _, reduction, label_smoothing, z_loss, softcap = args[:5]
    logits = input @ linear_weight.reshape(-1, input.shape[-1]).T
    if linear_bias is not None:
        logits = logits + linear_bias.reshape(-1)
    logits = logits.reshape(target.shape)
    with torch.enable_grad():
        t = target.detach().requires_grad_()
        loss = cross_entropy(
            logits.detach(), t, weight, reduction=reduction, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap,
        )  # fmt: skip
        (g,) = torch.autograd.grad(loss, t, grad_loss)
    return g


def _grad(ctx, grad_loss):
    input, linear_weight, target, linear_bias, weight = ctx.saved_tensors
    linear_bias = linear_bias if ctx.has_bias else None
    weight = weight if ctx.has_weight else None
    dh = dw = db = dt = None
    if any(ctx.needs_input_grad[i] for i in (0, 1, 3)):
        _, dh, dw, db = _linear_ce_with_grad_op(
            input, linear_weight, target, linear_bias, weight, *ctx.args, grad_loss
        )
        db = db if ctx.has_bias else None
    if ctx.needs_input_grad[2]:
        dt = _target_grad(input, linear_weight, target, linear_bias, weight, ctx.args, grad_loss)
    return (dh, dw, dt, db) + (None,) * 8


_linear_ce_op.register_autograd(_grad, setup_context=_setup)


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
    return options_of(ignore_index, reduction, label_smoothing, z_loss, softcap)


@_linear_ce_op.register_kernel("cuda")
def _linear_ce_cuda(
    input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss,
    softcap, chunk_size, accumulation,
):  # fmt: skip
    opts = _cuda_options(linear_weight, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    # The loss is float32 (_loss_dtype: the CUDA inputs are float32, float16 or bfloat16).
    return cuda.linear_blocks(
        _FNAME, input, linear_weight, target, linear_bias, opts, chunk_size, False, sync_check=False,
        accumulation=accumulation,
    )  # fmt: skip


@_linear_ce_with_grad_op.register_kernel("cuda")
def _linear_ce_with_grad_cuda(
    input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss,
    softcap, chunk_size, accumulation, grad_output,
):  # fmt: skip
    opts = _cuda_options(linear_weight, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    g = 1.0 if grad_output is None else grad_output
    loss, dh, dw, db = cuda.linear_blocks(
        _FNAME, input, linear_weight, target, linear_bias, opts, chunk_size, True, g, sync_check=False,
        accumulation=accumulation,
    )  # fmt: skip
    db = absent(input) if db is None else db.to(linear_bias.dtype)
    return loss, dh.to(input.dtype), dw.to(linear_weight.dtype), db


def _options_chunk(options, input, linear_weight, target, reduction, label_smoothing, soft) -> int | None:
    """The rows per block that torch's ``LinearCrossEntropyOptions`` asks for, as a number of
    logits, after torch's own checks; None where torch would not chunk (it then ignores them)."""
    if not isinstance(options, torch.nn.LinearCrossEntropyOptions):
        raise TypeError(
            f"{_FNAME}: options must be a torch.nn.LinearCrossEntropyOptions or None, got "
            f"{type(options).__name__}"
        )
    chunked = (
        label_smoothing == 0.0
        and linear_weight.ndim == 2
        and (target.dtype == torch.int64 or (soft and target.dtype == input.dtype and not needs_grad(target)))
    )
    if not chunked:
        return None
    n, features = input.shape if input.ndim == 2 else (1, input.shape[0])
    classes = linear_weight.shape[0]
    # torch's resolution of the "auto" fields (and its ValueError for a batch_chunk_size that
    # contradicts chunking_method), then its check of acc_dtype.
    resolved = options._adjust(
        num_batches=n, in_features=features, num_classes=classes, dtype=input.dtype,
        device=input.device, prob_target=soft,
    )  # fmt: skip
    acc = resolved.acc_dtype
    if acc != input.dtype and not (input.dtype in (torch.float16, torch.bfloat16) and acc == torch.float32):
        raise RuntimeError(
            f"{_FNAME}: acc_dtype {acc} is not supported with {input.dtype} input (torch takes "
            "float32 with float16/bfloat16 input, else the input's dtype)"
        )
    return resolved.batch_chunk_size * classes


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
) -> Tensor:
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

    Returns
    -------
    Tensor
        0-d, or the per-row losses for ``reduction="none"`` (shaped like class-index targets).
        float32 on CUDA for float16/bfloat16 inputs (the kernels' float32 loss; torch rounds it
        to the input's dtype); the input's dtype otherwise, as torch.

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
    lead = tuple(input.shape[:-1])
    if input.ndim > 2 and linear_weight.ndim == 2:  # normax's (..., H): rows of the classes last
        input = input.reshape(-1, input.shape[-1])
        target = target.reshape(-1, *target.shape[len(lead) :])
    bias_shape = None if linear_bias is None else tuple(linear_bias.shape)
    logits_shape = linear_logits_shape(tuple(input.shape), tuple(linear_weight.shape), bias_shape)
    integer = not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
    kind = "f" if target.is_floating_point() else "i" if integer else "?"
    soft = target_kind(tuple(target.shape), kind, target.dtype, logits_shape, input.ndim - 1)
    if soft and ignore_index is not None:
        raise ValueError(f"{_FNAME}: ignore_index cannot be given with probability targets (as in torch)")
    checked = checked_options(
        -100 if ignore_index is None else ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    reduction, label_smoothing, z_loss, softcap = checked[1:]
    chunk_size = check_chunk_size(chunk_size)
    accumulation = check_accumulation(accumulation)
    if options is not None:
        chunk = _options_chunk(options, input, linear_weight, target, reduction, label_smoothing, soft)
        chunk_size = chunk if chunk_size is None else chunk_size
    unbatched = input.ndim == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    # The ops take torch's ignore_index (None: -100 for class indices) and the checked fields.
    ignore = None if ignore_index is None else checked[0]
    args = (linear_bias, weight, ignore, reduction, label_smoothing, z_loss, softcap, chunk_size, accumulation)
    if reduction != "none" and needs_grad(input, linear_weight, linear_bias) and not needs_grad(target):
        loss = _linear_ce_with_grad_op(input, linear_weight, target, *args, None)[0]
    else:
        loss = _linear_ce_op(input, linear_weight, target, *args)
    if reduction != "none":
        return loss
    return loss.reshape(() if unbatched else lead + tuple(logits_shape[2:]))
