"""The CUDA backend on a real GPU: every op against torch CUDA (forward and gradient), then
normax vs torch timings with achieved bandwidth against a device-to-device copy of the same run.

Run by benches/gpu_check.sh (which installs the wheel); needs torch with CUDA, CuPy optional.
Prints one line per check and a table per size; exits non-zero when a check fails.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import traceback

import normax
import normax.torch as nt
import torch
import torch.nn.functional as F

DEV = torch.device("cuda")
FAILED: list[str] = []
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Max error relative to the reference's scale; NaN/inf positions must agree."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        FAILED.append(name)
        print(f"FAIL {name}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
        return
    finite = torch.isfinite(want)
    same_special = bool(torch.equal(torch.isnan(got), torch.isnan(want))) and bool(
        torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
    )
    scale = max(1.0, float(want[finite].abs().max())) if finite.any() else 1.0
    err = float((got[finite] - want[finite]).abs().max()) / scale if finite.any() else 0.0
    ok = same_special and err <= tol
    if not ok:
        FAILED.append(name)
    print(
        f"{'ok  ' if ok else 'FAIL'} {name}: max err {err:.2e} (tol {tol:.0e}){'' if same_special else ' special values differ'}"
    )


def guarded(fn):
    def run(*a, **k):
        try:
            fn(*a, **k)
        except Exception:  # noqa: BLE001 - report and go on with the other checks
            FAILED.append(fn.__name__)
            print(f"FAIL {fn.__name__}: raised")
            traceback.print_exc()

    return run


# ---------------------------------------------------------------------------------------------
# Correctness


def inputs(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEV) * scale).to(dtype)


SHAPES = [(7, 33), (64, 1000), (128, 4096), (3, 200_000), (2, 5, 16)]


@guarded
def softmax_family(dtype):
    tol = TOL[dtype]
    for shape in SHAPES:
        for dim in sorted({-1, 0}):
            x = inputs(shape, dtype)
            ref = x.float()
            tag = f"{dtype} {shape} dim={dim}"
            check(f"softmax {tag}", normax.softmax(x, axis=dim), torch.softmax(ref, dim), tol)
            check(f"log_softmax {tag}", normax.log_softmax(x, axis=dim), torch.log_softmax(ref, dim), tol)
            check(f"logsumexp {tag}", normax.logsumexp(x, axis=dim), torch.logsumexp(ref, dim), tol)
            for fn, tfn in ((nt.softmax, torch.softmax), (nt.log_softmax, torch.log_softmax)):
                a = x.clone().requires_grad_()
                b = ref.clone().requires_grad_()
                gy = inputs(shape, dtype, 1.0, seed=1)
                fn(a, dim).backward(gy)
                tfn(b, dim).backward(gy.float())
                check(f"{fn.__name__} grad {tag}", a.grad, b.grad, tol)
    special = torch.tensor(
        [
            [0.0, -math.inf, 1.0],
            [-math.inf, -math.inf, -math.inf],
            [math.nan, 0.0, 1.0],
            [math.inf, 0.0, 1.0],
        ],
        device=DEV,
    ).to(dtype)
    cpu = normax.softmax(special.float().cpu().numpy())
    check(f"softmax special values {dtype}", normax.softmax(special), torch.from_numpy(cpu), tol)
    # The caller's stream is used: work queued on a side stream is ordered with it.
    side = torch.cuda.Stream()
    x = inputs((512, 4096), dtype)
    side.wait_stream(torch.cuda.current_stream())  # x is written on the default stream
    with torch.cuda.stream(side):
        y = normax.softmax(x * 2)
    side.synchronize()
    check(f"softmax on a side stream {dtype}", y, torch.softmax((x * 2).float(), -1), tol)


@guarded
def cross_entropy(dtype):
    tol = TOL[dtype] * 4
    for n, c in ((64, 1000), (8, 128256), (1024, 4096)):
        x = inputs((n, c), dtype)
        t = torch.randint(0, c, (n,), device=DEV)
        t[::7] = -100
        w = torch.rand(c, device=DEV) + 0.5
        probs = torch.softmax(inputs((n, c), torch.float32, seed=2), -1)
        cases = [
            ("plain", {}, t),
            ("weight+smoothing", {"weight": w, "label_smoothing": 0.1}, t),
            ("sum", {"reduction": "sum"}, t),
            ("none", {"reduction": "none"}, t),
            ("probs", {"label_smoothing": 0.05}, probs.to(dtype)),
        ]
        for name, kw, target in cases:
            tag = f"cross_entropy {name} {dtype} {n}x{c}"
            a = x.clone().requires_grad_()
            b = x.float().clone().requires_grad_()
            la = nt.cross_entropy(a, target, **kw)
            lb = F.cross_entropy(b, target if target.dtype == torch.int64 else target.float(), **kw)
            check(f"{tag} loss", la, lb, tol)
            (la.sum() if la.ndim else la).backward()
            (lb.sum() if lb.ndim else lb).backward()
            check(f"{tag} grad", a.grad, b.grad, tol)
        # z_loss and softcap against the same formulas in torch ops.
        z, cap = 1e-3, 30.0
        b = x.float().clone().requires_grad_()
        capped = cap * torch.tanh(b / cap)
        lse = torch.logsumexp(capped, -1)
        keep = t != -100
        ref = (F.cross_entropy(capped, t, reduction="none") + z * lse**2 * keep).sum() / keep.sum()
        a = x.clone().requires_grad_()
        la = nt.cross_entropy(a, t, z_loss=z, softcap=cap)
        ref.backward()
        la.backward()
        check(f"cross_entropy z_loss+softcap {dtype} {n}x{c} loss", la, ref, tol)
        check(f"cross_entropy z_loss+softcap {dtype} {n}x{c} grad", a.grad, b.grad, tol)
    try:
        normax.cross_entropy(inputs((4, 10), dtype), torch.tensor([0, 1, 12, 3], device=DEV))
        FAILED.append("cross_entropy bad index")
        print("FAIL cross_entropy with an out-of-range class did not raise")
    except IndexError as e:
        print(f"ok   cross_entropy bad index raises IndexError: {e}")


@guarded
def norms(dtype):
    tol = TOL[dtype] * 4
    for shape in ((64, 1000), (256, 4096), (4, 3, 768)):
        n = shape[-1]
        x = inputs(shape, dtype)
        w = (torch.rand(n, device=DEV) + 0.5).to(dtype)
        bias = torch.randn(n, device=DEV).to(dtype)
        gy = inputs(shape, dtype, 1.0, seed=3)
        tag = f"{dtype} {shape}"
        for name, ours, theirs, params in (
            ("rms_norm", lambda a, p, n=n: nt.rms_norm(a, (n,), p[0], eps=1e-6),
             lambda a, p, n=n: F.rms_norm(a, (n,), p[0], eps=1e-6), [w]),
            ("layer_norm", lambda a, p, n=n: nt.layer_norm(a, (n,), p[0], p[1]),
             lambda a, p, n=n: F.layer_norm(a, (n,), p[0], p[1]), [w, bias]),
        ):  # fmt: skip
            a = x.clone().requires_grad_()
            pa = [p.clone().requires_grad_() for p in params]
            b = x.float().clone().requires_grad_()
            pb = [p.float().clone().requires_grad_() for p in params]
            ya, yb = ours(a, pa), theirs(b, pb)
            check(f"{name} {tag}", ya, yb, tol)
            ya.backward(gy)
            yb.backward(gy.float())
            check(f"{name} dx {tag}", a.grad, b.grad, tol)
            for i, (p, q) in enumerate(zip(pa, pb)):
                # Column sums over many rows: compare relative to their magnitude.
                check(f"{name} d{'wb'[i]} {tag}", p.grad, q.grad, tol * 10)
        xs = inputs(shape, dtype)
        check(
            f"crms_norm {tag}",
            normax.crms_norm(xs),
            torch.from_numpy(normax.crms_norm(xs.float().cpu().numpy())),
            tol,
        )


@guarded
def other_libraries_and_errors():
    try:
        import cupy
    except ImportError:
        print("skip CuPy: not installed")
    else:
        x = cupy.random.standard_normal((256, 1000), dtype=cupy.float32)
        y = normax.softmax(x)
        assert isinstance(y, cupy.ndarray), type(y)
        check("softmax of a CuPy array", torch.from_dlpack(y), torch.softmax(torch.from_dlpack(x), -1), 2e-5)
    try:
        normax.softmax(torch.zeros(3, 3, device=DEV, dtype=torch.float64))
        FAILED.append("float64")
        print("FAIL float64 CUDA input did not raise")
    except TypeError as e:
        print(f"ok   float64 CUDA input raises TypeError: {e}")


# ---------------------------------------------------------------------------------------------
# Timing


def cuda_time(fn, batches=7, calls=10) -> float:
    """Median milliseconds per call: CUDA events around batches of back-to-back calls, so the
    host's per-call work overlaps the GPU's as in a training loop (not hidden if it is longer)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(batches):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def bench(shape, dtype):
    x = inputs(shape, dtype)
    n = shape[-1]
    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    copy_ms = cuda_time(lambda: dst.copy_(x))
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

    rows = [
        ("softmax", lambda: normax.softmax(x), lambda: torch.softmax(x, -1), 2, 0.85),
        ("log_softmax", lambda: normax.log_softmax(x), lambda: torch.log_softmax(x, -1), 2, 0.85),
        (
            "rms_norm",
            lambda: normax.rms_norm(x, w, eps=1e-6),
            lambda: F.rms_norm(x, (n,), w, eps=1e-6),
            2,
            0.85,
        ),
        (
            "layer_norm",
            lambda: normax.layer_norm(x, w, bias),
            lambda: F.layer_norm(x, (n,), w, bias),
            2,
            0.85,
        ),
        ("cross_entropy fwd+bwd", normax_ce, torch_ce, 2, None),
    ]
    print(f"\n{tuple(shape)} {str(dtype).split('.')[-1]}: copy {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s")
    print(
        f"  {'op':24s} {'normax ms':>10s} {'torch ms':>10s} {'x torch':>8s} {'GB/s':>7s} {'% copy':>7s}  target"
    )
    for name, ours, theirs, passes, bw_target in rows:
        ms = cuda_time(ours)
        tms = cuda_time(theirs)
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
        print("FAIL: no CUDA device visible to torch")
        return 1
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"normax from {normax.__file__}")
    t0 = time.perf_counter()
    normax.softmax(torch.zeros(2, 2, device=DEV))
    torch.cuda.synchronize()
    print(f"first call (NVRTC compile + load of the softmax module): {time.perf_counter() - t0:.2f} s")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        softmax_family(dtype)
        cross_entropy(dtype)
        norms(dtype)
    other_libraries_and_errors()
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((16384, 4096), (4096, 32768), (32, 128256)):
            bench(shape, dtype)
    print(f"\n{len(FAILED)} failed checks" + (f": {FAILED}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
