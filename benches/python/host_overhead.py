"""Per-call host cost of normax.torch: forward+backward of small tensors, against torch itself.

At training-step sizes of a small model the kernels take a few microseconds and what a call costs
is the layer around them (custom op dispatch, autograd, tensor <-> array conversions). This times
``loss.backward()`` through each normax.torch op and through torch's own op on an 8x64 float32
tensor (one thread each, interleaved rounds in one process) and prints medians and the ratio.

    python benches/python/host_overhead.py [--rows 8] [--cols 64] [--rounds 30] [--clock cpu]

Issue 25's target: normax within 1.3x of torch's own forward+backward at 8x64 for softmax,
rms_norm, layer_norm and cross_entropy. ``--clock cpu`` times with the calling thread's CPU time
(``time.thread_time``) instead of the wall clock: with one thread each, that is the call's own
cost however busy the machine is (a shared machine's other processes only stretch the wall clock).
The "floor" row is no normax op: torch's softmax inside a Python ``torch.autograd.Function``, the
least any op built that way costs. A last table times ``normax.softmax`` of a NumPy array with and without ``out=`` (issue 25: out=
must not cost more than the call without it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import normax
import normax.torch as nt
import numpy as np
import torch
import torch.nn.functional as F


class _TorchSoftmax(torch.autograd.Function):
    """torch's own softmax and backward inside a Python autograd node: the floor of any op built
    as a ``torch.autograd.Function`` (as normax.torch's direct route is)."""

    @staticmethod
    def forward(ctx, x, dim):
        y = torch.softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, y, ctx.dim, y.dtype), None


def _cases(rows: int, cols: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g, requires_grad=True)
    t = torch.randint(0, cols, (rows,), generator=g)
    w = torch.ones(cols, requires_grad=True)
    b = torch.zeros(cols, requires_grad=True)
    return {
        "softmax": (lambda: F.softmax(x, -1).sum(), lambda: nt.softmax(x, -1).sum()),
        "floor": (lambda: F.softmax(x, -1).sum(), lambda: _TorchSoftmax.apply(x, -1).sum()),
        "log_softmax": (lambda: F.log_softmax(x, -1).sum(), lambda: nt.log_softmax(x, -1).sum()),
        "logsumexp": (lambda: torch.logsumexp(x, -1).sum(), lambda: nt.logsumexp(x, -1).sum()),
        "cross_entropy": (lambda: F.cross_entropy(x, t), lambda: nt.cross_entropy(x, t)),
        "rms_norm": (
            lambda: F.rms_norm(x, (cols,), w, 1e-6).sum(),
            lambda: nt.rms_norm(x, (cols,), w, 1e-6).sum(),
        ),
        "layer_norm": (
            lambda: F.layer_norm(x, (cols,), w, b, 1e-5).sum(),
            lambda: nt.layer_norm(x, (cols,), w, b, 1e-5).sum(),
        ),
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _round(f, calls: int) -> float:
    start = _clock()
    for _ in range(calls):
        f().backward()
    return (_clock() - start) / calls * 1e6


def _calls(f, calls: int) -> float:
    start = _clock()
    for _ in range(calls):
        f()
    return (_clock() - start) / calls * 1e6


def _out_costs(rounds: int, calls: int) -> None:
    """normax.softmax of small float32 arrays: fresh result, out= another array, out= itself."""
    print(f"\n{'softmax':<14} {'no out us':>9} {'out= us':>10} {'out=x us':>9} {'out/no out':>11}")
    for shape in ((8, 16), (8, 64), (64, 256)):
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        out, inplace = np.empty_like(x), x.copy()
        variants = (
            lambda x=x: normax.softmax(x),
            lambda x=x, out=out: normax.softmax(x, out=out),
            lambda a=inplace: normax.softmax(a, out=a),
        )
        times = [[] for _ in variants]
        for _ in range(rounds):
            for t, f in zip(times, variants):
                t.append(_calls(f, calls))
        a, b, c = (statistics.median(t) for t in times)
        print(f"{'x'.join(map(str, shape)):<14} {a:9.2f} {b:10.2f} {c:9.2f} {b / a:10.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="rows of the input (default 8)")
    parser.add_argument("--cols", type=int, default=64, help="columns of the input (default 64)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (default 30)")
    parser.add_argument("--calls", type=int, default=200, help="fwd+bwd calls per round (default 200)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall clock or this thread's CPU time (default wall)",
    )
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    normax.set_num_threads(1)
    print(
        f"forward+backward of a {args.rows}x{args.cols} float32 tensor, 1 thread, torch {torch.__version__}, "
        f"{args.clock} clock, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'op':<14} {'torch us':>9} {'normax us':>10} {'normax/torch':>13} {'spread':>7}")
    for name, (theirs, ours) in _cases(args.rows, args.cols).items():
        for f in (theirs, ours):
            _round(f, args.calls)  # warm-up
        t_theirs, t_ours = [], []
        for _ in range(args.rounds):
            t_theirs.append(_round(theirs, args.calls))
            t_ours.append(_round(ours, args.calls))
        a, b = statistics.median(t_theirs), statistics.median(t_ours)
        # Spread: the interquartile range of normax's rounds over its median (noise on a busy machine).
        q = statistics.quantiles(t_ours, n=4)
        print(f"{name:<14} {a:9.1f} {b:10.1f} {b / a:12.2f}x {(q[2] - q[0]) / b:6.0%}")
    _out_costs(args.rounds, args.calls * 10)


if __name__ == "__main__":
    main()
