"""StableMax and the Softmax-Collapse forms on CUDA arrays, with the kernels emulated
(cuda_emulation.py): stablemax / log_stablemax / their backwards and
cross_entropy(normalizer="stablemax") against the CPU functions, and the cross-entropy of a
collapsed row (the kernels' contract: lse - x_y = log1p(oth), 1 - p_y = oth / (1 + oth)).
The kernels themselves compile in rust/normax-cuda/tests/compile.rs and run in the gpu tests."""

import normax
import numpy as np
import pytest
from cuda_emulation import STREAM, close, torch

RNG = np.random.default_rng(11)
X = RNG.normal(scale=3.0, size=(3, 4, 50)).astype(np.float32)


@pytest.mark.parametrize("axis", [-1, 0, (0, 2)])
def test_stablemax_family(cuda_kernels, axis):
    x = torch.from_numpy(X)
    y = normax.stablemax(x, axis=axis)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    close(y, normax.stablemax(X, axis=axis))
    close(normax.log_stablemax(x, axis=axis), normax.log_stablemax(X, axis=axis), atol=2e-5)
    out = torch.empty_like(x)
    assert normax.stablemax(x, axis=axis, out=out) is out
    close(out, normax.stablemax(X, axis=axis))
    if not isinstance(axis, tuple):
        dy = RNG.normal(size=X.shape).astype(np.float32)
        for fwd, bwd in (
            (normax.stablemax, normax.stablemax_backward),
            (normax.log_stablemax, normax.log_stablemax_backward),
        ):
            y64 = fwd(X, axis=axis)
            got = bwd(torch.from_numpy(y64), torch.from_numpy(dy), x, axis=axis)
            close(got, bwd(y64, dy, X, axis=axis), atol=1e-5)
    assert "cuda_stablemax" in cuda_kernels.names()
    assert all(stream == STREAM for _, _, stream in cuda_kernels.calls)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 5.0}])
def test_cross_entropy_stablemax(cuda_kernels, kw):
    logits = X.reshape(12, 50)
    target = RNG.integers(0, 50, size=12)
    args = (torch.from_numpy(logits), torch.from_numpy(target))
    close(
        normax.cross_entropy(*args, normalizer="stablemax", **kw),
        normax.cross_entropy(logits, target, normalizer="stablemax", **kw),
    )
    loss, grad = normax.cross_entropy_with_grad(*args, normalizer="stablemax", **kw)
    want_loss, want_grad = normax.cross_entropy_with_grad(logits, target, normalizer="stablemax", **kw)
    close(loss, want_loss)
    close(grad, want_grad, atol=1e-6)
    assert grad.dtype == torch.float32
    with pytest.raises(ValueError, match="normalizer"):
        normax.cross_entropy(*args, normalizer="nope")


@pytest.mark.parametrize("margin", [20.0, 40.0, 80.0])
def test_cross_entropy_does_not_collapse(cuda_kernels, margin):
    logits = RNG.uniform(-2.0, 0.0, size=(4, 33)).astype(np.float32)
    target = np.array([3, 0, 32, 7])
    logits[np.arange(4), target] = margin
    args = (torch.from_numpy(logits), torch.from_numpy(target))
    loss, grad = normax.cross_entropy_with_grad(*args, reduction="sum")
    want_loss, want_grad = normax.cross_entropy_with_grad(logits, target, reduction="sum")
    assert float(loss) > 0.0
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    got_t = grad.numpy()[np.arange(4), target]
    want_t = want_grad[np.arange(4), target]
    assert (got_t < 0).all()
    np.testing.assert_allclose(got_t, want_t, rtol=1e-5)
