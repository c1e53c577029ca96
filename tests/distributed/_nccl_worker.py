"""One rank of the CUDA vocabulary-parallel test over NCCL: ``python _nccl_worker.py RANK WORLD PORT OUTDIR``.

Spawned by tests/cuda/test_gpu_vocab_parallel.py on a GPU machine (rank r on cuda:r). Every case
builds the same full-vocabulary problem on every rank, runs this rank's CUDA shard through
normax.torch.vocab_parallel_cross_entropy and checks loss and gradient against normax.torch's
cross_entropy of the whole vocabulary on the CPU in float64; the collectives are counted. Failures
are collected, not raised, so every rank finishes every collective; the losses' bits go to
OUTDIR/rank{R}.json for the parent to compare across ranks.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import normax.torch as nt
import torch
import torch.distributed as dist

RANK, WORLD, PORT, OUTDIR = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
FAILURES: list[str] = []
LOSSES: dict[str, list[int]] = {}
CALLS: list[str] = []

for _name in ("all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce_scatter_tensor"):

    def _wrap(fn, name=_name):
        def wrapped(*args, **kwargs):
            CALLS.append(name)
            return fn(*args, **kwargs)

        return wrapped

    setattr(dist, _name, _wrap(getattr(dist, _name)))


def check(ok: bool, what: str) -> None:
    if not ok:
        FAILURES.append(f"rank {RANK}: {what}")


def close(a, b, tol: float, what: str) -> None:
    """Within `tol` of the reference's largest finite magnitude (at least 1); NaN where it is NaN."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return check(False, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    nan = torch.isnan(b)
    if not torch.equal(torch.isnan(a), nan):
        return check(False, f"{what}: NaN pattern differs")
    if nan.all():
        return None
    scale = max(b[~nan].abs().max().item(), 1e-30)
    err = (a - b)[~nan].abs().max().item()
    check(err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}")


CASES = [
    ("f32", torch.float32, 64, 2 * 64128, {}),
    ("f32-smooth-weight", torch.float32, 33, 1000, {"label_smoothing": 0.1, "use_weight": True}),
    ("f32-none-zloss-cap", torch.float32, 17, 4097, {"reduction": "none", "z_loss": 1e-3, "softcap": 15.0}),
    ("f32-sum-ignore", torch.float32, 12, 500, {"reduction": "sum", "ignore_index": 4}),
    ("bf16", torch.bfloat16, 40, 32000, {"label_smoothing": 0.05}),
    ("f16-uneven", torch.float16, 9, 1001, {"uneven": True}),
    ("all-ignored", torch.float32, 6, 64, {"all_ignored": True}),
    ("3d", torch.float32, 12, 256, {"shape3d": True, "reduction": "none"}),
]


def run_case(name, dtype, n, v, opts):
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(len(name) * 1000 + v)
    x = (torch.randn(n, v, generator=g) * 4).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[0] = v - 1  # a class on the last rank
    ignore = opts.get("ignore_index", -100)
    t[1] = ignore
    if opts.pop("all_ignored", False):
        t[:] = ignore
    w = torch.rand(v, generator=g) + 0.5 if opts.pop("use_weight", False) else None
    if w is not None:
        opts["weight"] = w
    uneven = opts.pop("uneven", False)
    sizes = (
        [v // WORLD] * WORLD
        if not uneven
        else [v // WORLD - 3 * (WORLD - 1)] + [v // WORLD + 3] * (WORLD - 1)
    )
    sizes[-1] += v - sum(sizes)
    start = sum(sizes[:RANK])
    if opts.pop("shape3d", False):
        x, t = x.reshape(3, n // 3, v), t.reshape(3, n // 3)
    # The reference: the whole vocabulary on the CPU in float64 (from the same rounded values).
    xf = x.double().requires_grad_(True)
    ref = nt.cross_entropy(
        xf.reshape(-1, v), t.reshape(-1), **{**opts, **({"weight": w.double()} if w is not None else {})}
    )
    if opts.get("reduction") == "none":
        ref = ref.reshape(t.shape)
    gout = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    (gref,) = torch.autograd.grad(ref, xf, gout)
    cuda_opts = {**opts, **({"weight": w.to(dev)} if w is not None else {})}
    xs = x[..., start : start + sizes[RANK]].to(dev).requires_grad_(True)
    td = t.to(dev)
    del CALLS[:]
    vocab_start = start if len(set(sizes)) > 1 else None  # the default where the split is even
    loss = nt.vocab_parallel_cross_entropy(xs, td, vocab_start=vocab_start, **cuda_opts)
    check(CALLS == ["all_gather_into_tensor"], f"{name}: forward collectives {CALLS}")
    check(loss.device == dev and loss.dtype == dtype, f"{name}: loss on {loss.device} as {loss.dtype}")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    close(loss, ref, tol, f"{name}: loss")
    del CALLS[:]
    (gs,) = torch.autograd.grad(loss, xs, gout.to(dev).to(dtype))
    check(CALLS == [], f"{name}: backward collectives {CALLS}")
    check(gs.dtype == dtype and gs.device == dev, f"{name}: grad {gs.dtype} on {gs.device}")
    close(gs, gref[..., start : start + sizes[RANK]], tol, f"{name}: grad")
    LOSSES[name] = [int(b) for b in loss.detach().double().cpu().reshape(-1).view(torch.int64)]


LINEAR_CASES = [
    ("linear-f32", torch.float32, 96, 256, 2 * 8000, {"chunk_size": 4 * 8000}),
    (
        "linear-f32-bias-smooth-none",
        torch.float32,
        33,
        64,
        1000,
        {"bias": True, "label_smoothing": 0.1, "reduction": "none"},
    ),
    ("linear-bf16", torch.bfloat16, 64, 128, 4096, {"z_loss": 1e-3}),
]


def run_linear_case(name, dtype, n, h, v, opts):
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(len(name) * 1000 + v)
    hid = torch.randn(n, h, generator=g).to(dtype)
    W = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if opts.pop("bias", False) else None
    t = torch.randint(0, v, (n,), generator=g)
    t[0], t[1] = v - 1, -100
    chunk = opts.pop("chunk_size", None)
    size = v // WORLD
    start = RANK * size
    # The reference: the whole head on the CPU in float64 (from the same rounded values).
    hf, Wf = hid.double().requires_grad_(True), W.double().requires_grad_(True)
    bf = None if b is None else b.double().requires_grad_(True)
    ref = nt.cross_entropy(torch.nn.functional.linear(hf, Wf, bf), t, **opts)
    gout = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    refs = torch.autograd.grad(ref, [hf, Wf] + ([bf] if bf is not None else []), gout)
    hs = hid.to(dev).requires_grad_(True)
    Ws = W[start : start + size].to(dev).requires_grad_(True)
    bs = None if b is None else b[start : start + size].to(dev).requires_grad_(True)
    del CALLS[:]
    loss = nt.vocab_parallel_linear_cross_entropy(hs, Ws, t.to(dev), bias_shard=bs, chunk_size=chunk, **opts)
    check(CALLS == ["all_gather_into_tensor"], f"{name}: forward collectives {CALLS}")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    close(loss, ref, tol, f"{name}: loss")
    del CALLS[:]
    grads = torch.autograd.grad(loss, [hs, Ws] + ([bs] if bs is not None else []), gout.to(dev).to(dtype))
    check(CALLS == ["all_reduce"], f"{name}: backward collectives {CALLS}")
    close(grads[0], refs[0], tol, f"{name}: dhidden")
    close(grads[1], refs[1][start : start + size], tol, f"{name}: dweight")
    if bs is not None:
        close(grads[2], refs[2][start : start + size], tol, f"{name}: dbias")
    LOSSES[name] = [int(b) for b in loss.detach().double().cpu().reshape(-1).view(torch.int64)]


def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    torch.cuda.set_device(RANK % torch.cuda.device_count())
    dist.init_process_group("nccl", rank=RANK, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    for name, dtype, n, v, opts in CASES:
        try:
            run_case(name, dtype, n, v, dict(opts))
        except Exception as e:  # noqa: BLE001 - recorded; the ranks stay in step (same cases)
            FAILURES.append(f"rank {RANK}: {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
    for name, dtype, n, h, v, opts in LINEAR_CASES:
        try:
            run_linear_case(name, dtype, n, h, v, dict(opts))
        except Exception as e:  # noqa: BLE001 - recorded; the ranks stay in step (same cases)
            FAILURES.append(f"rank {RANK}: {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
    # A bad class id: an IndexError naming it on every rank, and the group still works after.
    t = torch.zeros(8, dtype=torch.int64, device="cuda")
    t[3] = 10 * WORLD + 5
    try:
        nt.vocab_parallel_cross_entropy(torch.randn(8, 10, device="cuda"), t)
        check(False, "bad class: no error")
    except IndexError as e:
        check(str(10 * WORLD + 5) in str(e), f"bad class: {e}")
    with open(os.path.join(OUTDIR, f"rank{RANK}.json"), "w") as f:
        json.dump({"failures": FAILURES, "losses": LOSSES}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - reported through the exit status and the printed traceback
        traceback.print_exc()
        sys.exit(1)
    sys.stdout.flush()
    os._exit(0)
