"""One rank of the vocabulary-parallel tests: ``python _worker.py RANK WORLD PORT OUTDIR``.

Every case builds the same full-vocabulary problem on every rank (same seed), runs this rank's
shard through normax.torch.vocab_parallel_* and checks loss and gradients against the
single-process normax.torch.cross_entropy / linear_cross_entropy on the whole vocabulary; the
collectives are counted by wrapping torch.distributed's functions. Failures are collected, not
raised, so every rank finishes every collective; the losses' bits go to OUTDIR/rank{R}.json for the
parent to compare across ranks.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
import zlib

import normax.torch as nt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from normax.torch._vocab_parallel import maybe_vocab_parallel

RANK, WORLD, PORT, OUTDIR = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
FAILURES: list[str] = []
LOSSES: dict[str, list[int]] = {}

# float32 within 1e-6 relative (the issue's bound): the shards' log-sum-exps are combined in f64
# from hi/lo pairs, so the loss differs from the single-process kernel by a few float32 roundings.
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}

COLLECTIVES = (
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "all_gather_object",
    "barrier",
    "reduce",
    "gather",
    "scatter",
)
CALLS: list[str] = []


def _count(name, fn):
    def wrapped(*args, **kwargs):
        CALLS.append(name)
        return fn(*args, **kwargs)

    return wrapped


for _name in COLLECTIVES:
    setattr(dist, _name, _count(_name, getattr(dist, _name)))


def check(ok: bool, what: str) -> None:
    if not ok:
        FAILURES.append(f"rank {RANK}: {what}")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return check(False, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    nan = torch.isnan(b)
    if not torch.equal(torch.isnan(a), nan):
        return check(False, f"{what}: NaN pattern differs")
    scale = b[~nan].abs().max().item() if (~nan).any() else 0.0
    err = (a - b)[~nan].abs().max().item() if (~nan).any() else 0.0
    check(err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}")


def splits(v: int, uneven: bool) -> list[int]:
    """Shard sizes: equal, or every rank a different size (the last the largest)."""
    if not uneven:
        return [v // WORLD] * WORLD
    sizes = [max(1, v // WORLD - WORLD + 1 + 2 * k) for k in range(WORLD)]
    sizes[-1] += v - sum(sizes)
    return sizes


def problem(seed, n, v, dtype, *, ignore=True, all_ignored=False, last=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[1] = -100
    if last:
        t[0] = v - 1  # a class on the last rank
    if all_ignored:
        t[:] = -100
    w = torch.rand(v, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return x, t, w


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 4.0},
    {"use_weight": True},
    {"use_weight": True, "label_smoothing": 0.2, "reduction": "sum"},
    {"use_weight": True, "label_smoothing": 0.05, "z_loss": 1e-3, "softcap": 5.0, "reduction": "none"},
    {"ignore_index": 3},
]


def logits_cases():
    for dtype in (torch.float32, torch.float64):
        for uneven in (False, True):
            v = 37 if uneven else 36  # 36: an equal split for every world size tested
            for i, o in enumerate(OPTIONS):
                yield f"{dtype}-{'uneven' if uneven else 'even'}-{i}", dtype, v, uneven, dict(o), {}
    yield "all-ignored-mean", torch.float32, 37, True, {}, {"all_ignored": True}
    yield "all-ignored-sum", torch.float32, 36, False, {"reduction": "sum"}, {"all_ignored": True}
    yield "3d", torch.float32, 36, False, {"label_smoothing": 0.1}, {"shape3d": True}


def run_logits_case(name, dtype, v, uneven, opts, extra):
    n = 9
    x, t, w = problem(zlib.crc32(name.encode()), n, v, dtype, all_ignored=extra.get("all_ignored", False))
    t[t == -100] = opts.get("ignore_index", -100)
    if opts.pop("use_weight", False):
        opts["weight"] = w
    sizes = splits(v, uneven)
    start = sum(sizes[:RANK])
    if extra.get("shape3d"):
        x, t = x.reshape(3, 3, v), t.reshape(3, 3)
    xs = x[..., start : start + sizes[RANK]].clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    ref = nt.cross_entropy(xf.reshape(-1, v), t.reshape(-1), **opts)
    if opts.get("reduction") == "none":
        ref = ref.reshape(t.shape)
    del CALLS[:]
    loss = nt.vocab_parallel_cross_entropy(xs, t, vocab_start=start if uneven else None, **opts)
    check(CALLS == ["all_gather_into_tensor"], f"{name}: forward collectives {CALLS}")
    close(loss, ref, RTOL[dtype], f"{name}: loss")
    gout = torch.rand(loss.shape, generator=torch.Generator().manual_seed(7), dtype=dtype) + 0.5
    (gref,) = torch.autograd.grad(ref, xf, gout)
    del CALLS[:]
    (gs,) = torch.autograd.grad(loss, xs, gout)
    check(CALLS == [], f"{name}: backward collectives {CALLS}")
    close(gs, gref[..., start : start + sizes[RANK]], RTOL[dtype], f"{name}: grad")
    LOSSES[name] = [int(b) for b in loss.detach().double().reshape(-1).view(torch.int64)]


LINEAR_OPTIONS = [
    {},
    {"reduction": "none", "chunk_size": 40},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "sum", "chunk_size": 1},
    {"softcap": 3.0, "bias": True},
    {"use_weight": True, "label_smoothing": 0.1, "bias": True, "chunk_size": 100},
]


def run_linear_case(i, opts, uneven):
    n, h, v = 11, 8, 29 if uneven else 24
    g = torch.Generator().manual_seed(100 + i)
    dtype = torch.float32
    hid = torch.randn(n, h, generator=g, dtype=dtype)
    W = torch.randn(v, h, generator=g, dtype=dtype)
    b = torch.randn(v, generator=g, dtype=dtype) if opts.pop("bias", False) else None
    t = torch.randint(0, v, (n,), generator=g)
    t[0], t[1] = v - 1, -100
    cw = torch.rand(v, generator=g, dtype=dtype) + 0.5
    chunk = opts.pop("chunk_size", None)
    use_weight = opts.pop("use_weight", False)
    sizes = splits(v, uneven)
    start = sum(sizes[:RANK])
    hf, Wf = hid.clone().requires_grad_(True), W.clone().requires_grad_(True)
    bf = None if b is None else b.clone().requires_grad_(True)
    if b is None and not use_weight:
        ref = nt.linear_cross_entropy(hf, Wf, t, **opts)
    else:
        ref = nt.cross_entropy(F.linear(hf, Wf, bf), t, weight=cw if use_weight else None, **opts)
    hs = hid.clone().requires_grad_(True)
    Ws = W[start : start + sizes[RANK]].clone().requires_grad_(True)
    bs = None if b is None else b[start : start + sizes[RANK]].clone().requires_grad_(True)
    name = f"linear-{i}-{'uneven' if uneven else 'even'}"
    del CALLS[:]
    loss = nt.vocab_parallel_linear_cross_entropy(
        hs,
        Ws,
        t,
        bias_shard=bs,
        vocab_start=start if uneven else None,
        chunk_size=chunk,
        weight=cw if use_weight else None,
        **opts,
    )
    check(CALLS == ["all_gather_into_tensor"], f"{name}: forward collectives {CALLS}")
    close(loss, ref, 2e-6, f"{name}: loss")
    gout = torch.rand(loss.shape, generator=torch.Generator().manual_seed(7), dtype=dtype) + 0.5
    inputs = [hf, Wf] + ([bf] if bf is not None else [])
    grefs = torch.autograd.grad(ref, inputs, gout)
    del CALLS[:]
    grads = torch.autograd.grad(loss, [hs, Ws] + ([bs] if bs is not None else []), gout)
    check(CALLS == ["all_reduce"], f"{name}: backward collectives {CALLS}")
    # dhidden sums the ranks' GEMM parts: a few float32 roundings of sums over H and V.
    close(grads[0], grefs[0], 1e-5, f"{name}: dhidden")
    close(grads[1], grefs[1][start : start + sizes[RANK]], 1e-5, f"{name}: dweight")
    if bs is not None:
        close(grads[2], grefs[2][start : start + sizes[RANK]], 1e-5, f"{name}: dbias")
    LOSSES[name] = [int(b) for b in loss.detach().double().reshape(-1).view(torch.int64)]


def expect_error(name, fn, kind, words):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test records whichever exception each rank raised
        ok = type(e).__name__ == kind and all(w in str(e) for w in words)
        check(ok, f"{name}: raised {type(e).__name__}: {e}")
        return
    check(False, f"{name}: no error")


def bad_inputs():
    n, v = 12, 8 * WORLD
    x, t, _ = problem(5, n, v, torch.float32)
    vl = v // WORLD
    shard = x[:, RANK * vl : (RANK + 1) * vl]
    # Shard sizes that do not tile the vocabulary (rank 0 one class short).
    mine = shard[:, :-1] if RANK == 0 else shard
    expect_error("shard sizes", lambda: nt.vocab_parallel_cross_entropy(mine, t), "ValueError", ["tile"])
    # Same number of rows, different target shapes.
    if RANK == WORLD - 1:
        xs, ts = shard.reshape(3, 4, vl), t.reshape(3, 4)
    else:
        xs, ts = shard, t
    expect_error(
        "target shapes", lambda: nt.vocab_parallel_cross_entropy(xs, ts), "ValueError", ["disagree", "target"]
    )
    # Different row counts (target shapes), dtypes and label smoothing change the bytes each rank
    # sends: within a size class they are caught by the header instead of aborting gloo.
    rows = n - 1 if RANK == WORLD - 1 else n
    expect_error(
        "row counts",
        lambda: nt.vocab_parallel_cross_entropy(shard[:rows], t[:rows]),
        "ValueError",
        ["disagree", "number of rows"],
    )
    xd = shard.double() if RANK == 0 else shard
    expect_error("dtypes", lambda: nt.vocab_parallel_cross_entropy(xd, t), "ValueError", ["disagree", "dtype"])
    ls = 0.1 if RANK == 0 else 0.0
    expect_error(
        "label smoothing",
        lambda: nt.vocab_parallel_cross_entropy(shard, t, label_smoothing=ls),
        "ValueError",
        ["disagree", "label_smoothing"],
    )
    hid, W = torch.randn(rows, 4), torch.randn(vl, 4)
    expect_error(
        "linear row counts",
        lambda: nt.vocab_parallel_linear_cross_entropy(hid, W, t[:rows]),
        "ValueError",
        ["disagree", "number of rows"],
    )
    # A rank whose target does not match its own logits: it raises its own error, the others name it.
    tt = t[:-1] if RANK == WORLD - 1 else t
    words = ["target has shape"] if RANK == WORLD - 1 else ["rank(s)", "rejected"]
    expect_error("local shape", lambda: nt.vocab_parallel_cross_entropy(shard, tt), "ValueError", words)
    # Different class ids.
    t2 = t.clone()
    t2[3] = (t2[3] + RANK) % v
    expect_error(
        "target values", lambda: nt.vocab_parallel_cross_entropy(shard, t2), "ValueError", ["disagree"]
    )
    # Class ids outside [0, V): an IndexError naming the value, on every rank.
    for bad in (v + 3, -5):
        t3 = t.clone()
        t3[4] = bad
        expect_error(
            f"class {bad}", lambda t3=t3: nt.vocab_parallel_cross_entropy(shard, t3), "IndexError", [str(bad)]
        )
        hid, W = torch.randn(n, 4), torch.randn(vl, 4)
        expect_error(
            f"linear class {bad}",
            lambda t3=t3, hid=hid, W=W: nt.vocab_parallel_linear_cross_entropy(hid, W, t3),
            "IndexError",
            [str(bad)],
        )
    # The group still works after all that.
    loss = nt.vocab_parallel_cross_entropy(shard, t)
    close(loss, nt.cross_entropy(x, t), 1e-6, "after errors")


def dtensor_case():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    n, v = 6, 5 * WORLD + 1  # uneven: torch.chunk's split
    x, t, w = problem(9, n, v, torch.float32)
    dx = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_(True)
    loss = maybe_vocab_parallel(dx, t, weight=w, label_smoothing=0.1)
    xf = x.clone().requires_grad_(True)
    ref = nt.cross_entropy(xf, t, weight=w, label_smoothing=0.1)
    close(loss, ref, 1e-6, "dtensor loss")
    loss.backward()
    ref.backward()
    close(dx.grad.full_tensor(), xf.grad, 1e-6, "dtensor grad")
    check(maybe_vocab_parallel(x, t) is None, "dtensor: a plain tensor must give None")
    # The public entry points take the same path.
    dx2 = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_(True)
    loss2 = nt.cross_entropy(dx2, t, w, label_smoothing=0.1)
    check(torch.equal(loss2, loss), "dtensor: nt.cross_entropy must equal the vocab-parallel loss")
    loss2.backward()
    close(dx2.grad.full_tensor(), xf.grad, 1e-6, "dtensor grad via nt.cross_entropy")
    module_loss = nt.CrossEntropyLoss(w, label_smoothing=0.1)(distribute_tensor(x, mesh, [Shard(1)]), t)
    check(torch.equal(module_loss, loss), "dtensor: nt.CrossEntropyLoss must equal the vocab-parallel loss")


def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    for name, dtype, v, uneven, opts, extra in logits_cases():
        run_logits_case(name, dtype, v, uneven, opts, extra)
    for uneven in (False, True):
        for i, o in enumerate(LINEAR_OPTIONS):
            run_linear_case(i, dict(o), uneven)
    if WORLD > 1:
        bad_inputs()
        dtensor_case()
    with open(os.path.join(OUTDIR, f"rank{RANK}.json"), "w") as f:
        json.dump({"failures": FAILURES, "losses": LOSSES}, f)
    # Every rank done with its collectives before any tears the group down: a rank leaving early
    # (rank 0 hosts the store) made another's gloo threads abort at exit now and then.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - reported through the exit status and the printed traceback
        traceback.print_exc()
        sys.exit(1)
    # The results are written: skip interpreter finalization, where gloo's background threads
    # can still abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)
