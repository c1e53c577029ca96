"""The linear cross-entropy's host path: what a forward+backward of ``normax.torch.linear_cross_entropy``
on CUDA tensors asks torch for, recorded by ``torch.profiler`` (issue 22, item 5).

CPU tensors pose as CUDA ones (the `cuda_kernels` emulation), the ops' direct route runs their CUDA
kernels, and cuBLAS's mixed-precision GEMM (bfloat16 factors into a float32 output: ``mm`` and
``addmm`` with ``out_dtype``), which the CPU lacks, is emulated into the same output. The census
counts every allocation by its size in bytes (each op's own allocations, as the profiler records
them) and every fill by its shape: no (N, H) or (V, H) zeros, no (V, H) temporary besides the float32 accumulator, the
gradients handed to ``.grad`` without a copy.
"""

import normax.torch as nt
import pytest
from cuda_emulation import torch
from normax.torch import _linear_cross_entropy as lce
from torch.profiler import ProfilerActivity, profile

N, H, V = 40, 24, 56  # sizes whose (N, H) and (V, H) byte counts no other tensor here has
ROWS = 16  # rows per block: blocks of 16, 16 and 8 rows
FILLS = ("aten::zeros", "aten::zero_", "aten::fill_", "aten::zeros_like", "aten::new_zeros", "aten::full")


def _mm(a, b, out_dtype, *, out):
    return torch.mm(a.to(out_dtype), b.to(out_dtype), out=out)


def _addmm(self, a, b, out_dtype, *, beta=1, alpha=1, out):
    return torch.addmm(self, a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha, out=out)


@pytest.fixture(scope="module")
def mixed_gemm():
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm.dtype_out", _mm, "CPU")
    lib.impl("addmm.dtype_out", _addmm, "CPU")
    yield
    lib._destroy()


@pytest.fixture
def cuda_route(cuda_kernels, mixed_gemm, monkeypatch):
    """normax.torch's linear cross-entropy ops run their CUDA kernels on CPU tensors."""
    monkeypatch.setitem(lce._linear_ce_op._kernels, "cpu", lce._linear_ce_cuda)
    monkeypatch.setitem(lce._linear_ce_with_grad_op._kernels, "cpu", lce._linear_ce_with_grad_cuda)
    return cuda_kernels


def census(fn):
    """(sizes in bytes of the allocations, shapes of the fills) while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        fn()
    allocations, fills = [], []
    for e in prof.events():
        if e.self_cpu_memory_usage > 0:  # what the op itself allocated (its children: their own)
            allocations.append(e.self_cpu_memory_usage)
        if e.name in FILLS:
            shape = e.concrete_inputs[0] if e.name in ("aten::zeros", "aten::full") else e.input_shapes[0]
            fills.append(tuple(shape))
    return allocations, fills


def _inputs():
    g = torch.Generator().manual_seed(2)
    hid = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, generator=g) / 5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[3] = -100
    return hid, w, t


def test_the_census_sees_zero_gradients_and_temporaries():
    """The harness itself: materialised zero gradients and a (V, H) temporary are counted."""
    hid, w, _ = _inputs()

    class Materialising(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            extra = torch.empty(N, H)
            ctx.mark_non_differentiable(extra)
            return x.float().sum(), extra

        @staticmethod
        def backward(ctx, grad, _zeros):
            return grad.expand(N, H).bfloat16()

    allocations, fills = census(lambda: Materialising.apply(hid)[0].backward())
    assert (N, H) in fills
    allocations, _ = census(lambda: w.detach() @ torch.eye(H, dtype=w.dtype))  # a (V, H) product
    assert allocations.count(V * H * 2) == 1


@pytest.mark.parametrize("accumulation", ["float32", "input"])
def test_linear_forward_backward_census(cuda_route, accumulation):
    hid, w, t = _inputs()
    result = {}

    def step():
        loss = nt.linear_cross_entropy(hid, w, t, chunk_size=ROWS * V, accumulation=accumulation)
        loss.backward()
        result["loss"] = loss

    allocations, fills = census(step)
    assert cuda_route.names().count("cuda_cross_entropy") == 3  # three blocks
    # No zeros of the gradients' shapes: the direct route does not materialise gradients, and
    # dweight is written by the first block's GEMM, then added to in place.
    assert (N, H) not in fills and (V, H) not in fills, fills
    # (V, H): the float32 accumulator (accumulation="float32") and the bfloat16 result, no other;
    # (N, H): dhidden only. The backward hands them to .grad (scaled in place): no copies.
    assert allocations.count(V * H * 4) == (accumulation == "float32")
    assert allocations.count(V * H * 2) == 1
    assert allocations.count(N * H * 2) == 1 and allocations.count(N * H * 4) == 0
    # A float32 loss; the gradients of matmul + cross_entropy in float32 (bfloat16 roundings).
    loss = result["loss"]
    assert loss.dtype == torch.float32
    h32, w32 = hid.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h32 @ w32.T, t)
    ref.backward()
    # The loss of the bfloat16 logits (the GEMM's output), not rounded to bfloat16 itself.
    logits = (hid.detach() @ w.detach().T).float()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, t), rtol=1e-6, atol=0)
    torch.testing.assert_close(hid.grad.float(), h32.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=2e-2, atol=2e-3)
