"""The cross-entropy suite: normax against PyTorch's CPU ops.

:func:`suite` yields a case per measurement:

- ``cross_entropy_with_grad`` against ``F.cross_entropy(x, t)`` + ``backward()`` (float32 logits, int64
  targets), with a fresh gradient array and with ``inplace=True``;
- ``linear_cross_entropy_with_grad`` against ``hidden @ weight.T`` + ``F.cross_entropy`` + ``backward()``.

Times are medians of interleaved runs in this process, both libraries on the same number of threads.
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
from report import Case
from timer import compare

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


PEERS = ("torch",)
OP_WIDTH = len("cross_entropy_with_grad inplace")
SHAPES = ((16384, 4096), (32, 128256))
LINEAR_SHAPE = (8192, 1024, 32768)


def count(shapes=SHAPES, linear_shape=LINEAR_SHAPE):
    return 2 * len(shapes) + (linear_shape is not None)


def suite(budget_s, shapes=SHAPES, linear_shape=LINEAR_SHAPE, memory=True):
    """Yields the cases as each is measured: ``cross_entropy_with_grad`` (fresh gradient and in
    place) per logits shape against ``F.cross_entropy`` + ``backward()``, then the linear
    cross-entropy (``linear_shape`` (N, H, V) or None to skip it: it takes tens of seconds per call
    on two cores, so it runs once). `memory`: also measure peak extra memory (a subprocess per case
    and library). Nothing without PyTorch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return
    threads = normax.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    for n, c in shapes:
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        buf = np.empty_like(x)

        def peer(xt=xt, tt=tt):
            leaf = xt.detach().requires_grad_()
            F.cross_entropy(leaf, tt).backward()

        fns = {
            "normax": lambda x=x, t=t: normax.cross_entropy_with_grad(x, t),
            "inplace": lambda t=t, buf=buf: normax.cross_entropy_with_grad(buf, t, inplace=True),
            "torch": peer,
        }
        # Every run restores the in-place call's input (untimed, for all three alike).
        timed = compare(fns, budget_s, min_runs=5, max_runs=20, setup=lambda x=x, buf=buf: np.copyto(buf, x))
        # Roofline bytes: logits read + gradient written.
        case = Case("cross_entropy", "cross_entropy_with_grad", (n, c), 8 * x.size, timed["normax"])
        case.peers["torch"] = timed["torch"]
        case.notes.append("int64 targets; a fresh dlogits array; torch: F.cross_entropy + backward()")
        yield case
        case = Case("cross_entropy", "cross_entropy_with_grad inplace", (n, c), 8 * x.size, timed["inplace"])
        case.peers["torch"] = timed["torch"]
        if memory:
            base = {"op": "ce", "shape": [n, c], "threads": threads}
            ours = _peak_extra({**base, "lib": "normax", "inplace": True})
            fresh = _peak_extra({**base, "lib": "normax", "inplace": False})
            theirs = _peak_extra({**base, "lib": "torch"})
            case.notes.append(
                f"peak extra memory: normax {_mib(ours)} in place, {_mib(fresh)} with a fresh output, "
                f"torch {_mib(theirs)}"
            )
        yield case
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

        fns = {"normax": lambda: normax.linear_cross_entropy_with_grad(hid, w, t), "torch": linear_peer}
        timed = compare(fns, budget_s, min_runs=1, max_runs=1, warmup=0)
        # GEMM-bound: no roofline.
        case = Case("cross_entropy", "linear_cross_entropy_with_grad", (n, h, v), 0, timed["normax"])
        case.peers["torch"] = timed["torch"]
        logits, outputs = n * v * 4, (n * h + v * h) * 4
        case.notes.append(
            f"one run each (tens of seconds a call); torch: matmul + F.cross_entropy + backward(); "
            f"full logits {logits / MIB:.0f} MiB"
        )
        if memory:
            base = {"op": "linear", "shape": [n, h, v], "threads": threads}
            ours = _peak_extra({**base, "lib": "normax"})
            theirs = _peak_extra({**base, "lib": "torch"})
            scratch = None if ours is None else ours - outputs
            share = "" if scratch is None else f", {scratch / logits:.3f} of the logits"
            case.notes.append(
                f"peak extra memory: normax {_mib(ours)} (outputs {_mib(outputs)}, scratch {_mib(scratch)}{share}), "
                f"torch {_mib(theirs)}"
            )
        yield case
