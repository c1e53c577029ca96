"""logprobs and linear_logprobs: each row's log-probability of its target and the entropy of
softmax(logits / T), both differentiable (a policy-gradient objective uses both).

``logprobs`` is a ``jax.custom_jvp`` over the ``normax_logprobs`` target, whose results are each
row's logprob, log-sum-exp and (with ``with_entropy``) entropy. With z = x / T and
p = exp(z - lse) formed in jnp from those outputs, the tangents are linear jnp code:

    dlogp = (dz_y - sum_c p_c dz_c)        dH = -sum_c p_c (z_c - lse + H) dz_c        (dz = dx / T)

(the target's 1 - p_y taken as -expm1(logprob), so no margin collapses it to 0), so reverse mode is JAX's transpose of them (one fused pass over the logits; a cotangent that is
zero, e.g. of an unused entropy, drops its terms), and second derivatives differentiate the rule.

``linear_logprobs`` is a ``jax.custom_vjp``, as ``linear_cross_entropy``: a tangent rule would
contract p with the tangents of the hidden states and the weight, i.e. form the (N, V) logits the
op exists to avoid. Its targets:

- ``normax_linear_logprobs``: hidden (N, H), weight (V, H), bias (V,) or (0,), target (N,) int32
  or int64; attributes temperature, ignore_index, chunk_size (0: the kernels' choice),
  with_entropy; results logprob (N,) and with ``with_entropy`` entropy (N,), one pass per row
  block of the logits.
- ``normax_linear_logprobs_backward``: the same operands, then g_logp (N,) and g_H (N,), each
  (0,) when its cotangent is a symbolic zero (the kernel skips its terms); results d hidden,
  d weight, d bias ((0,) without a bias): the logits blocks recomputed once.

Both targets run their leading batch dims (``vmap``) one batch element at a time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _logprobs as cpu
from .._options import check_chunk_size
from . import _ffi
from ._args import inexact_dtype, neg_axes
from ._linear import _batched, linear_inputs, present, spec

_ROWS = "normax_logprobs"
_LINEAR = "normax_linear_logprobs"
_LINEAR_BACKWARD = "normax_linear_logprobs_backward"


class _Config(NamedTuple):
    """The options as the targets' attributes (hashable: a static argument)."""

    temperature: float
    ignore_index: int
    entropy: bool

    def attrs(self) -> dict:
        return {
            "temperature": np.float64(self.temperature),
            "ignore_index": np.int64(self.ignore_index),
            "with_entropy": self.entropy,
        }


def _options(temperature, ignore_index):
    """temperature and ignore_index checked as the NumPy-first functions check them."""
    opts = cpu.logprob_options(ignore_index, temperature)
    return opts.temperature, opts.ignore_index


# -- Host implementations (the pure_callback route).


def row_lse(x, target, logprob, temperature: float, ignore_index: int):
    """Each row's log-sum-exp of x / T from its logprob: z_y - logprob, exact where the logprob
    is finite; rows where it is not are summed directly, ignored rows are 0 (the handler's rule)."""
    counted = target != ignore_index
    safe = np.where(counted, target, 0)
    z_y = np.take_along_axis(x, safe[:, None], axis=-1)[:, 0].astype(np.float64) / temperature
    lse = z_y - logprob.astype(np.float64)
    redo = counted & ~np.isfinite(logprob)
    if redo.any():
        z = x[redo].astype(np.float64) / temperature
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            top = np.max(z, axis=-1, keepdims=True)
            lse[redo] = (top + np.log(np.sum(np.exp(z - top), axis=-1, keepdims=True)))[:, 0]
    return np.where(counted, lse, 0.0).astype(x.dtype)


@_ffi.host_impl(_ROWS)
def _rows_host(logits, target, *, temperature, ignore_index, with_entropy):
    x = logits.reshape(-1, logits.shape[-1])
    t = target.reshape(-1).astype(np.int64)
    out = cpu.logprobs(x, t, temperature=float(temperature), ignore_index=int(ignore_index),
                       return_entropy=bool(with_entropy))  # fmt: skip
    logp, *entropy = out if with_entropy else (out,)
    lse = row_lse(x, t, logp, float(temperature), int(ignore_index))
    rows = logits.shape[:-1]
    return tuple(np.asarray(a, logits.dtype).reshape(rows) for a in (logp, lse, *entropy))


@_ffi.host_impl(_LINEAR)
def _linear_host(hidden, weight, bias, target, *, temperature, ignore_index, chunk_size, with_entropy):
    def one(h, w, b, t):
        out = cpu.linear_logprobs(
            h, w, t, linear_bias=present(b), temperature=float(temperature), ignore_index=int(ignore_index),
            chunk_size=int(chunk_size) or None, return_entropy=bool(with_entropy),
        )  # fmt: skip
        return out if with_entropy else (out,)

    return _batched(2, one, 1 + bool(with_entropy), hidden, weight, bias, target)


@_ffi.host_impl(_LINEAR_BACKWARD)
def _linear_backward_host(hidden, weight, bias, target, g_logp, g_entropy, *, temperature, ignore_index,
                          chunk_size):  # fmt: skip
    def one(h, w, b, t, gl, gh):
        dh, dw, db = cpu.linear_logprobs_backward(
            h, w, t, present(gl), present(gh), linear_bias=present(b), temperature=float(temperature),
            ignore_index=int(ignore_index), chunk_size=int(chunk_size) or None,
        )  # fmt: skip
        return dh, dw, np.empty(0, dh.dtype) if db is None else db

    return _batched(2, one, 3, hidden, weight, bias, target, g_logp, g_entropy)


# -- logprobs: a custom_jvp over rows (N, C).


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _rows(x, t, cfg: _Config):
    """(logprob, lse) or (logprob, lse, entropy) of (N, C) rows."""
    rows = jax.ShapeDtypeStruct(x.shape[:-1], x.dtype)
    return _ffi.call(_ROWS, [rows] * (2 + cfg.entropy), x, t, **cfg.attrs())


@_rows.defjvp
def _rows_jvp(cfg, primals, tangents):
    (x, t), (dx, _) = primals, tangents
    out = _rows(x, t, cfg)
    logp, lse = out[0], out[1]
    counted = t != cfg.ignore_index
    z = x / cfg.temperature
    dz = dx / cfg.temperature
    safe = jnp.where(counted, t, 0)
    is_target = jnp.arange(x.shape[-1]) == safe[:, None]
    # p is 0 in ignored rows (their lse is 0: exp(z) could overflow, and a select keeps the
    # transposed rule free of 0 * inf).
    p = jnp.where(counted[:, None], jnp.exp(z - lse[:, None]), 0)
    dz_y = jnp.take_along_axis(dz, safe[:, None], axis=-1)[:, 0]
    # 1 - p_y as -expm1(logprob): past a margin of ~17 (float32) p_y rounds to 1, but the
    # target's derivative stays -(sum of the other probabilities), as in the kernels.
    others = jnp.sum(jnp.where(is_target, 0, p) * dz, axis=-1)
    tangent = [jnp.where(counted, -jnp.expm1(logp) * dz_y - others, 0), jnp.sum(p * dz, axis=-1)]
    if cfg.entropy:
        h = out[2]
        # z_c - lse + H: the target's z_y - lse is its logprob (exact where z_y - lse cancels);
        # where p_c is 0 (z_c = -inf included) the term is 0, and finite.
        logp_y = jnp.where(jnp.isfinite(logp), logp, 0)[:, None]
        shifted = jnp.where(is_target, logp_y, jnp.where(p > 0, z, lse[:, None]) - lse[:, None])
        tangent.append(-jnp.sum(p * (shifted + h[:, None]) * dz, axis=-1))
    return out, tuple(tangent)


def logprobs(logits, target, *, axis=-1, temperature=1.0, ignore_index=-100, return_entropy=True):
    """Each row's log-probability of its target under softmax(logits / T), and the entropy.

    Parameters
    ----------
    logits : array_like
        Scores; `axis` holds the classes. Integers and booleans become floating as in jax.nn;
        float16 and bfloat16 are computed in float32.
    target : array_like
        Integer class indices shaped like `logits` without `axis`.
    axis : int, default -1
        The class axis.
    temperature : float, default 1.0
        z = logits / temperature; finite and > 0.
    ignore_index : int, default -100
        Target whose rows get logprob 0 and entropy 0 (and zero gradients).
    return_entropy : bool, default True
        Also return the entropies (without them: the logprobs alone).

    Returns
    -------
    logprob : jax.Array
        ``z[target] - logsumexp(z)`` per row, shaped like `target`, in the logits' (promoted) dtype.
    entropy : jax.Array
        With `return_entropy`: ``-sum(p * log p)`` of p = softmax(z), per row, summed as
        ``sum(p * (lse - z))`` (no cancellation).

    Raises
    ------
    TypeError
        For a non-integer `target` (naming it) or complex logits.
    ValueError
        For shapes that do not fit or a bad `temperature` / `ignore_index`.
    jax.errors.JaxRuntimeError
        For a class index outside [0, C) that is not `ignore_index` (the message names it),
        when the computation runs.

    Notes
    -----
    One call of the ``normax_logprobs`` XLA FFI target (the CPU kernels of
    :func:`normax.logprobs`, one read of each row) gives the logprobs, entropies and each row's
    log-sum-exp. The op is a ``jax.custom_jvp`` whose tangents are jnp code of those outputs:
    ``jax.grad`` of either output (or both) is one fused pass over the logits, and ``jax.jvp``,
    ``jax.hessian``, ``jax.vmap`` and ``jax.jit`` work. No gradient flows to `target`.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> logp, entropy = nj.logprobs(jnp.zeros((2, 4)), jnp.array([0, 3]))
    >>> logp
    Array([-1.3862944, -1.3862944], dtype=float32)
    """
    fname = "normax.jax.logprobs"
    temperature, ignore_index = _options(temperature, ignore_index)
    logits = jnp.asarray(logits)
    target = jnp.asarray(target)
    if jnp.issubdtype(logits.dtype, jnp.complexfloating):
        raise TypeError(f"{fname}: complex logits ({logits.dtype}) are not supported")
    if not jnp.issubdtype(target.dtype, jnp.integer) or target.dtype == jnp.bool_:
        raise TypeError(f"{fname}: target must be integer class indices, got {target.dtype}")
    if logits.ndim == 0:
        raise ValueError(f"{fname}: logits must have a class axis")
    (ax,) = neg_axes(axis, logits.ndim, fname)
    x = jnp.moveaxis(logits, ax, -1)
    if target.shape != x.shape[:-1]:
        raise ValueError(
            f"{fname}: target has shape {target.shape}; expected {x.shape[:-1]} (logits without axis {axis})"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"{fname}: the class axis of logits is empty")
    out_dtype = inexact_dtype(logits.dtype)
    work = jnp.float32 if jnp.finfo(out_dtype).bits < 32 else out_dtype
    t = target.reshape(-1)
    t = t if t.dtype in (jnp.int32, jnp.int64) else t.astype(_ids_dtype(t.dtype))
    cfg = _Config(temperature, ignore_index, bool(return_entropy))
    out = _rows(x.astype(work).reshape(-1, x.shape[-1]), t, cfg)
    logp = out[0].reshape(target.shape).astype(out_dtype)
    if not return_entropy:
        return logp
    return logp, out[2].reshape(target.shape).astype(out_dtype)


def _ids_dtype(dtype):
    """int32, or int64 (where x64 allows it) for unsigned 32-bit ids and wider."""
    wide = jnp.dtype(dtype).itemsize >= 4
    return jax.dtypes.canonicalize_dtype(jnp.int64) if wide else jnp.int32


# -- linear_logprobs: a custom_vjp over the two linear targets.


def _linear_attrs(cfg: _Config, chunk: int) -> dict:
    return {
        "temperature": np.float64(cfg.temperature),
        "ignore_index": np.int64(cfg.ignore_index),
        "chunk_size": np.int64(chunk),
    }


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _linear(h, w, b, t, cfg: _Config, chunk: int):
    """(logprob,) or (logprob, entropy) of (N, H) hidden states."""
    results = [spec((h.shape[0],), h.dtype)] * (1 + cfg.entropy)
    return _ffi.call(_LINEAR, results, h, w, b, t, **_linear_attrs(cfg, chunk), with_entropy=cfg.entropy)


def _linear_fwd(h, w, b, t, cfg, chunk):
    # symbolic_zeros=True: the primals come as CustomVJPPrimal (value, perturbed).
    h, w, b, t = (a.value for a in (h, w, b, t))
    return _linear(h, w, b, t, cfg, chunk), (h, w, b, t)


def _linear_bwd(cfg, chunk, res, g):
    h, w, b, t = res
    # A cotangent JAX knows to be zero (an output the objective does not use) reaches the kernel
    # as the absent (0,): it skips that output's terms.
    g_logp, g_entropy = (*g, None)[:2] if cfg.entropy else (g[0], None)
    absent = jnp.zeros((0,), h.dtype)
    operands = [absent if _is_zero(c) else c.astype(h.dtype) for c in (g_logp, g_entropy)]
    results = [spec(h.shape, h.dtype), spec(w.shape, h.dtype), spec(b.shape, h.dtype)]
    dh, dw, db = _ffi.call(_LINEAR_BACKWARD, results, h, w, b, t, *operands, **_linear_attrs(cfg, chunk))
    return dh, dw, db, None


def _is_zero(c) -> bool:
    return c is None or isinstance(c, jax.custom_derivatives.SymbolicZero)


_linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


def linear_logprobs(
    hidden,
    linear_weight,
    target,
    *,
    linear_bias=None,
    temperature=1.0,
    ignore_index=-100,
    chunk_size=None,
    return_entropy=True,
):
    """:func:`logprobs` of the logits ``hidden @ linear_weight.T + linear_bias`` without forming them.

    Parameters
    ----------
    hidden : array_like
        (..., H) hidden states (the LM head's input).
    linear_weight : array_like
        (V, H) LM head weight (torch's layout).
    target : array_like
        Integer class indices shaped like `hidden` without its last axis.
    linear_bias : array_like, optional
        (V,) bias of the logits (divided by `temperature` with them).
    temperature, ignore_index, return_entropy
        As in :func:`logprobs`.
    chunk_size : int, optional
        Most logits held at once, in elements; None lets the kernels choose (as
        :func:`normax.jax.linear_cross_entropy`).

    Returns
    -------
    logprob : jax.Array
        Per row, shaped like `target`, in the promoted dtype of `hidden`, `linear_weight` and
        `linear_bias` (float16 and bfloat16 are computed in float32).
    entropy : jax.Array
        With `return_entropy`, per row.

    Raises
    ------
    ValueError, TypeError
        For shapes that do not fit, or options as in :func:`logprobs`.
    jax.errors.JaxRuntimeError
        For a class index outside [0, V) other than `ignore_index`, when the computation runs.

    Notes
    -----
    The forward is one pass over blocks of the logits (GEMM, then an online max, sum of
    exponentials and entropy term per row); the backward recomputes each block once and applies
    ``g_logp * (onehot - p) - g_H * p * (z - lse + H)`` (times 1/T), accumulating the gradients of
    `hidden`, `linear_weight` and `linear_bias`. Both outputs are differentiable; an output the
    objective does not use costs nothing in the backward. A ``jax.custom_vjp``: reverse mode
    (``jax.grad``, ``jax.vjp``) only, since a tangent rule would need the (N, V) logits. Under
    ``jax.vmap`` the batch reaches the kernels as leading dimensions, one element at a time.

    Examples
    --------
    >>> import jax.numpy as jnp, normax.jax as nj
    >>> logp, entropy = nj.linear_logprobs(jnp.eye(2), jnp.zeros((3, 2)), jnp.array([0, 2]))
    >>> entropy
    Array([1.0986123, 1.0986123], dtype=float32)
    """
    fname = "normax.jax.linear_logprobs"
    temperature, ignore_index = _options(temperature, ignore_index)
    chunk = check_chunk_size(chunk_size) or 0
    target = jnp.asarray(target)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(f"{fname}: target must be integer class indices, got {target.dtype}")
    if target.shape != jnp.shape(hidden)[:-1]:
        raise ValueError(
            f"{fname}: target has shape {target.shape}; expected {jnp.shape(hidden)[:-1]} (hidden without "
            "its last axis)"
        )
    h, w, b, t, dtype = linear_inputs(hidden, linear_weight, linear_bias, target, fname, "linear_weight", "linear_bias")
    cfg = _Config(temperature, ignore_index, bool(return_entropy))
    out = _linear(h, w, b, t, cfg, chunk)
    rows = jnp.shape(hidden)[:-1]
    logp = out[0].reshape(rows).astype(dtype)
    if not return_entropy:
        return logp
    return logp, out[1].reshape(rows).astype(dtype)
