"""The vocabulary-parallel shard kernels on a real GPU, and vocab_parallel_cross_entropy over NCCL.

Run on a GPU machine with ``pytest -m gpu tests/cuda`` (deselected elsewhere). First the kernels
alone against the CPU's shard kernels on the same float32 values (statistics in normax-core's packed
layout; the gradient from the same global log-sum-exp); then spawned ranks over NCCL (world 2 with
two GPUs or more, else 1) against the single-process cross-entropy on the whole vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import ranks
import torch
from accuracy import assert_close_to_scale
from normax import _vocab_parallel as vocab_parallel
from normax._backends import cuda
from normax._backends.cuda.device import Lib
from normax._options import ce_options

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
WORKER = Path(__file__).parent.parent / "distributed" / "_nccl_worker.py"


def logits(rows, v, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(rows, v, generator=g, device=DEV) * 4
    # Special rows: NaN, +inf, all -inf, a -inf element, a dominant class (p_y rounds to 1).
    if rows >= 6:
        x[1, 3] = math.nan
        x[2, 5] = math.inf
        x[3] = -math.inf
        x[4, 0] = -math.inf
        x[5, 7] = 60.0
    return x.to(dtype)


def cpu_stats(x, t, w, start, opts):
    wn = None if w is None else w.cpu().numpy()
    return vocab_parallel.stats(x.float().cpu().numpy(), t.cpu().numpy(), wn, start, opts)


def gpu_stats(x, t, w, start, opts):
    packed = torch.full((x.shape[0], vocab_parallel.fields(opts)), 7.0, device=DEV)
    cuda.vocab_parallel_stats(Lib(x, "test"), x, t, w, packed, start, opts)
    return packed.cpu().numpy()


def same_packed(got, want):
    """The hi + lo sums match (their split may differ), the target logits too; specials exactly."""
    lse_g, lse_w = got[:, 0].astype(np.float64) + got[:, 1], want[:, 0].astype(np.float64) + want[:, 1]
    # float32 sums of the scaled exponentials in another order: a few roundings of the lse.
    assert_close_to_scale(lse_g, lse_w, 4e-6)
    assert_close_to_scale(got[:, 2], want[:, 2], 1e-6)  # tanhf vs the CPU's tanh under a softcap
    if got.shape[1] == 5:
        sm_g, sm_w = got[:, 3].astype(np.float64) + got[:, 4], want[:, 3].astype(np.float64) + want[:, 4]
        np.testing.assert_array_equal(np.isnan(sm_g), np.isnan(sm_w))
        finite = np.isfinite(sm_w)
        np.testing.assert_array_equal(np.isinf(sm_g), ~finite & ~np.isnan(sm_w))
        np.testing.assert_allclose(sm_g[finite], sm_w[finite], rtol=2e-5)


CASES = [
    {},
    {"label_smoothing": 0.1},
    {"softcap": 20.0, "label_smoothing": 0.05, "weight": True},
    {"z_loss": 1e-3, "weight": True, "ignore_index": 2},
    # Class 0 (-inf in row 4) weighs 0: its smoothing term is 0 * inf = NaN, as on the CPU.
    {"label_smoothing": 0.1, "weight": "zero at 0"},
    # Positive in float64 but 0 in float32: still the 5-field layout the host sized.
    {"label_smoothing": 1e-46},
]


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize(
    "rows,v,split", [(9, 37, 20), (64, 4096, 1000), (8, 2 * 64128, 64128), (3, 200_001, 7), (5, 16, 0)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_kernels_match_the_cpu(dtype, rows, v, split, opts):
    """Two shards [0, split) and [split, v): each one's statistics, then the gradient of each from
    the combined log-sum-exp, against normax-core's shard kernels on the same (rounded) values."""
    opts = dict(opts)
    g = torch.Generator(device=DEV).manual_seed(rows)
    weighted = opts.pop("weight", False)
    w = torch.rand(v, generator=g, device=DEV) + 0.5 if weighted else None
    if weighted == "zero at 0":
        w[0] = 0.0
    o = ce_options(opts.pop("ignore_index", -100), "mean", opts.get("label_smoothing", 0.0),
                   opts.get("z_loss", 0.0), opts.get("softcap"))  # fmt: skip
    x = logits(rows, v, dtype)
    t = torch.randint(0, v, (rows,), generator=g, device=DEV)
    t[0] = o.ignore_index
    if rows > 5:
        t[5] = 7  # the dominant class of row 5
        t[6] = v - 1  # on the second shard
    shards = [(0, split), (split, v - split)]
    packs = []
    for start, length in shards:
        xs = x[:, start : start + length].contiguous()
        got, want = gpu_stats(xs, t, w, start, o), cpu_stats(xs, t, w, start, o)
        same_packed(got, want)
        packs.append(want)
    # The global lse and denominator from the CPU's combine of the CPU's statistics.
    gathered = np.stack([p.reshape(-1) for p in packs])
    wn = None if w is None else w.cpu().numpy()
    tn = t.cpu().numpy()
    _, lse, denom = vocab_parallel.combine(gathered, shards, tn, wn, o)
    lse32 = torch.from_numpy(lse.astype(np.float32)).to(DEV)
    w_sum = float(v if w is None else w.double().sum())
    gout = torch.tensor(0.75, device=DEV)
    for start, length in shards:
        xs = x[:, start : start + length].contiguous()
        got = cuda.vocab_parallel_backward(Lib(xs, "test"), xs, t, w, lse32, gout, denom, start, v, w_sum, o)
        assert got.dtype == dtype and got.shape == xs.shape
        want = vocab_parallel.backward(xs.float().cpu().numpy(), tn, wn, lse, denom, 0.75, start, v, o)
        # float32 exp of x - lse (the kernel's hi/lo in float32); 16-bit outputs rounded once more.
        assert_close_to_scale(got.float(), want, 2e-5 if dtype == torch.float32 else 1e-2, floor=1e-30)


def test_vocab_parallel_over_nccl(tmp_path):
    world = 2 if torch.cuda.device_count() >= 2 else 1
    results = ranks.spawn(WORKER, world, tmp_path, 180)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:40])
    assert len(results[0]["losses"]) >= 8
    for r in results[1:]:
        assert r["losses"] == results[0]["losses"]  # bit-identical on every rank
