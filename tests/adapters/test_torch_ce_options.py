"""normax.torch's cross_entropy and linear_cross_entropy with temperature, token weights and
return_stats (issue 24), against float64 torch autograd references written from the contract:
z = x / T (then the softcap), each row's loss (z-loss term included) times its token weight, "mean"
over the sum of token weight x class weight of the kept targets; stats from torch.logsumexp, the
softmax's entropy and ``argmax == target``.

Tolerances, and why: float64 against the float64 reference, rtol 1e-10 and atol 1e-12 (both a few
ULP from exact, as tests/adapters/test_torch.py); float32 rtol 2e-5, atol 2e-6 x the largest value;
float16/bfloat16 inputs compute in float32, so their float32 statistics hold to float32's
tolerance of the reference at the rounded inputs, their loss to 2 ULP of the 16-bit dtype.
"""

from __future__ import annotations

import itertools

import normax
import normax.torch as nt
import pytest
import torch
import torch.nn.functional as F
from normax.torch import _cross_entropy, _linear_cross_entropy

TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def close(actual, expected, dtype=torch.float64, what=""):
    tol = TOL[dtype]
    a, e = actual.detach().double(), expected.detach().double()
    scale = max(float(e.abs().max()) if e.numel() else 0.0, 1.0)
    torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}")


def rand(*shape, dtype=torch.float64, seed=0, scale=2.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)


def token_weights(*shape, seed=7):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


TARGET = torch.tensor([3, 0, -100, 4, 1, 2])  # one ignored row
CLASS_WEIGHT = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)


def reference(
    x, t, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
    temperature=1.0, token_weight=None,
):  # fmt: skip
    """(loss, CrossEntropyStats) in float64 torch ops, differentiable in x (and a float target)."""
    axis = 1 if x.ndim >= 2 else 0
    z = x.double() / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    soft = t.is_floating_point()
    w = None if weight is None else weight.double()
    rows = F.cross_entropy(
        z, t.double() if soft else t, w, ignore_index=-100 if soft else ignore_index, reduction="none",
        label_smoothing=label_smoothing,
    )  # fmt: skip
    lse = torch.logsumexp(z, axis)
    keep = torch.ones_like(lse, dtype=torch.bool) if soft else t != ignore_index
    u = torch.ones_like(lse) if token_weight is None else token_weight.double()
    rows = (rows + z_loss * lse**2 * keep) * u
    z_term = z_loss * (u * keep * lse.detach() ** 2).sum()
    if soft:
        denom = u.sum()
    else:
        wt = torch.ones_like(lse) if w is None else w[torch.where(keep, t, 0)]
        denom = (u * keep * wt).sum()
    if reduction == "mean":
        loss, z_term = rows.sum() / denom, z_term / denom
    else:
        loss = rows.sum() if reduction == "sum" else rows
    z, lse = z.detach(), lse.detach()
    p = torch.softmax(z, axis)
    # sum_c p_c (lse - z_c), a p_c = 0 term (z_c = -inf included) counting 0
    entropy = torch.where(p > 0, p * (lse.unsqueeze(axis) - z), 0.0).sum(axis)
    correct = (x.detach().argmax(axis) == (t.argmax(axis) if soft else t)) & keep
    zero = torch.zeros((), dtype=torch.float64)
    stats = normax.CrossEntropyStats(
        torch.where(keep, lse, zero), torch.where(keep, entropy, zero), correct, z_term
    )  # fmt: skip
    return loss, stats


def check_stats(got, want, dtype=torch.float64, what=""):
    assert isinstance(got, nt.CrossEntropyStats) and type(got) is normax.CrossEntropyStats
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    for name in ("lse", "entropy", "z_loss"):
        a, e = getattr(got, name), getattr(want, name)
        assert a.dtype == stat_dtype and a.shape == e.shape and not a.requires_grad, (what, name)
        close(a, e, tol, f"{what} {name}")
    assert got.correct.dtype == torch.bool and torch.equal(got.correct, want.correct), what


# The options crossed with every temperature, token weight and reduction below.
OPTIONS = [
    dict(zip(("weight", "label_smoothing", "z_loss", "softcap"), combo))
    for combo in itertools.product([None, CLASS_WEIGHT], [0.0, 0.1], [0.0, 1e-3], [None, 4.0])
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["no_token_weight", "token_weight"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_cross_entropy_matches_float64_reference(soft, temperature, weighted, reduction):
    """Loss, gradient (under a random incoming gradient) and statistics, eager, every option combination."""
    target = torch.softmax(rand(6, 5, seed=3), 1) if soft else TARGET
    tw = token_weights(6) if weighted else None
    for options in OPTIONS:
        kw = dict(options, reduction=reduction, temperature=temperature, token_weight=tw)
        what = f"{kw}"
        x = rand(6, 5, grad=True)
        want, want_stats = reference(x, target, **kw)
        g_out = rand(*want.shape, seed=5)
        (want_grad,) = torch.autograd.grad(want, x, g_out)
        for return_stats in (False, True):
            got = nt.cross_entropy(x, target, **kw, return_stats=return_stats)
            loss, stats = got if return_stats else (got, None)
            close(loss, want, what=what)
            (grad,) = torch.autograd.grad(loss, x, g_out)
            close(grad, want_grad, what=f"{what} gradient")
            if return_stats:
                check_stats(stats, want_stats, what=what)


def test_cross_entropy_kdim_and_1d_inputs():
    """(N, C, d) logits with (N, d) token weights; (C,) logits with a 0-d one."""
    x, t = rand(2, 5, 3, grad=True), torch.tensor([[3, 0, 1], [-100, 4, 2]])
    kw = {"temperature": 1.7, "token_weight": token_weights(2, 3), "z_loss": 1e-3, "reduction": "none"}
    loss, stats = nt.cross_entropy(x, t, **kw, return_stats=True)
    want, want_stats = reference(x, t, **kw)
    close(loss, want)
    check_stats(stats, want_stats)
    assert stats.lse.shape == (2, 3)
    x1 = rand(5, seed=2, grad=True)
    kw = {"temperature": 0.5, "token_weight": torch.tensor(1.5, dtype=torch.float64)}
    loss, stats = nt.cross_entropy(x1, torch.tensor(2), **kw, return_stats=True)
    want, want_stats = reference(x1, torch.tensor(2), **kw)
    close(loss, want)
    check_stats(stats, want_stats)
    close(torch.autograd.grad(loss, x1)[0], torch.autograd.grad(want, x1)[0])


@pytest.mark.parametrize("return_stats", [False, True])
def test_gradcheck(return_stats):
    """Finite differences of our forward against our backward (the logits, and a probability target)."""
    tw = token_weights(6)

    def hard(x, **kw):
        out = nt.cross_entropy(
            x, TARGET, CLASS_WEIGHT, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, temperature=0.6,
            token_weight=tw, return_stats=return_stats, **kw,
        )  # fmt: skip
        return out[0] if return_stats else out

    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda x, r=reduction: hard(x, reduction=r), (rand(6, 5, grad=True),))

    def soft(x, t):
        out = nt.cross_entropy(
            x,
            t,
            CLASS_WEIGHT,
            label_smoothing=0.2,
            temperature=1.9,
            token_weight=tw,
            return_stats=return_stats,
        )
        return out[0] if return_stats else out

    probs = torch.softmax(rand(6, 5, seed=4), 1).requires_grad_()
    assert torch.autograd.gradcheck(soft, (rand(6, 5, grad=True), probs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """float32/float16/bfloat16: the loss in the input's dtype, the statistics in float32."""
    x = rand(6, 5, dtype=dtype, grad=True)
    tw = token_weights(6).to(dtype)
    kw = {"temperature": 1.3, "token_weight": tw, "z_loss": 1e-3, "label_smoothing": 0.1}
    loss, stats = nt.cross_entropy(x, TARGET, **kw, return_stats=True)
    want, want_stats = reference(x.detach().double().requires_grad_(), TARGET, **kw)
    assert loss.dtype == dtype
    close(loss, want, dtype)
    check_stats(stats, want_stats, dtype)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == dtype
    h, w = rand(6, 4, dtype=dtype, grad=True), rand(5, 4, dtype=dtype, seed=1, grad=True)
    loss, stats = nt.linear_cross_entropy(h, w, TARGET, **kw, return_stats=True)
    want, want_stats = reference(h.detach().double() @ w.detach().double().T, TARGET, **kw)
    assert loss.dtype == dtype
    close(loss, want, dtype)
    check_stats(stats, want_stats, dtype)
    assert [g.dtype for g in torch.autograd.grad(loss, (h, w))] == [dtype, dtype]


def test_ignored_rows_zero_weights_and_special_logits():
    x = rand(4, 5)
    x[1, 2] = -torch.inf  # a -inf logit off the target: finite loss, entropy and lse
    x[3] = 0.0  # ties: argmax is the first index
    t = torch.tensor([-100, 0, -100, 0])
    loss, stats = nt.cross_entropy(x, t, reduction="none", token_weight=token_weights(4), return_stats=True)
    assert torch.equal(stats.correct, torch.tensor([False, bool(x[1].argmax() == 0), False, True]))
    assert torch.equal(stats.lse[[0, 2]], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(stats.entropy[[0, 2]], torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(stats.entropy).all() and torch.isfinite(loss).all()
    check_stats(stats, reference(x, t, reduction="none", token_weight=token_weights(4))[1])
    # A mean over a zero total weight is NaN, as torch's weighted mean.
    assert torch.isnan(nt.cross_entropy(x, t, token_weight=torch.zeros(4, dtype=torch.float64)))
    all_ignored = torch.full((4,), -100)
    loss, stats = nt.cross_entropy(
        x, all_ignored, token_weight=token_weights(4), z_loss=1e-3, return_stats=True
    )
    assert torch.isnan(loss) and not stats.correct.any()


def test_stablemax_statistics_are_those_of_the_distribution_used():
    x, tw = rand(6, 5, grad=True), token_weights(6)
    z = x / 1.5
    phi = torch.where(z >= 0, torch.log1p(z.clamp(min=0)), -torch.log1p((-z).clamp(min=0)))
    want, want_stats = reference(phi, TARGET, token_weight=tw, z_loss=1e-3)
    kw = {
        "temperature": 1.5,
        "token_weight": tw,
        "z_loss": 1e-3,
        "normalizer": "stablemax",
        "return_stats": True,
    }
    loss, stats = nt.cross_entropy(x, TARGET, **kw)
    close(loss, want)
    check_stats(stats, want_stats)
    close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])


def test_token_weight_that_requires_grad_is_refused():
    x, tw = rand(6, 5, grad=True), token_weights(6).requires_grad_()
    h, w = rand(6, 4, grad=True), rand(5, 4, seed=1, grad=True)
    message = r"^the derivative for 'token_weight' is not implemented\.$"
    with pytest.raises(RuntimeError, match=message):
        nt.cross_entropy(x, TARGET, token_weight=tw)
    with pytest.raises(RuntimeError, match=message):
        nt.linear_cross_entropy(h, w, TARGET, token_weight=tw)
    with torch.no_grad():  # no graph is recorded: nothing to refuse
        assert torch.isfinite(nt.cross_entropy(x, TARGET, token_weight=tw))
    with pytest.raises(TypeError, match="token_weight"):
        nt.cross_entropy(x, TARGET, token_weight=[1.0] * 6)
    with pytest.raises(ValueError, match="token_weight"):
        nt.cross_entropy(x, TARGET, token_weight=torch.ones(5))
    with pytest.raises(ValueError, match="token_weight"):
        nt.linear_cross_entropy(h, w, TARGET, token_weight=torch.ones(6, 1))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature_raises_value_error(bad):
    x, h, w = rand(6, 5), rand(6, 4), rand(5, 4, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        nt.cross_entropy(x, TARGET, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        nt.linear_cross_entropy(h, w, TARGET, temperature=bad)


@pytest.mark.parametrize("bad", [True, "2.0", None])
def test_temperature_that_is_no_number_raises_type_error(bad):
    with pytest.raises(TypeError, match="temperature"):
        nt.cross_entropy(rand(6, 5), TARGET, temperature=bad)


def test_return_stats_must_be_a_bool():
    with pytest.raises(TypeError, match="return_stats"):
        nt.cross_entropy(rand(6, 5), TARGET, return_stats=1)


def test_caller_tensors_unmodified():
    x, h, w, b = (
        rand(6, 5, grad=True),
        rand(6, 4, grad=True),
        rand(5, 4, seed=1, grad=True),
        rand(5, grad=True),
    )
    tw, target = token_weights(6), TARGET.clone()
    copies = [a.detach().clone() for a in (x, h, w, b, tw, target)]
    kw = {
        "temperature": 0.8,
        "token_weight": tw,
        "z_loss": 1e-3,
        "label_smoothing": 0.1,
        "return_stats": True,
    }
    for reduction in ("mean", "none"):
        loss, _ = nt.cross_entropy(x, target, reduction=reduction, **kw)
        loss.sum().backward()
        loss, _ = nt.linear_cross_entropy(h, w, target, linear_bias=b, reduction=reduction, **kw)
        loss.sum().backward()
    for a, c in zip((x, h, w, b, tw, target), copies):
        assert torch.equal(a.detach(), c)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["no_token_weight", "token_weight"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_linear_cross_entropy_matches_float64_reference(temperature, weighted, reduction):
    """Loss, gradients of hidden, weight and bias, and statistics against cross_entropy's reference
    at the logits (bias included, divided by T): the fused kernels (class indices, no class
    weights), the blocks (class weights, probabilities), and several row blocks (chunk_size)."""
    tw = token_weights(6) if weighted else None
    soft_target = torch.softmax(rand(6, 5, seed=3), 1)
    cases = [
        (TARGET, {}),
        (TARGET, {"weight": CLASS_WEIGHT, "label_smoothing": 0.1}),
        (TARGET, {"z_loss": 1e-3, "softcap": 4.0, "chunk_size": 10}),
        (soft_target, {"label_smoothing": 0.1}),
    ]
    for target, options in cases:
        kw = dict(options, reduction=reduction, temperature=temperature, token_weight=tw)
        what = f"{kw}"
        h, w, b = rand(6, 4, grad=True), rand(5, 4, seed=1, grad=True), rand(5, seed=2, grad=True)
        ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
        want, want_stats = reference(h @ w.T + b, target, **ref_kw)
        g_out = rand(*want.shape, seed=5)
        want_grads = torch.autograd.grad(want, (h, w, b), g_out)
        for return_stats in (False, True):
            got = nt.linear_cross_entropy(h, w, target, linear_bias=b, **kw, return_stats=return_stats)
            loss, stats = got if return_stats else (got, None)
            close(loss, want, what=what)
            for g, e in zip(torch.autograd.grad(loss, (h, w, b), g_out), want_grads):
                close(g, e, what=f"{what} gradient")
            if return_stats:
                check_stats(stats, want_stats, what=what)


def test_linear_cross_entropy_gradcheck():
    tw = token_weights(6)
    w, b = rand(5, 4, seed=1, grad=True), rand(5, seed=2, grad=True)
    for reduction, return_stats in (("mean", True), ("none", False), ("sum", True)):

        def f(h, w, b, reduction=reduction, return_stats=return_stats):
            out = nt.linear_cross_entropy(
                h, w, TARGET, linear_bias=b, reduction=reduction, z_loss=1e-2, temperature=0.6, token_weight=tw,
                return_stats=return_stats,
            )  # fmt: skip
            return out[0] if return_stats else out

        assert torch.autograd.gradcheck(f, (rand(6, 4, grad=True), w, b))


def test_linear_cross_entropy_leading_dims_and_one_sample():
    """(B, T, H) hidden with (B, T) token weights; (H,) hidden with a 0-d one."""
    h, w = rand(2, 3, 4, grad=True), rand(5, 4, seed=1, grad=True)
    t = torch.tensor([[3, 0, -100], [4, 1, 2]])
    tw = token_weights(2, 3)
    loss, stats = nt.linear_cross_entropy(
        h, w, t, reduction="none", temperature=1.4, token_weight=tw, return_stats=True
    )
    want, want_stats = reference(
        (h @ w.T).reshape(6, 5), t.reshape(6), reduction="none", temperature=1.4, token_weight=tw.reshape(6)
    )
    close(loss, want.reshape(2, 3))
    assert stats.lse.shape == stats.correct.shape == (2, 3) and stats.z_loss.shape == ()
    check_stats(
        stats, normax.CrossEntropyStats(*(s.reshape(2, 3) for s in want_stats[:3]), want_stats.z_loss)
    )
    h1 = rand(4, seed=3, grad=True)
    kw = {"temperature": 0.9, "token_weight": torch.tensor(2.0, dtype=torch.float64)}
    loss, stats = nt.linear_cross_entropy(h1, w, torch.tensor(3), **kw, return_stats=True)
    want, want_stats = reference(h1 @ w.T, torch.tensor(3), **kw)
    close(loss, want)
    check_stats(stats, want_stats)


def test_linear_cross_entropy_retain_graph_recomputes_with_stats():
    """The eager route hands the forward's gradients over; a second backward recomputes them."""
    h, w = rand(6, 4, grad=True), rand(5, 4, seed=1, grad=True)
    loss, _ = nt.linear_cross_entropy(
        h, w, TARGET, temperature=2.0, token_weight=token_weights(6), return_stats=True
    )
    loss.backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    loss.backward()
    close(h.grad, 2 * first[0])
    close(w.grad, 2 * first[1])


# ---------------------------------------------------------------------------------------------
# Custom ops, torch.compile, modules, CUDA


def test_opcheck_new_options():
    x, tw = rand(6, 5, grad=True), token_weights(6)
    h, w, b = rand(6, 4, grad=True), rand(5, 4, seed=1, grad=True), rand(5, grad=True)
    ce = (1, -100, "none", 0.1, 1e-3, 4.0, 0.7, tw)
    lin = (h, w, TARGET, b, None, None, "mean", 0.1, 1e-3, None, 12, "float32", 1.3, tw)
    cases = [
        (_cross_entropy._cross_entropy_op, (x.detach(), TARGET, CLASS_WEIGHT, *ce)),
        (_cross_entropy._cross_entropy_with_grad_op, (x, TARGET, None, *ce)),
        (_cross_entropy._cross_entropy_backward_op, (x.detach(), TARGET, None, rand(6, seed=9), *ce)),
        (_cross_entropy._cross_entropy_stats_op, (x, TARGET, None, *ce, True)),
        (_cross_entropy._cross_entropy_stats_op, (x, TARGET, CLASS_WEIGHT, *ce, False)),
        (_linear_cross_entropy._linear_ce_op, lin),
        (_linear_cross_entropy._linear_ce_with_grad_op, (*lin[:12], None, *lin[12:])),
        (_linear_cross_entropy._linear_ce_stats_op, (*lin, True)),
        (_linear_cross_entropy._linear_ce_stats_op, (*lin[:6], "none", *lin[7:], False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.custom_op, args)


def test_torch_compile_fullgraph_with_stats_and_token_weights():
    """Compiled (aot_eager: dynamo with the fake kernels, AOTAutograd with the registered
    backwards) equals eager: losses, statistics, gradients."""
    torch._dynamo.reset()

    def f(x, h, w, tw):
        loss, stats = nt.cross_entropy(
            x, TARGET, temperature=0.8, token_weight=tw, z_loss=1e-3, return_stats=True
        )
        loss2, stats2 = nt.linear_cross_entropy(
            h, w, TARGET, temperature=1.5, token_weight=tw, return_stats=True
        )
        loss3 = nt.cross_entropy(x, TARGET, reduction="none", token_weight=tw, temperature=2.0).sum()
        return loss + loss2 + loss3, stats, stats2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    tw = token_weights(6)
    results = []
    for fn in (f, compiled):
        x, h, w = rand(6, 5, grad=True), rand(6, 4, grad=True), rand(5, 4, seed=1, grad=True)
        out, stats, stats2 = fn(x, h, w, tw)
        out.backward()
        assert type(stats) is normax.CrossEntropyStats
        results.append((out, x.grad, h.grad, w.grad, *stats, *stats2))
    for a, e in zip(*results):
        assert a.dtype == e.dtype and a.shape == e.shape
        close(a, e, what="compiled vs eager")


def test_modules_take_temperature():
    x, t = rand(6, 5, dtype=torch.float32), torch.tensor([0, 1, 2, 3, 4, 1])
    loss = nt.CrossEntropyLoss(label_smoothing=0.1, temperature=2.0)
    close(loss(x, t), nt.cross_entropy(x, t, label_smoothing=0.1, temperature=2.0), torch.float32)
    linear = nt.LinearCrossEntropyLoss(4, 5, temperature=0.5)
    h = rand(6, 4, dtype=torch.float32)
    want = nt.linear_cross_entropy(h, linear.linear.weight, t, temperature=0.5)
    close(linear(h, t), want, torch.float32)
    assert "temperature=0.5" in repr(linear)


def test_cuda_kernels_refuse_the_new_options_until_they_take_them():
    """The CUDA kernels of the ops raise the backends' NotImplementedError before any device work."""
    x, tw = rand(6, 5), token_weights(6)
    with pytest.raises(NotImplementedError, match="cross_entropy with temperature != 1"):
        _cross_entropy._cross_entropy_cuda(x, TARGET, None, 1, -100, "mean", 0.0, 0.0, None, 2.0, None)
    with pytest.raises(NotImplementedError, match="cross_entropy with token_weight="):
        _cross_entropy._cross_entropy_with_grad_cuda(
            x, TARGET, None, 1, -100, "mean", 0.0, 0.0, None, 1.0, tw
        )
    with pytest.raises(NotImplementedError, match="linear_cross_entropy with temperature != 1"):
        _linear_cross_entropy._linear_ce_cuda(
            rand(6, 4), rand(5, 4), TARGET, None, None, -100, "mean", 0.0, 0.0, None, None, "float32", 2.0
        )
