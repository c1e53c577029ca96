"""normax for PyTorch: drop-in ``torch.nn.functional`` functions and ``torch.nn`` modules.

    import normax.torch as nt
    y = nt.softmax(x, dim=-1)
    loss = nt.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)
    norm = nt.RMSNorm(4096)                  # a torch.nn.RMSNorm computed by normax
    nt.patch(model)                          # swap a model's nn.LayerNorm / nn.RMSNorm in place

Every op is a ``torch.library.custom_op`` (namespace ``normax``) with ``register_fake`` and
``register_autograd``: autograd, ``torch.compile(fullgraph=True)`` (no graph break at our ops) and
``torch.library.opcheck`` work. On the CPU the kernels run on NumPy views of the tensors' memory (no
copies); float32 and float64 compute as themselves, float16 in float32 inside the kernels, bfloat16
through a float32 copy; results come back in the input's dtype.

Differences from torch, stated once:

- CPU and CUDA tensors. CUDA tensors (float32, float16, bfloat16) run on normax's CUDA kernels
  (compiled by NVRTC at first use) on torch's current stream; the saved statistics are float32
  computed and kept as float64 like the CPU ones. Other devices raise NotImplementedError.
- Double backward is not supported: differentiating one of our backward passes raises a
  RuntimeError ("Trying to backward through normax.<op> ... but no autograd formula was
  registered", or "does not require grad" where the first gradient came out of a saved one);
  never a silently wrong second derivative. :func:`logsumexp` is the exception (its backward is
  plain torch ops, differentiable again).
- No gradient flows to a probability (float) ``target`` of :func:`cross_entropy` or to class
  ``weight`` tensors (torch differentiates the former).
- ``cross_entropy`` has no deprecated ``size_average``/``reduce`` arguments (the module keeps them),
  and adds ``z_loss`` and ``softcap``.

This module imports torch; ``import normax`` alone does not.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import _adapt, _cross_entropy, _cuda, _norms, _softmax

__all__ = [
    "CrossEntropyLoss",
    "LayerNorm",
    "LinearCrossEntropyLoss",
    "PowerNorm",
    "RMSNorm",
    "cross_entropy",
    "layer_norm",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "patch",
    "rms_norm",
    "softmax",
]


# ---------------------------------------------------------------------------------------------
# Tensors <-> NumPy


def _host(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (bfloat16: a float32 copy)."""
    if t.device.type != "cpu":
        raise NotImplementedError(
            f"normax.torch: got a tensor on {t.device}; this op has no kernel for that device (CUDA "
            "kernels cover softmax, log_softmax, logsumexp, cross_entropy and the norms) and normax "
            "does not copy device tensors to the host silently"
        )
    t = t.detach().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _host_opt(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else _host(t)


def _tensor(a, dtype: torch.dtype) -> Tensor:
    """A fresh C-contiguous tensor of `dtype` holding the NumPy result `a` (no copy when it fits)."""
    a = np.asarray(a)
    if not (a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative):
        a = a.copy(order="C")
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


def _absent(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _check_float(t: Tensor, fname: str, name: str = "input") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fname}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fname}: {name} must be a floating-point tensor, got {t.dtype}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax


@torch.library.custom_op("normax::softmax", mutates_args=())
def _softmax_op(x: Tensor, dim: int) -> Tensor:
    return _tensor(_softmax.softmax(_host(x), axis=dim), x.dtype)


@torch.library.custom_op("normax::softmax_backward", mutates_args=())
def _softmax_backward_op(y: Tensor, dy: Tensor, dim: int) -> Tensor:
    return _tensor(_softmax.softmax_backward(_host(y), _host(dy), axis=dim), y.dtype)


@torch.library.custom_op("normax::log_softmax", mutates_args=())
def _log_softmax_op(x: Tensor, dim: int) -> Tensor:
    return _tensor(_softmax.log_softmax(_host(x), axis=dim), x.dtype)


@torch.library.custom_op("normax::log_softmax_backward", mutates_args=())
def _log_softmax_backward_op(y: Tensor, dy: Tensor, dim: int) -> Tensor:
    return _tensor(_softmax.log_softmax_backward(_host(y), _host(dy), axis=dim), y.dtype)


def _like_fake(x: Tensor, dim: int) -> Tensor:
    return x.new_empty(x.shape)


def _pair_fake(y: Tensor, dy: Tensor, dim: int) -> Tensor:
    return y.new_empty(y.shape)


def _save_output(ctx, inputs, output) -> None:
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _softmax_grad(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    return _softmax_backward_op(y, grad, ctx.dim), None


def _log_softmax_grad(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    return _log_softmax_backward_op(y, grad, ctx.dim), None


for _op in (_softmax_op, _log_softmax_op):
    _op.register_fake(_like_fake)
for _op in (_softmax_backward_op, _log_softmax_backward_op):
    _op.register_fake(_pair_fake)
_softmax_op.register_autograd(_softmax_grad, setup_context=_save_output)
_log_softmax_op.register_autograd(_log_softmax_grad, setup_context=_save_output)


def _dim(dim, ndim: int, fname: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fname}: dim must be an int, got {dim!r}")
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"{fname}: dim {dim} is out of range for a {ndim}-d tensor")
    return dim % n if ndim else 0


def softmax(input: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.softmax`` / ``torch.nn.functional.softmax`` computed by :func:`normax.softmax`.

    Parameters
    ----------
    input : Tensor
        Floating-point CPU tensor (float32, float64, float16, bfloat16), any strides.
    dim : int
        Dimension the probabilities sum to one over.
    dtype : torch.dtype, optional
        Cast `input` to this dtype first, as torch does.

    Returns
    -------
    Tensor
        Same shape and dtype as `input` (after `dtype`), contiguous.

    Notes
    -----
    The two-pass softmax of :func:`normax.softmax` (float32 within a few ULP of the correctly
    rounded result). The backward is ``dx = y * (dy - sum(dy * y))``, also a normax kernel.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.softmax(torch.log(torch.tensor([1.0, 3.0])), dim=0)
    tensor([0.2500, 0.7500])
    """
    if dtype is not None:
        input = input.to(dtype)
    _check_float(input, "normax.torch.softmax")
    return _softmax_op(input, _dim(dim, input.ndim, "normax.torch.softmax"))


def log_softmax(input: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.log_softmax`` / ``torch.nn.functional.log_softmax`` computed by :func:`normax.log_softmax`.

    Parameters
    ----------
    input : Tensor
        Floating-point CPU tensor.
    dim : int
        Dimension to normalize over.
    dtype : torch.dtype, optional
        Cast `input` to this dtype first, as torch does.

    Returns
    -------
    Tensor
        Same shape and dtype as `input` (after `dtype`).

    Notes
    -----
    Backward: ``dx = dy - exp(y) * sum(dy)``, a normax kernel.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.log_softmax(torch.zeros(2), dim=0)
    tensor([-0.6931, -0.6931])
    """
    if dtype is not None:
        input = input.to(dtype)
    _check_float(input, "normax.torch.log_softmax")
    return _log_softmax_op(input, _dim(dim, input.ndim, "normax.torch.log_softmax"))


# ---------------------------------------------------------------------------------------------
# logsumexp


@torch.library.custom_op("normax::logsumexp", mutates_args=())
def _logsumexp_op(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return _tensor(_softmax.logsumexp(_host(x), axis=tuple(dim), keepdims=keepdim), x.dtype)


@_logsumexp_op.register_fake
def _(x, dim, keepdim):
    shape = (
        [1 if i in dim else s for i, s in enumerate(x.shape)]
        if keepdim
        else [s for i, s in enumerate(x.shape) if i not in dim]
    )
    return x.new_empty(shape)


def _logsumexp_setup(ctx, inputs, output) -> None:
    x, dim, keepdim = inputs
    ctx.dim, ctx.keepdim = dim, keepdim
    ctx.save_for_backward(x, output)


def _logsumexp_grad(ctx, grad: Tensor):
    # d lse / dx = exp(x - lse): plain torch ops, so this backward is itself differentiable.
    x, lse = ctx.saved_tensors
    if not ctx.keepdim and x.ndim:
        for d in sorted(ctx.dim):
            lse = lse.unsqueeze(d)
            grad = grad.unsqueeze(d)
    return grad * torch.exp(x - lse), None, None


_logsumexp_op.register_autograd(_logsumexp_grad, setup_context=_logsumexp_setup)


def logsumexp(input: Tensor, dim, keepdim: bool = False) -> Tensor:
    """``torch.logsumexp`` computed by :func:`normax.logsumexp`.

    Parameters
    ----------
    input : Tensor
        CPU tensor; integer and bool inputs are promoted to the default float dtype, as torch does.
    dim : int or sequence of int
        Dimension(s) to reduce.
    keepdim : bool, default False
        Keep the reduced dimensions with size one.

    Returns
    -------
    Tensor
        ``log(sum(exp(input), dim))`` in `input`'s (floating) dtype.

    Notes
    -----
    The backward is ``grad * exp(input - result)`` in torch ops (differentiable again).

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.logsumexp(torch.zeros(2, 4), dim=1)
    tensor([1.3863, 1.3863])
    """
    fname = "normax.torch.logsumexp"
    if not isinstance(input, Tensor):
        raise TypeError(f"{fname}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        input = input.to(torch.get_default_dtype())
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims:
        raise ValueError(f"{fname}: dim must name at least one dimension")
    norm = sorted({_dim(d, input.ndim, fname) for d in dims})
    if len(norm) != len(dims):
        raise ValueError(f"{fname}: dim {dim!r} repeats a dimension")
    if input.ndim == 0:
        norm = []  # a 0-d tensor reduces its single element (dim 0 or -1), as torch
    return _logsumexp_op(input, norm, bool(keepdim))


# ---------------------------------------------------------------------------------------------
# cross_entropy


def _ce_loss_shape(input: Tensor, axis: int, reduction: str):
    if reduction != "none":
        return []
    return [s for i, s in enumerate(input.shape) if i != axis]


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
    loss = _cross_entropy.cross_entropy(
        _host(input),
        _host(target),
        axis=axis,
        weight=_host_opt(weight),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    return _tensor(loss, input.dtype)


@_cross_entropy_op.register_fake
def _(input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap):
    return input.new_empty(_ce_loss_shape(input, axis, reduction))


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
    loss, dlogits = _cross_entropy.cross_entropy_with_grad(
        _host(input),
        _host(target),
        axis=axis,
        weight=_host_opt(weight),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    return _tensor(loss, input.dtype), _tensor(dlogits, input.dtype)


@_cross_entropy_with_grad_op.register_fake
def _(input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap):
    return input.new_empty(_ce_loss_shape(input, axis, reduction)), input.new_empty(input.shape)


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
def _(g, scale, dim, anchor):
    return g.new_empty(g.shape)


def _ce_setup(ctx, inputs, output) -> None:
    ctx.axis = inputs[3]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], inputs[0])


def _ce_grad(ctx, grad_loss: Tensor, _grad_dlogits):
    dlogits, input = ctx.saved_tensors
    # The per-row gradient is linear in the row's loss gradient: scale the one formed in the forward.
    return _scale_grad_op(dlogits, grad_loss, ctx.axis, input), None, None, None, None, None, None, None, None


_cross_entropy_with_grad_op.register_autograd(_ce_grad, setup_context=_ce_setup)


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
    _, dlogits = _cross_entropy.cross_entropy_with_grad(
        _host(input),
        _host(target),
        axis=axis,
        weight=_host_opt(weight),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        grad_output=_host(grad_loss),
    )
    return _tensor(dlogits, input.dtype)


@_cross_entropy_backward_op.register_fake
def _(input, target, weight, grad_loss, axis, ignore_index, reduction, label_smoothing, z_loss, softcap):
    return input.new_empty(input.shape)


def _ce_loss_setup(ctx, inputs, output) -> None:
    input, target, weight = inputs[:3]
    ctx.options = inputs[3:]
    ctx.has_weight = weight is not None
    ctx.save_for_backward(input, target, weight if weight is not None else _absent(input))


def _ce_loss_grad(ctx, grad_loss: Tensor):
    # The gradient formed in the backward, from the loss's own gradient: one kernel writes it,
    # already scaled (the CUDA path; on the CPU, nt.cross_entropy fuses it into the forward).
    input, target, weight = ctx.saved_tensors
    weight = weight if ctx.has_weight else None
    dlogits = _cross_entropy_backward_op(input, target, weight, grad_loss, *ctx.options)
    return dlogits, None, None, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_ce_loss_grad, setup_context=_ce_loss_setup)


def _ce_options(fname, ignore_index, reduction, label_smoothing, z_loss, softcap):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{fname}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return (
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
    )


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
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
    ignore_index, reduction, label_smoothing
        As in torch.
    z_loss : float, default 0.0
        PaLM's auxiliary term: ``z_loss * lse**2`` added to each counted row's loss.
    softcap : float, optional
        Logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2).

    Returns
    -------
    Tensor
        0-d for "mean" and "sum", else shaped like `target` (hard) or `input` without the class
        dimension.

    Notes
    -----
    When `input` requires grad, one normax call returns the loss and its gradient together (two
    reads of the logits in all); the backward only scales that gradient by the incoming one. No
    gradient flows to `target` or `weight`. Unlike torch, no ``size_average``/``reduce`` arguments.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3]))
    tensor(1.3863)
    """
    fname = "normax.torch.cross_entropy"
    _check_float(input, fname)
    if not isinstance(target, Tensor):
        raise TypeError(f"{fname}: target must be a torch.Tensor, got {type(target).__name__}")
    opts = _ce_options(fname, ignore_index, reduction, label_smoothing, z_loss, softcap)
    axis = 1 if input.ndim >= 2 else 0
    if _needs_grad(input) and not input.is_cuda:
        # CPU: loss and gradient in one pass over the logits; the backward only scales it.
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
    loss = _cross_entropy.linear_cross_entropy(
        _host(input),
        _host(weight),
        _host(target),
        bias=_host_opt(bias),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    return _tensor(loss, input.dtype)


@_linear_ce_op.register_fake
def _(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size):
    return input.new_empty([input.shape[0]] if reduction == "none" else [])


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
    loss, dh, dw, db = _cross_entropy.linear_cross_entropy_with_grad(
        _host(input),
        _host(weight),
        _host(target),
        bias=_host_opt(bias),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
        grad_output=1.0 if grad_output is None else _host(grad_output),
    )
    db = _absent(input) if db is None else _tensor(db, bias.dtype)
    return _tensor(loss, input.dtype), _tensor(dh, input.dtype), _tensor(dw, weight.dtype), db


@_linear_ce_with_grad_op.register_fake
def _(
    input,
    weight,
    target,
    bias,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    grad_output,
):
    loss = input.new_empty([input.shape[0]] if reduction == "none" else [])
    db = input.new_empty((0,)) if bias is None else bias.new_empty(bias.shape)
    return loss, input.new_empty(input.shape), weight.new_empty(weight.shape), db


def _linear_ce_setup(ctx, inputs, output) -> None:
    # Scalar reductions: the forward formed the gradients (for grad_output = 1); keep them.
    ctx.has_bias = inputs[3] is not None
    for t in output[1:]:
        ctx.mark_non_differentiable(t)
    ctx.save_for_backward(*output[1:], inputs[0], inputs[1])


def _linear_ce_grad(ctx, grad_loss, *_):
    dh, dw, db, input, weight = ctx.saved_tensors
    scaled = [_scale_grad_op(g, grad_loss, 0, anchor) for g, anchor in ((dh, weight), (dw, input))]
    dbias = _scale_grad_op(db, grad_loss, 0, input) if ctx.has_bias else None
    return scaled[0], scaled[1], None, dbias, None, None, None, None, None, None, None


_linear_ce_with_grad_op.register_autograd(_linear_ce_grad, setup_context=_linear_ce_setup)


def _linear_ce_rows_setup(ctx, inputs, output) -> None:
    # reduction="none": each row's gradient is scaled before the GEMMs, so the backward recomputes.
    ctx.args = inputs[4:]
    ctx.has_bias = inputs[3] is not None
    ctx.save_for_backward(*inputs[:3], inputs[3] if inputs[3] is not None else _absent(inputs[0]))


def _linear_ce_rows_grad(ctx, grad_loss):
    input, weight, target, bias = ctx.saved_tensors
    _, dh, dw, db = _linear_ce_with_grad_op(
        input, weight, target, bias if ctx.has_bias else None, *ctx.args, grad_loss
    )
    return dh, dw, None, (db if ctx.has_bias else None), None, None, None, None, None, None


_linear_ce_op.register_autograd(_linear_ce_rows_grad, setup_context=_linear_ce_rows_setup)


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
    fname = "normax.torch.linear_cross_entropy"
    _check_float(input, fname)
    _check_float(weight, fname, "weight")
    if input.ndim < 1 or weight.ndim != 2:
        raise ValueError(
            f"{fname}: expected input (..., H) and weight (V, H), got {tuple(input.shape)}, {tuple(weight.shape)}"
        )
    lead = input.shape[:-1]
    if tuple(target.shape) != tuple(lead):
        raise ValueError(f"{fname}: target shape {tuple(target.shape)} does not match input's {tuple(lead)}")
    opts = _ce_options(fname, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if chunk_size is not None:
        chunk_size = int(chunk_size)
    h = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    if opts[1] != "none" and _needs_grad(input, weight, bias):
        loss = _linear_ce_with_grad_op(h, weight, t, bias, *opts, chunk_size, None)[0]
    else:
        loss = _linear_ce_op(h, weight, t, bias, *opts, chunk_size)
    return loss.reshape(lead) if opts[1] == "none" else loss


# ---------------------------------------------------------------------------------------------
# layer_norm, rms_norm


def _norm_axes(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


@torch.library.custom_op("normax::layer_norm", mutates_args=())
def _layer_norm_op(
    x: Tensor, ndim: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _norms.layer_norm(
        _host(x), _host_opt(weight), _host_opt(bias), eps=eps, axis=_norm_axes(ndim), return_stats=True
    )
    return _tensor(y, x.dtype), _tensor(mean, torch.float64), _tensor(rstd, torch.float64)


@_layer_norm_op.register_fake
def _(x, ndim, weight, bias, eps):
    rows = x.shape[: x.ndim - ndim]
    return (
        x.new_empty(x.shape),
        x.new_empty(rows, dtype=torch.float64),
        x.new_empty(rows, dtype=torch.float64),
    )


@torch.library.custom_op("normax::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    ndim: int,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _norms.layer_norm_backward(
        _host(dy),
        _host(x),
        _host_opt(weight),
        _host_opt(bias),
        eps=eps,
        axis=_norm_axes(ndim),
        mean=_host(mean),
        rstd=_host(rstd),
    )
    dw = _absent(x) if dw is None else _tensor(dw, weight.dtype)
    db = _absent(x) if db is None else _tensor(db, bias.dtype)
    return _tensor(dx, x.dtype), dw, db


@_layer_norm_backward_op.register_fake
def _(dy, x, ndim, weight, bias, mean, rstd, eps):
    dw = x.new_empty((0,)) if weight is None else weight.new_empty(weight.shape)
    db = x.new_empty((0,)) if bias is None else bias.new_empty(bias.shape)
    return x.new_empty(x.shape), dw, db


def _layer_norm_setup(ctx, inputs, output) -> None:
    x, ndim, weight, bias, eps = inputs
    ctx.ndim, ctx.eps = ndim, eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.mark_non_differentiable(output[1], output[2])
    absent = _absent(x)
    ctx.save_for_backward(
        x,
        weight if weight is not None else absent,
        bias if bias is not None else absent,
        output[1],
        output[2],
    )


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    weight = weight if ctx.has_weight else None
    bias = bias if ctx.has_bias else None
    dx, dw, db = _layer_norm_backward_op(dy, x, ctx.ndim, weight, bias, mean, rstd, ctx.eps)
    return dx, None, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None


_layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


@torch.library.custom_op("normax::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, ndim: int, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    y, rstd = _norms.rms_norm(_host(x), _host_opt(weight), eps=eps, axis=_norm_axes(ndim), return_stats=True)
    return _tensor(y, x.dtype), _tensor(rstd, torch.float64)


@_rms_norm_op.register_fake
def _(x, ndim, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[: x.ndim - ndim], dtype=torch.float64)


@torch.library.custom_op("normax::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: Tensor, x: Tensor, ndim: int, weight: Tensor | None, rstd: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    dx, dw = _norms.rms_norm_backward(
        _host(dy), _host(x), _host_opt(weight), eps=eps, axis=_norm_axes(ndim), rstd=_host(rstd)
    )
    return _tensor(dx, x.dtype), (_absent(x) if dw is None else _tensor(dw, weight.dtype))


@_rms_norm_backward_op.register_fake
def _(dy, x, ndim, weight, rstd, eps):
    return x.new_empty(x.shape), (x.new_empty((0,)) if weight is None else weight.new_empty(weight.shape))


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, ndim, weight, eps = inputs
    ctx.ndim, ctx.eps, ctx.has_weight = ndim, eps, weight is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight if weight is not None else _absent(x), output[1])


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, x, ctx.ndim, weight if ctx.has_weight else None, rstd, ctx.eps)
    return dx, None, (dw if ctx.has_weight else None), None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def _normalized(fname: str, input: Tensor, normalized_shape, params) -> int:
    """The number of normalized (trailing) dimensions, after checking the shapes as torch does."""
    _check_float(input, fname)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or k > input.ndim or tuple(input.shape[input.ndim - k :]) != shape:
        raise ValueError(
            f"{fname}: normalized_shape {list(shape)} does not match the trailing dimensions of an input "
            f"of shape {list(input.shape)}"
        )
    for name, p in params:
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(
                f"{fname}: {name} shape {list(p.shape)} does not match normalized_shape {list(shape)}"
            )
    return k


def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.layer_norm`` computed by :func:`normax.layer_norm`.

    Parameters
    ----------
    input : Tensor
        Floating-point CPU tensor whose trailing dimensions are `normalized_shape`.
    normalized_shape : int or sequence of int
        The normalized (trailing) shape.
    weight, bias : Tensor, optional
        Of `normalized_shape`.
    eps : float, default 1e-5
        Added to the (biased) variance.

    Returns
    -------
    Tensor
        Shaped like `input`, in its dtype.

    Notes
    -----
    One fused normax pass per row with a stable variance; the forward keeps each row's mean and
    rstd (float64) for the backward, which is one more normax pass (dx, and dweight/dbias reduced
    deterministically).

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.layer_norm(torch.tensor([1.0, 2.0, 3.0]), (3,), eps=0.0)
    tensor([-1.2247,  0.0000,  1.2247])
    """
    fname = "normax.torch.layer_norm"
    k = _normalized(fname, input, normalized_shape, (("weight", weight), ("bias", bias)))
    return _layer_norm_op(input, k, weight, bias, float(eps))[0]


def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """``torch.nn.functional.rms_norm`` computed by :func:`normax.rms_norm`.

    Parameters
    ----------
    input : Tensor
        Floating-point CPU tensor whose trailing dimensions are `normalized_shape`.
    normalized_shape : int or sequence of int
        The normalized (trailing) shape.
    weight : Tensor, optional
        Of `normalized_shape`.
    eps : float, optional
        Added to the mean square; None means ``torch.finfo(input.dtype).eps``, as torch.

    Returns
    -------
    Tensor
        Shaped like `input`, in its dtype.

    Notes
    -----
    torch's CPU rms_norm is a chain of separate ops; this is one fused normax pass per row (and
    one for the backward, with the forward's rstd).

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.rms_norm(torch.tensor([3.0, 4.0]), (2,), eps=0.0)
    tensor([0.8485, 1.1314])
    """
    fname = "normax.torch.rms_norm"
    k = _normalized(fname, input, normalized_shape, (("weight", weight),))
    e = torch.finfo(input.dtype).eps if eps is None else float(eps)
    return _rms_norm_op(input, k, weight, e)[0]


# ---------------------------------------------------------------------------------------------
# CUDA kernels of the ops above: CUDA tensors run on normax's CUDA backend (normax._cuda), on
# torch's current stream, returning exactly what the fake implementations promise.


def _dense(t: Tensor) -> Tensor:
    return t.contiguous()


@_softmax_op.register_kernel("cuda")
def _softmax_cuda(x, dim):
    return _dense(_cuda.softmax(x, axis=dim))


@_log_softmax_op.register_kernel("cuda")
def _log_softmax_cuda(x, dim):
    return _dense(_cuda.log_softmax(x, axis=dim))


@_softmax_backward_op.register_kernel("cuda")
def _softmax_backward_cuda(y, dy, dim):
    return _dense(_cuda.softmax_backward(y, dy, axis=dim))


@_log_softmax_backward_op.register_kernel("cuda")
def _log_softmax_backward_cuda(y, dy, dim):
    return _dense(_cuda.log_softmax_backward(y, dy, axis=dim))


@_logsumexp_op.register_kernel("cuda")
def _logsumexp_cuda(x, dim, keepdim):
    return _dense(_cuda.logsumexp(x, axis=tuple(dim) if dim else None, keepdims=keepdim))


def _cross_entropy_on_cuda(with_grad, input, target, weight, axis, *opts):
    # Bad class indices fail a device-side assertion, as in torch's own kernel: no host sync.
    return _cuda._cross_entropy(
        "normax.torch.cross_entropy", input, target, axis, weight, *opts, with_grad, sync_check=False
    )


@_cross_entropy_op.register_kernel("cuda")
def _cross_entropy_cuda(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _dense(_cross_entropy_on_cuda(False, input, target, weight, axis, *opts))


@_cross_entropy_with_grad_op.register_kernel("cuda")
def _cross_entropy_with_grad_cuda(
    input, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    loss, grad = _cross_entropy_on_cuda(True, input, target, weight, axis, *opts)
    return _dense(loss), _dense(grad)


@_cross_entropy_backward_op.register_kernel("cuda")
def _cross_entropy_backward_cuda(
    input, target, weight, grad_loss, axis, ignore_index, reduction, label_smoothing, z_loss, softcap
):
    opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    # grad_loss stays on the device: the kernel reads its scale from there (no sync).
    return _dense(
        _cuda._cross_entropy(
            "normax.torch.cross_entropy",
            input,
            target,
            axis,
            weight,
            *opts,
            True,
            grad_loss,
            sync_check=False,
        )[1]
    )


@_layer_norm_op.register_kernel("cuda")
def _layer_norm_cuda(x, ndim, weight, bias, eps):
    y, mean, rstd = _cuda.layer_norm(x, weight, bias, eps=eps, axis=_norm_axes(ndim), return_stats=True)
    return _dense(y), mean.double(), rstd.double()  # float64, as the CPU op saves them


@_layer_norm_backward_op.register_kernel("cuda")
def _layer_norm_backward_cuda(dy, x, ndim, weight, bias, mean, rstd, eps):
    # float32 parameter gradients, rounded once to the parameters' dtype
    dx, dw, db = _cuda._norm_backward(
        "layer", "normax.torch.layer_norm", dy, x, weight, bias, eps, _norm_axes(ndim), mean, rstd, None
    )
    dw = _absent(x) if dw is None else dw.to(weight.dtype)
    db = _absent(x) if db is None else db.to(bias.dtype)
    return _dense(dx), dw, db


@_rms_norm_op.register_kernel("cuda")
def _rms_norm_cuda(x, ndim, weight, eps):
    y, rstd = _cuda.rms_norm(x, weight, eps=eps, axis=_norm_axes(ndim), return_stats=True)
    return _dense(y), rstd.double()


@_rms_norm_backward_op.register_kernel("cuda")
def _rms_norm_backward_cuda(dy, x, ndim, weight, rstd, eps):
    dx, dw = _cuda._norm_backward(
        "rms", "normax.torch.rms_norm", dy, x, weight, None, eps, _norm_axes(ndim), None, rstd, None
    )
    return _dense(dx), (_absent(x) if dw is None else dw.to(weight.dtype))


# ---------------------------------------------------------------------------------------------
# PowerNorm


# Functional ops (custom ops with autograd may not mutate their inputs): the forward returns the
# updated running_phi and iters, the backward the increment of ema_gz; the module writes them into
# its buffers.


@torch.library.custom_op("normax::power_norm", mutates_args=())
def _power_norm_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_phi: Tensor,
    ema_gz: Tensor,
    iters: Tensor,
    pad_mask: Tensor | None,
    training: bool,
    eps: float,
    alpha_fwd: float,
    alpha_bkw: float,
    warmup_iters: int,
    group_num: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # ema_gz and alpha_bkw are not used here: they travel to the backward through setup_context.
    state = _adapt.power_norm_state(
        _host(running_phi).astype(np.float64).reshape(-1),
        np.zeros(x.shape[-1]),
        int(iters.reshape(-1)[0]),
        eps=eps,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        group_num=group_num,
    )
    y, saved = _norms.power_norm(
        _host(x),
        _host(weight),
        _host(bias),
        state,
        training=training,
        pad_mask=_host_opt(pad_mask),
        return_saved=True,
    )
    return (
        _tensor(y, x.dtype),
        _tensor(np.array(saved.zscale, np.float64), torch.float64),
        _tensor(np.array(saved.dscale, np.float64), torch.float64),
        _tensor(state.running_phi.reshape(running_phi.shape), running_phi.dtype),
        torch.full_like(iters, state.iters),
    )


@_power_norm_op.register_fake
def _(
    x,
    weight,
    bias,
    running_phi,
    ema_gz,
    iters,
    pad_mask,
    training,
    eps,
    alpha_fwd,
    alpha_bkw,
    warmup_iters,
    group_num,
):
    c = x.shape[-1]
    f64 = torch.float64
    return (
        x.new_empty(x.shape),
        x.new_empty((c,), dtype=f64),
        x.new_empty((c,), dtype=f64),
        running_phi.new_empty(running_phi.shape),
        iters.new_empty(iters.shape),
    )


@torch.library.custom_op("normax::power_norm_backward", mutates_args=())
def _power_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    zscale: Tensor,
    dscale: Tensor,
    ema_gz: Tensor,
    training: bool,
    eps: float,
    alpha_bkw: float,
    group_num: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    before = _host(ema_gz).astype(np.float64).reshape(-1)
    state = _adapt.power_norm_state(
        np.ones_like(before),
        before.copy(),
        0,
        eps=eps,
        alpha_fwd=0.0,
        alpha_bkw=alpha_bkw,
        warmup_iters=0,
        group_num=group_num,
    )
    saved = _adapt.power_norm_saved(
        _host(x),
        _host(weight),
        True,
        _host(zscale),
        _host(dscale),
        training=training,
        eps=eps,
        group_num=group_num,
    )
    dx, dw, db = _norms.power_norm_backward(_host(dy), saved, state)
    delta = (state.ema_gz - before).reshape(ema_gz.shape)
    return (
        _tensor(dx, x.dtype),
        _tensor(dw, weight.dtype),
        _tensor(db, weight.dtype),
        _tensor(delta, ema_gz.dtype),
    )


@_power_norm_backward_op.register_fake
def _(dy, x, weight, zscale, dscale, ema_gz, training, eps, alpha_bkw, group_num):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape),
        ema_gz.new_empty(ema_gz.shape),
    )


def _power_norm_setup(ctx, inputs, output) -> None:
    x, weight, _, _, ema_gz = inputs[:5]
    ctx.training, ctx.eps, ctx.alpha_bkw, ctx.group_num = inputs[7], inputs[8], inputs[10], inputs[12]
    # The backward adds to the live ema_gz buffer (as MaskPowerNorm's does), so it is held, not
    # saved: a saved tensor would refuse a later backward once an earlier one had changed it.
    ctx.ema_gz = ema_gz
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, weight, output[1], output[2])


def _power_norm_grad(ctx, dy, *_):
    x, weight, zscale, dscale = ctx.saved_tensors
    dx, dw, db, delta = _power_norm_backward_op(
        dy, x, weight, zscale, dscale, ctx.ema_gz, ctx.training, ctx.eps, ctx.alpha_bkw, ctx.group_num
    )
    with torch.no_grad():
        ctx.ema_gz.add_(delta)
    return (dx, dw, db) + (None,) * 10


_power_norm_op.register_autograd(_power_norm_grad, setup_context=_power_norm_setup)


# CUDA tensors: the PowerNorm and linear cross-entropy ops run normax's CUDA path (normax._cuda),
# returning exactly what the fakes above describe. PowerNorm's state bookkeeping is host float64
# code, so its C-long buffers and factors travel to the host and back (a synchronization per call).


def _host64(t: Tensor) -> np.ndarray:
    """A float64 NumPy copy (never a view of a buffer) of a tensor on any device."""
    return t.detach().to("cpu", torch.float64).numpy().reshape(-1).copy()


def _power_norm_cuda(
    x, weight, bias, running_phi, ema_gz, iters, pad_mask, training, eps, alpha_fwd, alpha_bkw,
    warmup_iters, group_num,
):  # fmt: skip
    state = _adapt.power_norm_state(
        _host64(running_phi),
        np.zeros(x.shape[-1]),
        int(iters.reshape(-1)[0]),
        eps=eps,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        group_num=group_num,
    )
    y, saved = _cuda.power_norm(
        x, weight, bias, state, training=training, pad_mask=pad_mask, return_saved=True
    )
    f64 = torch.float64
    return (
        y,
        torch.tensor(saved.zscale, dtype=f64, device=x.device),
        torch.tensor(saved.dscale, dtype=f64, device=x.device),
        torch.tensor(state.running_phi, dtype=running_phi.dtype, device=running_phi.device).reshape(
            running_phi.shape
        ),
        torch.full_like(iters, state.iters),
    )


def _power_norm_backward_cuda(dy, x, weight, zscale, dscale, ema_gz, training, eps, alpha_bkw, group_num):
    before = _host64(ema_gz)
    state = _adapt.power_norm_state(
        np.ones_like(before),
        before.copy(),
        0,
        eps=eps,
        alpha_fwd=0.0,
        alpha_bkw=alpha_bkw,
        warmup_iters=0,
        group_num=group_num,
    )
    saved = _cuda.power_norm_saved(
        x, weight, True, _host64(zscale), _host64(dscale), training=training, eps=eps, group_num=group_num
    )
    dx, dw, db = _cuda.power_norm_backward_as(dy, saved, state, weight.dtype)
    delta = torch.tensor(state.ema_gz - before, dtype=ema_gz.dtype, device=ema_gz.device).reshape(
        ema_gz.shape
    )
    return dx.to(x.dtype), dw.to(weight.dtype), db.to(weight.dtype), delta


def _linear_ce_cuda(
    input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size
):
    opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    # Bad class indices fail a device-side assertion, as in torch: no host sync.
    fname = "normax.torch.linear_cross_entropy"
    loss = _cuda._linear(fname, input, weight, target, bias, *opts, chunk_size, False, sync_check=False)
    return loss.to(input.dtype)


def _linear_ce_with_grad_cuda(
    input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size,
    grad_output,
):  # fmt: skip
    opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    g = 1.0 if grad_output is None else grad_output
    fname = "normax.torch.linear_cross_entropy"
    loss, dh, dw, db = _cuda._linear(
        fname, input, weight, target, bias, *opts, chunk_size, True, g, sync_check=False
    )
    db = _absent(input) if db is None else db.to(bias.dtype)
    return loss.to(input.dtype), dh.to(input.dtype), dw.to(weight.dtype), db


_power_norm_op.register_kernel("cuda")(_power_norm_cuda)
_power_norm_backward_op.register_kernel("cuda")(_power_norm_backward_cuda)
_linear_ce_op.register_kernel("cuda")(_linear_ce_cuda)
_linear_ce_with_grad_op.register_kernel("cuda")(_linear_ce_with_grad_cuda)


class PowerNorm(torch.nn.Module):
    """PowerNorm (Shen et al. 2020) with MaskPowerNorm's constructor, buffers and forward.

    A drop-in for ``MaskPowerNorm`` of the paper's code (sIncerass/powernorm): the same
    constructor, parameters ``weight``/``bias`` and buffers ``running_phi`` (1, C, 1, 1),
    ``ema_gz`` (1, C, 1, 1) and ``iters`` (1,) int64, so its checkpoints load either way. The
    forward and the paper's approximate backward are normax kernels (see
    :func:`normax.power_norm`).

    Parameters
    ----------
    num_features : int
        C, the channel count (the last dimension of the input).
    eps : float, default 1e-5
        Added to every second moment. (MaskPowerNorm's group scaling always uses 1e-5; here it
        uses `eps` too, the same with the default.)
    alpha_fwd, alpha_bkw : float, default 0.9
        Decays of ``running_phi`` and of ``ema_gz`` in the approximate backward.
    affine : bool, default True
        Stored only: like MaskPowerNorm, the layer always has ``weight`` and ``bias``.
    warmup_iters : int, default 10000
        Training steps that normalize by the batch statistics.
    group_num : int, default 1
        Channel groups of the group scaling.

    Notes
    -----
    ``forward(input, pad_mask=None)``: input (T, B, C) or (N, C); pad_mask (B, T) (or (N, 1)),
    True marking padding, which is left out of the batch statistics. A training forward updates
    ``running_phi`` and ``iters``; its backward updates ``ema_gz`` (once per backward, as the
    paper's code). Evaluation uses ``running_phi``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        affine: bool = True,
        warmup_iters: int = 10000,
        group_num: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _norms.PowerNormState(
            num_features,
            eps=eps,
            alpha_fwd=alpha_fwd,
            alpha_bkw=alpha_bkw,
            warmup_iters=warmup_iters,
            group_num=group_num,
        )  # validates the settings with the NumPy API's messages
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.alpha_fwd = alpha_fwd
        self.alpha_bkw = alpha_bkw
        self.affine = affine
        self.warmup_iters = warmup_iters
        self.group_num = group_num
        self.weight = torch.nn.Parameter(torch.ones(num_features, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_phi", torch.ones(1, num_features, 1, 1, **factory))
        self.register_buffer("ema_gz", torch.zeros(1, num_features, 1, 1, **factory))
        self.register_buffer("iters", torch.zeros(1, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"affine={self.affine}, warmup={self.warmup_iters}, group_num={self.group_num}"
        )

    def forward(self, input: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        _check_float(input, "normax.torch.PowerNorm")
        if pad_mask is not None and pad_mask.dtype != torch.bool:
            pad_mask = pad_mask.bool()
        y, _, _, running_phi, iters = _power_norm_op(
            input,
            self.weight,
            self.bias,
            self.running_phi,
            self.ema_gz,
            self.iters,
            pad_mask,
            self.training,
            float(self.eps),
            float(self.alpha_fwd),
            float(self.alpha_bkw),
            int(self.warmup_iters),
            int(self.group_num),
        )
        if self.training:
            with torch.no_grad():
                self.running_phi.copy_(running_phi)
                self.iters.copy_(iters)
        return y


# ---------------------------------------------------------------------------------------------
# Modules mirroring torch.nn


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by :func:`rms_norm`: same constructor, parameters and state_dict.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.RMSNorm(4)(torch.ones(2, 4)).shape
    torch.Size([2, 4])
    """

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by :func:`layer_norm`: same constructor, parameters and state_dict.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.LayerNorm(4)(torch.arange(8.0).reshape(2, 4)).shape
    torch.Size([2, 4])
    """

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy`, plus `z_loss` and `softcap`.

    Same constructor arguments (``weight, size_average, ignore_index, reduce, reduction,
    label_smoothing``) and state_dict (the ``weight`` buffer), then keyword-only ``z_loss=0.0``
    and ``softcap=None``.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.CrossEntropyLoss()(torch.zeros(2, 4), torch.tensor([0, 3]))
    tensor(1.3863)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """A classifier and its cross-entropy in one module, never holding the logits.

    Mirrors ``torch.nn.LinearCrossEntropyLoss`` (torch >= 2.11): the same constructor arguments it
    supports and the same state_dict (``linear.weight``, ``linear.bias`` of an inner
    ``torch.nn.Linear(in_features, num_classes)``); ``forward(input, target)`` is
    :func:`linear_cross_entropy` of ``input`` with that layer. Class weights and K-dimensional
    ``out_features`` are not supported (NotImplementedError).

    Parameters
    ----------
    in_features, num_classes : int
        H and V.
    out_features : tuple, default ()
        Only () is supported.
    bias : bool, default False
        Give the classifier a bias.
    device, dtype
        For the classifier's parameters.
    reduction, ignore_index, label_smoothing
        As torch's; ``ignore_index=None`` means -100.
    weight : Tensor, optional
        Class weights: not supported, must be None.
    z_loss, softcap, chunk_size
        As in :func:`linear_cross_entropy`.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> loss = nt.LinearCrossEntropyLoss(8, 100)
    >>> loss(torch.randn(4, 8), torch.tensor([1, 2, 3, 4])).shape
    torch.Size([])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        if tuple(out_features) != ():
            raise NotImplementedError("normax.torch.LinearCrossEntropyLoss: out_features must be ()")
        if weight is not None:
            raise NotImplementedError("normax.torch.LinearCrossEntropyLoss: class weights are not supported")
        self.in_features = in_features
        self.num_classes = num_classes
        self.out_features = ()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, reduction={self.reduction}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}"
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            self.linear.bias,
            ignore_index=-100 if self.ignore_index is None else self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
        )


def patch(model: torch.nn.Module) -> int:
    """Swaps `model`'s ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` modules for normax's, in place.

    Each module of exactly those classes (not subclasses, whose forward may differ) becomes an
    instance of :class:`LayerNorm` / :class:`RMSNorm` in place: its parameters, buffers, hooks and
    identity stay (an optimizer holding its parameters is unaffected), only its forward changes.
    `model` itself is swapped too if it is one.

    Returns
    -------
    int
        The number of modules swapped.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> nt.patch(model), type(model[1]).__module__
    (1, 'normax.torch')
    """
    swaps = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm}
    count = 0
    for module in model.modules():
        ours = swaps.get(type(module))
        if ours is not None:
            module.__class__ = ours
            count += 1
    return count
