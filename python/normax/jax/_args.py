"""The argument checks and dtype rules every op family of normax.jax shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._cross_entropy import CrossEntropyStats


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


def token_weight_operand(token_weight, row_shape: tuple, dtype, fname: str):
    """The targets' token-weight operand: `token_weight` (shaped like the per-row loss, any real
    dtype) flat in the compute `dtype`, or the absent (0,). It gets no derivative (documented):
    ``stop_gradient``."""
    if token_weight is None:
        return jnp.zeros((0,), dtype)
    tw = jnp.asarray(token_weight)
    if jnp.issubdtype(tw.dtype, jnp.complexfloating):
        raise TypeError(f"{fname}: token_weight is complex ({tw.dtype}); expected real weights")
    if tw.shape != tuple(row_shape):
        raise ValueError(
            f"{fname}: token_weight has shape {tw.shape}; expected {tuple(row_shape)}, one per row"
        )
    return jax.lax.stop_gradient(tw.astype(dtype).reshape(-1))


def stats_of(lse, entropy, correct, token_weight, z_loss: float, denom):
    """:class:`normax.CrossEntropyStats` of per-row lse / entropy / correct (ignored rows 0, 0,
    False): the z-loss term is ``z_loss * sum(token_weight * lse**2)``, over `denom` for the mean
    (None: the sum). Metrics: no derivative flows through them."""
    lse, entropy = jax.lax.stop_gradient(lse), jax.lax.stop_gradient(entropy)
    squares = lse * lse
    if token_weight.shape[-1]:
        squares = squares * token_weight.reshape(squares.shape)
    z = z_loss * jnp.sum(squares)
    if denom is not None:
        z = z / denom
    return CrossEntropyStats(lse, entropy, correct, z)
