"""The peer comparison: normax against NumPy, SciPy, PyTorch and JAX in one process.

    python benches/python/bench.py                 # every suite, default shapes
    python benches/python/bench.py --suite softmax --plot bench.png

Each case times normax and every installed peer on the same data, back to back, and prints
medians, normax's speedup over each peer (peer time / normax time), and normax's effective
bandwidth against the machine's copy bandwidth measured in the same run (the roofline). No
absolute time is a result on its own: the machines are shared and noisy, the ratios are the point.
The suites (softmax.py, norms.py, cross_entropy.py) import normax as any user does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import platform
import sys

import cross_entropy
import norms
import numpy as np
import softmax
from report import format_table, peers_available, plot, targets
from timer import median_time

import normax

# softmax first: the linear cross-entropy's gigabytes of allocations fragment the huge pages
# later fresh outputs would get.
SUITES = {"softmax": softmax.suite, "norms": norms.suite, "cross_entropy": cross_entropy.suite}


def copy_bandwidth(nbytes=1 << 30, threads=None):
    """GB/s of a parallel copy (read + write counted), split over the kernel thread count."""
    threads = threads or normax.get_num_threads()
    src = np.ones(nbytes // 8, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts if p.size]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:

        def run():
            list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))

        seconds = median_time(run, budget_s=2.0, min_runs=5, max_runs=10)
    return 2 * src.nbytes / seconds / 1e9


def machine():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return (
        f"{model or platform.machine()}, {normax.get_num_threads()} threads, ISA {normax.get_isa()}, "
        f"Python {platform.python_version()}, NumPy {np.__version__}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suite", action="append", choices=sorted(SUITES), help="suite to run (repeatable; default: all)"
    )
    parser.add_argument("--shapes", help="comma-separated RxC shapes for the softmax suite, e.g. 4096x1024")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per measurement (default 0.5)")
    parser.add_argument("--threads", type=int, help="kernel threads (default: normax's default)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the speedups to this file")
    args = parser.parse_args(argv)
    if args.threads:
        normax.set_num_threads(args.threads)
    shapes = softmax.DEFAULT_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    print(f"machine: {machine()}")
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write, {normax.get_num_threads()} threads)")
    print(
        "versions: "
        + ", ".join(
            f"{n} {getattr(m, '__version__', '?')}" for n, m in peers_available().items() if m is not None
        )
    )
    cases = []
    for name in args.suite or list(SUITES):
        suite_cases = SUITES[name](args.budget, shapes) if name == "softmax" else SUITES[name](args.budget)
        cases += suite_cases
        print(f"\n== {name} (median times; xPEER = PEER time / normax time, higher is better)")
        print(format_table(suite_cases, copy_gbps))
        for c in suite_cases:
            if c.note:
                print(f"  {c.op} {'x'.join(map(str, c.shape))}: {c.note}")
    found = targets(cases, copy_gbps)
    if found:
        print("\n== targets")
        for desc, value, goal, unit in found:
            met = value <= goal if unit == "<=" else value >= goal
            shown = f"{value:.2f}{'%' if unit == '%' else 'x'}"
            print(
                f"  {'met ' if met else 'MISS'}  {desc}: {shown} (target {'<=' if unit == '<=' else '>='} "
                f"{goal}{'%' if unit == '%' else 'x'})"
            )
    if args.plot:
        plot(cases, copy_gbps, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
