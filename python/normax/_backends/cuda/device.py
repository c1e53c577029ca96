"""The CUDA path's host plumbing, shared by every op family: the caller's array library (torch or
CuPy), raw device arrays on the caller's stream, the kernels' entry points, and NVRTC loading.

Every `_core.cuda_*` kernel is called through :func:`run`, which passes each array as its raw
tuple ``(ptr, dtype code, len)`` (:meth:`Lib.raw`) and adds the caller's stream (the tests'
kernel emulation replaces those `_core` functions).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import numpy as np

from ... import _core
from ..._arrays import Plan

_DL_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
KERNEL_DTYPES = ("float32", "float16", "bfloat16")
# The raw arrays' dtype codes (normax-cuda's DType order, then int64 for class indices).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "int64": 3}
_CODES_OF = {}  # per library: its dtype objects to codes


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


def load_nvrtc() -> str | None:
    """Loads NVRTC from the nvidia-cuda-nvrtc wheel if one is installed; returns its path.

    The Rust side finds libnvrtc by its soname; a library already loaded by this process is
    found that way, so loading the wheel's copy here makes it the one used. Where the CUDA
    runtime of the caller's framework is known, the NVRTC of the same major version comes first
    (its cubins load on the driver that framework runs on).
    """
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
    prepare()
    return _core.cuda_compile_all(arch)


_NVRTC_SEARCHED = False


def prepare() -> None:
    """What a kernel call needs first: a build with the CUDA backend, and the NVRTC wheel's library
    loaded where there is one (searched for once per process: a toolkit's NVRTC on the library path
    is found by the Rust side)."""
    global _NVRTC_SEARCHED
    _require_build()
    if not _NVRTC_SEARCHED:
        load_nvrtc()
        _NVRTC_SEARCHED = True


def _require_build() -> None:
    if not hasattr(_core, "cuda_softmax"):
        raise RuntimeError(
            "normax was built without the CUDA backend (Cargo feature 'cuda'); reinstall a wheel "
            "built with it to use CUDA arrays"
        )


# ---------------------------------------------------------------------------------------------
# The caller's library: torch or CuPy


class Lib:
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
        self._codes = _CODES_OF.get(mod) or _CODES_OF.setdefault(mod, self._dtype_codes())
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
        if self.dtype_name(a) not in KERNEL_DTYPES:
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

    def _dtype_codes(self) -> dict:
        if self.name == "torch":
            return {getattr(self.mod, n): c for n, c in DTYPE_CODES.items()}
        return {np.dtype(n): c for n, c in DTYPE_CODES.items() if n != "bfloat16"}  # CuPy: NumPy dtypes

    def raw(self, a) -> tuple[int, int, int]:
        """`a` as the kernels take it: (device address of element 0, dtype code, element count).

        The kernels run on the caller's current stream, the one its own work is ordered on, so
        nothing is synchronized. `a` must be C-contiguous on this device (the op modules make it
        so: checked here only by an assert).
        """
        assert self.is_contiguous(a), "the CUDA kernels take C-contiguous arrays"
        try:
            code = self._codes[a.dtype]
        except KeyError:
            raise TypeError(f"{self.fname}: no CUDA kernel takes {self.dtype_name(a)} arrays") from None
        if self.name == "torch":
            return (a.data_ptr(), code, a.numel())
        return (a.data.ptr, code, a.size)

    def same_memory(self, a, b) -> bool:
        if self.name == "torch":
            return a.data_ptr() == b.data_ptr()
        return a.data.ptr == b.data.ptr

    def dtype_name_of(self, dtype) -> str:
        return str(dtype).rsplit(".", 1)[-1]

    def is_contiguous(self, a) -> bool:
        return a.is_contiguous() if self.name == "torch" else a.flags.c_contiguous

    # -- the op modules' helpers

    def input(self, x, name: str):
        """`x` on this device, of a dtype the kernels take."""
        x = self.on_device(x, name)
        self.check_dtype(x, name)
        return x

    def arrange(self, x, plan: Plan):
        """`x` in the kernels' row order (`plan` built with ``last=True``), contiguous."""
        return self.contiguous(self.permute(x, plan.moved) if plan.moved else x)

    def restore(self, r, plan: Plan):
        """A result in the kernels' row order, back in the caller's axis order (a view)."""
        return self.permute(r, plan.inverse) if plan.moved else r

    def output(self, plan: Plan, dtype, out):
        """Where a kernel writes: the caller's `out` itself when it has the rows' layout, else new.

        `out` is checked here (the result's shape and `dtype`), before any kernel runs.
        """
        shape = plan.shape
        if out is not None:
            o = self.on_device(out, "out")
            if tuple(o.shape) != shape or self.dtype_name(o) != self.dtype_name_of(dtype):
                raise ValueError(
                    f"{self.fname}: out must have shape {shape} and dtype {self.dtype_name_of(dtype)}, "
                    f"got {tuple(o.shape)} and {self.dtype_name(o)}"
                )
            if not plan.moved and self.is_contiguous(o):
                return o
        return self.empty(plan.arranged_shape, dtype)

    def finish(self, result, out):
        """`result`, or the caller's `out` holding it (`out` was checked by :meth:`output`)."""
        if out is None:
            return result
        o = self.on_device(out, "out")
        if not self.same_memory(o, result):
            o[...] = result
        return out

    def current(self):
        """The array's device as the current one (CuPy allocates and runs on the current device)."""
        return self.mod.cuda.device(self.index) if self.name == "torch" else self.device

    def host(self, a) -> np.ndarray:
        """A NumPy copy of a device array (waits for the work queued before it)."""
        if self.name == "torch":
            return a.detach().to("cpu").numpy()
        return self.mod.asnumpy(a)

    def host64(self, a) -> np.ndarray:
        return self.host(a).astype(np.float64)

    def dev32(self, a: np.ndarray, name: str):
        """Host float64 values as a float32 device array, rounded on the host as the CPU path's astype."""
        return self.on_device(np.ascontiguousarray(a, dtype=np.float32), name)

    def promote(self, a, b):
        return self.mod.promote_types(a, b) if self.name == "torch" else np.result_type(a, b)

    def copy(self, a):
        return a.clone() if self.name == "torch" else a.copy()

    def zeros(self, shape, dtype):
        if self.name == "torch":
            return self.mod.zeros(shape, dtype=dtype, device=self.device)
        return self.mod.zeros(shape, dtype=dtype)  # on the current device: the caller's


def lib_of(args, fname) -> Lib:
    """The library of the first CUDA array among `args`."""
    for a in args:
        if is_cuda_array(a):
            return Lib(a, fname)
    raise AssertionError("no CUDA array among the arguments")  # the dispatcher checked


def run(lib: Lib, kernel, *args):
    """Calls `kernel`, a ``_core.cuda_*`` function, with the raw tuple (:meth:`Lib.raw`) of every
    array among `args` (inside tuples too) and the caller's device and stream last; returns what it
    returns."""
    prepare()
    return kernel(*(_raw(lib, a) for a in args), _core.CudaStream(lib.index, lib.stream))


def _raw(lib: Lib, a):
    if type(a) is tuple:
        return tuple(_raw(lib, x) for x in a)
    return lib.raw(a) if hasattr(a, "__dlpack__") else a  # arrays of both libraries have __dlpack__
