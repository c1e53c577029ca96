"""The peer comparison: normax against NumPy, SciPy, PyTorch and JAX in one process.

    python benches/python/bench.py                 # every suite, default shapes (about 4 minutes)
    python benches/python/bench.py --suite softmax --shapes 4096x1024 --plot bench.png

Each case times normax and every installed peer on the same data in interleaved rounds and prints
a line as soon as it is measured: normax's median time and the spread of its runs, its effective
bandwidth against a parallel copy measured in the same run (the roofline), and normax's speedup
over each peer (the median over the rounds of peer time / normax time, higher is better; marked ~
where the runs of either spread more than 10% or were fewer than 3: noise on a shared machine, not
a result). Yardsticks (a copy, np.exp on the same array) are shown beside their case, never as a
speedup. The machines are shared and noisy: the ratios are the point, not the absolute times. The
suites (softmax.py, norms.py, cross_entropy.py) import normax as any user does.

What a line measures (timer.compare), in one of two situations:

- settled (every line): a run is a batch of back-to-back calls lasting at least 20 ms, as in a
  user's loop, started once no thread of the process used CPU for a 2 ms slice (timer.settle: no
  peer's spinning pool takes a core from the next). The batch is sized from the fastest of three
  calls after a warm-up: the first calls can pay page faults that the loop does not (a heap
  growing to hold a 16 MiB output: 4,700 page faults in the second call of normax.softmax of
  4096x1024, 46 ms on a busy VM). Sized from such a call, every run would be one call straight
  after settle()'s sleep, timing a thread pool woken from sleep and data reloaded into the cache
  each time (2.26 ms ±29% for that softmax, which takes 0.86 ms in a loop).
- after a torch op (the line below its settled twin, for the inputs that stay in the cache:
  softmax suite 4096x1024 and 32x128256, norms 4096x1024; normax against torch only): every timed
  call right after an untimed torch.softmax of a 256x1024 tensor, normax's and torch's alike, so
  torch's OpenMP workers still spin (a few ms of CPU after each parallel call) while the call
  runs: the situation of a normax.torch op in a model. One call per run, many runs.

A fresh output over 32 MiB (the 16384x4096 cases) is new memory at every call, in a user's loop
as here: glibc gives blocks that large back to the OS when they are freed, so each call faults its
output in again (NumPy's arrays in 2 MiB huge pages, torch's in 4 KiB pages), about as long as
``np.empty_like(x).fill(1)`` takes. Those times include it, for every library alike.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import sys
import textwrap
import time

import cross_entropy
import norms
import numpy as np
import softmax
from report import (
    AFTER_TORCH,
    AFTER_TORCH_OP,
    MARK,
    NOISY,
    Table,
    cache_bytes,
    format_targets,
    plot,
    targets,
    versions,
)
from timer import median_time

import normax

# softmax first: the linear cross-entropy's gigabytes of allocations fragment the huge pages
# later fresh outputs would get.
SUITES = {"softmax": softmax, "norms": norms, "cross_entropy": cross_entropy}
# Seconds of a default run per suite on the 2-core VM of the README's table (budget 0.5 s; 107, 38
# and 58 s in that run, plus the budget of the cases timed after a torch op since: 16 and 6 cases
# of 2 contenders x 0.5 s), for the estimate printed up front; the budget scales the timed part.
REFERENCE_S = {"softmax": 126, "norms": 46, "cross_entropy": 60}


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


def load_line(when, load=None, cpus=None):
    """The machine's 1-minute load average and whether it leaves the run's threads their cores:
    on a 2-core machine at load 4 a parallel call waits for a descheduled thread (a scheduler
    slice, milliseconds), and ratios measured so are not results."""
    load = os.getloadavg()[0] if load is None else load
    cpus = cpus or os.cpu_count() or 1
    line = f"load {when}: {load:.1f} on {cpus} CPUs"
    if load > cpus:
        line += " (over its cores: times wait on the scheduler, ratios are not results)"
    return line


def _clock(seconds):
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def estimate_s(names, budget, shapes):
    """A rough run time: the reference machine's seconds per suite, the softmax suite scaled by its
    number of cases and the timed parts by the budget."""
    total = 0.0
    for name in names:
        ref = REFERENCE_S[name] * (0.5 + budget)
        if name == "softmax":
            ref *= softmax.count(shapes) / softmax.count()
        total += ref
    return total


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python benches/python/bench.py", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument(
        "--suite", action="append", choices=list(SUITES), help="suite to run (repeatable; default: all)"
    )
    parser.add_argument("--shapes", help="comma-separated RxC shapes for the softmax suite, e.g. 4096x1024")
    parser.add_argument(
        "--budget",
        type=float,
        default=0.5,
        help="seconds per contender per case, at least 5 runs (default 0.5)",
    )
    parser.add_argument("--threads", type=int, help="threads of normax and torch (default: normax's default)")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw a panel per suite: speedups per peer and GB/s vs the copy roofline",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="also print the developers' performance goals and whether they are met",
    )
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.threads:
        normax.set_num_threads(args.threads)
    shapes = softmax.DEFAULT_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    names = args.suite or list(SUITES)
    total = sum(SUITES[n].count(shapes) if n == "softmax" else SUITES[n].count() for n in names)
    start = time.perf_counter()
    print(f"machine: {machine()}")
    print(load_line("at the start"))
    print(f"versions: normax {normax.__version__}, {versions()}")
    print(
        f"{total} cases in {', '.join(names)}: about {_clock(estimate_s(names, args.budget, shapes))} on a 2-core VM"
    )
    copy_gbps = copy_bandwidth()
    cache = cache_bytes()
    print(
        f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write, {normax.get_num_threads()} threads): the roofline"
    )
    legend = (
        f"xPEER = PEER time / normax time, the median over interleaved rounds (higher is better); "
        f"±% = spread of normax's runs; {MARK} = "
        f"normax's or the peer's runs spread over {100 * NOISY:.0f}% or numbered under 3 (noisy); "
        f"%copy = GB/s / copy "
        f"bandwidth, 'cache' where the data fits in the {cache >> 20} MiB last-level cache. Every line is "
        f"settled: runs of back-to-back calls, each run started with idle thread pools; "
        f"'{AFTER_TORCH}' below a line: the same case, each call right after an untimed "
        f"{AFTER_TORCH_OP} (torch's OpenMP workers still spinning), normax and torch alike"
    )
    print(textwrap.fill(legend, 100))
    cases = []
    for name in names:
        module = SUITES[name]
        table = Table(module.PEERS, module.OP_WIDTH, copy_gbps, cache)
        print(f"\n== {name}")
        if name == "softmax" and any(r * c <= softmax.SMALL for r, c in shapes):
            print(
                f"(up to {softmax.SMALL} elements normax and torch run on 1 thread: see softmax._one_thread)"
            )
        print(table.header(), flush=True)
        gen = module.suite(args.budget, shapes) if name == "softmax" else module.suite(args.budget)
        for case in gen:
            cases.append(case)
            print(f"{table.row(case)}", flush=True)
        print(f"   [{len(cases)}/{total} cases, {_clock(time.perf_counter() - start)} elapsed]", flush=True)
    if args.targets:
        print("\n== developer targets (goals of the performance issues)")
        print(format_targets(targets(cases, copy_gbps)))
    if args.plot:
        plot(cases, copy_gbps, cache, args.plot)
        print(f"\nplot written to {args.plot}")
    print(load_line("at the end"))
    print(f"\ntotal time {_clock(time.perf_counter() - start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
