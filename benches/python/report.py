"""What the suites measure and how it is shown: one :class:`Case` per comparison, the table, the
targets of the performance issues, the plot."""

from __future__ import annotations

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


def peers_available():
    """Importable peers: name -> module (or None where missing)."""
    found = {}
    for name in ("scipy.special", "torch", "jax"):
        try:
            found[name] = __import__(name, fromlist=["_"])
        except Exception:  # noqa: BLE001 - a broken install counts as missing
            found[name] = None
    return found


def cases_from_rows(suite, rows, bytes_per_element):
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


