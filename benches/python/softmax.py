"""The softmax suite: softmax, log_softmax, logsumexp (fresh output, out=, axis=0) and the two
backwards against NumPy, SciPy, PyTorch and JAX, settled; the cache-resident shapes' cases also
right after a torch op, against PyTorch (report.AFTER_TORCH)."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
from report import AFTER_TORCH, CACHE_RESIDENT_BYTES, Case, after_torch_op, peers_available
from timer import compare

import normax


def numpy_softmax(a, axis=-1):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def numpy_log_softmax(a, axis=-1):
    s = a - a.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def numpy_logsumexp(a, axis=-1):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


NUMPY = {"softmax": numpy_softmax, "log_softmax": numpy_log_softmax, "logsumexp": numpy_logsumexp}


def _softmax_specs(x, dy, out, xt, xj, sp, torch, jax, jitted):
    """(op, variant, roofline bytes, normax call, {peer: call}) for one input."""
    n = x.size

    def fresh(op, nbytes):
        """op over the last axis into a new array, against every peer."""
        ours, ref = getattr(normax, op), NUMPY[op]
        sp_op, torch_op = sp and getattr(sp, op), torch and getattr(torch, op)
        peers = {
            "numpy": lambda: ref(x),
            "scipy": sp and (lambda: sp_op(x, axis=-1)),
            "torch": torch and (lambda: torch_op(xt, -1)),
            "jax": jax and (lambda: jitted[op](xj).block_until_ready()),
        }
        return (op, "fresh", nbytes, lambda: ours(x), peers)

    def into_out(op):
        """op into an existing array (out=), against torch's out=."""
        ours, torch_op = getattr(normax, op), torch and getattr(torch, op)
        peers = {"torch": torch and (lambda: torch_op(xt, -1, out=torch.from_numpy(out)))}
        return (op, "out=", 8 * n, lambda: ours(x, out=out), peers)

    def backward(op, numpy_ref):
        """op's backward from its output and the upstream gradient, against torch's."""
        ours = getattr(normax, f"{op}_backward")
        torch_op = torch and getattr(torch, f"_{op}_backward_data")
        peers = {
            "numpy": numpy_ref,
            "torch": torch and (lambda: torch_op(torch.from_numpy(dy), xt, -1, torch.float32)),
        }
        return (f"{op}_backward", "fresh", 12 * n, lambda: ours(x, dy), peers)

    axis0 = {"numpy": lambda: numpy_softmax(x, 0), "torch": torch and (lambda: torch.softmax(xt, 0))}
    return [
        fresh("softmax", 8 * n),
        into_out("softmax"),
        ("softmax", "axis=0", 8 * n, lambda: normax.softmax(x, axis=0), axis0),
        fresh("log_softmax", 8 * n),
        into_out("log_softmax"),
        fresh("logsumexp", 4 * n),
        backward("softmax", lambda: x * (dy - (dy * x).sum(-1, keepdims=True))),
        backward("log_softmax", lambda: dy - np.exp(x) * dy.sum(-1, keepdims=True)),
    ]


DEFAULT_SHAPES = [(8, 16), (4096, 1024), (256, 32768), (32, 128256), (16384, 4096)]
PEERS = ("numpy", "scipy", "torch", "jax")
OP_WIDTH = len("log_softmax_backward")
SMALL = 1 << 12  # elements: axis=0 is skipped below, np.exp is the yardstick


def _one_thread(torch, run):
    """run() with normax and torch on one thread (restored after): on a busy machine a call of a
    few microseconds that wakes a thread pool waits for a descheduled thread, and that wait (up to
    milliseconds, thousands of times the call) would be the measured time."""
    threads = normax.get_num_threads()
    torch_threads = torch.get_num_threads() if torch is not None else None
    normax.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    try:
        return run()
    finally:
        normax.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(torch_threads)


def after_torch(shape):
    """Whether the cases of `shape` are also timed right after a torch op: inputs that stay in
    the cache (the situation of a training step's activations) and run on several threads."""
    size = shape[0] * shape[1]
    return SMALL < size and 4 * size <= CACHE_RESIDENT_BYTES


def count(shapes=DEFAULT_SHAPES):
    """How many cases :func:`suite` yields (where torch is installed)."""
    with_torch = importlib.util.find_spec("torch") is not None
    return sum(7 if r * c <= SMALL else 16 if with_torch and after_torch((r, c)) else 8 for r, c in shapes)


def suite(budget_s, shapes=DEFAULT_SHAPES):
    """Yields the cases of every shape as each is measured (axis=0 only above 4096 elements; the
    small softmax with np.exp on the same array as its call-overhead yardstick), each case of a
    shape that :func:`after_torch` selects followed by its twin timed right after a torch op."""
    mods = peers_available()
    torch, jax, sp = mods["torch"], mods["jax"], mods["scipy.special"]
    if torch is not None:
        torch.set_num_threads(normax.get_num_threads())
        before = after_torch_op(torch)
    jitted = {}
    if jax is not None:
        import jax.numpy as jnp

        jitted = {
            "softmax": jax.jit(lambda a: jax.nn.softmax(a, axis=-1)),
            "log_softmax": jax.jit(lambda a: jax.nn.log_softmax(a, axis=-1)),
            "logsumexp": jax.jit(lambda a: jax.nn.logsumexp(a, axis=-1)),
        }
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = rng.normal(0.0, 5.0, shape).astype(np.float32)
        dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
        out = np.empty_like(x)
        xt = torch.from_numpy(x) if torch is not None else None
        xj = jnp.asarray(x) if jax is not None else None

        specs = _softmax_specs(x, dy, out, xt, xj, sp, torch, jax, jitted)
        small = x.size <= SMALL
        for op, variant, nbytes, ours, peers in specs:
            if variant == "axis=0" and small:
                continue
            fns = {"normax": ours, **{name: fn for name, fn in peers.items() if fn}}
            yard = small and op == "softmax" and variant == "fresh"
            if yard:
                fns["np.exp"] = functools.partial(np.exp, x)
            if small:
                t = _one_thread(torch, lambda fns=fns: compare(fns, budget_s, min_runs=15, max_runs=200))
            else:
                t = compare(fns, budget_s)
            name = op if variant == "fresh" else f"{op} {variant}"
            case = Case("softmax", name, shape, nbytes, t.pop("normax"))
            if yard:
                case.yardsticks["np.exp on the same array"] = t.pop("np.exp")
            case.peers.update(t)
            yield case
            if torch is not None and after_torch(shape):
                # One call per run (each after its own torch op): many more, shorter runs.
                pair = {"normax": ours, "torch": peers["torch"]}
                t = compare(pair, budget_s, min_runs=20, max_runs=300, before=before)
                yield Case(
                    "softmax", name, shape, nbytes, t["normax"], {"torch": t["torch"]}, situation=AFTER_TORCH
                )
