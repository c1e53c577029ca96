"""normax.torch.vocab_parallel_cross_entropy's CUDA path, with the kernels emulated (cuda_emulation.py).

The ranks of a tensor-parallel group are threads of this process and the all-gather a barrier
(``FakeGroup``): every rank runs the CUDA path's Python side (device buffer, header, the emulated
shard kernels, the gather, the host combine, the backward kernel) and must match the CPU's
single-process ``nt.cross_entropy`` on the whole vocabulary. The kernels themselves run on a GPU in
test_gpu_vocab_parallel.py.
"""

from __future__ import annotations

import threading
import types

import normax.torch as nt
import numpy as np
import pytest
from cuda_emulation import STREAM, torch
from normax.torch import _vocab_parallel as vp
from normax.torch import _vocab_parallel_linear as vpl


class FakeGroup:
    """`world` threads as the ranks of a process group; all_gather_into_tensor is a barrier."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots = [None] * world
        self.local = threading.local()
        self.gathers = [0] * world
        self.reduces = [0] * world

    def all_gather_into_tensor(self, out, buf, group):
        assert group is self
        r = self.local.rank
        self.gathers[r] += 1
        self.slots[r] = buf.clone()
        self.barrier.wait()
        out.copy_(torch.cat(self.slots))
        self.barrier.wait()

    def all_reduce(self, tensor, op, group):
        assert group is self and op == "sum"
        r = self.local.rank
        self.reduces[r] += 1
        self.slots[r] = tensor.clone()
        self.barrier.wait()
        tensor.copy_(torch.stack(self.slots).sum(0))
        self.barrier.wait()

    def run(self, fn):
        """fn(rank) on every rank at once; their results in rank order (the first error raised)."""
        results, errors = [None] * self.world, [None] * self.world

        def body(r):
            self.local.rank = r
            try:
                results[r] = fn(r)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
                errors[r] = e
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e in errors:
            if e is not None and not isinstance(e, threading.BrokenBarrierError):
                raise e
        return results


@pytest.fixture
def group(monkeypatch):
    def make(world):
        g = FakeGroup(world)
        fake = types.SimpleNamespace(
            get_rank=lambda group: g.local.rank,
            get_world_size=lambda group: g.world,
            all_gather_into_tensor=g.all_gather_into_tensor,
            all_reduce=g.all_reduce,
            ReduceOp=types.SimpleNamespace(SUM="sum"),
        )
        monkeypatch.setattr(vp, "dist", fake)
        monkeypatch.setattr(vpl, "dist", fake)
        return g

    return make


def splits(v, world, uneven):
    if not uneven:
        return [v // world] * world
    sizes = [max(1, v // world - world + 1 + 2 * k) for k in range(world)]
    sizes[-1] += v - sum(sizes)
    return sizes


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 4.0},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.2, "reduction": "sum", "z_loss": 1e-3, "softcap": 5.0},
    {"ignore_index": 3, "label_smoothing": 0.05, "reduction": "none"},
]


def run_case(group, world, opts, uneven, n=9, all_ignored=False):
    v = 37 if uneven else 36  # 36: an equal split for every world size tested
    g = torch.Generator().manual_seed(world * 100 + len(opts))
    x = torch.randn(n, v, generator=g, dtype=torch.float64).mul(3).float()
    t = torch.randint(0, v, (n,), generator=g)
    t[0], t[1] = v - 1, opts.get("ignore_index", -100)  # a class on the last rank, an ignored row
    if all_ignored:
        t[:] = opts.get("ignore_index", -100)
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(v, generator=g) + 0.5
    sizes = splits(v, world, uneven)
    xf = x.clone().requires_grad_(True)
    ref = nt.cross_entropy(xf, t, **opts)
    gout = torch.rand(ref.shape, generator=g) + 0.5
    (gref,) = torch.autograd.grad(ref, xf, gout)
    fg = group(world)

    def rank(r):
        start = sum(sizes[:r])
        xs = x[:, start : start + sizes[r]].clone().requires_grad_(True)
        loss = nt.vocab_parallel_cross_entropy(xs, t, group=fg, vocab_start=start if uneven else None, **opts)
        (gs,) = torch.autograd.grad(loss, xs, gout)
        return loss.detach(), gs, gref[:, start : start + sizes[r]]

    results = fg.run(rank)
    assert fg.gathers == [1] * world  # one collective per forward, none in the backward
    for r, (loss, gs, want) in enumerate(results):
        # Bit-identical losses on every rank (the same host combine of the same gathered bytes).
        assert torch.equal(loss, results[0][0]) or (loss.isnan().all() and results[0][0].isnan().all())
        # The emulation is float64 and the packed statistics float32 hi/lo: float32 roundings.
        np.testing.assert_allclose(loss.double().numpy(), ref.detach().double().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(gs.double().numpy(), want.double().numpy(), rtol=1e-5, atol=1e-7)
    return results


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_matches_the_cpu_cross_entropy(cuda_kernels, group, world, opts, uneven):
    run_case(group, world, opts, uneven)
    names = cuda_kernels.names()
    assert names.count("cuda_vocab_parallel_stats") == world and names.count("cuda_vocab_parallel_backward") == world
    assert set(names) == {"cuda_vocab_parallel_stats", "cuda_vocab_parallel_backward"}  # nothing on the CPU kernels
    assert all(c[2] == STREAM for c in cuda_kernels.calls)  # on the caller's current stream


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(cuda_kernels, group, reduction):
    (_, gs, _), _ = run_case(group, 2, {"reduction": reduction}, False, all_ignored=True)
    assert torch.all(gs == 0)


def test_16_bit_logits_keep_their_dtype(cuda_kernels, group):
    """bfloat16 logits go to the kernels as they are (no float32 copy); loss and gradient in bfloat16."""
    v, n = 20, 5
    x = torch.randn(n, v, generator=torch.Generator().manual_seed(3)).bfloat16()
    t = torch.tensor([19, 0, 7, -100, 12])
    ref = nt.cross_entropy(x.float(), t)
    fg = group(2)

    def rank(r):
        xs = x[:, r * 10 : (r + 1) * 10].clone().requires_grad_(True)
        loss = nt.vocab_parallel_cross_entropy(xs, t, group=fg)
        loss.backward()
        return loss, xs.grad

    for loss, grad in fg.run(rank):
        assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
        np.testing.assert_allclose(float(loss.detach()), float(ref), rtol=1e-2)
    logits_calls = [c for c in cuda_kernels.calls if c[0] == "cuda_vocab_parallel_stats"]
    assert len(logits_calls) == 2


def test_errors_reach_every_rank(cuda_kernels, group):
    v, n = 16, 6
    x = torch.randn(n, v)
    t = torch.randint(0, v, (n,))
    fg = group(2)

    def bad_class(r):
        t3 = t.clone()
        t3[2] = v + 3
        with pytest.raises(IndexError, match=str(v + 3)):
            nt.vocab_parallel_cross_entropy(x[:, r * 8 : (r + 1) * 8], t3, group=fg)
        return True

    assert fg.run(bad_class) == [True, True]
    # A rank whose own input is invalid (its shard outside the weight): it raises its own error, the
    # other names it; nothing hangs.
    fg = group(2)
    w = torch.rand(v)

    def bad_weight(r):
        ws = w[:12] if r == 1 else w
        with pytest.raises(ValueError, match="weight|rejected"):
            nt.vocab_parallel_cross_entropy(x[:, r * 8 : (r + 1) * 8], t, group=fg, weight=ws)
        return True

    assert fg.run(bad_weight) == [True, True]


def test_device_and_dtype_checks(cuda_kernels, monkeypatch):
    x = torch.randn(4, 8)
    t = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="float64"):
        nt.vocab_parallel_cross_entropy(x.double(), t)
    with pytest.raises(TypeError, match="weight_shard.*float64"):
        nt.vocab_parallel_linear_cross_entropy(torch.randn(4, 3), torch.randn(8, 3).double(), t)
    # A target on another device than the logits.
    from normax._backends import cuda

    monkeypatch.setattr(cuda, "is_cuda_array", lambda a: a is x)
    with pytest.raises(ValueError, match="target"):
        nt.vocab_parallel_cross_entropy(x, t)
    assert cuda_kernels.calls == []


LINEAR_OPTIONS = [
    {},
    {"reduction": "none", "chunk_size": 40},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "sum", "chunk_size": 1},
    {"softcap": 3.0, "bias": True},
    {"weight": True, "label_smoothing": 0.1, "bias": True, "chunk_size": 100},
]


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("opts", LINEAR_OPTIONS)
@pytest.mark.parametrize("world", [1, 3])
def test_linear_matches_the_cpu(cuda_kernels, group, world, opts, uneven):
    """The linear version's CUDA path: the logits kept from the forward (the default budget) or,
    with ``chunk_size`` and ``logits_budget=0``, recomputed block by block (GEMMs) into the shard
    kernels; one all-gather forward, one all-reduce of d hidden backward."""
    n, h = 11, 8
    v = 29 if uneven else 24
    g = torch.Generator().manual_seed(world * 10 + len(opts))
    hid, W = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    opts = dict(opts)
    b = torch.randn(v, generator=g) if opts.pop("bias", False) else None
    cw = torch.rand(v, generator=g) + 0.5 if opts.pop("weight", False) else None
    chunk = opts.pop("chunk_size", None)
    t = torch.randint(0, v, (n,), generator=g)
    t[0], t[1] = v - 1, -100
    hf, Wf = hid.clone().requires_grad_(True), W.clone().requires_grad_(True)
    bf = None if b is None else b.clone().requires_grad_(True)
    ref = nt.cross_entropy(torch.nn.functional.linear(hf, Wf, bf), t, weight=cw, **opts)
    gout = torch.rand(ref.shape, generator=g) + 0.5
    inputs = [hf, Wf] + ([bf] if bf is not None else [])
    grefs = torch.autograd.grad(ref, inputs, gout)
    sizes = splits(v, world, uneven)
    fg = group(world)

    def rank(r):
        start = sum(sizes[:r])
        hs = hid.clone().requires_grad_(True)
        Ws = W[start : start + sizes[r]].clone().requires_grad_(True)
        bs = None if b is None else b[start : start + sizes[r]].clone().requires_grad_(True)
        loss = nt.vocab_parallel_linear_cross_entropy(
            hs, Ws, t, group=fg, bias_shard=bs, vocab_start=start if uneven else None, weight=cw,
            chunk_size=chunk, logits_budget=None if chunk is None else 0, **opts,
        )  # fmt: skip
        grads = torch.autograd.grad(loss, [hs, Ws] + ([bs] if bs is not None else []), gout)
        return loss.detach(), grads, start

    results = fg.run(rank)
    assert fg.gathers == [1] * world and fg.reduces == [1] * world
    for r, (loss, grads, start) in enumerate(results):
        assert torch.equal(loss, results[0][0])
        np.testing.assert_allclose(loss.numpy(), ref.detach().numpy(), rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(grads[0].numpy(), grefs[0].numpy(), rtol=1e-5, atol=1e-6)
        mine = slice(start, start + sizes[r])
        np.testing.assert_allclose(grads[1].numpy(), grefs[1][mine].numpy(), rtol=1e-5, atol=1e-6)
        if b is not None:
            np.testing.assert_allclose(grads[2].numpy(), grefs[2][mine].numpy(), rtol=1e-5, atol=1e-6)
    names = cuda_kernels.names()
    blocks = names.count("cuda_vocab_parallel_stats")
    assert blocks >= world and names.count("cuda_vocab_parallel_backward") == blocks
    if chunk is None:
        assert blocks == world  # kept: one block of every row per rank
    if chunk == 1:
        assert blocks == world * n  # one row per block


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_special_rows(cuda_kernels, group, label_smoothing):
    """NaN, +inf, all -inf and a -inf element: the packed specials combine into what the CPU's
    cross_entropy of the whole row gives (NaN, or +inf for a smoothed -inf class)."""
    v = 12
    x = torch.randn(6, v, generator=torch.Generator().manual_seed(5))
    x[0, 2] = float("nan")
    x[1, 9] = float("inf")
    x[2] = float("-inf")
    x[3, 4] = float("-inf")
    x[4, :6] = float("-inf")  # all -inf on the first shard only
    t = torch.tensor([1, 3, 5, 7, 8, 11])
    xf = x.clone().requires_grad_(True)
    opts = {"reduction": "none", "label_smoothing": label_smoothing}
    ref = nt.cross_entropy(xf, t, **opts)
    (gref,) = torch.autograd.grad(ref, xf, torch.ones(6))
    fg = group(2)

    def rank(r):
        xs = x[:, r * 6 : (r + 1) * 6].clone().requires_grad_(True)
        loss = nt.vocab_parallel_cross_entropy(xs, t, group=fg, **opts)
        (g,) = torch.autograd.grad(loss, xs, torch.ones(6))
        return loss.detach(), g

    results = fg.run(rank)
    assert torch.isnan(results[0][0][:3]).all()
    for r, (loss, g) in enumerate(results):
        np.testing.assert_allclose(loss.numpy(), ref.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(g.numpy(), gref[:, r * 6 : (r + 1) * 6].numpy(), rtol=1e-5, atol=1e-7)
