"""Fixtures of the CUDA path's tests: the kernels emulated (see cuda_emulation.py)."""

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cuda_emulation import FakeCupyArray, cupy_module, emulate
from normax._backends.cuda import device


@pytest.fixture
def cuda_kernels(monkeypatch):
    """CPU torch tensors treated as CUDA arrays; the kernels emulated (and recorded)."""
    return emulate(monkeypatch, lambda a: isinstance(a, torch.Tensor))


@pytest.fixture
def cupy_kernels(monkeypatch):
    """FakeCupyArray treated as CuPy CUDA arrays; the kernels emulated (and recorded)."""
    monkeypatch.setitem(sys.modules, "cupy", cupy_module())
    kernels = emulate(monkeypatch, lambda a: isinstance(a, FakeCupyArray))
    # Full reductions of the stand-in give NumPy scalars (CuPy gives 0-d device arrays).
    original = device.Lib.capsule
    monkeypatch.setattr(
        device.Lib,
        "capsule",
        lambda self, a: original(
            self, a if isinstance(a, FakeCupyArray) else np.asarray(a).view(FakeCupyArray)
        ),
    )
    return kernels
