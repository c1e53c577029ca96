"""PowerNorm as a pure function of explicit state (:class:`PowerNormState`), on the
``normax_power_norm_forward`` / ``normax_power_norm_backward`` targets.

The targets are the token passes of :mod:`normax._power_norm` (the ``_core`` calls one-to-one);
the O(C) bookkeeping of the state is jnp code here, the same formulas as
:func:`normax._power_norm.forward_statistics`. PowerNorm stays a ``jax.custom_vjp``: its backward
is the paper's approximate gradient, which updates ``ema_gz`` — not the derivative of the
forward, so no tangent (``custom_jvp``) rule could give it, and the running statistics make the
forward itself stateful.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _core
from .. import _power_norm as cpu
from . import _ffi
from ._norms import inexact_dtypes

_FORWARD = "normax_power_norm_forward"
_BACKWARD = "normax_power_norm_backward"


class PowerNormState(NamedTuple):
    """A PowerNorm layer's buffers, as a pytree: ``running_phi`` and ``ema_gz`` (C,), ``iters`` ()."""

    running_phi: jax.Array
    ema_gz: jax.Array
    iters: jax.Array


def power_norm_init(num_features, dtype=jnp.float32) -> PowerNormState:
    """The initial state: running_phi ones, ema_gz zeros, iters 0 (as MaskPowerNorm's buffers)."""
    return PowerNormState(
        jnp.ones((num_features,), dtype), jnp.zeros((num_features,), dtype), jnp.zeros((), jnp.int32)
    )


@_ffi.host_impl(_FORWARD)
def _forward_host(x, pad, scale, shift, *, groups, eps, stats):
    """(T, C) tokens, (T,) bool pad mask or (0,), (C,) scale and shift or (0,) for no output ->
    (sumsq (C,) or (0,) without `stats`, y (T, C) or (0,))."""
    c = x.shape[-1]
    options = _core.PowerNormOptions(c, int(groups), float(eps))
    sumsq = np.empty(c) if stats else None
    y = np.empty_like(x) if scale.size else None
    out = None if y is None else (scale, shift, y)
    _core.power_norm_forward(options, x, pad if pad.size and stats else None, sumsq, out)
    absent = np.zeros(0, x.dtype)
    return (absent if sumsq is None else sumsq.astype(x.dtype)), (absent if y is None else y)


@_ffi.host_impl(_BACKWARD)
def _backward_host(dy, x, weight, zscale, ema, dscale, *, groups, eps):
    """(dx (T, C), sums (3C,): sum(g_hat * z), dweight, dbias per channel)."""
    c = x.shape[-1]
    options = _core.PowerNormOptions(c, int(groups), float(eps))
    dx = np.empty_like(x)
    sums = np.empty(3 * c)
    _core.power_norm_backward(
        options, dy, x, weight if weight.size else None, (zscale, ema, dscale), dx, sums
    )
    return dx, sums.astype(x.dtype)


def _passes(x, pad, scale, shift, opts, stats: bool):
    """One forward pass over the tokens: (sumsq or None, y or None)."""
    c = x.shape[-1]
    absent = jax.ShapeDtypeStruct((0,), x.dtype)
    results = [
        jax.ShapeDtypeStruct((c,), x.dtype) if stats else absent,
        absent if scale is None else jax.ShapeDtypeStruct(x.shape, x.dtype),
    ]
    if scale is None:
        scale = shift = jnp.zeros((0,), x.dtype)
    # Batch statistics reduce over every token: a vmapped call is one call per batch element.
    sumsq, y = _ffi.call(
        _FORWARD,
        results,
        x,
        pad,
        scale,
        shift,
        vmap_method="sequential",
        groups=np.int64(opts.group_num),
        eps=np.float64(opts.eps),
        stats=stats,
    )
    return (sumsq if stats else None), (None if scale.size == 0 else y)


class _Opts(NamedTuple):
    training: bool
    eps: float
    alpha_fwd: float
    alpha_bkw: float
    warmup_iters: int
    group_num: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _power_norm_vjp(x, weight, bias, ema_gz, running_phi, iters, pad, opts):
    return _forward(x, weight, bias, running_phi, iters, pad, opts)[:3]


def _forward(x, weight, bias, running_phi, iters, pad, opts: _Opts):
    """(y, new running_phi, new iters, zscale, dscale): normax._power_norm.forward_statistics in jnp."""
    work = x.dtype
    phi = running_phi.astype(work)
    eps = opts.eps
    if not opts.training:
        zscale = jax.lax.rsqrt(phi + eps)
        _, y = _passes(x, pad, weight * zscale, bias, opts, False)
        return y, running_phi, iters, zscale, zscale
    tokens = x.shape[0] - (jnp.sum(pad) if pad.size else 0)
    kept = jnp.asarray(tokens).astype(work)  # none kept: NaN statistics, as the reference
    it = iters + 1

    def warmup():
        # Batch statistics first, then the output scaled by them: two passes.
        sumsq, _ = _passes(x, pad, None, None, opts, True)
        _, y = _passes(x, pad, weight * jax.lax.rsqrt(sumsq / kept + eps), bias, opts, False)
        return y, sumsq

    def running():
        # Scaled by the running statistics: one pass writes y and sums the batch's.
        return _passes(x, pad, weight * jax.lax.rsqrt(phi + eps), bias, opts, True)[::-1]

    y, sumsq = jax.lax.cond(it <= opts.warmup_iters, warmup, running)
    var = sumsq / kept
    dscale = jax.lax.rsqrt(var + eps)
    zscale = jnp.where(it <= opts.warmup_iters, dscale, jax.lax.rsqrt(phi + eps))
    itf = it.astype(work)
    averaged = jnp.where(it < opts.warmup_iters, phi * (itf - 1) / itf + var / itf, phi)
    new_phi = opts.alpha_fwd * averaged + (1.0 - opts.alpha_fwd) * var
    return y, new_phi.astype(running_phi.dtype), it, zscale, dscale


def _power_norm_fwd(x, weight, bias, ema_gz, running_phi, iters, pad, opts):
    y, phi, it, zscale, dscale = _forward(x, weight, bias, running_phi, iters, pad, opts)
    return (y, phi, it), (x, weight, ema_gz, zscale, dscale)


def _power_norm_bwd(opts, saved, cts):
    x, weight, ema_gz, zscale, dscale = saved
    c = x.shape[-1]
    ema = ema_gz.astype(x.dtype)
    ema = (1.0 - opts.alpha_bkw) * ema if opts.training else jnp.zeros_like(ema)
    results = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((3 * c,), x.dtype)]
    dx, sums = _ffi.call(
        _BACKWARD,
        results,
        cts[0].astype(x.dtype),
        x,
        weight,
        zscale,
        ema,
        dscale,
        vmap_method="sequential",
        groups=np.int64(opts.group_num),
        eps=np.float64(opts.eps),
    )
    tokens = x.shape[0]
    # The training backward's update of ema_gz comes out as the gradient of state.ema_gz.
    dema = sums[:c] / tokens if opts.training and tokens else jnp.zeros((c,), x.dtype)
    return dx, sums[c : 2 * c], sums[2 * c :], dema.astype(ema_gz.dtype), None, None, None


_power_norm_vjp.defvjp(_power_norm_fwd, _power_norm_bwd)


def power_norm(
    x,
    weight,
    bias,
    state: PowerNormState,
    *,
    training=True,
    pad_mask=None,
    eps=1e-5,
    alpha_fwd=0.9,
    alpha_bkw=0.9,
    warmup_iters=10000,
    group_num=1,
):
    """PowerNorm (Shen et al. 2020, MaskPowerNorm) as a pure function of explicit state.

    Parameters
    ----------
    x : array_like
        (T, B, C) or (N, C), channels last. Integers and bool become floating as in jax.nn;
        float16 and bfloat16 are computed in float32.
    weight, bias : array_like
        (C,) affine parameters.
    state : PowerNormState
        From :func:`power_norm_init` or a previous call.
    training : bool, default True
        Batch statistics and a state update, or the running statistics.
    pad_mask : array_like of bool, optional
        (B, T) for (T, B, C) input ((N, 1) or (N,) for (N, C)); True marks padding.
    eps, alpha_fwd, alpha_bkw, warmup_iters, group_num
        As MaskPowerNorm's constructor (see :class:`normax.PowerNormState`).

    Returns
    -------
    y : jax.Array
        Shaped like `x`.
    new_state : PowerNormState
        With the forward's updates (``running_phi``, ``iters``); ``ema_gz`` unchanged.

    Notes
    -----
    The token passes are the ``normax_power_norm_forward`` / ``_backward`` XLA FFI targets
    (``jax.pure_callback`` of the NumPy implementation where jaxlib has no FFI); the state's
    O(C) update is jnp code in the input's compute dtype. During warmup the forward reads `x`
    twice (batch statistics, then the output), afterwards once.

    The paper's backward updates ``ema_gz``. A pure function cannot, so the update comes out as
    the gradient with respect to ``state.ema_gz``: differentiate with respect to it too and add
    that gradient to the state::

        def loss_fn(params, ema_gz, state, x):
            y, new_state = nj.power_norm(x, params["w"], params["b"], state._replace(ema_gz=ema_gz))
            return jnp.sum(y**2), new_state

        (loss, new_state), (g, d_ema) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
            params, state.ema_gz, state, x)
        state = new_state._replace(ema_gz=state.ema_gz + d_ema)

    That backward (approximate in training, with its state update) is not the derivative of the
    forward, so the op is a ``jax.custom_vjp``: reverse mode only (``jax.grad``), no ``jax.jvp``.
    Under vmap each batch element is its own PowerNorm call (its own batch statistics and state).
    """
    fname = "normax.jax.power_norm"
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        raise TypeError(f"{fname}: complex input ({x.dtype}) is not supported; normax's kernels are real")
    if x.ndim not in (2, 3):
        raise ValueError(f"{fname}: x must be (T, B, C) or (N, C), got shape {x.shape}")
    c = x.shape[-1]
    # Checks the settings (ValueError naming the bad one), as the NumPy API's state does.
    cpu.PowerNormState(
        c, eps=eps, alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw, warmup_iters=warmup_iters, group_num=group_num
    )
    out_dtype, work = inexact_dtypes(x.dtype)
    params = []
    for name, p in (("weight", weight), ("bias", bias)):
        p = jnp.asarray(p)
        if p.shape != (c,):
            raise ValueError(f"{fname}: {name} shape {p.shape} is not (C,) = ({c},)")
        params.append(p.astype(work))
    if pad_mask is None:
        pad = jnp.zeros((0,), bool)  # absent
    else:
        m = jnp.asarray(pad_mask)
        transposed = cpu.pad_mask_transposed(m.shape, m.dtype == jnp.bool_, m.dtype, x.shape)
        pad = (m.T if transposed else m).reshape(-1)
    opts = _Opts(
        bool(training), float(eps), float(alpha_fwd), float(alpha_bkw), int(warmup_iters), int(group_num)
    )
    tokens = x.astype(work).reshape(-1, c)
    y, phi, it = _power_norm_vjp(
        tokens, params[0], params[1], state.ema_gz, state.running_phi, jnp.asarray(state.iters), pad, opts
    )
    return y.reshape(x.shape).astype(out_dtype), PowerNormState(phi, state.ema_gz, it)
