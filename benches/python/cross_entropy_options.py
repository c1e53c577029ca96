"""What issue 24's cross-entropy options cost over the plain call, in one process.

For each float32 logits shape: ``cross_entropy_with_grad`` (a fresh gradient array),
``cross_entropy`` (loss only) and the linear cross-entropy, each plain, with ``return_stats=True``
and with a temperature and token weights; medians of interleaved runs (benches/python/timer.py),
printed with the ratio to the plain call. Targets (issue 24): stats <= 1.10x, temperature + token
weights <= 1.05x.

Run: ``PYTHONPATH=python python3 benches/python/cross_entropy_options.py [--threads 2] [--budget 2]``.
"""

from __future__ import annotations

import argparse

import normax
import numpy as np
from timer import compare

SHAPES = ((4096, 32768), (8192, 32000))
LINEAR_SHAPE = (4096, 1024, 32768)


def _rows(label, timed):
    base = timed["plain"].median
    for name, t in timed.items():
        ratio = "" if name == "plain" else f"  {t.median / base:.3f}x plain"
        print(f"  {label:<28} {name:<22} {t.median * 1e3:9.2f} ms{ratio}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per contender")
    parser.add_argument("--linear", action="store_true", help="also the linear cross-entropy")
    args = parser.parse_args()
    normax.set_num_threads(args.threads)
    print(f"normax {normax.get_isa()}, {args.threads} threads; medians, ratio to the plain call")
    rng = np.random.default_rng(0)
    for n, c in SHAPES:
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        tw = rng.random(n, dtype=np.float32)
        grad = {
            "plain": lambda x=x, t=t: normax.cross_entropy_with_grad(x, t),
            "return_stats": lambda x=x, t=t: normax.cross_entropy_with_grad(x, t, return_stats=True),
            "temperature+token_w": lambda x=x, t=t, tw=tw: normax.cross_entropy_with_grad(
                x, t, temperature=0.7, token_weight=tw
            ),
        }
        _rows(f"with_grad {n}x{c}", compare(grad, args.budget, min_runs=5, max_runs=30))
        loss = {
            "plain": lambda x=x, t=t: normax.cross_entropy(x, t),
            "return_stats": lambda x=x, t=t: normax.cross_entropy(x, t, return_stats=True),
            "temperature+token_w": lambda x=x, t=t, tw=tw: normax.cross_entropy(
                x, t, temperature=0.7, token_weight=tw
            ),
        }
        _rows(f"loss only {n}x{c}", compare(loss, args.budget, min_runs=5, max_runs=30))
    if args.linear:
        n, h, v = LINEAR_SHAPE
        hid = rng.standard_normal((n, h), dtype=np.float32)
        w = rng.standard_normal((v, h), dtype=np.float32) * np.float32(0.03)
        t = rng.integers(0, v, n)
        tw = rng.random(n, dtype=np.float32)
        lin = {
            "plain": lambda: normax.linear_cross_entropy_with_grad(hid, w, t),
            "return_stats": lambda: normax.linear_cross_entropy_with_grad(hid, w, t, return_stats=True),
            "temperature+token_w": lambda: normax.linear_cross_entropy_with_grad(
                hid, w, t, temperature=0.7, token_weight=tw
            ),
        }
        _rows(f"linear {n}x{h}x{v}", compare(lin, args.budget, min_runs=3, max_runs=5))


if __name__ == "__main__":
    main()
