"""The CUDA PowerNorm and linear cross-entropy on a real GPU (``pytest -m gpu tests/cuda``).

Every result of the CUDA path (torch CUDA tensors through the public functions and through
normax.torch) is compared with normax's CPU result on the same values, and with torch where torch
has the op (the linear cross-entropy as matmul + F.cross_entropy). Errors are relative to the
reference's largest magnitude.

Tolerances: float32 results differ from the CPU's only in summation order (a few float32
roundings of sums over up to a few thousand terms): 1e-4. 16-bit inputs are compared with the CPU
result on the same (rounded) values in float32; the GPU rounds its outputs to the 16-bit type
once: 4 units of that roundoff (float16 2^-11, bfloat16 2^-8).
"""

from __future__ import annotations

import functools

import normax
import normax.torch as nt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_close_to_scale

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
# Relative to the largest magnitude, however small it is.
assert_close = functools.partial(assert_close_to_scale, floor=1e-30)


def host(t: torch.Tensor) -> np.ndarray:
    """The CPU reference's input: the same values, float32 (16-bit values are exact in it)."""
    return t.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# PowerNorm through the public functions

POWER_CASES = [  # (shape, groups, dtype, with_pad, seed)
    ((64, 8, 256), 1, torch.float32, True, 0),
    ((64, 8, 1024), 4, torch.float32, False, 1),
    ((300, 100), 4, torch.float32, True, 2),
    ((5, 3, 48), 2, torch.float32, False, 3),
    ((64, 8, 256), 2, torch.float16, True, 10),
    ((64, 8, 256), 2, torch.bfloat16, True, 10),
]


@pytest.mark.parametrize("shape, groups, dtype, with_pad, seed", POWER_CASES)
def test_power_norm_matches_the_cpu(shape, groups, dtype, with_pad, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    settings = {"warmup_iters": 2, "group_num": groups, "alpha_fwd": 0.9, "alpha_bkw": 0.8}
    cpu, gpu = normax.PowerNormState(c, **settings), normax.PowerNormState(c, **settings)
    weight = torch.tensor(rng.uniform(0.5, 1.5, c), dtype=torch.float32, device="cuda")
    bias = torch.tensor(rng.normal(size=c), dtype=torch.float32, device="cuda")
    pad = None
    if with_pad:
        pshape = (shape[1], shape[0]) if len(shape) == 3 else (shape[0], 1)
        pad = torch.tensor(rng.random(pshape) < 0.25, device="cuda")
    tol = TOL[dtype]
    # Steps 1-2 normalize by the batch statistics, 3-4 by running_phi.
    for step in range(4):
        x = torch.tensor(rng.normal(size=shape) * (1 + step) + 0.5, dtype=dtype, device="cuda")
        dy = torch.tensor(rng.normal(size=shape), dtype=dtype, device="cuda")
        y1, s1 = normax.power_norm(x, weight, bias, gpu, pad_mask=pad, return_saved=True)
        y0, s0 = normax.power_norm(
            host(x), host(weight), host(bias), cpu, pad_mask=None if pad is None else pad.cpu().numpy(),
            return_saved=True,
        )  # fmt: skip
        assert_close(y1, y0, tol)
        assert y1.dtype == dtype
        assert_close(gpu.running_phi, cpu.running_phi, 1e-4)
        dx1, dw1, db1 = normax.power_norm_backward(dy, s1, gpu)
        dx0, dw0, db0 = normax.power_norm_backward(host(dy), s0, cpu)
        assert_close(dx1, dx0, tol)
        assert_close(dw1, dw0, tol)
        assert_close(db1, db0, tol)
        assert_close(gpu.ema_gz, cpu.ema_gz, 1e-4)
    assert gpu.iters == cpu.iters
    x = torch.tensor(rng.normal(size=shape), dtype=dtype, device="cuda")
    y1, s1 = normax.power_norm(x, weight, bias, gpu, training=False, return_saved=True)
    y0, s0 = normax.power_norm(host(x), host(weight), host(bias), cpu, training=False, return_saved=True)
    assert_close(y1, y0, tol)
    dx1, dw1, _ = normax.power_norm_backward(x, s1, gpu)
    dx0, dw0, _ = normax.power_norm_backward(host(x), s0, cpu)
    assert_close(dx1, dx0, tol)
    assert_close(dw1, dw0, tol)


def _module_pair(c):
    gpu = nt.PowerNorm(c, warmup_iters=1, group_num=3).cuda()
    cpu = nt.PowerNorm(c, warmup_iters=1, group_num=3)
    with torch.no_grad():
        for m in (gpu, cpu):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    return gpu, cpu


def _step(gpu, cpu, x, dy, pad=None):
    """One training step of both modules; (gpu y, cpu y, gpu dx, cpu dx)."""
    gpu.zero_grad(set_to_none=True)
    cpu.zero_grad(set_to_none=True)
    xg = x.cuda().requires_grad_()
    xc = x.clone().requires_grad_()
    yg = gpu(xg) if pad is None else gpu(xg, pad.cuda())
    yc = cpu(xc) if pad is None else cpu(xc, pad)
    yg.backward(dy.cuda())
    yc.backward(dy)
    return yg, yc, xg.grad, xc.grad


def test_power_norm_module_matches_the_cpu_module():
    """normax.torch.PowerNorm on cuda (the ops' CUDA kernels) against the same module on the CPU."""
    torch.manual_seed(0)
    t, b, c = 32, 4, 96
    gpu, cpu = _module_pair(c)
    for _ in range(3):
        x = torch.randn(t, b, c) * 2 + 1
        pad = torch.rand(b, t) < 0.2
        yg, yc, dxg, dxc = _step(gpu, cpu, x, torch.randn(t, b, c), pad)
        assert_close(yg, yc, 1e-4)
        assert_close(dxg, dxc, 1e-4)
        assert_close(gpu.weight.grad, cpu.weight.grad, 1e-4)
        assert_close(gpu.bias.grad, cpu.bias.grad, 1e-4)
        assert_close(gpu.running_phi, cpu.running_phi, 1e-4)
        assert_close(gpu.ema_gz, cpu.ema_gz, 1e-4)
    gpu.eval()
    cpu.eval()
    x = torch.randn(t, b, c)
    assert_close(gpu(x.cuda()), cpu(x), 1e-4)
    # bfloat16 input, float32 parameters: dweight stays float32 (from float32 sums).
    gpu.train()
    cpu.train()
    x = (torch.randn(t, b, c) * 2).bfloat16()
    yg, yc, dxg, dxc = _step(gpu, cpu, x, torch.randn(t, b, c).bfloat16())
    tol = TOL[torch.bfloat16]
    assert_close(yg, yc, tol)
    assert_close(dxg, dxc, tol)
    assert_close(gpu.weight.grad, cpu.weight.grad, tol)
    assert gpu.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# linear cross-entropy

LINEAR_CASES = [  # (n, h, v, dtype, chunk_size, reduction, seed)
    (1000, 128, 5000, torch.float32, None, "mean", 3),
    (1000, 128, 5000, torch.float32, 5000 * 100, "sum", 3),
    (1000, 128, 5000, torch.float32, 1, "none", 3),
    (1000, 128, 5000, torch.float32, 5000 * 64, "mean", 3),
    (512, 64, 2048, torch.float16, 2048 * 100, "mean", 4),
    (512, 64, 2048, torch.bfloat16, 2048 * 100, "mean", 4),
]


@pytest.mark.parametrize("n, h, v, dtype, chunk_size, reduction, seed", LINEAR_CASES)
def test_linear_cross_entropy_matches_the_cpu(n, h, v, dtype, chunk_size, reduction, seed):
    rng = np.random.default_rng(seed)
    hid = torch.tensor(rng.normal(size=(n, h)), dtype=dtype, device="cuda")
    w = torch.tensor(rng.normal(size=(v, h)) / np.sqrt(h), dtype=dtype, device="cuda")
    b = torch.tensor(rng.normal(size=v) * 0.1, dtype=dtype, device="cuda")
    t = torch.tensor(rng.integers(0, v, n), device="cuda")
    t[::7] = -100
    go = (
        torch.tensor(rng.uniform(0.5, 2, n), dtype=torch.float32, device="cuda")
        if reduction == "none"
        else 1.0
    )
    kw = {
        "reduction": reduction,
        "label_smoothing": 0.1,
        "z_loss": 1e-4,
        "softcap": 30.0,
        "chunk_size": chunk_size,
    }
    got = normax.linear_cross_entropy_with_grad(hid, w, t, linear_bias=b, grad_output=go, **kw)
    # The CPU reference in its default blocks: its result does not depend on them beyond rounding,
    # and tiny vocabulary blocks there would take minutes.
    want = normax.linear_cross_entropy_with_grad(
        host(hid), host(w), t.cpu().numpy(), linear_bias=host(b),
        grad_output=go.cpu().numpy() if reduction == "none" else go, **{**kw, "chunk_size": None},
    )  # fmt: skip
    tol = TOL[dtype]
    for g, r in zip(got, want):  # loss, dhidden, dweight, dbias
        assert_close(g, r, tol)
    loss = normax.linear_cross_entropy(hid, w, t, linear_bias=b, **kw)
    assert_close(loss, want[0], tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_torch_autograd(reduction):
    """Against matmul + F.cross_entropy and autograd (no z_loss/softcap there), through
    normax.torch.linear_cross_entropy (the ops' CUDA kernels)."""
    torch.manual_seed(1)
    n, h, v = 777, 64, 3001
    hid = torch.randn(n, h, device="cuda", requires_grad=True)
    w = (torch.randn(v, h, device="cuda") / 8).requires_grad_()
    b = (torch.randn(v, device="cuda") / 10).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    t[::5] = -100
    loss = nt.linear_cross_entropy(
        hid, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.05, chunk_size=v * 100
    )
    ref = F.cross_entropy(hid @ w.T + b, t, reduction=reduction, label_smoothing=0.05)
    assert_close(loss, ref, 1e-4)
    go = torch.rand_like(ref) + 0.5
    grads = torch.autograd.grad(loss, (hid, w, b), go)
    want = torch.autograd.grad(ref, (hid, w, b), go)
    for g, r in zip(grads, want):  # dhidden, dweight, dbias
        assert_close(g, r, 1e-4)
