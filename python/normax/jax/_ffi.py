"""XLA's typed FFI: normax's handlers registered with JAX, and the one call every op makes.

Each op family calls :func:`call` with a target name (``normax_softmax``, ...), the result shapes,
the operands and the attributes. With the FFI (jax >= 0.4.34's ``jax.ffi`` and an extension that
exports ``_core.ffi_targets``) that is one ``jax.ffi.ffi_call``: the handler reads XLA's buffers in
place, inside the compiled program. Without it (jaxlib too old, or ``NORMAX_JAX_FFI=0``) the same
target runs as a ``jax.pure_callback`` of its NumPy host implementation, which each family module
registers with :func:`host_impl`: same operands, attributes and results, so the two routes are
interchangeable and tested against each other.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from .. import _core

_HOSTS: dict[str, Callable[..., tuple[np.ndarray, ...]]] = {}
# NORMAX_JAX_FFI=0 forces the pure_callback route (read once; tests switch with use_ffi()).
_enabled = os.environ.get("NORMAX_JAX_FFI", "1") != "0"


def host_impl(target: str):
    """Register the NumPy host implementation of `target` (the fallback route): a function of the
    operands as NumPy arrays and the attributes as keywords, returning a tuple of arrays."""

    def register(fn):
        _HOSTS[target] = fn
        return fn

    return register


@functools.cache
def _registered(platform: str) -> bool:
    """Register every handler of `platform` with XLA, once; False where that cannot be done."""
    ffi = getattr(jax, "ffi", None)
    try:
        targets = _core.ffi_targets(platform)
    except AttributeError:  # an extension built before the FFI handlers
        return False
    if ffi is None or not targets:
        return False
    for name, capsule in targets.items():
        ffi.register_ffi_target(name, capsule, platform=platform)
    return True


def _ffi_ready() -> bool:
    if not (_enabled and _registered("cpu")):
        return False
    # CUDA handlers exist only in builds with the cuda feature and matter only where jax has a GPU.
    if any(d.platform == "gpu" for d in jax.devices()):
        _registered("CUDA")
    return True


def uses_ffi() -> bool:
    """Whether :func:`call` goes through XLA's FFI (else through ``jax.pure_callback``)."""
    return _ffi_ready()


@contextlib.contextmanager
def use_ffi(enabled: bool) -> Iterator[None]:
    """Within the block, calls traced from now on take the FFI route (True) or the fallback."""
    global _enabled
    saved, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = saved


@functools.cache
def _host(target: str, attrs: tuple) -> Callable[..., tuple[np.ndarray, ...]]:
    # One object per (target, attributes): JAX caches a callback's compilation by its identity.
    fn = _HOSTS[target]
    kwargs = dict(attrs)

    def host(*arrays):
        return tuple(fn(*(np.asarray(a) for a in arrays), **kwargs))

    return host


def call(
    target: str,
    results: Sequence[jax.ShapeDtypeStruct],
    *operands,
    vmap_method: str = "broadcast_all",
    **attrs,
) -> tuple[jax.Array, ...]:
    """Run `target` on `operands` with scalar `attrs`; returns one array per entry of `results`."""
    results = list(results)
    if _ffi_ready():
        out = jax.ffi.ffi_call(target, results, vmap_method=vmap_method)(*operands, **attrs)
    else:
        host = _host(target, tuple(sorted(attrs.items())))
        out = jax.pure_callback(host, results, *operands, vmap_method=vmap_method)
    return tuple(out)
