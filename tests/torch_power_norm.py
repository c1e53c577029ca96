"""A PyTorch MaskPowerNorm (Shen et al. 2020) written from the PowerNorm equations of the norms issue:
the tests' oracle for normax's PowerNorm and the peer of the benchmark's norms suite
(benches/python/norms.py). Needs only torch."""

from __future__ import annotations


def torch_mask_power_norm(
    num_features, *, eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.9, warmup_iters=10000, group_num=1
):
    """A PyTorch MaskPowerNorm (Shen et al. 2020) module: the benchmark's peer and a test oracle.

    Same parameters, buffers and equations as :func:`normax.power_norm`: input (T, B, C) or (N, C),
    ``forward(x, pad_mask=None)`` with pad_mask (B, T), True = padding. The group scaling is plain
    autograd; the power step is a custom autograd function with the approximate backward.
    """
    import torch

    class _PowerStep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, weight, bias, module, keep):
            with torch.no_grad():
                sel = u if keep is None else u[keep]
                var = (sel * sel).mean(dim=0)
                it = int(module.iters)
                phi = module.running_phi
                if it <= module.warmup_iters:
                    z = u * torch.rsqrt(var + module.eps)
                else:
                    z = u * torch.rsqrt(phi + module.eps)
                if it < module.warmup_iters:
                    phi.mul_((it - 1) / it).add_(var / it)
                phi.mul_(module.alpha_fwd).add_((1 - module.alpha_fwd) * var)
            ctx.save_for_backward(z, var, weight)
            ctx.module = module
            return z * weight + bias

        @staticmethod
        def backward(ctx, dy):
            z, var, weight = ctx.saved_tensors
            m = ctx.module
            g = dy * weight
            g_hat = g - (1 - m.alpha_bkw) * m.ema_gz * z
            m.ema_gz.add_((g_hat * z).mean(dim=0))
            du = g_hat * torch.rsqrt(var + m.eps)
            return du, (dy * z).sum(dim=0), dy.sum(dim=0), None, None

    class MaskPowerNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            c = num_features
            self.num_features, self.eps, self.group_num = c, eps, group_num
            self.alpha_fwd, self.alpha_bkw, self.warmup_iters = alpha_fwd, alpha_bkw, warmup_iters
            self.weight = torch.nn.Parameter(torch.ones(c))
            self.bias = torch.nn.Parameter(torch.zeros(c))
            self.register_buffer("running_phi", torch.ones(c))
            self.register_buffer("ema_gz", torch.zeros(c))
            self.register_buffer("iters", torch.zeros((), dtype=torch.long))

        def forward(self, x, pad_mask=None):
            shape, c, g = x.shape, self.num_features, self.group_num
            xg = x.reshape(-1, g, c // g)
            u = (xg * torch.rsqrt((xg * xg).mean(dim=-1, keepdim=True) + self.eps)).reshape(-1, c)
            if not self.training:
                y = u * torch.rsqrt(self.running_phi + self.eps) * self.weight + self.bias
                return y.reshape(shape)
            self.iters += 1
            keep = None if pad_mask is None else ~pad_mask.transpose(0, 1).reshape(-1)
            return _PowerStep.apply(u, self.weight, self.bias, self, keep).reshape(shape)

    return MaskPowerNorm()
