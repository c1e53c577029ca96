"""The peer comparison: normax against NumPy, SciPy, PyTorch and JAX in one process.

    python -m normax.bench                 # every suite, default shapes
    python -m normax.bench --suite softmax --plot bench.png

Each case times normax and every installed peer on the same data, back to back, and prints
medians, normax's speedup over each peer (peer time / normax time), and normax's effective
bandwidth against the machine's copy bandwidth measured in the same run (the roofline). No
absolute time is a result on its own: the machines are shared and noisy, the ratios are the point.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import normax


@dataclass
class Case:
    """One measured case: normax and each peer's median seconds on the same input."""

    suite: str
    op: str
    shape: tuple
    variant: str
    bytes_moved: int  # the roofline's bytes: what an ideal kernel reads + writes
    normax_s: float
    peers: dict = field(default_factory=dict)  # peer name -> median seconds
    note: str = ""

    def speedup(self, peer):
        return self.peers[peer] / self.normax_s if peer in self.peers else None

    def gbps(self):
        return self.bytes_moved / self.normax_s / 1e9 if self.bytes_moved else float("nan")


def median_time(fn, budget_s=1.0, min_runs=5, max_runs=50):
    """Median wall time of fn() after one warm-up call, repeated within about `budget_s`.

    Calls shorter than 20 us are timed in batches (and divided), so the timer's own overhead does
    not swamp microsecond calls such as the 8x16 case and its np.exp yardstick.
    """
    fn()
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    batch = max(1, int(20e-6 / max(single, 1e-9)))
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


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


def peers_available():
    """Importable peers: name -> module (or None where missing)."""
    found = {}
    for name in ("scipy.special", "torch", "jax"):
        try:
            found[name] = __import__(name, fromlist=["_"])
        except Exception:  # noqa: BLE001 - a broken install counts as missing
            found[name] = None
    return found


def _softmax_specs(x, dy, out, xt, xj, sp, torch, jax, jitted):
    """(op, variant, roofline bytes, normax call, {peer: call}) for one input."""
    n = x.size

    def numpy_softmax(a, axis=-1):
        e = np.exp(a - a.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    def numpy_log_softmax(a, axis=-1):
        s = a - a.max(axis=axis, keepdims=True)
        return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))

    def numpy_logsumexp(a, axis=-1):
        m = a.max(axis=axis, keepdims=True)
        return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)

    return [
        (
            "softmax",
            "fresh",
            8 * n,
            lambda: normax.softmax(x),
            {
                "numpy": lambda: numpy_softmax(x),
                "scipy": sp and (lambda: sp.softmax(x, axis=-1)),
                "torch": torch and (lambda: torch.softmax(xt, -1)),
                "jax": jax and (lambda: jitted["softmax"](xj).block_until_ready()),
            },
        ),
        (
            "softmax",
            "out=",
            8 * n,
            lambda: normax.softmax(x, out=out),
            {
                "torch": torch and (lambda: torch.softmax(xt, -1, out=torch.from_numpy(out))),
            },
        ),
        (
            "softmax",
            "axis=0",
            8 * n,
            lambda: normax.softmax(x, axis=0),
            {
                "numpy": lambda: numpy_softmax(x, 0),
                "torch": torch and (lambda: torch.softmax(xt, 0)),
            },
        ),
        (
            "log_softmax",
            "fresh",
            8 * n,
            lambda: normax.log_softmax(x),
            {
                "numpy": lambda: numpy_log_softmax(x),
                "scipy": sp and (lambda: sp.log_softmax(x, axis=-1)),
                "torch": torch and (lambda: torch.log_softmax(xt, -1)),
                "jax": jax and (lambda: jitted["log_softmax"](xj).block_until_ready()),
            },
        ),
        (
            "log_softmax",
            "out=",
            8 * n,
            lambda: normax.log_softmax(x, out=out),
            {
                "torch": torch and (lambda: torch.log_softmax(xt, -1, out=torch.from_numpy(out))),
            },
        ),
        (
            "logsumexp",
            "fresh",
            4 * n,
            lambda: normax.logsumexp(x),
            {
                "numpy": lambda: numpy_logsumexp(x),
                "scipy": sp and (lambda: sp.logsumexp(x, axis=-1)),
                "torch": torch and (lambda: torch.logsumexp(xt, -1)),
                "jax": jax and (lambda: jitted["logsumexp"](xj).block_until_ready()),
            },
        ),
        (
            "softmax_backward",
            "fresh",
            12 * n,
            lambda: normax.softmax_backward(x, dy),
            {
                "numpy": lambda: x * (dy - (dy * x).sum(-1, keepdims=True)),
                "torch": torch
                and (lambda: torch._softmax_backward_data(torch.from_numpy(dy), xt, -1, torch.float32)),
            },
        ),
        (
            "log_softmax_backward",
            "fresh",
            12 * n,
            lambda: normax.log_softmax_backward(x, dy),
            {
                "numpy": lambda: dy - np.exp(x) * dy.sum(-1, keepdims=True),
                "torch": torch
                and (lambda: torch._log_softmax_backward_data(torch.from_numpy(dy), xt, -1, torch.float32)),
            },
        ),
    ]


def softmax_suite(shapes, budget_s):
    """softmax, log_softmax, logsumexp (fresh output, out=, axis=0) and the two backwards."""
    mods = peers_available()
    torch, jax, sp = mods["torch"], mods["jax"], mods["scipy.special"]
    if torch is not None:
        torch.set_num_threads(normax.get_num_threads())
    jitted = {}
    if jax is not None:
        import jax.numpy as jnp

        jitted = {
            "softmax": jax.jit(lambda a: jax.nn.softmax(a, axis=-1)),
            "log_softmax": jax.jit(lambda a: jax.nn.log_softmax(a, axis=-1)),
            "logsumexp": jax.jit(lambda a: jax.nn.logsumexp(a, axis=-1)),
        }
    cases = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = rng.normal(0.0, 5.0, shape).astype(np.float32)
        dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
        n = x.size
        out = np.empty_like(x)
        xt = torch.from_numpy(x) if torch is not None else None
        xj = jnp.asarray(x) if jax is not None else None

        specs = _softmax_specs(x, dy, out, xt, xj, sp, torch, jax, jitted)
        small = n <= 1 << 12
        for op, variant, nbytes, ours, peers in specs:
            if variant == "axis=0" and small:
                continue
            case = Case("softmax", op, shape, variant, nbytes, median_time(ours, budget_s))
            for name, fn in peers.items():
                if fn:
                    case.peers[name] = median_time(fn, budget_s)
            if small and op == "softmax" and variant == "fresh":
                # The call-overhead yardstick: one NumPy ufunc call on the same array.
                case.peers["np.exp"] = median_time(functools.partial(np.exp, x), budget_s)
            cases.append(case)
    return cases


def _cases_from_rows(suite, rows, bytes_per_element):
    """Cases from a suite's (op, shape, peer, normax_s, peer_s) rows: one case per (op, shape)."""
    cases = {}
    for op, shape, peer, ours, theirs, *note in rows:
        key = (op, tuple(shape))
        if key not in cases:
            n = int(np.prod(shape))
            per = next((v for k, v in bytes_per_element.items() if k in op), 8)
            cases[key] = Case(suite, op, tuple(shape), "", per * n, ours)
        cases[key].peers[peer] = theirs
        if note and note[0]:
            cases[key].note = note[0]
    return list(cases.values())


def norms_suite(budget_s):
    """rms_norm, layer_norm (forward, out=, forward+backward) and PowerNorm forward+backward."""
    from ._bench_norms import bench_norms

    repeats = max(3, int(5 * budget_s / 0.5))
    # fwd+bwd: forward reads x, writes y; backward reads dy and x, writes dx (20 bytes/element).
    return _cases_from_rows("norms", bench_norms(repeats=repeats), {"fwd+bwd": 20})


def cross_entropy_suite(budget_s):
    """cross_entropy_with_grad (fresh gradient and in place) and linear_cross_entropy_with_grad."""
    from ._bench_ce import bench_cross_entropy

    repeats = max(3, int(5 * budget_s / 0.5))
    rows = bench_cross_entropy(repeats=repeats, linear_repeats=1)
    # Roofline bytes: logits read + gradient written; the linear case is GEMM-bound (no roofline).
    cases = _cases_from_rows("cross_entropy", rows, {"linear": 0, "": 8})
    return cases


SUITES = {"softmax": softmax_suite, "norms": norms_suite, "cross_entropy": cross_entropy_suite}

DEFAULT_SHAPES = [(8, 16), (4096, 1024), (256, 32768), (32, 128256), (16384, 4096)]


def format_table(cases, copy_gbps):
    peer_names = []
    for c in cases:
        peer_names += [p for p in c.peers if p not in peer_names]
    header = ["op", "shape", "variant", "normax ms", "GB/s", "% copy"]
    for p in peer_names:
        header += [f"{p} ms", f"x{p}"]
    rows = [header]
    for c in cases:
        row = [
            c.op,
            "x".join(map(str, c.shape)),
            c.variant,
            f"{c.normax_s * 1e3:.3f}",
            f"{c.gbps():.1f}",
            f"{100 * c.gbps() / copy_gbps:.0f}%",
        ]
        for p in peer_names:
            if p in c.peers:
                row += [f"{c.peers[p] * 1e3:.3f}", f"{c.speedup(p):.2f}"]
            else:
                row += ["-", "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets(cases, copy_gbps):
    """The issue's targets, each with its measured number: (description, value, goal, met)."""
    found = []

    def get(op, shape, variant):
        for c in cases:
            if (c.op, c.shape, c.variant) == (op, shape, variant):
                return c
        return None

    for op in ("softmax", "log_softmax"):
        c = get(op, (16384, 4096), "fresh")
        if c and "torch" in c.peers:
            found.append((f"{op} 16384x4096 fresh vs torch", c.speedup("torch"), 2.5, "x"))
        c = get(op, (16384, 4096), "out=")
        if c:
            found.append((f"{op} 16384x4096 out= % of copy bandwidth", 100 * c.gbps() / copy_gbps, 70, "%"))
        c = get(op, (32, 128256), "fresh")
        if c and "torch" in c.peers:
            found.append((f"{op} 32x128256 vs torch", c.speedup("torch"), 1.5, "x"))
    for shape in ((16384, 4096), (4096, 1024)):
        for op, peer, goal in (
            ("rms_norm", "torch", 4.0),
            ("rms_norm", "jax", 1.5),
            ("layer_norm", "torch", 1.5),
            ("rms_norm fwd+bwd", "torch", 2.0),
            ("layer_norm fwd+bwd", "torch", 2.0),
        ):
            c = get(op, shape, "")
            if c and peer in c.peers:
                found.append((f"{op} {shape[0]}x{shape[1]} vs {peer}", c.speedup(peer), goal, "x"))
        for op in ("rms_norm out=", "layer_norm out="):
            c = get(op, shape, "")
            if c:
                found.append(
                    (f"{op} {shape[0]}x{shape[1]} % of copy bandwidth", 100 * c.gbps() / copy_gbps, 70, "%")
                )
    for c in cases:
        if c.op.startswith("power_norm") and "torch" in c.peers:
            found.append(
                (f"{c.op} {'x'.join(map(str, c.shape))} vs torch MaskPowerNorm", c.speedup("torch"), 3.0, "x")
            )
    for shape, goal in (((16384, 4096), 4.0), ((32, 128256), 2.0)):
        c = get("cross_entropy_with_grad", shape, "")
        if c and "torch" in c.peers:
            found.append(
                (
                    f"cross_entropy_with_grad {shape[0]}x{shape[1]} vs torch fwd+bwd",
                    c.speedup("torch"),
                    goal,
                    "x",
                )
            )
    for c in cases:
        if c.op == "linear_cross_entropy_with_grad" and c.peers:
            peer = next(iter(c.peers))
            found.append(
                (
                    f"linear_cross_entropy_with_grad {'x'.join(map(str, c.shape))} time / torch time (at most)",
                    c.normax_s / c.peers[peer],
                    1.3,
                    "<=",
                )
            )
    c = get("softmax", (8, 16), "fresh")
    if c and "np.exp" in c.peers:
        found.append(("softmax 8x16 cost / np.exp cost (at most)", c.normax_s / c.peers["np.exp"], 3.0, "<="))
    return found


def plot(cases, copy_gbps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c.op}\n{'x'.join(map(str, c.shape))} {c.variant}" for c in cases]
    peer_names = sorted({p for c in cases for p in c.peers if p != "np.exp"})
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(cases)), 5))
    width = 0.8 / max(1, len(peer_names))
    for i, p in enumerate(peer_names):
        xs = [k + i * width for k, c in enumerate(cases) if p in c.peers]
        ys = [c.speedup(p) for c in cases if p in c.peers]
        ax.bar(xs, ys, width, label=f"vs {p}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("normax speedup (peer time / normax time)")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_title(
        f"normax vs peers, float32, {normax.get_num_threads()} threads (copy bandwidth {copy_gbps:.0f} GB/s)"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    parser = argparse.ArgumentParser(prog="python -m normax.bench", description=__doc__.splitlines()[0])
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
    shapes = DEFAULT_SHAPES
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
    # softmax first: the linear cross-entropy's gigabytes of allocations fragment the huge pages
    # later fresh outputs would get.
    for name in args.suite or list(SUITES):
        suite_cases = SUITES[name](shapes, args.budget) if name == "softmax" else SUITES[name](args.budget)
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
