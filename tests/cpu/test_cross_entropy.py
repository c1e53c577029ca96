"""cross_entropy, cross_entropy_with_grad and the linear versions against PyTorch and float64 NumPy.

References run in float64 (torch autograd for gradients), so the tolerances measure our error:
- float64: rtol 1e-10. Each row's log-sum-exp and gradient are a few ULP off; losses add in float64.
- float32: rtol 2e-5, plus an absolute 2e-6 of the largest reference value (at least 2e-6).
  The inputs are exact in both; a float32 row's lse is within a few float32 ULP (1.2e-7 each)
  of the true one. Where the target dominates, lse is refined as max + log1p(rest), so a loss
  near 0 keeps its relative accuracy (tested on its own below). A gradient entry p * A - c is
  rounded in float32 once or twice, hence the absolute term for entries that cancel to near 0.
"""

from __future__ import annotations

import itertools

import normax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL = {np.float32: 2e-5, np.float64: 1e-10}


def assert_close(actual, desired, dtype, what=""):
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    scale = np.nanmax(np.abs(desired[np.isfinite(desired)]), initial=0.0)
    atol = (2e-6 if dtype == np.float32 else 1e-12) * max(scale, 1.0)
    np.testing.assert_allclose(actual, desired, rtol=RTOL[dtype], atol=atol, err_msg=what)


def torch_reference(
    x,
    t,
    *,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    grad_output=1.0,
):
    """F.cross_entropy in float64 (class axis moved to torch's dim 1), z-loss and softcap added as
    their definitions say; returns (loss, d(grad_output * loss)/dx) by autograd."""
    x = np.asarray(x, np.float64)
    cdim = 1 if x.ndim > 1 else 0
    xt = torch.tensor(np.moveaxis(x, axis, cdim), requires_grad=True)
    soft = np.asarray(t).dtype.kind == "f"
    tt = torch.tensor(np.moveaxis(np.asarray(t, np.float64), axis, cdim) if soft else np.asarray(t, np.int64))
    w = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    logits = xt if softcap is None else softcap * torch.tanh(xt / softcap)
    rows = F.cross_entropy(
        logits, tt, weight=w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    keep = torch.ones_like(rows) if soft else (tt != ignore_index).double()
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(logits, dim=cdim) ** 2 * keep
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    elif soft:
        loss = rows.sum() / rows.numel() if rows.numel() else rows.sum() * np.nan
    else:
        wy = keep if w is None else w[tt.clamp(min=0)] * keep
        loss = rows.sum() / wy.sum()
    (loss * torch.as_tensor(np.asarray(grad_output, np.float64))).sum().backward()
    return loss.detach().numpy(), np.moveaxis(xt.grad.numpy(), cdim, axis)


def numpy_formula(
    x, t, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """The issue's definitions in float64 NumPy, hard targets, classes last."""
    x = np.asarray(x, np.float64)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    c = x.shape[-1]
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    logp = x - lse[..., None]
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    keep = t != ignore_index
    tc = np.where(keep, t, 0)
    nll = -np.take_along_axis(logp, tc[..., None], -1)[..., 0] * w[tc]
    smooth = -(logp * w).sum(-1)
    rows = np.where(keep, (1 - label_smoothing) * nll + label_smoothing / c * smooth + z_loss * lse**2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / np.where(keep, w[tc], 0.0).sum()


def make(rng, shape, axis=-1, dtype=np.float32, soft=False, ignore_index=-100, ignore_every=0, scale=3.0):
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    c = shape[axis]
    if soft:
        t = rng.random(shape)
        t = (t / t.sum(axis=axis, keepdims=True)).astype(dtype)
    else:
        row_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
        t = rng.integers(0, c, size=row_shape)
        if ignore_every:
            t.reshape(-1)[::ignore_every] = ignore_index
    return x, t


def check(x, t, dtype, grad_output=1.0, **opts):
    want_loss, want_grad = torch_reference(x, t, grad_output=grad_output, **opts)
    loss = normax.cross_entropy(x, t, **opts)
    loss2, grad = normax.cross_entropy_with_grad(x, t, grad_output=grad_output, **opts)
    assert np.asarray(loss).dtype == dtype and grad.dtype == dtype and grad.shape == x.shape
    assert_close(loss, want_loss, dtype, "loss")
    np.testing.assert_array_equal(loss, loss2)
    assert_close(grad, want_grad, dtype, "grad")


OPTION_GRID = list(
    itertools.product(
        [False, True],  # soft targets
        [False, True],  # class weights
        ["mean", "sum", "none"],
        [0.0, 0.1],  # label smoothing
        [np.float32, np.float64],
    )
)


@pytest.mark.parametrize("soft,weighted,reduction,smoothing,dtype", OPTION_GRID)
def test_matches_torch_over_options(soft, weighted, reduction, smoothing, dtype):
    rng = np.random.default_rng(hash((soft, weighted, reduction, smoothing)) % 2**32)
    c = 7
    ignore = -100 if soft else 3
    x, t = make(rng, (11, c), dtype=dtype, soft=soft, ignore_index=ignore, ignore_every=0 if soft else 4)
    w = rng.random(c).astype(dtype) + 0.25 if weighted else None
    go = rng.random(11) + 0.5 if reduction == "none" else 1.7
    check(
        x,
        t,
        dtype,
        grad_output=go,
        weight=w,
        ignore_index=ignore,
        reduction=reduction,
        label_smoothing=smoothing,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 2, 3, 17, 1000, 128256])
def test_class_counts(c, dtype):
    rng = np.random.default_rng(c)
    rows = 3 if c > 10_000 else 9
    x, t = make(rng, (rows, c), dtype=dtype, ignore_every=4)
    check(x, t, dtype)
    w = (rng.random(c) + 0.5).astype(dtype)
    check(x, t, dtype, weight=w, label_smoothing=0.2, reduction="sum")
    xs, ts = make(rng, (rows, c), dtype=dtype, soft=True)
    check(xs, ts, dtype, label_smoothing=0.05)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_class_axis_not_last(dtype):
    rng = np.random.default_rng(7)
    for axis, shape in [(1, (2, 5, 3, 4)), (0, (6, 4)), (-2, (3, 9, 2)), (0, (5,))]:
        x, t = make(rng, shape, axis=axis, dtype=dtype, ignore_every=5)
        check(x, t, dtype, axis=axis, label_smoothing=0.1)
        check(x, t, dtype, axis=axis, reduction="none", grad_output=2.0)
        xs, ts = make(rng, shape, axis=axis, dtype=dtype, soft=True)
        check(xs, ts, dtype, axis=axis)
        # In place with the classes elsewhere: formed in a working copy, copied back.
        want = normax.cross_entropy_with_grad(x, t, axis=axis)
        xi = x.copy()
        loss, g = normax.cross_entropy_with_grad(xi, t, axis=axis, inplace=True)
        assert g is xi
        np.testing.assert_array_equal(g, want[1])
        np.testing.assert_array_equal(loss, want[0])  # NaN when the one row is ignored


def test_every_row_ignored():
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    t = np.full(4, -100)
    for smoothing in [0.0, 0.3]:
        want_loss, want_grad = torch_reference(x, t, label_smoothing=smoothing)
        loss, grad = normax.cross_entropy_with_grad(x, t, label_smoothing=smoothing)
        assert np.isnan(loss) and np.isnan(want_loss)  # torch: mean over zero targets is NaN
        np.testing.assert_array_equal(grad, want_grad)  # ... and the gradient is zero
        assert not grad.any()
    assert normax.cross_entropy(x, t, reduction="sum") == 0.0
    np.testing.assert_array_equal(normax.cross_entropy(x, t, reduction="none"), np.zeros(4, np.float32))
    # Zero rows: NaN mean, zero sum, empty per-row loss and gradient.
    assert np.isnan(normax.cross_entropy(np.zeros((0, 3)), np.zeros(0, int)))
    loss, grad = normax.cross_entropy_with_grad(np.zeros((0, 3)), np.zeros(0, int), reduction="none")
    assert loss.shape == (0,) and grad.shape == (0, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_z_loss_and_softcap_against_numpy(dtype):
    rng = np.random.default_rng(11)
    x, t = make(rng, (13, 50), dtype=dtype, ignore_every=6, scale=8.0)
    w = (rng.random(50) + 0.5).astype(dtype)
    for z, cap, weight, smoothing, reduction in [
        (1e-3, None, None, 0.0, "mean"),
        (0.0, 5.0, None, 0.0, "sum"),
        (1e-2, 3.0, w, 0.1, "mean"),
        (1e-4, 30.0, w, 0.0, "none"),
    ]:
        opts = {
            "weight": weight,
            "label_smoothing": smoothing,
            "z_loss": z,
            "softcap": cap,
            "reduction": reduction,
        }
        want = numpy_formula(x, t, **opts)
        loss, grad = normax.cross_entropy_with_grad(x, t, **opts)
        assert_close(loss, want, dtype, f"loss {opts}")
        assert_close(normax.cross_entropy(x, t, **opts), want, dtype)
        _, want_grad = torch_reference(x, t, **opts)
        assert_close(grad, want_grad, dtype, f"grad {opts}")


def test_z_loss_moves_the_loss():
    # Guards against z_loss being ignored: the difference is exactly mean(z * lse^2).
    x = np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    t = np.array([0, 1])
    lse = np.log(np.exp(x).sum(1))
    diff = normax.cross_entropy(x, t, z_loss=0.5) - normax.cross_entropy(x, t)
    assert diff == pytest.approx(0.5 * np.mean(lse**2), rel=1e-12)


def linear_reference(hidden, weight, t, linear_bias=None, grad_output=1.0, **opts):
    """matmul + cross_entropy (+ z-loss/softcap) + backward, float64 torch autograd."""
    h = torch.tensor(np.asarray(hidden, np.float64), requires_grad=True)
    w = torch.tensor(np.asarray(weight, np.float64), requires_grad=True)
    b = None if linear_bias is None else torch.tensor(np.asarray(linear_bias, np.float64), requires_grad=True)
    logits = h @ w.T + (0 if b is None else b)
    z, cap = opts.pop("z_loss", 0.0), opts.pop("softcap", None)
    reduction = opts.pop("reduction", "mean")
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    tt = torch.tensor(np.asarray(t, np.int64))
    keep = (tt != opts.get("ignore_index", -100)).double()
    rows = F.cross_entropy(logits, tt, reduction="none", **opts) + z * torch.logsumexp(logits, 1) ** 2 * keep
    loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / keep.sum()}[reduction]
    (loss * torch.as_tensor(np.asarray(grad_output, np.float64))).sum().backward()
    return loss.detach().numpy(), h.grad.numpy(), w.grad.numpy(), None if b is None else b.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk_size", [None, 40 * 200, 700, 13])
def test_linear_against_matmul_and_torch(dtype, chunk_size):
    # chunk_size: all logits at once; blocks of whole rows; vocabulary blocks; tiny blocks.
    rng = np.random.default_rng(5)
    n, h, v = 40, 24, 200
    hidden = rng.standard_normal((n, h)).astype(dtype)
    weight = (rng.standard_normal((v, h)) / 3).astype(dtype)
    bias = rng.standard_normal(v).astype(dtype)
    t = rng.integers(0, v, n)
    t[::7] = -100
    cases = [
        {},
        {"linear_bias": bias, "label_smoothing": 0.1, "reduction": "sum"},
        {"linear_bias": bias, "z_loss": 1e-3, "softcap": 4.0},
        {"label_smoothing": 0.2, "z_loss": 1e-4, "reduction": "none", "grad_output": rng.random(n) + 0.5},
    ]
    for case in cases:
        want = linear_reference(hidden, weight, t, **dict(case))
        got = normax.linear_cross_entropy_with_grad(hidden, weight, t, chunk_size=chunk_size, **case)
        for name, a, b in zip(["loss", "dhidden", "dweight", "dbias"], got, want):
            if b is None:
                assert a is None
                continue
            assert a.dtype == dtype
            assert_close(a, b, dtype, f"{name} {sorted(case)}")
        only = {k: val for k, val in case.items() if k != "grad_output"}
        assert_close(
            normax.linear_cross_entropy(hidden, weight, t, chunk_size=chunk_size, **only), want[0], dtype
        )


def test_linear_equals_cross_entropy_of_the_logits():
    rng = np.random.default_rng(6)
    hidden = rng.standard_normal((64, 32))
    weight = rng.standard_normal((300, 32))
    t = rng.integers(0, 300, 64)
    logits = hidden @ weight.T
    a = normax.cross_entropy(logits, t, label_smoothing=0.1, z_loss=1e-3)
    for chunk in [None, 1000, 50]:
        b = normax.linear_cross_entropy(hidden, weight, t, label_smoothing=0.1, z_loss=1e-3, chunk_size=chunk)
        assert b == pytest.approx(a, rel=1e-12)


def test_bad_input():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(IndexError, match=r"class index 4 at position 1 .*\[0, 4\)"):
        normax.cross_entropy(x, np.array([0, 4, 1]))
    with pytest.raises(IndexError, match=r"class index -3 at position \(1, 1\)"):
        normax.cross_entropy(np.zeros((2, 4, 3)), np.array([[0, 1, 2], [3, -3, 0]]), axis=1)
    with pytest.raises(IndexError, match=r"class index 9 at position 2"):
        normax.linear_cross_entropy(np.zeros((3, 2)), np.zeros((5, 2)), np.array([0, 1, 9]))
    with pytest.raises(ValueError, match="target"):
        normax.cross_entropy(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="probabilities"):
        normax.cross_entropy(x, np.zeros(3, np.float32))  # a float target must be shaped like logits
    with pytest.raises(TypeError, match="target"):
        normax.cross_entropy(x, np.zeros(3, complex))
    with pytest.raises(TypeError, match="target"):
        normax.cross_entropy(x, np.array(["a", "b", "c"]))
    with pytest.raises(TypeError, match="target"):
        normax.cross_entropy(x, np.array([True, False, True]))
    with pytest.raises(TypeError, match="logits"):
        normax.cross_entropy(x.astype(complex), np.zeros(3, int))
    for bad in [-0.1, 1.5]:
        with pytest.raises(ValueError, match="label_smoothing"):
            normax.cross_entropy(x, np.zeros(3, int), label_smoothing=bad)
    with pytest.raises(ValueError, match="z_loss"):
        normax.cross_entropy(x, np.zeros(3, int), z_loss=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        normax.cross_entropy(x, np.zeros(3, int), softcap=0.0)
    with pytest.raises(ValueError, match="reduction"):
        normax.cross_entropy(x, np.zeros(3, int), reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        normax.cross_entropy(x, np.zeros(3, int), weight=np.ones(3))
    with pytest.raises(ValueError, match="ignore_index"):
        normax.cross_entropy(x, np.full((3, 4), 0.25, np.float32), ignore_index=0)
    with pytest.raises(ValueError, match="grad_output"):
        normax.cross_entropy_with_grad(x, np.zeros(3, int), grad_output=np.ones(3))
    with pytest.raises(ValueError, match="grad_output"):
        normax.cross_entropy_with_grad(x, np.zeros(3, int), reduction="none", grad_output=np.ones(4))
    with pytest.raises(ValueError, match="empty"):
        normax.cross_entropy(np.zeros((3, 0)), np.zeros(3, int))
    with pytest.raises(np.exceptions.AxisError):
        normax.cross_entropy(x, np.zeros(3, int), axis=2)
    with pytest.raises(ValueError, match="inplace"):
        normax.cross_entropy_with_grad([[0.0, 1.0]], [0], inplace=True)
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="inplace"):
        normax.cross_entropy_with_grad(ro, np.zeros(3, int), inplace=True)
    with pytest.raises(ValueError, match="weight"):
        normax.linear_cross_entropy(np.zeros((3, 2)), np.zeros((5, 3)), np.zeros(3, int))
    with pytest.raises(ValueError, match="chunk_size"):
        normax.linear_cross_entropy(np.zeros((3, 2)), np.zeros((5, 2)), np.zeros(3, int), chunk_size=0)
    with pytest.raises(ValueError, match="target: class probabilities"):
        normax.linear_cross_entropy(np.zeros((3, 2)), np.zeros((5, 2)), np.zeros(3))


def test_inputs_untouched_unless_inplace():
    rng = np.random.default_rng(2)
    x, t = make(rng, (6, 9), ignore_every=3)
    w = rng.random(9).astype(np.float32)
    keep = (x.copy(), t.copy(), w.copy())
    normax.cross_entropy_with_grad(x, t, weight=w, label_smoothing=0.1, softcap=2.0)
    normax.cross_entropy(x, t, weight=w, softcap=2.0)
    for a, b in zip((x, t, w), keep):
        np.testing.assert_array_equal(a, b)
    bad = t.copy()
    bad[4] = 99
    with pytest.raises(IndexError):
        normax.cross_entropy_with_grad(x, bad, inplace=True)
    np.testing.assert_array_equal(x, keep[0])  # checked before anything is written


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inplace_writes_the_gradient_over_the_logits(dtype):
    rng = np.random.default_rng(3)
    x, t = make(rng, (50, 33), dtype=dtype, ignore_every=7)
    for opts in [{}, {"label_smoothing": 0.1, "softcap": 5.0, "z_loss": 1e-3}]:
        loss, grad = normax.cross_entropy_with_grad(x, t, **opts)
        xi = x.copy()
        loss_i, grad_i = normax.cross_entropy_with_grad(xi, t, inplace=True, **opts)
        assert grad_i is xi
        np.testing.assert_array_equal(grad_i, grad)
        assert loss_i == loss


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_follow_torch(dtype):
    inf = np.inf
    big = 1e30
    x = np.array(
        [
            [1.0, 2.0, -inf, 0.5],  # -inf off the target
            [-inf, 0.0, 1.0, 2.0],  # -inf target logit: +inf loss
            [big, 0.0, -big, 3.0],  # +-1e30, target is the max: 0
            [big, 0.0, -big, 3.0],  # ... target is not: 1e30
            [-big, -big, -big, -big],  # all equal and huge: log(4)
            [np.nan, 0.0, 1.0, 2.0],  # NaN: NaN
        ],
        dtype,
    )
    t = np.array([0, 0, 0, 1, 2, 1])
    want_loss, want_grad = torch_reference(x, t, reduction="none")
    loss, grad = normax.cross_entropy_with_grad(x, t, reduction="none")
    assert loss[1] == inf and loss[3] == pytest.approx(1e30, rel=1e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL[dtype])
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL[dtype], atol=1e-7)
    assert np.isfinite(grad[:5]).all() and np.isnan(grad[5]).all()
    # In place: the same, NaN row included (its logits may be overwritten before NaN is found).
    xi = x.copy()
    loss_i, grad_i = normax.cross_entropy_with_grad(xi, t, reduction="none", inplace=True)
    np.testing.assert_array_equal(loss_i, loss)
    np.testing.assert_array_equal(grad_i, grad)
    # Smoothing sees -inf entries too: +inf, as torch.
    sl, sg = normax.cross_entropy_with_grad(x[:1], t[:1], label_smoothing=0.1)
    tl, tg = torch_reference(x[:1], t[:1], label_smoothing=0.1)
    assert sl == tl == inf
    np.testing.assert_allclose(sg, tg, rtol=RTOL[dtype])


@pytest.mark.parametrize("inplace", [False, True])
def test_dominant_target_keeps_relative_accuracy(inplace):
    # Losses log(1 + k e^-d) from 1e-3 down to ~1e-11, per row: within 1e-6 relative of float64
    # (a plain lse - x_y in float32 arithmetic would be off by ~1e-8 absolute, i.e. 100% at 1e-8).
    d = np.arange(6.0, 26.0, 2.0)
    x = np.zeros((d.size, 5), np.float32)
    x[:, 2] = d
    t = np.full(d.size, 2)
    want = np.log1p(4 * np.exp(-x[:, 2].astype(np.float64)))
    if inplace:
        loss, _ = normax.cross_entropy_with_grad(x, t, reduction="none", inplace=True)
    else:
        loss = normax.cross_entropy(x, t, reduction="none")
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert (loss > 0).all()


def test_grad_output_scales():
    rng = np.random.default_rng(4)
    x, t = make(rng, (8, 5))
    _, g1 = normax.cross_entropy_with_grad(x, t)
    _, g2 = normax.cross_entropy_with_grad(x, t, grad_output=-2.5)
    np.testing.assert_allclose(g2, -2.5 * g1, rtol=1e-6)
    go = rng.random(8)
    _, gn = normax.cross_entropy_with_grad(x, t, reduction="none", grad_output=go)
    _, gs = normax.cross_entropy_with_grad(x, t, reduction="sum")
    np.testing.assert_allclose(gn, gs * go[:, None].astype(np.float32), rtol=1e-6, atol=1e-8)


def test_dtypes():
    rng = np.random.default_rng(8)
    x, t = make(rng, (4, 6), dtype=np.float16)
    loss, grad = normax.cross_entropy_with_grad(x, t)
    assert loss.dtype == np.float16 and grad.dtype == np.float16
    want = normax.cross_entropy(x.astype(np.float32), t)
    assert float(loss) == pytest.approx(float(want), rel=1e-3)  # float16 rounding of the result
    xi = x.copy()
    _, gi = normax.cross_entropy_with_grad(xi, t, inplace=True)
    assert gi is xi
    np.testing.assert_array_equal(gi, grad)
    loss = normax.cross_entropy(np.array([[1, 2, 3]]), np.array([2]))  # integers: float64, as SciPy
    assert loss.dtype == np.float64 and loss == pytest.approx(np.log(np.exp([1, 2, 3]).sum()) - 3)
    assert normax.cross_entropy(x, t.astype(np.uint8)) == normax.cross_entropy(x, t)


def test_same_result_for_any_thread_count_and_isa():
    rng = np.random.default_rng(9)
    x, t = make(rng, (4000, 40), ignore_every=9)
    threads, isa = normax.get_num_threads(), normax.get_isa()
    try:
        normax.set_num_threads(1)
        one = normax.cross_entropy_with_grad(x, t, label_smoothing=0.1)
        normax.set_num_threads(3)
        three = normax.cross_entropy_with_grad(x, t, label_smoothing=0.1)
        assert one[0] == three[0]
        np.testing.assert_array_equal(one[1], three[1])
        want_loss, want_grad = torch_reference(x[:200], t[:200], reduction="none")
        for name in normax.supported_isas():
            normax.set_isa(name)
            loss, grad = normax.cross_entropy_with_grad(x[:200], t[:200], reduction="none")
            assert_close(loss, want_loss, np.float32, name)
            assert_close(grad, want_grad, np.float32, name)
    finally:
        normax.set_num_threads(threads)
        normax.set_isa(isa)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None)
    @given(
        rows=st.integers(1, 6),
        c=st.integers(1, 40),
        seed=st.integers(0, 2**32 - 1),
        smoothing=st.sampled_from([0.0, 0.1, 1.0]),
        scale=st.sampled_from([0.1, 3.0, 50.0]),
    )
    def test_gradient_rows_sum_to_zero_and_loss_is_nonnegative(rows, c, seed, smoothing, scale):
        # softmax sums to one and so do the (smoothed) targets: without z-loss each row's gradient
        # sums to zero, and the loss (a cross-entropy) is never negative.
        rng = np.random.default_rng(seed)
        x, t = make(rng, (rows, c), dtype=np.float64, scale=scale)
        loss, grad = normax.cross_entropy_with_grad(x, t, label_smoothing=smoothing, reduction="none")
        assert (loss >= -1e-12).all()
        np.testing.assert_allclose(grad.sum(1), 0.0, atol=1e-12)
