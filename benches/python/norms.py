"""The norms suite: the normalization ops against their peers.

In one process, normax against PyTorch CPU (and JAX, jitted, when it is installed): rms_norm and
layer_norm forward and forward+backward, the forward into an existing buffer (``out=``, with a
one-thread ``np.copyto`` of the same array as its yardstick), and PowerNorm forward+backward
against a PyTorch implementation of MaskPowerNorm (tests/torch_power_norm.py, the tests' oracle).

- ``... fwd+bwd``: the forward returning its statistics, then the backward with them (dx,
  dweight[, dbias]); the peers run their autograd (torch) or a jitted ``jax.vjp``;
- ``power_norm fwd+bwd``: one training step (forward with the pad mask, backward).

Every case is timed settled; those of an input that stays in the cache (up to
report.CACHE_RESIDENT_BYTES: 4096x1024) also right after a torch op, against torch
(report.AFTER_TORCH).

torch uses ``torch.get_num_threads()`` threads and normax ``normax.get_num_threads()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from report import AFTER_TORCH, CACHE_RESIDENT_BYTES, Case, after_torch_op
from timer import compare

import normax

# The PowerNorm peer is the tests' oracle, checked against normax there (it imports torch when called).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from torch_power_norm import torch_mask_power_norm  # noqa: E402

SHAPES = ((16384, 4096), (4096, 1024), (16384, 64))
POWER_SHAPE = (256, 64, 1024)  # (T, B, C): 16384 tokens of 1024 channels
PEERS = ("torch", "jax")
OP_WIDTH = len("layer_norm fwd+bwd")


def count(shapes=SHAPES):
    """How many cases :func:`suite` yields (where torch is installed)."""
    return 6 * len(shapes) + 6 * sum(map(_after_torch, shapes)) + 1


def _after_torch(shape):
    return 4 * shape[0] * shape[1] <= CACHE_RESIDENT_BYTES


def _compare(fns, budget_s):
    # Large calls: one warm-up (first-touch page faults, JIT, thread-pool start), 5 interleaved runs.
    return compare(fns, budget_s, min_runs=5, max_runs=20)


def suite(budget_s, shapes=SHAPES, power_shape=POWER_SHAPE):
    """Yields the norms cases as each is measured."""
    try:
        import torch
    except ImportError:
        torch = None
    jx = _jax_fns()
    rng = np.random.default_rng(0)
    for shape in shapes:
        yield from _shape_cases(shape, budget_s, rng, torch, jx)
    if torch is not None:
        yield _power_case(torch, power_shape, budget_s, rng)


def _jax_fns():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None

    def rms(x, w, eps):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def layer(x, w, b, eps):
        m = jnp.mean(x, axis=-1, keepdims=True)
        v = jnp.mean(jnp.square(x - m), axis=-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(v + eps) * w + b

    def fwd_bwd(f):
        def run(dy, *args):
            y, vjp = jax.vjp(f, *args)
            return y, vjp(dy)

        return jax.jit(run)

    eps32 = float(np.finfo(np.float32).eps)
    return {
        "rms_norm": jax.jit(lambda x, w: rms(x, w, eps32)),
        "layer_norm": jax.jit(lambda x, w, b: layer(x, w, b, 1e-5)),
        "rms_norm fwd+bwd": fwd_bwd(lambda x, w: rms(x, w, eps32)),
        "layer_norm fwd+bwd": fwd_bwd(lambda x, w, b: layer(x, w, b, 1e-5)),
        "block": jax.block_until_ready,
        "put": jax.device_put,
    }


def _shape_cases(shape, budget_s, rng, torch, jx):
    """The rms_norm / layer_norm cases of one float32 shape."""
    n = shape[-1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    b = (0.1 * rng.standard_normal(n)).astype(np.float32)
    out = np.empty_like(x)

    def rms_fb():
        _, rstd = normax.rms_norm(x, w, return_stats=True)
        return normax.rms_norm_backward(dy, x, w, rstd=rstd)

    def layer_fb():
        _, mean, rstd = normax.layer_norm(x, w, b, return_stats=True)
        return normax.layer_norm_backward(dy, x, w, b, mean=mean, rstd=rstd)

    ours = {
        "rms_norm": lambda: normax.rms_norm(x, w),
        "layer_norm": lambda: normax.layer_norm(x, w, b),
        "rms_norm fwd+bwd": rms_fb,
        "layer_norm fwd+bwd": layer_fb,
        "rms_norm out=": lambda: normax.rms_norm(x, w, out=out),
        "layer_norm out=": lambda: normax.layer_norm(x, w, b, out=out),
    }
    theirs = {op: {} for op in ours}
    if torch is not None:
        import torch.nn.functional as F

        tx, tdy, tw, tb = (torch.from_numpy(a) for a in (x, dy, w, b))
        eps32 = float(np.finfo(np.float32).eps)
        gx, gw, gb = (t.clone().requires_grad_(True) for t in (tx, tw, tb))

        def t_rms_fb():
            gx.grad = gw.grad = None
            F.rms_norm(gx, (n,), gw, eps32).backward(tdy)

        def t_layer_fb():
            gx.grad = gw.grad = gb.grad = None
            F.layer_norm(gx, (n,), gw, gb, 1e-5).backward(tdy)

        theirs["rms_norm"]["torch"] = lambda: F.rms_norm(tx, (n,), tw, eps32)
        theirs["layer_norm"]["torch"] = lambda: F.layer_norm(tx, (n,), tw, tb, 1e-5)
        theirs["rms_norm fwd+bwd"]["torch"] = t_rms_fb
        theirs["layer_norm fwd+bwd"]["torch"] = t_layer_fb
    if jx is not None:
        jxs, jdy, jw, jb = (jx["put"](a) for a in (x, dy, w, b))
        block = jx["block"]
        theirs["rms_norm"]["jax"] = lambda: block(jx["rms_norm"](jxs, jw))
        theirs["layer_norm"]["jax"] = lambda: block(jx["layer_norm"](jxs, jw, jb))
        theirs["rms_norm fwd+bwd"]["jax"] = lambda: block(jx["rms_norm fwd+bwd"](jdy, jxs, jw))
        theirs["layer_norm fwd+bwd"]["jax"] = lambda: block(jx["layer_norm fwd+bwd"](jdy, jxs, jw, jb))
    for op, fn in ours.items():
        fns = {"normax": fn, **theirs[op]}
        if op.endswith("out="):
            fns["copy"] = lambda: np.copyto(out, x)
        t = _compare(fns, budget_s)
        # Roofline: the forward reads x, writes y; the backward also reads dy and x, writes dx.
        per = 20 if "fwd+bwd" in op else 8
        case = Case("norms", op, shape, per * x.size, t.pop("normax"))
        if "copy" in t:
            case.yardsticks["np.copyto of the same array, 1 thread"] = t.pop("copy")
        case.peers.update(t)
        yield case
        if "torch" in theirs[op] and _after_torch(shape):  # out= has no torch peer
            # One call per run (each after its own torch op): many more, shorter runs.
            pair = {"normax": fn, "torch": theirs[op]["torch"]}
            t = compare(pair, budget_s, min_runs=20, max_runs=300, before=after_torch_op(torch))
            yield Case(
                "norms",
                op,
                shape,
                case.bytes_moved,
                t["normax"],
                {"torch": t["torch"]},
                situation=AFTER_TORCH,
            )


def _power_case(torch, shape, budget_s, rng):
    t_len, batch, c = shape
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    pad = np.zeros((batch, t_len), dtype=bool)
    pad[:, t_len - t_len // 8 :] = True
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    state = normax.PowerNormState(c)

    def ours():
        _, saved = normax.power_norm(x, w, b, state, pad_mask=pad, return_saved=True)
        return normax.power_norm_backward(dy, saved, state)

    module = torch_mask_power_norm(c)
    tx = torch.from_numpy(x).requires_grad_(True)
    tdy, tpad = torch.from_numpy(dy), torch.from_numpy(pad)

    def theirs():
        tx.grad = None
        module.zero_grad(set_to_none=True)
        module(tx, tpad).backward(tdy)

    t = _compare({"normax": ours, "torch": theirs}, budget_s)
    case = Case("norms", "power_norm fwd+bwd", shape, 0, t["normax"], {"torch": t["torch"]})
    case.notes.append("torch: a MaskPowerNorm in PyTorch ops (tests/torch_power_norm.py)")
    return case
