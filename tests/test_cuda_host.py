"""The host side of the CUDA path for PowerNorm and the linear cross-entropy, on a machine without
a GPU: CPU torch tensors stand in for CUDA ones and the `_core.cuda_*` kernels are replaced by
NumPy versions of their contracts (written from the CPU equations, not from the CUDA code). What
is checked is everything around the kernels: PowerNorm's state bookkeeping (warmup, running
statistics, ema_gz, padding, groups, evaluation), the saved record, and the linear
cross-entropy's row blocks, mean denominator, gradient scales and dweight/dbias accumulation,
all against the CPU functions. The kernels themselves are checked on a GPU by
benches/gpu_check_extra.py.

Tolerances: the stand-in kernels compute in float64 and round to float32 once, the CPU path in
float32 with float64 column sums, so results agree to a few float32 roundings of the values'
magnitude: rtol 1e-5 (~80 u), atol 1e-6 for values of order 1.
"""

import contextlib

import normax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from normax import _core, _cuda


def _np(t):
    return t.numpy()


def fake_power_forward(x, tokens, c, groups, eps, pad, sumsq, scale, shift, y):
    cg = c // groups
    xs = _np(x).astype(np.float64).reshape(tokens, groups, cg)
    s = 1.0 / np.sqrt((xs * xs).mean(-1, keepdims=True) + eps)
    u = (xs * s).reshape(tokens, c)
    if sumsq is not None:
        keep = np.ones(tokens, bool) if pad is None else _np(pad) == 0
        _np(sumsq)[...] = (u[keep] ** 2).sum(0)
    if y is not None:
        _np(y)[...] = (u * _np(scale) + _np(shift)).reshape(_np(y).shape)


def fake_power_backward(dy, x, tokens, c, groups, eps, weight, zscale, ema, dscale, dx, sums):
    cg = c // groups
    xs = _np(x).astype(np.float64).reshape(tokens, groups, cg)
    s = 1.0 / np.sqrt((xs * xs).mean(-1, keepdims=True) + eps)
    u = (xs * s).reshape(tokens, c)
    d = _np(dy).astype(np.float64).reshape(tokens, c)
    z = u * _np(zscale)
    g = d * (_np(weight) if weight is not None else 1.0)
    gh = g - _np(ema) * z
    du = gh * _np(dscale)
    mean_du_u = (du * u).reshape(tokens, groups, cg).mean(-1, keepdims=True)
    out = s * (du.reshape(tokens, groups, cg) - u.reshape(tokens, groups, cg) * mean_du_u)
    _np(dx)[...] = out.reshape(_np(dx).shape)
    _np(sums)[...] = np.concatenate([(gh * z).sum(0), (d * z).sum(0), d.sum(0)])


def fake_cross_entropy(logits, tk, w, loss_rows, grad, scale, stride, rows, cols, ignore, eps, z, cap):
    assert w is None
    x = _np(logits).astype(np.float64).copy()  # grad may be the logits themselves
    t = _np(tk)
    kw = {
        "ignore_index": ignore,
        "reduction": "none",
        "label_smoothing": eps,
        "z_loss": z,
        "softcap": cap or None,
    }
    _np(loss_rows)[...] = normax.cross_entropy(x, t, **kw)
    if grad is not None:
        sc = _np(scale).astype(np.float64)
        g_rows = sc[:rows] if stride else np.full(rows, sc[0])
        _, g = normax.cross_entropy_with_grad(x, t, grad_output=g_rows, **kw)
        _np(grad)[...] = g


FAKES = {
    "cuda_power_norm_forward": fake_power_forward,
    "cuda_power_norm_backward": fake_power_backward,
    "cuda_cross_entropy": fake_cross_entropy,
}


@pytest.fixture
def host_cuda(monkeypatch):
    """CPU torch tensors treated as CUDA arrays; kernel calls go to FAKES (and are counted)."""
    calls = []

    def lib_of(args, fname):
        lib = object.__new__(_cuda._Lib)
        lib.name, lib.fname, lib.mod = "torch", fname, torch
        lib.device, lib.index, lib.stream = torch.device("cpu"), 0, 0
        return lib

    def run(lib, kernel, *args):
        name = kernel.__name__
        calls.append(name)
        FAKES[name](*args)

    monkeypatch.setattr(_cuda, "is_cuda_array", lambda a: isinstance(a, torch.Tensor))
    monkeypatch.setattr(_cuda, "_lib_of", lib_of)
    monkeypatch.setattr(_cuda._Lib, "_index_of", lambda self, a: 0)
    monkeypatch.setattr(_cuda._Lib, "capturing", lambda self: False)
    monkeypatch.setattr(_cuda, "_current", lambda lib: contextlib.nullcontext())
    monkeypatch.setattr(_cuda, "_run", run)
    return calls


def close(a, b, rtol=1e-5, atol=1e-6):
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    np.testing.assert_allclose(a, np.asarray(b), rtol=rtol, atol=atol)


def test_fakes_name_real_kernels():
    for name in FAKES:
        assert hasattr(_core, name), name


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_pad", [False, True])
def test_power_norm_matches_the_cpu_through_warmup_and_evaluation(host_cuda, groups, with_pad):
    rng = np.random.default_rng(groups + 2 * with_pad)
    t, b, c = 5, 3, 8
    settings = {"warmup_iters": 2, "group_num": groups, "alpha_fwd": 0.8, "alpha_bkw": 0.7}
    cpu, gpu = normax.PowerNormState(c, **settings), normax.PowerNormState(c, **settings)
    weight = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    pad = rng.random((b, t)) < 0.3 if with_pad else None
    # Iterations 1-2: batch statistics (1 also averages running_phi); 3-4: running_phi.
    for step in range(4):
        x = (rng.normal(size=(t, b, c)) * (1 + step)).astype(np.float32)
        dy = rng.normal(size=(t, b, c)).astype(np.float32)
        y0, s0 = normax.power_norm(x, weight, bias, cpu, pad_mask=pad, return_saved=True)
        y1, s1 = _cuda.power_norm(
            torch.from_numpy(x),
            torch.from_numpy(weight),
            torch.from_numpy(bias),
            gpu,
            pad_mask=None if pad is None else torch.from_numpy(pad),
            return_saved=True,
        )
        assert isinstance(y1, torch.Tensor) and y1.shape == x.shape and y1.dtype == torch.float32
        close(y1, y0)
        assert gpu.iters == cpu.iters == step + 1
        close(gpu.running_phi, cpu.running_phi, rtol=1e-6, atol=0)
        close(s1.zscale, s0.zscale, rtol=1e-6, atol=0)
        close(s1.dscale, s0.dscale, rtol=1e-6, atol=0)
        dx0, dw0, db0 = normax.power_norm_backward(dy, s0, cpu)
        dx1, dw1, db1 = _cuda.power_norm_backward(torch.from_numpy(dy), s1, gpu)
        close(dx1, dx0, atol=1e-5)
        close(dw1, dw0, atol=1e-5)
        close(db1, db0, atol=1e-5)
        close(gpu.ema_gz, cpu.ema_gz, atol=1e-7)
        assert np.abs(cpu.ema_gz).max() > 0  # the check above can fail
    # One pass (statistics with the output) after warmup, two during it.
    assert host_cuda.count("cuda_power_norm_forward") == 2 + 2 + 1 + 1
    # Evaluation: running statistics, no state change, the exact gradient.
    x = rng.normal(size=(t, b, c)).astype(np.float32)
    phi = gpu.running_phi.copy()
    y0, s0 = normax.power_norm(x, weight, None, cpu, training=False, return_saved=True)
    y1, s1 = _cuda.power_norm(
        torch.from_numpy(x), torch.from_numpy(weight), None, gpu, training=False, return_saved=True
    )
    close(y1, y0)
    assert gpu.iters == 4 and np.array_equal(gpu.running_phi, phi)
    ema = gpu.ema_gz.copy()
    dx0, dw0, db0 = normax.power_norm_backward(x, s0, cpu)
    dx1, dw1, db1 = _cuda.power_norm_backward(torch.from_numpy(x), s1, gpu)
    close(dx1, dx0, atol=1e-5)
    close(dw1, dw0, atol=1e-5)
    assert db0 is None and db1 is None
    assert np.array_equal(gpu.ema_gz, ema)


def test_power_norm_arguments_are_checked_before_the_kernels(host_cuda):
    state = normax.PowerNormState(4)
    x = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="state: expected a normax.PowerNormState"):
        _cuda.power_norm(x, None, None, None)
    with pytest.raises(ValueError, match=r"x: shape \(3, 5\) is not"):
        _cuda.power_norm(torch.zeros(3, 5), None, None, state)
    with pytest.raises(ValueError, match="weight: shape"):
        _cuda.power_norm(x, torch.ones(3), None, state)
    with pytest.raises(TypeError, match="pad_mask: expected a boolean array"):
        _cuda.power_norm(x, None, None, state, pad_mask=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="pad_mask: shape"):
        _cuda.power_norm(
            torch.zeros(2, 3, 4), None, None, state, pad_mask=torch.zeros(2, 3, dtype=torch.bool)
        )
    with pytest.raises(TypeError, match="x has dtype float64"):
        _cuda.power_norm(x.double(), None, None, state)
    assert host_cuda == [] and state.iters == 0
    _, saved = _cuda.power_norm(x + 1, None, None, state, return_saved=True)
    with pytest.raises(ValueError, match="dy: shape"):
        _cuda.power_norm_backward(torch.zeros(3, 5), saved, state)
    with pytest.raises(ValueError, match="saved comes from a forward on the CPU"):
        _cuda.power_norm_backward(
            x, normax.power_norm(np.ones((3, 4)), None, None, state, return_saved=True)[1], state
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 3 * 11, 1])
def test_linear_cross_entropy_matches_the_cpu_in_blocks(host_cuda, reduction, chunk_size):
    rng = np.random.default_rng(7)
    n, h, v = 10, 6, 11
    hidden = rng.normal(size=(n, h)).astype(np.float32)
    weight = rng.normal(size=(v, h)).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    target = rng.integers(0, v, n)
    target[[2, 7]] = -100  # ignored rows: out of the mean's denominator, in every block
    go = rng.uniform(0.5, 2.0, n).astype(np.float32) if reduction == "none" else 1.5
    kw = {
        "reduction": reduction,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 20.0,
        "chunk_size": chunk_size,
    }
    want = normax.linear_cross_entropy_with_grad(hidden, weight, target, bias=bias, grad_output=go, **kw)
    got = _cuda.linear_cross_entropy_with_grad(
        torch.from_numpy(hidden),
        torch.from_numpy(weight),
        torch.from_numpy(target),
        bias=torch.from_numpy(bias),
        grad_output=torch.from_numpy(go) if reduction == "none" else go,
        **kw,
    )
    for a, b in zip(got, want):
        assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and tuple(a.shape) == np.shape(b)
        close(a, b)
    blocks = {None: 1, 33: 4, 1: 10}[chunk_size]
    assert host_cuda.count("cuda_cross_entropy") == blocks
    loss = _cuda.linear_cross_entropy(
        torch.from_numpy(hidden),
        torch.from_numpy(weight),
        torch.from_numpy(target),
        bias=torch.from_numpy(bias),
        **kw,
    )
    close(loss, want[0])


def test_linear_cross_entropy_checks_and_edge_cases(host_cuda):
    h, w = torch.zeros(2, 3), torch.zeros(4, 3)
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="weight: expected shape"):
        _cuda.linear_cross_entropy(h, torch.zeros(4, 2), t)
    with pytest.raises(TypeError, match="target: expected integer class indices"):
        _cuda.linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="chunk_size: must be at least 1"):
        _cuda.linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(IndexError, match="class index 4 at position 1"):
        _cuda.linear_cross_entropy(h, w, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="grad_output: must be a number"):
        _cuda.linear_cross_entropy_with_grad(h, w, t, grad_output=torch.ones(2))
    assert host_cuda == []
    # No rows: a zero dweight (and dbias), an empty dhidden.
    loss, dh, dw, db = _cuda.linear_cross_entropy_with_grad(
        torch.zeros(0, 3), w, torch.zeros(0, dtype=torch.int64), bias=torch.zeros(4), reduction="sum"
    )
    assert float(loss) == 0.0 and dh.shape == (0, 3)
    assert torch.equal(dw, torch.zeros(4, 3)) and torch.equal(db, torch.zeros(4))


def _same(got, want, atol=1e-5):
    """Tensors of the same shape, dtype and (within float32 roundings) values; lists pairwise."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_allclose(g.double().numpy(), w.double().numpy(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("training", [True, False])
def test_torch_cuda_kernels_return_what_the_cpu_kernels_do(host_cuda, training):
    # The ops' CPU kernels return what their fakes describe; the CUDA kernels must match them.
    nt = pytest.importorskip("normax.torch")
    rng = torch.Generator().manual_seed(3)
    t, b, c = 6, 3, 8
    x = torch.randn(t, b, c, generator=rng)
    weight, bias = torch.rand(c, generator=rng) + 0.5, torch.randn(c, generator=rng)
    running_phi = torch.rand(1, c, 1, 1, generator=rng) + 0.5
    ema = torch.randn(1, c, 1, 1, generator=rng) * 0.1
    pad = torch.rand(b, t, generator=rng) < 0.3
    for iters in (0, 5):  # during and after warmup
        it = torch.tensor([iters])
        args = (x, weight, bias, running_phi, ema, it, pad, training, 1e-5, 0.9, 0.8, 2, 2)
        got, want = nt._power_norm_cuda(*args), nt._power_norm_op(*args)
        _same(got, want)
        dy = torch.randn(t, b, c, generator=rng)
        bargs = (dy, x, weight, want[1], want[2], ema, training, 1e-5, 0.8, 2)
        _same(nt._power_norm_backward_cuda(*bargs), nt._power_norm_backward_op(*bargs))
    assert "cuda_power_norm_backward" in host_cuda


@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_cuda_linear_kernels_return_what_the_cpu_kernels_do(host_cuda, with_bias):
    nt = pytest.importorskip("normax.torch")
    rng = torch.Generator().manual_seed(4)
    h, w = torch.randn(9, 5, generator=rng), torch.randn(13, 5, generator=rng)
    bias = torch.randn(13, generator=rng) if with_bias else None
    t = torch.randint(0, 13, (9,), generator=rng)
    t[3] = -100
    for reduction, go in (("mean", None), ("sum", None), ("none", torch.rand(9, generator=rng))):
        opts = (-100, reduction, 0.1, 1e-3, None, 26)
        _same([nt._linear_ce_cuda(h, w, t, bias, *opts)], [nt._linear_ce_op(h, w, t, bias, *opts)])
        got = nt._linear_ce_with_grad_cuda(h, w, t, bias, *opts, go)
        _same(got, nt._linear_ce_with_grad_op(h, w, t, bias, *opts, go))
    assert host_cuda.count("cuda_cross_entropy") > 3  # several blocks (26 elements: 2 rows)
