"""Input handling shared by every op: dtype rules, axes, memory layout and ``out=``.

Each op runs its kernel on C-contiguous, native-endian float32/float64 arrays viewed as
(outer, len, inner) with the reduced axes merged into ``len``. This module gets any input there
(a view where possible, a copy where not) and the result back into the caller's shape and dtype.
"""

from __future__ import annotations

import math

import numpy as np

try:  # NumPy >= 2
    from numpy.lib.array_utils import normalize_axis_tuple
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.numeric import normalize_axis_tuple

_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def compute_dtype(dtype: np.dtype, name: str) -> tuple[np.dtype, np.dtype]:
    """(dtype the kernel runs in, dtype of the result) for an input dtype; TypeError if unsupported.

    float32/float64 run as themselves; float16, bfloat16 and other small floats (ml_dtypes) run
    in float32 and come back in their own dtype; long double runs in float64 and comes back as
    long double; integers and bool become float64, as in SciPy: NumPy's and ml_dtypes' integers
    alike (``ml_dtypes.int4``, ``uint2``, ...). Any other dtype (NumPy cannot tell what it
    holds) is a TypeError naming the argument.
    """
    kind = dtype.kind
    if kind == "f":
        if dtype.itemsize <= 4:
            return _F32, dtype.newbyteorder("=")
        if dtype.itemsize == 8:
            return _F64, _F64
        return _F64, dtype.newbyteorder("=")
    if kind in "iub":
        return _F64, _F64
    if kind == "V":
        foreign = foreign_kind(dtype)
        if foreign == "f":
            return _F32, dtype
        if foreign == "i":
            return _F64, _F64
    raise TypeError(f"{name}: unsupported dtype {dtype}; expected a real floating, integer or bool array")


_FOREIGN: dict = {}


def foreign_kind(dtype: np.dtype) -> str | None:
    """What a dtype NumPy calls 'V' holds: "f" for a small float (ml_dtypes' bfloat16, float8_*,
    float4_*, ...: exact in float32), "i" for an integer (ml_dtypes' int4, uint2, ...), None for
    anything else (void, structured, subarray).

    Told apart by what they make of 0.5 and 1.0 (an integer type truncates 0.5), so types from
    other libraries are recognized as ml_dtypes' are; the answer is cached per dtype.
    """
    try:
        return _FOREIGN[dtype]
    except KeyError:
        pass
    kind = None
    if dtype.kind == "V" and dtype.names is None and dtype.subdtype is None:
        try:
            with np.errstate(all="ignore"):
                probe = np.array([0.5, 1.0]).astype(dtype).astype(np.float64)
        except (TypeError, ValueError):
            probe = None
        if probe is not None and probe.shape == (2,) and probe[1] == 1.0:
            if probe[0] == 0.5:
                kind = "f" if dtype.itemsize <= 2 else None
            elif probe[0] == 0.0 and dtype.itemsize <= 8:
                kind = "i"
    _FOREIGN[dtype] = kind
    return kind


def is_float_dtype(dtype: np.dtype) -> bool:
    """A real floating dtype: NumPy's or a small float such as ml_dtypes.bfloat16."""
    return dtype.kind == "f" or (dtype.kind == "V" and foreign_kind(dtype) == "f")


def is_int_dtype(dtype: np.dtype) -> bool:
    """An integer dtype: NumPy's or one such as ml_dtypes.int4 (bool is not one)."""
    return dtype.kind in "iu" or (dtype.kind == "V" and foreign_kind(dtype) == "i")


def as_input(x, name: str = "x") -> tuple[np.ndarray, np.dtype]:
    """The array in its kernel dtype (native byte order) and aligned, and the dtype of the result.

    A misaligned array (a view at an odd byte offset) is copied once: the kernels read aligned
    memory only.
    """
    a = np.asarray(x)
    work, result = compute_dtype(a.dtype, name)
    if a.dtype != work:
        a = a.astype(work)
    elif not a.flags.aligned:
        a = a.copy(order="K")
    return a, result


def contiguous(a, dtype=None) -> np.ndarray:
    """``numpy.ascontiguousarray(a, dtype)`` that is also aligned, as the kernels need: `a`
    itself when it already is, else one copy."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.aligned else a.copy()


def as_backward_inputs(a, name: str, dy):
    """A backward's inputs: the forward's array `a` (named `name`) in its kernel dtype and its own
    result dtype, `dy` of its shape in its kernel dtype, the dtype both are computed in and the
    result's dtype."""
    a, a_dtype = as_input(a, name)
    dy, dy_dtype = as_input(dy, "dy")
    if dy.shape != a.shape:
        raise ValueError(f"dy: shape {dy.shape} does not match {name} shape {a.shape}")
    return a, a_dtype, dy, np.result_type(a.dtype, dy.dtype), np.result_type(a_dtype, dy_dtype)


def normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative axes; None means all. AxisError when out of range, ValueError on repeats.

    A 0-d array reduces over its single element for axis 0 or -1, as in torch and JAX.
    """
    if axis is None:
        return tuple(range(ndim))
    if (
        ndim == 0
        and isinstance(axis, (int, np.integer))
        and not isinstance(axis, (bool, np.bool_))
        and axis in (0, -1)
    ):
        return ()
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError("axis: expected an int, a tuple of ints or None, got a bool")
    try:
        axes = normalize_axis_tuple(axis, ndim, "axis")
    except TypeError:
        raise TypeError(f"axis: expected an int, a tuple of ints or None, got {axis!r}") from None
    return tuple(sorted(axes))


class Plan:
    """How every backend lays an array of `shape` out: the reduced `axes` as the middle of
    (outer, len, inner).

    Consecutive axes of a C-contiguous array need no copy. Otherwise (and, with ``last=True``, for
    kernels that take the axes last, inner == 1, unless they already are) the axes are moved to
    the end by the permutation ``moved`` and the array copied once; results are allocated in
    ``arranged_shape`` and ``restore`` moves the axes back. A backend with its own array library
    applies ``moved`` and ``inverse`` with that library's transpose.
    """

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], *, last: bool = False):
        self.shape = shape
        self.axes = axes
        ndim = len(shape)
        k = len(axes)
        if last:
            in_place = axes == tuple(range(ndim - k, ndim))
        else:
            in_place = not axes or axes == tuple(range(axes[0], axes[-1] + 1))
        if in_place:
            first = axes[0] if axes else ndim
            last_axis = axes[-1] + 1 if axes else ndim
            self.moved = self.inverse = None
            self.arranged_shape = shape
        else:
            self.moved = tuple(i for i in range(ndim) if i not in axes) + axes
            self.inverse = tuple(sorted(range(ndim), key=self.moved.__getitem__))
            self.arranged_shape = tuple(shape[i] for i in self.moved)
            first, last_axis = ndim - k, ndim
        arranged = self.arranged_shape
        self.outer = math.prod(arranged[:first])
        self.len = math.prod(arranged[first:last_axis])
        self.inner = math.prod(arranged[last_axis:])
        # Shape of a reduction's result with the reduced axes dropped, in the original order.
        self.reduced_shape = tuple(s for i, s in enumerate(self.shape) if i not in axes)
        self.keepdims_shape = tuple(1 if i in axes else s for i, s in enumerate(self.shape))

    def arrange(self, a: np.ndarray, dtype=None) -> np.ndarray:
        """A C-contiguous array in kernel order holding `a`'s values (a view when possible)."""
        if self.moved is not None:
            a = a.transpose(self.moved)
        return contiguous(a, dtype)

    def restore(self, r: np.ndarray) -> np.ndarray:
        """A result of ``arranged_shape``, back in the original axis order."""
        if self.moved is None:
            return r
        return r.transpose(self.inverse)


def check_out(out, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Validates ``out=`` before anything is written."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out: shape {out.shape} does not match the result shape {shape}")
    if out.dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise TypeError(f"out: dtype {out.dtype} does not match the result dtype {dtype}")
    if not out.flags.writeable:
        raise ValueError("out: array is read-only")
    return out


def direct_output(out: np.ndarray, work: np.ndarray, plan: Plan) -> np.ndarray | None:
    """`out` itself if the kernel can write it directly: same kernel dtype, C-contiguous in kernel
    order and aligned, and either `work`'s own memory (in place) or not overlapping it at all.
    Otherwise (None) the kernel writes a buffer that :func:`finish` copies into `out`."""
    if plan.moved is not None or out.dtype != work.dtype:
        return None
    flags = out.flags
    if not (flags.c_contiguous and flags.aligned):
        return None
    if not out.dtype.isnative:
        return None
    same = out.__array_interface__["data"][0] == work.__array_interface__["data"][0]
    if same or not np.may_share_memory(out, work):
        return out
    return None


def finish(result: np.ndarray, result_dtype: np.dtype, out):
    """The kernel's result in the caller's dtype, written to `out` when given (and `out`
    returned as given, even 0-d); a 0-d result without `out` is a NumPy scalar (:func:`scalar_0d`)."""
    if out is not None:
        if result is not out:  # a misaligned `out` included: written by NumPy, not the kernel
            np.copyto(out, result, casting="unsafe")
        return out
    if result.dtype != result_dtype:
        result = result.astype(result_dtype)
    return scalar_0d(result)


def scalar_0d(a):
    """A 0-d array as a NumPy scalar, anything else unchanged: every NumPy-first function returns
    0-d results so, as ``scipy.special.softmax`` / ``logsumexp`` and NumPy's ufuncs do."""
    return a[()] if a.ndim == 0 else a
