"""Every CUDA op on a real GPU against torch CUDA: forward and gradient, float32 / bfloat16 / float16.

Run on a GPU machine with ``pytest -m gpu tests/cuda`` (benches/gpu/run.sh does); deselected
elsewhere, and an error without a CUDA device (tests/conftest.py). The reference is torch on the
same values in float32. Errors are measured relative to max(1, the reference's largest magnitude):
the kernels sum in another order than torch, and 16-bit outputs are rounded once more.
"""

from __future__ import annotations

import math

import normax
import normax.torch as nt
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_close_to_scale

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
DTYPES = ["float32", "bfloat16", "float16"]
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
SHAPES = [(7, 33), (64, 1000), (128, 4096), (3, 200_000), (2, 5, 16)]


def inputs(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEV) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax, logsumexp


@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_family_forward(dtype, shape, dim):
    x = inputs(shape, getattr(torch, dtype))
    ref = x.float()
    tol = TOL[dtype]
    assert_close_to_scale(normax.softmax(x, axis=dim), torch.softmax(ref, dim), tol)
    assert_close_to_scale(normax.log_softmax(x, axis=dim), torch.log_softmax(ref, dim), tol)
    assert_close_to_scale(normax.logsumexp(x, axis=dim), torch.logsumexp(ref, dim), tol)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_family_grad(dtype, shape, dim, fn):
    x = inputs(shape, getattr(torch, dtype))
    a = x.clone().requires_grad_()
    b = x.float().clone().requires_grad_()
    gy = inputs(shape, x.dtype, 1.0, seed=1)
    getattr(nt, fn)(a, dim).backward(gy)
    getattr(torch, fn)(b, dim).backward(gy.float())
    assert_close_to_scale(a.grad, b.grad, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_special_values_match_the_cpu(dtype):
    special = torch.tensor(
        [
            [0.0, -math.inf, 1.0],
            [-math.inf, -math.inf, -math.inf],
            [math.nan, 0.0, 1.0],
            [math.inf, 0.0, 1.0],
        ],
        device=DEV,
    ).to(getattr(torch, dtype))
    cpu = normax.softmax(special.float().cpu().numpy())
    assert_close_to_scale(normax.softmax(special), cpu, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_runs_on_the_callers_stream(dtype):
    # Work queued on a side stream is ordered with it.
    side = torch.cuda.Stream()
    x = inputs((512, 4096), getattr(torch, dtype))
    side.wait_stream(torch.cuda.current_stream())  # x is written on the default stream
    with torch.cuda.stream(side):
        y = normax.softmax(x * 2)
    side.synchronize()
    assert_close_to_scale(y, torch.softmax((x * 2).float(), -1), TOL[dtype])


# ---------------------------------------------------------------------------------------------
# cross-entropy

CE_SHAPES = [(64, 1000), (8, 128256), (1024, 4096)]
CE_CASES = {
    "plain": {},
    "weight+smoothing": {"label_smoothing": 0.1},  # + a class weight, made on the device
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "probs": {"label_smoothing": 0.05},  # probability targets
}


def ce_inputs(n, c, dtype):
    """(logits, class targets with every 7th ignored)."""
    t = torch.randint(0, c, (n,), device=DEV)
    t[::7] = -100
    return inputs((n, c), dtype), t


@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_loss_and_grad(dtype, shape, case):
    n, c = shape
    x, t = ce_inputs(n, c, getattr(torch, dtype))
    kw = dict(CE_CASES[case])
    if case == "weight+smoothing":
        kw["weight"] = torch.rand(c, device=DEV) + 0.5
    target = t
    if case == "probs":
        target = torch.softmax(inputs((n, c), torch.float32, seed=2), -1).to(x.dtype)
    tol = TOL[dtype] * 4
    a = x.clone().requires_grad_()
    b = x.float().clone().requires_grad_()
    la = nt.cross_entropy(a, target, **kw)
    lb = F.cross_entropy(b, target if target.dtype == torch.int64 else target.float(), **kw)
    assert_close_to_scale(la, lb, tol)
    (la.sum() if la.ndim else la).backward()
    (lb.sum() if lb.ndim else lb).backward()
    assert_close_to_scale(a.grad, b.grad, tol)


@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_z_loss_and_softcap(dtype, shape):
    # Against the same formulas in torch ops.
    n, c = shape
    x, t = ce_inputs(n, c, getattr(torch, dtype))
    z, cap = 1e-3, 30.0
    b = x.float().clone().requires_grad_()
    capped = cap * torch.tanh(b / cap)
    lse = torch.logsumexp(capped, -1)
    keep = t != -100
    ref = (F.cross_entropy(capped, t, reduction="none") + z * lse**2 * keep).sum() / keep.sum()
    a = x.clone().requires_grad_()
    la = nt.cross_entropy(a, t, z_loss=z, softcap=cap)
    ref.backward()
    la.backward()
    tol = TOL[dtype] * 4
    assert_close_to_scale(la, ref, tol)
    assert_close_to_scale(a.grad, b.grad, tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_bad_index_raises_index_error(dtype):
    with pytest.raises(IndexError):
        normax.cross_entropy(inputs((4, 10), getattr(torch, dtype)), torch.tensor([0, 1, 12, 3], device=DEV))


# ---------------------------------------------------------------------------------------------
# norms


def _rms_norm(ops, a, params, n):
    return ops.rms_norm(a, (n,), params[0], eps=1e-6)


def _layer_norm(ops, a, params, n):
    return ops.layer_norm(a, (n,), params[0], params[1])


NORM_SHAPES = [(64, 1000), (256, 4096), (4, 3, 768)]


@pytest.mark.parametrize("norm", [_rms_norm, _layer_norm], ids=["rms_norm", "layer_norm"])
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_forward_and_grads(dtype, shape, norm):
    tol = TOL[dtype] * 4
    n = shape[-1]
    x = inputs(shape, getattr(torch, dtype))
    w = (torch.rand(n, device=DEV) + 0.5).to(x.dtype)
    bias = torch.randn(n, device=DEV).to(x.dtype)
    params = [w] if norm is _rms_norm else [w, bias]
    gy = inputs(shape, x.dtype, 1.0, seed=3)
    a = x.clone().requires_grad_()
    pa = [p.clone().requires_grad_() for p in params]
    b = x.float().clone().requires_grad_()
    pb = [p.float().clone().requires_grad_() for p in params]
    ya, yb = norm(nt, a, pa, n), norm(F, b, pb, n)
    assert_close_to_scale(ya, yb, tol)
    ya.backward(gy)
    yb.backward(gy.float())
    assert_close_to_scale(a.grad, b.grad, tol)
    for p, q in zip(pa, pb):
        # Column sums over many rows: compared relative to their magnitude.
        assert_close_to_scale(p.grad, q.grad, tol * 10)


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_crms_norm_matches_the_cpu(dtype, shape):
    xs = inputs(shape, getattr(torch, dtype))
    assert_close_to_scale(normax.crms_norm(xs), normax.crms_norm(xs.float().cpu().numpy()), TOL[dtype] * 4)


# ---------------------------------------------------------------------------------------------
# other array libraries, errors


def test_softmax_of_a_cupy_array_is_a_cupy_array():
    cupy = pytest.importorskip("cupy")
    x = cupy.random.standard_normal((256, 1000), dtype=cupy.float32)
    y = normax.softmax(x)
    assert isinstance(y, cupy.ndarray), type(y)
    assert_close_to_scale(torch.from_dlpack(y), torch.softmax(torch.from_dlpack(x), -1), 2e-5)


def test_float64_cuda_input_raises_type_error():
    with pytest.raises(TypeError):
        normax.softmax(torch.zeros(3, 3, device=DEV, dtype=torch.float64))
