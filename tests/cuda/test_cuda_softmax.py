"""softmax, log_softmax, logsumexp and their backwards on CUDA arrays, against the CPU functions,
with the kernels emulated (cuda_emulation.py): layouts, axes, out=, dtypes and streams."""

import normax
import numpy as np
import pytest
from cuda_emulation import STREAM, close, cp, same_as_the_cpu_op, torch
from normax._backends import cuda

RNG = np.random.default_rng(7)
X = RNG.normal(scale=3.0, size=(3, 4, 50)).astype(np.float32)


@pytest.mark.parametrize("axis", [-1, 0, 1, (0, 2), None])
def test_softmax_family(cuda_kernels, axis):
    x = torch.from_numpy(X)
    y = normax.softmax(x, axis=axis)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    close(y, normax.softmax(X, axis=axis))
    close(normax.log_softmax(x, axis=axis), normax.log_softmax(X, axis=axis), atol=2e-5)
    for keepdims in (False, True):
        got = normax.logsumexp(x, axis=axis, keepdims=keepdims)
        want = normax.logsumexp(X, axis=axis, keepdims=keepdims)
        assert tuple(got.shape) == np.shape(want)
        close(got, want)
    if axis is not None and not isinstance(axis, tuple):
        y64 = normax.softmax(X, axis=axis)
        dy = RNG.normal(size=X.shape).astype(np.float32)
        got = normax.softmax_backward(torch.from_numpy(y64), torch.from_numpy(dy), axis=axis)
        close(got, normax.softmax_backward(y64, dy, axis=axis), atol=1e-5)
        ly = normax.log_softmax(X, axis=axis)
        got = normax.log_softmax_backward(torch.from_numpy(ly), torch.from_numpy(dy), axis=axis)
        close(got, normax.log_softmax_backward(ly, dy, axis=axis), atol=1e-5)
    # The kernels ran on the caller's stream.
    assert cuda_kernels.calls and all(stream == STREAM for _, _, stream in cuda_kernels.calls)


def test_out_and_dtypes(cuda_kernels):
    x = torch.from_numpy(X)
    out = torch.empty_like(x)
    assert normax.softmax(x, out=out) is out
    close(out, normax.softmax(X))
    with pytest.raises(ValueError, match="out must have shape"):
        normax.softmax(x, out=torch.empty(3))
    yb = normax.softmax(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    close(yb.float(), normax.softmax(X), rtol=1e-2, atol=1e-2)
    with pytest.raises(TypeError, match="float64.*float32, float16 and bfloat16"):
        normax.softmax(x.double())
    with pytest.raises(
        NotImplementedError, match=r"^no CUDA kernel for normax.logsumexp with b= \(weights\) \(CUDA arrays\)"
    ):
        normax.logsumexp(x, b=2.0)


def test_torch_ops_cuda_kernels_return_what_the_cpu_ops_do(cuda_kernels):
    """Each op's CUDA kernel (called directly: no CUDA tensors here) returns the CPU op's
    dtypes and shapes, which are what the op's fake promises, and its values."""
    from normax.torch import _softmax as nt

    ops = torch.ops.normax
    x = torch.from_numpy(X)
    xb = x.to(torch.bfloat16)
    dy = torch.randn(X.shape)
    cases = [
        (nt._softmax_cuda, ops.softmax, (x, 1)),
        (nt._log_softmax_cuda, ops.log_softmax, (xb, 2)),
        (nt._softmax_backward_cuda, ops.softmax_backward, (torch.softmax(x, 0), dy, 0)),
        (nt._log_softmax_backward_cuda, ops.log_softmax_backward, (torch.log_softmax(x, 2), dy, 2)),
        (nt._logsumexp_cuda, ops.logsumexp, (x, [0, 2], True)),
        (nt._logsumexp_cuda, ops.logsumexp, (x, [1], False)),
    ]
    same_as_the_cpu_op(cases)


def test_cupy_branch(cupy_kernels):
    x = cp(X)
    for axis in (-1, 0, (0, 2)):
        y = cuda.softmax(x, axis=axis)
        assert isinstance(y, type(x))
        close(np.asarray(y), normax.softmax(X, axis=axis))
    out = cp(np.empty_like(X))
    assert cuda.log_softmax(x, axis=1, out=out) is out
    close(np.asarray(out), normax.log_softmax(X, axis=1), atol=2e-5)
    close(np.asarray(cuda.logsumexp(x, axis=2, keepdims=True)), normax.logsumexp(X, axis=2, keepdims=True))
