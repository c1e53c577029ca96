"""Per-call host cost of normax.torch: forward+backward of small tensors, against torch itself.

At training-step sizes of a small model the kernels take a few microseconds and what a call costs
is the layer around them (custom op dispatch, autograd, tensor <-> array conversions). This times
``loss.backward()`` through each normax.torch op and through torch's own op on an 8x64 float32
tensor (one thread each, interleaved rounds in one process) and prints medians and the ratio.

    python benches/python/host_overhead.py [--rows 8] [--cols 64] [--rounds 30]

Issue 11's target: normax within 1.3x of torch's own forward+backward at 8x64.
"""

from __future__ import annotations

import argparse
import statistics
import time

import normax
import normax.torch as nt
import torch
import torch.nn.functional as F


def _cases(rows: int, cols: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g, requires_grad=True)
    t = torch.randint(0, cols, (rows,), generator=g)
    w = torch.ones(cols, requires_grad=True)
    b = torch.zeros(cols, requires_grad=True)
    return {
        "softmax": (lambda: F.softmax(x, -1).sum(), lambda: nt.softmax(x, -1).sum()),
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


def _round(f, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        f().backward()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="rows of the input (default 8)")
    parser.add_argument("--cols", type=int, default=64, help="columns of the input (default 64)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (default 30)")
    parser.add_argument("--calls", type=int, default=200, help="fwd+bwd calls per round (default 200)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    normax.set_num_threads(1)
    print(
        f"forward+backward of a {args.rows}x{args.cols} float32 tensor, 1 thread, torch {torch.__version__}"
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


if __name__ == "__main__":
    main()
