"""The host side of the normax.torch CUDA path, measured without a GPU: a census and the glue's cost.

The CUDA thin path (``normax/torch/_cuda.py``) is driven on CPU tensors: :func:`cuda_route_on_cpu`
makes every tensor take the CUDA kernels and turns on the Rust side's dry-run recorder
(``_core.cuda_record``), so the real bindings and the real Rust launch sequences run, and each
launch, memset, scratch allocation or synchronisation is recorded instead of sent to a driver. For
each op and direction this prints the kernel launches, the torch ops the path ran (only output
allocations are expected), and the median time of the call (Python, autograd, the binding, the
Rust sequence; not the driver's own cuLaunchKernel, about 2-4 µs a launch on a GPU machine), next
to torch's own op on the same CPU tensors and to the floor of any autograd Function (an identity
Function: ``apply`` alone forward, the autograd engine's ``grad`` through it backward), in the same
process.

    python benches/gpu/host_cost.py [--rows 8] [--cols 64] [--rounds 300]

Issue 22's target: at most 40 µs per direction per op on the 2-core development VM.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

STREAM = 0x5EED  # a stand-in stream handle: the recorder never hands it to a driver
ALLOCATIONS = frozenset(
    {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided"}
)


@contextlib.contextmanager
def cuda_route_on_cpu():
    """CPU tensors take the CUDA thin path with the launches recorded; yields the record (a list
    of (event, name, grid, block), filled when the block ends)."""
    from normax import _core
    from normax.torch import _cuda

    saved = _cuda.on_cuda, _cuda.stream
    _cuda.on_cuda = lambda t: True
    _cuda.stream = lambda t: _core.CudaStream(0, STREAM)
    record: list = []
    _core.cuda_record(True)
    try:
        yield record
    finally:
        record += _core.cuda_record(False)
        _cuda.on_cuda, _cuda.stream = saved


@dataclass
class Direction:
    """What one direction of one op asked for."""

    launches: list = field(default_factory=list)
    other_events: list = field(default_factory=list)  # memsets, allocations, syncs
    torch_ops: list = field(default_factory=list)  # aten ops other than output allocations


def _profiled(f):
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu) as prof, cuda_route_on_cpu() as record:
        out = f()
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in ALLOCATIONS]
    d = Direction(torch_ops=ops)
    for event in record:
        (d.launches if event[0] == "launch" else d.other_events).append(event[:2])
    return out, d


def cases(rows: int, cols: int, dtype=torch.bfloat16):
    """name -> (forward returning (output, inputs to differentiate), output gradient, torch's own op)."""
    from normax import torch as nt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, cols, (rows,), generator=g)
    w = torch.ones(cols, dtype=dtype, requires_grad=True)
    b = torch.zeros(cols, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, cols, generator=g).to(dtype)
    return {
        "cross_entropy": (lambda: (nt.cross_entropy(x, t), (x,)), torch.ones((), dtype=dtype),
                          lambda: F.cross_entropy(x, t)),
        "rms_norm": (lambda: (nt.rms_norm(x, (cols,), w, 1e-6), (x, w)), dy,
                     lambda: F.rms_norm(x, (cols,), w, 1e-6)),
        "layer_norm": (lambda: (nt.layer_norm(x, (cols,), w, b), (x, w, b)), dy,
                       lambda: F.layer_norm(x, (cols,), w, b)),
        "softmax": (lambda: (nt.softmax(x, -1), (x,)), dy, lambda: F.softmax(x, -1)),
        "log_softmax": (lambda: (nt.log_softmax(x, -1), (x,)), dy, lambda: F.log_softmax(x, -1)),
    }  # fmt: skip


def census(case) -> tuple[Direction, Direction]:
    """(forward, backward) of one case on the recorded CUDA route."""
    forward, grad, _ = case
    (out, inputs), fwd = _profiled(forward)
    _, bwd = _profiled(lambda: torch.autograd.grad(out, inputs, grad))
    return fwd, bwd


class _Identity(torch.autograd.Function):
    """The least an op with an autograd Function costs: no allocation, no kernel."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _median_us(f, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def timings(case, rounds: int) -> dict:
    """Median µs of the forward and of the backward, recorded CUDA route and torch's CPU op."""
    forward, grad, torch_op = case
    r = {}
    with cuda_route_on_cpu():
        out, inputs = forward()
        r["fwd"] = _median_us(forward, rounds)
        r["bwd"] = _median_us(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), rounds)
    out = torch_op()
    r["torch fwd"] = _median_us(torch_op, rounds)
    r["torch bwd"] = _median_us(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), rounds)
    x = inputs[0]
    r["floor fwd"] = _median_us(lambda: _Identity.apply(x), rounds)
    out = _Identity.apply(x)
    r["floor bwd"] = _median_us(lambda: torch.autograd.grad(out, x, x, retain_graph=True), rounds)
    return r


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--cols", type=int, default=64)
    p.add_argument("--rounds", type=int, default=300)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"normax.torch CUDA path on the host, {a.rows}x{a.cols} bfloat16, recorded (no driver); "
          f"median µs of {a.rounds} calls; torch = torch's own op on these CPU tensors")  # fmt: skip
    print(
        f"{'op':14} {'dir':4} {'launches':>8} {'other':>6} {'torch ops':>9} {'µs':>7} {'torch µs':>9} "
        f"{'floor µs':>9}"
    )
    for name, case in cases(a.rows, a.cols).items():
        fwd, bwd = census(case)
        t = timings(case, a.rounds)
        for direction, d in (("fwd", fwd), ("bwd", bwd)):
            print(
                f"{name:14} {direction:4} {len(d.launches):8d} {len(d.other_events):6d} {len(d.torch_ops):9d} "
                f"{t[direction]:7.1f} {t['torch ' + direction]:9.1f} {t['floor ' + direction]:9.1f}"
            )


if __name__ == "__main__":
    main()
