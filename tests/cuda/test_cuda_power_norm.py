"""PowerNorm on CUDA arrays, against the CPU functions, with the kernels emulated
(cuda_emulation.py): the state's bookkeeping (warmup, running statistics, ema_gz, padding,
groups, evaluation), the saved record, the checks before any kernel, and the torch ops' CUDA
kernels.

Tolerances: the emulated kernels compute in float64 and round to float32 once, the CPU path in
float32 with float64 channel sums: rtol 1e-5 (~80 u), atol 1e-6 for values of order 1.
"""

import normax
import numpy as np
import pytest
from cuda_emulation import same_tensors, torch
from normax._backends import cuda


def close(a, b, rtol=1e-5, atol=1e-6):
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    np.testing.assert_allclose(a, np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_pad", [False, True])
def test_power_norm_matches_the_cpu_through_warmup_and_evaluation(cuda_kernels, groups, with_pad):
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
        y1, s1 = cuda.power_norm(
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
        dx1, dw1, db1 = cuda.power_norm_backward(torch.from_numpy(dy), s1, gpu)
        close(dx1, dx0, atol=1e-5)
        close(dw1, dw0, atol=1e-5)
        close(db1, db0, atol=1e-5)
        close(gpu.ema_gz, cpu.ema_gz, atol=1e-7)
        assert np.abs(cpu.ema_gz).max() > 0  # the check above can fail
    # One pass (statistics with the output) after warmup, two during it.
    assert cuda_kernels.names().count("cuda_power_norm_forward") == 2 + 2 + 1 + 1
    # Evaluation: running statistics, no state change, the exact gradient.
    x = rng.normal(size=(t, b, c)).astype(np.float32)
    phi = gpu.running_phi.copy()
    y0, s0 = normax.power_norm(x, weight, None, cpu, training=False, return_saved=True)
    y1, s1 = cuda.power_norm(
        torch.from_numpy(x), torch.from_numpy(weight), None, gpu, training=False, return_saved=True
    )
    close(y1, y0)
    assert gpu.iters == 4 and np.array_equal(gpu.running_phi, phi)
    ema = gpu.ema_gz.copy()
    dx0, dw0, db0 = normax.power_norm_backward(x, s0, cpu)
    dx1, dw1, db1 = cuda.power_norm_backward(torch.from_numpy(x), s1, gpu)
    close(dx1, dx0, atol=1e-5)
    close(dw1, dw0, atol=1e-5)
    assert db0 is None and db1 is None
    assert np.array_equal(gpu.ema_gz, ema)


def test_power_norm_arguments_are_checked_before_the_kernels(cuda_kernels):
    state = normax.PowerNormState(4)
    x = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="state: expected a normax.PowerNormState"):
        cuda.power_norm(x, None, None, None)
    with pytest.raises(ValueError, match=r"x: shape \(3, 5\) is not"):
        cuda.power_norm(torch.zeros(3, 5), None, None, state)
    with pytest.raises(ValueError, match="weight: shape"):
        cuda.power_norm(x, torch.ones(3), None, state)
    with pytest.raises(TypeError, match="pad_mask: expected a boolean array"):
        cuda.power_norm(x, None, None, state, pad_mask=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="pad_mask: shape"):
        cuda.power_norm(torch.zeros(2, 3, 4), None, None, state, pad_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="x has dtype float64"):
        cuda.power_norm(x.double(), None, None, state)
    assert cuda_kernels.calls == [] and state.iters == 0
    _, saved = cuda.power_norm(x + 1, None, None, state, return_saved=True)
    with pytest.raises(ValueError, match="dy: shape"):
        cuda.power_norm_backward(torch.zeros(3, 5), saved, state)
    with pytest.raises(ValueError, match="saved comes from a forward on the CPU"):
        cuda.power_norm_backward(
            x, normax.power_norm(np.ones((3, 4)), None, None, state, return_saved=True)[1], state
        )


@pytest.mark.parametrize("training", [True, False])
def test_torch_cuda_kernels_return_what_the_cpu_kernels_do(cuda_kernels, training):
    # The ops' CPU kernels return what their fakes describe; the CUDA kernels must match them.
    from normax.torch import _power_norm as nt

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
        same_tensors(got, want)
        dy = torch.randn(t, b, c, generator=rng)
        bargs = (dy, x, weight, want[1], want[2], ema, training, 1e-5, 0.8, 2)
        same_tensors(nt._power_norm_backward_cuda(*bargs), nt._power_norm_backward_op(*bargs))
    assert "cuda_power_norm_backward" in cuda_kernels.names()
