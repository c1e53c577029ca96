"""stablemax, log_stablemax and their backwards on CUDA arrays (kernels/stablemax.cu; the
backwards are softmax's kernels scaled by 1 / (1 + |x|), as on the CPU)."""

from __future__ import annotations

from ... import _core
from .device import lib_of
from .softmax import backward_rows, softmax_like


def stablemax(x, axis=-1, *, out=None):
    return softmax_like(x, axis, out, False, "normax.stablemax", _core.cuda_stablemax)


def log_stablemax(x, axis=-1, *, out=None):
    return softmax_like(x, axis, out, True, "normax.log_stablemax", _core.cuda_stablemax)


def _scaled(y, dy, x, axis, log: bool, fname: str):
    lib = lib_of((y, dy, x), fname)
    x = lib.input(x, "x")
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"x: shape {tuple(x.shape)} does not match y shape {tuple(y.shape)}")
    g = backward_rows(y, dy, axis, log, fname)
    return lib.astype(g / (1 + abs(lib.astype(x, g.dtype))), g.dtype)


def stablemax_backward(y, dy, x, axis=-1):
    return _scaled(y, dy, x, axis, False, "normax.stablemax_backward")


def log_stablemax_backward(y, dy, x, axis=-1):
    return _scaled(y, dy, x, axis, True, "normax.log_stablemax_backward")


def ce_logits(lib, work, softcap):
    """phi = log s(x') in float32 and dphi/dx (x' the softcapped logits): the StableMax
    cross-entropy as the softmax one of phi (see the normax._stablemax module)."""
    x = lib.astype(work, lib.float32())
    chain = None
    if softcap is not None:
        u = lib.mod.tanh(x / softcap)
        x = softcap * u
        chain = 1 - u * u
    a = abs(x)
    phi = lib.mod.copysign(lib.mod.log1p(a), x)
    r = 1 / (1 + a)
    return lib.contiguous(phi), (r if chain is None else r * chain)
