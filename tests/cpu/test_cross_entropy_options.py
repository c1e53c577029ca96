"""cross_entropy's temperature, token_weight and return_stats (issue 24) against float64 NumPy.

The reference follows torch.nn.functional.cross_entropy's definitions on z = cap(x / T) and
multiplies each row by its token weight; the statistics are those of softmax(z). Tolerances:
float64 inputs are compared at 1e-10 relative (the kernels sum in float64; the logits' division
by T is one rounding), float32 at 2e-5 (a few float32 roundings per row, relative to the row's
largest term).
"""

from __future__ import annotations

import itertools

import normax
import numpy as np
import pytest
from normax import _vocab_parallel as vp
from normax._options import ce_options


def reference(x, t, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              softcap=None, temperature=1.0, token_weight=None):  # fmt: skip
    """(loss, grad, lse, entropy, correct, z_term) in float64; x (N, C), t (N,) ints or (N, C)."""
    x = np.asarray(x, np.float64)
    n, c = x.shape
    z = x / temperature
    cap_grad = np.ones_like(z)
    if softcap is not None:
        u = np.tanh(z / softcap)
        z = softcap * u
        cap_grad = 1 - u * u
    m = z.max(axis=1, keepdims=True)
    lse = (np.log(np.exp(z - m).sum(axis=1, keepdims=True)) + m)[:, 0]
    logp = z - lse[:, None]
    p = np.exp(logp)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    tw = np.ones(n) if token_weight is None else np.asarray(token_weight, np.float64)
    soft = np.asarray(t).ndim == 2
    eps = label_smoothing
    if soft:
        q = (1 - eps) * np.asarray(t, np.float64) + eps / c
        kept = np.ones(n, bool)
        denom = tw.sum()
        correct = x.argmax(1) == np.asarray(t).argmax(1)
    else:
        t = np.asarray(t)
        kept = t != ignore_index
        y = np.where(kept, t, 0)
        onehot = np.eye(c)[y]
        q = (1 - eps) * onehot + eps / c
        denom = (w[y] * tw)[kept].sum()
        correct = (x.argmax(1) == t) & kept
    qw = q * w
    with np.errstate(invalid="ignore"):
        terms = np.where(qw == 0, 0.0, -qw * logp)
    loss_rows = terms.sum(1) + z_loss * lse**2
    loss_rows = np.where(kept, loss_rows * tw, 0.0)
    a = qw.sum(1) + 2 * z_loss * lse
    grad = (p * a[:, None] - qw) * cap_grad / temperature * tw[:, None]
    grad[~kept] = 0
    z_term = z_loss * (tw * lse**2)[kept].sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduction == "mean":
            loss, grad, z_term = loss_rows.sum() / denom, grad / denom, z_term / denom
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = np.where(p > 0, -p * logp, 0.0).sum(1)
    return loss, grad, np.where(kept, lse, 0), np.where(kept, entropy, 0), correct, z_term


def close(a, b, dtype):
    rtol = 1e-10 if np.dtype(dtype) == np.float64 else 2e-5
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0), 1.0)
    return np.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)


def inputs(rng, n=23, c=37, dtype=np.float32, scale=3.0):
    x = (rng.standard_normal((n, c)) * scale).astype(dtype)
    t = rng.integers(0, c, n)
    t[[2, 9]] = -100
    return x, t


OPTIONS = [
    {},
    {"weight": True},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 5.0},
    {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 4.0},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize(("temperature", "weighted"), [(1.0, True), (0.7, False), (2.5, True)])
def test_options_match_the_float64_reference(isa, dtype, reduction, opt, temperature, weighted):
    rng = np.random.default_rng(7)
    x, t = inputs(rng, dtype=dtype)
    c = x.shape[1]
    kw = dict(opt, reduction=reduction, temperature=temperature)
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.5, 2.0, c).astype(dtype)
    if weighted:
        kw["token_weight"] = rng.uniform(0.0, 3.0, x.shape[0]).astype(np.float64)
    want = reference(x, t, **kw)
    x0 = x.copy()
    loss, grad, stats = normax.cross_entropy_with_grad(x, t, return_stats=True, **kw)
    assert np.array_equal(x, x0)  # the caller's logits are not written
    assert close(loss, want[0], dtype)
    assert close(grad, want[1], dtype)
    assert close(stats.lse, want[2], dtype)
    assert close(stats.entropy, want[3], dtype)
    assert np.array_equal(stats.correct, want[4])
    assert close(stats.z_loss, want[5], dtype)
    assert stats.lse.dtype == stats.entropy.dtype == np.dtype(dtype)
    assert stats.correct.dtype == np.bool_
    # The loss alone, with and without stats, and in place: the same values.
    only, stats2 = normax.cross_entropy(x, t, return_stats=True, **kw)
    assert close(only, want[0], dtype)
    for a, b in zip(stats, stats2):
        assert np.array_equal(a, b) or close(a, b, dtype)
    assert close(normax.cross_entropy(x, t, **kw), want[0], dtype)
    xi = x.copy()
    _loss_i, grad_i, stats_i = normax.cross_entropy_with_grad(xi, t, inplace=True, return_stats=True, **kw)
    assert grad_i is xi and close(grad_i, want[1], dtype) and np.array_equal(stats_i.correct, want[4])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_probability_targets_with_token_weights(isa, temperature):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((11, 9)) * 2
    q = rng.random((11, 9))
    q /= q.sum(1, keepdims=True)
    tw = rng.uniform(0, 2, 11)
    kw = {"temperature": temperature, "token_weight": tw, "label_smoothing": 0.1, "z_loss": 1e-2}
    want = reference(x, q, **kw)
    loss, grad, stats = normax.cross_entropy_with_grad(x, q, return_stats=True, **kw)
    assert close(loss, want[0], np.float64) and close(grad, want[1], np.float64)
    assert close(stats.entropy, want[3], np.float64) and np.array_equal(stats.correct, want[4])
    assert close(stats.z_loss, want[5], np.float64)


def test_class_axis_and_row_shapes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)  # classes on axis 1
    t = rng.integers(0, 5, (3, 4))
    tw = rng.random((3, 4))
    loss, stats = normax.cross_entropy(x, t, axis=1, token_weight=tw, temperature=1.5, reduction="none",
                                       return_stats=True)  # fmt: skip
    flat = np.moveaxis(x, 1, -1).reshape(-1, 5)
    want = reference(flat, t.reshape(-1), token_weight=tw.reshape(-1), temperature=1.5, reduction="none")
    assert loss.shape == stats.lse.shape == stats.correct.shape == (3, 4)
    assert close(loss.reshape(-1), want[0], np.float32)
    assert close(stats.entropy.reshape(-1), want[3], np.float32)
    assert np.array_equal(stats.correct.reshape(-1), want[4])


def test_stats_of_half_precision_are_float32_and_the_class_is_shared():
    x = np.array([[1.0, 2.0, 0.5]], np.float16)
    loss, stats = normax.cross_entropy(x, np.array([1]), return_stats=True)
    assert isinstance(stats, normax.CrossEntropyStats)
    assert stats.lse.dtype == np.float32 and loss.dtype == np.float16
    assert bool(stats.correct[0])


def test_label_smoothing_sum_does_not_overflow_float32(isa):
    x = np.array([[9.6, 0.35, -3e38]], np.float32)
    w = np.array([1, 1, 1.7], np.float32)
    want = reference(x.astype(np.float64), np.array([0]), weight=w, label_smoothing=0.1)[0]
    assert np.isfinite(want) and want > 1e37
    loss = normax.cross_entropy(x, np.array([0]), weight=w, label_smoothing=0.1)
    assert np.isfinite(loss) and close(loss, want, np.float32)
    loss, grad = normax.cross_entropy_with_grad(
        x, np.array([0]), weight=w, label_smoothing=0.1, reduction="sum"
    )
    assert np.isfinite(loss) and close(loss, want, np.float32) and np.isfinite(grad).all()


def test_minus_inf_logits_add_no_entropy(isa):
    x = np.array([[0.0, -np.inf, 1.0, -np.inf], [-np.inf, 2.0, -np.inf, -np.inf]], np.float32)
    t = np.array([2, 1])
    loss, grad, stats = normax.cross_entropy_with_grad(
        x, t, temperature=0.5, return_stats=True, reduction="none"
    )
    want = reference(x, t, temperature=0.5, reduction="none")
    assert close(loss, want[0], np.float32) and close(grad, want[1], np.float32)
    assert close(stats.entropy, want[3], np.float32) and stats.entropy[1] == 0.0
    assert stats.correct.all()


def test_large_margin_keeps_the_target_gradient(isa):
    # Past a margin of 40 (after the temperature) softmax rounds p_y to 1 in float32 and float64:
    # the target's gradient must stay the (tiny, nonzero) sum of the other probabilities.
    x = np.zeros((1, 8), np.float32)
    x[0, 3] = 90.0
    tw = np.array([2.0])
    loss, grad = normax.cross_entropy_with_grad(x, np.array([3]), temperature=2.0, token_weight=tw)
    other = 7 * np.exp(-45.0)
    assert grad[0, 3] < 0 and np.isclose(-grad[0, 3], 2.0 * other / 2.0 / 2.0, rtol=1e-5)
    assert loss > 0


@pytest.mark.parametrize(
    ("logits", "target", "correct"),
    [
        ([[1.0, 3.0, 3.0]], [1], True),  # ties: the first maximum
        ([[1.0, 3.0, 3.0]], [2], False),
        ([[np.nan, 3.0, 1.0]], [0], True),  # NaN: the first NaN, as np.argmax
        ([[1.0, 3.0, np.nan]], [1], False),
        ([[-np.inf, -np.inf]], [0], True),
        ([[-np.inf, -np.inf]], [1], False),
    ],
)
def test_correct_is_numpys_argmax(isa, logits, target, correct):
    x = np.array(logits, np.float32)
    _, stats = normax.cross_entropy(x, np.array(target), return_stats=True, reduction="none")
    assert bool(stats.correct[0]) is correct
    assert bool(stats.correct[0]) == (np.argmax(x[0]) == target[0])


def test_mean_over_zero_token_weight_is_nan():
    x = np.zeros((2, 3))
    loss = normax.cross_entropy(x, np.array([0, 1]), token_weight=np.zeros(2))
    assert np.isnan(loss)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_bad_temperature_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="temperature"):
        normax.cross_entropy(np.zeros((1, 2)), np.array([0]), temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        normax.linear_cross_entropy(np.zeros((1, 2)), np.zeros((3, 2)), np.array([0]), temperature=bad)


@pytest.mark.parametrize("bad", ["2", True, 1j])
def test_temperature_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="temperature"):
        normax.cross_entropy(np.zeros((1, 2)), np.array([0]), temperature=bad)


def test_token_weight_shape_and_dtype_are_checked():
    x, t = np.zeros((3, 2)), np.array([0, 1, 0])
    with pytest.raises(ValueError, match="token_weight"):
        normax.cross_entropy(x, t, token_weight=np.ones(2))
    with pytest.raises(ValueError, match="token_weight"):
        normax.cross_entropy_with_grad(x, t, token_weight=np.ones((3, 1)))
    with pytest.raises(TypeError, match="token_weight"):
        normax.cross_entropy(x, t, token_weight=np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="token_weight"):
        normax.linear_cross_entropy(np.zeros((3, 2)), np.zeros((4, 2)), t, token_weight=np.ones(4))


def test_stablemax_with_temperature_and_stats():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 5)) * 4
    t = rng.integers(0, 5, 6)
    loss, grad, stats = normax.cross_entropy_with_grad(
        x, t, normalizer="stablemax", temperature=2.0, return_stats=True, reduction="none"
    )
    z = x / 2.0
    phi = np.sign(z) * np.log1p(np.abs(z))
    want = reference(phi, t, reduction="none")
    assert close(loss, want[0], np.float64)
    assert close(grad, want[1] / (1 + np.abs(z)) / 2.0, np.float64)
    assert close(stats.lse, want[2], np.float64) and close(stats.entropy, want[3], np.float64)
    assert np.array_equal(stats.correct, x.argmax(1) == t)


@pytest.mark.parametrize("chunk_size", [None, 100, 7])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_forms_match_the_explicit_logits(isa, chunk_size, smoothing):
    rng = np.random.default_rng(11)
    n, h, v = 29, 8, 40
    hid = rng.standard_normal((n, h))
    w = rng.standard_normal((v, h))
    b = rng.standard_normal(v)
    t = rng.integers(0, v, n)
    t[4] = -100
    tw = rng.uniform(0, 2, n)
    kw = {"temperature": 1.3, "token_weight": tw, "label_smoothing": smoothing, "z_loss": 1e-3}
    logits = hid @ w.T + b
    want = reference(logits, t, **kw)
    loss, dh, dw, db, stats = normax.linear_cross_entropy_with_grad(
        hid, w, t, linear_bias=b, chunk_size=chunk_size, return_stats=True, **kw
    )
    assert close(loss, want[0], np.float64)
    assert close(dh, want[1] @ w, np.float64) and close(dw, want[1].T @ hid, np.float64)
    assert close(db, want[1].sum(0), np.float64)
    assert close(stats.lse, want[2], np.float64) and close(stats.entropy, want[3], np.float64)
    assert np.array_equal(stats.correct, want[4]) and close(stats.z_loss, want[5], np.float64)
    only, stats2 = normax.linear_cross_entropy(hid, w, t, linear_bias=b, chunk_size=chunk_size, return_stats=True,
                                               **kw)  # fmt: skip
    assert close(only, want[0], np.float64) and np.array_equal(stats2.correct, want[4])
    # Class weights take the blocks of whole rows (NumPy's GEMM, the row kernels).
    cw = rng.uniform(0.5, 2, v)
    want = reference(logits, t, weight=cw, **kw)
    loss, _, _, _, stats = normax.linear_cross_entropy_with_grad(hid, w, t, linear_bias=b, weight=cw,
                                                                 return_stats=True, **kw)  # fmt: skip
    assert close(loss, want[0], np.float64) and close(stats.entropy, want[3], np.float64)


def _vp_split(x, t, w, sizes, opts, tw):
    """Loss and gradient of the vocabulary-parallel kernels over simulated ranks."""
    starts = np.cumsum([0, *sizes[:-1]])
    packed = [vp.stats(x[:, s : s + n], t, w, int(s), opts) for s, n in zip(starts, sizes)]
    gathered = np.stack([p.reshape(-1) for p in packed])
    shards = [(int(s), n) for s, n in zip(starts, sizes)]
    loss, lse, denom = vp.combine(gathered, shards, t, w, opts, tw)
    go = np.ones(t.size) if opts.reduction == "none" else 1.0
    grads = [vp.backward(x[:, s : s + n], t, w, lse, denom, go, int(s), x.shape[1], opts, tw)
             for s, n in zip(starts, sizes)]  # fmt: skip
    return loss, np.concatenate(grads, axis=1)


@pytest.mark.parametrize("sizes", [(17,), (8, 9), (5, 6, 6), (4, 4, 4, 5)])
@pytest.mark.parametrize(("reduction", "smoothing", "softcap"), [("mean", 0.1, None), ("none", 0.0, 3.0)])
def test_vocab_parallel_kernels_match_single_process(isa, sizes, reduction, smoothing, softcap):
    rng = np.random.default_rng(13)
    x, t = inputs(rng, n=12, c=17, dtype=np.float64)
    tw = rng.uniform(0, 2, 12)
    w = rng.uniform(0.5, 2, 17)
    kw = {"reduction": reduction, "label_smoothing": smoothing, "softcap": softcap}
    opts = ce_options(-100, reduction, smoothing, 1e-2, softcap, 1.7)
    loss, grad = _vp_split(x, t, w, sizes, opts, tw)
    want, want_grad = normax.cross_entropy_with_grad(x, t, weight=w, z_loss=1e-2, temperature=1.7, token_weight=tw,
                                                     **kw)  # fmt: skip
    assert close(loss if reduction == "none" else loss[0], want, np.float64)
    assert close(grad, want_grad, np.float64)


def test_vocab_parallel_linear_kernels_take_temperature_and_token_weights():
    rng = np.random.default_rng(17)
    n, h, sizes = 10, 6, (7, 9)
    hid = rng.standard_normal((n, h))
    ws = [rng.standard_normal((s, h)) for s in sizes]
    t = rng.integers(0, sum(sizes), n)
    tw = rng.uniform(0, 2, n)
    opts = ce_options(-100, "mean", 0.1, 0.0, None, 0.8)
    starts = [0, sizes[0]]
    packed = []
    for s, w in zip(starts, ws):
        p = np.empty((n, vp.fields(opts)))
        vp.linear_stats(hid, w, None, t, None, p, s, opts, None)
        packed.append(p.reshape(-1))
    shards = list(zip(starts, sizes))
    loss, lse, denom = vp.combine(np.stack(packed), shards, t, None, opts, tw)
    parts = [vp.linear_backward(hid, w, None, t, None, lse, denom, 1.0, s, sum(sizes), opts, None, tw)
             for s, w in zip(starts, ws)]  # fmt: skip
    full = np.concatenate(ws)
    want, dh, dw, _ = normax.linear_cross_entropy_with_grad(hid, full, t, label_smoothing=0.1, temperature=0.8,
                                                            token_weight=tw)  # fmt: skip
    assert close(loss[0], want, np.float64)
    assert close(sum(p[0] for p in parts), dh, np.float64)
    assert close(np.concatenate([p[1] for p in parts]), dw, np.float64)


def test_every_combination_of_the_new_options_runs_the_same_on_every_isa():
    rng = np.random.default_rng(19)
    x, t = inputs(rng, n=12, c=300)
    tw = rng.random(12)
    results = {}
    for name in normax.supported_isas():
        previous = normax.get_isa()
        normax.set_isa(name)
        try:
            results[name] = [
                normax.cross_entropy_with_grad(x, t, temperature=temp, token_weight=w, return_stats=True)
                for temp, w in itertools.product((1.0, 0.3), (None, tw))
            ]
        finally:
            normax.set_isa(previous)
    base = results["scalar"]
    for name, res in results.items():
        for (l1, g1, s1), (l2, g2, s2) in zip(res, base):
            assert close(l1, l2, np.float32) and close(g1, g2, np.float32), name
            assert np.array_equal(s1.correct, s2.correct) and close(s1.entropy, s2.entropy, np.float32), name
