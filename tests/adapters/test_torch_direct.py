"""The two routes of a normax.torch op (normax/torch/_op.py): straight to the kernel in plain
eager calls, through torch's dispatcher (the registered custom op) everywhere else.

Both routes run the same kernels, so results and gradients must be bitwise equal; the direct route
must be the one a plain eager call takes (it is what makes a small training step cheap), and the
dispatcher the one taken whenever torch needs to see the op (modes, subclasses, transforms,
compiling, meta tensors).
"""

from __future__ import annotations

import normax.torch as nt
import pytest
import torch
from normax.torch import _cross_entropy, _linear_cross_entropy, _norms, _op, _softmax
from torch.overrides import TorchFunctionMode


class _Passthrough(TorchFunctionMode):
    """A do-nothing torch function mode: with one active, normax must take the dispatcher."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _rand(*shape, dtype=torch.float32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_(grad)


_W = torch.linspace(0.5, 2.0, 7)
CASES = {
    "softmax": lambda x: nt.softmax(x, -1),
    "softmax_dim0": lambda x: nt.softmax(x, 0),
    "log_softmax": lambda x: nt.log_softmax(x, 1),
    "logsumexp": lambda x: nt.logsumexp(x, 1),
    "cross_entropy": lambda x: nt.cross_entropy(x, torch.tensor([0, 6, 3, -100, 2])),
    "cross_entropy_options": lambda x: nt.cross_entropy(
        x, torch.tensor([0, 6, 3, 1, 2]), _W.to(x.dtype), label_smoothing=0.1, z_loss=1e-3, softcap=5.0
    ),
    "cross_entropy_none": lambda x: nt.cross_entropy(x, torch.tensor([0, 6, 3, 1, 2]), reduction="none"),
    "cross_entropy_soft": lambda x: nt.cross_entropy(x, torch.softmax(_rand(5, 7, seed=4, grad=False), 1)),
    "layer_norm": lambda x: nt.layer_norm(x, (7,), _W.to(x.dtype), _W.flip(0).to(x.dtype), 1e-5),
    "layer_norm_no_params": lambda x: nt.layer_norm(x, (7,)),
    "rms_norm": lambda x: nt.rms_norm(x, (7,), _W.to(x.dtype), 1e-6),
    "rms_norm_2d_shape": lambda x: nt.rms_norm(x, (5, 7)),
    "linear_cross_entropy": lambda x: nt.linear_cross_entropy(
        x, torch.linspace(-1, 1, 28).reshape(4, 7).to(x.dtype), torch.tensor([0, 3, 2, 1, 3])
    ),
    "linear_cross_entropy_none": lambda x: nt.linear_cross_entropy(
        x,
        torch.linspace(-1, 1, 28).reshape(4, 7).to(x.dtype),
        torch.tensor([0, 3, 2, 1, 3]),
        reduction="none",
    ),
    # issue 24's options: the statistics ops (with and without the gradient formed in the forward).
    "cross_entropy_stats": lambda x: nt.cross_entropy(
        x, torch.tensor([0, 6, 3, -100, 2]), temperature=0.8, token_weight=_W[:5], return_stats=True
    )[0],
    "cross_entropy_soft_stats": lambda x: nt.cross_entropy(
        x, torch.softmax(_rand(5, 7, seed=4, grad=False), 1), token_weight=_W[:5], return_stats=True
    )[0],
    "linear_cross_entropy_stats": lambda x: nt.linear_cross_entropy(
        x,
        torch.linspace(-1, 1, 28).reshape(4, 7).to(x.dtype),
        torch.tensor([0, 3, 2, 1, 3]),
        temperature=1.5,
        token_weight=_W[:5],
        return_stats=True,
    )[0],
    "linear_cross_entropy_none_stats": lambda x: nt.linear_cross_entropy(
        x,
        torch.linspace(-1, 1, 28).reshape(4, 7).to(x.dtype),
        torch.tensor([0, 3, 2, 1, 3]),
        reduction="none",
        token_weight=_W[:5],
        return_stats=True,
    )[0],
}


def _forward_and_grads(fn, dtype):
    x = _rand(5, 7, dtype=dtype)
    y = fn(x)
    dy = _rand(*y.shape, dtype=dtype, seed=1, grad=False)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_direct_route_matches_dispatcher(name, dtype):
    direct = _forward_and_grads(CASES[name], dtype)
    with _Passthrough():
        dispatched = _forward_and_grads(CASES[name], dtype)
    for a, b in zip(direct, dispatched):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), name


def test_modules_with_parameters_skip_the_dispatcher(monkeypatch):
    """Patched norm modules and a linear cross-entropy of a Linear's weight: their Parameters do
    not send the call through the custom op, and the results are the custom op's to the bit."""

    def step():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.RMSNorm(7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 4))
        nt.patch(model)
        x = _rand(5, 7)
        h = model[1](model[0](x))
        loss = nt.linear_cross_entropy(h, model[2].weight, torch.tensor([0, 3, 2, 1, 3]))
        loss.backward()
        return [loss.detach(), x.grad] + [p.grad for p in model.parameters() if p.grad is not None]

    with _Passthrough():
        expect = step()

    def refuse(*args):
        raise AssertionError("the dispatcher was called in plain eager mode")

    for m in (_linear_cross_entropy, _norms):
        for o in vars(m).values():
            if isinstance(o, _op.Op):
                monkeypatch.setattr(o, "custom_op", refuse)
    got = step()
    assert len(got) == len(expect)
    for a, b in zip(got, expect):
        assert torch.equal(a, b)


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    """Forward and backward of every family in plain eager mode never call a custom op."""

    def refuse(*args):
        raise AssertionError("the dispatcher was called in plain eager mode")

    ops = [getattr(m, n) for m in (_softmax, _cross_entropy, _linear_cross_entropy, _norms) for n in dir(m)]
    for o in ops:
        if isinstance(o, _op.Op):
            monkeypatch.setattr(o, "custom_op", refuse)
    for name, fn in CASES.items():
        x = _rand(5, 7)
        fn(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        with torch.no_grad():
            fn(x.detach())


def test_route_choices():
    x = _rand(2, 3)
    assert _op.route((x, 1)) == _op.FUNCTION
    assert _op.route((x.detach(), 1)) == _op.KERNEL
    with torch.no_grad():
        assert _op.route((x, 1)) == _op.KERNEL
    with _Passthrough():
        assert _op.route((x, 1)) == _op.DISPATCHER
    with torch.device("cpu"):  # a torch function mode, as any `with torch.device(...)` block
        assert _op.route((x, 1)) == _op.DISPATCHER
    assert _op.route((torch.empty(2, device="meta"), 1)) == _op.DISPATCHER

    class Sub(torch.Tensor):
        pass

    assert _op.route((x.detach().as_subclass(Sub), 1)) == _op.DISPATCHER
    # A module's weights (Parameters) take the direct route, as plain tensors do.
    assert _op.route((x.detach(), 1, torch.nn.Parameter(x.detach()))) == _op.FUNCTION
    seen = []
    torch.func.grad(lambda a: (seen.append(_op.route((a, 1))), a.sum())[1])(x.detach())
    assert seen == [_op.DISPATCHER]


def _which(x: torch.Tensor) -> torch.Tensor:
    return "decorated"


def test_direct_route_picks_the_kernel_the_dispatcher_would():
    """A device's registered kernel, else the decorated implementation (torch runs that on every
    device without one): scale_grad, plain torch with no CUDA kernel, raised KeyError: 'cuda' on
    the direct route of a GPU linear cross-entropy's backward."""

    class OnCuda:
        is_cuda = True

    class OnCpu:
        is_cuda = False

    both = _op.Op("normax_test::kernel_choice_both", _which)
    both.register_kernel("cuda")(lambda x: "cuda")
    decorated_only = _op.Op("normax_test::kernel_choice_decorated", _which)
    assert both._kernel(OnCuda()) == "cuda" and both._kernel(OnCpu()) == "decorated"
    assert decorated_only._kernel(OnCuda()) == "decorated"
    assert decorated_only._kernel(OnCpu()) == "decorated"
    assert "cuda" not in _cross_entropy.scale_grad_op._kernels  # the case that failed on the GPU


def test_dispatcher_route_still_serves_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    y = nt.softmax(torch.empty(3, 4, device="meta"), 1)
    assert y.device.type == "meta" and y.shape == (3, 4)
    with FakeTensorMode():
        x = torch.empty(2, 5)
        assert nt.cross_entropy(x, torch.zeros(2, dtype=torch.long)).shape == ()
        assert nt.layer_norm(x, (5,)).shape == (2, 5)


def test_saved_output_modified_in_place_is_refused():
    """The direct route saves tensors as torch does: an in-place change before backward raises."""
    x = _rand(3, 4)
    y = nt.softmax(x, 1)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_retain_graph_and_second_backward_accumulate():
    x = _rand(4, 6)
    loss = nt.cross_entropy(x, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert torch.equal(x.grad, 2 * first)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "cross_entropy", "layer_norm", "rms_norm"])
def test_negative_bit_views_are_read_correctly(name):
    """A lazily negated view (torch._neg_view) cannot be read through .numpy(): the direct
    kernel calls leave it to the general path, which resolves it, for every family."""
    x = _rand(5, 7, grad=False)
    got = CASES[name](torch._neg_view(x))
    expected = CASES[name](-x)
    assert torch.equal(got, expected), name


def _twice_and_thrice(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2, x * 3


def test_the_direct_route_does_not_materialise_gradients():
    """A non-differentiable output's gradient reaches the backward as None (no zeros of its shape),
    and a backward with nothing flowing into its first output does not run (no gradient)."""
    split = _op.op("normax_test::twice_and_thrice")(_twice_and_thrice)
    split.register_fake(lambda x: (torch.empty_like(x), torch.empty_like(x)))
    seen = []

    def setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad, grad_thrice):
        seen.append(grad_thrice)
        return 2 * grad

    split.register_autograd(backward, setup_context=setup)
    x = _rand(3)
    twice, _ = split(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        twice.sum().backward()
    assert seen == [None] and torch.equal(x.grad, torch.full((3,), 2.0))
    assert not [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::zeros_like")]

    class NoGradient(torch.autograd.Function):  # passes nothing back to its input
        @staticmethod
        def forward(ctx, a):
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    x = _rand(3)
    NoGradient.apply(split(x)[0]).sum().backward()
    assert seen == [None] and x.grad is None


_THIN = {
    "softmax": lambda x: nt.softmax(x, -1),
    "log_softmax": lambda x: nt.log_softmax(x, 1),
    "cross_entropy": lambda x: nt.cross_entropy(x, torch.tensor([0, 6, 3, -100, 2])),
    "cross_entropy_weight_none": lambda x: nt.cross_entropy(
        x, torch.tensor([0, 6, 3, 1, 2]), _W.to(x.dtype), reduction="none", label_smoothing=0.1
    ),
    "layer_norm": lambda x: nt.layer_norm(x, (7,), _W.to(x.dtype), _W.flip(0).to(x.dtype), 1e-5),
    "layer_norm_no_params": lambda x: nt.layer_norm(x, (7,)),
    "rms_norm": lambda x: nt.rms_norm(x, (7,), _W.to(x.dtype), 1e-6),
    "rms_norm_2d_shape": lambda x: nt.rms_norm(x, (5, 7)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(_THIN))
def test_cpu_thin_path_skips_the_numpy_layer_and_matches_it(monkeypatch, name, dtype):
    """Contiguous float32/float64 tensors go straight to ``_core`` (normax/torch/_cpu.py), forward
    and backward, with the NumPy functions' results to the bit; other layouts still take the NumPy
    functions (a transposed view here)."""
    from normax import _cross_entropy as np_ce
    from normax import _norms as np_norms
    from normax import _softmax as np_softmax

    def through_numpy(x):
        base = x.detach().t().contiguous().requires_grad_()  # x's values, in a transposed layout
        y = _THIN[name](base.t())
        dy = _rand(*y.shape, dtype=dtype, seed=1, grad=False)
        (dx,) = torch.autograd.grad(y, base, dy)
        return y.detach(), dx.t()

    x = _rand(5, 7, dtype=dtype)
    expect = through_numpy(x)
    calls = []

    def count(f):
        return lambda *a, **k: (calls.append(f.__name__), f(*a, **k))[1]

    layers = [(np_softmax, n) for n in ("softmax", "log_softmax", "softmax_backward", "log_softmax_backward")]
    layers += [(np_norms, n) for n in ("layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward")]
    layers += [(np_ce, "checked_cross_entropy")]
    for module, n in layers:
        monkeypatch.setattr(module, n, count(getattr(module, n)))
    y = _THIN[name](x)
    dy = _rand(*y.shape, dtype=dtype, seed=1, grad=False)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert calls == []
    assert torch.equal(y, expect[0]) and torch.equal(dx, expect[1])
    through_numpy(x)
    assert calls, "a transposed input takes the NumPy functions"
