"""The cross-entropy suite: normax against PyTorch's CPU ops.

:func:`bench_cross_entropy` returns rows ``(op, shape, peer, normax_median_s, peer_median_s, info)``:

- ``cross_entropy_with_grad`` against ``F.cross_entropy(x, t)`` + ``backward()`` (float32 logits, int64
  targets), with a fresh gradient array and with ``inplace=True``;
- ``linear_cross_entropy_with_grad`` against ``hidden @ weight.T`` + ``F.cross_entropy`` + ``backward()``.

Times are medians of `repeats` runs in this process, both libraries on the same number of threads.
Peak extra memory is measured in a fresh subprocess per case: the resident-set high-water mark
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` right before the call; elsewhere
``getrusage``'s ``ru_maxrss``, which then also holds the import) minus the resident set just before
the call, with the inputs already allocated and touched and a two-row warm-up call done (thread
pools started; torch's gradients from it dropped, so both libraries allocate them afresh). It counts every allocation, NumPy's,
Rust's and PyTorch's alike, outputs included (the info column says how much of it they are).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from report import cases_from_rows
from timer import median_time

import normax

MIB = 1 << 20

# Runs one case in a fresh interpreter and prints {"extra": bytes}; argv[1] is the JSON case.
_MEMORY_SCRIPT = r"""
import json, resource, sys
import numpy as np

case = json.loads(sys.argv[1])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

rng = np.random.default_rng(0)
lib = case["lib"]
if lib == "torch":
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(case["threads"])
else:
    import normax
    normax.set_num_threads(case["threads"])
if case["op"] == "ce":
    n, c = case["shape"]
    x = rng.standard_normal((n, c), dtype=np.float32)
    t = rng.integers(0, c, n)
    if lib == "torch":
        xt, tt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(t)
        def run(rows=n):
            F.cross_entropy(xt[:rows], tt[:rows]).backward()
    else:
        def run(rows=n):
            normax.cross_entropy_with_grad(x[:rows], t[:rows], inplace=case["inplace"])
else:
    n, h, v = case["shape"]
    hid = rng.standard_normal((n, h), dtype=np.float32)
    w = rng.standard_normal((v, h), dtype=np.float32) * np.float32(0.03)
    t = rng.integers(0, v, n)
    if lib == "torch":
        ht, wt, tt = (torch.from_numpy(a) for a in (hid, w, t))
        ht.requires_grad_()
        wt.requires_grad_()
        def run(rows=n):
            F.cross_entropy(ht[:rows] @ wt.T, tt[:rows]).backward()
    else:
        def run(rows=n):
            normax.linear_cross_entropy_with_grad(hid[:rows], w, t[:rows])
run(2)  # warm-up on two rows: thread pools and lazy initialization are not the op's memory
if lib == "torch":  # the measured call allocates its gradients afresh, as normax does
    for leaf in (xt,) if case["op"] == "ce" else (ht, wt):
        leaf.grad = None
have_reset = reset_peak()
before = status("VmRSS")
run()
peak = status("VmHWM") if have_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": max(peak - before, 0)}))
"""


def _peak_extra(case: dict) -> int | None:
    """Peak extra resident memory of one call, in bytes, measured in a subprocess (None if it fails)."""
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(normax.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    try:
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(case)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
            check=True,
        )
        return int(json.loads(out.stdout.strip().splitlines()[-1])["extra"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError, OSError):
        return None


def _mib(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / MIB:.1f} MiB" if abs(b) >= MIB else f"{b / 1024:.0f} KiB"


def _median(fn, repeats: int, setup=None) -> float:
    # No warm-up: the linear case takes tens of seconds a call.
    return median_time(fn, min_runs=max(1, repeats), max_runs=max(1, repeats), calls=1, warmup=0, setup=setup)


def suite(budget_s):
    """cross_entropy_with_grad (fresh gradient and in place) and linear_cross_entropy_with_grad;
    `budget_s` sets the repeats (10 per second; the linear case runs once)."""
    repeats = max(3, int(5 * budget_s / 0.5))
    rows = bench_cross_entropy(repeats=repeats, linear_repeats=1)
    # Roofline bytes: logits read + gradient written; the linear case is GEMM-bound (no roofline).
    return cases_from_rows("cross_entropy", rows, {"linear": 0, "": 8})


def bench_cross_entropy(
    repeats: int = 5,
    shapes=((16384, 4096), (32, 128256)),
    linear_shape=(8192, 1024, 32768),
    linear_repeats: int = 2,
    memory: bool = True,
):
    """Times the cross-entropy family against PyTorch; returns rows for the main benchmark table.

    Parameters
    ----------
    repeats : int
        Runs per timing of ``cross_entropy_with_grad`` (the median is reported).
    shapes : sequence of (rows, classes)
        Logits shapes, float32.
    linear_shape : (N, H, V) or None
        ``linear_cross_entropy_with_grad`` shape (float32); None skips it. The default takes tens
        of seconds per run on two cores.
    linear_repeats : int
        Runs per timing of the linear case.
    memory : bool
        Also measure peak extra memory (one subprocess per case and library).

    Returns
    -------
    list of tuple
        ``(op, shape, peer, normax_median_s, peer_median_s, info)`` with `shape` a tuple of ints and
        `info` a free-text note (dtype, threads, peak memory); empty without PyTorch.
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return []
    threads = normax.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    rng = np.random.default_rng(0)
    for n, c in shapes:
        shape = (n, c)
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def peer(xt=xt, tt=tt):
            leaf = xt.detach().requires_grad_()
            F.cross_entropy(leaf, tt).backward()

        peer_s = _median(peer, repeats)
        fresh_s = _median(lambda x=x, t=t: normax.cross_entropy_with_grad(x, t), repeats)
        buf = np.empty_like(x)
        inplace_s = _median(
            lambda t=t, buf=buf: normax.cross_entropy_with_grad(buf, t, inplace=True),
            repeats,
            setup=lambda x=x, buf=buf: np.copyto(buf, x),
        )
        info = f"float32, int64 targets, {threads} threads; fresh dlogits array"
        rows.append(("cross_entropy_with_grad", shape, "torch", fresh_s, peer_s, info))
        info = f"inplace=True (dlogits over the logits, {x.nbytes / MIB:.0f} MiB)"
        if memory:
            case = {"op": "ce", "shape": [n, c], "threads": threads}
            ours = _peak_extra({**case, "lib": "normax", "inplace": True})
            fresh = _peak_extra({**case, "lib": "normax", "inplace": False})
            theirs = _peak_extra({**case, "lib": "torch"})
            info += (
                f"; peak extra memory: normax {_mib(ours)} in place, {_mib(fresh)} with a fresh output,"
                f" torch {_mib(theirs)}; one float32 row per thread: {threads} x {_mib(c * 4)}"
            )
        rows.append(("cross_entropy_with_grad inplace", shape, "torch", inplace_s, peer_s, info))
        del x, xt, buf

    if linear_shape is not None:
        n, h, v = linear_shape
        hid = rng.standard_normal((n, h), dtype=np.float32)
        w = rng.standard_normal((v, h), dtype=np.float32) * np.float32(0.03)
        t = rng.integers(0, v, n)
        ht, wt, tt = (torch.from_numpy(a) for a in (hid, w, t))

        def linear_peer():
            hl = ht.detach().requires_grad_()
            wl = wt.detach().requires_grad_()
            F.cross_entropy(hl @ wl.T, tt).backward()

        ours_s = _median(lambda: normax.linear_cross_entropy_with_grad(hid, w, t), linear_repeats)
        peer_s = _median(linear_peer, linear_repeats)
        logits = n * v * 4
        outputs = (n * h + v * h) * 4
        info = f"float32; full logits {logits / MIB:.0f} MiB; dhidden+dweight outputs {outputs / MIB:.0f} MiB"
        if memory:
            case = {"op": "linear", "shape": [n, h, v], "threads": threads}
            ours = _peak_extra({**case, "lib": "normax"})
            theirs = _peak_extra({**case, "lib": "torch"})
            scratch = None if ours is None else ours - outputs
            info += (
                f"; peak extra memory: normax {_mib(ours)} (beyond the outputs: {_mib(scratch)},"
                f" {'n/a' if scratch is None else f'{scratch / logits:.3f}'} of the logits), torch {_mib(theirs)}"
            )
        rows.append(
            (
                "linear_cross_entropy_with_grad",
                (n, h, v),
                "torch matmul+ce+backward",
                ours_s,
                peer_s,
                info,
            )
        )
    return rows
