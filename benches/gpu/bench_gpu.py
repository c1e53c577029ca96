"""normax against torch eager, torch.compile and Liger-Kernel on a CUDA GPU, in one process.

    python benches/gpu/bench_gpu.py [--quick] [--targets] [--dry-run]

(benches/gpu/run.sh runs it after the gpu tests.) Correctness is the gpu tests' job; this only times.

- The table: softmax, log_softmax, rms_norm, layer_norm forward, the same through autograd
  (forward, then the gradient of every floating input), and cross-entropy forward+backward, at
  16384x4096, 4096x32768 and 32x128256 in bfloat16 and float32. Median ms per call of CUDA-event
  batches of back-to-back calls (host work overlaps the GPU's, as in a training loop); normax's
  bandwidth against a device-to-device copy of the same tensor in the same run; every peer as
  "ms x", x = peer time / normax time (above 1: normax is faster).
- host: wall time per call at 8x64 float32 with a CUDA sync per batch: there the GPU work is a
  few µs, so this is the host cost of a normax.torch op (custom op, autograd, launch) and torch's.
- linear cross-entropy N=8192 H=4096 V=128256 bfloat16, forward+backward: time, peak memory
  above the inputs (``torch.cuda.max_memory_allocated``, the gradients included) and the loss and
  its dtype of normax (dweight summed in float32, and ``accumulation="input"``), torch eager,
  ``F.linear_cross_entropy`` (torch >= 2.13: its reference path and its chunked ``options``, the
  default and ``acc_policy="accurate"``), torch.compile and Liger-Kernel, in one process. Not in
  float32: three 8192x4096x128256 float32 GEMMs take about half a second per call without TF32,
  which the budget below has not for eight contenders.

Peers: torch eager (matmul + ``F.cross_entropy`` for the linear CE, and torch's own
``F.linear_cross_entropy`` with and without its chunked options, where it exists); ``torch.compile`` in its default mode with
``dynamic=False``, compiled once per case in the untimed warm-up (the compile time is reported);
Liger-Kernel where ``liger_kernel`` imports (it has no log_softmax; its norms and softmax refuse
rows above 65536 columns: such cells print "err" and the reason below the table).

Bytes counted for GB/s are the least an op must move: forward 2 tensors (read x, write y); the
norms and softmax family forward+backward 5 (the backward reads x or y and dy, writes dx);
cross-entropy forward+backward 2 (read the logits once, write their gradient once).

Budget: under 4 minutes on an H100, most of it torch.compile (about 55 compiles). No compile
starts after ``--compile-until`` seconds (default 140), or after 60% of that for the cases whose
target does not involve torch.compile (forward rows, the softmax family's forward+backward);
those cells print "late", so the run ends in time whatever the compiler costs. ``--quick``:
16384x4096 bfloat16 and the host rows only, compiling only where a target needs it (until 50 s):
about a minute. ``--targets``: issue 11's targets, PASS or MISS by how much (host: 30 µs per op
call, so 60 µs for a forward+backward, two calls). ``--dry-run``: the same plumbing on the CPU at
tiny sizes (wall clock, no compile, no memory figures), to check this script without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import normax
import normax.torch as nt
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # the one timer
from timer import cuda_clock, median_time, wall_clock

SHAPES = [(16384, 4096), (4096, 32768), (32, 128256)]
DTYPES = [torch.bfloat16, torch.float32]
LINEAR_CE = (8192, 4096, 128256)  # N, H, V
HOST_SHAPE = (8, 64)
GIB = 2.0**30


@dataclass(frozen=True)
class Op:
    """One op of the table: its arguments by name ("x", "w" weight, "b" bias, "t" class indices)
    and the same computation by each implementation. Every floating argument takes a gradient
    in forward+backward."""

    name: str
    args: tuple[str, ...]
    normax: Callable
    torch: Callable
    liger: Callable | None  # f(liger_kernel.transformers.functional, *args)
    loss: bool = False  # a scalar loss: forward+backward only


def _n(x):
    return (x.shape[-1],)


OPS = [
    Op("softmax", ("x",), lambda x: nt.softmax(x, -1), lambda x: torch.softmax(x, -1),
       lambda lf, x: lf.liger_softmax(x)),
    Op("log_softmax", ("x",), lambda x: nt.log_softmax(x, -1), lambda x: torch.log_softmax(x, -1), None),
    Op("rms_norm", ("x", "w"), lambda x, w: nt.rms_norm(x, _n(x), w, 1e-6),
       lambda x, w: F.rms_norm(x, _n(x), w, 1e-6), lambda lf, x, w: lf.liger_rms_norm(x, w, 1e-6)),
    Op("layer_norm", ("x", "w", "b"), lambda x, w, b: nt.layer_norm(x, _n(x), w, b, 1e-5),
       lambda x, w, b: F.layer_norm(x, _n(x), w, b, 1e-5),
       lambda lf, x, w, b: lf.liger_layer_norm(x, w, b, 1e-5)),
    Op("cross_entropy", ("x", "t"), lambda x, t: nt.cross_entropy(x, t), lambda x, t: F.cross_entropy(x, t),
       lambda lf, x, t: lf.liger_cross_entropy(x, t), loss=True),
]  # fmt: skip
PEERS = ["torch", "compile", "liger"]
TARGET_FWD_COPY = 0.90  # forward >= 90% of the copy at the two large shapes, >= 1.0x torch at 32 rows
TARGET_FWD_BWD = 1.2  # >= 1.2x the fastest peer, for these ops' forward+backward:
FWD_BWD_TARGETED = ("rms_norm", "layer_norm", "cross_entropy")
TARGET_HOST_US = 30.0  # per normax.torch op call; a forward+backward is two calls


def _liger():
    try:
        import liger_kernel.transformers.functional as lf
    except Exception as e:  # noqa: BLE001 - not installed, or no triton: the header says why
        return None, f"{type(e).__name__}: {e}"
    from importlib.metadata import version

    return lf, f"Liger-Kernel {version('liger-kernel')}"


class Run:
    """What every measurement shares: the device, the clock, the deadline for compiling, the notes."""

    def __init__(self, opts):
        self.opts = opts
        self.dry = opts.dry_run
        self.dev = torch.device("cpu" if self.dry else "cuda")
        self.start = time.perf_counter()
        self.clock = wall_clock if self.dry else cuda_clock(torch)
        self.compile_s = 0.0
        self.notes: dict[str, list[str]] = {}  # error -> the cases it ended
        self.liger, self.liger_about = _liger()
        self.failed = False  # a normax call failed: the exit status says so
        self.misses: list[str] = []
        self.met = 0

    def sync(self):
        if not self.dry:
            torch.cuda.synchronize()

    def ms(self, fn, runs=7, calls=10, warmup=3) -> float:
        return 1e3 * median_time(
            fn, min_runs=runs, max_runs=runs, calls=calls, warmup=warmup, clock=self.clock
        )

    def attempt(self, label: str, fn):
        """fn(), or None with the error noted (a peer that refuses a shape, an out-of-memory)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, and the run goes on
            first = (str(e).strip().splitlines() or [""])[0][:150]
            self.notes.setdefault(f"{type(e).__name__}: {first}", []).append(label)
            if not self.dry:
                torch.cuda.empty_cache()
            return None

    def compiled(self, fn, targeted: bool = True):
        """torch.compile(fn), or None once the deadline has passed (the cell prints "late").
        Cases whose target does not involve torch.compile stop compiling earlier, at 60% of it
        (with --quick they are not compiled)."""
        deadline = self.opts.compile_until * (1.0 if targeted else 0.0 if self.opts.quick else 0.6)
        if self.dry or time.perf_counter() - self.start > deadline:
            return None
        return torch.compile(fn, dynamic=False)

    def first_call(self, fn):
        """The untimed first call, which compiles; its time goes to the compile total."""
        t0 = time.perf_counter()
        fn()
        self.sync()
        self.compile_s += time.perf_counter() - t0

    def target(self, ok: bool, what: str, miss: str) -> str:
        if ok:
            self.met += 1
            return f"PASS ({what})"
        self.misses.append(f"{miss} (target {what})")
        return f"MISS: {miss} (target {what})"


# ---------------------------------------------------------------------------------------------
# the table


def make_inputs(run: Run, shape, dtype):
    g = torch.Generator(device=run.dev).manual_seed(0)
    n = shape[-1]
    return {
        "x": (torch.randn(shape, generator=g, device=run.dev) * 3.0).to(dtype),
        "w": (torch.rand(n, generator=g, device=run.dev) + 0.5).to(dtype),
        "b": torch.randn(n, generator=g, device=run.dev).to(dtype),
        "t": torch.randint(0, n, shape[:1], generator=g, device=run.dev),
        "dy": torch.randn(shape, generator=g, device=run.dev).to(dtype),
    }


def make_call(fn, op: Op, inputs, backward: bool):
    """A call of fn on its own copies of the inputs (Liger writes gradients over its inputs) and,
    with `backward`, the gradients of its floating inputs through autograd."""
    args = [inputs[a].clone() for a in op.args]
    if not backward:
        return lambda: fn(*args)
    leaves = [a.requires_grad_() for a in args if a.is_floating_point()]
    if op.loss:
        return lambda: torch.autograd.grad(fn(*args), leaves)
    dy = inputs["dy"].clone()
    return lambda: torch.autograd.grad(fn(*args), leaves, dy)


def implementations(run: Run, op: Op, backward: bool):
    """name -> the op's function, or a string saying why there is none."""
    out = {"normax": op.normax, "torch": op.torch}
    targeted = backward and op.name in FWD_BWD_TARGETED
    out["compile"] = run.compiled(op.torch, targeted) or ("skip" if run.dry else "late")
    if run.liger is None or op.liger is None:
        out["liger"] = "-"
    else:
        out["liger"] = lambda *a, lf=run.liger, f=op.liger: f(lf, *a)
    return out


def bench_case(run: Run, op: Op, backward: bool, inputs, label: str) -> dict:
    """ms per call of every implementation (None: failed; a string: not run)."""
    times = {}
    for name, fn in implementations(run, op, backward).items():
        if isinstance(fn, str):
            times[name] = fn
            continue

        def measure(fn=fn, name=name):
            call = make_call(fn, op, inputs, backward)
            if name in ("compile", "liger"):
                run.first_call(call)  # compiles / JIT-compiles the Triton kernels
            return run.ms(call, **run.opts.repeats)

        times[name] = run.attempt(f"{name} {label}", measure)
    if times["normax"] is None:
        run.failed = True
    return times


def table(run: Run, shape, dtype):
    inputs = make_inputs(run, shape, dtype)
    x = inputs["x"]
    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    copy_ms = run.ms(lambda: dst.copy_(x), **run.opts.repeats)
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    dname = str(dtype).split(".")[-1]
    print(f"\n{shape[0]}x{shape[1]} {dname}: copy {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s", flush=True)
    head = f"  {'case':22s} {'normax ms':>9s} {'GB/s':>6s} {'%copy':>5s}"
    head += "".join(f" {p + ' ms   x':>15s}" for p in PEERS)
    print(head + ("  target" if run.opts.targets else ""))
    large = shape[0] >= 1024
    for op in OPS:
        for backward in [True] if op.loss else [False, True]:
            case = f"{op.name} {'fwd+bwd' if backward else 'fwd'}"
            label = f"{case} {shape[0]}x{shape[1]} {dname}"
            times = bench_case(run, op, backward, inputs, label)
            ms = times["normax"]
            passes = 2 if (not backward or op.loss) else 5
            line = f"  {case:22s} "
            if ms is None:
                line += f"{'err':>9s} {'':>6s} {'':>5s}"
            else:
                gbs = passes * nbytes / ms / 1e6
                line += f"{ms:9.3f} {gbs:6.0f} {gbs / copy_gbs:5.0%}"
            for p in PEERS:  # x = peer / normax
                v = times[p]
                if isinstance(v, str) or v is None or ms is None:
                    line += f" {v if isinstance(v, str) else 'err' if v is None else f'{v:.3f}':>15s}"
                else:
                    line += f" {v:8.3f} {v / ms:5.2f}x"
            if run.opts.targets:
                line += "  " + case_target(run, op, backward, large, times, ms, passes * nbytes, copy_gbs)
            print(line, flush=True)


def case_target(run: Run, op: Op, backward: bool, large: bool, times, ms, nbytes, copy_gbs) -> str:
    peers = {p: v for p, v in times.items() if p != "normax" and isinstance(v, float)}
    if not backward:
        if large:
            want = f">= {TARGET_FWD_COPY:.0%} of copy"
            if ms is None:
                return run.target(False, want, "normax failed")
            frac = nbytes / ms / 1e6 / copy_gbs
            return run.target(frac >= TARGET_FWD_COPY, want, f"{frac:.0%} of copy")
        want = ">= 1.0x torch"
        if ms is None or "torch" not in peers:
            return run.target(False, want, "normax failed" if ms is None else "no torch time")
        return run.target(peers["torch"] >= ms, want, f"{peers['torch'] / ms:.2f}x torch")
    if op.name not in FWD_BWD_TARGETED:
        return ""  # the issue sets no forward+backward target for the softmax family
    want = f">= {TARGET_FWD_BWD}x the fastest peer"
    if ms is None or not peers:
        return run.target(False, want, "normax failed" if ms is None else "no peer time")
    best = min(peers, key=peers.get)
    ratio = peers[best] / ms
    return run.target(ratio >= TARGET_FWD_BWD, want, f"{ratio:.2f}x {best}")


# ---------------------------------------------------------------------------------------------
# host time per call


def host(run: Run):
    """Wall time per call at 8x64 float32, a sync after each batch of calls."""

    def synced_clock(fn, calls=1):
        def batch():
            for _ in range(calls):
                fn()
            run.sync()

        return wall_clock(batch)

    inputs = make_inputs(run, HOST_SHAPE, torch.float32)
    print(f"\nhost: wall µs per call, {HOST_SHAPE[0]}x{HOST_SHAPE[1]} float32 (a CUDA sync per batch of 100)")
    print(
        f"  {'case':22s} {'normax µs':>9s} {'torch µs':>9s} {'normax/torch':>12s}"
        + ("  target" if run.opts.targets else "")
    )
    for op in OPS:
        for backward in [False, True]:
            case = f"{op.name} {'fwd+bwd' if backward else 'fwd'}"
            us = {}
            for name, fn in (("normax", op.normax), ("torch", op.torch)):
                call = make_call(fn, op, inputs, backward)
                us[name] = run.attempt(
                    f"host {name} {case}",
                    lambda call=call: 1e6 * median_time(call, min_runs=7, max_runs=7, calls=100, warmup=20, clock=synced_clock),
                )  # fmt: skip
            if us["normax"] is None:
                run.failed = True
            mine, theirs = us["normax"], us["torch"]
            cell = lambda v: f"{v:9.1f}" if v is not None else f"{'err':>9s}"
            ratio = f"{mine / theirs:12.2f}" if mine and theirs else f"{'-':>12s}"
            line = f"  {case:22s} {cell(mine)} {cell(theirs)} {ratio}"
            if run.opts.targets:
                calls = 2 if backward else 1
                want = f"<= {TARGET_HOST_US * calls:.0f} µs: {calls} op call{'s' if calls > 1 else ''}"
                line += "  " + run.target(mine is not None and mine <= TARGET_HOST_US * calls, want,
                                          f"{mine:.0f} µs" if mine is not None else "normax failed")  # fmt: skip
            print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# linear cross-entropy


def _torch_linear_ce() -> dict:
    """torch >= 2.13's F.linear_cross_entropy: its reference path and its chunked options (the
    default "auto" policy, "compact" on CUDA, and "accurate"), where the installed torch has them."""
    if not hasattr(F, "linear_cross_entropy"):
        return {}
    out = {"torch F.linear_cross_entropy": lambda hid, w, t: F.linear_cross_entropy(hid, w, t)}
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is not None:
        for label, opt in (("chunked", options()), ("chunked accurate", options(acc_policy="accurate"))):
            out[f"torch F.linear_CE {label}"] = lambda hid, w, t, opt=opt: F.linear_cross_entropy(
                hid, w, t, options=opt
            )
    return out


def linear_ce(run: Run):
    n, h, v = (64, 32, 500) if run.dry else LINEAR_CE
    dtype = torch.bfloat16
    g = torch.Generator(device=run.dev).manual_seed(0)
    hid = torch.randn(n, h, generator=g, device=run.dev).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g, device=run.dev) / math.sqrt(h)).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g, device=run.dev)
    grads_gib = (hid.numel() + w.numel()) * hid.element_size() / GIB

    def torch_eager(hid, w, t):
        return F.cross_entropy(hid @ w.T, t)

    impls = {
        "normax": lambda hid, w, t: nt.linear_cross_entropy(hid, w, t),
        'normax accumulation="input"': lambda hid, w, t: nt.linear_cross_entropy(hid, w, t, accumulation="input"),
        "torch eager (matmul + CE)": torch_eager,
    }
    impls.update(_torch_linear_ce())
    impls["torch.compile (matmul + CE)"] = run.compiled(torch_eager) or ("skip" if run.dry else "late")
    if run.liger is not None:
        impls["Liger fused linear CE"] = lambda hid, w, t: run.liger.liger_fused_linear_cross_entropy(
            hid, w, t
        )
    print(f"\nlinear cross-entropy N={n} H={h} V={v} bfloat16, forward+backward "
          f"(the gradients dh, dW alone: {grads_gib:.2f} GiB)")  # fmt: skip
    print("  x = time / normax's; extra: peak memory above the inputs, the gradients included")
    print(f"  {'implementation':34s} {'ms':>8s} {'x':>6s} {'extra GiB':>9s} {'loss':>9s}  loss dtype")
    results = {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            results[name] = fn
            continue

        def step(fn=fn):
            loss = fn(hid, w, t)
            return loss, torch.autograd.grad(loss, (hid, w))

        def measure(step=step, name=name):
            if name.startswith(("torch.compile", "Liger")):
                run.first_call(step)  # compiles
            else:
                step()
            gc.collect()
            run.sync()
            extra = None
            if not run.dry:
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            loss, _ = step()
            run.sync()
            if not run.dry:
                extra = (torch.cuda.max_memory_allocated() - base) / GIB
            return run.ms(step, runs=5, calls=1, warmup=0), extra, loss.detach()

        results[name] = run.attempt(f"linear CE {name}", measure)
    base_ms = (results.get("normax") or (None,))[0]
    for name, r in results.items():
        if r is None or isinstance(r, str):
            print(f"  {name:34s} {r or 'err':>8s}")
            continue
        ms, extra, loss = r
        ratio = f"{ms / base_ms:6.2f}" if base_ms else f"{'-':>6s}"
        mem = f"{extra:9.2f}" if extra is not None else f"{'-':>9s}"
        print(f"  {name:34s} {ms:8.2f} {ratio} {mem} {float(loss):9.4f}  {str(loss.dtype).split('.')[-1]}")
    mine = results.get("normax")
    if mine is None:
        run.failed = True
    if run.opts.targets:
        linear_ce_targets(run, results, grads_gib)


def linear_ce_targets(run: Run, results: dict, grads_gib: float) -> None:
    """Issue 22's: time <= torch.compile's, extra memory <= Liger's + 10% (without Liger: the
    gradients + 256 MiB), a float32 loss; for each normax mode."""
    measured = {k: v for k, v in results.items() if isinstance(v, tuple)}
    compiled, liger = measured.get("torch.compile (matmul + CE)"), measured.get("Liger fused linear CE")
    limit, of = grads_gib + 0.25, "dh + dW + 256 MiB"
    if liger is not None and liger[1] is not None:
        limit, of = liger[1] * 1.1, "Liger + 10%"
    print("  targets (issue 22, item 5):")
    for name in ("normax", 'normax accumulation="input"'):
        mine = measured.get(name)
        if mine is None:
            print(f"    {name}: " + run.target(False, "normax runs", "normax failed"))
            continue
        ms, extra, loss = mine
        if compiled is not None:
            want = f"<= torch.compile {compiled[0]:.2f} ms"
            print(f"    {name} time: " + run.target(ms <= compiled[0], want, f"{ms:.2f} ms"))
        if extra is not None:
            want = f"<= {of} = {limit:.2f} GiB"
            print(f"    {name} memory: " + run.target(extra <= limit, want, f"{extra:.2f} GiB"))
        print(f"    {name} loss: " + run.target(loss.dtype == torch.float32, "float32", str(loss.dtype)))


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16384x4096 bfloat16 and the host rows only")
    parser.add_argument("--targets", action="store_true", help="print issue 11's targets, PASS or MISS")
    parser.add_argument("--dry-run", action="store_true", help="the plumbing on the CPU at tiny sizes")
    parser.add_argument("--compile-until", type=float, default=None, metavar="S",
                        help="start no torch.compile after S seconds (default 140, 50 with --quick)")  # fmt: skip
    opts = parser.parse_args(argv)
    if opts.compile_until is None:
        opts.compile_until = 50.0 if opts.quick else 140.0
    opts.repeats = (
        {"runs": 3, "calls": 2, "warmup": 1} if opts.dry_run else {"runs": 7, "calls": 10, "warmup": 3}
    )
    if not opts.dry_run and not torch.cuda.is_available():
        print("no CUDA device visible to torch (--dry-run checks this script on the CPU)")
        return 1
    run = Run(opts)
    if opts.dry_run:
        shapes, dtypes = [(64, 256), (8, 1000)], DTYPES
        print("dry run: CPU, tiny sizes, wall clock, one torch thread; no torch.compile, no memory figures")
        torch.set_num_threads(1)  # fewer outliers on a shared machine
    else:
        shapes, dtypes = (SHAPES[:1], DTYPES[:1]) if opts.quick else (SHAPES, DTYPES)
        print(
            f"device: {torch.cuda.get_device_name()}  torch {torch.__version__} (CUDA {torch.version.cuda})"
        )
        # Recompiles per shape and dtype are the point here, beyond dynamo's default limit of 8.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, 256)  # cache_size_limit: its older name
    print(f"normax {normax.__version__} from {normax.__file__}")
    print(f"peers: torch eager, torch.compile (default mode, dynamic=False), {run.liger_about}")
    t0 = time.perf_counter()
    nt.softmax(torch.zeros(2, 2, device=run.dev), -1)
    run.sync()
    print(f"first normax call (NVRTC compile + load of the softmax module): {time.perf_counter() - t0:.2f} s")
    torch.manual_seed(0)
    host(run)
    if not opts.quick:
        linear_ce(run)
    for dtype in dtypes:
        for shape in shapes:
            table(run, shape, dtype)
    print(
        f"\ntorch.compile + Liger first calls: {run.compile_s:.0f} s; total {time.perf_counter() - run.start:.0f} s"
    )
    if run.notes:
        print("errors (err cells):")
        for error, cases in run.notes.items():
            print(f"  {error}\n    in {len(cases)} case(s): {'; '.join(cases)}")
    if opts.targets:
        print(f"targets: {run.met} of {run.met + len(run.misses)} met")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
