"""layer_norm and rms_norm: custom ops, fake kernels, autograd, CUDA kernels, public functions.

The ops normalize the trailing `ndim` dimensions; the forward returns the row statistics that the
backward takes: float64 on the CPU, float32 on CUDA (the CUDA thin path, ``_cuda.norm_forward``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _norms as cpu
from . import _cpu, _cuda
from ._convert import absent, check_float, host, host_dense, host_opt, to_tensor
from ._op import op


def _norm_axes(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "cuda" else torch.float64


@op("normax::layer_norm")
def _layer_norm_op(
    x: Tensor, ndim: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    thin = _cpu.norm_forward("layer", x, ndim, weight, bias, eps)
    if thin is not None:
        return thin
    y, mean, rstd = cpu.layer_norm(
        host(x), host_opt(weight), host_opt(bias), eps=eps, axis=_norm_axes(ndim), return_stats=True
    )
    return to_tensor(y, x.dtype), to_tensor(mean, torch.float64), to_tensor(rstd, torch.float64)


@_layer_norm_op.register_fake
def _layer_norm_fake(x, ndim, weight, bias, eps):
    rows = x.shape[: x.ndim - ndim]
    return (
        x.new_empty(x.shape),
        x.new_empty(rows, dtype=_stats_dtype(x)),
        x.new_empty(rows, dtype=_stats_dtype(x)),
    )


@op("normax::layer_norm_backward")
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
    thin = _cpu.norm_backward("layer", dy, x, weight, bias, mean, rstd, eps)
    if thin is not None:
        dx, dw, db = thin
        return dx, absent(x) if dw is None else dw, absent(x) if db is None else db
    dx, dw, db = cpu.layer_norm_backward(
        host_dense(dy),
        host(x),
        host_opt(weight),
        host_opt(bias),
        eps=eps,
        axis=_norm_axes(ndim),
        mean=host(mean),
        rstd=host(rstd),
    )
    dw = absent(x) if dw is None else to_tensor(dw, weight.dtype)
    db = absent(x) if db is None else to_tensor(db, bias.dtype)
    return to_tensor(dx, x.dtype), dw, db


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(dy, x, ndim, weight, bias, mean, rstd, eps):
    dw = absent(x) if weight is None else weight.new_empty(weight.shape)
    db = absent(x) if bias is None else bias.new_empty(bias.shape)
    return x.new_empty(x.shape), dw, db


def _layer_norm_setup(ctx, inputs, output) -> None:
    x, ndim, weight, bias, eps = inputs
    ctx.ndim, ctx.eps = ndim, eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, bias, output[1], output[2])  # None where absent


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward_op(dy, x, ctx.ndim, weight, bias, mean, rstd, ctx.eps)
    return dx, None, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None


_layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


@_layer_norm_op.register_kernel("cuda")
def _layer_norm_cuda(x, ndim, weight, bias, eps):
    return _cuda.norm_forward("layer", x, ndim, weight, bias, eps)


@_layer_norm_backward_op.register_kernel("cuda")
def _layer_norm_backward_cuda(dy, x, ndim, weight, bias, mean, rstd, eps):
    dx, dw, db = _cuda.norm_backward("layer", dy, x, ndim, weight, bias, mean, rstd, eps)
    return dx, absent(x) if dw is None else dw, absent(x) if db is None else db


@op("normax::rms_norm")
def _rms_norm_op(x: Tensor, ndim: int, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    thin = _cpu.norm_forward("rms", x, ndim, weight, None, eps)
    if thin is not None:
        return thin[0], thin[2]
    y, rstd = cpu.rms_norm(host(x), host_opt(weight), eps=eps, axis=_norm_axes(ndim), return_stats=True)
    return to_tensor(y, x.dtype), to_tensor(rstd, torch.float64)


@_rms_norm_op.register_fake
def _rms_norm_fake(x, ndim, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[: x.ndim - ndim], dtype=_stats_dtype(x))


@op("normax::rms_norm_backward")
def _rms_norm_backward_op(
    dy: Tensor, x: Tensor, ndim: int, weight: Tensor | None, rstd: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    thin = _cpu.norm_backward("rms", dy, x, weight, None, None, rstd, eps)
    if thin is not None:
        return thin[0], absent(x) if thin[1] is None else thin[1]
    dx, dw = cpu.rms_norm_backward(
        host_dense(dy), host(x), host_opt(weight), eps=eps, axis=_norm_axes(ndim), rstd=host(rstd)
    )
    return to_tensor(dx, x.dtype), (absent(x) if dw is None else to_tensor(dw, weight.dtype))


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(dy, x, ndim, weight, rstd, eps):
    return x.new_empty(x.shape), (absent(x) if weight is None else weight.new_empty(weight.shape))


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, ndim, weight, eps = inputs
    ctx.ndim, ctx.eps, ctx.has_weight = ndim, eps, weight is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])  # None where absent


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, x, ctx.ndim, weight, rstd, ctx.eps)
    return dx, None, (dw if ctx.has_weight else None), None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


@_rms_norm_op.register_kernel("cuda")
def _rms_norm_cuda(x, ndim, weight, eps):
    return _cuda.norm_forward("rms", x, ndim, weight, None, eps)


@_rms_norm_backward_op.register_kernel("cuda")
def _rms_norm_backward_cuda(dy, x, ndim, weight, rstd, eps):
    dx, dw, _ = _cuda.norm_backward("rms", dy, x, ndim, weight, None, None, rstd, eps)
    return dx, absent(x) if dw is None else dw


def _normalized(fname: str, input: Tensor, normalized_shape, params) -> int:
    """The number of normalized (trailing) dimensions, after checking the shapes as torch does."""
    check_float(input, fname)
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
        Added to the (biased) variance. Any float torch accepts: a negative or non-finite eps
        (which normax's kernel refuses) is computed by ``torch.nn.functional.layer_norm`` itself,
        so the result (NaN where ``var + eps < 0``) and gradient are torch's.

    Returns
    -------
    Tensor
        Shaped like `input`, in its dtype.

    Notes
    -----
    One fused normax pass per row with a stable variance; the forward keeps each row's mean and
    rstd (float64 on the CPU,
    float32 on CUDA) for the backward, which is one more normax pass (dx, and dweight/dbias reduced
    deterministically).

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.layer_norm(torch.tensor([1.0, 2.0, 3.0]), (3,), eps=0.0)
    tensor([-1.2247,  0.0000,  1.2247])
    """
    fname = "normax.torch.layer_norm"
    k = _normalized(fname, input, normalized_shape, (("weight", weight), ("bias", bias)))
    eps = float(eps)
    if not 0.0 <= eps < math.inf:
        # torch accepts any eps (a negative one can still give finite results); normax's kernels
        # refuse eps < 0 and non-finite eps, so such a call is torch's own layer_norm (and autograd).
        return torch.nn.functional.layer_norm(input, tuple(input.shape[input.ndim - k :]), weight, bias, eps)
    return _layer_norm_op(input, k, weight, bias, eps)[0]


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
        Added to the mean square; None means ``torch.finfo(input.dtype).eps``, as torch. A
        negative or non-finite eps (refused by normax's kernel) is computed by
        ``torch.nn.functional.rms_norm`` itself, giving torch's result and gradient.

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
    if not 0.0 <= e < math.inf:
        # Negative or non-finite eps: torch's own rms_norm, as for layer_norm.
        return torch.nn.functional.rms_norm(input, tuple(input.shape[input.ndim - k :]), weight, e)
    return _rms_norm_op(input, k, weight, e)[0]
