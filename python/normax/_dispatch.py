"""Any array in, the same kind out: the array-API layer over the NumPy-first functions.

The public ``normax`` functions are written for NumPy. :func:`array_api` wraps one of them so it
also takes PyTorch tensors, JAX arrays and any other array-API array (as SciPy does), routing
each call by where its arrays live:

- NumPy input runs the function itself (or its wgpu kernel, for ``device="wgpu"``);
- CUDA arrays (torch, CuPy) run the CUDA kernels;
- other libraries' CPU arrays are promoted by their own namespace's rules and viewed from NumPy
  (:mod:`normax._convert`), the function runs, and the results go back to the caller's library;
- arrays NumPy cannot read on the CPU (another device) are computed with their own namespace's
  functions, on their device (:mod:`normax._namespace_ops`), where the op has such a version.

The plain-NumPy call costs one scan of the arguments' types on top of the function itself.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

from . import _namespace_ops
from ._backends import backend, kernel
from ._convert import PLAIN, PROMOTED, convert_result, device_name, library, namespace, promote, to_numpy

_NOTE = """
    Array types: besides NumPy arrays, the array arguments may be PyTorch tensors, JAX arrays or
    any other array-API array (one library per call; NumPy arrays, lists and scalars mix with any
    of them), and array results come back in the same library (0-d arrays for scalar results),
    with the dtype that library's own promotion gives (``xp.result_type``, integers becoming its
    default float: a torch float32 array with int32 weights stays float32, where NumPy's rules
    give float64). CPU inputs are read in place (NumPy views of their memory, never copies);
    results are handed over without a copy too, except to JAX, whose arrays own their buffers. A
    torch tensor that requires grad is read through its detached data, so the result carries no
    gradient: use :mod:`normax.torch` for autograd (and :mod:`normax.jax` under jit, grad and
    vmap). torch CUDA tensors and CuPy arrays run on their GPU with the CUDA kernels, on the
    caller's current stream, and come back on it (float32, float16 and bfloat16; see the README's
    GPU section). Arrays on any other device (array_api_strict's second device, a torch MPS or
    meta tensor) are never copied to the host: every function but power_norm computes them with
    their own library's functions on their device (plain formulas in the arrays' dtype, SciPy's
    max-shifted ones for the softmax family, not normax's kernels; norm statistics in that dtype
    too); power_norm, whose state lives in host buffers, raises NotImplementedError naming the
    function and the device. ``device="wgpu"`` runs NumPy input on the portable wgpu backend.
"""


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


_ABSENT = object()  # a wrapper's first argument, not given


def array_api(fn):
    """Wraps a NumPy-first function so that it takes and returns any library's arrays.

    It also adds the ``device=`` keyword (None, "cpu" or "wgpu", see :func:`set_backend`) and
    sends CUDA arrays (torch, CuPy) to the CUDA kernels.
    """
    op = fn.__name__
    fname = f"normax.{op}"
    signature = inspect.signature(fn)
    names = tuple(signature.parameters)
    promoted = PROMOTED.get(op, ())
    namespace_op = _namespace_ops.OPS.get(op)

    def on_cuda(args, kwargs) -> bool:
        is_cuda = backend("cuda").is_cuda_array
        return any(is_cuda(a) for a in (*args, *kwargs.values()))

    def on_device(a, name, arrays, args, kwargs):
        """The call computed by `a`'s namespace on its device (`name` cannot be read on the CPU)."""
        where = device_name(a)
        for holder, key, other in arrays:
            if device_name(holder[key]) != where:
                raise ValueError(
                    f"{fname}: {name} is on {where} but {other} is on {device_name(holder[key])}; "
                    "normax never copies arrays between devices: pass arrays of one device"
                )
        if namespace_op is None:
            raise NotImplementedError(
                f"{fname}: {name} (a {library(a)} array) is on {where}, which normax "
                f"reads only on the CPU (and CUDA arrays of torch and CuPy), and {fname} has no "
                "version in the array's own namespace (every function but power_norm has one); "
                "it never copies device data silently: move the arrays to the CPU first"
            )
        bound = signature.bind(*args, **kwargs)
        # NumPy-backed namespaces (array_api_strict) would warn where the kernels do not.
        with np.errstate(all="ignore"):
            return namespace_op(namespace(a), *bound.args, **bound.kwargs)

    def dispatch(args, kwargs):
        args, kwargs = list(args), dict(kwargs)
        arrays = []  # (holder, key, name) of each foreign array
        group = []  # the arrays among the `promoted` arguments, or None for NumPy's rules
        lib = None
        for holder, keys in ((args, range(len(args))), (kwargs, tuple(kwargs))):
            for key in keys:
                a = holder[key]
                name = key if holder is kwargs else names[key] if key < len(names) else "argument"
                other = "" if type(a) in PLAIN else library(a)
                if other:
                    if lib is None:
                        lib = other
                    elif other != lib:
                        raise TypeError(
                            f"{fname}: {name} is a {other} array but another argument is a {lib} "
                            "array; pass arrays of one library per call"
                        )
                    arrays.append((holder, key, name))
                    if group is not None and name in promoted:
                        group.append((holder, key, name))
                elif name in promoted and not isinstance(a, (int, float, complex, type(None))):
                    group = None  # a NumPy array or a list takes part (Python numbers stay weak)
        xp = namespace(arrays[0][0][arrays[0][1]])
        if group:
            for (holder, key, _), a in zip(group, promote(xp, [h[k] for h, k, _ in group])):
                holder[key] = a
        views = []
        for holder, key, name in arrays:
            view = to_numpy(holder[key], lib, name, fname)
            if view is None:
                return on_device(holder[key], name, arrays, args, kwargs)
            views.append(view)
        originals = {}  # id(NumPy view) -> (view, the caller's array)
        for (holder, key, _), view in zip(arrays, views):
            originals[id(view)] = (view, holder[key])
            holder[key] = view
        if lib == "torch":
            _refuse_autograd_writes(fname, args, kwargs, originals)
        return convert_result(fn(*args, **kwargs), lib, xp, originals)

    def foreign(args, kwargs, device):
        # CUDA arrays run on their GPU whatever the backend; other foreign arrays where they are.
        if on_cuda(args, kwargs):
            return kernel("cuda", op)(*args, **kwargs)
        if device == "wgpu":
            raise TypeError(
                f'{fname}: device="wgpu" takes NumPy arrays (host memory); got another library\'s arrays'
            )
        return dispatch(args, kwargs)

    def general(args, kwargs):
        device = _device_of(kwargs) if "device" in kwargs else _backend[0]
        for a in args:
            if type(a) not in PLAIN and library(a):
                return foreign(args, kwargs, device)
        for a in kwargs.values():
            if type(a) not in PLAIN and library(a):
                return foreign(args, kwargs, device)
        if device == "wgpu":
            return kernel("wgpu", op)(*args, **kwargs)
        return fn(*args, **kwargs)

    # The plain-NumPy call: only a type lookup per argument before the function itself. `out`
    # is a parameter of the wrapper itself, so that a call with an `out=` array takes the very
    # path of the call without it (and saves the allocation).
    # The first argument is positional-only here (whatever its name in `fn`) so that the common
    # call builds no tuple; a call without it, or with it by keyword, goes the general way.
    if "out" in names:

        @functools.wraps(fn)
        def wrapper(first=_ABSENT, /, *args, out=None, **kwargs):
            plain = not args and not kwargs and type(first) is np.ndarray and _backend[0] == "cpu"
            if plain and (out is None or type(out) is np.ndarray):
                return fn(first, out=out)
            if out is not None:
                kwargs["out"] = out
            return general(args if first is _ABSENT else (first, *args), kwargs)

    else:

        @functools.wraps(fn)
        def wrapper(first=_ABSENT, /, *args, **kwargs):
            if not args and not kwargs and type(first) is np.ndarray and _backend[0] == "cpu":
                return fn(first)
            return general(args if first is _ABSENT else (first, *args), kwargs)

    if "device" not in signature.parameters:
        device = inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=None)
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), device])

    wrapper.__doc__ = _add_note(fn.__doc__)
    return wrapper
