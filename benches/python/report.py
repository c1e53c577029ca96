"""What the suites measure and how it is shown: one :class:`Case` per comparison, the table (a
line per case, printed as it finishes), the developer targets (``--targets``), the plot."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field

from timer import Timing, paired_ratio

import normax

# A ratio is marked noisy when normax's or the peer's runs spread more than this (interquartile
# range / median), or when either ran fewer than 3 times: on a shared machine such a ratio can
# move by that much between runs.
NOISY = 0.10
MARK = "~"

# The cache-resident inputs (up to this many bytes: 4096x1024, 32x128256) are also timed right
# after a torch op, the situation of a normax.torch op in a model: see :func:`after_torch_op`.
CACHE_RESIDENT_BYTES = 16 << 20
SETTLED = "settled"
AFTER_TORCH = "after a torch op"
# The torch op run untimed right before every timed call of an AFTER_TORCH case: parallel in
# torch (256 rows, 8 of its grains) and short, so its OpenMP workers still spin (a few ms of CPU
# after it returns) while the timed call runs, and small (1 MiB), so little of the timed call's
# data leaves the cache.
AFTER_TORCH_OP = "torch.softmax of a 256x1024 float32 tensor"


def after_torch_op(torch):
    """The ``before`` of an AFTER_TORCH case: ``AFTER_TORCH_OP``, on torch's current threads."""
    t = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    return lambda: torch.softmax(t, -1)


@dataclass
class Case:
    """One measured case: normax's and each peer's timings on the same input.

    `op` includes the variant ("softmax out=", "rms_norm fwd+bwd"); `bytes_moved` is the
    roofline's bytes (what an ideal kernel reads + writes), 0 where there is none (GEMM-bound).
    Peers are other libraries doing the same work; yardsticks (np.exp, a copy) are not peers:
    they are shown beside the case, never as a speedup. `situation` says when each call was timed:
    SETTLED (batches of back-to-back calls, each started with idle thread pools) or AFTER_TORCH
    (every call right after ``AFTER_TORCH_OP``, normax's and the peers' alike).
    """

    suite: str
    op: str
    shape: tuple
    bytes_moved: int
    normax: Timing
    peers: dict = field(default_factory=dict)  # peer name -> Timing
    yardsticks: dict = field(default_factory=dict)  # description -> Timing
    notes: list = field(default_factory=list)
    situation: str = SETTLED

    def speedup(self, peer):
        """Peer time / normax time: the median of the rounds' ratios (see timer.paired_ratio)."""
        return paired_ratio(self.peers[peer], self.normax) if peer in self.peers else None

    def noisy(self, peer):
        # Under 3 runs there is no spread to judge by: not a settled ratio either.
        timings = (self.normax, self.peers[peer])
        return max(t.spread for t in timings) > NOISY or min(t.runs for t in timings) < 3

    def gbps(self):
        return self.bytes_moved / self.normax.median / 1e9 if self.bytes_moved else None


def peers_available():
    """Importable peers: name -> module (or None where missing)."""
    found = {}
    for name in ("scipy.special", "torch", "jax"):
        try:
            found[name] = __import__(name, fromlist=["_"])
        except Exception:  # noqa: BLE001 - a broken install counts as missing
            found[name] = None
    return found


def versions():
    """'name version' of normax's dependencies and the installed peers (from their distributions)."""
    out = []
    for dist in ("numpy", "scipy", "torch", "jax"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def fmt_ms(seconds):
    ms = seconds * 1e3
    for limit, digits in ((100, 0), (10, 1), (1, 2), (0.1, 3)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.4f}"


def fmt_ratio(r):
    if r >= 1e4:
        return ">1e4"  # keeps the column narrow; such a ratio is a measurement problem anyway
    return f"{r:.0f}" if r >= 100 else f"{r:.1f}" if r >= 10 else f"{r:.2f}"


class Table:
    """A fixed-width table printed a line at a time (so each case shows as soon as it is measured).

    Columns: normax's median and its spread, its bandwidth and the share of the copy bandwidth
    (only where the data is larger than the last-level cache: a cache-resident case can beat a
    DRAM copy, and a % above 100 says nothing), then normax's speedup over each peer. A case timed
    after a torch op is printed right below its settled twin, named by its situation."""

    def __init__(self, peers, op_width, copy_gbps, cache_bytes):
        self.peers, self.copy_gbps, self.cache_bytes = list(peers), copy_gbps, cache_bytes
        self.widths = [op_width, 15, 9, 4, 6, 5] + [max(7, len(p) + 1) for p in self.peers]

    def _line(self, cells):
        first = cells[0].ljust(self.widths[0])
        return (first + "  " + " ".join(c.rjust(w) for c, w in zip(cells[1:], self.widths[1:]))).rstrip()

    def header(self):
        cells = ["op", "shape", "normax ms", "±%", "GB/s", "%copy"] + [f"x{p}" for p in self.peers]
        return self._line(cells) + "\n" + self._line(["-" * w for w in self.widths])

    def row(self, case):
        gbps = case.gbps()
        share = "-"
        if gbps is not None:
            share = (
                f"{100 * gbps / self.copy_gbps:.0f}" if case.bytes_moved > 2 * self.cache_bytes else "cache"
            )
        spread = case.normax.spread * 100
        cells = [
            case.op if case.situation == SETTLED else f"  {case.situation}",
            "x".join(map(str, case.shape)),
            fmt_ms(case.normax.median),
            "-" if case.normax.runs < 3 else ">99" if spread > 99 else f"{spread:.0f}",
            "-" if gbps is None else f"{gbps:.1f}",
            share,
        ]
        for p in self.peers:
            r = case.speedup(p)
            cells.append("-" if r is None else fmt_ratio(r) + (MARK if case.noisy(p) else ""))
        lines = [self._line(cells)]
        for what, t in case.yardsticks.items():
            lines.append(
                f"    yardstick {what}: {fmt_ms(t.median)} ms (±{100 * t.spread:.0f}%); "
                f"normax takes {case.normax.median / t.median:.2f}x its time"
            )
        lines += [f"    {note}" for note in case.notes]
        return "\n".join(lines)


def cache_bytes():
    """The last-level cache of CPU 0 in bytes (32 MiB where it cannot be read)."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 << 20)


def targets(cases, copy_gbps):
    """The performance issues' targets (developer goals, printed only with ``--targets``), each with
    its measured number: (description, value, goal, unit)."""
    found = []

    def get(op, shape):
        return next((c for c in cases if (c.op, c.shape) == (op, shape)), None)

    def pct_copy(c):
        return 100 * c.gbps() / copy_gbps

    for op in ("softmax", "log_softmax", "rms_norm"):
        c = get(f"{op} out=", (16384, 4096))
        if c:
            found.append((f"{op} 16384x4096 out= % of copy bandwidth", pct_copy(c), 80, "%"))
    for op in ("softmax", "log_softmax"):
        c, last = get(f"{op} axis=0", (16384, 4096)), get(op, (16384, 4096))
        if c and last:
            found.append(
                (
                    f"{op} 16384x4096 axis=0 time / last-axis time",
                    c.normax.median / last.normax.median,
                    2.0,
                    "<=",
                )
            )
    for op in ("layer_norm", "rms_norm", "layer_norm fwd+bwd", "rms_norm fwd+bwd"):
        c = get(op, (4096, 1024))
        if c and "torch" in c.peers:
            found.append((f"{op} 4096x1024 vs torch", c.speedup("torch"), 1.5, "x"))
    for shape, goal in (((16384, 4096), 4.0), ((32, 128256), 2.0)):
        c = get("cross_entropy_with_grad", shape)
        if c and "torch" in c.peers:
            found.append(
                (
                    f"cross_entropy_with_grad {shape[0]}x{shape[1]} vs torch fwd+bwd",
                    c.speedup("torch"),
                    goal,
                    "x",
                )
            )
    c = get("softmax", (8, 16))
    if c and "np.exp on the same array" in c.yardsticks:
        ratio = c.normax.median / c.yardsticks["np.exp on the same array"].median
        found.append(("softmax 8x16 cost / np.exp cost", ratio, 3.0, "<="))
    return found


def format_targets(found):
    """One line per target. `unit`: "x" or "%" (the goal is a minimum), "<=" (a ratio), "%<=" (a
    percentage) or "us" (microseconds), whose goal is a maximum."""
    lines = []
    for desc, value, goal, unit in found:
        at_most = unit in ("<=", "%<=", "us")
        met = value <= goal if at_most else value >= goal
        sign = "<=" if at_most else ">="
        suffix = {"%": "%", "%<=": "%", "us": " us"}.get(unit, "x")
        lines.append(
            f"  {'met ' if met else 'miss'}  {desc}: {value:.2f}{suffix} (goal {sign} {goal}{suffix})"
        )
    return "\n".join(lines)


def plot(cases, copy_gbps, cache, path):
    """A row per suite: normax's speedup over each peer (left; hatched where the runs were noisy)
    and its bandwidth against the copy roofline (right, for the cases larger than the last-level
    cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(c.suite for c in cases))
    compared = {s: [c for c in cases if c.suite == s and c.peers] for s in suites}
    heights = [max(2.0, 0.3 * len(compared[s]) + 1.2) for s in suites]
    fig, axes = plt.subplots(
        len(suites),
        2,
        figsize=(15, sum(heights) + 0.6),
        gridspec_kw={"height_ratios": heights, "width_ratios": [3, 2]},
        squeeze=False,
        layout="constrained",
    )
    colors = {"torch": "tab:red", "jax": "tab:green", "numpy": "tab:blue", "scipy": "tab:purple"}
    ticks = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]

    def label(c):
        return f"{c.op}  {'x'.join(map(str, c.shape))}"

    for (ax, bw), suite in zip(axes, suites):
        mine = compared[suite]
        peers = list(dict.fromkeys(p for c in mine for p in c.peers))
        height = 0.8 / max(1, len(peers))
        ratios = [c.speedup(p) for c in mine for p in c.peers]
        for i, p in enumerate(peers):
            ys = [k + i * height for k, c in enumerate(mine) if p in c.peers]
            xs = [c.speedup(p) for c in mine if p in c.peers]
            bars = ax.barh(ys, xs, height, label=f"vs {p}", color=colors.get(p))
            for bar, c in zip(bars, [c for c in mine if p in c.peers]):
                if c.noisy(p):
                    bar.set_hatch("///")
        ax.axvline(1.0, color="black", linewidth=1.2)
        ax.set_xscale("log")
        lo, hi = min(ratios + [0.5]) / 1.3, max(ratios + [2.0]) * 1.3
        ax.set_xlim(lo, hi)
        shown = [t for t in ticks if lo <= t <= hi]
        ax.set_xticks(shown, [f"{t:g}x" for t in shown])
        ax.minorticks_off()
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(mine))], [label(c) for c in mine], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{suite}: normax speedup over each peer (right of 1x: normax faster)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title="hatched: noisy runs", title_fontsize=7)

        roof = [c for c in cases if c.suite == suite and c.gbps() is not None and c.bytes_moved > 2 * cache]
        bw.barh(range(len(roof)), [c.gbps() for c in roof], color="tab:gray")
        for k, c in enumerate(roof):
            bw.text(c.gbps(), k, f" {100 * c.gbps() / copy_gbps:.0f}%", va="center", fontsize=7)
        bw.axvline(
            copy_gbps, color="black", linestyle="--", linewidth=1.2, label=f"copy {copy_gbps:.1f} GB/s"
        )
        bw.set_yticks(range(len(roof)), [label(c) for c in roof], fontsize=8)
        bw.invert_yaxis()
        bw.set_title(f"{suite}: normax GB/s vs the copy roofline", fontsize=10)
        bw.set_xlim(0, 1.25 * max([copy_gbps] + [c.gbps() for c in roof]))
        bw.set_xlabel("GB/s = ideal bytes / time", fontsize=8)
        if not roof:
            bw.text(
                0.5, 0.5, "every case fits in the cache", ha="center", va="center", transform=bw.transAxes
            )
        bw.grid(axis="x", alpha=0.3)
        bw.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"normax vs peers, float32, {normax.get_num_threads()} threads, one run", fontsize=12)
    fig.savefig(path, dpi=100)
    plt.close(fig)
