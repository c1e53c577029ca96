"""PowerNorm: custom ops, fake kernels, autograd, CUDA kernels and the module (its public API).

Custom ops with autograd may not mutate their inputs, so the ops are functional: the forward
returns the updated running_phi and iters, the backward the increment of ema_gz; the module
writes them into its buffers. The state bookkeeping is the NumPy API's float64 host code on
every device (for CUDA tensors its buffers and factors travel to the host and back: a
synchronization per call).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _power_norm as cpu
from .._backends import cuda
from ._convert import check_float, host, host64, host_opt, to_tensor


@torch.library.custom_op("normax::power_norm", mutates_args=())
def _power_norm_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_phi: Tensor,
    ema_gz: Tensor,
    iters: Tensor,
    pad_mask: Tensor | None,
    training: bool,
    eps: float,
    alpha_fwd: float,
    alpha_bkw: float,
    warmup_iters: int,
    group_num: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # ema_gz and alpha_bkw are not used here: they travel to the backward through setup_context.
    phi = host(running_phi).astype(np.float64).reshape(-1)
    state = cpu.forward_state(
        phi,
        int(iters.reshape(-1)[0]),
        eps=eps,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        group_num=group_num,
    )
    y, saved = cpu.power_norm(
        host(x),
        host(weight),
        host(bias),
        state,
        training=training,
        pad_mask=host_opt(pad_mask),
        return_saved=True,
    )
    return (
        to_tensor(y, x.dtype),
        to_tensor(np.array(saved.zscale, np.float64), torch.float64),
        to_tensor(np.array(saved.dscale, np.float64), torch.float64),
        to_tensor(state.running_phi.reshape(running_phi.shape), running_phi.dtype),
        torch.full_like(iters, state.iters),
    )


@_power_norm_op.register_fake
def _power_norm_fake(
    x, weight, bias, running_phi, ema_gz, iters, pad_mask, training, eps, alpha_fwd, alpha_bkw,
    warmup_iters, group_num,
):  # fmt: skip
    c = x.shape[-1]
    return (
        x.new_empty(x.shape),
        x.new_empty((c,), dtype=torch.float64),
        x.new_empty((c,), dtype=torch.float64),
        running_phi.new_empty(running_phi.shape),
        iters.new_empty(iters.shape),
    )


@torch.library.custom_op("normax::power_norm_backward", mutates_args=())
def _power_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    zscale: Tensor,
    dscale: Tensor,
    ema_gz: Tensor,
    training: bool,
    eps: float,
    alpha_bkw: float,
    group_num: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    before = host(ema_gz).astype(np.float64).reshape(-1)
    state = cpu.backward_state(before.copy(), eps=eps, alpha_bkw=alpha_bkw, group_num=group_num)
    saved = cpu.power_norm_saved(
        host(x),
        host(weight),
        True,
        host(zscale),
        host(dscale),
        training=training,
        eps=eps,
        group_num=group_num,
    )
    dx, dw, db = cpu.power_norm_backward(host(dy), saved, state)
    delta = (state.ema_gz - before).reshape(ema_gz.shape)
    return (
        to_tensor(dx, x.dtype),
        to_tensor(dw, weight.dtype),
        to_tensor(db, weight.dtype),
        to_tensor(delta, ema_gz.dtype),
    )


@_power_norm_backward_op.register_fake
def _power_norm_backward_fake(dy, x, weight, zscale, dscale, ema_gz, training, eps, alpha_bkw, group_num):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape),
        ema_gz.new_empty(ema_gz.shape),
    )


def _power_norm_setup(ctx, inputs, output) -> None:
    x, weight, _, _, ema_gz = inputs[:5]
    ctx.training, ctx.eps, ctx.alpha_bkw, ctx.group_num = inputs[7], inputs[8], inputs[10], inputs[12]
    # The backward adds to the live ema_gz buffer (as MaskPowerNorm's does), so it is held, not
    # saved: a saved tensor would refuse a later backward once an earlier one had changed it.
    ctx.ema_gz = ema_gz
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, weight, output[1], output[2])


def _power_norm_grad(ctx, dy, *_):
    x, weight, zscale, dscale = ctx.saved_tensors
    dx, dw, db, delta = _power_norm_backward_op(
        dy, x, weight, zscale, dscale, ctx.ema_gz, ctx.training, ctx.eps, ctx.alpha_bkw, ctx.group_num
    )
    with torch.no_grad():
        ctx.ema_gz.add_(delta)
    return (dx, dw, db) + (None,) * 10


_power_norm_op.register_autograd(_power_norm_grad, setup_context=_power_norm_setup)


@_power_norm_op.register_kernel("cuda")
def _power_norm_cuda(
    x, weight, bias, running_phi, ema_gz, iters, pad_mask, training, eps, alpha_fwd, alpha_bkw,
    warmup_iters, group_num,
):  # fmt: skip
    state = cpu.forward_state(
        host64(running_phi),
        int(iters.reshape(-1)[0]),
        eps=eps,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        group_num=group_num,
    )
    y, saved = cuda.power_norm(
        x, weight, bias, state, training=training, pad_mask=pad_mask, return_saved=True
    )
    f64 = torch.float64
    return (
        y,
        torch.tensor(saved.zscale, dtype=f64, device=x.device),
        torch.tensor(saved.dscale, dtype=f64, device=x.device),
        torch.tensor(state.running_phi, dtype=running_phi.dtype, device=running_phi.device).reshape(
            running_phi.shape
        ),
        torch.full_like(iters, state.iters),
    )


@_power_norm_backward_op.register_kernel("cuda")
def _power_norm_backward_cuda(dy, x, weight, zscale, dscale, ema_gz, training, eps, alpha_bkw, group_num):
    before = host64(ema_gz)
    state = cpu.backward_state(before.copy(), eps=eps, alpha_bkw=alpha_bkw, group_num=group_num)
    saved = cuda.power_norm_saved(
        x, weight, True, host64(zscale), host64(dscale), training=training, eps=eps, group_num=group_num
    )
    dx, dw, db = cuda.power_norm_backward_as(dy, saved, state, weight.dtype)
    delta = torch.tensor(state.ema_gz - before, dtype=ema_gz.dtype, device=ema_gz.device).reshape(
        ema_gz.shape
    )
    return dx.to(x.dtype), dw.to(weight.dtype), db.to(weight.dtype), delta


class PowerNorm(torch.nn.Module):
    """PowerNorm (Shen et al. 2020) with MaskPowerNorm's constructor, buffers and forward.

    A drop-in for ``MaskPowerNorm`` of the paper's code (sIncerass/powernorm): the same
    constructor, parameters ``weight``/``bias`` and buffers ``running_phi`` (1, C, 1, 1),
    ``ema_gz`` (1, C, 1, 1) and ``iters`` (1,) int64, so its checkpoints load either way. The
    forward and the paper's approximate backward are normax kernels (see
    :func:`normax.power_norm`).

    Parameters
    ----------
    num_features : int
        C, the channel count (the last dimension of the input).
    eps : float, default 1e-5
        Added to every second moment. (MaskPowerNorm's group scaling always uses 1e-5; here it
        uses `eps` too, the same with the default.)
    alpha_fwd, alpha_bkw : float, default 0.9
        Decays of ``running_phi`` and of ``ema_gz`` in the approximate backward.
    affine : bool, default True
        Stored only: like MaskPowerNorm, the layer always has ``weight`` and ``bias``.
    warmup_iters : int, default 10000
        Training steps that normalize by the batch statistics.
    group_num : int, default 1
        Channel groups of the group scaling.

    Notes
    -----
    ``forward(input, pad_mask=None)``: input (T, B, C) or (N, C); pad_mask (B, T) (or (N, 1)),
    True marking padding, which is left out of the batch statistics. A training forward updates
    ``running_phi`` and ``iters``; its backward updates ``ema_gz`` (once per backward, as the
    paper's code). Evaluation uses ``running_phi``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        affine: bool = True,
        warmup_iters: int = 10000,
        group_num: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        cpu.PowerNormState(
            num_features,
            eps=eps,
            alpha_fwd=alpha_fwd,
            alpha_bkw=alpha_bkw,
            warmup_iters=warmup_iters,
            group_num=group_num,
        )  # validates the settings with the NumPy API's messages
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.alpha_fwd = alpha_fwd
        self.alpha_bkw = alpha_bkw
        self.affine = affine
        self.warmup_iters = warmup_iters
        self.group_num = group_num
        self.weight = torch.nn.Parameter(torch.ones(num_features, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_phi", torch.ones(1, num_features, 1, 1, **factory))
        self.register_buffer("ema_gz", torch.zeros(1, num_features, 1, 1, **factory))
        self.register_buffer("iters", torch.zeros(1, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"affine={self.affine}, warmup={self.warmup_iters}, group_num={self.group_num}"
        )

    def forward(self, input: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        check_float(input, "normax.torch.PowerNorm")
        if pad_mask is not None and pad_mask.dtype != torch.bool:
            pad_mask = pad_mask.bool()
        y, _, _, running_phi, iters = _power_norm_op(
            input,
            self.weight,
            self.bias,
            self.running_phi,
            self.ema_gz,
            self.iters,
            pad_mask,
            self.training,
            float(self.eps),
            float(self.alpha_fwd),
            float(self.alpha_bkw),
            int(self.warmup_iters),
            int(self.group_num),
        )
        if self.training:
            with torch.no_grad():
                self.running_phi.copy_(running_phi)
                self.iters.copy_(iters)
        return y
