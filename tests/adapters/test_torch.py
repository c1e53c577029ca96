"""normax.torch against PyTorch's own functions and modules.

Every function: forward values, ``torch.autograd.gradcheck`` in float64 (finite differences of our
forward against our backward), gradients equal to torch's own autograd gradients in float32,
``torch.library.opcheck`` on the custom op behind it, and one ``torch.compile(fullgraph=True)`` run
through all of them. Modules: same state_dict as torch's, loading either way, same outputs.

Tolerances, and why:
- float64 vs torch float64: rtol 1e-10, atol 1e-12. Both are a few ULP (2.2e-16) from exact.
- float32 vs torch float32: rtol 2e-5, atol 2e-6 (scaled by the largest reference value). Both
  sides are within a few float32 ULP (6e-8 relative) of the exact value on inputs of size O(1);
  differences of sums over rows (layer_norm's dweight, reductions of losses) and cancellation in
  gradients near zero need the absolute term.
- float16 / bfloat16: against torch's float32 result on the same (exactly representable) inputs,
  rounded to the dtype: within 2 ULP of the dtype (rtol 2e-3 for float16, 1.6e-2 for bfloat16).
"""

from __future__ import annotations

import math

import normax
import normax.torch as nt
import pytest
import torch
import torch.nn.functional as F
from normax.torch import _convert, _cross_entropy, _linear_cross_entropy, _norms, _power_norm, _softmax
from torch_power_norm import torch_mask_power_norm

TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def assert_close(actual, expected, dtype, what=""):
    tol = TOL[dtype]
    a = actual.detach().double()
    e = expected.detach().double()
    scale = max(float(e.abs().max()) if e.numel() else 0.0, 1.0)
    torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}")


def rand(*shape, dtype=torch.float64, seed=0, scale=2.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(grad)


TARGET = torch.tensor([3, 0, -100, 4, 1, 2])  # one ignored row
TARGET_2D = torch.tensor([[3, 0, 1], [-100, 4, 2]])
WEIGHT = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)


# name -> (ours(x), torch's(x), input shape). Non-last dims and 3-d shapes exercise strides.
FUNCTIONS = {
    "softmax": (lambda x: nt.softmax(x, 1), lambda x: F.softmax(x, 1), (4, 7, 3)),
    "log_softmax": (lambda x: nt.log_softmax(x, -1), lambda x: F.log_softmax(x, -1), (4, 7, 3)),
    "logsumexp": (lambda x: nt.logsumexp(x, (0, 2)), lambda x: torch.logsumexp(x, (0, 2)), (4, 7, 3)),
    "logsumexp_keepdim": (
        lambda x: nt.logsumexp(x, 1, keepdim=True),
        lambda x: torch.logsumexp(x, 1, keepdim=True),
        (4, 7, 3),
    ),
    "cross_entropy": (
        lambda x: nt.cross_entropy(x, TARGET, WEIGHT.to(x.dtype), label_smoothing=0.1),
        lambda x: F.cross_entropy(x, TARGET, WEIGHT.to(x.dtype), label_smoothing=0.1),
        (6, 5),
    ),
    "cross_entropy_kdim_none": (
        lambda x: nt.cross_entropy(x, TARGET_2D, reduction="none"),
        lambda x: F.cross_entropy(x, TARGET_2D, reduction="none"),
        (2, 5, 3),
    ),
    "cross_entropy_soft_sum": (
        lambda x: nt.cross_entropy(
            x, torch.softmax(torch.arange(30.0).reshape(6, 5).to(x.dtype), 1), reduction="sum"
        ),
        lambda x: F.cross_entropy(
            x, torch.softmax(torch.arange(30.0).reshape(6, 5).to(x.dtype), 1), reduction="sum"
        ),
        (6, 5),
    ),
    "layer_norm": (
        lambda x: nt.layer_norm(x, (7, 3), torch.linspace(0.5, 2, 21).reshape(7, 3).to(x.dtype), None, 1e-5),
        lambda x: F.layer_norm(x, (7, 3), torch.linspace(0.5, 2, 21).reshape(7, 3).to(x.dtype), None, 1e-5),
        (4, 7, 3),
    ),
    "rms_norm": (
        lambda x: nt.rms_norm(x, (3,), torch.tensor([0.5, 1.0, 2.0], dtype=x.dtype)),
        lambda x: F.rms_norm(x, (3,), torch.tensor([0.5, 1.0, 2.0], dtype=x.dtype)),
        (4, 7, 3),
    ),
    "linear_cross_entropy": (
        lambda x: nt.linear_cross_entropy(x, torch.eye(5, 4, dtype=x.dtype) - 0.3, TARGET),
        lambda x: F.cross_entropy(x @ (torch.eye(5, 4, dtype=x.dtype) - 0.3).T, TARGET),
        (6, 4),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_forward_matches_torch(name, dtype):
    ours, theirs, shape = FUNCTIONS[name]
    x = rand(*shape, dtype=dtype)
    got = ours(x)
    assert got.dtype == dtype and got.shape == theirs(x.double()).shape
    if dtype in (torch.float16, torch.bfloat16):
        # torch's reduced-precision CPU kernels round differently; compare to its float32 result.
        expected = theirs(x.float()).to(dtype)
    else:
        expected = theirs(x)
    assert_close(got, expected, dtype, name)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradcheck_float64(name):
    ours, _, shape = FUNCTIONS[name]
    x = rand(*shape, grad=True)
    assert torch.autograd.gradcheck(ours, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradients_equal_torch_float32(name):
    ours, theirs, shape = FUNCTIONS[name]
    x1 = rand(*shape, dtype=torch.float32, grad=True)
    x2 = rand(*shape, dtype=torch.float32, grad=True)
    y1, y2 = ours(x1), theirs(x2)
    dy = rand(*y1.shape, dtype=torch.float32, seed=1)
    (g1,) = torch.autograd.grad(y1, x1, dy)
    (g2,) = torch.autograd.grad(y2, x2, dy)
    assert_close(g1, g2, torch.float32, name)


def test_norm_and_linear_parameter_gradients_equal_torch():
    """Gradients reach weight and bias exactly as torch's (float32)."""
    x = rand(6, 4, 8, dtype=torch.float32)
    for ours, theirs in (
        (nt.layer_norm, F.layer_norm),
        (lambda x, s, w, b: nt.rms_norm(x, s, w, 1e-6), lambda x, s, w, b: F.rms_norm(x, s, w, 1e-6)),
    ):
        grads = []
        for f in (ours, theirs):
            w = rand(4, 8, dtype=torch.float32, seed=2, grad=True)
            b = rand(4, 8, dtype=torch.float32, seed=3, grad=True)
            xx = x.clone().requires_grad_()
            f(xx, (4, 8), w, b).pow(2).sum().backward()
            grads.append((xx.grad, w.grad, b.grad))
        for k, (a, e) in enumerate(zip(*grads)):
            if e is None:
                assert a is None
            else:
                assert_close(a, e, torch.float32, f"grad {k}")
    # linear_cross_entropy: input, weight and bias, every reduction.
    h = rand(6, 4, dtype=torch.float32)
    for reduction in ("mean", "sum", "none"):
        grads = []
        for fused in (True, False):
            hh = h.clone().requires_grad_()
            w = rand(5, 4, dtype=torch.float32, seed=2, grad=True)
            b = rand(5, dtype=torch.float32, seed=3, grad=True)
            if fused:
                loss = nt.linear_cross_entropy(
                    hh, w, TARGET, linear_bias=b, reduction=reduction, label_smoothing=0.1
                )
            else:
                loss = F.cross_entropy(hh @ w.T + b, TARGET, reduction=reduction, label_smoothing=0.1)
            (loss * torch.arange(1.0, 7.0)[: loss.numel()].reshape(loss.shape)).sum().backward()
            grads.append((loss, hh.grad, w.grad, b.grad))
        for a, e in zip(*grads):
            assert_close(a, e, torch.float32, f"linear_cross_entropy {reduction}")


def test_cross_entropy_z_loss_and_softcap_match_formula():
    """z_loss and softcap have no torch counterpart: compare with the formula in torch ops."""
    x = rand(6, 5, grad=True)
    t = TARGET

    def formula(x):
        capped = 3.0 * torch.tanh(x / 3.0)
        lse = torch.logsumexp(capped, 1)
        rows = F.cross_entropy(capped, t, reduction="none") + 1e-2 * lse**2 * (t != -100)
        return rows.sum() / (t != -100).sum()

    ours = nt.cross_entropy(x, t, z_loss=1e-2, softcap=3.0)
    assert_close(ours, formula(x), torch.float64, "forward")
    (g1,) = torch.autograd.grad(ours, x)
    (g2,) = torch.autograd.grad(formula(x), x)
    assert_close(g1, g2, torch.float64, "gradient")


def test_softmax_dtype_argument_and_integer_inputs():
    x = rand(3, 4, dtype=torch.float32)
    y = nt.softmax(x, -1, dtype=torch.float64)
    assert y.dtype == torch.float64
    assert_close(y, F.softmax(x, -1, dtype=torch.float64), torch.float64)
    i = torch.arange(6).reshape(2, 3)
    assert nt.logsumexp(i, 1).dtype == torch.logsumexp(i, 1).dtype == torch.get_default_dtype()
    with pytest.raises(TypeError, match="floating-point"):
        nt.softmax(i, 1)


def test_bad_arguments_name_themselves():
    x = rand(3, 4)
    with pytest.raises(IndexError, match="dim 2"):
        nt.softmax(x, 2)
    with pytest.raises(ValueError, match="normalized_shape"):
        nt.layer_norm(x, (5,))
    with pytest.raises(ValueError, match="weight shape"):
        nt.rms_norm(x, (4,), torch.ones(3, dtype=x.dtype))
    with pytest.raises(ValueError, match="reduction"):
        nt.cross_entropy(x, torch.tensor([0, 1, 2]), reduction="avg")
    with pytest.raises(IndexError, match="class index 7"):
        nt.cross_entropy(x, torch.tensor([0, 7, 2]))


def test_double_backward_raises_clearly():
    x = rand(3, 4, grad=True)
    (g,) = torch.autograd.grad(nt.softmax(x, 1)[:, 0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()
    # A gradient the fused cross-entropy formed in its forward: a second derivative through it
    # (a gradient penalty) raises rather than silently leaving out the cross-entropy's Hessian.
    (g,) = torch.autograd.grad(nt.cross_entropy(x, torch.tensor([0, 1, 2])), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad((g * g).sum() + x.sum(), x)
    h, w = rand(3, 2, grad=True), rand(4, 2, seed=1, grad=True)
    (gh,) = torch.autograd.grad(nt.linear_cross_entropy(h, w, torch.tensor([0, 1, 3])), h, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gh.square().sum(), w)
    # logsumexp's backward is plain torch ops: its second derivative works.
    assert torch.autograd.gradgradcheck(lambda a: nt.logsumexp(a, 1), (x,))


def _opcheck_cases():
    x = rand(4, 5, grad=True)
    y = torch.softmax(x.detach(), 1)
    dy = rand(4, 5, seed=1)
    t = torch.tensor([0, 4, -100, 2])
    w = rand(5, seed=2, grad=True)
    b = rand(5, seed=3, grad=True)
    h = rand(4, 3, seed=4, grad=True)
    wl = rand(5, 3, seed=5, grad=True)
    mean = x.detach().mean(1)
    rstd = torch.rsqrt(x.detach().var(1, unbiased=False) + 1e-5)
    rms = torch.rsqrt(x.detach().pow(2).mean(1) + 1e-6)
    ce = (2, 0.1, 1e-3, None)
    pn = rand(3, 2, 5, seed=6, grad=True)
    phi, ema, iters = (
        torch.ones(1, 5, 1, 1, dtype=x.dtype),
        torch.zeros(1, 5, 1, 1, dtype=x.dtype),
        torch.zeros(1, dtype=torch.long),
    )
    z = torch.ones(5, dtype=torch.float64)
    return {
        "softmax": (_softmax._softmax_op, (x, 1)),
        "softmax_backward": (_softmax._softmax_backward_op, (y, dy, 1)),
        "log_softmax": (_softmax.log_softmax_op, (x, 0)),
        "log_softmax_backward": (_softmax._log_softmax_backward_op, (y.log(), dy, 1)),
        "logsumexp": (_softmax._logsumexp_op, (x, [1], False)),
        "cross_entropy": (_cross_entropy._cross_entropy_op, (x.detach(), t, None, 1, -100, "mean", *ce[1:])),
        "cross_entropy_with_grad": (
            _cross_entropy._cross_entropy_with_grad_op,
            (x, t, w.detach(), 1, -100, "none", *ce[1:]),
        ),
        "cross_entropy_backward": (
            _cross_entropy._cross_entropy_backward_op,
            (x.detach(), t, w.detach(), rand(4, seed=9), 1, -100, "none", *ce[1:]),
        ),
        "scale_grad": (_cross_entropy.scale_grad_op, (dy, rand(4, seed=7), 1, x.detach())),
        "linear_cross_entropy": (
            _linear_cross_entropy._linear_ce_op,
            (h, wl, t, b, None, -100, "none", 0.1, 0.0, None, None, "float32"),
        ),
        "linear_cross_entropy_with_grad": (
            _linear_cross_entropy._linear_ce_with_grad_op,
            (h, wl, t, b, None, None, "mean", 0.0, 1e-3, 5.0, 7, "input", None),
        ),
        # Class weights and probability targets (which then get a gradient too).
        "linear_cross_entropy_soft": (
            _linear_cross_entropy._linear_ce_op,
            (
                h,
                wl,
                rand(4, 5, seed=11).softmax(1).requires_grad_(),
                b,
                w.detach(),
                None,
                "mean",
                0.1,
                0.0,
                None,
                7,
                "float32",
            ),
        ),
        "layer_norm": (_norms._layer_norm_op, (x, 1, w, b, 1e-5)),
        "layer_norm_backward": (
            _norms._layer_norm_backward_op,
            (dy, x.detach(), 1, w.detach(), None, mean, rstd, 1e-5),
        ),
        "rms_norm": (_norms._rms_norm_op, (x, 1, None, 1e-6)),
        "rms_norm_backward": (_norms._rms_norm_backward_op, (dy, x.detach(), 1, w.detach(), rms, 1e-6)),
        "power_norm": (
            _power_norm._power_norm_op,
            (pn, w, b, phi, ema, iters, None, True, 1e-5, 0.9, 0.9, 3, 1),
        ),
        "power_norm_backward": (
            _power_norm._power_norm_backward_op,
            (rand(3, 2, 5, seed=8), pn.detach(), w.detach(), z, z, ema, True, 1e-5, 0.9, 1),
        ),
    }


@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    # normax.torch._op.Op: opcheck tests its registered custom op (the direct route runs the same
    # kernels: test_direct_route_matches_dispatcher).
    torch.library.opcheck(getattr(op, "custom_op", op), args)


def test_torch_compile_fullgraph_matches_eager():
    """One compiled function through every op, forward and backward, without a graph break.

    The aot_eager backend runs what our ops must support (dynamo tracing with the fake kernels,
    AOTAutograd's joint graph with the registered backwards); inductor would only generate code for
    the surrounding torch ops, at ~30 s of compilation here.
    """
    torch._dynamo.reset()

    def f(x, w, b, h, wl, t, pn_module):
        a = nt.layer_norm(x, (8,), w, b)
        a = nt.rms_norm(a * 2, (8,), w)
        p = nt.softmax(a, -1) + nt.log_softmax(a, 0) + nt.logsumexp(a, -1, keepdim=True)
        loss = nt.cross_entropy(p, t, label_smoothing=0.1, z_loss=1e-3)
        return loss + nt.linear_cross_entropy(h, wl, t) + pn_module(x.reshape(2, 2, 8)).square().mean()

    args = [rand(4, 8, seed=s, grad=True) for s in range(1)]
    w, b = rand(8, seed=1, grad=True), rand(8, seed=2, grad=True)
    h, wl = rand(4, 3, seed=3, grad=True), rand(8, 3, seed=4, grad=True)
    t = torch.tensor([1, 7, 0, 3])
    modules = [nt.PowerNorm(8, warmup_iters=2).double() for _ in range(2)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn, module in ((f, modules[0]), (compiled, modules[1])):
        leaves = [args[0].detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()]
        leaves += [h.detach().requires_grad_(), wl.detach().requires_grad_()]
        out = fn(*leaves, t, module)
        out.backward()
        results.append((out, *(leaf.grad for leaf in leaves), module.running_phi, module.ema_gz))
    for a, e in zip(*results):
        assert_close(a, e, torch.float64, "compiled vs eager")
    assert int(modules[1].iters) == 1


# ---------------------------------------------------------------------------------------------
# Modules


def test_norm_modules_share_torch_state_dicts():
    for ours_cls, torch_cls, kwargs in (
        (nt.RMSNorm, torch.nn.RMSNorm, {"eps": 1e-6}),
        (nt.LayerNorm, torch.nn.LayerNorm, {"eps": 1e-5, "bias": True}),
        (nt.LayerNorm, torch.nn.LayerNorm, {"elementwise_affine": False}),
    ):
        theirs = torch_cls((3, 8), **kwargs)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(rand(*p.shape, dtype=torch.float32, seed=5))
        ours = ours_cls((3, 8), **kwargs)
        assert isinstance(ours, torch_cls)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        x = rand(5, 3, 8, dtype=torch.float32)
        assert_close(ours(x), theirs(x), torch.float32, ours_cls.__name__)


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_cross_entropy_loss_module():
    w = torch.linspace(0.5, 2.0, 5)
    ours = nt.CrossEntropyLoss(w, ignore_index=1, reduction="sum", label_smoothing=0.2, z_loss=0.0)
    theirs = torch.nn.CrossEntropyLoss(w, ignore_index=1, reduction="sum", label_smoothing=0.2)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    ours.load_state_dict(theirs.state_dict())
    x, t = rand(6, 5, dtype=torch.float32), torch.tensor([0, 1, 2, 3, 4, 1])
    assert_close(ours(x, t), theirs(x, t), torch.float32)
    # The deprecated size_average/reduce arguments map to a reduction as in torch.
    assert (
        nt.CrossEntropyLoss(reduce=False).reduction
        == torch.nn.CrossEntropyLoss(reduce=False).reduction
        == "none"
    )


def test_linear_cross_entropy_loss_module_matches_torch():
    theirs = torch.nn.LinearCrossEntropyLoss(4, 5, bias=True, label_smoothing=0.1)
    ours = nt.LinearCrossEntropyLoss(4, 5, bias=True, label_smoothing=0.1)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"linear.weight", "linear.bias"}
    ours.load_state_dict(theirs.state_dict())
    x = rand(6, 4, dtype=torch.float32)
    assert_close(ours(x, TARGET), theirs(x, TARGET), torch.float32)


@pytest.mark.parametrize("padded", [False, True])
def test_power_norm_module_matches_mask_power_norm(padded):
    """Eight training steps crossing warmup (3), then evaluation, against the torch MaskPowerNorm
    reference of the norms work: outputs, gradients and all three buffers (float64)."""
    c, t_len, b = 8, 5, 3
    ours = nt.PowerNorm(c, 1e-5, 0.9, 0.7, True, 3, 2).double()
    ref = torch_mask_power_norm(
        c, eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.7, warmup_iters=3, group_num=2
    ).double()
    assert set(ours.state_dict()) == {"weight", "bias", "running_phi", "ema_gz", "iters"}
    assert ours.running_phi.shape == (1, c, 1, 1) and ours.iters.dtype == torch.long
    pad = torch.zeros(b, t_len, dtype=torch.bool)
    if padded:
        pad[0, 3:] = True
        pad[2, 4:] = True
    for step in range(9):
        x = rand(t_len, b, c, seed=step)
        if step == 8:
            ours.eval()
            ref.eval()
        outs = []
        for module in (ours, ref):
            xx = x.clone().requires_grad_()
            y = module(xx, pad if padded else None)
            (y * rand(t_len, b, c, seed=100 + step)).sum().backward()
            outs.append((y, xx.grad, module.weight.grad, module.bias.grad))
            module.zero_grad()
        for a, e in zip(*outs):
            assert_close(a, e, torch.float64, f"step {step}")
        assert_close(ours.running_phi.flatten(), ref.running_phi, torch.float64, "running_phi")
        assert_close(ours.ema_gz.flatten(), ref.ema_gz, torch.float64, "ema_gz")
        assert int(ours.iters) == int(ref.iters)


def test_patch_swaps_norms_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8),
        torch.nn.LayerNorm(8),
        torch.nn.Sequential(torch.nn.RMSNorm(8, eps=1e-6), torch.nn.GELU()),
        torch.nn.LayerNorm(8, elementwise_affine=False),
    )
    x = rand(4, 8, dtype=torch.float32)
    before = model(x)
    params = list(model.parameters())
    assert nt.patch(model) == 3
    assert (
        type(model[1]) is nt.LayerNorm and type(model[2][0]) is nt.RMSNorm and type(model[3]) is nt.LayerNorm
    )
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert_close(model(x), before, torch.float32, "patched model")
    assert nt.patch(model) == 0  # already ours


def test_other_devices_error_names_the_missing_kernel():
    with pytest.raises(NotImplementedError, match="no kernel for that device"):
        _convert.host(torch.empty(2, device="meta"))


@pytest.mark.parametrize(
    "op",
    ["softmax", "log_softmax", "softmax_backward", "log_softmax_backward", "logsumexp", "cross_entropy",
     "cross_entropy_with_grad", "cross_entropy_backward", "layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward"],
)  # fmt: skip
def test_ops_have_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"normax::{op}", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"normax::{op}", "XLA")


def test_importing_normax_torch_registers_the_ops():
    assert hasattr(torch.ops.normax, "softmax") and hasattr(torch.ops.normax, "power_norm_backward")
    assert math.isclose(float(nt.logsumexp(torch.zeros(4), 0)), math.log(4.0), rel_tol=1e-6)
    assert normax.softmax is not None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_op_backward_forms_the_gradient(reduction):
    """The loss-only op (used for CUDA tensors) differentiates through cross_entropy_backward."""
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 4, -100, 2, 1, 3])
    w = torch.rand(5, dtype=torch.float64) + 0.5
    loss = torch.ops.normax.cross_entropy(x, t, w, 1, -100, reduction, 0.1, 0.0, None)
    ref = torch.nn.functional.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (want,) = torch.autograd.grad(ref, x, g)
    (got,) = torch.autograd.grad(loss, x, g)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(got, want)
