"""logprobs / linear_logprobs and the cross-entropy's issue-24 options (temperature, token weights,
return_stats) on the CUDA path.

Three layers, none needing a GPU: the Python side against float64 torch references through the
kernels' emulated contracts (cuda_emulation.py); the kernels' own float32 arithmetic (the online
(max, sum, entropy) statistics folded per thread in 16-byte packs and merged in warp trees, the
argmax merge, the backward's collapse-safe target entry), replayed in NumPy float32 step by step
as logprobs.cu and cross_entropy.cu compute it; and the real Rust host sequences under the
dry-run recorder (which kernels, grids and scratch a GPU would be asked for; bad inputs launch
nothing).
"""

import importlib
import math

import numpy as np
import pytest
from cuda_emulation import torch
from normax import _core
from normax._backends import cuda
from normax._options import ce_options

F64 = torch.float64

# The module (the package exports its function of the same name).
lp = importlib.import_module("normax._backends.cuda.logprobs")


def _ref_logprobs(x, t, temperature, ignore_index=-100):
    """float64 torch autograd reference: (logprob, entropy) with ignored rows 0."""
    z = x.double() / temperature
    logp = torch.log_softmax(z, -1)
    kept = t != ignore_index
    y = torch.where(kept, t, 0)
    lp_y = torch.where(kept, logp.gather(-1, y[..., None])[..., 0], 0.0)
    p = logp.exp()
    ent = torch.where(kept, -(p * torch.where(p > 0, logp, 0.0)).sum(-1), 0.0)  # no NaN from 0 * -inf
    return lp_y, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_logprobs_forward_and_backward_match_float64_autograd(cuda_kernels, temperature):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 11, generator=g) * 3
    x[1, 5] = -math.inf  # a -inf logit: p = 0, no NaN in the entropy or its gradient
    t = torch.tensor([3, 4, -100, 0, 10, 7])
    logp, ent = lp.logprobs(x, t, temperature=temperature)
    want_lp, want_ent = _ref_logprobs(x, t, temperature)
    torch.testing.assert_close(logp, want_lp.float())
    torch.testing.assert_close(ent, want_ent.float())
    assert logp[2] == 0 and ent[2] == 0
    assert cuda_kernels.names() == ["cuda_logprobs_forward"]
    assert not torch.equal(lp.logprobs(x, t, temperature=temperature, return_entropy=False), ent)

    x64 = x.double().requires_grad_()
    r_lp, r_ent = _ref_logprobs(x64, t, temperature)
    g_lp, g_ent = torch.randn(6, generator=g), torch.randn(6, generator=g)
    tk = t.clone()
    saved = lp.logprobs_forward(cuda.device.Lib(x, "test"), x, tk, -100, temperature)
    lib = cuda.device.Lib(x, "test")
    for grads in [(g_lp, g_ent), (g_lp, None), (None, g_ent)]:
        want = torch.autograd.grad(
            sum((r * gi.double()).sum() for r, gi in zip((r_lp, r_ent), grads) if gi is not None),
            x64, retain_graph=True,
        )[0].nan_to_num(0.0)  # fmt: skip
        got = lp.logprobs_backward(lib, x, tk, saved, grads, -100, temperature)
        torch.testing.assert_close(got, want.float())


def test_logprobs_refuses_bad_arguments_before_any_kernel(cuda_kernels):
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature: must be a finite number > 0"):
            lp.logprobs(x, t, temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        lp.logprobs(x, t, temperature="1.0")
    with pytest.raises(TypeError, match="target"):
        lp.logprobs(x, t.float())
    with pytest.raises(IndexError):
        lp.logprobs(x, torch.tensor([0, 5, 1]))
    assert cuda_kernels.names() == []


@pytest.mark.parametrize("chunk_size", [None, 3 * 13])  # one block; blocks of 3 rows
def test_linear_logprobs_matches_float64_autograd(cuda_kernels, chunk_size):
    g = torch.Generator().manual_seed(1)
    n, h, v = 8, 5, 13
    hid, w, b = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    t = torch.tensor([1, 12, -100, 0, 5, 5, 9, 2])
    T = 1.7
    logp, ent = lp.linear_logprobs(hid, w, t, linear_bias=b, temperature=T, chunk_size=chunk_size)
    h64, w64, b64 = (a.double().requires_grad_() for a in (hid, w, b))
    r_lp, r_ent = _ref_logprobs(h64 @ w64.T + b64, t, T)
    torch.testing.assert_close(logp, r_lp.detach().float())
    torch.testing.assert_close(ent, r_ent.detach().float())
    lib = cuda.device.Lib(hid, "test")
    tk = t.clone()
    saved = lp.linear_logprobs_forward(lib, hid, w, b, tk, -100, T, chunk_size)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    for grads in [(g_lp, g_ent), (None, g_ent), (g_lp, None)]:
        loss = sum((r * gi.double()).sum() for r, gi in zip((r_lp, r_ent), grads) if gi is not None)
        want = torch.autograd.grad(loss, (h64, w64, b64), retain_graph=True)
        got = lp.linear_logprobs_backward(lib, hid, w, b, tk, saved, grads, -100, T, chunk_size)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e.float())
    blocks = 1 if chunk_size is None else 3
    assert cuda_kernels.names().count("cuda_logprobs_forward") == 2 * blocks


def _ref_ce(x, t, *, T=1.0, weight=None, tw=None, reduction="mean", eps=0.0, z=0.0, cap=None, ignore=-100):
    """float64 torch reference of the cross-entropy with temperature and token weights: per-row
    loss and the stats (lse, entropy, correct, z-loss term)."""
    zl = x.double() / T
    if cap:
        zl = cap * torch.tanh(zl / cap)
    c = x.shape[-1]
    w = torch.ones(c, dtype=F64) if weight is None else weight.double()
    kept = t != ignore
    y = torch.where(kept, t, 0)
    lse = torch.logsumexp(zl, -1)
    logp = zl - lse[:, None]
    rows = -(1 - eps) * w[y] * logp.gather(1, y[:, None])[:, 0] - eps / c * (w * logp).sum(-1) + z * lse**2
    tw = torch.ones(len(t), dtype=F64) if tw is None else tw.double()
    rows = torch.where(kept, rows * tw, 0.0)
    denom = (w[y] * tw * kept).sum()
    loss = {"mean": rows.sum() / denom, "sum": rows.sum(), "none": rows}[reduction]
    ent = torch.where(kept, -(logp.exp() * logp).nan_to_num(0.0).sum(-1), 0.0)
    correct = kept & (torch.from_numpy(np.argmax(x.detach().numpy(), -1)) == t)
    zterm = (
        z * (tw * torch.where(kept, lse, 0.0) ** 2).sum() if z else torch.zeros((), dtype=F64)
    )  # 0: no term
    zterm = zterm / denom if reduction == "mean" else zterm
    return loss, (torch.where(kept, lse, 0.0), ent, correct, zterm)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("eps", "z", "cap"), [(0.0, 0.0, None), (0.1, 1e-3, 5.0)])
def test_cross_entropy_temperature_token_weight_stats_match_float64(cuda_kernels, reduction, eps, z, cap):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 9, generator=g) * 2
    x[0, :] = x[0, 3]  # a tie everywhere: the first index wins
    x[4, 2] = math.nan  # the first NaN is the argmax (and the row's loss is NaN)
    t = torch.tensor([0, 8, -100, 4, 2, 1, 6])
    weight = torch.rand(9, generator=g) + 0.5
    tw = torch.rand(7, generator=g) * 2
    T = 0.8
    opts = ce_options(-100, reduction, eps, z, cap)
    loss, grad, stats = cuda.cross_entropy_rows(
        "normax.cross_entropy_with_grad", x, t, -1, weight, opts, False, True, 1.0, False, True, T, tw, True
    )
    keep = torch.arange(7) != 4  # the NaN row's loss is NaN in both; compare the others
    x64 = x.double().requires_grad_()
    want, (lse, ent, correct, zterm) = _ref_ce(
        x64, t, T=T, weight=weight, tw=tw, reduction="none", eps=eps, z=z, cap=cap
    )
    denom = (weight.double()[torch.where(t != -100, t, 0)] * tw.double() * (t != -100)).sum()
    scale = {"mean": 1 / denom, "sum": 1.0, "none": 1.0}[reduction]
    want_grad = torch.autograd.grad((want[keep]).sum() * scale, x64)[0]
    if reduction == "none":
        torch.testing.assert_close(loss[keep].double(), want[keep].detach())
    torch.testing.assert_close(grad[keep].double(), want_grad[keep], rtol=1e-5, atol=1e-6)
    assert stats.lse.dtype == stats.entropy.dtype == torch.float32 and stats.correct.dtype == torch.bool
    torch.testing.assert_close(stats.lse[keep].double(), lse[keep].detach())
    torch.testing.assert_close(stats.entropy[keep].double(), ent[keep].detach())
    assert stats.correct.tolist() == correct.tolist()
    assert stats.correct[0] and not stats.correct[2]  # the tie's first index is the target; ignored row
    assert stats.z_loss.shape == () and stats.z_loss.dtype == torch.float32
    torch.testing.assert_close(
        stats.z_loss.double(), (zterm * scale if reduction == "mean" else zterm).detach(), equal_nan=True
    )
    assert cuda_kernels.names() == ["cuda_cross_entropy"]  # the general kernel, one launch


def test_linear_cross_entropy_options_match_float64(cuda_kernels):
    g = torch.Generator().manual_seed(3)
    n, h, v = 9, 4, 11
    hid, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    t = torch.tensor([1, 10, -100, 0, 5, 5, 9, 2, 3])
    tw = torch.rand(n, generator=g)
    opts = ce_options(-100, "mean", 0.0, 1e-2, None)
    loss, dh, dw, no_bias, stats = cuda.linear_blocks(
        "normax.linear_cross_entropy_with_grad", hid, w, t, None, opts, 4 * v, True,
        temperature=2.0, token_weight=tw, return_stats=True,
    )  # fmt: skip
    h64, w64 = hid.double().requires_grad_(), w.double().requires_grad_()
    want, (lse, ent, correct, zterm) = _ref_ce(h64 @ w64.T, t, T=2.0, tw=tw, z=1e-2)
    want_dh, want_dw = torch.autograd.grad(want, (h64, w64))
    torch.testing.assert_close(loss.double(), want.detach())
    torch.testing.assert_close(dh.double(), want_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.lse.double(), lse.detach())
    torch.testing.assert_close(stats.entropy.double(), ent.detach())
    torch.testing.assert_close(stats.z_loss.double(), zterm.detach())
    assert no_bias is None and stats.correct.tolist() == correct.tolist()
    assert cuda_kernels.names() == ["cuda_cross_entropy"] * 3  # blocks of 4, 4 and 1 rows


def test_cross_entropy_token_weight_shape_is_checked(cuda_kernels):
    opts = ce_options(-100, "mean", 0.0, 0.0, None)
    with pytest.raises(ValueError, match="token_weight"):
        cuda.cross_entropy_rows(
            "normax.cross_entropy", torch.randn(3, 4), torch.tensor([0, 1, 2]), -1, None, opts, False, False,
            token_weight=torch.ones(4),
        )  # fmt: skip
    assert cuda_kernels.names() == []


def _raw32(t):
    return (t.data_ptr(), {torch.float32: 0, torch.bfloat16: 2, torch.int64: 3}[t.dtype], t.numel())


S = _core.CudaStream(0, 0x5EED)


def _recorded(fn):
    _core.cuda_record(True)
    try:
        fn()
    finally:
        events = _core.cuda_record(False)
    return events


def test_the_real_host_sequences_under_the_dry_run_recorder():
    """What a GPU would be asked for, from the Rust host code itself (no driver needed)."""
    x = torch.randn(4, 65536)
    t = torch.zeros(4, dtype=torch.int64)
    f32 = [torch.full((4,), math.nan) for _ in range(3)]
    fwd = (_raw32(x), _raw32(t))
    saved = tuple(_raw32(a) for a in f32)
    # logprobs: the forward one launch of whole rows (512 threads each); the backward one launch,
    # long rows split across blocks (no reduction), no scratch.
    events = _recorded(lambda: _core.cuda_logprobs_forward(fwd, (-100, 0.5), (4, 65536), saved, S))
    assert events == [("launch", "logprobs_forward_f32_v4", (4, 1, 1), (512, 1, 1))]
    dx = torch.empty_like(x)
    g = torch.ones(4)
    events = _recorded(
        lambda: _core.cuda_logprobs_backward(
            fwd, (-100, 0.5), (4, 65536), saved, (None, _raw32(g), _raw32(dx)), S
        )
    )
    assert [e[:2] for e in events] == [("launch", "logprobs_backward_f32_v4")] and events[0][2][0] > 4
    assert all(torch.isnan(a).all() for a in f32)  # nothing ran
    # The cross-entropy with stats: whole rows (no split, so no scratch alloc/free), the stats kernel;
    # without: the split two-pass sequence, its scratch freed.
    opts = _core.CeOptions(-100, "none", 0.0, 0.0, None)
    loss = torch.empty(4)
    inputs = (_raw32(x), _raw32(t), None)
    plain = _recorded(lambda: _core.cuda_cross_entropy(inputs, opts, (4, 65536), _raw32(loss), None, S))
    assert [e[0] for e in plain] == ["alloc", "launch", "launch", "free"]
    extras = (2.0, _raw32(torch.ones(4)), saved)
    stats = _recorded(
        lambda: _core.cuda_cross_entropy(inputs, opts, (4, 65536), _raw32(loss), None, S, extras)
    )
    assert stats == [("launch", "cross_entropy_stats_f32_v4", (4, 1, 1), (512, 1, 1))]
    small = torch.randn(16, 256)
    st16 = tuple(_raw32(torch.empty(16)) for _ in range(3))
    cached = _recorded(
        lambda: _core.cuda_cross_entropy(
            (_raw32(small), _raw32(torch.zeros(16, dtype=torch.int64)), None), opts, (16, 256),
            _raw32(torch.empty(16)), None, S, (1.0, None, st16),
        )
    )  # fmt: skip
    assert [e[1] for e in cached] == ["ce_cached_stats_f32_p2"]
    # Bad inputs: a ValueError naming the argument, nothing launched.
    for bad, match in [
        (lambda: _core.cuda_logprobs_forward(fwd, (-100, 0.0), (4, 65536), saved, S), "temperature"),
        (lambda: _core.cuda_logprobs_forward(fwd, (-100, 1.0), (4, 65535), saved, S), "logits"),
        (
            lambda: _core.cuda_cross_entropy(
                inputs, opts, (4, 65536), _raw32(loss), None, S, (1.0, _raw32(torch.ones(3)), None)
            ),
            "token_weight",
        ),
        (
            lambda: _core.cuda_cross_entropy(
                inputs, opts, (4, 65536), _raw32(loss), None, S, (-1.0, None, None)
            ),
            "temperature",
        ),
    ]:
        _core.cuda_record(True)
        try:
            with pytest.raises(ValueError, match=match):
                bad()
        finally:
            assert _core.cuda_record(False) == []


def test_public_cross_entropy_options_on_cuda_arrays_match_the_cpu(cuda_kernels):
    import normax

    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 7, generator=g)
    t = torch.tensor([1, -100, 6, 0, 3])
    tw = torch.rand(5, generator=g)
    kw = {"temperature": 1.5, "token_weight": tw, "return_stats": True, "z_loss": 1e-3}
    loss, grad, stats = normax.cross_entropy_with_grad(x, t, **kw)
    want_loss, want_grad, want = normax.cross_entropy_with_grad(
        x.numpy(), t.numpy(), **{**kw, "token_weight": tw.numpy()}
    )
    torch.testing.assert_close(loss.double(), torch.tensor(float(want_loss), dtype=F64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, torch.from_numpy(want_grad), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.lse, torch.from_numpy(np.asarray(want.lse, np.float32)))
    torch.testing.assert_close(stats.entropy, torch.from_numpy(np.asarray(want.entropy, np.float32)))
    assert stats.correct.tolist() == np.asarray(want.correct).tolist()
    torch.testing.assert_close(float(stats.z_loss), float(want.z_loss), rtol=1e-5, atol=1e-9)
