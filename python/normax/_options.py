"""The argument checks every backend shares: one contract per op, written once.

The CPU ops, the CUDA path and the wgpu backend call these, so an argument is accepted,
normalized and rejected (same exception, same message) the same way whatever runs the kernel.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np

from . import _core
from ._arrays import (
    as_input,
    compute_dtype,
    contiguous,
    is_float_dtype,
    is_int_dtype,
    normalize_axes,
    scalar_0d,
)

# ---------------------------------------------------------------------------------------------
# Scalars


# Things float() takes that are no number: strings ('0.1'), bytes, bools.
_NOT_NUMBERS = (str, bytes, bytearray, bool, np.bool_)
_NUMPY_REALS = (np.floating, np.integer)


def number(v, name: str) -> float:
    """A real number as a float; TypeError naming `name` otherwise: bools, strings (``'0.1'``,
    which ``float()`` would parse), complex numbers and 0-d arrays of those included, as
    torch's and NumPy's numeric arguments."""
    if type(v) is float or type(v) is int or isinstance(v, _NUMPY_REALS):
        return float(v)
    if (
        isinstance(v, _NOT_NUMBERS)
        or np.ndim(v) != 0
        or getattr(getattr(v, "dtype", None), "kind", "f") in "bcSUOTMm"
    ):
        raise TypeError(f"{name}: expected a real number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {v!r}") from None


def count(v, name: str, minimum: int) -> int:
    """An int >= `minimum` (bools rejected)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return int(v)


# ---------------------------------------------------------------------------------------------
# Cross-entropy

REDUCTIONS = ("mean", "sum", "none")


# The checked loss options: one immutable object (fields ignore_index, reduction,
# label_smoothing, z_loss, softcap, temperature; ``replace(**changes)``), the one form in which
# they reach every backend's kernels.
CeOptions = _core.CeOptions


def ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature=1.0) -> CeOptions:
    """The loss options checked and converted, as one :class:`CeOptions`; errors name the argument."""
    if isinstance(ignore_index, (bool, np.bool_)):
        raise TypeError("ignore_index: expected an int, got a bool")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}") from None
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: {ignore_index} does not fit in int64")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    label_smoothing = number(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: must be between 0.0 and 1.0, got {label_smoothing}")
    z_loss = number(z_loss, "z_loss")
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss: must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        softcap = number(softcap, "softcap")
        if not (softcap > 0.0 and math.isfinite(softcap)):
            raise ValueError(f"softcap: must be a finite number > 0 or None, got {softcap}")
        if softcap < _F64_TINY:  # 1 / softcap, in the gradient, would be inf even in float64
            raise ValueError(
                f"softcap: must be at least {_F64_TINY} (float64's smallest normal), got {softcap}"
            )
    return CeOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, check_temperature(temperature))


def check_temperature(temperature) -> float:
    """A cross-entropy's temperature: a finite number > 0 (TypeError / ValueError naming it)."""
    temperature = number(temperature, "temperature")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature}")
    return temperature


def token_weights(token_weight, row_shape: tuple, work: np.dtype) -> np.ndarray | None:
    """A cross-entropy's token weights, one per row (the per-row loss's shape), flat and
    contiguous in `work`, or None."""
    if token_weight is None:
        return None
    w = np.asarray(token_weight)
    compute_dtype(w.dtype, "token_weight")
    if w.shape != tuple(row_shape):
        raise ValueError(
            f"token_weight: expected shape {tuple(row_shape)}, one per row (the per-row loss's shape); "
            f"got {w.shape}"
        )
    return contiguous(w, work).reshape(-1)


def norm_options(kind: str, eps) -> _core.NormOptions:
    """A normalization's checked options: `kind` ("rms", "layer" or "crms") and `eps` (see
    :func:`check_eps`)."""
    e = eps if type(eps) is float and 0.0 <= eps < math.inf else check_eps(eps)
    options = _NORM_OPTIONS.get((kind, e))
    if options is None:
        if len(_NORM_OPTIONS) >= 256:  # a program sweeping eps: start over rather than grow
            _NORM_OPTIONS.clear()
        options = _NORM_OPTIONS[kind, e] = _core.NormOptions(kind, e)
    return options


# A training loop asks for the same few (kind, eps) on every call: one object each.
_NORM_OPTIONS: dict = {}


def class_axis(axis, shape: tuple) -> int:
    """The class axis of logits of `shape` as a non-negative int; it must exist and hold classes."""
    if not shape:
        raise ValueError("logits: expected at least one dimension (the class axis)")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis: expected an int (the class axis), got {axis!r}")
    ax = normalize_axes(int(axis), len(shape))[0]
    if shape[ax] == 0:
        raise ValueError(f"logits: the class axis {ax} is empty")
    return ax


def target_kind(t_shape: tuple, kind: str, dtype, shape: tuple, axis: int) -> bool:
    """Checks a cross-entropy target against logits of `shape`; True for class probabilities.

    `kind` is "i" for integer class indices, "f" for real floating probabilities, anything else
    for a dtype that is neither.
    """
    row_shape = shape[:axis] + shape[axis + 1 :]
    if kind == "i":
        if t_shape != row_shape:
            raise ValueError(
                f"target: class indices have shape {t_shape}; expected {row_shape} "
                f"(the logits' shape {shape} without the class axis {axis})"
            )
        return False
    if kind != "f":
        raise TypeError(f"target: expected integer class indices or float probabilities, got {dtype}")
    if t_shape != shape:
        raise ValueError(
            f"target: class probabilities (a float target) must have the logits' shape {shape}, "
            f"got {t_shape}; integer class indices have shape {row_shape}"
        )
    return True


def linear_shapes(h_shape: tuple, w_shape: tuple, b_shape, t_shape: tuple, t_integer: bool, t_dtype):
    """(N, H, V) of the fused linear cross-entropy kernels: (N, H) hidden, (V, H) linear weight,
    (V,) bias or None, (N,) integer target."""
    if len(h_shape) != 2:
        raise ValueError(f"hidden: expected a 2-d (N, H) array, got shape {h_shape}")
    if len(w_shape) != 2 or w_shape[1] != h_shape[1]:
        raise ValueError(f"linear_weight: expected shape (V, {h_shape[1]}) as torch.nn.Linear, got {w_shape}")
    (n, hd), v = h_shape, w_shape[0]
    if v == 0:
        raise ValueError("linear_weight: the vocabulary (first axis) is empty")
    if b_shape is not None and b_shape != (v,):
        raise ValueError(f"linear_bias: expected shape ({v},), got {b_shape}")
    if not t_integer:
        raise TypeError(f"target: expected integer class indices, got dtype {t_dtype}")
    if t_shape != (n,):
        raise ValueError(f"target: expected shape ({n},), one class index per row of hidden; got {t_shape}")
    return n, hd, v


def linear_logits_shape(h_shape: tuple, w_shape: tuple, b_shape) -> tuple:
    """The logits' shape of a linear cross-entropy, as torch's ``F.linear_cross_entropy``:
    hidden (H,) or (N, H); linear weight (C, H) or (C, d1, ..., dK, H) (K-dimensional loss,
    batched hidden only); bias (C, d1, ..., dK) or None. Logits are (N?, C, d1, ..., dK)."""
    if len(h_shape) not in (1, 2):
        raise ValueError(f"hidden: expected (H,) or (N, H), got shape {h_shape}")
    if len(w_shape) < 2 or w_shape[-1] != h_shape[-1]:
        raise ValueError(
            f"linear_weight: expected shape (C, {h_shape[-1]}) or (C, d1, ..., dK, {h_shape[-1]}), got {w_shape}"
        )
    classes, out_features = w_shape[0], tuple(w_shape[1:-1])
    if classes == 0:
        raise ValueError("linear_weight: the classes (first axis) are empty")
    if out_features and len(h_shape) == 1:
        raise ValueError(
            f"hidden: a K-dimensional loss (linear_weight of shape {w_shape}) needs batched (N, H) "
            f"hidden states, got shape {h_shape}"
        )
    if b_shape is not None and tuple(b_shape) != (classes, *out_features):
        raise ValueError(f"linear_bias: expected shape {(classes, *out_features)}, got {tuple(b_shape)}")
    return (*h_shape[:-1], classes, *out_features)


def check_chunk_size(value) -> int | None:
    """The linear cross-entropy's `chunk_size` checked: None, or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"chunk_size: expected an int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"chunk_size: must be at least 1, got {value}")
    return int(value)


def check_accumulation(value) -> str:
    """The CUDA linear cross-entropy's `accumulation` (of dweight, dbias over the row blocks)
    checked: "float32" or "input" (the inputs' dtype)."""
    if not isinstance(value, str) or value not in ("float32", "input"):
        raise ValueError(f'accumulation: expected "float32" or "input", got {value!r}')
    return value


_INT64_MAX = 2**63 - 1


def _position(flat: int, shape: tuple):
    pos = np.unravel_index(flat, shape)
    return pos, (int(pos[0]) if len(pos) == 1 else tuple(int(p) for p in pos))


def class_indices(t: np.ndarray, name: str = "target") -> np.ndarray:
    """Integer class indices (NumPy's or ml_dtypes' integers) as int64, the type the kernels
    compare them in. A uint64 index above 2**63 - 1 does not fit: a cast would wrap it around
    (2**64 - 100 onto -100, the default ignore_index, silently dropping its row), so it is an
    IndexError naming the value and its position."""
    if t.dtype.kind == "u" and t.dtype.itemsize >= 8 and t.size and t.max() > _INT64_MAX:
        pos, where = _position(int(np.argmax(t > _INT64_MAX)), t.shape)
        value = int(t[pos])
        raise IndexError(
            f"{name}: class index {value} at position {where} is out of range: it does not fit in "
            f"int64, in which class indices are compared (a cast would wrap it around to {value - 2**64})"
        )
    return t.astype(np.int64, copy=False)


# float32 rounds a cap at or above 2**128 - 2**103 to inf (so x / cap = 0 and the capped logits
# 0 * inf = NaN), and one below its smallest normal number to a subnormal or 0.
_F32_CAP_MAX = 2.0**128 - 2.0**103
_F32_TINY = float(np.finfo(np.float32).tiny)
_F64_TINY = float(np.finfo(np.float64).tiny)


def softcap_dtype(softcap: float | None, dtype: np.dtype) -> np.dtype:
    """The dtype a cross-entropy of logits computed in `dtype` runs in with this (checked)
    `softcap`: `dtype`, or float64 for float32 when float32 cannot hold the cap (at or above
    2**128 - 2**103, or below float32's smallest normal): the kernels apply the cap in the
    logits' dtype, and ``softcap * tanh(x / softcap)`` in float64 is the reference (torch computes
    it in float64 for float64 logits; a float32 cap of inf would give NaN)."""
    if softcap is not None and dtype == np.float32 and not _F32_TINY <= softcap < _F32_CAP_MAX:
        return np.dtype(np.float64)
    return dtype


def index_error(t: np.ndarray, classes: int, ignore_index: int) -> IndexError:
    """The first class index out of range, by value and position (a kernel found one)."""
    bad = (t != ignore_index) & ((t < 0) | (t >= classes))
    if not bad.any():  # pragma: no cover - the array changed under us
        return IndexError("target: a class index is out of range")
    pos = np.unravel_index(int(np.argmax(bad)), t.shape)
    where = int(pos[0]) if len(pos) == 1 else tuple(int(p) for p in pos)
    return IndexError(
        f"target: class index {int(t[pos])} at position {where} is out of range [0, {classes}) "
        f"and is not ignore_index ({ignore_index})"
    )


def grad_output_rows(grad_output, reduction: str, loss_shape: tuple, work: np.dtype):
    """`grad_output` for the kernels: a float, or (reduction "none") one per row, contiguous in
    `work`."""
    g = np.asarray(grad_output)
    if g.ndim == 0:
        return number(g, "grad_output")
    if reduction != "none":
        raise ValueError(f"grad_output: must be a number for reduction={reduction!r}, got shape {g.shape}")
    compute_dtype(g.dtype, "grad_output")
    try:
        g = np.broadcast_to(g, loss_shape)
    except ValueError:
        raise ValueError(
            f"grad_output: shape {g.shape} does not broadcast to the per-row loss shape {loss_shape}"
        ) from None
    return contiguous(g, work).reshape(-1)


def ce_targets(target, shape: tuple, axis: int, work: np.dtype):
    """(class indices, or probabilities in `work`), and whether they are probabilities."""
    t = np.asarray(target)
    if is_int_dtype(t.dtype):
        kind = "i"
    elif t.dtype.kind == "b":
        kind = "b"
    else:
        compute_dtype(t.dtype, "target")  # TypeError for complex, strings, objects
        kind = "f"
    soft = target_kind(t.shape, kind, t.dtype, shape, axis)
    return (t.astype(work, copy=False) if soft else class_indices(t)), soft


class CeInputs(NamedTuple):
    """A cross-entropy's checked NumPy inputs."""

    logits: np.ndarray  # in its kernel dtype
    result_dtype: np.dtype
    axis: int  # the class axis, non-negative
    target: np.ndarray  # class indices, or probabilities in the kernel dtype
    soft: bool  # whether `target` holds probabilities
    weight: np.ndarray | None  # per class, contiguous, in the kernel dtype


def ce_inputs(logits, target, axis, weight, inplace: bool) -> CeInputs:
    """The checked NumPy inputs of a cross-entropy (no kernel has run, nothing is written)."""
    if inplace and not (
        isinstance(logits, np.ndarray) and logits.flags.writeable and is_float_dtype(logits.dtype)
    ):
        raise ValueError("logits: inplace=True needs a writeable floating-point numpy.ndarray")
    x, result_dtype = as_input(logits, "logits")
    ax = class_axis(axis, x.shape)
    classes = x.shape[ax]
    t, soft = ce_targets(target, x.shape, ax, x.dtype)
    return CeInputs(x, result_dtype, ax, t, soft, class_weights(weight, classes, x.dtype))


def class_weights(weight, classes: int, work: np.dtype) -> np.ndarray | None:
    """A cross-entropy's (C,) class weights, contiguous in `work`, or None."""
    if weight is None:
        return None
    w = np.asarray(weight)
    compute_dtype(w.dtype, "weight")
    if w.shape != (classes,):
        raise ValueError(f"weight: expected shape ({classes},), one per class; got {w.shape}")
    return contiguous(w, work)


def ce_results(loss: np.ndarray, grad, logits, inplace: bool, reduction: str, row_shape: tuple, dtype):
    """The public results of a NumPy cross-entropy: the loss (one per row for "none", else a
    scalar) from the kernel's loss buffer, and with a `grad` (in the logits' layout) the gradient,
    written into `logits` for `inplace`; all in the result `dtype`."""
    if reduction == "none":
        out = scalar_0d(loss.reshape(row_shape).astype(dtype, copy=False))
    else:
        out = loss.astype(dtype, copy=False)[0]
    if grad is None:
        return out
    if inplace:
        if not np.may_share_memory(grad, logits):
            np.copyto(logits, grad, casting="same_kind")
        return out, logits
    return out, grad.astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Norms


def norm_axes(axis, ndim: int) -> tuple[int, ...]:
    """The normalized axes: sorted, non-negative, and the trailing ones."""
    if axis is None:
        raise TypeError("axis: expected an int or a tuple of trailing axes, got None")
    axes = normalize_axes(axis, ndim)
    if not axes:
        raise ValueError("axis: name at least one axis")
    if axes != tuple(range(ndim - len(axes), ndim)):
        raise ValueError(
            f"axis: {axis!r} is not a set of trailing axes of the {ndim}-d input; the normalized "
            "shape is x.shape[axis:] (torch's normalized_shape): move the axes last with numpy.moveaxis"
        )
    return axes


def check_eps(eps) -> float:
    """`eps` as a finite float >= 0 (a real number: bools and strings are TypeErrors)."""
    if type(eps) is float or type(eps) is int or isinstance(eps, _NUMPY_REALS):
        e = float(eps)
    elif isinstance(eps, (bool, np.bool_)):
        raise TypeError("eps: expected a real number, got a bool")
    else:
        e = number(eps, "eps")
    if not (0.0 <= e < math.inf):
        raise ValueError(f"eps: must be finite and >= 0, got {eps!r}")
    return e


def machine_eps(dtype: np.dtype) -> float:
    """eps of a result dtype (rms_norm's default, as torch): float16 and ml_dtypes floats included."""
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        import ml_dtypes  # only ml_dtypes floats get here

        return float(ml_dtypes.finfo(dtype).eps)


def param(p, name: str, shape: tuple[int, ...], dtype: np.dtype):
    """weight/bias as a flat contiguous NumPy array in `dtype`, or None."""
    if p is None:
        return None
    a = np.asarray(p)
    compute_dtype(a.dtype, name)  # TypeError for complex, string, object
    if a.shape != shape:
        raise ValueError(
            f"{name}: shape {a.shape} does not match the normalized shape {shape} (x.shape[axis])"
        )
    return contiguous(a, dtype).reshape(-1)
