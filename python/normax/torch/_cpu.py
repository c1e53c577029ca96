"""The CPU thin path of the ``normax.torch`` ops: one call into Rust per op and direction.

The ops' CPU implementations (each family file) try these first: for plain tensors (see
:func:`plain`) they make the very ``_core`` call that the NumPy function's own fast path would
make, with the options object the public function checked, and none of the NumPy layer's
argument handling; so both give bitwise-identical results. Each returns None where its
conditions do not hold, and the caller takes the NumPy function (its conversions, checks and
messages).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _core
from .._options import index_error, norm_options
from ._convert import host, host_dense

_KERNEL_DTYPES = (torch.float32, torch.float64)


def plain(t: Tensor) -> bool:
    """Whether the kernels read `t`'s memory as it is: a contiguous float32/float64 CPU tensor
    without a negative bit."""
    return t.dtype in _KERNEL_DTYPES and t.is_cpu and t.is_contiguous() and not t.is_neg()


def row_map(kernel_last, x: Tensor, dim: int) -> Tensor | None:
    """softmax / log_softmax over the last dimension (`kernel_last`: ``_core.softmax_last`` or
    ``_core.log_softmax_last``), as ``normax._softmax.row_map``'s first step."""
    if dim != x.ndim - 1 or not plain(x):
        return None
    y = kernel_last(x.detach().numpy())
    return None if y is None else torch.from_numpy(y)


def row_backward(kernel, y: Tensor, dy: Tensor, dim: int) -> Tensor | None:
    """softmax / log_softmax backward over the last dimension (`kernel`: ``_core.softmax_backward``
    or ``_core.log_softmax_backward``), as ``normax._softmax.row_backward``'s fast path."""
    n = y.shape[-1] if y.ndim else 0
    if not (n and dim == y.ndim - 1 and dy.dtype == y.dtype and dy.shape == y.shape and plain(y)):
        return None
    yh, dyh = y.detach().numpy(), host_dense(dy)
    dx = np.empty_like(yh)
    kernel(yh, dyh, dx, (yh.size // n, n, 1))
    return torch.from_numpy(dx)


def _plain_of(x: Tensor, *others: Tensor | None) -> bool:
    """`x` plain and not empty, and each of `others` None or plain of `x`'s dtype."""
    return plain(x) and x.numel() > 0 and all(p is None or (p.dtype == x.dtype and plain(p)) for p in others)


def _vector(p: Tensor | None) -> np.ndarray | None:
    return None if p is None else p.detach().numpy().reshape(-1)


def norm_forward(kind: str, x: Tensor, ndim: int, weight, bias, eps: float):
    """(y, mean or None, rstd) of layer_norm ("layer") or rms_norm ("rms") over the trailing `ndim`
    dimensions (`weight`, `bias` of their shape, as the public functions checked), statistics
    float64 as ``normax._norms``'s fast path makes them; or None."""
    if not _plain_of(x, weight, bias):
        return None
    xh = x.detach().numpy()
    y = np.empty_like(xh)
    rstd = np.empty(x.shape[: x.ndim - ndim], np.float64)
    mean = np.empty_like(rstd) if kind == "layer" else None
    n = xh.size // rstd.size
    _core.norm_forward(
        norm_options(kind, eps), xh.reshape(-1, n), _vector(weight), _vector(bias), y.reshape(-1, n), mean, rstd
    )  # fmt: skip
    return torch.from_numpy(y), None if mean is None else torch.from_numpy(mean), torch.from_numpy(rstd)


def norm_backward(kind: str, dy: Tensor, x: Tensor, weight, bias, mean, rstd, eps: float):
    """(dx, dweight or None, dbias or None) of :func:`norm_forward`, from its `mean` (None for
    "rms") and `rstd`; or None."""
    if not (
        dy.dtype == x.dtype
        and _plain_of(x, weight, bias)
        and all(s is None or (s.dtype == torch.float64 and plain(s)) for s in (mean, rstd))
    ):
        return None
    xh, dyh = x.detach().numpy(), host_dense(dy)
    n = xh.size // rstd.numel()
    dx = np.empty_like(xh)
    dw = None if weight is None else np.zeros(weight.shape, xh.dtype)
    db = None if bias is None else np.zeros(bias.shape, xh.dtype)
    _core.norm_backward(
        norm_options(kind, eps), dyh.reshape(-1, n), xh.reshape(-1, n), _vector(weight),
        (None if mean is None else host(mean), host(rstd)), dx.reshape(-1, n),
        (None if dw is None else dw.reshape(-1), None if db is None else db.reshape(-1)),
    )  # fmt: skip
    return tuple(None if a is None else torch.from_numpy(a) for a in (dx, dw, db))


def cross_entropy(input: Tensor, target: Tensor, weight, axis: int, opts, with_grad: bool):
    """(loss, dlogits or None) of (rows, classes) plain logits, their (rows,) int64 class indices
    and no or a plain class weight of their dtype, without a softcap (`opts`: the checked
    ``CeOptions``), as ``normax._cross_entropy``'s fast path (``_fast_rows``); or None."""
    if not (
        axis == 1
        and input.ndim == 2
        and input.shape[1]
        and plain(input)
        and target.dtype == torch.int64
        and target.shape == input.shape[:1]
        and target.is_cpu
        and target.is_contiguous()
        and (
            weight is None
            or (weight.dtype == input.dtype and weight.shape == input.shape[1:] and plain(weight))
        )
        and opts.softcap is None
    ):
        return None
    x, t = input.detach().numpy(), target.numpy()
    loss = np.empty(x.shape[0] if opts.reduction == "none" else 1, x.dtype)
    grad = np.empty_like(x) if with_grad else None
    try:
        _core.cross_entropy(x, t, _vector(weight), opts, loss, grad, 1.0)
    except IndexError:
        raise index_error(t, x.shape[1], opts.ignore_index) from None
    loss = torch.from_numpy(loss if opts.reduction == "none" else loss.reshape(()))
    return loss, None if grad is None else torch.from_numpy(grad)
