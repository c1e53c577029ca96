"""The CUDA path of the public functions: torch CUDA tensors and CuPy arrays in, the same out.

The arrays are read and written where they are, through DLPack capsules (no host round trip);
the kernels run on the caller's current stream (``torch.cuda.current_stream()``,
``cupy.cuda.get_current_stream()``), so they are ordered with the caller's own work and nothing
here synchronizes, except that class indices are checked before a cross-entropy (one device-to-
host read of a flag, as the CPU path raises IndexError for a bad index; the ``normax.torch`` ops
assert on the device instead, as torch's own kernels do, and so does anything under CUDA-graph
capture).

Differences from the CPU functions, stated once:

- float32, float16 and bfloat16 only (float32 arithmetic inside); float64 and integer arrays
  raise TypeError rather than silently losing precision.
- Saved statistics (``return_stats=True``) are float32; ``dweight``/``dbias`` are summed in
  float32 and returned in `x`'s dtype.
- Not on the GPU: ``logsumexp``'s ``b=``/``return_sign=``; those raise NotImplementedError.
- PowerNorm keeps its state (float64 NumPy buffers) on the host: a training call reads C
  per-channel sums back from the device, a host synchronization (see the PowerNorm section).
- The linear cross-entropy holds whole rows of logits (the vocabulary is never split), so a
  ``chunk_size`` below V still holds one row.
- Results are the caller's library arrays; a reduced loss is a 0-d array (as torch returns).

The kernels are compiled by NVRTC for the device at first use (about a second per op family),
then cached for the process. NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (installed with
PyTorch) or a CUDA toolkit on the library path.
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import sys

import numpy as np

from . import _core
from ._arrays import normalize_axes
from ._cross_entropy import _chunk_size, _class_axis, _index_error, _number, _options
from ._norms import _eps, _norm_axes

_DL_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_DTYPES = ("float32", "float16", "bfloat16")


def is_cuda_array(a) -> bool:
    """Whether `a` is an array on a CUDA device (torch, CuPy, or anything exporting DLPack there)."""
    t = type(a)
    if t.__module__.startswith("torch"):
        return getattr(a, "is_cuda", False) is True  # cheaper than torch's __dlpack_device__
    device = getattr(t, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        return int(a.__dlpack_device__()[0]) in _DL_CUDA
    except Exception:  # noqa: BLE001 - no usable device information: not ours to handle
        return False


def available() -> bool:
    """Whether this build has the CUDA backend and a CUDA driver can be loaded."""
    return hasattr(_core, "cuda_softmax") and _driver_error() is None


def _driver_error() -> str | None:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return None
        except OSError:
            continue
    return "the CUDA driver library (libcuda.so.1) was not found: this machine has no NVIDIA driver"


_NVRTC_LOADED = False


def load_nvrtc() -> str | None:
    """Loads NVRTC from the nvidia-cuda-nvrtc wheel if one is installed; returns its path.

    The Rust side finds libnvrtc by its soname; a library already loaded by this process is
    found that way, so loading the wheel's copy here makes it the one used. Where the CUDA
    runtime of the caller's framework is known, the NVRTC of the same major version comes first
    (its cubins load on the driver that framework runs on).
    """
    global _NVRTC_LOADED
    paths = []
    for base in sys.path:
        for pattern in ("nvidia/cu*/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            paths += [p for p in glob.glob(os.path.join(base, pattern)) if "builtins" not in p]
    if not paths:
        return None

    def major(path):
        suffix = path.rsplit(".so.", 1)[-1].split(".")[0]
        return int(suffix) if suffix.isdigit() else 0

    wanted = _framework_cuda_major()
    paths.sort(key=lambda p: (major(p) == wanted, major(p)), reverse=True)
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            _NVRTC_LOADED = True
            return path
        except OSError:
            continue
    return None


def _framework_cuda_major() -> int | None:
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        return int(torch.version.cuda.split(".")[0])
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            return cupy.cuda.runtime.runtimeGetVersion() // 1000
        except Exception:  # noqa: BLE001 - no runtime: no preference
            return None
    return None


def compile_check(arch: str) -> list[tuple[str, int]]:
    """Compiles every CUDA kernel module for `arch` (e.g. "sm_90") with NVRTC; no GPU needed.

    Returns (module, cubin size in bytes) pairs; a kernel that does not compile raises
    RuntimeError with NVRTC's log.
    """
    _require_build()
    if not _NVRTC_LOADED:
        load_nvrtc()
    return _core.cuda_compile_all(arch)


def _require_build() -> None:
    if not hasattr(_core, "cuda_softmax"):
        raise RuntimeError(
            "normax was built without the CUDA backend (Cargo feature 'cuda'); reinstall a wheel "
            "built with it to use CUDA arrays"
        )


# ---------------------------------------------------------------------------------------------
# The caller's library: torch or CuPy


class _Lib:
    """What the CUDA path needs from the caller's array library (torch or CuPy)."""

    def __init__(self, a, fname: str):
        mod = type(a).__module__.split(".")[0]
        if mod not in ("torch", "cupy"):
            raise NotImplementedError(
                f"{fname}: CUDA arrays of {mod} are not supported; pass a torch CUDA tensor or a "
                "CuPy array (e.g. via torch.from_dlpack)"
            )
        self.name = mod
        self.fname = fname
        self.mod = sys.modules[mod]
        self.device = a.device
        self.index = self._index_of(a)
        if mod == "torch":
            self._to_dlpack = self.mod.utils.dlpack.to_dlpack
        self.stream = self.current_stream()

    def current_stream(self) -> int:
        """The caller's current stream on this device, as a raw CUstream handle."""
        if self.name == "torch":
            raw = getattr(self.mod._C, "_cuda_getCurrentRawStream", None)  # what compiled code uses
            return int(raw(self.index) if raw else self.mod.cuda.current_stream(self.device).cuda_stream)
        with self.device:
            return int(self.mod.cuda.get_current_stream().ptr)

    # -- arrays

    def dtype_name(self, a) -> str:
        return self.dtype_name_of(a.dtype)

    def check_dtype(self, a, name: str) -> None:
        if self.dtype_name(a) not in _DTYPES:
            raise TypeError(
                f"{self.fname}: {name} has dtype {self.dtype_name(a)}; the CUDA kernels take float32, "
                "float16 and bfloat16 (cast first, e.g. x.float())"
            )

    def on_device(self, a, name: str):
        """`a` as an array of this library on this device (NumPy arrays and scalars are copied over)."""
        if type(a).__module__.split(".")[0] == self.name:
            if not is_cuda_array(a):
                raise ValueError(f"{self.fname}: {name} is not on the GPU while the other arrays are")
            if self._index_of(a) != self.index:
                raise ValueError(f"{self.fname}: {name} is on another GPU than the other arrays")
            return a.detach() if self.name == "torch" else a
        if self.name == "torch":
            return self.mod.as_tensor(np.asarray(a), device=self.device)
        with self.device:
            return self.mod.asarray(np.asarray(a))

    def _index_of(self, a) -> int:
        return a.get_device() if self.name == "torch" else a.device.id

    def contiguous(self, a):
        return a.contiguous() if self.name == "torch" else self.mod.ascontiguousarray(a)

    def empty(self, shape, dtype):
        if self.name == "torch":
            return self.mod.empty(tuple(shape), dtype=dtype, device=self.device)
        with self.device:
            return self.mod.empty(tuple(shape), dtype=dtype)

    def float32(self):
        return self.mod.float32

    def astype(self, a, dtype):
        if a.dtype == dtype:  # the common case; torch's .to() costs microseconds even then
            return a
        return a.to(dtype) if self.name == "torch" else a.astype(dtype, copy=False)

    def permute(self, a, perm):
        return a.permute(*perm) if self.name == "torch" else a.transpose(perm)

    def int64(self, a):
        return self.astype(a, self.mod.int64)

    def scalar(self, value: float, dtype):
        """A 1-element device array holding `value`, filled on the device (a host-to-device copy
        of a Python number would synchronize, and is illegal during graph capture)."""
        if self.name == "torch":
            return self.mod.full((1,), value, dtype=dtype, device=self.device)
        with self.device:
            return self.mod.full((1,), value, dtype=dtype)

    def capturing(self) -> bool:
        """Whether the current stream is capturing a CUDA graph."""
        if self.name == "torch":
            return bool(self.mod.cuda.is_current_stream_capturing())
        with self.device:
            return bool(self.mod.cuda.get_current_stream().is_capturing())

    def capsule(self, a):
        # The kernels run on the caller's current stream, the one its own work is ordered on, so
        # the capsule needs no stream synchronization: torch's to_dlpack skips it (and costs a
        # tenth of __dlpack__'s Python-level checks); CuPy is asked for that stream (a no-op).
        # DLPack spells the legacy default stream 1, never 0.
        if self.name == "torch":
            return self._to_dlpack(a)
        return a.__dlpack__(stream=self.stream or 1)

    def same_memory(self, a, b) -> bool:
        if self.name == "torch":
            return a.data_ptr() == b.data_ptr()
        return a.data.ptr == b.data.ptr

    def dtype_name_of(self, dtype) -> str:
        return str(dtype).rsplit(".", 1)[-1]

    def is_contiguous(self, a) -> bool:
        return a.is_contiguous() if self.name == "torch" else a.flags.c_contiguous


def _lib_of(args, fname):
    for a in args:
        if is_cuda_array(a):
            return _Lib(a, fname)
    raise AssertionError("no CUDA array among the arguments")  # the dispatcher checked


def _run(lib: _Lib, kernel, *args):
    """Calls a `_core.cuda_*` kernel with capsules for every array argument."""
    _require_build()
    if not _NVRTC_LOADED:
        load_nvrtc()
    caps = [
        lib.capsule(a) if a is not None and not isinstance(a, (int, float, str, bool)) else a for a in args
    ]
    kernel(*caps, lib.index, lib.stream)


# ---------------------------------------------------------------------------------------------
# Rows: the reduced axes last, contiguous, as a (rows, cols) matrix


class _Rows:
    """`x` with `axes` moved last and made contiguous: `rows` x `cols` for the kernels.

    Results are allocated in `shape` (the moved order) and `back` returns them in the caller's
    order: the identity in the common case (axes already last), so no reshape is paid there.
    """

    def __init__(self, lib: _Lib, x, axes: tuple[int, ...]):
        nd = x.ndim
        self.perm = [i for i in range(nd) if i not in axes] + list(axes)
        self.moved = self.perm != list(range(nd))
        self.work = lib.contiguous(lib.permute(x, self.perm) if self.moved else x)
        self.shape = tuple(self.work.shape)
        self.cols = math.prod(self.shape[nd - len(axes) :])
        self.rows = math.prod(self.shape[: nd - len(axes)])
        self.lib = lib

    def empty(self, dtype):
        return self.lib.empty(self.shape, dtype)

    def back(self, r):
        if not self.moved:
            return r
        inverse = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inverse[p] = i
        return self.lib.permute(r, inverse)


def _input(lib: _Lib, x, name: str):
    x = lib.on_device(x, name)
    lib.check_dtype(x, name)
    return x


def _output(lib: _Lib, rows: _Rows, shape: tuple, dtype, out):
    """Where a kernel writes: the caller's `out` itself when it has the rows' layout, else new.

    `out` is checked here (the result's `shape` and `dtype`), before any kernel runs.
    """
    if out is not None:
        o = lib.on_device(out, "out")
        if tuple(o.shape) != tuple(shape) or lib.dtype_name(o) != lib.dtype_name_of(dtype):
            raise ValueError(
                f"{lib.fname}: out must have shape {tuple(shape)} and dtype {lib.dtype_name_of(dtype)}, "
                f"got {tuple(o.shape)} and {lib.dtype_name(o)}"
            )
        if not rows.moved and lib.is_contiguous(o):
            return o
    return rows.empty(dtype)


def _finish(lib: _Lib, result, out):
    """`result`, or the caller's `out` holding it (`out` was checked by _output)."""
    if out is None:
        return result
    o = lib.on_device(out, "out")
    if not lib.same_memory(o, result):
        o[...] = result
    return out


# ---------------------------------------------------------------------------------------------
# softmax family


def _softmax_like(x, axis, out, log: bool, fname: str):
    lib = _lib_of((x, out), fname)
    x = _input(lib, x, "x")
    axes = normalize_axes(axis, x.ndim)
    rows = _Rows(lib, x, axes)
    y = _output(lib, rows, x.shape, x.dtype, out)
    _run(lib, _core.cuda_softmax, rows.work, y, rows.rows, rows.cols, log)
    return _finish(lib, rows.back(y), out)


def softmax(x, axis=-1, *, out=None):
    return _softmax_like(x, axis, out, False, "normax.softmax")


def log_softmax(x, axis=-1, *, out=None):
    return _softmax_like(x, axis, out, True, "normax.log_softmax")


def logsumexp(x, axis=-1, *, b=None, keepdims=False, return_sign=False):
    fname = "normax.logsumexp"
    if b is not None or return_sign:
        raise NotImplementedError(
            f"{fname}: b= and return_sign= are not supported on CUDA arrays; move the data to the CPU"
        )
    lib = _lib_of((x,), fname)
    x = _input(lib, x, "x")
    axes = normalize_axes(axis, x.ndim)
    rows = _Rows(lib, x, axes)
    if keepdims:
        kept = [1 if i in axes else x.shape[i] for i in range(x.ndim)]
    else:
        kept = [x.shape[i] for i in range(x.ndim) if i not in axes]
    r = lib.empty(kept, x.dtype)  # its elements are the rows, in order, whatever the kept shape
    if rows.cols == 0:
        r[...] = -math.inf  # the log of an empty sum, as NumPy's and SciPy's
    else:
        _run(lib, _core.cuda_logsumexp, rows.work, r, rows.rows, rows.cols)
    return r


def _backward(y, dy, axis, log: bool, fname: str):
    lib = _lib_of((y, dy), fname)
    y = _input(lib, y, "y")
    dy = _input(lib, dy, "dy")
    if tuple(y.shape) != tuple(dy.shape):
        raise ValueError(f"{fname}: dy has shape {tuple(dy.shape)}, y has {tuple(y.shape)}")
    dy = lib.astype(dy, y.dtype)
    axes = normalize_axes(axis, y.ndim)
    ry, rdy = _Rows(lib, y, axes), _Rows(lib, dy, axes)
    dx = ry.empty(y.dtype)
    _run(lib, _core.cuda_softmax_backward, ry.work, rdy.work, dx, ry.rows, ry.cols, log)
    return ry.back(dx)


def softmax_backward(y, dy, axis=-1):
    return _backward(y, dy, axis, False, "normax.softmax_backward")


def log_softmax_backward(y, dy, axis=-1):
    return _backward(y, dy, axis, True, "normax.log_softmax_backward")


# ---------------------------------------------------------------------------------------------
# cross-entropy


def _cross_entropy(
    fname, logits, target, axis, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
    with_grad, grad_output=1.0, inplace=False, sync_check=True,
):  # fmt: skip
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    ignore_index, reduction, label_smoothing, z_loss, softcap = opts
    lib = _lib_of((logits, target, weight, grad_output), fname)
    x = _input(lib, logits, "logits")
    if x.ndim == 0:
        raise ValueError(f"{fname}: logits needs at least one dimension (the class axis)")
    ax = _class_axis(axis, x.ndim)
    classes = x.shape[ax]
    if classes == 0:
        raise ValueError(f"logits: the class axis {ax} is empty")
    row_shape = tuple(x.shape[:ax]) + tuple(x.shape[ax + 1 :])
    rows = _Rows(lib, x, (ax,))
    t = lib.on_device(target, "target")
    tname = lib.dtype_name(t)
    soft = tname.startswith(("float", "bfloat"))
    if soft:
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(
                f"target: class probabilities must have the logits' shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        tk = _Rows(lib, lib.astype(t, x.dtype), (ax,)).work
    else:
        if tname == "bool" or not tname.startswith(("int", "uint")):
            raise TypeError(f"target: expected integer class indices or float probabilities, got {tname}")
        if tuple(t.shape) != row_shape:
            raise ValueError(
                f"target: class indices have shape {tuple(t.shape)}; expected {row_shape} "
                f"(the logits' shape {tuple(x.shape)} without the class axis {ax})"
            )
        tk = lib.contiguous(lib.int64(t))  # row order = the logits rows' order
        _check_classes(lib, tk, classes, ignore_index, row_shape, sync_check)
    f32 = lib.float32()
    w = None
    if weight is not None:
        w = lib.on_device(weight, "weight")
        if tuple(w.shape) != (classes,):
            raise ValueError(f"weight: expected shape ({classes},), one per class; got {tuple(w.shape)}")
        w = lib.contiguous(lib.astype(w, f32))
    loss_rows = lib.empty((rows.rows,), f32)

    # The mean's denominator: the summed weight of the rows kept (hard targets), else the row count.
    denom = None
    if reduction == "mean":
        if soft:
            denom = float(rows.rows)
        else:
            kept = tk != ignore_index
            safe = tk * kept  # ignored rows read class 0, then count 0
            # counted in int64: a float32 sum of flags is exact only up to 2^24 rows
            denom = (w[safe] * kept).sum() if w is not None else lib.astype(kept.sum(), f32)

    grad = scale = None
    stride = 0
    if with_grad:
        # In place: straight into the logits when they already are the kernel's rows.
        direct = inplace and not rows.moved and lib.same_memory(rows.work, x)
        grad = rows.work if direct else rows.empty(x.dtype)
        scale, stride = _grad_scale(lib, grad_output, reduction, denom, row_shape, rows.rows)
    _run(
        lib, _core.cuda_cross_entropy, rows.work, tk, w, loss_rows, grad, scale, stride,
        rows.rows, classes, ignore_index, label_smoothing, z_loss,
        0.0 if softcap is None else softcap,
    )  # fmt: skip

    loss = _reduce(lib, loss_rows.reshape(row_shape), reduction, denom, x.dtype)
    if not with_grad:
        return loss
    g = rows.back(grad)
    if inplace:
        if not direct:
            x[...] = g  # `x` is the caller's memory (a detached alias for torch)
        return loss, logits
    return loss, g


def _reduce(lib: _Lib, loss_rows, reduction: str, denom, dtype):
    """The per-row float32 losses reduced ('mean' divides by `denom`), in `dtype`."""
    if reduction == "none":
        return lib.astype(loss_rows, dtype)
    total = loss_rows.sum()
    return lib.astype(total if reduction == "sum" else total / denom, dtype)


def _check_classes(lib, tk, classes, ignore_index, row_shape, sync: bool):
    """IndexError naming the first bad class index: one device-to-host read of a flag.

    With ``sync=False`` (the torch ops, whose callers expect torch's behaviour) and while a CUDA
    graph is being captured (where reading back is illegal), a device-side assertion instead, as
    torch's own cross-entropy does: no synchronization, and a bad index fails the stream.
    """
    bad = (tk != ignore_index) & ((tk < 0) | (tk >= classes))
    if not sync or lib.capturing():
        if lib.name == "torch":
            message = f"target: a class index is out of range [0, {classes}) and is not ignore_index"
            lib.mod._assert_async(~bad.any(), message)
        return  # CuPy: the kernels treat such rows as ignored; nothing can be read back here
    if bool(bad.any()):  # the details (the CPU path's message) only on the error path
        raise _index_error(_host(lib, tk).reshape(row_shape), classes, ignore_index)


def _grad_scale(lib, grad_output, reduction, denom, row_shape, rows):
    """(float32 device array of scales, stride): one scale, or one per row (reduction='none')."""
    f32 = lib.float32()
    if np.ndim(grad_output) != 0:
        if reduction != "none":
            raise ValueError(
                f"grad_output: must be a number for reduction={reduction!r}, got shape {np.shape(grad_output)}"
            )
        g = lib.on_device(grad_output, "grad_output")
        try:
            g = lib.mod.broadcast_to(g, row_shape)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"grad_output: shape {tuple(g.shape)} does not broadcast to the per-row loss shape {row_shape}"
            ) from None
        return lib.contiguous(lib.astype(g, f32)).reshape(rows), 1
    if is_cuda_array(grad_output):
        g = lib.astype(lib.on_device(grad_output, "grad_output"), f32)
    else:
        g = _number(grad_output, "grad_output")
    if reduction == "mean":
        g = g / denom if not (isinstance(denom, float) and denom == 0.0) else math.nan
    if isinstance(g, float):
        return lib.scalar(g, f32), 0
    return lib.contiguous(lib.astype(g, f32).reshape(1)), 0


def cross_entropy(
    logits, target, *, axis=-1, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, z_loss=0.0, softcap=None,
):  # fmt: skip
    return _cross_entropy(
        "normax.cross_entropy", logits, target, axis, weight, ignore_index, reduction,
        label_smoothing, z_loss, softcap, False,
    )  # fmt: skip


def cross_entropy_with_grad(
    logits, target, *, axis=-1, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=1.0, inplace=False,
):  # fmt: skip
    return _cross_entropy(
        "normax.cross_entropy_with_grad", logits, target, axis, weight, ignore_index, reduction,
        label_smoothing, z_loss, softcap, True, grad_output, inplace,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# norms


def _dtype_eps(lib, x) -> float:
    return {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[lib.dtype_name(x)]


def _norm_forward(kind, fname, x, weight, bias, eps, axis, out, return_stats):
    lib = _lib_of((x, weight, bias, out), fname)
    x = _input(lib, x, "x")
    axes = _norm_axes(axis, x.ndim)
    shape = tuple(x.shape[axes[0] :])
    e = _eps(_dtype_eps(lib, x) if eps is None else eps)
    rows = _Rows(lib, x, axes)
    f32 = lib.float32()
    params = []
    for p, name in ((weight, "weight"), (bias, "bias")):
        if p is not None:
            p = lib.on_device(p, name)
            if tuple(p.shape) != shape:
                raise ValueError(
                    f"{name}: shape {tuple(p.shape)} does not match the normalized shape {shape} (x.shape[axis:])"
                )
            p = lib.contiguous(lib.astype(p, f32))
        params.append(p)
    y = _output(lib, rows, x.shape, x.dtype, out)
    lead = tuple(x.shape[: axes[0]])
    mean = lib.empty(lead, f32) if return_stats and kind == "layer" else None
    rstd = lib.empty(lead, f32) if return_stats else None
    if rows.cols == 0:  # statistics of empty rows: NaN, as NumPy's mean of nothing (and the CPU)
        for stat in (mean, rstd):
            if stat is not None:
                stat[...] = math.nan
    _run(
        lib,
        _core.cuda_norm_forward,
        kind,
        rows.work,
        params[0],
        params[1],
        y,
        mean,
        rstd,
        rows.rows,
        rows.cols,
        e,
    )
    y = _finish(lib, rows.back(y), out)
    if not return_stats:
        return y
    return (y, mean, rstd) if kind == "layer" else (y, rstd)


def _norm_backward(kind, fname, dy, x, weight, bias, eps, axis, mean, rstd, params_dtype="x"):
    """dx and the parameter gradients, those in `x`'s dtype, or float32 for params_dtype=None."""
    lib = _lib_of((dy, x, weight, bias, mean, rstd), fname)
    x = _input(lib, x, "x")
    dy = _input(lib, dy, "dy")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: shape {tuple(dy.shape)} does not match x shape {tuple(x.shape)}")
    dy = lib.astype(dy, x.dtype)
    axes = _norm_axes(axis, x.ndim)
    shape = tuple(x.shape[axes[0] :])
    lead = tuple(x.shape[: axes[0]])
    rx, rdy = _Rows(lib, x, axes), _Rows(lib, dy, axes)
    f32 = lib.float32()
    w = None
    if weight is not None:
        w = lib.on_device(weight, "weight")
        if tuple(w.shape) != shape:
            raise ValueError(f"weight: shape {tuple(w.shape)} does not match the normalized shape {shape}")
        w = lib.contiguous(lib.astype(w, f32))
    if bias is not None and tuple(bias.shape) != shape:
        raise ValueError(f"bias: shape {tuple(bias.shape)} does not match the normalized shape {shape}")
    if kind == "layer" and (mean is None) != (rstd is None):
        missing = "mean" if mean is None else "rstd"
        raise ValueError(f"{missing}: give both saved statistics (mean and rstd) or neither")
    if rstd is None:
        e = _eps(_dtype_eps(lib, x) if eps is None else eps)
        mean = lib.empty((rx.rows,), f32) if kind == "layer" else None
        rstd = lib.empty((rx.rows,), f32)
        _run(lib, _core.cuda_norm_forward, kind, rx.work, None, None, None, mean, rstd, rx.rows, rx.cols, e)
    else:
        stats = []
        for s, name in ((mean, "mean"), (rstd, "rstd")):
            if s is None:
                stats.append(None)
                continue
            s = lib.on_device(s, name)
            if tuple(s.shape) != lead:
                raise ValueError(f"{name}: expected shape {lead} (one per row), got {tuple(s.shape)}")
            stats.append(lib.contiguous(lib.astype(s, f32)))
        mean, rstd = stats
    dx = rx.empty(x.dtype)
    dw = lib.empty(shape, f32) if weight is not None else None
    db = lib.empty(shape, f32) if bias is not None else None
    _run(lib, _core.cuda_norm_backward, kind, rdy.work, rx.work, w, mean, rstd, dx, dw, db, rx.rows, rx.cols)
    dx = rx.back(dx)
    if params_dtype is not None:
        dw = None if dw is None else lib.astype(dw, x.dtype)
        db = None if db is None else lib.astype(db, x.dtype)
    if kind == "layer":
        return dx, dw, db
    return dx, dw


def rms_norm(x, weight=None, *, eps=None, axis=-1, out=None, return_stats=False):
    return _norm_forward("rms", "normax.rms_norm", x, weight, None, eps, axis, out, return_stats)


def rms_norm_backward(dy, x, weight=None, *, eps=None, axis=-1, rstd=None):
    return _norm_backward("rms", "normax.rms_norm_backward", dy, x, weight, None, eps, axis, None, rstd)


def layer_norm(x, weight=None, bias=None, *, eps=1e-5, axis=-1, out=None, return_stats=False):
    return _norm_forward("layer", "normax.layer_norm", x, weight, bias, eps, axis, out, return_stats)


def layer_norm_backward(dy, x, weight=None, bias=None, *, eps=1e-5, axis=-1, mean=None, rstd=None):
    return _norm_backward("layer", "normax.layer_norm_backward", dy, x, weight, bias, eps, axis, mean, rstd)


def crms_norm(x, weight=None, *, eps=1e-6, axis=-1, out=None, return_stats=False):
    return _norm_forward("crms", "normax.crms_norm", x, weight, None, eps, axis, out, return_stats)


def crms_norm_backward(dy, x, weight=None, *, eps=1e-6, axis=-1, rstd=None):
    return _norm_backward("crms", "normax.crms_norm_backward", dy, x, weight, None, eps, axis, None, rstd)


# ---------------------------------------------------------------------------------------------
# PowerNorm
#
# The passes over the tokens run on the device (kernels/power_norm.cu); the O(C) bookkeeping of
# the state (batch variance, running_phi, warmup, ema_gz) is the CPU path's float64 NumPy code on
# the host buffers of PowerNormState. So a training forward reads the C channel sums of u^2 back
# (a host synchronization), and so does a training backward (for ema_gz); evaluation only copies
# C factors to the device.

from ._norms import PowerNormSaved, PowerNormState


class _CudaPowerNormSaved(PowerNormSaved):
    """A PowerNormSaved whose ``x`` ((tokens, C), the forward's dtype) and ``weight`` (float32 or
    None) are arrays on the forward's GPU."""

    __slots__ = ()


def _current(lib: _Lib):
    """The array's device as the current one (CuPy allocates and runs on the current device)."""
    return lib.mod.cuda.device(lib.index) if lib.name == "torch" else lib.device


def _host(lib: _Lib, a) -> np.ndarray:
    """A NumPy copy of a device array (waits for the work queued before it)."""
    if lib.name == "torch":
        return a.detach().to("cpu").numpy()
    return lib.mod.asnumpy(a)


def _host64(lib: _Lib, a) -> np.ndarray:
    return _host(lib, a).astype(np.float64)


def _dev32(lib: _Lib, a: np.ndarray, name: str):
    """Host float64 values as a float32 device array, rounded on the host as the CPU path's astype."""
    return lib.on_device(np.ascontiguousarray(a, dtype=np.float32), name)


def _promote(lib: _Lib, a, b):
    return lib.mod.promote_types(a, b) if lib.name == "torch" else np.result_type(a, b)


def _copy(lib: _Lib, a):
    return a.clone() if lib.name == "torch" else a.copy()


def _power_param(lib: _Lib, p, name: str, c: int):
    """weight/bias as a float32 (C,) device array, or None."""
    if p is None:
        return None
    p = lib.on_device(p, name)
    if not lib.dtype_name(p).startswith(("float", "bfloat")):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {lib.dtype_name(p)}")
    if tuple(p.shape) != (c,):
        raise ValueError(f"{name}: shape {tuple(p.shape)} does not match the normalized shape ({c},)")
    return lib.contiguous(lib.astype(p, lib.float32()))


def _pad_flags(lib: _Lib, pad_mask, shape):
    """pad_mask as float32 per token in the kernels' token order (t * B + b), 1 = padding; or None."""
    if pad_mask is None:
        return None
    m = lib.on_device(pad_mask, "pad_mask")
    if lib.dtype_name(m) != "bool":
        raise TypeError(f"pad_mask: expected a boolean array (True = padding), got dtype {lib.dtype_name(m)}")
    if len(shape) == 3:
        t, b = shape[0], shape[1]
        if tuple(m.shape) != (b, t):
            raise ValueError(
                f"pad_mask: shape {tuple(m.shape)} is not (B, T) = {(b, t)} for x of shape {shape}"
            )
        m = lib.permute(m, (1, 0))
    else:
        n = shape[0]
        if tuple(m.shape) not in ((n, 1), (n,)):
            raise ValueError(
                f"pad_mask: shape {tuple(m.shape)} is not (N, 1) = {(n, 1)} for x of shape {shape}"
            )
    return lib.contiguous(lib.astype(m, lib.float32())).reshape(-1)


def power_norm(x, weight, bias, state, *, training=True, pad_mask=None, return_saved=False):
    fname = "normax.power_norm"
    if not isinstance(state, PowerNormState):
        raise TypeError(f"state: expected a normax.PowerNormState, got {type(state).__name__}")
    lib = _lib_of((x, weight, bias, pad_mask), fname)
    with _current(lib):
        return _power_norm(lib, x, weight, bias, state, training, pad_mask, return_saved)


def _power_norm(lib, x, weight, bias, state, training, pad_mask, return_saved):
    x = _input(lib, x, "x")
    c = state.num_features
    shape = tuple(x.shape)
    if x.ndim not in (2, 3) or shape[-1] != c:
        raise ValueError(f"x: shape {shape} is not (T, B, C) or (N, C) with C = num_features = {c}")
    w = _power_param(lib, weight, "weight", c)
    b = _power_param(lib, bias, "bias", c)
    pad = _pad_flags(lib, pad_mask, shape)
    work = lib.contiguous(x).reshape(-1, c)
    tokens = work.shape[0]
    f32, f64 = lib.float32(), lib.mod.float64
    shift = b if b is not None else _dev32(lib, np.zeros(c), "bias")
    y = lib.empty((tokens, c), x.dtype)
    eps, groups = state.eps, state.group_num

    def run(pad, sumsq, zscale, y):
        scale = None
        if zscale is not None:
            # weight * zscale in float64, rounded once to float32: the CPU path's (w64 * zscale).astype
            z = lib.on_device(np.asarray(zscale, np.float64), "zscale")
            scale = lib.astype(z if w is None else lib.astype(w, f64) * z, f32)
        _run(
            lib, _core.cuda_power_norm_forward, work, tokens, c, groups, eps, pad, sumsq, scale,
            None if y is None else shift, y,
        )  # fmt: skip

    # As _norms.power_norm, with the state changed only once the kernels have run.
    phi = state.running_phi.copy()
    it = state.iters
    if training:
        it += 1
        sumsq_d = lib.empty((c,), f32)
        count = tokens - (int((pad != 0).sum()) if pad is not None else 0)
        if it <= state.warmup_iters:
            run(pad, sumsq_d, None, None)
            with np.errstate(invalid="ignore", divide="ignore"):
                var = _host64(lib, sumsq_d) / count
            zscale = 1.0 / np.sqrt(var + eps)
            run(None, None, zscale, y)
        else:
            zscale = 1.0 / np.sqrt(phi + eps)
            run(pad, sumsq_d, zscale, y)
            with np.errstate(invalid="ignore", divide="ignore"):
                var = _host64(lib, sumsq_d) / count
        if it < state.warmup_iters:
            phi = phi * (it - 1) / it + var / it
        phi = state.alpha_fwd * phi + (1.0 - state.alpha_fwd) * var
        dscale = 1.0 / np.sqrt(var + eps)
        state.running_phi[...] = phi
        state.iters = it
    else:
        zscale = 1.0 / np.sqrt(phi + eps)
        run(None, None, zscale, y)
        dscale = zscale
    y = y.reshape(shape)
    if not return_saved:
        return y
    saved = _CudaPowerNormSaved(
        x=work,
        shape=shape,
        dtype=x.dtype,
        weight=w,
        has_bias=b is not None,
        zscale=zscale,
        dscale=dscale,
        training=bool(training),
        eps=eps,
        group_num=groups,
    )
    return y, saved


def power_norm_saved(x, weight, has_bias, zscale, dscale, *, training, eps, group_num) -> PowerNormSaved:
    """The saved record of a CUDA forward on `x` (a torch CUDA tensor or CuPy array) that returned
    (zscale, dscale) (host float64, shape (C,)); for adapters that carry only arrays between the
    forward and the backward."""
    lib = _lib_of((x,), "normax.power_norm_backward")
    x = _input(lib, x, "x")
    c = x.shape[-1]
    return _CudaPowerNormSaved(
        x=lib.contiguous(x).reshape(-1, c),
        shape=tuple(x.shape),
        dtype=x.dtype,
        weight=_power_param(lib, weight, "weight", c),
        has_bias=bool(has_bias),
        zscale=np.asarray(zscale, np.float64).reshape(-1),
        dscale=np.asarray(dscale, np.float64).reshape(-1),
        training=bool(training),
        eps=float(eps),
        group_num=int(group_num),
    )


def power_norm_backward(dy, saved, state):
    return power_norm_backward_as(dy, saved, state, None)


def power_norm_backward_as(dy, saved, state, param_dtype):
    """power_norm_backward with dweight and dbias in `param_dtype` (None: the promoted dtype of x
    and dy) straight from the float32 sums, for adapters whose parameters are wider than x."""
    fname = "normax.power_norm_backward"
    if not isinstance(saved, PowerNormSaved):
        raise TypeError(f"saved: expected a normax.PowerNormSaved, got {type(saved).__name__}")
    if not isinstance(state, PowerNormState):
        raise TypeError(f"state: expected a normax.PowerNormState, got {type(state).__name__}")
    if not is_cuda_array(saved.x):
        raise ValueError(
            f"{fname}: saved comes from a forward on the CPU while dy is on the GPU; run both on one device"
        )
    lib = _lib_of((dy, saved.x), fname)
    with _current(lib):
        return _power_norm_backward(lib, dy, saved, state, param_dtype)


def _power_norm_backward(lib, dy, saved, state, param_dtype):
    dy = _input(lib, dy, "dy")
    if tuple(dy.shape) != tuple(saved.shape):
        raise ValueError(
            f"dy: shape {tuple(dy.shape)} does not match the forward's x shape {tuple(saved.shape)}"
        )
    work = lib.on_device(saved.x, "saved.x")
    tokens, c = work.shape
    if c != state.num_features:
        raise ValueError(f"state: num_features {state.num_features} does not match the forward's {c}")
    result = _promote(lib, saved.dtype, dy.dtype)
    dy = lib.astype(dy, work.dtype)
    dyw = lib.contiguous(dy).reshape(tokens, c)
    ema = (1.0 - state.alpha_bkw) * state.ema_gz if saved.training else np.zeros(c)
    dx = lib.empty((tokens, c), work.dtype)
    sums = lib.empty((3 * c,), lib.float32())
    _run(
        lib, _core.cuda_power_norm_backward, dyw, work, tokens, c, saved.group_num, saved.eps,
        saved.weight, _dev32(lib, saved.zscale, "zscale"), _dev32(lib, ema, "ema_gz"),
        _dev32(lib, saved.dscale, "dscale"), dx, sums,
    )  # fmt: skip
    if saved.training and tokens:
        state.ema_gz += _host64(lib, sums[:c]) / tokens
    dx = lib.astype(dx.reshape(saved.shape), result)
    pd = result if param_dtype is None else param_dtype
    # Copies: the three results never share memory (torch custom ops may not return aliases).
    dweight = None if saved.weight is None else _copy(lib, lib.astype(sums[c : 2 * c], pd))
    dbias = _copy(lib, lib.astype(sums[2 * c :], pd)) if saved.has_bias else None
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy: the caller's GEMMs (cuBLAS) on blocks of rows, the cross-entropy kernel on
# each block of logits (which becomes its gradient in place).

# Logits blocks below this many elements cost more in launches than they save in memory.
_LINEAR_MIN_BLOCK = 1 << 20


def _linear_rows(n: int, v: int, chunk_size: int | None) -> int:
    """Rows of hidden per logits block. Rows are never split (the kernel takes whole vocabulary
    rows), so a `chunk_size` below V still holds one row. By default a block is about 1/8 of the
    N x V logits (at least _LINEAR_MIN_BLOCK elements, or all rows when there are fewer)."""
    if n == 0:
        return 1
    if chunk_size is not None:
        return max(1, min(n, chunk_size // v))
    return max(1, min(n, max(-(-n // 8), _LINEAR_MIN_BLOCK // v)))


def _gemm(lib: _Lib, a, b, out):
    lib.mod.matmul(a, b, out=out)
    return out


def _zeros(lib: _Lib, shape, dtype):
    if lib.name == "torch":
        return lib.mod.zeros(shape, dtype=dtype, device=lib.device)
    return lib.mod.zeros(shape, dtype=dtype)  # on the current device: the caller's


def _linear(
    fname, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
    chunk_size, with_grad, grad_output=1.0, sync_check=True,
):  # fmt: skip
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    lib = _lib_of((hidden, weight, target, bias, grad_output), fname)
    with _current(lib):
        return _linear_on(
            lib, hidden, weight, target, bias, opts, chunk_size, with_grad, grad_output, sync_check
        )


def _linear_on(lib, hidden, weight, target, bias, opts, chunk_size, with_grad, grad_output, sync_check):
    ignore_index, reduction, label_smoothing, z_loss, softcap = opts
    h = _input(lib, hidden, "hidden")
    w = _input(lib, weight, "weight")
    if h.ndim != 2:
        raise ValueError(f"hidden: expected a 2-d (N, H) array, got shape {tuple(h.shape)}")
    if w.ndim != 2 or w.shape[1] != h.shape[1]:
        raise ValueError(f"weight: expected shape (V, {h.shape[1]}) as torch.nn.Linear, got {tuple(w.shape)}")
    n, hd = h.shape
    v = w.shape[0]
    if v == 0:
        raise ValueError("weight: the vocabulary (first axis) is empty")
    work = _promote(lib, h.dtype, w.dtype)
    result = work
    b = None
    if bias is not None:
        b = _input(lib, bias, "bias")
        if tuple(b.shape) != (v,):
            raise ValueError(f"bias: expected shape ({v},), got {tuple(b.shape)}")
        result = _promote(lib, work, b.dtype)
        b = lib.contiguous(lib.astype(b, work))
    t = lib.on_device(target, "target")
    tname = lib.dtype_name(t)
    if tname == "bool" or not tname.startswith(("int", "uint")):
        raise TypeError(f"target: expected integer class indices, got dtype {tname}")
    if tuple(t.shape) != (n,):
        raise ValueError(
            f"target: expected shape ({n},), one class index per row of hidden; got {tuple(t.shape)}"
        )
    chunk_size = _chunk_size(chunk_size)
    h = lib.contiguous(lib.astype(h, work))
    w = lib.contiguous(lib.astype(w, work))
    tk = lib.contiguous(lib.int64(t))
    _check_classes(lib, tk, v, ignore_index, (n,), sync_check)
    f32 = lib.float32()
    loss_rows = lib.empty((n,), f32)

    # The mean's denominator counts the kept rows of ALL blocks, so it comes first: the gradient
    # scale of every block depends on it.
    denom = lib.astype((tk != ignore_index).sum(), f32) if reduction == "mean" else None  # exact count
    scale, stride = (None, 0)
    if with_grad:
        scale, stride = _grad_scale(lib, grad_output, reduction, denom, (n,), n)
    bn = _linear_rows(n, v, chunk_size)
    several = n > bn
    blk = lib.empty((min(bn, n), v), work)
    dh = dw = db = None
    if with_grad:
        dh = lib.empty((n, hd), work)
        # Several blocks add into dweight: in float32 (16-bit sums would round at every block).
        dw = _zeros(lib, (v, hd), f32) if several else None
        db = _zeros(lib, (v,), f32) if b is not None else None
    cap = 0.0 if softcap is None else softcap
    for r0 in range(0, n, bn):
        rn = min(bn, n - r0)
        hb = h[r0 : r0 + rn]
        lg = _gemm(lib, hb, w.T, blk[:rn])
        if b is not None:
            lg += b
        sc = None
        if with_grad:
            sc = scale[r0 : r0 + rn] if stride else scale
        _run(
            lib, _core.cuda_cross_entropy, lg, tk[r0 : r0 + rn], None, loss_rows[r0 : r0 + rn],
            lg if with_grad else None, sc, stride, rn, v, ignore_index, label_smoothing, z_loss, cap,
        )  # fmt: skip
        if not with_grad:
            continue
        _gemm(lib, lg, w, dh[r0 : r0 + rn])  # dhidden = G @ W
        if not several:
            dw = lib.empty((v, hd), work)
            _gemm(lib, lg.T, hb, dw)  # dweight = G^T @ hidden
        elif lib.name == "torch" and lib.dtype_name(lg) == "float32":
            dw.addmm_(lg.T, hb)
        else:
            dw += lg.T @ hb
        if db is not None:
            db += lg.sum(0, dtype=f32) if lib.name == "torch" else lg.sum(axis=0, dtype=f32)

    loss = _reduce(lib, loss_rows, reduction, denom, result)
    if not with_grad:
        return loss
    if dw is None:  # no rows
        dw = _zeros(lib, (v, hd), work)
    dh, dw = lib.astype(dh, result), lib.astype(dw, result)
    return loss, dh, dw, (None if db is None else lib.astype(db, result))


def linear_cross_entropy(
    hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
    z_loss=0.0, softcap=None, chunk_size=None,
):  # fmt: skip
    return _linear(
        "normax.linear_cross_entropy", hidden, weight, target, bias, ignore_index, reduction,
        label_smoothing, z_loss, softcap, chunk_size, False,
    )  # fmt: skip


def linear_cross_entropy_with_grad(
    hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
    z_loss=0.0, softcap=None, chunk_size=None, grad_output=1.0,
):  # fmt: skip
    return _linear(
        "normax.linear_cross_entropy_with_grad", hidden, weight, target, bias, ignore_index, reduction,
        label_smoothing, z_loss, softcap, chunk_size, True, grad_output,
    )  # fmt: skip
