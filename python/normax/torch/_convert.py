"""Tensors <-> NumPy for the CPU kernels, and the argument checks every op family shares."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def host(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (bfloat16: a float32 copy)."""
    if not t.is_cpu:
        raise NotImplementedError(
            f"normax.torch: got a tensor on {t.device}; this op has no kernel for that device (CUDA "
            "kernels cover softmax, log_softmax, logsumexp, cross_entropy and the norms) and normax "
            "does not copy device tensors to the host silently"
        )
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().numpy()


def host_dense(t: Tensor) -> np.ndarray:
    """:func:`host`, C-contiguous: an incoming gradient is often a broadcast view (``y.sum()``'s is
    one value with zero strides), and one NumPy copy is the cheapest way to the kernels' fast path."""
    a = host(t)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray makes 0-d 1-d)


def host_opt(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else host(t)


def host64(t: Tensor) -> np.ndarray:
    """A flat float64 NumPy copy (never a view of a buffer) of a tensor on any device."""
    return t.detach().to("cpu", torch.float64).numpy().reshape(-1).copy()


def to_tensor(a, dtype: torch.dtype) -> Tensor:
    """A fresh C-contiguous tensor of `dtype` holding the NumPy result `a` (no copy when it fits)."""
    a = np.asarray(a)
    if not (a.flags.carray and a.dtype.isnative):  # carray: C-contiguous, aligned, writeable
        a = a.copy(order="C")
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


def absent(like: Tensor) -> Tensor:
    """The empty tensor that stands for an optional output or saved tensor that is None."""
    return like.new_empty((0,))


def dense(t: Tensor) -> Tensor:
    """A CUDA kernel's result as the fake kernels describe it: contiguous."""
    return t.contiguous()


def check_float(t: Tensor, fname: str, name: str = "input") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fname}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fname}: {name} must be a floating-point tensor, got {t.dtype}")


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
