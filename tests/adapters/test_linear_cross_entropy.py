"""normax.torch.linear_cross_entropy and nt.LinearCrossEntropyLoss against torch 2.15's own
F.linear_cross_entropy / nn.LinearCrossEntropyLoss (the reference path, options=None): values
and the gradients of input, linear_weight, linear_bias and probability targets, for every
option; torch's LinearCrossEntropyOptions; the NumPy-first normax.linear_cross_entropy.

float64 throughout: both sides compute the same math, so they agree to a few ULP (1e-10
relative is far above float64 rounding of these small sums and far below any wrong term)."""

from __future__ import annotations

import itertools
import warnings

import normax
import normax.torch as nt
import numpy as np
import pytest
import torch
import torch.nn.functional as F

N, H, C, D = 6, 5, 7, 3


def _case(kdim, soft, unbatched, bias, class_weights, seed=1):
    g = torch.Generator().manual_seed(seed)
    lead = () if unbatched else (N,)
    w_shape = (C, D, H) if kdim else (C, H)
    h = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64)
    b = torch.randn(*w_shape[:-1], generator=g, dtype=torch.float64) if bias else None
    logits_shape = lead + w_shape[:-1]
    if soft:
        t = torch.randn(*logits_shape, generator=g, dtype=torch.float64).softmax(len(lead))
    else:
        t = torch.randint(0, C, lead + w_shape[1:-1], generator=g)
        if t.ndim:
            t.view(-1)[1] = -100  # the default ignore_index
    cw = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if class_weights else None
    return h, w, t, b, cw


def _loss_and_grads(fn, h, w, t, b, cw, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    soft = t.is_floating_point()
    t = t.clone().requires_grad_() if soft else t
    loss = fn(h, w, t, linear_bias=b, weight=cw, **kw)
    leaves = [x for x in (h, w, b, t if soft else None) if x is not None]
    go = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss, torch.autograd.grad(loss, leaves, go)


CASES = [
    c
    for c in itertools.product([False, True], [False, True], [False, True], [False, True], [False, True])
    if not (c[0] and c[2])  # a K-dimensional loss needs batched input (torch raises)
]


@pytest.mark.parametrize("kdim, soft, unbatched, bias, class_weights", CASES)
def test_matches_torch_values_and_gradients(kdim, soft, unbatched, bias, class_weights):
    h, w, t, b, cw = _case(kdim, soft, unbatched, bias, class_weights)
    for reduction, label_smoothing in itertools.product(["mean", "sum", "none"], [0.0, 0.2]):
        kw = {"reduction": reduction, "label_smoothing": label_smoothing}
        want, want_grads = _loss_and_grads(F.linear_cross_entropy, h, w, t, b, cw, **kw)
        got, got_grads = _loss_and_grads(nt.linear_cross_entropy, h, w, t, b, cw, **kw)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"loss {kw}")
        assert len(got_grads) == len(want_grads)
        for name, a, e in zip(
            ["input", "linear_weight", "linear_bias/target", "target"], got_grads, want_grads
        ):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=f"{name} {kw}")


def test_ignore_index_and_chunking_match_torch():
    h, w, t, b, cw = _case(False, False, False, True, True)
    t = t.clone()
    t[3] = 2
    for ignore_index, chunk_size in [(2, None), (None, C), (-100, 2 * C), (2, 1)]:
        t[1] = -100 if ignore_index in (None, -100) else 2
        want = _loss_and_grads(F.linear_cross_entropy, h, w, t, b, cw, ignore_index=ignore_index)
        got = _loss_and_grads(
            nt.linear_cross_entropy, h, w, t, b, cw, ignore_index=ignore_index, chunk_size=chunk_size
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # ignore_index=None is -100, not "nothing ignored": -100 rows leave the loss; with another
    # ignore_index, -100 is out of range, as in torch.
    assert float(nt.linear_cross_entropy(h, w, torch.full((N,), -100), reduction="sum")) == 0.0
    with pytest.raises(IndexError, match="-100"):
        nt.linear_cross_entropy(h, w, torch.full((N,), -100), weight=cw, ignore_index=2)


def test_float32_and_bfloat16_match_torch():
    h, w, t, b, _ = _case(False, False, False, True, False)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        args = [x.to(dtype) for x in (h, w)] + [t, b.to(dtype)]
        want = F.linear_cross_entropy(*args[:3], linear_bias=args[3])
        got = nt.linear_cross_entropy(*args[:3], linear_bias=args[3])
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_probability_target_errors_as_torch():
    h, w, t, _, _ = _case(False, True, False, False, False)
    with pytest.raises(RuntimeError, match="ignore_index"):
        F.linear_cross_entropy(h, w, t, ignore_index=-100)
    with pytest.raises(ValueError, match="ignore_index"):
        nt.linear_cross_entropy(h, w, t, ignore_index=-100)
    with pytest.raises(ValueError, match="linear_bias"):
        nt.linear_cross_entropy(h, w, t, linear_bias=torch.zeros(C + 1, dtype=h.dtype))
    with pytest.raises(ValueError, match="K-dimensional"):
        nt.linear_cross_entropy(h[0], torch.zeros(C, D, H, dtype=h.dtype), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="linear_weight"):
        nt.linear_cross_entropy(h, w.long(), t)


def test_options_are_torchs():
    options = torch.nn.LinearCrossEntropyOptions
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(16, 4, generator=g), torch.randn(40, 4, generator=g)
    t = torch.randint(0, 40, (16,), generator=g)
    want = nt.linear_cross_entropy(h, w, t)
    for opt in [
        options(),
        options(batch_chunk_size=3),
        options(acc_policy="accurate"),
        options(chunking_method="aspect_ratio:2"),
    ]:
        got = nt.linear_cross_entropy(h, w, t, options=opt)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        torch.testing.assert_close(got, F.linear_cross_entropy(h, w, t, options=opt), rtol=1e-5, atol=1e-6)
    # torch's errors: a batch_chunk_size that chunking_method contradicts, an acc_dtype it lacks.
    bad = options(batch_chunk_size=3, chunking_method="aspect_ratio")
    with pytest.raises(ValueError, match="give different chunk sizes"):
        F.linear_cross_entropy(h, w, t, options=bad)
    with pytest.raises(ValueError, match="give different chunk sizes"):
        nt.linear_cross_entropy(h, w, t, options=bad)
    for fn in (F.linear_cross_entropy, nt.linear_cross_entropy):
        with pytest.raises(RuntimeError, match="acc_dtype"):
            fn(h, w, t, options=options(acc_dtype=torch.float16))
    with pytest.raises(TypeError, match="options"):
        nt.linear_cross_entropy(h, w, t, options={"batch_chunk_size": 3})
    # Where torch would not chunk (label smoothing), it ignores the options; so does normax.
    with pytest.warns(UserWarning, match="ignored"):
        F.linear_cross_entropy(h, w, t, label_smoothing=0.1, options=bad)
    nt.linear_cross_entropy(h, w, t, label_smoothing=0.1, options=bad)
    # allow_retain_graph is always granted: the backward hands over the gradients the forward
    # formed (scaled in place), and a second one recomputes them (torch raises there).
    hh = h.clone().requires_grad_()
    loss = nt.linear_cross_entropy(hh, w, t, options=options()) * 3.0
    loss.backward(retain_graph=True)
    first = hh.grad.clone()
    loss.backward()
    torch.testing.assert_close(hh.grad, 2 * first, rtol=1e-6, atol=0)


def test_normax_keywords_after_torchs():
    h, w, t, b, _ = _case(False, False, False, True, False)
    logits = h @ w.T + b
    want = nt.cross_entropy(logits, t, z_loss=1e-3, softcap=3.0)
    got = nt.linear_cross_entropy(h, w, t, linear_bias=b, z_loss=1e-3, softcap=3.0, chunk_size=2 * C)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # normax also takes (..., H) input with a (C, H) weight: the classes last.
    h3, t3 = h.reshape(2, 3, H), t.reshape(2, 3)
    torch.testing.assert_close(
        nt.linear_cross_entropy(h3, w, t3, reduction="none"),
        nt.linear_cross_entropy(h, w, t, reduction="none").reshape(2, 3),
    )
    with pytest.raises(TypeError):
        nt.linear_cross_entropy(h, w, t, b)  # linear_bias is keyword-only, as in torch
    # accumulation: the CUDA kernels' dweight sums; checked everywhere, the same result here.
    kw = {"linear_bias": b, "z_loss": 1e-3, "softcap": 3.0, "chunk_size": 2 * C}
    assert torch.equal(nt.linear_cross_entropy(h, w, t, accumulation="input", **kw), got)
    for bad in ("bfloat16", None):
        with pytest.raises(ValueError, match='accumulation: expected "float32" or "input"'):
            nt.linear_cross_entropy(h, w, t, accumulation=bad)


@pytest.mark.parametrize(
    "out_features, bias, weighted", [((), True, True), ((3,), True, False), ((2, 2), False, True)]
)
def test_module_matches_torchs(out_features, bias, weighted):
    g = torch.Generator().manual_seed(5)
    cw = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    kw = {
        "out_features": out_features,
        "bias": bias,
        "weight": cw,
        "label_smoothing": 0.1,
        "dtype": torch.float64,
    }
    theirs, ours = torch.nn.LinearCrossEntropyLoss(H, C, **kw), nt.LinearCrossEntropyLoss(H, C, **kw)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    for target in (
        torch.randint(0, C, (N, *out_features), generator=g),
        torch.randn(N, C, *out_features, generator=g, dtype=torch.float64).softmax(1),
    ):
        want, got = theirs(x, target), ours(x, target)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        gw = torch.autograd.grad(want, theirs.linear.weight)
        torch.testing.assert_close(torch.autograd.grad(got, ours.linear.weight), gw, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="weight shape"):
        nt.LinearCrossEntropyLoss(H, C, weight=torch.ones(C + 1))


def test_numpy_first_is_consistent():
    """normax.linear_cross_entropy: torch's parameter names (linear_weight, linear_bias, weight =
    class weights), K-dimensional losses and probability targets, as normax.cross_entropy of the
    logits."""
    rng = np.random.default_rng(8)
    h, w, b = rng.normal(size=(N, H)), rng.normal(size=(C, D, H)), rng.normal(size=(C, D))
    cw = rng.uniform(0.5, 2.0, C)
    logits = (h @ w.reshape(-1, H).T + b.reshape(-1)).reshape(N, C, D)
    hard = rng.integers(0, C, (N, D))
    soft = rng.dirichlet(np.ones(C), (N, D)).transpose(0, 2, 1)
    for t, ii in [(hard, {}), (soft, {})]:
        for reduction in ["mean", "sum", "none"]:
            kw = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3}
            want, g = normax.cross_entropy_with_grad(logits, t, axis=1, weight=cw, **kw)
            got = normax.linear_cross_entropy_with_grad(
                h, w, t, linear_bias=b, weight=cw, chunk_size=2 * C * D, **kw, **ii
            )
            np.testing.assert_allclose(got[0], want, rtol=1e-12)
            g = g.reshape(N, C * D)
            np.testing.assert_allclose(got[1], g @ w.reshape(-1, H), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(got[2], (g.T @ h).reshape(w.shape), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(got[3], g.sum(0).reshape(b.shape), rtol=1e-10, atol=1e-14)
    # Unbatched (H,) input: a 0-d result, the gradient shaped like the input.
    loss, dh, _, db = normax.linear_cross_entropy_with_grad(h[0], w[:, 0], np.int64(3), reduction="none")
    assert np.ndim(loss) == 0 and dh.shape == (H,) and db is None
    assert loss == pytest.approx(normax.cross_entropy(h[0] @ w[:, 0].T, np.int64(3)), rel=1e-12)
    with pytest.raises(ValueError, match="ignore_index"):
        normax.linear_cross_entropy(h, w, soft, ignore_index=-100)
    with pytest.raises(IndexError, match=r"class index 9 at position \(1, 0\)"):
        normax.linear_cross_entropy(
            h, w, np.where(np.arange(D) == 0, [[0], [9], [0], [0], [0], [0]], 0), weight=cw
        )
    with pytest.raises(TypeError, match="bias"):
        normax.linear_cross_entropy(h, w, hard, bias=b)  # renamed: linear_bias


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_all_ignored_as_torch(reduction):
    """No rows, every row ignored, zero class weights, no features: torch's values (NaN means
    included) and gradients, on the fused and the blocked paths, without warnings."""
    g = torch.Generator().manual_seed(9)
    h, w = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    cases = [
        (h, w, torch.full((3,), -100), None),
        (h, w, torch.full((3,), -100), torch.rand(5, generator=g, dtype=torch.float64)),
        (h, w, torch.tensor([1, 2, 0]), torch.zeros(5, dtype=torch.float64)),
        (h[:0], w, torch.zeros(0, dtype=torch.long), None),
        (h[:0], w, torch.zeros(0, dtype=torch.long), torch.ones(5, dtype=torch.float64)),
        (h[:, :0], w[:, :0], torch.tensor([0, 1, 4]), None),
    ]
    for hh, ww, t, cw in cases:
        want = _loss_and_grads(F.linear_cross_entropy, hh, ww, t, None, cw, reduction=reduction)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = _loss_and_grads(nt.linear_cross_entropy, hh, ww, t, None, cw, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)
