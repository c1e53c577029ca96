"""normax.torch.linear_logprobs and logprobs against PyTorch's own ops on the CPU, in one process.

    python benches/python/logprobs.py            # the issue's sizes (several minutes on 2 cores)
    python benches/python/logprobs.py --quick    # small sizes: a smoke test of the tables

Each case is forward + backward of ``(g_logp * logprob + g_H * entropy).sum()`` (fixed per-row
weights, as a PPO-style objective gives them), float32, from fresh leaves every call:

1. ``nt.linear_logprobs(hidden, weight, target)`` against torch's ``hidden @ weight.T``,
   ``log_softmax``, ``gather`` and ``-(p * logp).sum(-1)`` with autograd;
2. ``nt.logprobs(logits, target)`` against the same torch ops on the logits.

Times are medians of interleaved runs in this process (``timer.compare``), both libraries on the
same number of threads; the speedup is torch time / normax time (higher is better). Peak extra
memory is measured in a fresh subprocess per case and library, as benches/python/cross_entropy.py
does: the resident-set high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``
right before the call) minus the resident set just before it, with the inputs allocated and a
two-row warm-up call done. It counts every allocation (torch's, NumPy's, Rust's), the gradients
included. The issue's targets close the output. The machines are shared and noisy: the ratios
are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import torch
from report import MARK, NOISY, Case, Table, format_targets, versions
from timer import compare

import normax
import normax.torch as nt

LINEAR = (8192, 1024, 32768)  # N x H x V
ROWS = (8192, 32768)  # N x V
QUICK_LINEAR = (64, 32, 512)
QUICK_ROWS = (64, 512)
OP_WIDTH = 22
PEERS = ("torch",)
MIB = 1 << 20


def inputs(case: str, shape, seed=0) -> dict:
    """The case's tensors: leaves' data, targets and the per-row weights of the objective."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    t = torch.randint(0, shape[-1], (n,), generator=g)
    weights = {"gl": torch.randn(n, generator=g), "gh": torch.randn(n, generator=g) * 0.01, "t": t}
    if case == "linear":
        _, h, v = shape
        return {
            **weights,
            "hidden": torch.randn(n, h, generator=g),
            "weight": torch.randn(v, h, generator=g) * 0.03,
        }
    return {**weights, "logits": torch.randn(*shape, generator=g) * 3}


def torch_logprobs(logits, t):
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def step(lib: str, case: str, a: dict, rows=None):
    """One forward + backward on `rows` rows (all by default); returns the leaves."""
    rows = slice(None) if rows is None else slice(0, rows)
    t, gl, gh = a["t"][rows], a["gl"][rows], a["gh"][rows]
    if case == "linear":
        leaves = (a["hidden"][rows].detach().requires_grad_(), a["weight"].detach().requires_grad_())
        if lib == "normax":
            lp, ent = nt.linear_logprobs(*leaves, t)
        else:
            lp, ent = torch_logprobs(leaves[0] @ leaves[1].T, t)
    else:
        leaves = (a["logits"][rows].detach().requires_grad_(),)
        lp, ent = (nt.logprobs if lib == "normax" else torch_logprobs)(leaves[0], t)
    ((lp * gl).sum() + (ent * gh).sum()).backward()
    return leaves


# Runs one (library, case) in a fresh interpreter and prints {"extra": bytes}; argv[1] is JSON.
_MEMORY_SCRIPT = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[2])
import logprobs as bench
import normax, torch

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
normax.set_num_threads(spec["threads"])

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

a = bench.inputs(spec["case"], spec["shape"])
bench.step(spec["lib"], spec["case"], a, rows=2)  # thread pools and lazy set-up are not the op's
have_reset = reset_peak()
before = status("VmRSS")
bench.step(spec["lib"], spec["case"], a)
peak = status("VmHWM") if have_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": max(peak - before, 0)}))
"""


def peak_extra(lib: str, case: str, shape) -> int | None:
    """Peak extra resident memory of one step, in bytes, from a subprocess (None if it fails)."""
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(normax.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    spec = {"lib": lib, "case": case, "shape": list(shape), "threads": normax.get_num_threads()}
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(spec), here],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
            check=True,
        )
        return int(json.loads(out.stdout.strip().splitlines()[-1])["extra"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError, OSError):
        return None


def measure(case: str, shape, budget: float, runs: int, memory: bool):
    """(Case, normax's peak memory as % of torch's or None)."""
    a = inputs(case, shape)
    fns = {"normax": lambda: step("normax", case, a), "torch": lambda: step("torch", case, a)}
    timed = compare(fns, budget, min_runs=runs, max_runs=max(runs, 20))
    op = "linear_logprobs fwd+bwd" if case == "linear" else "logprobs fwd+bwd"
    result = Case("logprobs", op, tuple(shape), 0, timed["normax"], {"torch": timed["torch"]})
    peer = "matmul + " if case == "linear" else ""
    result.notes.append(f"torch: {peer}log_softmax + gather + entropy + backward(), float32")
    if not memory:
        return result, None
    ours, theirs = peak_extra("normax", case, shape), peak_extra("torch", case, shape)
    if ours is None or theirs is None or theirs == 0:
        result.notes.append("peak extra memory: not measured (the subprocess failed)")
        return result, None
    pct = 100 * ours / theirs
    result.notes.append(
        f"peak extra memory: normax {ours / MIB:.1f} MiB, torch {theirs / MIB:.1f} MiB ({pct:.1f}%)"
    )
    return result, pct


def machine():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or 'unknown CPU'}, {normax.get_num_threads()} threads, ISA {normax.get_isa()}"


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python benches/python/logprobs.py", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke test of the tables)")
    parser.add_argument(
        "--budget", type=float, default=0.5, help="seconds per contender per case (default 0.5)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="at least this many timed runs per contender (default 3)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    linear, rows = (QUICK_LINEAR, QUICK_ROWS) if args.quick else (LINEAR, ROWS)
    torch.set_num_threads(normax.get_num_threads())
    print(f"machine: {machine()}")
    print(f"versions: normax {normax.__version__}, {versions()}")
    legend = (
        f"xtorch = torch time / normax time (higher is better), medians of interleaved runs; ±% = "
        f"spread of normax's runs; {MARK} = either's runs spread over {100 * NOISY:.0f}% or numbered under 3"
    )
    print(textwrap.fill(legend, 100))
    table = Table(PEERS, OP_WIDTH, 1.0, 0)
    print(table.header(), flush=True)
    found = []
    for case, shape in (("linear", linear), ("rows", rows)):
        result, pct = measure(case, shape, args.budget, args.runs, not args.no_memory)
        print(table.row(result), flush=True)
        if case == "linear" and shape == LINEAR:
            found.append(
                ("linear_logprobs fwd+bwd 8192x1024x32768 vs torch", result.speedup("torch"), 1.5, "x")
            )
            if pct is not None:
                found.append(("linear_logprobs peak memory / torch's", pct, 10.0, "%<="))
    if found:
        print("\n== the issue's targets")
        print(format_targets(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
