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
    # Full reductions of the stand-in give NumPy scalars (CuPy gives 0-d device arrays): as
    # arrays, kept alive until the test ends (the kernels read them by address).
    original, kept = device.Lib.raw, []

    def raw(self, a):
        if not isinstance(a, FakeCupyArray):
            kept.append(a := np.asarray(a).view(FakeCupyArray))
        return original(self, a)

    monkeypatch.setattr(device.Lib, "raw", raw)
    return kernels
