"""The array-API layer's cost: a ``normax`` function on each library's arrays vs plain NumPy.

    python benches/python/dispatch.py

For each op, the NumPy-first function itself (``normax._softmax.softmax`` ...) on NumPy arrays is
the baseline ("raw"); the public function (``normax.softmax``, which dispatches) is timed on the
same data as NumPy arrays, torch tensors, JAX arrays and ``array_api_strict`` arrays. Each variant
cycles through 8 distinct inputs (16 MiB at 1 MiB each, more than the L2 caches), so every call
finds its input equally cold: timing one array over and over would reward whichever variant runs
the least Python between calls with a hotter cache, not measure the layer. Calls of every variant
are interleaved in rounds and the medians are taken over all calls, so a shared machine's load
falls on every variant alike (so it times each call itself rather than through timer.median_time,
which times one function at a time). The issue's bound is the NumPy path at 1 MiB: under 10%.

Two settings. "back to back": calls follow each other immediately, as in a micro-benchmark; the
kernel's worker threads are still spinning and the interpreter's own data is in cache, so any
Python between calls (the conversions) also costs the next kernel a wake-up and the conversions
run cache-cold after the kernel streamed 2 MiB: at 1 MiB that shows as tens of microseconds more
than the fixed cost. "after other work": each call follows an unrelated 8 MiB memory pass, as in a
program that does something between calls; every variant then starts equally cold, and the
difference is the layer's own cost.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

import normax
from normax import _norms, _softmax  # the NumPy-first functions under the public ones: the baseline

OPS = {
    "softmax": (_softmax.softmax, normax.softmax),
    "rms_norm": (_norms.rms_norm, normax.rms_norm),
    "logsumexp": (_softmax.logsumexp, normax.logsumexp),
}
COPIES = 8


def _inputs(xs: list) -> dict:
    out = {"numpy": xs}
    try:
        import torch

        out["torch"] = [torch.from_numpy(x.copy()) for x in xs]
    except ImportError:  # pragma: no cover - optional peer
        pass
    try:
        import jax.numpy as jnp

        out["jax"] = [jnp.asarray(x) for x in xs]
    except ImportError:  # pragma: no cover
        pass
    try:
        import array_api_strict as xps

        out["array_api_strict"] = [xps.asarray(x.copy()) for x in xs]
    except ImportError:  # pragma: no cover
        pass
    return out


def measure(shape=(512, 512), rounds: int = 30, calls: int = 16, other_work: bool = False) -> dict:
    """{op: {variant: median seconds}}; variant "raw" is the NumPy-first function on NumPy input."""
    scratch = np.zeros(1 << 20)  # 8 MiB
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(COPIES)]
    inputs = _inputs(xs)
    results = {}
    for op, (raw, public) in OPS.items():
        variants = {"raw": (raw, [x.copy() for x in xs])}
        variants.update({kind: (public, arrays) for kind, arrays in inputs.items()})
        times = {k: [] for k in variants}
        for fn, arrays in variants.values():
            fn(arrays[0])  # warm-up
        for _ in range(rounds):
            for k, (fn, arrays) in variants.items():
                for i in range(calls):
                    a = arrays[i % COPIES]
                    if other_work:
                        scratch += 1.0
                    t0 = time.perf_counter()
                    fn(a)
                    times[k].append(time.perf_counter() - t0)
        results[op] = {k: float(np.median(v)) for k, v in times.items()}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    cases = (((512, 512), "1 MiB float32 (512 x 512)"), ((8, 16), "tiny float32 (8 x 16): the fixed cost"))
    for (shape, what), other_work in itertools.product(cases, (False, True)):
        results = measure(shape, rounds=args.rounds, other_work=other_work)
        setting = "after other work" if other_work else "back to back"
        print(f"{what}, {setting}; median per call; vs the NumPy-first function on NumPy input (raw)")
        for op, r in results.items():
            base = r["raw"]
            cells = [f"raw {base * 1e6:7.1f} us"]
            cells += [
                f"{k} {v * 1e6:7.1f} us ({(v / base - 1) * 100:+6.1f}%)" for k, v in r.items() if k != "raw"
            ]
            print(f"  {op:10s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
