"""Pieces the framework adapters (``normax.torch``, ``normax.jax``) share.

The adapters run the NumPy-first functions on NumPy views of their framework's CPU buffers. What
they share beyond that is the PowerNorm round trip: a framework keeps the layer's buffers itself
(torch module buffers, a JAX state pytree) and between the forward and the backward only arrays can
travel (custom-op outputs, ``custom_vjp`` residuals), so the backward rebuilds the
:class:`normax.PowerNormSaved` the NumPy backward takes from those arrays.
"""

from __future__ import annotations

import numpy as np

from ._arrays import as_input
from ._norms import PowerNormSaved, PowerNormState


def power_norm_state(
    running_phi, ema_gz, iters, *, eps, alpha_fwd, alpha_bkw, warmup_iters, group_num
) -> PowerNormState:
    """A PowerNormState over the given buffers (float arrays of shape (C,), used in place)."""
    state = PowerNormState(
        running_phi.shape[0],
        eps=eps,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        group_num=group_num,
    )
    state.running_phi = running_phi
    state.ema_gz = ema_gz
    state.iters = int(iters)
    return state


def power_norm_saved(x, weight, has_bias, zscale, dscale, *, training, eps, group_num) -> PowerNormSaved:
    """The PowerNormSaved of a forward on `x` that returned (zscale, dscale) (float64, shape (C,))."""
    a, result_dtype = as_input(x)
    c = a.shape[-1]
    w = None
    if weight is not None:
        w = np.ascontiguousarray(np.asarray(weight).astype(a.dtype, copy=False)).reshape(-1)
    return PowerNormSaved(
        x=np.ascontiguousarray(a).reshape(-1, c),
        shape=a.shape,
        dtype=result_dtype,
        weight=w,
        has_bias=bool(has_bias),
        zscale=np.asarray(zscale, np.float64),
        dscale=np.asarray(dscale, np.float64),
        training=bool(training),
        eps=float(eps),
        group_num=int(group_num),
    )
