"""Softmax Collapse (Prieto et al. 2025): where the target's probability rounds to 1 (a margin above
~17 in float32), torch and JAX return loss 0 and a target gradient of exactly 0, and learning
stops. normax's loss is log1p(the others' exp relative to the target) and the target's gradient
-(the others' probability): both relatively accurate up to the float32 exp range (margin ~87).

References in mpmath (50 digits). Tolerances: a few float32/float64 roundings of the result
itself (relative), from the sums of exp (float32 partials, few-ULP exp) and the log1p/expm1.
"""

from __future__ import annotations

import mpmath
import normax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

mpmath.mp.dps = 50
MARGINS = [0.0, 1.0, 5.0, 10.0, 16.0, 17.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 86.0, 87.0]
EPS = {np.float32: 2.0**-24, np.float64: 2.0**-53}


def _case(dtype, margin, classes=33, seed=0):
    """One row: the target (class 3) `margin` above the largest other logit. Long rows draw from
    17 values only, so the mpmath reference sums 17 distinct terms."""
    rng = np.random.default_rng(seed)
    if classes > 10_000:
        x = rng.choice(np.linspace(-2.0, 0.0, 17), size=classes).astype(dtype)
    else:
        x = rng.uniform(-2.0, 0.0, size=classes).astype(dtype)
    x[3] = dtype(margin)
    return x


def _reference(x, y):
    """(loss, dloss/dx_y) of one row in mpmath: lse - x_y and p_y - 1 = -(sum of the others)."""
    values, counts = np.unique(np.delete(x, y), return_counts=True)
    xy = mpmath.mpf(float(x[y]))
    others = mpmath.fsum(int(k) * mpmath.exp(mpmath.mpf(float(v)) - xy) for v, k in zip(values, counts))
    loss = mpmath.log1p(others)
    grad = -others / (1 + others)
    return float(loss), float(grad)


def _rel(a, b):
    return abs(float(a) - b) / abs(b) if b != 0 else abs(float(a))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_and_target_gradient_stay_relatively_accurate_across_margins(isa, dtype):
    # Rows of three lengths: the in-cache path, a row with a partial SIMD tail, and a long row
    # (2^18 + 5: the two-pass path) whose exp sums are split across blocks.
    for classes in (33, 1000, (1 << 18) + 5):
        for margin in MARGINS[:: 1 if classes < 10_000 else 4]:
            x = _case(dtype, margin, classes)
            want_loss, want_grad = _reference(x, 3)
            t = np.array([3])
            loss, grad = normax.cross_entropy_with_grad(x[None], t, reduction="sum")
            loss_only = normax.cross_entropy(x[None], t, reduction="sum")
            # Few ULP where one class dominates (from margin ~10 here: the rest of the row is
            # summed apart, see normax.lse); below, the loss is ~0.1-3 and carries the absolute
            # rounding of lse (~1e-7 in float32), as every peer's does.
            tol = (16 if margin >= 10.0 else 64) * EPS[dtype]
            assert _rel(loss, want_loss) <= tol, (isa, classes, margin, float(loss), want_loss)
            assert _rel(loss_only, want_loss) <= tol, (isa, classes, margin)
            assert _rel(grad[0, 3], want_grad) <= tol, (isa, classes, margin, grad[0, 3], want_grad)
            if dtype is np.float32 and margin >= 20.0:
                # Where the peers are exactly 0: nonzero here.
                assert float(loss) > 0.0 and grad[0, 3] < 0.0


def test_the_peers_collapse_where_normax_does_not():
    x = _case(np.float32, 30.0)
    t = torch.from_numpy(x[None]).requires_grad_()
    loss = torch.nn.functional.cross_entropy(t, torch.tensor([3]))
    loss.backward()
    assert loss.item() == 0.0 and t.grad[0, 3].item() == 0.0  # torch: learning has stopped
    nl, ng = normax.cross_entropy_with_grad(x[None], np.array([3]))
    want_loss, want_grad = _reference(x, 3)
    assert _rel(nl, want_loss) < 1e-6 and _rel(ng[0, 3], want_grad) < 1e-6


@pytest.mark.parametrize(
    "kw",
    [
        {"label_smoothing": 0.1},
        {"z_loss": 1e-3},
        {"softcap": 100.0},
        {"weight": "w"},
        {"label_smoothing": 0.05, "z_loss": 1e-4, "weight": "w"},
    ],
)
def test_options_keep_their_float64_values_in_the_collapse_regime(isa, kw):
    # Against float64 autograd of torch's own definition, at margins where float64 does not
    # collapse yet; torch's own rounding there is absolute (~1e-16 in lse - x_y, p_y - 1), so the
    # tolerances are absolute in the loss and relative to each row's largest gradient entry.
    rng = np.random.default_rng(1)
    w = rng.uniform(0.5, 2.0, size=33)
    kw = {k: (w if v == "w" else v) for k, v in kw.items()}
    for margin in (5.0, 20.0):
        x = np.stack([_case(np.float64, margin, seed=s) for s in range(4)])
        target = np.array([3, 3, 3, 3])
        t = torch.from_numpy(x.copy()).requires_grad_()
        tw = None if "weight" not in kw else torch.from_numpy(kw["weight"])
        xt = t if "softcap" not in kw else kw["softcap"] * torch.tanh(t / kw["softcap"])
        lse = torch.logsumexp(xt, -1)
        ref = torch.nn.functional.cross_entropy(
            xt, torch.from_numpy(target), weight=tw, label_smoothing=kw.get("label_smoothing", 0.0),
            reduction="sum",
        ) + kw.get("z_loss", 0.0) * (lse**2).sum()  # fmt: skip
        ref.backward()
        loss, grad = normax.cross_entropy_with_grad(x, target, reduction="sum", **kw)
        scale = np.abs(t.grad.numpy()).max(axis=1)
        np.testing.assert_allclose(loss, ref.item(), rtol=1e-12, atol=1e-14)
        # Relative to the row's largest entry: the options' own terms dominate the target's.
        err = np.abs(grad - t.grad.numpy()).max(axis=1) / scale
        assert err.max() < 1e-7, (margin, err)  # torch: ~1e-16 absolute in p_y - 1
    # float32 at margin 40 (every peer's target gradient is 0): smoothing, z-loss and weights
    # still give the float64 value of the target's entry.
    x = _case(np.float32, 40.0)[None]
    loss, grad = normax.cross_entropy_with_grad(x, np.array([3]), reduction="sum", **kw)
    loss64, grad64 = normax.cross_entropy_with_grad(
        x.astype(np.float64), np.array([3]), reduction="sum", **kw
    )
    assert _rel(loss, float(loss64)) < 1e-6
    assert abs(grad[0, 3] - grad64[0, 3]) <= 1e-6 * np.abs(grad64).max()


def test_linear_cross_entropy_does_not_collapse(isa):
    # Logits = hidden @ weight.T with the target's logit 40 above the rest, over vocabulary blocks
    # (chunk_size smaller than V): the blocks' sums combine into the accurate lse - x_y.
    rng = np.random.default_rng(2)
    h, v = 16, 300
    weight = rng.normal(scale=0.1, size=(v, h)).astype(np.float32)
    hidden = rng.normal(size=(4, h)).astype(np.float32)
    target = np.array([5, 100, 299, 7])
    for i, y in enumerate(target):
        weight[y] = hidden[i] * (40.0 / float(hidden[i] @ hidden[i]))
    logits = hidden.astype(np.float64) @ weight.astype(np.float64).T
    for chunk in (None, 64):
        loss, dh, _, _ = normax.linear_cross_entropy_with_grad(
            hidden, weight, target, reduction="sum", chunk_size=chunk
        )
        want = sum(_reference(logits[i], y)[0] for i, y in enumerate(target))
        assert _rel(loss, want) < 1e-5, (chunk, float(loss), want)
        # The full logits' gradient against it: d hidden = g @ W, whose target part is nonzero.
        _, g = normax.cross_entropy_with_grad(logits, target, reduction="sum")
        np.testing.assert_allclose(dh, g @ weight.astype(np.float64), rtol=1e-4, atol=1e-12)
        assert np.abs(dh).max() > 0.0


def test_a_model_keeps_learning_past_the_collapse():
    """A tiny model trained by SGD (torch autograd) from a margin of ~20, where F.cross_entropy's
    loss and target gradient are exactly 0: its parameters never move. Through normax.torch the
    loss keeps decreasing. The model scores the target class (class 0) as x @ theta against
    fixed zero logits of the other classes, so the target's gradient entry is the only signal."""
    import normax.torch as nt

    rng = np.random.default_rng(3)
    n, d, c = 32, 4, 5
    x = torch.from_numpy(rng.uniform(1.0, 2.0, size=(n, d)).astype(np.float32))
    y = torch.zeros(n, dtype=torch.int64)

    def train(cross_entropy, steps=10, lr=2e5):
        theta = torch.full((d,), 20.0 / 1.5 / d, requires_grad=True)  # margins 17.2-24.5 here
        opt = torch.optim.SGD([theta], lr=lr)
        losses = []
        for _ in range(steps):
            logits = torch.cat([(x @ theta)[:, None], torch.zeros(n, c - 1)], 1)
            loss = cross_entropy(logits, y, reduction="sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, theta.detach()

    losses, theta = train(torch.nn.functional.cross_entropy)
    assert losses == [0.0] * len(losses)  # torch: collapsed, nothing to learn from
    assert torch.equal(theta, torch.full((d,), 20.0 / 1.5 / d))
    losses, theta = train(nt.cross_entropy)
    assert losses[0] > 0.0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.1 * losses[0], losses
