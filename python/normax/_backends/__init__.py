"""The GPU backends of the public functions, registered by name.

Each backend is a module (or package) mirroring the op families of the CPU path (softmax,
cross_entropy, norms, power_norm) whose functions take the public functions' arguments; its
``OPS`` table names the public functions it has a kernel for. Backends are imported on first
use: ``import normax`` loads neither.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, what the caller passed to get there: for the error message)
_REGISTRY = {
    "cuda": ("normax._backends.cuda", "CUDA arrays"),
    "wgpu": ("normax._backends.wgpu", 'device="wgpu"'),
}


def backend(name: str):
    """The module of backend `name` ("cuda" or "wgpu"), imported on first use."""
    path = _REGISTRY[name][0]
    module = sys.modules.get(path)
    return module if module is not None else importlib.import_module(path)


def kernel(name: str, op: str):
    """Backend `name`'s implementation of the public function `op`, or NotImplementedError."""
    impl = backend(name).OPS.get(op)
    if impl is None:
        raise NotImplementedError(
            f"no {name} kernel for normax.{op} ({_REGISTRY[name][1]}); it runs on the CPU only "
            "(move the data to the host)"
        )
    return impl
