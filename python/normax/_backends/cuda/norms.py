"""rms_norm, layer_norm, crms_norm and their backwards on CUDA arrays (kernels/norms.cu)."""

from __future__ import annotations

import math

from ... import _core
from ..._arrays import Plan
from ..._options import norm_axes, norm_options
from .device import lib_of, run


def _dtype_eps(lib, x) -> float:
    return {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[lib.dtype_name(x)]


def _params(lib, x, params, shape):
    """The parameters on the device, contiguous, in the dtype the kernels read them in: their own
    where that is float32 or x's dtype (weight and bias alike), else float32."""
    checked = []
    for p, name in zip(params, ("weight", "bias")):
        if p is not None:
            p = lib.on_device(p, name)
            if tuple(p.shape) != shape:
                raise ValueError(
                    f"{name}: shape {tuple(p.shape)} does not match the normalized shape {shape} (x.shape[axis:])"
                )
        checked.append(p)
    dtype = _params_dtype(lib, x, checked)
    return [None if p is None else lib.contiguous(lib.astype(p, dtype)) for p in checked]


def _params_dtype(lib, x, params):
    """The dtype of `params` where the kernels take it (float32 or x's, all alike), else float32."""
    names = {lib.dtype_name(p) for p in params if p is not None}
    if len(names) == 1 and names <= {"float32", lib.dtype_name(x)}:
        return next(p for p in params if p is not None).dtype
    return lib.float32()


def _norm_forward(kind, fname, x, weight, bias, eps, axis, out, return_stats):
    lib = lib_of((x, weight, bias, out), fname)
    x = lib.input(x, "x")
    axes = norm_axes(axis, x.ndim)
    shape = tuple(x.shape[axes[0] :])
    options = norm_options(kind, _dtype_eps(lib, x) if eps is None else eps)
    plan = Plan(tuple(x.shape), axes, last=True)  # trailing axes: never moved
    f32 = lib.float32()
    params = _params(lib, x, (weight, bias), shape)
    y = lib.output(plan, x.dtype, out)
    lead = tuple(x.shape[: axes[0]])
    mean = lib.empty(lead, f32) if return_stats and kind == "layer" else None
    rstd = lib.empty(lead, f32) if return_stats else None
    if plan.len == 0:  # statistics of empty rows: NaN, as NumPy's mean of nothing (and the CPU)
        for stat in (mean, rstd):
            if stat is not None:
                stat[...] = math.nan
    xc = lib.contiguous(x)
    run(lib, _core.cuda_norm_forward, options, xc, tuple(params), y, (mean, rstd), (plan.outer, plan.len))
    y = lib.finish(y, out)
    if not return_stats:
        return y
    return (y, mean, rstd) if kind == "layer" else (y, rstd)


def norm_backward(kind, fname, dy, x, weight, bias, eps, axis, mean, rstd, params_dtype="x"):
    """dx and the parameter gradients, those in `x`'s dtype, or for params_dtype=None in the
    parameters' own dtype where the kernels write it (float32 or x's dtype), else float32."""
    lib = lib_of((dy, x, weight, bias, mean, rstd), fname)
    x = lib.input(x, "x")
    dy = lib.input(dy, "dy")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: shape {tuple(dy.shape)} does not match x shape {tuple(x.shape)}")
    dy = lib.astype(dy, x.dtype)
    axes = norm_axes(axis, x.ndim)
    shape = tuple(x.shape[axes[0] :])
    lead = tuple(x.shape[: axes[0]])
    rows, cols = math.prod(lead), math.prod(shape)
    options = norm_options(kind, _dtype_eps(lib, x) if eps is None else eps)
    x, dy = lib.contiguous(x), lib.contiguous(dy)
    f32 = lib.float32()
    w, b = _params(lib, x, (weight, bias), shape)
    if kind == "layer" and (mean is None) != (rstd is None):
        missing = "mean" if mean is None else "rstd"
        raise ValueError(f"{missing}: give both saved statistics (mean and rstd) or neither")
    if rstd is None:
        mean = lib.empty((rows,), f32) if kind == "layer" else None
        rstd = lib.empty((rows,), f32)
        run(lib, _core.cuda_norm_forward, options, x, (None, None), None, (mean, rstd), (rows, cols))
    else:
        stats = []
        for s, name in ((mean, "mean"), (rstd, "rstd")):
            if s is None:
                stats.append(None)
                continue
            s = lib.on_device(s, name)
            if tuple(s.shape) != lead:
                raise ValueError(f"{name}: expected shape {lead} (one per row), got {tuple(s.shape)}")
            stats.append(lib.contiguous(lib.astype(s, f32)))
        mean, rstd = stats
    dx = lib.empty(tuple(x.shape), x.dtype)
    gdtype = x.dtype if params_dtype is not None else _params_dtype(lib, x, (w, b))
    dw = lib.empty(shape, gdtype) if w is not None else None
    db = lib.empty(shape, gdtype) if b is not None else None
    has_params = dw is not None or db is not None
    need = run(lib, _core.cuda_norm_workspace, options, (rows, cols), has_params)
    workspace = lib.empty((need,), f32) if need else None
    run(
        lib,
        _core.cuda_norm_backward,
        options,
        (dy, x, w),
        (mean, rstd),
        (dx, (dw, db), workspace),
        (rows, cols),
    )
    if kind == "layer":
        return dx, dw, db
    return dx, dw


def rms_norm(x, weight=None, *, eps=None, axis=-1, out=None, return_stats=False):
    return _norm_forward("rms", "normax.rms_norm", x, weight, None, eps, axis, out, return_stats)


def rms_norm_backward(dy, x, weight=None, *, eps=None, axis=-1, rstd=None):
    return norm_backward("rms", "normax.rms_norm_backward", dy, x, weight, None, eps, axis, None, rstd)


def layer_norm(x, weight=None, bias=None, *, eps=1e-5, axis=-1, out=None, return_stats=False):
    return _norm_forward("layer", "normax.layer_norm", x, weight, bias, eps, axis, out, return_stats)


def layer_norm_backward(dy, x, weight=None, bias=None, *, eps=1e-5, axis=-1, mean=None, rstd=None):
    return norm_backward("layer", "normax.layer_norm_backward", dy, x, weight, bias, eps, axis, mean, rstd)


def crms_norm(x, weight=None, *, eps=1e-6, axis=-1, out=None, return_stats=False):
    return _norm_forward("crms", "normax.crms_norm", x, weight, None, eps, axis, out, return_stats)


def crms_norm_backward(dy, x, weight=None, *, eps=1e-6, axis=-1, rstd=None):
    return norm_backward("crms", "normax.crms_norm_backward", dy, x, weight, None, eps, axis, None, rstd)
