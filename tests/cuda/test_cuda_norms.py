"""rms_norm, layer_norm, crms_norm and their backwards on CUDA arrays, against the CPU functions,
with the kernels emulated (cuda_emulation.py): axes, saved statistics, out=, empty rows and the
torch ops' CUDA kernels."""

import normax
import numpy as np
import pytest
from cuda_emulation import close, cp, same_as_the_cpu_op, torch
from normax._backends import cuda

RNG = np.random.default_rng(7)
X = RNG.normal(scale=3.0, size=(3, 4, 50)).astype(np.float32)


@pytest.mark.parametrize("axis", [-1, (1, 2)])
def test_norms(cuda_kernels, axis):
    x = torch.from_numpy(X)
    shape = X.shape[-1:] if axis == -1 else X.shape[1:]
    w = RNG.uniform(0.5, 2.0, size=shape).astype(np.float32)
    b = RNG.normal(size=shape).astype(np.float32)
    dy = RNG.normal(size=X.shape).astype(np.float32)
    td = torch.from_numpy(dy)
    for name, params in (("rms_norm", (w,)), ("layer_norm", (w, b)), ("crms_norm", (w,))):
        fn, bwd = getattr(normax, name), getattr(normax, name + "_backward")
        tparams = tuple(torch.from_numpy(p) for p in params)
        got = fn(x, *tparams, axis=axis, return_stats=True)
        want = fn(X, *params, axis=axis, return_stats=True)
        assert len(got) == len(want)
        for g, wnt in zip(got, want):
            close(g, wnt, atol=1e-5)
        stats = {"mean": got[1], "rstd": got[2]} if name == "layer_norm" else {"rstd": got[1]}
        for kw in ({}, stats):
            got_b = bwd(td, x, *tparams, axis=axis, **kw)
            want_b = bwd(dy, X, *params, axis=axis)
            for g, wnt in zip(got_b, want_b):
                close(g, wnt, rtol=1e-4, atol=1e-4)


def test_out_empty_rows_and_parameter_gradients(cuda_kernels):
    from normax.torch import _norms as nt

    logits = torch.from_numpy(X)
    # out= of the norms is checked before anything is written.
    with pytest.raises(ValueError, match="out must have shape"):
        normax.rms_norm(logits, out=torch.zeros(4, 50, dtype=torch.float64))
    out = torch.empty_like(logits)
    assert normax.layer_norm(logits, out=out) is out
    close(out, normax.layer_norm(X), atol=1e-5)
    # Empty rows: NaN statistics, as on the CPU.
    y, mean, rstd = normax.layer_norm(torch.zeros(3, 0), return_stats=True)
    assert y.shape == (3, 0) and torch.isnan(mean).all() and torch.isnan(rstd).all()
    # Parameter gradients of the torch op are rounded once, to the parameters' dtype.
    xb = logits.to(torch.bfloat16)
    w = torch.rand(50) + 0.5
    dy = torch.randn(X.shape).to(torch.bfloat16)
    _, rstd = normax.rms_norm(xb.float(), w, eps=1e-6, return_stats=True)
    _, dw = nt._rms_norm_backward_cuda(dy, xb, 1, w, rstd, 1e-6)
    want = (dy.double() * xb.double() * rstd.double()[..., None]).sum((0, 1))
    assert dw.dtype == torch.float32
    close(dw, want.numpy(), rtol=1e-5, atol=1e-4)  # bf16 rounding would be ~4e-3 relative


def test_torch_ops_cuda_kernels_return_what_the_cpu_ops_do(cuda_kernels):
    from normax.torch import _norms as nt

    def float32_stats(op):
        # The CUDA kernels save float32 statistics (the ops' fakes say so for CUDA tensors).
        def run(*args):
            y, *stats = op(*args)
            return (y, *(s.float() for s in stats))

        run.__name__ = op.__name__
        return run

    ops = torch.ops.normax
    x = torch.from_numpy(X)
    xb = x.to(torch.bfloat16)
    w, b = torch.rand(50) + 0.5, torch.randn(50)
    dy = torch.randn(X.shape)
    cases = [
        (nt._layer_norm_cuda, float32_stats(ops.layer_norm), (x, 1, w, b, 1e-5)),
        (nt._rms_norm_cuda, float32_stats(ops.rms_norm), (xb, 1, w.to(torch.bfloat16), 1e-6)),
    ]
    _, mean, rstd = float32_stats(ops.layer_norm)(x, 1, w, b, 1e-5)
    cases.append((nt._layer_norm_backward_cuda, ops.layer_norm_backward, (dy, x, 1, w, b, mean, rstd, 1e-5)))
    _, rstd = float32_stats(ops.rms_norm)(x, 1, w, 1e-6)
    cases.append((nt._rms_norm_backward_cuda, ops.rms_norm_backward, (dy, x, 1, w, rstd, 1e-6)))
    cases.append((nt._rms_norm_backward_cuda, ops.rms_norm_backward, (dy, x, 1, None, rstd, 1e-6)))
    same_as_the_cpu_op(cases)


def test_cupy_branch(cupy_kernels):
    x = cp(X)
    w = RNG.uniform(0.5, 2.0, size=50).astype(np.float32)
    b = RNG.normal(size=50).astype(np.float32)
    y, mean, rstd = cuda.layer_norm(x, cp(w), cp(b), return_stats=True)
    want = normax.layer_norm(X, w, b, return_stats=True)
    for g, wnt in zip((y, mean, rstd), want):
        close(np.asarray(g), wnt, atol=1e-5)
    dy = RNG.normal(size=X.shape).astype(np.float32)
    got = cuda.layer_norm_backward(cp(dy), x, cp(w), cp(b), mean=mean, rstd=rstd)
    for g, wnt in zip(got, normax.layer_norm_backward(dy, X, w, b)):
        close(np.asarray(g), wnt, rtol=1e-4, atol=1e-4)


def _last(kernels, name):
    """The arguments (arrays as dtypes) of the last call of ``_core.<name>``."""
    return next(args for n, args in reversed(kernels.arguments) if n == name)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parameters_are_read_and_their_gradients_written_in_their_own_dtype(cuda_kernels, wdtype):
    from normax.torch import _norms as nt

    xb = torch.from_numpy(X).to(torch.bfloat16)
    w = (torch.rand(50) + 0.5).to(wdtype)
    b = torch.randn(50).to(wdtype)
    # The kernels take float32 or x's dtype; float16 parameters of bfloat16 rows become float32.
    read = wdtype if wdtype in (torch.float32, torch.bfloat16) else torch.float32
    y, mean, rstd = nt._layer_norm_cuda(xb, 1, w, b, 1e-5)
    assert _last(cuda_kernels, "cuda_norm_forward")[2] == (read, read)
    want = normax.layer_norm(xb.float().numpy(), w.float().numpy(), b.float().numpy(), eps=1e-5)
    close(y.float(), want, rtol=1e-2, atol=2e-2)  # bf16 rounding of y
    dy = torch.randn(X.shape).to(torch.bfloat16)
    dx, dw, db = nt._layer_norm_backward_cuda(dy, xb, 1, w, b, mean, rstd, 1e-5)
    # (options, inputs, saved, (dx, dparams, workspace), shape): the gradients in the parameters'
    # own dtype where the kernels write it, a float32 workspace.
    call = _last(cuda_kernels, "cuda_norm_backward")
    assert call[1][2] == read and call[3][1] == (read, read) and call[3][2] == torch.float32
    assert dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == wdtype
    xhat = (xb.double() - mean[..., None]) * rstd[..., None]
    close(dw.float(), (dy.double() * xhat).sum((0, 1)).numpy(), rtol=1e-2, atol=5e-2)
    close(db.float(), dy.double().sum((0, 1)).numpy(), rtol=1e-2, atol=5e-2)
    # The NumPy-first API returns them in x's dtype, written so by the kernel.
    got = cuda.layer_norm_backward(dy, xb, w, b, mean=mean.float(), rstd=rstd.float())
    assert _last(cuda_kernels, "cuda_norm_backward")[3][1] == (torch.bfloat16, torch.bfloat16)
    assert [g.dtype for g in got] == [torch.bfloat16] * 3


def test_without_parameters_no_workspace(cuda_kernels):
    def bwd():
        return _last(cuda_kernels, "cuda_norm_backward")

    x = torch.from_numpy(X)
    dy = torch.randn(X.shape)
    for name in ("rms_norm", "crms_norm"):
        dx, dw = getattr(cuda, name + "_backward")(dy, x)
        assert dw is None and bwd()[3][1] == (None, None) and bwd()[3][2] is None
        close(dx, getattr(normax, name + "_backward")(dy.numpy(), X)[0], rtol=1e-4, atol=1e-4)
    dx, dw, db = cuda.layer_norm_backward(dy, x, bias=torch.randn(50))
    assert dw is None and bwd()[3][1] == (None, torch.float32) and bwd()[3][2] == torch.float32
    close(db, dy.numpy().sum((0, 1)), rtol=1e-5, atol=1e-4)
    # No rows: zero gradients (the reduction of no partial rows), no workspace.
    dx, dw = cuda.rms_norm_backward(torch.zeros(0, 50), torch.zeros(0, 50), torch.ones(50))
    assert dx.shape == (0, 50) and (dw == 0).all() and bwd()[3][2] is None


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "crms_norm"])
def test_rows_whose_squares_leave_float32_are_normalized_scaled(cuda_kernels, name):
    """Rows of 1e30 (squares overflow float32) and 1e-30 (underflow, with eps below them), with
    ordinary rows, a row of zeros and one holding NaN in the same blocks: as float64 NumPy."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 64)) + 2.0
    x = (base * np.array([1.0, 1e30, 1e-30, 3e-39, 0.0, 1.0])[:, None]).astype(np.float32)
    x[5, 7] = np.nan
    w = rng.uniform(0.5, 2.0, size=64).astype(np.float32)
    fn, bwd = getattr(normax, name), getattr(normax, name + "_backward")
    for eps in (0.0, 1e-80):
        got = fn(torch.from_numpy(x), torch.from_numpy(w), eps=eps, return_stats=True)
        want = fn(x.astype(np.float64), w.astype(np.float64), eps=eps, return_stats=True)
        rows = slice(0, 4)  # the zero row: NaN (0 * inf) or 0 as float64; the NaN row: NaN
        most = np.finfo(np.float32).max  # a larger rstd is clamped (3e-39: 3.6e38 for layer_norm)
        for g, wnt in zip(got, want):
            assert np.isfinite(g.numpy()[rows]).all(), (name, eps, g)
            close(g[rows], np.clip(wnt[rows], -most, most), rtol=2e-5, atol=0)
        assert np.isnan(got[0].numpy()[5]).all()
        dy = rng.normal(size=x.shape).astype(np.float32)
        stats = {"mean": got[1], "rstd": got[2]} if name == "layer_norm" else {"rstd": got[1]}
        want_b = bwd(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), eps=eps)
        for kw in (stats, {}):  # from the saved statistics, and recomputed
            got_b = bwd(torch.from_numpy(dy), torch.from_numpy(x), torch.from_numpy(w), eps=eps, **kw)
            # Not the 3e-39 row: the float32 rstd it saves may be clamped (dx then from that).
            dx = got_b[0].numpy()[:3]
            assert np.isfinite(dx).all(), (name, eps, kw)
            close(dx, want_b[0][:3], rtol=1e-4, atol=0)
