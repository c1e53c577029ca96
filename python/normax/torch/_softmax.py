"""softmax, log_softmax and logsumexp: custom ops, fake kernels, autograd, CUDA kernels, public functions."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _core
from .. import _softmax as cpu
from .._backends import cuda
from . import _cpu, _cuda
from ._convert import check_float, dense, host, host_dense, to_tensor
from ._op import op

# ---------------------------------------------------------------------------------------------
# softmax, log_softmax


def _axis(dim: int, ndim: int) -> int:
    # The NumPy functions' one-call fast path is for axis=-1.
    return -1 if dim == ndim - 1 else dim


def _map(numpy_function, kernel_last, x: Tensor, dim: int) -> Tensor:
    y = _cpu.row_map(kernel_last, x, dim)
    if y is not None:
        return y
    return to_tensor(numpy_function(host(x), axis=_axis(dim, x.ndim)), x.dtype)


def _map_backward(numpy_function, kernel, y: Tensor, dy: Tensor, dim: int) -> Tensor:
    dx = _cpu.row_backward(kernel, y, dy, dim)
    if dx is not None:
        return dx
    return to_tensor(numpy_function(host(y), host_dense(dy), axis=_axis(dim, y.ndim)), y.dtype)


@op("normax::softmax")
def _softmax_op(x: Tensor, dim: int) -> Tensor:
    return _map(cpu.softmax, _core.softmax_last, x, dim)


@op("normax::softmax_backward")
def _softmax_backward_op(y: Tensor, dy: Tensor, dim: int) -> Tensor:
    return _map_backward(cpu.softmax_backward, _core.softmax_backward, y, dy, dim)


@op("normax::log_softmax")
def log_softmax_op(x: Tensor, dim: int) -> Tensor:
    return _map(cpu.log_softmax, _core.log_softmax_last, x, dim)


@op("normax::log_softmax_backward")
def _log_softmax_backward_op(y: Tensor, dy: Tensor, dim: int) -> Tensor:
    return _map_backward(cpu.log_softmax_backward, _core.log_softmax_backward, y, dy, dim)


@_softmax_op.register_fake
@log_softmax_op.register_fake
def _row_map_fake(x: Tensor, dim: int) -> Tensor:
    return x.new_empty(x.shape)


@_softmax_backward_op.register_fake
@_log_softmax_backward_op.register_fake
def _row_map_backward_fake(y: Tensor, dy: Tensor, dim: int) -> Tensor:
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


_softmax_op.register_autograd(_softmax_grad, setup_context=_save_output)
log_softmax_op.register_autograd(_log_softmax_grad, setup_context=_save_output)


# CUDA: rows along the last dimension take the thin path (one `_core` call); other dimensions and
# dtypes the NumPy-first CUDA path, which arranges the rows (or raises its TypeError).


def _thin(x: Tensor, dim: int) -> bool:
    return x.ndim > 0 and dim in (-1, x.ndim - 1) and x.dtype in _cuda.KERNEL_DTYPES


@_softmax_op.register_kernel("cuda")
def _softmax_cuda(x, dim):
    return _cuda.softmax(x, False) if _thin(x, dim) else dense(cuda.softmax(x, axis=dim))


@log_softmax_op.register_kernel("cuda")
def _log_softmax_cuda(x, dim):
    return _cuda.softmax(x, True) if _thin(x, dim) else dense(cuda.log_softmax(x, axis=dim))


@_softmax_backward_op.register_kernel("cuda")
def _softmax_backward_cuda(y, dy, dim):
    if _thin(y, dim) and dy.dtype == y.dtype:
        return _cuda.softmax_backward(y, dy, False)
    return dense(cuda.softmax_backward(y, dy, axis=dim))


@_log_softmax_backward_op.register_kernel("cuda")
def _log_softmax_backward_cuda(y, dy, dim):
    if _thin(y, dim) and dy.dtype == y.dtype:
        return _cuda.softmax_backward(y, dy, True)
    return dense(cuda.log_softmax_backward(y, dy, axis=dim))


def check_dim(dim, ndim: int, fname: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fname}: dim must be an int, got {dim!r}")
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"{fname}: dim {dim} is out of range for a {ndim}-d tensor")
    return dim % n if ndim else 0


def softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.softmax`` / ``torch.nn.functional.softmax`` computed by :func:`normax.softmax`.

    Parameters
    ----------
    input : Tensor
        Floating-point CPU tensor (float32, float64, float16, bfloat16), any strides. Complex
        raises TypeError (torch has no complex softmax: it raises NotImplementedError).
    dim : int, optional
        Dimension the probabilities sum to one over. None (deprecated in torch) applies torch's
        legacy implicit choice, with torch's UserWarning: dim 0 for 0-, 1- and 3-d input, else 1.
    _stacklevel : int, default 3
        The warning's stack level, as torch (the signature is exactly ``F.softmax``'s).
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
    if dim is None:  # torch's legacy implicit choice, with its warning (0 for 0-, 1-, 3-d, else 1)
        dim = torch.nn.functional._get_softmax_dim("softmax", input.dim(), _stacklevel)
    if dtype is not None:
        input = input.to(dtype)
    check_float(input, "normax.torch.softmax")
    return _softmax_op(input, check_dim(dim, input.ndim, "normax.torch.softmax"))


def log_softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.log_softmax`` / ``torch.nn.functional.log_softmax`` computed by :func:`normax.log_softmax`.

    Parameters
    ----------
    input : Tensor
        Floating-point CPU tensor; complex raises TypeError, as for :func:`softmax`.
    dim : int, optional
        Dimension to normalize over. None (deprecated in torch) applies torch's legacy implicit
        choice with its UserWarning, as :func:`softmax`.
    _stacklevel : int, default 3
        The warning's stack level, as torch (the signature is exactly ``F.log_softmax``'s).
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
    if dim is None:  # torch's legacy implicit choice, with its warning (0 for 0-, 1-, 3-d, else 1)
        dim = torch.nn.functional._get_softmax_dim("log_softmax", input.dim(), _stacklevel)
    if dtype is not None:
        input = input.to(dtype)
    check_float(input, "normax.torch.log_softmax")
    return log_softmax_op(input, check_dim(dim, input.ndim, "normax.torch.log_softmax"))


# ---------------------------------------------------------------------------------------------
# logsumexp


@op("normax::logsumexp")
def _logsumexp_op(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return to_tensor(cpu.logsumexp(host(x), axis=tuple(dim), keepdims=keepdim), x.dtype)


@_logsumexp_op.register_fake
def _logsumexp_fake(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
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


@_logsumexp_op.register_kernel("cuda")
def _logsumexp_cuda(x, dim, keepdim):
    return dense(cuda.logsumexp(x, axis=tuple(dim) if dim else None, keepdims=keepdim))


def logsumexp(input: Tensor, dim, keepdim: bool = False, *, out: Tensor | None = None) -> Tensor:
    """``torch.logsumexp`` computed by :func:`normax.logsumexp`.

    Parameters
    ----------
    input : Tensor
        CPU tensor; integer and bool inputs are promoted to the default float dtype, as torch does.
        Complex input is computed by ``torch.logsumexp`` itself (complex result, torch's gradient).
    dim : int or sequence of int
        Dimension(s) to reduce.
    keepdim : bool, default False
        Keep the reduced dimensions with size one.
    out : Tensor, optional
        Written with the result (resized and cast as torch's ``out=`` does) and returned. As in
        torch, an ``out=`` call is not differentiable.

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
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"{fname}: out must be a torch.Tensor, got {type(out).__name__}")
        if torch.is_grad_enabled() and (input.requires_grad or out.requires_grad):
            # torch: "functions with out=... arguments don't support automatic differentiation"
            return torch.logsumexp(input, dim, keepdim, out=out)
        result = logsumexp(input, dim, keepdim)
        if not (out.is_floating_point() or out.is_complex()):
            raise RuntimeError(
                f"{fname}: Expected floating point type for result tensor, but got: {out.dtype}"
            )
        if out.shape != result.shape:
            out.resize_(result.shape)
        return out.copy_(result)
    if input.is_complex():
        # normax's kernels are real: complex input is torch's own logsumexp (and its autograd).
        return torch.logsumexp(input, dim, keepdim)
    if not input.is_floating_point():
        input = input.to(torch.get_default_dtype())
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims:
        raise ValueError(f"{fname}: dim must name at least one dimension")
    norm = sorted({check_dim(d, input.ndim, fname) for d in dims})
    if len(norm) != len(dims):
        raise ValueError(f"{fname}: dim {dim!r} repeats a dimension")
    if input.ndim == 0:
        norm = []  # a 0-d tensor reduces its single element (dim 0 or -1), as torch
    return _logsumexp_op(input, norm, bool(keepdim))
