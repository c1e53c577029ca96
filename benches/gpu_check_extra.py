"""GPU check of the CUDA PowerNorm and linear cross-entropy: ``python benches/gpu_check_extra.py``.

Needs a CUDA GPU and torch. Every result of the CUDA path (torch CUDA tensors through the public
functions and through normax.torch) is compared with normax's CPU result on the same values, and
with torch where torch has the op (the linear cross-entropy as matmul + F.cross_entropy). Prints
one line per check (max error relative to the reference's largest magnitude, the tolerance,
PASS/FAIL) and exits 1 if any check fails.

Tolerances: float32 results differ from the CPU's only in summation order (a few float32
roundings of sums over up to a few thousand terms): 1e-4 relative to the largest magnitude.
16-bit inputs are compared with the CPU result on the same (rounded) values in float32; the GPU
rounds its outputs to the 16-bit type once: 4 units of that roundoff (float16 2^-11, bfloat16
2^-8), relative to the largest magnitude.
"""

from __future__ import annotations

import sys
import traceback

import normax
import normax.torch as nt
import numpy as np
import torch
import torch.nn.functional as F

FAILURES = []
TOL = {torch.float32: 1e-4, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def check(name: str, got, want, tol: float) -> None:
    g = got.detach().float().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, np.float64)
    w = (
        want.detach().float().cpu().numpy()
        if isinstance(want, torch.Tensor)
        else np.asarray(want, np.float64)
    )
    if g.shape != w.shape:
        FAILURES.append(name)
        print(f"FAIL {name}: shape {g.shape} vs {w.shape}")
        return
    scale = max(float(np.max(np.abs(w))) if w.size else 0.0, 1e-30)
    err = float(np.max(np.abs(g.astype(np.float64) - w))) / scale if w.size else 0.0
    ok = np.isfinite(err) and err <= tol and np.array_equal(np.isnan(g), np.isnan(w))
    if not ok:
        FAILURES.append(name)
    print(
        f"{'PASS' if ok else 'FAIL'} {name}: max error {err:.2e} (relative to {scale:.3g}), tolerance {tol:.1e}"
    )


def host(t: torch.Tensor) -> np.ndarray:
    """The CPU reference's input: the same values, float32 (16-bit values are exact in it)."""
    return t.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# PowerNorm through the public functions


def power_norm_case(shape, groups, dtype, with_pad, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    tag = f"power_norm {tuple(shape)} groups={groups} {str(dtype)[6:]}{' pad' if with_pad else ''}"
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
        check(f"{tag} step {step + 1} y", y1, y0, tol)
        if y1.dtype != dtype:
            FAILURES.append(f"{tag} dtype")
            print(f"FAIL {tag}: y has dtype {y1.dtype}, expected {dtype}")
        check(f"{tag} step {step + 1} running_phi", gpu.running_phi, cpu.running_phi, 1e-4)
        dx1, dw1, db1 = normax.power_norm_backward(dy, s1, gpu)
        dx0, dw0, db0 = normax.power_norm_backward(host(dy), s0, cpu)
        check(f"{tag} step {step + 1} dx", dx1, dx0, tol)
        check(f"{tag} step {step + 1} dweight", dw1, dw0, tol)
        check(f"{tag} step {step + 1} dbias", db1, db0, tol)
        check(f"{tag} step {step + 1} ema_gz", gpu.ema_gz, cpu.ema_gz, 1e-4)
    if gpu.iters != cpu.iters:
        FAILURES.append(f"{tag} iters")
        print(f"FAIL {tag} iters {gpu.iters} vs {cpu.iters}")
    x = torch.tensor(rng.normal(size=shape), dtype=dtype, device="cuda")
    y1, s1 = normax.power_norm(x, weight, bias, gpu, training=False, return_saved=True)
    y0, s0 = normax.power_norm(host(x), host(weight), host(bias), cpu, training=False, return_saved=True)
    check(f"{tag} eval y", y1, y0, tol)
    dx1, dw1, _ = normax.power_norm_backward(x, s1, gpu)
    dx0, dw0, _ = normax.power_norm_backward(host(x), s0, cpu)
    check(f"{tag} eval dx", dx1, dx0, tol)
    check(f"{tag} eval dweight", dw1, dw0, tol)


def power_norm_module():
    """normax.torch.PowerNorm on cuda (the ops' CUDA kernels) against the same module on the CPU."""
    torch.manual_seed(0)
    t, b, c = 32, 4, 96
    gpu = nt.PowerNorm(c, warmup_iters=1, group_num=3).cuda()
    cpu = nt.PowerNorm(c, warmup_iters=1, group_num=3)
    with torch.no_grad():
        for m in (gpu, cpu):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    for step in range(3):
        gpu.zero_grad(set_to_none=True)
        cpu.zero_grad(set_to_none=True)
        x = torch.randn(t, b, c) * 2 + 1
        pad = torch.rand(b, t) < 0.2
        xg = x.cuda().requires_grad_()
        xc = x.clone().requires_grad_()
        yg, yc = gpu(xg, pad.cuda()), cpu(xc, pad)
        dy = torch.randn(t, b, c)
        yg.backward(dy.cuda())
        yc.backward(dy)
        tag = f"torch PowerNorm step {step + 1}"
        check(f"{tag} y", yg, yc, 1e-4)
        check(f"{tag} dx", xg.grad, xc.grad, 1e-4)
        check(f"{tag} dweight", gpu.weight.grad, cpu.weight.grad, 1e-4)
        check(f"{tag} dbias", gpu.bias.grad, cpu.bias.grad, 1e-4)
        check(f"{tag} running_phi", gpu.running_phi, cpu.running_phi, 1e-4)
        check(f"{tag} ema_gz", gpu.ema_gz, cpu.ema_gz, 1e-4)
    gpu.eval()
    cpu.eval()
    x = torch.randn(t, b, c)
    check("torch PowerNorm eval y", gpu(x.cuda()), cpu(x), 1e-4)
    # bfloat16 input, float32 parameters: dweight/dbias stay float32 (from float32 sums).
    gpu.train()
    cpu.train()
    gpu.zero_grad(set_to_none=True)
    cpu.zero_grad(set_to_none=True)
    x = (torch.randn(t, b, c) * 2).bfloat16()
    xg = x.cuda().requires_grad_()
    xc = x.clone().requires_grad_()
    yg, yc = gpu(xg), cpu(xc)
    dy = torch.randn(t, b, c).bfloat16()
    yg.backward(dy.cuda())
    yc.backward(dy)
    tol = TOL[torch.bfloat16]
    check("torch PowerNorm bfloat16 y", yg, yc, tol)
    check("torch PowerNorm bfloat16 dx", xg.grad, xc.grad, tol)
    check("torch PowerNorm bfloat16 dweight", gpu.weight.grad, cpu.weight.grad, tol)
    if gpu.weight.grad.dtype != torch.float32:
        FAILURES.append("torch PowerNorm bfloat16 dweight dtype")
        print(f"FAIL torch PowerNorm bfloat16 dweight dtype {gpu.weight.grad.dtype}")


# ---------------------------------------------------------------------------------------------
# linear cross-entropy


def linear_case(n, h, v, dtype, chunk_size, reduction, seed):
    rng = np.random.default_rng(seed)
    tag = f"linear_cross_entropy {n}x{h}x{v} {str(dtype)[6:]} chunk={chunk_size} {reduction}"
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
    got = normax.linear_cross_entropy_with_grad(hid, w, t, bias=b, grad_output=go, **kw)
    # The CPU reference in its default blocks: its result does not depend on them beyond rounding,
    # and tiny vocabulary blocks there would take minutes.
    want = normax.linear_cross_entropy_with_grad(
        host(hid), host(w), t.cpu().numpy(), bias=host(b),
        grad_output=go.cpu().numpy() if reduction == "none" else go, **{**kw, "chunk_size": None},
    )  # fmt: skip
    tol = TOL[dtype] if dtype != torch.float32 else 1e-4
    for name, g, r in zip(("loss", "dhidden", "dweight", "dbias"), got, want):
        check(f"{tag} {name}", g, r, tol)
    loss = normax.linear_cross_entropy(hid, w, t, bias=b, **kw)
    check(f"{tag} loss only", loss, want[0], tol)


def linear_vs_torch():
    """Against torch: matmul + F.cross_entropy and autograd (no z_loss/softcap there), through
    normax.torch.linear_cross_entropy (the ops' CUDA kernels)."""
    torch.manual_seed(1)
    n, h, v = 777, 64, 3001
    for reduction in ("mean", "sum", "none"):
        hid = torch.randn(n, h, device="cuda", requires_grad=True)
        w = (torch.randn(v, h, device="cuda") / 8).requires_grad_()
        b = (torch.randn(v, device="cuda") / 10).requires_grad_()
        t = torch.randint(0, v, (n,), device="cuda")
        t[::5] = -100
        loss = nt.linear_cross_entropy(
            hid, w, t, b, reduction=reduction, label_smoothing=0.05, chunk_size=v * 100
        )
        ref = F.cross_entropy(hid @ w.T + b, t, reduction=reduction, label_smoothing=0.05)
        tag = f"torch linear_cross_entropy {reduction}"
        check(f"{tag} loss", loss, ref, 1e-4)
        go = torch.rand_like(ref) + 0.5
        grads = torch.autograd.grad(loss, (hid, w, b), go)
        want = torch.autograd.grad(ref, (hid, w, b), go)
        for name, g, r in zip(("dhidden", "dweight", "dbias"), grads, want):
            check(f"{tag} {name}", g, r, 1e-4)


def guarded(case, *args, **kwargs) -> None:
    """Runs one case; an exception is a failure of that case, and the others still run."""
    try:
        case(*args, **kwargs)
    except Exception:  # noqa: BLE001 - report and go on
        FAILURES.append(f"{case.__name__}{args}")
        print(f"FAIL {case.__name__}{args}: raised")
        traceback.print_exc()


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL: no CUDA device visible to torch")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, normax from {normax.__file__}")
    for i, (shape, groups) in enumerate(
        (((64, 8, 256), 1), ((64, 8, 1024), 4), ((300, 100), 4), ((5, 3, 48), 2))
    ):
        guarded(power_norm_case, shape, groups, torch.float32, with_pad=i % 2 == 0, seed=i)
    for dtype in (torch.float16, torch.bfloat16):
        guarded(power_norm_case, (64, 8, 256), 2, dtype, with_pad=True, seed=10)
    guarded(power_norm_module)
    for chunk, reduction in ((None, "mean"), (5000 * 100, "sum"), (1, "none"), (5000 * 64, "mean")):
        guarded(linear_case, 1000, 128, 5000, torch.float32, chunk, reduction, seed=3)
    for dtype in (torch.float16, torch.bfloat16):
        guarded(linear_case, 512, 64, 2048, dtype, 2048 * 100, "mean", seed=4)
    guarded(linear_vs_torch)
    torch.cuda.synchronize()
    print(f"{'FAIL' if FAILURES else 'PASS'}: {len(FAILURES)} of the checks failed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
