"""``jax.pure_callback`` into the NumPy-first functions, with explicit vmap batching, and the
argument checks every op family shares."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def call(impl, specs, args, base_ndims, row_args, vmap_method="expand_dims"):
    """``pure_callback`` of ``impl`` (NumPy arrays in, a tuple of arrays out) with explicit batching.

    Under vmap each argument arrives with extra leading dimensions (size 1 when not batched). If
    only the `row_args` are batched and every output is a row output (its leading dimensions are
    the rows'), they are broadcast to the batch shape and `impl` runs once; otherwise (`row_args`
    None, or a parameter batched) it runs once per batch element and the results are stacked.

    `impl` must be the same object for the same computation (see :func:`bind`): JAX caches the
    compiled callback by its identity, and a fresh closure per call would recompile every eager call.
    """
    present = tuple(i for i, a in enumerate(args) if a is not None)
    key = tuple((tuple(s.shape), jnp.dtype(s.dtype)) for s in specs)
    host = _host(impl, key, tuple(base_ndims), row_args, present, len(args))
    return jax.pure_callback(host, tuple(specs), *[args[i] for i in present], vmap_method=vmap_method)


@functools.cache
def bind(fn, **static):
    """``fn`` with static keyword arguments, one object per distinct value (a stable callback)."""
    return functools.partial(fn, **static)


@functools.cache
def _host(impl, spec_key, base_ndims, row_args, present, nargs):
    specs = [spec(shape, dtype) for shape, dtype in spec_key]

    def host(*arrays):
        full = [None] * nargs
        for i, a in zip(present, arrays):
            full[i] = np.asarray(a)
        extra = {i: full[i].ndim - base_ndims[i] for i in present}
        if not any(extra.values()):
            return _outputs(impl(*full), specs)
        batch = np.broadcast_shapes(*(full[i].shape[: extra[i]] for i in present))
        params_batched = any(
            any(s != 1 for s in full[i].shape[: extra[i]]) for i in present if i not in (row_args or ())
        )
        if row_args is not None and not params_batched:
            call = list(full)
            for i in present:
                if i in row_args:
                    call[i] = np.broadcast_to(full[i], batch + full[i].shape[extra[i] :])
                else:
                    call[i] = full[i].reshape(full[i].shape[extra[i] :])
            return _outputs(impl(*call), [spec(batch + s.shape, s.dtype) for s in specs])
        results = []
        for idx in np.ndindex(*batch):
            one = list(full)
            for i in present:
                e = extra[i]
                sub = tuple(0 if full[i].shape[k] == 1 else idx[len(batch) - e + k] for k in range(e))
                one[i] = full[i][sub]
            results.append(_outputs(impl(*one), specs))
        return tuple(
            np.stack([r[k] for r in results]).reshape(batch + tuple(specs[k].shape))
            for k in range(len(specs))
        )

    return host


def _outputs(result, specs):
    result = result if isinstance(result, tuple) else (result,)
    out = []
    for r, s in zip(result, specs):
        r = np.asarray(r, dtype=s.dtype)
        if r.shape != tuple(s.shape):  # a batched call: the spec's shape has the batch in front
            r = r.reshape(s.shape)
        out.append(r)
    return tuple(out)


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
