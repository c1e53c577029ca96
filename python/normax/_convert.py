"""Conversion between the caller's arrays and the NumPy-first functions, by the caller's namespace.

Three steps, each used by :func:`normax._dispatch.array_api`:

- :func:`library` tells a foreign array (torch, JAX, array-API) from the plain arguments;
- :func:`promote` casts the arguments whose dtypes combine into the result's to the dtype their
  own namespace promotes them to (``xp.result_type``, integers becoming its default float), so
  that a torch call follows torch's promotion and only a NumPy call follows NumPy's;
- :func:`to_numpy` views an array's memory from NumPy (None where NumPy cannot read it without a
  copy: another device) and :func:`convert_result` hands the results back in the caller's library.

Nothing here imports torch or JAX: a tensor can only arrive once its library is imported, and
the ``array_api_compat`` predicates look in ``sys.modules`` without importing anything.
"""

from __future__ import annotations

import array_api_compat as _compat
import numpy as np

# Types that are never a foreign array: the common arguments (arrays, numbers, axes, options).
PLAIN = frozenset({np.ndarray, int, float, bool, str, tuple, list, type(None)})

# The arguments whose dtypes combine into the result's, per op; the others keep their own role
# (targets, class weights and norm weights are cast to the input's dtype by the op itself).
PROMOTED = {
    "softmax": ("x",),
    "log_softmax": ("x",),
    "logsumexp": ("x", "b"),
    "softmax_backward": ("y", "dy"),
    "log_softmax_backward": ("y", "dy"),
    "stablemax": ("x",),
    "log_stablemax": ("x",),
    "stablemax_backward": ("y", "dy"),
    "log_stablemax_backward": ("y", "dy"),
    "cross_entropy": ("logits",),
    "cross_entropy_with_grad": ("logits",),
    "linear_cross_entropy": ("hidden", "linear_weight", "linear_bias"),
    "linear_cross_entropy_with_grad": ("hidden", "linear_weight", "linear_bias"),
    "rms_norm": ("x",),
    "rms_norm_backward": ("dy", "x"),
    "layer_norm": ("x",),
    "layer_norm_backward": ("dy", "x"),
    "crms_norm": ("x",),
    "crms_norm_backward": ("dy", "x"),
    "power_norm": ("x",),
    "power_norm_backward": ("dy",),
}

_LIBRARY_OF_TYPE: dict = {}  # type -> its library's name, or "" for types that are not foreign arrays


def library(a) -> str:
    """The library of a foreign array ("torch", "jax", "cupy", or the top module), "" otherwise.

    Cached per type: after the first call for a type this is one dict lookup.
    """
    t = type(a)
    lib = _LIBRARY_OF_TYPE.get(t)
    if lib is None:
        if isinstance(a, (np.ndarray, np.generic)) or not (
            hasattr(t, "__array_namespace__") or hasattr(t, "__dlpack__")
        ):
            lib = ""
        elif _compat.is_torch_array(a):
            lib = "torch"
        elif _compat.is_jax_array(a):
            lib = "jax"
        elif _compat.is_cupy_array(a):
            lib = "cupy"
        else:
            lib = t.__module__.split(".")[0]
        _LIBRARY_OF_TYPE[t] = lib
    return lib


_NAMESPACES: dict = {}


def namespace(a):
    """The array-API namespace of `a` (array-api-compat's wrapper for torch, JAX, CuPy, ...),
    cached per type (array_namespace costs tens of microseconds)."""
    t = type(a)
    xp = _NAMESPACES.get(t)
    if xp is None:
        xp = _NAMESPACES[t] = _compat.array_namespace(a)
    return xp


def device_name(a) -> str:
    """Where `a` lives, in words, for messages."""
    try:
        return str(_compat.device(a))
    except Exception:  # noqa: BLE001 - an array that names no device: its DLPack device, if any
        try:
            return f"DLPack device {int(a.__dlpack_device__()[0])}"
        except Exception:  # noqa: BLE001
            return "a device NumPy cannot read"


# (type of the dtype, dtype) -> whether it is a real or complex floating dtype. The type comes
# first: dtypes of different libraries may hash alike, and are not compared with each other.
_FLOATING: dict = {}


def _is_floating(xp, dtype) -> bool:
    key = (type(dtype), dtype)
    floating = _FLOATING.get(key)
    if floating is None:
        floating = _FLOATING[key] = xp.isdtype(dtype, ("real floating", "complex floating"))
    return floating


def promote(xp, arrays: list) -> list:
    """`arrays` (of namespace `xp`) in the dtype `xp` computes them in: ``xp.result_type`` of
    them, made floating with `xp`'s default float where it is integral or bool (as SciPy does).
    Where `xp` refuses to promote a pair across kinds (array_api_strict: float32 with int64), the
    integers count as the default float. Casts happen in `xp`, on the arrays' own device."""
    first = arrays[0].dtype
    for a in arrays[1:]:
        if a.dtype != first:
            break
    else:
        if _is_floating(xp, first):
            return arrays  # the common case: nothing to cast
    try:
        dtype = xp.result_type(*arrays)
    except TypeError:
        dtype = None
    if dtype is None or not _is_floating(xp, dtype):
        default = xp.asarray(1.0).dtype
        dtype = xp.result_type(*(a.dtype if _is_floating(xp, a.dtype) else default for a in arrays))
    return [a if a.dtype == dtype else xp.astype(a, dtype) for a in arrays]


def to_numpy(a, lib: str, name: str, fname: str) -> np.ndarray | None:
    """A NumPy view of a CPU array's memory (a copy only where its library offers no view on the
    CPU: torch's bfloat16 and lazy neg/conj tensors), or None for an array NumPy cannot read on
    the CPU (another device), which the caller computes with its own namespace."""
    if lib == "torch":
        if a.is_cpu:
            try:
                return a.numpy()  # the common case: a plain CPU tensor
            except (RuntimeError, TypeError):
                pass  # requires grad, bfloat16, or a lazy neg/conj bit: handled below
        if a.device.type != "cpu":
            return None
        import torch  # already imported: `a` is a tensor

        if a.requires_grad:
            a = a.detach()
        if a.dtype == torch.bfloat16:
            # NumPy has no bfloat16; ml_dtypes' has the same bits (ml_dtypes comes with JAX).
            try:
                import ml_dtypes
            except ImportError:
                raise TypeError(
                    f"{fname}: {name} is a bfloat16 tensor, which needs the ml_dtypes package to be "
                    "viewed from NumPy (pip install ml_dtypes); normax.torch takes bfloat16 without it"
                ) from None
            return a.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        if a.is_neg() or a.is_conj():  # lazy negation/conjugation bits: NumPy cannot view those
            a = a.resolve_neg().resolve_conj()
        return a.numpy()
    if lib == "jax":
        import jax

        if isinstance(a, jax.core.Tracer):
            raise TypeError(
                f"{fname}: {name} is a traced JAX value (inside jit, grad or vmap), which has no data "
                f"to read; use normax.jax.{fname.rsplit('.', 1)[-1]}, which works under those transformations"
            )
        if {d.platform for d in a.devices()} != {"cpu"}:
            return None
        return np.asarray(a)  # a read-only view of the CPU buffer
    if lib == "cupy":
        return None
    if hasattr(type(a), "__dlpack__"):
        try:
            device_type = int(a.__dlpack_device__()[0])
        except Exception:  # noqa: BLE001 - no usable device information: let from_dlpack decide
            device_type = None
        if device_type not in (None, 1):  # 1 is kDLCPU
            return None
    # A CPU array: __array__ where it has one (cheaper than a DLPack capsule), else DLPack.
    try:
        if hasattr(type(a), "__array__"):
            return np.asarray(a)
        return np.from_dlpack(a)
    except (RuntimeError, BufferError):
        return None  # a device NumPy cannot read (e.g. array_api_strict's Device("device1"))


def _from_numpy(r: np.ndarray, lib: str, xp):
    """`r` as an array of `lib` (sharing its memory where the library allows)."""
    if lib == "torch":
        import torch

        if r.flags.writeable:
            try:
                return torch.from_numpy(r)  # the common case
            except TypeError:
                pass  # bfloat16 (ml_dtypes) or a non-native byte order: handled below
        if r.dtype.kind == "V" and r.dtype.name == "bfloat16":
            return torch.from_numpy(np.array(r).view(np.int16)).view(torch.bfloat16)
        # torch.from_numpy needs a writeable array in native byte order.
        return torch.from_numpy(r.astype(r.dtype.newbyteorder("=")))
    if lib == "jax":
        import jax.numpy as jnp

        # JAX arrays own their (immutable) buffers: one copy. JAX can alias a NumPy buffer only
        # when it is 64-byte aligned, which NumPy's allocator does not promise, and the call that
        # would alias costs more than this copy at 1 MiB.
        return jnp.asarray(r)
    try:
        return xp.from_dlpack(r)
    except Exception:  # noqa: BLE001 - a library without (CPU) DLPack import
        return xp.asarray(r)


def convert_result(value, lib: str, xp, originals: dict):
    """A NumPy-first function's result in `lib`'s arrays: an array that is one of the arguments'
    views (``out=``, in place) is the caller's own array again; tuples are converted item by item
    (a NamedTuple such as ``CrossEntropyStats`` stays one)."""
    if isinstance(value, tuple):
        items = (convert_result(v, lib, xp, originals) for v in value)
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, np.ndarray):
        original = originals.get(id(value))
        if original is not None and original[0] is value:
            return original[1]
        return _from_numpy(value, lib, xp)
    if isinstance(value, np.generic):
        return _from_numpy(np.asarray(value), lib, xp)
    return value
