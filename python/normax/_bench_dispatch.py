"""The array-API layer's cost: a ``normax`` function on each library's 1 MiB array vs plain NumPy.

    python -m normax._bench_dispatch

For each op, the NumPy-first function itself (``normax._softmax.softmax`` ...) on a NumPy array is
the baseline; the public function (``normax.softmax``, which dispatches) is timed on the same data
as a NumPy array, a torch tensor, a JAX array and an ``array_api_strict`` array. Calls of every
variant are interleaved in rounds, and the medians are taken over all calls, so the load of a
shared machine falls on every variant alike. The issue's bound is the NumPy path: under 10%.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import _norms, _softmax
from . import logsumexp as _logsumexp
from . import rms_norm as _rms_norm
from . import softmax as _softmax_public

OPS = {
    "softmax": (_softmax.softmax, _softmax_public),
    "rms_norm": (_norms.rms_norm, _rms_norm),
    "logsumexp": (_softmax.logsumexp, _logsumexp),
}


def _inputs(x: np.ndarray) -> dict:
    out = {"numpy": x}
    try:
        import torch

        out["torch"] = torch.from_numpy(x.copy())
    except ImportError:  # pragma: no cover - optional peer
        pass
    try:
        import jax.numpy as jnp

        out["jax"] = jnp.asarray(x)
    except ImportError:  # pragma: no cover
        pass
    try:
        import array_api_strict as xps

        out["array_api_strict"] = xps.asarray(x)
    except ImportError:  # pragma: no cover
        pass
    return out


def measure(shape=(512, 512), rounds: int = 30, calls: int = 20) -> dict:
    """{op: {variant: median seconds}}; variant "raw" is the NumPy-first function on NumPy input."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    inputs = _inputs(x)
    results = {}
    for op, (raw, public) in OPS.items():
        variants = {"raw": (raw, x)}
        variants.update({kind: (public, a) for kind, a in inputs.items()})
        times = {k: [] for k in variants}
        for fn, a in variants.values():
            fn(a)  # warm-up
        for _ in range(rounds):
            for k, (fn, a) in variants.items():
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn(a)
                    times[k].append(time.perf_counter() - t0)
        results[op] = {k: float(np.median(v)) for k, v in times.items()}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    results = measure(rounds=args.rounds)
    print("1 MiB float32 (512 x 512); median per call; overhead vs the NumPy-first function on NumPy input")
    for op, r in results.items():
        base = r["raw"]
        cells = [f"raw {base * 1e6:7.1f} us"]
        cells += [
            f"{k} {v * 1e6:7.1f} us ({(v / base - 1) * 100:+5.1f}%)" for k, v in r.items() if k != "raw"
        ]
        print(f"{op:10s} " + " | ".join(cells))


if __name__ == "__main__":  # pragma: no cover - manual run
    main()
