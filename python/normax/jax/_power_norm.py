"""PowerNorm as a pure function of explicit state (:class:`PowerNormState`), over callbacks into
:mod:`normax._power_norm`."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _power_norm as cpu
from ._callback import bind, call, floating, spec


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _power_norm_vjp(x, weight, bias, ema_gz, running_phi, iters, pad_mask, opts):
    return _power_norm_forward(x, weight, bias, running_phi, iters, pad_mask, opts)[:3]


def _scale_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _power_norm_fwd_impl(a, w, b, phi, it, pad=None, *, opts):
    training, eps, alpha_fwd, alpha_bkw, warmup_iters, group_num = opts
    state = cpu.forward_state(
        np.array(phi, np.float64),
        int(it),
        eps=eps,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        group_num=group_num,
    )
    y, saved = cpu.power_norm(a, w, b, state, training=training, pad_mask=pad, return_saved=True)
    return y, state.running_phi, np.asarray(state.iters), saved.zscale, saved.dscale


def _power_norm_bwd_impl(g, a, w, ema, zs, ds, *, opts):
    training, eps, _, alpha_bkw, _, group_num = opts
    before = np.array(ema, np.float64)
    state = cpu.backward_state(before.copy(), eps=eps, alpha_bkw=alpha_bkw, group_num=group_num)
    saved = cpu.power_norm_saved(a, w, True, zs, ds, training=training, eps=eps, group_num=group_num)
    dx, dw, db = cpu.power_norm_backward(g, saved, state)
    return dx, dw, db, state.ema_gz - before


def _power_norm_forward(x, weight, bias, running_phi, iters, pad_mask, opts):
    c = x.shape[-1]
    sd = _scale_dtype()
    specs = [
        spec(x.shape, x.dtype),
        spec(running_phi.shape, running_phi.dtype),
        spec(iters.shape, iters.dtype),
        spec((c,), sd),
        spec((c,), sd),
    ]
    args = (x, weight, bias, running_phi, iters, pad_mask)
    ndims = (x.ndim, 1, 1, 1, 0, None if pad_mask is None else pad_mask.ndim)
    # Batch statistics: a vmapped call is one PowerNorm call per batch element.
    return call(bind(_power_norm_fwd_impl, opts=opts), specs, args, ndims, None, vmap_method="sequential")


def _power_norm_fwd(x, weight, bias, ema_gz, running_phi, iters, pad_mask, opts):
    y, phi, it, zscale, dscale = _power_norm_forward(x, weight, bias, running_phi, iters, pad_mask, opts)
    return (y, phi, it), (x, weight, ema_gz, zscale, dscale)


def _power_norm_bwd(opts, saved, cts):
    x, weight, ema_gz, zscale, dscale = saved
    specs = [
        spec(x.shape, x.dtype),
        spec(weight.shape, weight.dtype),
        spec(weight.shape, weight.dtype),
        spec(ema_gz.shape, ema_gz.dtype),
    ]
    args = (cts[0].astype(x.dtype), x, weight, ema_gz, zscale, dscale)
    impl = bind(_power_norm_bwd_impl, opts=opts)
    dx, dw, db, dema = call(impl, specs, args, (x.ndim, x.ndim, 1, 1, 1, 1), None, vmap_method="sequential")
    return dx, dw, db, dema, None, None, None


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
        (T, B, C) or (N, C), channels last.
    weight, bias : array_like
        (C,) affine parameters.
    state : PowerNormState
        From :func:`power_norm_init` or a previous call.
    training : bool, default True
        Batch statistics and a state update, or the running statistics.
    pad_mask : array_like of bool, optional
        (B, T) for (T, B, C) input ((N, 1) for (N, C)); True marks padding.
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
    The paper's backward updates ``ema_gz``. A pure function cannot, so the update comes out as
    the gradient with respect to ``state.ema_gz``: differentiate with respect to it too and add
    that gradient to the state::

        def loss_fn(params, ema_gz, state, x):
            y, new_state = nj.power_norm(x, params["w"], params["b"], state._replace(ema_gz=ema_gz))
            return jnp.sum(y**2), new_state

        (loss, new_state), (g, d_ema) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
            params, state.ema_gz, state, x)
        state = new_state._replace(ema_gz=state.ema_gz + d_ema)

    Under vmap each batch element is its own PowerNorm call (its own batch statistics and state).
    """
    fname = "normax.jax.power_norm"
    x = floating(x, fname)
    if x.ndim not in (2, 3):
        raise ValueError(f"{fname}: x must be (T, B, C) or (N, C), got shape {x.shape}")
    weight = jnp.asarray(weight).astype(x.dtype)
    bias = jnp.asarray(bias).astype(x.dtype)
    if pad_mask is not None:
        pad_mask = jnp.asarray(pad_mask).astype(bool)
    opts = (bool(training), float(eps), float(alpha_fwd), float(alpha_bkw), int(warmup_iters), int(group_num))
    y, phi, it = _power_norm_vjp(
        x, weight, bias, state.ema_gz, state.running_phi, jnp.asarray(state.iters), pad_mask, opts
    )
    return y, PowerNormState(phi, state.ema_gz, it)
