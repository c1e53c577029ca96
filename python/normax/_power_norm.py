"""PowerNorm (Shen et al. 2020): its state, its saved record, the state's update and the NumPy-first ops.

PowerNorm is the one stateful op. Every backend runs its own passes over the tokens, and all of
them share the O(C) bookkeeping here (:func:`forward_statistics`, on the host's float64 buffers
of :class:`PowerNormState`), so the running statistics are updated by one piece of code.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._arrays import as_input, finish
from ._options import check_eps, count, param


class PowerNormState:
    """The settings and running buffers of one PowerNorm layer (Shen et al. 2020, MaskPowerNorm).

    PowerNorm is stateful: a training forward updates the running second moment ``running_phi``
    and counts ``iters``; a training backward updates ``ema_gz``. Those buffers (float64, shape
    ``(num_features,)``), the iteration count and the layer's settings live here; the learnable
    ``weight`` and ``bias`` stay with the caller, as parameters of the op. One state per layer.

    Parameters
    ----------
    num_features : int
        C, the channel count (the last axis of the input).
    eps : float, default 1e-5
        Added to every second moment (group scaling, batch and running statistics).
    alpha_fwd : float, default 0.9
        Decay of ``running_phi``.
    alpha_bkw : float, default 0.9
        Decay in the approximate backward: ``g_hat = g - (1 - alpha_bkw) * ema_gz * z``.
    warmup_iters : int, default 10000
        Up to this iteration the forward normalizes by the batch statistics and ``running_phi`` is
        also averaged over the iterations so far; afterwards it normalizes by ``running_phi``.
    group_num : int, default 1
        Channel groups of the group scaling; must divide `num_features`.

    Attributes
    ----------
    running_phi : ndarray
        Running second moment per channel, initially ones.
    ema_gz : ndarray
        Running mean of ``g_hat * z`` per channel, initially zeros.
    iters : int
        Training forward calls so far.

    Raises
    ------
    ValueError
        For a non-positive `num_features`, a `group_num` that does not divide it, an alpha outside
        [0, 1], a negative `warmup_iters` or `eps`.

    Examples
    --------
    >>> import normax
    >>> state = normax.PowerNormState(8, warmup_iters=100, group_num=2)
    >>> state.iters, state.running_phi.shape
    (0, (8,))
    """

    def __init__(
        self, num_features, *, eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.9, warmup_iters=10000, group_num=1
    ):
        c = count(num_features, "num_features", 1)
        g = count(group_num, "group_num", 1)
        if c % g:
            raise ValueError(f"group_num: {g} does not divide num_features {c}")
        for value, name in ((alpha_fwd, "alpha_fwd"), (alpha_bkw, "alpha_bkw")):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value!r}")
        self.num_features = c
        self.group_num = g
        self.eps = check_eps(eps)
        self.alpha_fwd = float(alpha_fwd)
        self.alpha_bkw = float(alpha_bkw)
        self.warmup_iters = count(warmup_iters, "warmup_iters", 0)
        self.running_phi = np.ones(c)
        self.ema_gz = np.zeros(c)
        self.iters = 0

    def copy(self) -> PowerNormState:
        """An independent copy (buffers copied)."""
        new = PowerNormState.__new__(PowerNormState)
        new.__dict__.update(self.__dict__)
        new.running_phi = self.running_phi.copy()
        new.ema_gz = self.ema_gz.copy()
        return new

    def __repr__(self) -> str:
        return (
            f"PowerNormState(num_features={self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
            f"alpha_bkw={self.alpha_bkw}, warmup_iters={self.warmup_iters}, group_num={self.group_num}; "
            f"iters={self.iters})"
        )


class PowerNormSaved:
    """What :func:`power_norm_backward` needs from one :func:`power_norm` call.

    Returned by ``power_norm(..., return_saved=True)``. It holds the forward's input (the array
    itself, not a copy: do not modify it before the backward), the weight, and per channel the
    factor z was formed with and the batch factor 1/sqrt(var + eps) (float64 arrays ``zscale``,
    ``dscale``). The group scaling is recomputed from the input in the backward.
    """

    __slots__ = (
        "dscale",
        "dtype",
        "eps",
        "group_num",
        "has_bias",
        "shape",
        "training",
        "weight",
        "x",
        "zscale",
    )

    def __init__(self, **fields):
        for k, v in fields.items():
            setattr(self, k, v)


def pad_mask_transposed(mask_shape: tuple, is_bool: bool, dtype_name: str, shape: tuple) -> bool:
    """Checks a pad_mask against `x`'s shape; True when it is (B, T) for (T, B, C) input (the
    kernels' token order is t * B + b, so such a mask is read transposed)."""
    if not is_bool:
        raise TypeError(f"pad_mask: expected a boolean array (True = padding), got dtype {dtype_name}")
    if len(shape) == 3:
        t, b = shape[0], shape[1]
        if mask_shape != (b, t):
            raise ValueError(f"pad_mask: shape {mask_shape} is not (B, T) = {(b, t)} for x of shape {shape}")
        return True
    n = shape[0]
    if mask_shape not in ((n, 1), (n,)):
        raise ValueError(f"pad_mask: shape {mask_shape} is not (N, 1) = {(n, 1)} for x of shape {shape}")
    return False


def check_x_shape(shape: tuple, state: PowerNormState) -> None:
    c = state.num_features
    if len(shape) not in (2, 3) or shape[-1] != c:
        raise ValueError(f"x: shape {shape} is not (T, B, C) or (N, C) with C = num_features = {c}")


def check_types(saved, state) -> None:
    """The types of the backward's `saved` and `state` (and of the forward's `state`, saved=None)."""
    if saved is not None and not isinstance(saved, PowerNormSaved):
        raise TypeError(f"saved: expected a normax.PowerNormSaved, got {type(saved).__name__}")
    if not isinstance(state, PowerNormState):
        raise TypeError(f"state: expected a normax.PowerNormState, got {type(state).__name__}")


def forward_statistics(state: PowerNormState, training: bool, tokens: int, passes):
    """Runs a forward's token passes and then updates `state`; returns (zscale, dscale).

    `passes(zscale, stats)` is the backend's: with `stats` it returns the per-channel sums of
    u**2 over the non-padded tokens (float64, on the host), and with a `zscale` (float64, (C,)) it
    writes ``y = u * weight * zscale + bias``. `tokens` is the count of non-padded tokens. The
    state changes only after the passes have run, so a failing kernel leaves it as it was.
    """
    eps = state.eps
    if not training:
        zscale = 1.0 / np.sqrt(state.running_phi + eps)
        passes(zscale, False)
        return zscale, zscale
    it = state.iters + 1
    with np.errstate(invalid="ignore", divide="ignore"):  # no tokens: NaN, as the reference
        if it <= state.warmup_iters:
            var = passes(None, True) / tokens
            zscale = 1.0 / np.sqrt(var + eps)
            passes(zscale, False)
        else:
            zscale = 1.0 / np.sqrt(state.running_phi + eps)
            var = passes(zscale, True) / tokens
    phi = state.running_phi
    if it < state.warmup_iters:
        phi = phi * (it - 1) / it + var / it
    state.running_phi[...] = state.alpha_fwd * phi + (1.0 - state.alpha_fwd) * var
    state.iters = it
    return zscale, 1.0 / np.sqrt(var + eps)


def backward_ema(state: PowerNormState, training: bool, dtype):
    """The backward's ``(1 - alpha_bkw) * ema_gz`` (zeros in evaluation), in `dtype`."""
    c = state.num_features
    return ((1.0 - state.alpha_bkw) * state.ema_gz if training else np.zeros(c)).astype(dtype)


def update_ema(state: PowerNormState, gz_sums: np.ndarray, tokens: int) -> None:
    """A training backward's update of ``ema_gz`` from the per-channel sums of g_hat * z."""
    if tokens:
        state.ema_gz += gz_sums / tokens


def power_norm(x, weight, bias, state, *, training=True, pad_mask=None, return_saved=False):
    """PowerNorm forward (Shen et al. 2020), as MaskPowerNorm of the paper's official code.

    Parameters
    ----------
    x : array_like
        Shape (T, B, C) or (N, C), channels last, ``C = state.num_features``. dtype rules as in
        :func:`rms_norm` (float16 computed in float32).
    weight, bias : array_like or None
        Shape (C,); None means ones and zeros (and no gradient for it).
    state : PowerNormState
        The layer's settings and buffers; a training call updates it (see Notes).
    training : bool, default True
        Training (batch statistics, state updated) or evaluation (running statistics, no change).
    pad_mask : array_like of bool, optional
        Shape (B, T) for (T, B, C) input, (N, 1) or (N,) for (N, C) input; True marks padding,
        which is left out of the batch statistics (its outputs are still computed).
    return_saved : bool, default False
        Also return a :class:`PowerNormSaved` for :func:`power_norm_backward`.

    Returns
    -------
    y : ndarray
        Shaped like `x`, in its dtype.
    saved : PowerNormSaved
        Only with ``return_saved=True``.

    Raises
    ------
    ValueError
        If `x` is not (T, B, C) or (N, C) with C = ``state.num_features``, `weight`/`bias` are not
        (C,), or `pad_mask` has the wrong shape.
    TypeError
        If `state` is not a :class:`PowerNormState`, `pad_mask` is not boolean, or for
        unsupported dtypes.

    Notes
    -----
    1. Group scaling: each token's channels are split into ``group_num`` groups, each divided by
       ``sqrt(mean(x**2 over the group) + eps)``, giving u.
    2. Training: ``iters += 1``; ``var = mean of u**2 over the non-padded tokens`` per channel;
       ``z = u / sqrt(var + eps)`` while ``iters <= warmup_iters``, else
       ``z = u / sqrt(running_phi + eps)``; then, while ``iters < warmup_iters``,
       ``running_phi = running_phi * (iters - 1) / iters + var / iters``, and always
       ``running_phi = alpha_fwd * running_phi + (1 - alpha_fwd) * var``.
       Evaluation: ``z = u / sqrt(running_phi + eps)``, no state change.
    3. ``y = weight * z + bias`` for every token, padded ones too.

    The passes over the tokens run in Rust (group scaling fused with the channel sums of u**2,
    which are reduced deterministically, and with the output once the scale is known: after
    warmup and in evaluation a single read of x); the O(C) bookkeeping is NumPy on float64 buffers.
    If every token is padded the batch variance is NaN, as in the reference.

    Examples
    --------
    >>> import numpy as np, normax
    >>> state = normax.PowerNormState(4, warmup_iters=10)
    >>> x = np.arange(24.0).reshape(3, 2, 4)
    >>> y, saved = normax.power_norm(x, np.ones(4), np.zeros(4), state, return_saved=True)
    >>> y.shape, state.iters
    ((3, 2, 4), 1)
    >>> dx, dw, db = normax.power_norm_backward(np.ones_like(y), saved, state)
    >>> db
    array([6., 6., 6., 6.])
    """
    check_types(None, state)
    a, result_dtype = as_input(x)
    c = state.num_features
    check_x_shape(a.shape, state)
    w = param(weight, "weight", (c,), a.dtype)
    b = param(bias, "bias", (c,), a.dtype)
    pad = None
    if pad_mask is not None:
        m = np.asarray(pad_mask)
        transposed = pad_mask_transposed(m.shape, m.dtype == np.bool_, m.dtype, a.shape)
        pad = np.ascontiguousarray(m.T if transposed else m).reshape(-1)
    work = np.ascontiguousarray(a).reshape(-1, c)
    tokens = work.shape[0]
    w64 = np.ones(c) if w is None else w.astype(np.float64)
    shift = np.zeros(c, a.dtype) if b is None else b
    y = np.empty_like(work)

    options = _core.PowerNormOptions(c, state.group_num, state.eps)

    def passes(zscale, stats):
        sumsq = np.empty(c) if stats else None
        out = None if zscale is None else ((w64 * zscale).astype(a.dtype), shift, y)
        _core.power_norm_forward(options, work, pad if stats else None, sumsq, out)
        return sumsq

    kept = tokens - (int(np.count_nonzero(pad)) if pad is not None else 0)
    zscale, dscale = forward_statistics(state, training, kept, passes)
    y = finish(y.reshape(a.shape), result_dtype, None)
    if not return_saved:
        return y
    saved = PowerNormSaved(
        x=work,
        shape=a.shape,
        dtype=result_dtype,
        weight=w,
        has_bias=b is not None,
        zscale=zscale,
        dscale=dscale,
        training=bool(training),
        eps=state.eps,
        group_num=state.group_num,
    )
    return y, saved


def power_norm_backward(dy, saved, state):
    """PowerNorm backward: the paper's approximate gradient in training, the exact one in evaluation.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to the forward's output; shaped like it.
    saved : PowerNormSaved
        From ``power_norm(..., return_saved=True)``.
    state : PowerNormState
        The same state as the forward; a training backward updates ``state.ema_gz`` (so call it
        once per forward).

    Returns
    -------
    dx : ndarray
        Shaped like the forward's `x`, in the promoted dtype of `x` and `dy`.
    dweight : ndarray or None
        ``sum(dy * z)`` over all tokens; None if the forward's weight was None.
    dbias : ndarray or None
        ``sum(dy)`` over all tokens; None if the forward's bias was None.

    Raises
    ------
    ValueError
        If `dy` is not shaped like the forward's input.
    TypeError
        If `saved` or `state` has the wrong type.

    Notes
    -----
    Training (MaskPowerNorm's PowerFunction.backward): ``g = dy * weight``,
    ``g_hat = g - (1 - alpha_bkw) * ema_gz * z``, then ``ema_gz += mean(g_hat * z)`` over all
    tokens (padded ones included), ``du = g_hat / sqrt(var + eps)`` with the batch variance (also
    after warmup), and du goes back through the group scaling exactly:
    ``dx = s * (du - u * mean(du * u over the group))`` with s the group's scale.
    Evaluation: the exact gradient of the evaluation forward, ``du = g / sqrt(running_phi + eps)``,
    no state change. One Rust pass over (dy, x) writes dx and reduces the three per-channel sums
    deterministically.
    """
    check_types(saved, state)
    dya, dy_dtype = as_input(dy, "dy")
    if dya.shape != saved.shape:
        raise ValueError(f"dy: shape {dya.shape} does not match the forward's x shape {saved.shape}")
    work = saved.x
    tokens, c = work.shape
    if c != state.num_features:
        raise ValueError(f"state: num_features {state.num_features} does not match the forward's {c}")
    dyw = np.ascontiguousarray(dya, dtype=work.dtype).reshape(work.shape)
    dx = np.empty_like(work)
    sums = np.empty(3 * c)
    options = _core.PowerNormOptions(c, saved.group_num, saved.eps)
    factors = (
        saved.zscale.astype(work.dtype),
        backward_ema(state, saved.training, work.dtype),
        saved.dscale.astype(work.dtype),
    )
    _core.power_norm_backward(options, dyw, work, saved.weight, factors, dx, sums)
    if saved.training:
        update_ema(state, sums[:c], tokens)
    result_dtype = np.result_type(saved.dtype, dy_dtype)
    dx = finish(dx.reshape(saved.shape), result_dtype, None)
    dweight = None if saved.weight is None else finish(sums[c : 2 * c], result_dtype, None)
    dbias = finish(sums[2 * c :], result_dtype, None) if saved.has_bias else None
    return dx, dweight, dbias


# The adapters (normax.torch, normax.jax) keep a layer's buffers themselves (torch module buffers, a
# JAX state pytree), and between a forward and its backward only arrays travel (custom-op outputs,
# custom_vjp residuals): these rebuild the state and the saved record from those arrays.


def _state_over(running_phi, ema_gz, iters, **settings) -> PowerNormState:
    state = PowerNormState(running_phi.shape[0], **settings)
    state.running_phi = running_phi
    state.ema_gz = ema_gz
    state.iters = int(iters)
    return state


def forward_state(running_phi, iters, *, eps, alpha_fwd, alpha_bkw, warmup_iters, group_num) -> PowerNormState:
    """The state a framework's forward runs on: over its float64 `running_phi` buffer (updated in
    place) at step `iters`; ema_gz is not read by a forward."""
    return _state_over(
        running_phi,
        np.zeros(running_phi.shape[0]),
        iters,
        eps=eps,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        group_num=group_num,
    )


def backward_state(ema_gz, *, eps, alpha_bkw, group_num) -> PowerNormState:
    """The state a framework's backward runs on: over its float64 `ema_gz` buffer, the only one a
    backward updates (in place)."""
    return _state_over(
        np.ones_like(ema_gz),
        ema_gz,
        0,
        eps=eps,
        alpha_fwd=0.0,
        alpha_bkw=alpha_bkw,
        warmup_iters=0,
        group_num=group_num,
    )


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
