"""The CUDA thin path of the ``normax.torch`` ops: one call into Rust per op and direction.

The ops' CUDA kernels (``register_kernel("cuda")`` in each family file; the eager route and
``torch.compile`` run the same ones) allocate their outputs with ``torch.empty`` (torch's caching
allocator) and make one ``_core.cuda_*`` call with raw arrays ``(address, dtype code, elements)``,
the shapes, the options object the public function checked and the current stream: no DLPack, no
option checks, no torch op besides the allocations on tensors that are already contiguous. The Rust
side enqueues the op's whole kernel sequence.

:func:`on_cuda` and :func:`stream` are the two places that ask torch about the device, so that the
host census (tests/cuda/test_host_census.py, benches/gpu/host_cost.py) can drive this path on CPU
tensors with the launches recorded instead of run.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import _core
from .._backends.cuda import device
from .._options import norm_options

# The raw arrays' dtype codes and the kernels' element types: the CUDA backend's, as torch dtypes.
_CODES = {getattr(torch, name): code for name, code in device.DTYPE_CODES.items()}
KERNEL_DTYPES = tuple(getattr(torch, name) for name in device.KERNEL_DTYPES)


def on_cuda(t: Tensor) -> bool:
    """Whether `t` takes the CUDA kernels."""
    return t.is_cuda


def raw(t: Tensor) -> tuple[int, int, int]:
    """`t` as the Rust entry points read it; `t` must be contiguous (the callers make it so) and
    referenced until the call returns (a temporary's memory may go back to the allocator at once)."""
    return t.data_ptr(), _CODES[t.dtype], t.numel()


def raw_opt(t: Tensor | None):
    return None if t is None else raw(t)


def _raw_stream(index: int) -> int:
    # What torch's compiled code asks for: the current stream's handle, with no Stream object made.
    return torch._C._cuda_getCurrentRawStream(index)


def stream(t: Tensor):
    """The current stream of `t`'s device, where the kernels are enqueued."""
    device.prepare()
    index = t.get_device()
    return _core.CudaStream(index, _raw_stream(index))


def rows_of(t: Tensor, cols: int) -> int:
    return t.numel() // cols if cols else 0


def kernel_dtype(t: Tensor, fname: str, name: str = "input") -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{fname}: {name} has dtype {t.dtype}; the CUDA kernels take float32, float16 and bfloat16 "
            "(cast first, e.g. x.float())"
        )


# ---------------------------------------------------------------------------------------------
# cross_entropy, class-index targets: the forward reduces the loss on the device and saves each
# row's float32 log-sum-exp; the backward streams the gradient from it.


def _rows_classes(input: Tensor) -> tuple[int, int]:
    return (1, input.shape[0]) if input.ndim == 1 else (input.shape[0], input.shape[1])


def _f32(weight: Tensor | None) -> Tensor | None:
    if weight is None or (weight.dtype == torch.float32 and weight.is_contiguous()):
        return weight
    return weight.float().contiguous()


def ce_forward_shapes(input: Tensor, target: Tensor, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """Empty (loss, lse, workspace) for contiguous (N, C) or (C,) logits: the loss in the logits'
    dtype, `lse` float32 per row, `workspace` float32 holding the mean's denominator (empty for
    reduction="none")."""
    rows, _ = _rows_classes(input)
    per_row = reduction == "none"
    return (
        input.new_empty(target.shape if per_row else ()),
        input.new_empty((rows,), dtype=torch.float32),
        input.new_empty((0 if per_row else 2 * rows + 2,), dtype=torch.float32),
    )


def ce_forward(
    input: Tensor, target: Tensor, weight: Tensor | None, options
) -> tuple[Tensor, Tensor, Tensor]:
    loss, lse, workspace = ce_forward_shapes(input, target, options.reduction)
    weight = _f32(weight)
    _core.cuda_ce_forward(
        options,
        (raw(input), raw(target), raw_opt(weight)),
        _rows_classes(input),
        (raw(loss), raw(lse), raw(workspace) if workspace.numel() else None),
        stream(input),
    )
    return loss, lse, workspace


def ce_backward(input, target, weight, lse, workspace, grad_loss, options) -> Tensor:
    per_row = options.reduction == "none"
    dlogits = torch.empty_like(input)
    grad_loss, weight = grad_loss.contiguous(), _f32(weight)
    _core.cuda_ce_backward(
        options,
        (raw(input), raw(target), raw_opt(weight)),
        _rows_classes(input),
        (raw(lse), None if per_row else raw(workspace)),
        (raw(dlogits), raw(grad_loss), 1 if per_row else 0),
        stream(input),
    )
    return dlogits


# ---------------------------------------------------------------------------------------------
# rms_norm, layer_norm: statistics float32; parameters read (and their gradients written) in
# their own dtype where that is float32 or x's.


def _param(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """`p` as the kernels read it: float32 or `dtype` (x's) as it is, another dtype as float32."""
    if p is None:
        return None
    if p.dtype != dtype and p.dtype != torch.float32:
        p = p.float()
    return p.contiguous()


def _rows_cols(x: Tensor, ndim: int) -> tuple[int, int]:
    cols = math.prod(x.shape[x.ndim - ndim :])
    return rows_of(x, cols), cols


def norm_forward(kind: str, x: Tensor, ndim: int, weight, bias, eps: float) -> tuple:
    """(y, mean, rstd) for layer_norm, (y, rstd) otherwise, of contiguous `x`."""
    kernel_dtype(x, f"normax.torch.{kind}_norm")
    x = x.contiguous()
    lead = x.shape[: x.ndim - ndim]
    y = torch.empty_like(x)
    rstd = x.new_empty(lead, dtype=torch.float32)
    mean = x.new_empty(lead, dtype=torch.float32) if kind == "layer" else None
    w, b = _param(weight, x.dtype), _param(bias, x.dtype)
    _core.cuda_norm_forward(
        norm_options(kind, eps),
        raw(x),
        (raw_opt(w), raw_opt(b)),
        raw(y),
        (raw_opt(mean), raw(rstd)),
        _rows_cols(x, ndim),
        stream(x),
    )
    return (y, mean, rstd) if kind == "layer" else (y, rstd)


@functools.lru_cache(maxsize=256)
def _norm_workspace(options, shape: tuple[int, int], has_params: bool, index: int) -> int:
    # float32 elements of the backward's partial sums: a function of the device's SM count
    return _core.cuda_norm_workspace(options, shape, has_params, _core.CudaStream(index, 0))


def norm_backward(kind: str, dy: Tensor, x: Tensor, ndim: int, weight, bias, mean, rstd, eps: float):
    """(dx, dweight or None, dbias or None); the parameter gradients in the parameters' dtype."""
    dy = dy.contiguous()
    options = norm_options(kind, eps)
    shape = _rows_cols(x, ndim)
    on = stream(x)
    w, b = _param(weight, x.dtype), _param(bias, x.dtype)
    dx = torch.empty_like(x)
    dw = None if w is None else torch.empty_like(w)
    db = None if b is None else torch.empty_like(b)
    size = _norm_workspace(options, shape, w is not None or b is not None, on.device)
    workspace = x.new_empty((size,), dtype=torch.float32) if size else None
    _core.cuda_norm_backward(
        options,
        (raw(dy), raw(x), raw_opt(w)),
        (raw_opt(mean), raw(rstd)),
        (raw(dx), (raw_opt(dw), raw_opt(db)), raw_opt(workspace)),
        shape,
        on,
    )
    if dw is not None and dw.dtype != weight.dtype:  # a parameter of a third dtype: rounded once
        dw = dw.to(weight.dtype)
    if db is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax over the last dimension


def softmax(x: Tensor, log: bool) -> Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    cols = x.shape[-1]
    _core.cuda_softmax(raw(x), raw(y), (rows_of(x, cols), cols), log, stream(x))
    return y


def softmax_backward(y: Tensor, dy: Tensor, log: bool) -> Tensor:
    dy = dy.contiguous()
    dx = torch.empty_like(y)
    cols = y.shape[-1]
    _core.cuda_softmax_backward(raw(y), raw(dy), raw(dx), (rows_of(y, cols), cols), log, stream(y))
    return dx
