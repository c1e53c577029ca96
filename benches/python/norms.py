"""The norms suite: the normalization ops against their peers.

``bench_norms()`` times, in one process, normax against PyTorch CPU (and JAX, jitted, when it is
installed): rms_norm and layer_norm forward and forward+backward, the forward into an existing
buffer (``out=``) against a plain copy of the same array (the bandwidth floor), and PowerNorm
forward+backward against a PyTorch implementation of MaskPowerNorm (tests/torch_power_norm.py,
the tests' oracle). Every time is the median of several repeats after one warm-up call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from report import cases_from_rows
from timer import median_time

import normax

# The PowerNorm peer is the tests' oracle, checked against normax there (it imports torch when called).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from torch_power_norm import torch_mask_power_norm  # noqa: E402

SHAPES = ((16384, 4096), (4096, 1024))
POWER_SHAPE = (256, 64, 1024)  # (T, B, C): 16384 tokens of 1024 channels


def _median(fn, repeats: int) -> float:
    # One warm-up call (first-touch page faults, JIT compilation, thread-pool start), then `repeats`.
    return median_time(fn, min_runs=repeats, max_runs=repeats, calls=1)


def suite(budget_s):
    """The norms cases; `budget_s` sets the repeats (10 per second)."""
    repeats = max(3, int(5 * budget_s / 0.5))
    # fwd+bwd: forward reads x, writes y; backward reads dy and x, writes dx (20 bytes/element).
    return cases_from_rows("norms", bench_norms(repeats=repeats), {"fwd+bwd": 20})


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


def bench_norms(repeats=5, shapes=SHAPES, power_shape=POWER_SHAPE, peers=("torch", "jax"), power=True):
    """Times the normalization ops against their peers; returns a list of rows
    ``(op, shape, peer, normax_median_s, peer_median_s)``.

    Parameters
    ----------
    repeats : int, default 5
        Timed calls per measurement (after one warm-up call); the median is reported.
    shapes : sequence of (rows, len), default ((16384, 4096), (4096, 1024))
        float32 inputs normalized over their last axis, with weight (and bias for layer_norm).
    power_shape : (T, B, C), default (256, 64, 1024)
        The PowerNorm input; a pad mask marks the last eighth of every sequence.
    peers : sequence of str, default ("torch", "jax")
        Peers to run where installed. The ``out=`` rows always compare to ``"copy"``: ``np.copyto``
        of the same array into an existing buffer (one thread; glibc's large memcpy uses streaming
        stores, so it moves 8 bytes per element). The main benchmark may prefer its own measured
        multi-thread copy bandwidth as the floor: normax's time is in the row either way.
    power : bool, default True
        Whether to run the PowerNorm row (needs torch).

    Notes
    -----
    The ops: ``rms_norm`` and ``layer_norm`` forward (fresh output); ``... fwd+bwd``: the forward
    returning its statistics, then the backward with them (dx, dweight[, dbias]) - the peers run
    their autograd (torch) or a jitted ``jax.vjp``; ``... out=``: the forward into an existing
    buffer; ``power_norm fwd+bwd``: one training step (forward with the pad mask, backward).
    torch uses ``torch.get_num_threads()`` threads and normax ``normax.get_num_threads()``.
    """
    rows = []
    rng = np.random.default_rng(0)
    torch = None
    if "torch" in peers:
        try:
            import torch
        except ImportError:
            torch = None
    jx = _jax_fns() if "jax" in peers else None

    for shape in shapes:
        rows += _bench_shape(shape, repeats, rng, torch, jx)

    if power and torch is not None:
        rows.append(_bench_power(torch, power_shape, repeats, rng))
    return rows


def _bench_shape(shape, repeats, rng, torch, jx):
    """The rms_norm / layer_norm rows of one float32 shape."""
    rows = []
    n = shape[-1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    b = (0.1 * rng.standard_normal(n)).astype(np.float32)
    out = np.empty_like(x)
    ours = {
        "rms_norm": lambda: normax.rms_norm(x, w),
        "layer_norm": lambda: normax.layer_norm(x, w, b),
        "rms_norm out=": lambda: normax.rms_norm(x, w, out=out),
        "layer_norm out=": lambda: normax.layer_norm(x, w, b, out=out),
    }

    def rms_fb():
        _, rstd = normax.rms_norm(x, w, return_stats=True)
        return normax.rms_norm_backward(dy, x, w, rstd=rstd)

    def layer_fb():
        _, mean, rstd = normax.layer_norm(x, w, b, return_stats=True)
        return normax.layer_norm_backward(dy, x, w, b, mean=mean, rstd=rstd)

    ours["rms_norm fwd+bwd"] = rms_fb
    ours["layer_norm fwd+bwd"] = layer_fb
    mine = {op: _median(fn, repeats) for op, fn in ours.items()}
    copy = _median(lambda: np.copyto(out, x), repeats)
    for op in ("rms_norm out=", "layer_norm out="):
        rows.append((op, shape, "copy", mine[op], copy))

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

        theirs = {
            "rms_norm": lambda: F.rms_norm(tx, (n,), tw, eps32),
            "layer_norm": lambda: F.layer_norm(tx, (n,), tw, tb, 1e-5),
            "rms_norm fwd+bwd": t_rms_fb,
            "layer_norm fwd+bwd": t_layer_fb,
        }
        with torch.no_grad():
            fwd = {op: _median(theirs[op], repeats) for op in ("rms_norm", "layer_norm")}
        for op, t in fwd.items():
            rows.append((op, shape, "torch", mine[op], t))
        for op in ("rms_norm fwd+bwd", "layer_norm fwd+bwd"):
            rows.append((op, shape, "torch", mine[op], _median(theirs[op], repeats)))

    if jx is not None:
        jxs, jdy, jw, jb = (jx["put"](a) for a in (x, dy, w, b))
        block = jx["block"]
        calls = {
            "rms_norm": lambda: block(jx["rms_norm"](jxs, jw)),
            "layer_norm": lambda: block(jx["layer_norm"](jxs, jw, jb)),
            "rms_norm fwd+bwd": lambda: block(jx["rms_norm fwd+bwd"](jdy, jxs, jw)),
            "layer_norm fwd+bwd": lambda: block(jx["layer_norm fwd+bwd"](jdy, jxs, jw, jb)),
        }
        for op, fn in calls.items():
            rows.append((op, shape, "jax", mine[op], _median(fn, repeats)))
    return rows


def _bench_power(torch, shape, repeats, rng):
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

    return ("power_norm fwd+bwd", shape, "torch", _median(ours, repeats), _median(theirs, repeats))
