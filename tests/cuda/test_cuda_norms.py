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

    ops = torch.ops.normax
    x = torch.from_numpy(X)
    xb = x.to(torch.bfloat16)
    w, b = torch.rand(50) + 0.5, torch.randn(50)
    dy = torch.randn(X.shape)
    cases = [
        (nt._layer_norm_cuda, ops.layer_norm, (x, 1, w, b, 1e-5)),
        (nt._rms_norm_cuda, ops.rms_norm, (xb, 1, w.to(torch.bfloat16), 1e-6)),
    ]
    _, mean, rstd = ops.layer_norm(x, 1, w, b, 1e-5)
    cases.append((nt._layer_norm_backward_cuda, ops.layer_norm_backward, (dy, x, 1, w, b, mean, rstd, 1e-5)))
    _, rstd = ops.rms_norm(x, 1, w, 1e-6)
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
