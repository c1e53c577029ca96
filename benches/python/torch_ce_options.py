"""What issue 24's options cost in normax.torch's cross_entropy, over the plain call.

    python benches/python/torch_ce_options.py                  # 4096x32768 float32
    python benches/python/torch_ce_options.py --shape 1024x32768 --budget 2

Forward + backward (``loss.backward()``, the logits' gradient dropped between calls) and forward
alone (no grad), each of: the plain call, ``return_stats=True`` (goal: <= 10% more), and
``temperature=0.9`` with (N,) float32 token weights (goal: <= 5% more). Medians of interleaved
runs in this process (timer.compare); the ratios are the result, not the absolute times.
"""

from __future__ import annotations

import argparse

import normax.torch as nt
import torch
from timer import compare


def contenders(x: torch.Tensor, t: torch.Tensor, tw: torch.Tensor, backward: bool) -> dict:
    variants = {
        "plain": {},
        "return_stats": {"return_stats": True},
        "temperature+token_weight": {"temperature": 0.9, "token_weight": tw},
    }

    def make(kw):
        def run():
            out = nt.cross_entropy(x, t, **kw)
            loss = out[0] if kw.get("return_stats") else out
            if backward:
                loss.backward()
                x.grad = None

        return run

    return {name: make(kw) for name, kw in variants.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x32768", help="rows x classes")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per contender")
    args = parser.parse_args()
    rows, classes = (int(s) for s in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, classes, generator=g)
    t = torch.randint(0, classes, (rows,), generator=g)
    tw = torch.rand(rows, generator=g)
    print(f"normax.torch.cross_entropy {rows}x{classes} float32, {torch.get_num_threads()} threads")
    for backward in (True, False):
        x.requires_grad_(backward)
        timings = compare(contenders(x, t, tw, backward), budget_s=args.budget, min_runs=7)
        plain = timings["plain"].median
        label = "fwd+bwd" if backward else "fwd    "
        for name, timing in timings.items():
            print(
                f"  {label} {name:26s} {timing.median * 1e3:9.3f} ms  x{timing.median / plain:5.3f}  "
                f"(spread {timing.spread:.0%}, {timing.runs} runs)"
            )


if __name__ == "__main__":
    main()
