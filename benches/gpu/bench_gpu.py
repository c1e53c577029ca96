"""normax vs torch on a CUDA GPU: median times, the ratio, and the achieved bandwidth against a
device-to-device copy of the same size measured in the same run.

    python benches/gpu/bench_gpu.py        (benches/gpu/run.sh runs it after the gpu tests)

float32 and bfloat16 at 16384x4096, 4096x32768 and 32x128256. Correctness is the gpu tests'
(tests/cuda/test_gpu_*.py); this only times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import normax
import normax.torch as nt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # the one timer
from timer import cuda_clock, median_time  # noqa: E402

DEV = torch.device("cuda")
SHAPES = [(16384, 4096), (4096, 32768), (32, 128256)]


def cuda_ms(fn) -> float:
    """Median milliseconds per call over 7 batches of 10 back-to-back calls (CUDA events)."""
    return 1e3 * median_time(fn, min_runs=7, max_runs=7, calls=10, warmup=3, clock=cuda_clock(torch))


def bench(shape, dtype):
    x = (torch.randn(shape, device=DEV) * 3.0).to(dtype)
    n = shape[-1]
    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    copy_ms = cuda_ms(lambda: dst.copy_(x))
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    w = torch.rand(n, device=DEV, dtype=dtype) + 0.5
    bias = torch.randn(n, device=DEV, dtype=dtype)
    t = torch.randint(0, n, (shape[0],), device=DEV)
    xg = x.clone().requires_grad_()
    xn = x.clone().requires_grad_()

    # Both through autograd, as a training step runs them: loss, then backward.
    def torch_ce():
        xg.grad = None
        F.cross_entropy(xg, t).backward()

    def normax_ce():
        xn.grad = None
        nt.cross_entropy(xn, t).backward()

    # (op, normax, torch, passes over x, bandwidth target as a fraction of the copy's)
    rows = [
        ("softmax", lambda: normax.softmax(x), lambda: torch.softmax(x, -1), 2, 0.85),
        ("log_softmax", lambda: normax.log_softmax(x), lambda: torch.log_softmax(x, -1), 2, 0.85),
        ("rms_norm", lambda: normax.rms_norm(x, w, eps=1e-6),
         lambda: F.rms_norm(x, (n,), w, eps=1e-6), 2, 0.85),
        ("layer_norm", lambda: normax.layer_norm(x, w, bias),
         lambda: F.layer_norm(x, (n,), w, bias), 2, 0.85),
        ("cross_entropy fwd+bwd", normax_ce, torch_ce, 2, None),
    ]  # fmt: skip
    print(f"\n{tuple(shape)} {str(dtype).split('.')[-1]}: copy {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s")
    print(
        f"  {'op':24s} {'normax ms':>10s} {'torch ms':>10s} {'x torch':>8s} {'GB/s':>7s} {'% copy':>7s}  target"
    )
    for name, ours, theirs, passes, bw_target in rows:
        ms = cuda_ms(ours)
        tms = cuda_ms(theirs)
        gbs = passes * nbytes / ms / 1e6
        ratio = tms / ms
        if bw_target is None:
            target = "PASS" if ratio >= 1.5 else "MISS"
            want = ">=1.5x torch"
        else:
            target = "PASS" if gbs >= bw_target * copy_gbs and ratio >= 1.0 else "MISS"
            want = f">={bw_target:.0%} copy, >=1x torch"
        print(
            f"  {name:24s} {ms:10.3f} {tms:10.3f} {ratio:8.2f} {gbs:7.0f} {gbs / copy_gbs:7.0%}  {target} ({want})"
        )


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch")
        return 1
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"normax from {normax.__file__}")
    t0 = time.perf_counter()
    normax.softmax(torch.zeros(2, 2, device=DEV))
    torch.cuda.synchronize()
    print(f"first call (NVRTC compile + load of the softmax module): {time.perf_counter() - t0:.2f} s")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            bench(shape, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
