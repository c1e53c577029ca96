"""Any array in, the same kind out: the array-API layer over the NumPy-first functions.

The public ``normax`` functions are written for NumPy. :func:`array_api` wraps one of them so it
also takes PyTorch CPU tensors, JAX CPU arrays and any other array-API array (as SciPy does):
the arguments become NumPy views of the same memory, the NumPy function runs, and each array
result goes back to the caller's library, again without a copy where the library allows one.

The plain-NumPy call costs one scan of the arguments' types on top of the function itself.
Nothing here imports torch or JAX: a tensor can only arrive once its library is imported, and
the ``array_api_compat`` predicates look in ``sys.modules`` without importing anything.
"""

from __future__ import annotations

import functools
import inspect

import array_api_compat as _compat
import numpy as np

from ._backends import backend, kernel

# Types that are never a foreign array: the common arguments (arrays, numbers, axes, options).
_PLAIN = frozenset({np.ndarray, int, float, bool, str, tuple, list, type(None)})

_GPU_MESSAGE = (
    "{fname}: {name} is a {what} on {device}; normax's GPU backend takes CUDA arrays of torch and "
    "CuPy only, and never copies device data to the host silently: move it to the CPU explicitly "
    "(e.g. tensor.cpu(), jax.device_put(x, jax.devices('cpu')[0]), cupy.asnumpy(x))"
)

_NOTE = """
    Array types: besides NumPy arrays, the array arguments may be PyTorch CPU tensors, JAX CPU
    arrays or any other array-API array (one library per call; NumPy arrays, lists and scalars mix
    with any of them), and array results come back in the same library (0-d arrays for scalar
    results). Inputs are read in place (NumPy views of their memory, never copies); results are
    handed over without a copy too, except to JAX, whose arrays own their buffers. A torch tensor
    that requires grad is read through its detached data, so the result carries no gradient: use
    :mod:`normax.torch` for autograd (and :mod:`normax.jax` under jit, grad and vmap). torch CUDA tensors and CuPy arrays run on their
    GPU with the CUDA kernels, on the caller's current stream, and come back on it (float32,
    float16 and bfloat16; see the README's GPU section); other GPU arrays raise
    NotImplementedError. ``device="wgpu"`` runs NumPy input on the portable wgpu backend.
"""


_LIBRARY_OF_TYPE: dict = {}  # type -> its library's name, or "" for types that are not foreign arrays


def _library(a) -> str:
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


def _to_numpy(a, library: str, name: str, fname: str) -> np.ndarray:
    """A NumPy view of a CPU array's memory (a copy only where its library offers no view)."""
    if library == "torch":
        if a.is_cpu:
            try:
                return a.numpy()  # the common case: a plain CPU tensor
            except (RuntimeError, TypeError):
                pass  # requires grad, bfloat16, or a lazy neg/conj bit: handled below
        if a.device.type != "cpu":
            raise NotImplementedError(
                _GPU_MESSAGE.format(fname=fname, name=name, what="torch tensor", device=a.device)
            )
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
    if library == "jax":
        import jax

        if isinstance(a, jax.core.Tracer):
            raise TypeError(
                f"{fname}: {name} is a traced JAX value (inside jit, grad or vmap), which has no data "
                f"to read; use normax.jax.{fname.rsplit('.', 1)[-1]}, which works under those transformations"
            )
        platforms = {d.platform for d in a.devices()}
        if platforms != {"cpu"}:
            device = ", ".join(sorted(str(d) for d in a.devices()))
            raise NotImplementedError(
                _GPU_MESSAGE.format(fname=fname, name=name, what="JAX array", device=device)
            )
        return np.asarray(a)  # a read-only view of the CPU buffer
    if library == "cupy":
        raise NotImplementedError(
            _GPU_MESSAGE.format(fname=fname, name=name, what="CuPy array", device=f"cuda:{a.device.id}")
        )
    if hasattr(type(a), "__dlpack__"):
        try:
            device_type = int(a.__dlpack_device__()[0])
        except Exception:  # noqa: BLE001 - no usable device information: let from_dlpack decide
            device_type = None
        if device_type not in (None, 1):  # 1 is kDLCPU
            raise NotImplementedError(
                _GPU_MESSAGE.format(
                    fname=fname,
                    name=name,
                    what=f"{type(a).__name__} array",
                    device=f"DLPack device {device_type}",
                )
            )
    # A CPU array: __array__ where it has one (cheaper than a DLPack capsule), else DLPack.
    try:
        if hasattr(type(a), "__array__"):
            return np.asarray(a)
        return np.from_dlpack(a)
    except (RuntimeError, BufferError) as e:
        # A device NumPy cannot read (e.g. array_api_strict's Device("device1")): not ours to
        # copy, as for GPU arrays; the library's own message says why.
        try:
            device = _compat.device(a)
        except Exception:  # noqa: BLE001 - no device to name
            device = "a device NumPy cannot read"
        raise NotImplementedError(
            f"{fname}: {name} (a {type(a).__module__.split('.')[0]} array) is on {device}, which "
            f"normax cannot compute on ({e}); normax runs on the CPU (and CUDA arrays of torch and CuPy) "
            "and never copies device data silently: move it to the CPU device first"
        ) from e


def _from_numpy(r: np.ndarray, library: str, xp):
    """`r` as an array of `library` (sharing its memory where the library allows)."""
    if library == "torch":
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
    if library == "jax":
        import jax.numpy as jnp

        # JAX arrays own their (immutable) buffers: one copy. JAX can alias a NumPy buffer only
        # when it is 64-byte aligned, which NumPy's allocator does not promise, and the call that
        # would alias costs more than this copy at 1 MiB.
        return jnp.asarray(r)
    try:
        return xp.from_dlpack(r)
    except Exception:  # noqa: BLE001 - a library without (CPU) DLPack import
        return xp.asarray(r)


def _refuse_autograd_writes(fname: str, args, kwargs, originals: dict) -> None:
    """Writes torch itself refuses while grad mode is on, as RuntimeErrors with torch's words:
    ``out=`` when any tensor argument requires grad, and ``inplace=True`` over logits that do
    (the write would go behind autograd's back: no version bump, a silently wrong backward)."""
    import torch  # already imported: a tensor is among the arguments

    if not torch.is_grad_enabled():
        return
    tensors = {id(view): a for view, a in originals.values()}
    requires_grad = any(a.requires_grad for a in tensors.values())
    if requires_grad and id(kwargs.get("out")) in tensors:
        raise RuntimeError(
            f"{fname}(): functions with out=... arguments don't support automatic differentiation, "
            "but one of the arguments requires grad."
        )
    if kwargs.get("inplace") is True:
        logits = tensors.get(id(args[0] if args else kwargs.get("logits")))
        if logits is not None and logits.requires_grad:
            raise RuntimeError(
                f"{fname}(): inplace=True would overwrite logits, a tensor that requires grad, "
                "behind autograd's back; use normax.torch.cross_entropy for autograd, or pass "
                "logits.detach() (or call under torch.no_grad())"
            )


def _convert_result(value, library: str, xp, originals: dict):
    if isinstance(value, tuple):
        return tuple(_convert_result(v, library, xp, originals) for v in value)
    if isinstance(value, np.ndarray):
        original = originals.get(id(value))
        if original is not None and original[0] is value:
            return original[1]  # `out=` or an in-place result: the caller's own array
        return _from_numpy(value, library, xp)
    if isinstance(value, np.generic):
        return _from_numpy(np.asarray(value), library, xp)
    return value


_NAMESPACES: dict = {}


def _namespace(a):
    """The array-API namespace of `a`, cached per type (array_namespace costs tens of microseconds)."""
    t = type(a)
    xp = _NAMESPACES.get(t)
    if xp is None:
        xp = _NAMESPACES[t] = _compat.array_namespace(a)
    return xp


def _add_note(doc: str | None) -> str | None:
    """The docstring with the array-types paragraph at the end of its Notes section."""
    if not doc:
        return doc
    examples = "\n    Examples\n    --------"
    cut = doc.find(examples)
    if cut < 0:
        cut = len(doc.rstrip())
    head, tail = doc[:cut], doc[cut:]
    if "\n    Notes\n    -----" not in head:
        head += "\n\n    Notes\n    -----"
    return head.rstrip() + "\n" + _NOTE + tail


_BACKENDS = ("cpu", "wgpu")
_backend = ["cpu"]  # the default for NumPy input: set_backend()


def set_backend(name: str) -> None:
    """Where NumPy (host) arrays are computed by default: "cpu" (the default) or "wgpu".

    "wgpu" runs the functions that have a wgpu kernel (softmax, log_softmax, logsumexp,
    cross_entropy, cross_entropy_with_grad, rms_norm, layer_norm) on the portable GPU backend,
    NumPy in and NumPy out. The other functions, and the options those kernels lack (such as
    ``logsumexp``'s ``b=`` or ``normalizer="stablemax"``), raise NotImplementedError naming the
    function and the option: nothing falls back to the CPU silently. A call's ``device=``
    overrides this (``device="cpu"`` runs that call on the CPU). Other libraries' CPU arrays
    raise TypeError under "wgpu", which takes NumPy arrays only; CUDA arrays (torch CUDA
    tensors, CuPy) always run on their own GPU whatever the backend.
    """
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"name: expected one of {_BACKENDS}, got {name!r}")
    _backend[0] = name


def get_backend() -> str:
    """The default backend for NumPy arrays (see :func:`set_backend`)."""
    return _backend[0]


def _device_of(kwargs: dict) -> str:
    """The `device=` keyword (removed from `kwargs`), or the default backend for None."""
    device = kwargs.pop("device")
    if device is None:
        return _backend[0]
    if not isinstance(device, str) or device not in _BACKENDS:
        raise ValueError(
            f"device: expected None, 'cpu' or 'wgpu', got {device!r} (CUDA arrays run on their own GPU)"
        )
    return device


def array_api(fn):
    """Wraps a NumPy-first function so that it takes and returns any library's CPU arrays.

    It also adds the ``device=`` keyword (None, "cpu" or "wgpu", see :func:`set_backend`) and
    sends CUDA arrays (torch, CuPy) to the CUDA kernels.
    """
    op = fn.__name__
    fname = f"normax.{op}"
    names = tuple(inspect.signature(fn).parameters)

    def on_cuda(args, kwargs) -> bool:
        is_cuda = backend("cuda").is_cuda_array
        return any(is_cuda(a) for a in (*args, *kwargs.values()))

    def dispatch(args, kwargs):
        library = None
        originals = {}  # id(NumPy view) -> (view, the caller's array)
        args = list(args)
        kwargs = dict(kwargs)
        named = [(args, i, names[i] if i < len(names) else "argument") for i in range(len(args))]
        named += [(kwargs, k, k) for k in kwargs]
        for holder, key, name in named:
            a = holder[key]
            lib = "" if type(a) in _PLAIN else _library(a)
            if not lib:
                continue
            if library is None:
                library = lib
            elif lib != library:
                raise TypeError(
                    f"{fname}: {name} is a {lib} array but another argument is a {library} array; "
                    "pass arrays of one library per call"
                )
            view = _to_numpy(a, lib, name, fname)
            originals[id(view)] = (view, a)
            holder[key] = view
        if library == "torch":
            _refuse_autograd_writes(fname, args, kwargs, originals)
        xp = None
        if library not in ("torch", "jax"):
            xp = _namespace(next(iter(originals.values()))[1])
        return _convert_result(fn(*args, **kwargs), library, xp, originals)

    def foreign(args, kwargs, device):
        # CUDA arrays run on their GPU whatever the backend; other foreign arrays on the CPU.
        if on_cuda(args, kwargs):
            return kernel("cuda", op)(*args, **kwargs)
        if device == "wgpu":
            raise TypeError(
                f'{fname}: device="wgpu" takes NumPy arrays (host memory); got another library\'s arrays'
            )
        return dispatch(args, kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # The plain-NumPy call: only a type lookup per argument before the function itself.
        if not kwargs and len(args) == 1 and type(args[0]) is np.ndarray and _backend[0] == "cpu":
            return fn(args[0])
        device = _device_of(kwargs) if "device" in kwargs else _backend[0]
        for a in args:
            if type(a) not in _PLAIN and _library(a):
                return foreign(args, kwargs, device)
        for a in kwargs.values():
            if type(a) not in _PLAIN and _library(a):
                return foreign(args, kwargs, device)
        if device == "wgpu":
            return kernel("wgpu", op)(*args, **kwargs)
        return fn(*args, **kwargs)

    signature = inspect.signature(fn)
    if "device" not in signature.parameters:
        device = inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=None)
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), device])

    wrapper.__doc__ = _add_note(fn.__doc__)
    return wrapper
