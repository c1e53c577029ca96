"""The argument checks and dtype rules every op family of normax.jax shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def neg_axes(axis, ndim: int, fname: str) -> tuple[int, ...]:
    """Axes as sorted negative ints (so a vmapped call's leading batch dimensions don't move them)."""
    if axis is None:
        return tuple(range(-ndim, 0))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"{fname}: axis {axis!r} is out of range for a {ndim}-d array")
        out.append(a % ndim - ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fname}: axis {axis!r} repeats an axis")
    return tuple(sorted(out))


def is_complex(x) -> bool:
    return x is not None and jnp.iscomplexobj(x)


def inexact_dtype(dtype) -> np.dtype:
    """jax's promotion of a non-inexact dtype (``promote_args_inexact``, as in
    ``jax.scipy.special.logsumexp``): bool and integers up to 32 bits become float32, 64-bit
    integers float64 (float32 without x64). A dtype-level rule: no ``result_type(int, float)``
    mixing, which ``jax_numpy_dtype_promotion="strict"`` refuses."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return dtype
    return jax.dtypes.canonicalize_dtype(np.float64 if dtype.itemsize == 8 else np.float32)


def floating(x, fname):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        # Casting would drop the imaginary part: a silent wrong answer.
        raise TypeError(f"{fname}: complex input ({x.dtype}) is not supported; normax's kernels are real")
    return x.astype(inexact_dtype(x.dtype))
