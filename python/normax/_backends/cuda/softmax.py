"""softmax, log_softmax, logsumexp and their backwards on CUDA arrays (kernels/softmax.cu)."""

from __future__ import annotations

import math

from ... import _core
from ..._arrays import Plan, normalize_axes
from .. import missing
from .device import lib_of, run


def softmax_like(x, axis, out, log: bool, fname: str, kernel=None):
    """softmax or log_softmax (`log`) by `kernel` (None: ``_core.cuda_softmax``; stablemax's
    takes the same arguments)."""
    lib = lib_of((x, out), fname)
    x = lib.input(x, "x")
    plan = Plan(tuple(x.shape), normalize_axes(axis, x.ndim), last=True)
    y = lib.output(plan, x.dtype, out)
    run(lib, kernel or _core.cuda_softmax, lib.arrange(x, plan), y, (plan.outer, plan.len), log)
    return lib.finish(lib.restore(y, plan), out)


def softmax(x, axis=-1, *, out=None):
    return softmax_like(x, axis, out, False, "normax.softmax")


def log_softmax(x, axis=-1, *, out=None):
    return softmax_like(x, axis, out, True, "normax.log_softmax")


def logsumexp(x, axis=-1, *, b=None, keepdims=False, return_sign=False):
    if b is not None:
        raise missing("cuda", "logsumexp", "b= (weights)")
    if return_sign:
        raise missing("cuda", "logsumexp", "return_sign=True")
    lib = lib_of((x,), "normax.logsumexp")
    x = lib.input(x, "x")
    plan = Plan(tuple(x.shape), normalize_axes(axis, x.ndim), last=True)
    # Its elements are the rows, in order, whatever the kept shape.
    r = lib.empty(plan.keepdims_shape if keepdims else plan.reduced_shape, x.dtype)
    if plan.len == 0:
        r[...] = -math.inf  # the log of an empty sum, as NumPy's and SciPy's
    else:
        run(lib, _core.cuda_logsumexp, lib.arrange(x, plan), r, (plan.outer, plan.len))
    return r


def backward_rows(y, dy, axis, log: bool, fname: str):
    """softmax_backward or log_softmax_backward (`log`) of CUDA arrays."""
    lib = lib_of((y, dy), fname)
    y = lib.input(y, "y")
    dy = lib.input(dy, "dy")
    if tuple(y.shape) != tuple(dy.shape):
        raise ValueError(f"{fname}: dy has shape {tuple(dy.shape)}, y has {tuple(y.shape)}")
    dy = lib.astype(dy, y.dtype)
    plan = Plan(tuple(y.shape), normalize_axes(axis, y.ndim), last=True)
    dx = lib.empty(plan.arranged_shape, y.dtype)
    ya, dya = lib.arrange(y, plan), lib.arrange(dy, plan)
    run(lib, _core.cuda_softmax_backward, ya, dya, dx, (plan.outer, plan.len), log)
    return lib.restore(dx, plan)


def softmax_backward(y, dy, axis=-1):
    return backward_rows(y, dy, axis, False, "normax.softmax_backward")


def log_softmax_backward(y, dy, axis=-1):
    return backward_rows(y, dy, axis, True, "normax.log_softmax_backward")
