"""PowerNorm on CUDA arrays (kernels/power_norm.cu).

The passes over the tokens run on the device; the O(C) bookkeeping of the state (batch variance,
running_phi, warmup, ema_gz) is the CPU path's (normax._power_norm) on the host buffers of
PowerNormState. So a training forward reads the C channel sums of u^2 back (a host
synchronization), and so does a training backward (for ema_gz); evaluation only copies C factors
to the device.
"""

from __future__ import annotations

import numpy as np

from ... import _core
from ..._power_norm import (
    PowerNormSaved,
    backward_ema,
    check_types,
    check_x_shape,
    forward_statistics,
    pad_mask_transposed,
    update_ema,
)
from . import device
from .device import Lib, lib_of, run


class _CudaPowerNormSaved(PowerNormSaved):
    """A PowerNormSaved whose ``x`` ((tokens, C), the forward's dtype) and ``weight`` (float32 or
    None) are arrays on the forward's GPU."""

    __slots__ = ()


def _param(lib: Lib, p, name: str, c: int):
    """weight/bias as a float32 (C,) device array, or None."""
    if p is None:
        return None
    p = lib.on_device(p, name)
    if not lib.dtype_name(p).startswith(("float", "bfloat")):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {lib.dtype_name(p)}")
    if tuple(p.shape) != (c,):
        raise ValueError(f"{name}: shape {tuple(p.shape)} does not match the normalized shape ({c},)")
    return lib.contiguous(lib.astype(p, lib.float32()))


def _pad_flags(lib: Lib, pad_mask, shape):
    """pad_mask as float32 per token in the kernels' token order (t * B + b), 1 = padding; or None."""
    if pad_mask is None:
        return None
    m = lib.on_device(pad_mask, "pad_mask")
    dtype = lib.dtype_name(m)
    if pad_mask_transposed(tuple(m.shape), dtype == "bool", dtype, shape):
        m = lib.permute(m, (1, 0))
    return lib.contiguous(lib.astype(m, lib.float32())).reshape(-1)


def power_norm(x, weight, bias, state, *, training=True, pad_mask=None, return_saved=False):
    check_types(None, state)
    lib = lib_of((x, weight, bias, pad_mask), "normax.power_norm")
    with lib.current():
        return _power_norm(lib, x, weight, bias, state, training, pad_mask, return_saved)


def _power_norm(lib: Lib, x, weight, bias, state, training, pad_mask, return_saved):
    x = lib.input(x, "x")
    c = state.num_features
    shape = tuple(x.shape)
    check_x_shape(shape, state)
    w = _param(lib, weight, "weight", c)
    b = _param(lib, bias, "bias", c)
    pad = _pad_flags(lib, pad_mask, shape)
    work = lib.contiguous(x).reshape(-1, c)
    tokens = work.shape[0]
    f32, f64 = lib.float32(), lib.mod.float64
    shift = b if b is not None else lib.dev32(np.zeros(c), "bias")
    y = lib.empty((tokens, c), x.dtype)
    options = _core.PowerNormOptions(c, state.group_num, state.eps)

    def passes(zscale, stats):
        sumsq = lib.empty((c,), f32) if stats else None
        scale = None
        if zscale is not None:
            # weight * zscale in float64, rounded once to float32: the CPU path's (w64 * zscale).astype
            z = lib.on_device(np.asarray(zscale, np.float64), "zscale")
            scale = lib.astype(z if w is None else lib.astype(w, f64) * z, f32)
        out = None if zscale is None else (scale, shift, y)
        run(lib, _core.cuda_power_norm_forward, options, work, pad if stats else None, sumsq, out)
        return None if sumsq is None else lib.host64(sumsq)

    kept = tokens - (int((pad != 0).sum()) if pad is not None and training else 0)
    zscale, dscale = forward_statistics(state, training, kept, passes)
    y = y.reshape(shape)
    if not return_saved:
        return y
    saved = _CudaPowerNormSaved(
        x=work,
        shape=shape,
        dtype=x.dtype,
        weight=w,
        has_bias=b is not None,
        zscale=zscale,
        dscale=dscale,
        training=bool(training),
        eps=state.eps,
        group_num=state.group_num,
    )
    return y, saved


def power_norm_saved(x, weight, has_bias, zscale, dscale, *, training, eps, group_num) -> PowerNormSaved:
    """The saved record of a CUDA forward on `x` (a torch CUDA tensor or CuPy array) that returned
    (zscale, dscale) (host float64, shape (C,)); for adapters that carry only arrays between the
    forward and the backward."""
    lib = lib_of((x,), "normax.power_norm_backward")
    x = lib.input(x, "x")
    c = x.shape[-1]
    return _CudaPowerNormSaved(
        x=lib.contiguous(x).reshape(-1, c),
        shape=tuple(x.shape),
        dtype=x.dtype,
        weight=_param(lib, weight, "weight", c),
        has_bias=bool(has_bias),
        zscale=np.asarray(zscale, np.float64).reshape(-1),
        dscale=np.asarray(dscale, np.float64).reshape(-1),
        training=bool(training),
        eps=float(eps),
        group_num=int(group_num),
    )


def power_norm_backward(dy, saved, state):
    return power_norm_backward_as(dy, saved, state, None)


def power_norm_backward_as(dy, saved, state, param_dtype):
    """power_norm_backward with dweight and dbias in `param_dtype` (None: the promoted dtype of x
    and dy) straight from the float32 sums, for adapters whose parameters are wider than x."""
    fname = "normax.power_norm_backward"
    check_types(saved, state)
    if not device.is_cuda_array(saved.x):
        raise ValueError(
            f"{fname}: saved comes from a forward on the CPU while dy is on the GPU; run both on one device"
        )
    lib = lib_of((dy, saved.x), fname)
    with lib.current():
        return _power_norm_backward(lib, dy, saved, state, param_dtype)


def _power_norm_backward(lib: Lib, dy, saved, state, param_dtype):
    dy = lib.input(dy, "dy")
    if tuple(dy.shape) != tuple(saved.shape):
        raise ValueError(
            f"dy: shape {tuple(dy.shape)} does not match the forward's x shape {tuple(saved.shape)}"
        )
    work = lib.on_device(saved.x, "saved.x")
    tokens, c = work.shape
    if c != state.num_features:
        raise ValueError(f"state: num_features {state.num_features} does not match the forward's {c}")
    result = lib.promote(saved.dtype, dy.dtype)
    dy = lib.astype(dy, work.dtype)
    dyw = lib.contiguous(dy).reshape(tokens, c)
    dx = lib.empty((tokens, c), work.dtype)
    sums = lib.empty((3 * c,), lib.float32())
    options = _core.PowerNormOptions(c, saved.group_num, saved.eps)
    ema = lib.dev32(backward_ema(state, saved.training, np.float64), "ema_gz")
    factors = (lib.dev32(saved.zscale, "zscale"), ema, lib.dev32(saved.dscale, "dscale"))
    run(lib, _core.cuda_power_norm_backward, options, (dyw, work, saved.weight), factors, (dx, sums))
    if saved.training:  # the read back only where the state changes
        update_ema(state, lib.host64(sums[:c]), tokens)
    dx = lib.astype(dx.reshape(saved.shape), result)
    pd = result if param_dtype is None else param_dtype
    # Copies: the three results never share memory (torch custom ops may not return aliases).
    dweight = None if saved.weight is None else lib.copy(lib.astype(sums[c : 2 * c], pd))
    dbias = lib.copy(lib.astype(sums[2 * c :], pd)) if saved.has_bias else None
    return dx, dweight, dbias
